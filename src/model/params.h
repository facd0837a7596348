// defines: dsv3::ParamSpec, build_param_table, ParamCounts, count_params, Params (FP32 storage by name)
// The one source of truth for tensors: every parameter's name, global shape, Hugging Face name(s), tensor-parallel
// shard dimension and optimizer traits. Allocation, HF import/export, HDF5 checkpoints and the tests all iterate
// over this table; nothing indexes parameters by position.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/memory.h"
#include "model/config.h"

namespace dsv3 {

struct ParamSpec {
  std::string name;              // ours, e.g. "model.layers.3.mlp.experts.gate_proj.weight" (experts stacked)
  std::vector<int64_t> shape;    // global shape, e.g. (256, 2048, 7168) for stacked routed experts
  std::string hf_name;           // HF name; for stacked experts it contains "{e}" (one HF tensor per expert)
  std::vector<std::string> hf_aliases;  // tied copies in the HF layout (the MTP module's embed_tokens / head)
  int shard_dim = -1;            // tensor-parallel shard dimension of the global tensor (-1: replicated)
  int layer = -1;                // decoder layer (MTP layers continue after the main ones), -1 otherwise
  bool expert_stack = false;     // dim 0 indexes routed experts (sharded over expert parallel ranks)
  bool decay = false;            // AdamW weight decay (every >= 2-D weight; not norms)
  bool trainable = true;         // false for e_score_correction_bias (updated by the balancing rule)
  bool fp8 = false;              // quantized (F8_E4M3 + scale_inv) in the released FP8 checkpoint

  int64_t numel() const;
  int64_t n_experts() const { return expert_stack ? shape[0] : 1; }
  // HF name of expert e (or of the whole tensor when not stacked).
  std::string hf_name_of(int64_t e) const;
  // shape of one HF tensor (per expert for stacked experts)
  std::vector<int64_t> hf_shape() const;
};

std::vector<ParamSpec> build_param_table(const ModelConfig& c);

struct ParamCounts {
  int64_t main = 0;        // main model incl. embedding and head (the "671B")
  int64_t mtp = 0;         // MTP modules, excluding the tied embedding/head
  int64_t hf_total = 0;    // as in the HF files: main + MTP + the MTP's stored copies of embed/head (the "685B")
  int64_t activated = 0;   // per token: all but the routed experts not chosen (main model, the "37B")
  int64_t biases = 0;      // e_score_correction_bias elements (non-trainable)
};
ParamCounts count_params(const ModelConfig& c);

// Which part of the parameters this rank holds. Expert parallelism: the routed experts of every MoE layer are
// split into ep contiguous ranges; rank ep_rank holds experts [ep_rank*E/ep, (ep_rank+1)*E/ep).
// Pipeline parallelism: a stage holds only its own parameters (held, by table index; empty = all) and possibly a
// copy of one it shares with another stage (the word embedding, used by the MTP module on the last stage).
// Tensor parallelism: a parameter with shard_dim >= 0 (not a routed expert) is cut into tp equal slices along
// shard_dim; rank tp_rank holds slice tp_rank. A dim-0 slice is one contiguous range of the global tensor; a dim-1
// slice of a 2-D (out, in) weight is a column block, `out` strided runs.
// Expert tensor parallelism: each routed expert is cut the same way into etp slices along its shard_dim (the
// intermediate dimension: gate/up rows, down columns); rank etp_rank holds slice etp_rank of its ep range's experts.
struct ShardPlan {
  int ep_size = 1, ep_rank = 0;
  std::vector<uint8_t> held;
  int tp_size = 1, tp_rank = 0;
  int etp_size = 1, etp_rank = 0;
  // the optimizer buckets' storage regions (Params) padded to a multiple of their ZeRO-1 group sizes (dense: dp,
  // routed experts: edp), so that AdamW reduce-scatters a bucket straight from the gradients and gathers the updated
  // weights straight into the parameters
  int dense_align = 1, expert_align = 1;
  static constexpr uint8_t kNotHeld = 0, kOwner = 1, kCopy = 2;
};

// Where the local elements of a parameter sit in the global (row-major) tensor: local element k is global element
// (k / run) * stride + offset + k % run. Unsharded: one run (run = stride = local numel); routed experts: one run at
// the first local expert; a tp slice along dim d: runs of prod(shape[d:])/tp elements, stride prod(shape[d:]).
struct GlobalLayout {
  int64_t run = 0, stride = 0, offset = 0;
  int64_t global(int64_t k) const { return (k / run) * stride + offset + k % run; }
};

// FP32 storage of the parameters this rank holds, addressed by name (contiguous; by optimizer bucket -- the dense
// trainable parameters this rank owns, its routed experts, the rest -- each in table order), in the run's memory
// (core/memory.h: the CUDA pool under run.device = cuda; host code may read and write it through get() outside the
// backend's ops, the pool being managed memory).
class Params {
 public:
  Params() = default;
  explicit Params(std::vector<ParamSpec> table, ShardPlan plan = {});
  const ShardPlan& plan() const { return plan_; }
  // elements held here of a parameter (all of it unless its experts are sharded; 0 on other pipeline stages)
  int64_t local_numel(const ParamSpec& p) const;
  bool held(const ParamSpec& p) const { return holding(p) != ShardPlan::kNotHeld; }
  bool is_copy(const ParamSpec& p) const { return holding(p) == ShardPlan::kCopy; }
  // the experts held here of a stacked expert tensor: [first, first + count); (0, 1) for other parameters
  int64_t first_expert(const ParamSpec& p) const { return p.expert_stack ? plan_.ep_rank * local_experts(p) : 0; }
  int64_t local_experts(const ParamSpec& p) const { return p.expert_stack ? p.shape[0] / plan_.ep_size : 1; }
  // true when this rank holds a tensor-parallel slice of p (tp > 1, shard_dim >= 0, not a routed expert)
  bool tp_sharded(const ParamSpec& p) const { return plan_.tp_size > 1 && p.shard_dim >= 0 && !p.expert_stack; }
  // true when this rank holds an expert-tensor-parallel slice of each of its experts of p (etp > 1)
  bool etp_sharded(const ParamSpec& p) const { return plan_.etp_size > 1 && p.shard_dim >= 0 && p.expert_stack; }
  // either: this rank's part of p is strided runs of the global tensor (GlobalLayout), not one contiguous range
  bool sliced(const ParamSpec& p) const { return tp_sharded(p) || etp_sharded(p); }
  // the shape of what this rank holds of p (a held parameter): shard_dim divided by tp (experts: by etp), experts
  // by ep
  std::vector<int64_t> local_shape(const ParamSpec& p) const;
  GlobalLayout global_layout(const ParamSpec& p) const;
  // copies this rank's part of p out of the full global tensor (global: p.numel() values)
  void take_slice(const ParamSpec& p, const float* global, float* local) const;
  const std::vector<ParamSpec>& table() const { return table_; }
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  const ParamSpec& spec(const std::string& name) const;
  float* get(const std::string& name);
  const float* get(const std::string& name) const;
  float* data() { return data_.data(); }
  const float* data() const { return data_.data(); }
  int64_t size() const { return (int64_t)data_.size(); }
  void zero() { data_.zero(); }  // every element 0 (on the device under run.device = cuda)
  int64_t offset(const std::string& name) const;
  // [begin, end) of optimizer bucket k's storage (0: the dense trainable parameters this rank owns, 1: its routed
  // experts), the zero padding up to the plan's alignment included
  std::pair<int64_t, int64_t> bucket_region(int k) const { return bucket_region_[k]; }

 private:
  uint8_t holding(const ParamSpec& p) const;
  std::vector<ParamSpec> table_;
  ShardPlan plan_;
  std::unordered_map<std::string, size_t> index_;
  std::vector<int64_t> offset_;
  std::pair<int64_t, int64_t> bucket_region_[2] = {};
  Floats data_;  // in the run's memory: host, or the GPU's (core/memory.h)
};

}  // namespace dsv3
