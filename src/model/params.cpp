#include "model/params.h"

#include <algorithm>

#include "core/error.h"

namespace dsv3 {

int64_t ParamSpec::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ParamSpec::hf_name_of(int64_t e) const {
  if (!expert_stack) return hf_name;
  std::string s = hf_name;
  s.replace(s.find("{e}"), 3, std::to_string(e));
  return s;
}

std::vector<int64_t> ParamSpec::hf_shape() const {
  if (!expert_stack) return shape;
  return std::vector<int64_t>(shape.begin() + 1, shape.end());
}

namespace {

// Column-parallel Linear: weight (out, in) split along out (dim 0); row-parallel: along in (dim 1).
constexpr int kColumn = 0, kRow = 1, kReplicated = -1;

struct TableBuilder {
  std::vector<ParamSpec> t;
  ParamSpec& add(std::string name, std::vector<int64_t> shape, int shard, int layer, bool fp8 = false) {
    ParamSpec p;
    p.hf_name = name;
    p.name = std::move(name);
    p.decay = shape.size() >= 2;
    p.shape = std::move(shape);
    p.shard_dim = shard;
    p.layer = layer;
    p.fp8 = fp8;
    t.push_back(p);
    return t.back();
  }
};

// One decoder layer: MLA attention + dense MLP or MoE. `pre` is "model.layers.{i}."
void add_layer(TableBuilder& b, const ModelConfig& c, int64_t i) {
  const std::string pre = "model.layers." + std::to_string(i) + ".";
  const int L = (int)i;
  const int64_t D = c.hidden_size, H = c.num_attention_heads;
  b.add(pre + "input_layernorm.weight", {D}, kReplicated, L);
  const std::string at = pre + "self_attn.";
  if (c.q_lora_rank > 0) {
    b.add(at + "q_a_proj.weight", {c.q_lora_rank, D}, kReplicated, L, true);  // replicated, as in Megatron
    b.add(at + "q_a_layernorm.weight", {c.q_lora_rank}, kReplicated, L);
    b.add(at + "q_b_proj.weight", {H * c.qk_head_dim(), c.q_lora_rank}, kColumn, L, true);
  } else {
    b.add(at + "q_proj.weight", {H * c.qk_head_dim(), D}, kColumn, L, true);
  }
  b.add(at + "kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, D}, kReplicated, L, true);
  b.add(at + "kv_a_layernorm.weight", {c.kv_lora_rank}, kReplicated, L);
  b.add(at + "kv_b_proj.weight", {H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, kColumn, L, true);
  b.add(at + "o_proj.weight", {D, H * c.v_head_dim}, kRow, L, true);
  b.add(pre + "post_attention_layernorm.weight", {D}, kReplicated, L);
  const std::string mlp = pre + "mlp.";
  if (!c.is_moe_layer(i)) {
    b.add(mlp + "gate_proj.weight", {c.intermediate_size, D}, kColumn, L, true);
    b.add(mlp + "up_proj.weight", {c.intermediate_size, D}, kColumn, L, true);
    b.add(mlp + "down_proj.weight", {D, c.intermediate_size}, kRow, L, true);
    return;
  }
  const int64_t E = c.n_routed_experts, I = c.moe_intermediate_size;
  b.add(mlp + "gate.weight", {E, D}, kReplicated, L);  // FP32 router, never quantized
  ParamSpec& bias = b.add(mlp + "gate.e_score_correction_bias", {E}, kReplicated, L);
  bias.trainable = false;
  // Routed experts stacked (E, out, in): one tensor per projection, sharded over expert-parallel ranks along dim 0.
  for (const char* proj : {"gate_proj", "up_proj", "down_proj"}) {
    const bool down = std::string(proj) == "down_proj";
    ParamSpec& p = b.add(mlp + "experts." + proj + ".weight", down ? std::vector<int64_t>{E, D, I} : std::vector<int64_t>{E, I, D},
                         down ? 2 : 1, L, true);
    p.hf_name = mlp + "experts.{e}." + proj + ".weight";
    p.expert_stack = true;
  }
  if (c.n_shared_experts > 0) {
    const int64_t Is = I * c.n_shared_experts;
    b.add(mlp + "shared_experts.gate_proj.weight", {Is, D}, kColumn, L, true);
    b.add(mlp + "shared_experts.up_proj.weight", {Is, D}, kColumn, L, true);
    b.add(mlp + "shared_experts.down_proj.weight", {D, Is}, kRow, L, true);
  }
}

}  // namespace

std::vector<ParamSpec> build_param_table(const ModelConfig& c) {
  TableBuilder b;
  const int64_t D = c.hidden_size, V = c.vocab_size;
  ParamSpec& emb = b.add("model.embed_tokens.weight", {V, D}, kColumn, -1);  // vocab-parallel
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) add_layer(b, c, i);
  b.add("model.norm.weight", {D}, kReplicated, -1);
  b.add("lm_head.weight", {V, D}, kColumn, -1);
  // MTP module k is HF layer num_hidden_layers + k: enorm, hnorm, eh_proj, a full decoder layer, shared_head.norm;
  // its embed_tokens and shared_head.head are the main model's (tied): stored in HF, one parameter here.
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    const int64_t i = c.num_hidden_layers + k;
    const std::string pre = "model.layers." + std::to_string(i) + ".";
    b.add(pre + "enorm.weight", {D}, kReplicated, (int)i);
    b.add(pre + "hnorm.weight", {D}, kReplicated, (int)i);
    b.add(pre + "eh_proj.weight", {D, 2 * D}, kReplicated, (int)i);
    add_layer(b, c, i);
    b.add(pre + "shared_head.norm.weight", {D}, kReplicated, (int)i);
  }
  // aliases are added after the table is complete (push_back may have moved `emb`)
  (void)emb;
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    const std::string pre = "model.layers." + std::to_string(c.num_hidden_layers + k) + ".";
    for (auto& p : b.t) {
      if (p.name == "model.embed_tokens.weight") p.hf_aliases.push_back(pre + "embed_tokens.weight");
      if (p.name == "lm_head.weight") p.hf_aliases.push_back(pre + "shared_head.head.weight");
    }
  }
  return b.t;
}

ParamCounts count_params(const ModelConfig& c) {
  // Fuzzing fix: the sums used to overflow int64 (undefined behaviour) for configs whose tensors each fit but
  // whose total does not; ModelConfig::validate() bounds each tensor and the layer count, the sums are checked here.
  auto acc = [&](int64_t& sum, int64_t k, const char* what) {
    DSV3_CHECK(!__builtin_add_overflow(sum, k, &sum),
               c.source << ": the model's " << what << " parameter count overflows int64");
  };
  auto times = [&](int64_t a, int64_t b) {
    int64_t r = 0;
    DSV3_CHECK(!__builtin_mul_overflow(a, b, &r), c.source << ": the model's parameter count overflows int64");
    return r;
  };
  ParamCounts n;
  const auto table = build_param_table(c);
  int64_t routed_unused = 0;
  for (const auto& p : table) {
    const bool mtp = p.layer >= c.num_hidden_layers;
    const int64_t k = p.numel();
    if (!p.trainable) acc(n.biases, k, "bias");
    acc(mtp ? n.mtp : n.main, k, mtp ? "MTP" : "main");
    acc(n.hf_total, times(k, 1 + (int64_t)p.hf_aliases.size()), "total");
    if (!mtp && p.expert_stack) acc(routed_unused, k / p.shape[0] * (p.shape[0] - c.num_experts_per_tok), "routed");
  }
  n.activated = n.main - routed_unused;
  return n;
}

Params::Params(std::vector<ParamSpec> table, ShardPlan plan) : table_(std::move(table)), plan_(plan) {
  DSV3_CHECK(plan_.ep_size >= 1 && plan_.ep_rank >= 0 && plan_.ep_rank < plan_.ep_size,
             "bad expert-parallel shard " << plan_.ep_rank << " of " << plan_.ep_size);
  DSV3_CHECK(plan_.held.empty() || plan_.held.size() == table_.size(), "shard plan does not match the table");
  DSV3_CHECK(plan_.tp_size >= 1 && plan_.tp_rank >= 0 && plan_.tp_rank < plan_.tp_size,
             "bad tensor-parallel shard " << plan_.tp_rank << " of " << plan_.tp_size);
  DSV3_CHECK(plan_.etp_size >= 1 && plan_.etp_rank >= 0 && plan_.etp_rank < plan_.etp_size,
             "bad expert-tensor-parallel shard " << plan_.etp_rank << " of " << plan_.etp_size);

  for (size_t i = 0; i < table_.size(); ++i) {
    DSV3_CHECK(index_.emplace(table_[i].name, i).second, "duplicate parameter name " << table_[i].name);
    DSV3_CHECK(!table_[i].expert_stack || table_[i].shape[0] % plan_.ep_size == 0,
               "parallel.ep=" << plan_.ep_size << " does not divide the " << table_[i].shape[0] << " experts of "
                              << table_[i].name);
    DSV3_CHECK(!etp_sharded(table_[i]) || table_[i].shape[table_[i].shard_dim] % plan_.etp_size == 0,
               "parallel.etp=" << plan_.etp_size << " does not divide dimension " << table_[i].shard_dim << " ("
                               << table_[i].shape[table_[i].shard_dim] << ") of " << table_[i].name);
    DSV3_CHECK(!tp_sharded(table_[i]) || table_[i].shape[table_[i].shard_dim] % plan_.tp_size == 0,
               "parallel.tp=" << plan_.tp_size << " does not divide dimension " << table_[i].shard_dim << " ("
                              << table_[i].shape[table_[i].shard_dim] << ") of " << table_[i].name);
  }
  // storage by optimizer bucket (optim/adamw.h), each in table order: the dense trainable parameters this rank owns,
  // its routed experts, then the rest (not trainable, or a copy of another stage's parameter) -- so that a bucket's
  // gradients lie contiguous and the optimizer reads them in place
  // (each bucket padded with zeros to its ZeRO-1 group's multiple)
  DSV3_CHECK(plan_.dense_align >= 1 && plan_.expert_align >= 1,
             "bad bucket alignment " << plan_.dense_align << " / " << plan_.expert_align);
  offset_.assign(table_.size(), 0);
  int64_t off = 0;
  for (int bucket = 0; bucket < 3; ++bucket) {
    const int64_t begin = off;
    for (size_t i = 0; i < table_.size(); ++i) {
      const ParamSpec& p = table_[i];
      const bool optimized = p.trainable && holding(p) == ShardPlan::kOwner;
      if ((optimized ? (p.expert_stack ? 1 : 0) : 2) != bucket) continue;
      offset_[i] = off;
      off += local_numel(p);
    }
    if (bucket < 2) {
      const int64_t align = bucket == 0 ? plan_.dense_align : plan_.expert_align;
      off = begin + (off - begin + align - 1) / align * align;  // the region's length a multiple of its group
      bucket_region_[bucket] = {begin, off};
    }
  }
  data_ = Floats((size_t)off);  // zeroed, in the run's memory (core/memory.h)
}

uint8_t Params::holding(const ParamSpec& p) const {
  if (plan_.held.empty()) return ShardPlan::kOwner;
  return plan_.held[index_.at(p.name)];
}

int64_t Params::local_numel(const ParamSpec& p) const {
  if (!held(p)) return 0;
  if (p.expert_stack) return p.numel() / plan_.ep_size / (etp_sharded(p) ? plan_.etp_size : 1);
  return tp_sharded(p) ? p.numel() / plan_.tp_size : p.numel();
}

std::vector<int64_t> Params::local_shape(const ParamSpec& p) const {
  std::vector<int64_t> s = p.shape;
  if (p.expert_stack) s[0] /= plan_.ep_size;
  if (etp_sharded(p)) s[p.shard_dim] /= plan_.etp_size;
  else if (tp_sharded(p)) s[p.shard_dim] /= plan_.tp_size;
  return s;
}

GlobalLayout Params::global_layout(const ParamSpec& p) const {
  const int64_t n = std::max<int64_t>(local_numel(p), 1);
  const int64_t expert0 = first_expert(p) * (p.numel() / p.n_experts());  // the first local expert's element
  if (!sliced(p)) return {n, n, expert0};
  // tp: runs of inner/tp of every `inner` block; etp: the same inside each local expert (inner divides an expert)
  int64_t inner = 1;
  for (size_t d = p.shard_dim; d < p.shape.size(); ++d) inner *= p.shape[d];
  const int size = etp_sharded(p) ? plan_.etp_size : plan_.tp_size, rank = etp_sharded(p) ? plan_.etp_rank : plan_.tp_rank;
  const int64_t run = inner / size;
  return {run, inner, expert0 + rank * run};
}

void Params::take_slice(const ParamSpec& p, const float* global, float* local) const {
  const GlobalLayout g = global_layout(p);
  const int64_t n = local_numel(p);
  for (int64_t k0 = 0; k0 < n; k0 += g.run) std::copy_n(global + g.global(k0), std::min(g.run, n - k0), local + k0);
}

const ParamSpec& Params::spec(const std::string& name) const {
  auto it = index_.find(name);
  DSV3_CHECK(it != index_.end(), "no parameter named '" << name << "'");
  return table_[it->second];
}

int64_t Params::offset(const std::string& name) const {
  auto it = index_.find(name);
  DSV3_CHECK(it != index_.end(), "no parameter named '" << name << "'");
  return offset_[it->second];
}

float* Params::get(const std::string& name) {
  DSV3_CHECK(held(spec(name)), "parameter '" << name << "' is not held on this pipeline stage");
  return data_.data() + offset(name);
}
const float* Params::get(const std::string& name) const {
  DSV3_CHECK(held(spec(name)), "parameter '" << name << "' is not held on this pipeline stage");
  return data_.data() + offset(name);
}

}  // namespace dsv3
