// defines: AdamWConfig, AdamW — the distributed (ZeRO-1) AdamW with FP32 master weights; global_grad_norm,
//          clip_grads, round_to_bf16
// AdamW with decoupled weight decay exactly as the golden train.json states it:
//   t += 1; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; if decay: p *= 1 - lr wd;
//   p -= lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
// on every trainable parameter (decay only on >= 2-D ones), every element (also rows whose gradient is zero).
//
// ZeRO-1: the trainable parameters form two flat buckets, the dense ones (replicated over the data-parallel group)
// and the routed experts (replicated over the expert-data-parallel group). Each bucket is padded to a multiple of
// its group size and cut into equal shards; rank r of the group owns shard r: the gradients are reduce-scattered
// into it, only its FP32 master weights and Adam moments exist here, and the updated shard is all-gathered back
// into the model's weights. One rank (or no Comm) is the same code with a single shard.
// The arithmetic on the shards goes through the run's Backend (adamw_update for both buckets in one call,
// sum_squares for the norm, to_bf16/from_bf16 for BF16 weights; on host pointers); the communication stays here.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/params.h"

namespace dsv3 {

class Backend;
class Comm;

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  bool bf16_params = false;   // model weights held in BF16 (the FP32 master lives in the optimizer shard)
  bool bf16_moments = false;  // Adam m and v stored in BF16 (the "precision-aware optimizer")
};

// Global L2 norm over the trainable parameters held in `grads` (one rank's view, pipeline copies excluded), from
// be.sum_squares per tensor (null: a CPU backend).
double global_grad_norm(const Params& grads, Backend* be = nullptr);
// coef = max_norm / (norm + 1e-6); if coef < 1 every gradient is scaled by it. Returns the coefficient applied
// (1 when not clipping; max_norm <= 0 disables clipping).
double clip_coefficient(double norm, double max_norm);
double clip_grads(Params& grads, double norm, double max_norm);
// Rounds every value of x (the run's memory) to the nearest BF16 (RNE) with the backend's to_bf16 and back: how BF16
// storage of gradients/weights is emulated bit-exactly.
void round_to_bf16(Backend& be, float* x, int64_t n);

class AdamW {
 public:
  // comm null: one rank. Otherwise the dense bucket is sharded over the dp group, the experts over edp.
  // be: the backend that does the arithmetic, on host pointers (the run's backend: make_backend); null: a CPU backend
  // of its own. Every backend gives the same bits (ops/backend.h).
  AdamW(const Params& params, const AdamWConfig& cfg, const Comm* comm = nullptr, Backend* be = nullptr);
  ~AdamW();
  AdamW(AdamW&&) noexcept;
  AdamW& operator=(AdamW&&) = delete;
  // Sums the gradients over the data-parallel replicas into this rank's shards and returns the global L2 norm
  // (every unique element once, over all ranks). A group of one reads `grads` in place: step() reads them again, so
  // they stay unchanged (and alive) until then.
  double reduce_grads(const Params& grads);
  // One step at learning rate lr with the reduced gradients times grad_scale (the clip coefficient); the updated
  // weights are gathered into `params`.
  void step(Params& params, double lr, double grad_scale = 1.0);
  // Single-rank convenience: reduce_grads + step.
  void step(Params& params, const Params& grads, double lr);
  int64_t t() const { return t_; }
  Backend& backend() { return *be_; }
  const AdamWConfig& config() const { return cfg_; }

  struct Bucket {
    std::vector<int> params;          // indices into the table
    int64_t size = 0, padded = 0, shard = 0, begin = 0;  // elements, padded to the group, shard length, my offset
    Buffer<uint8_t> decay;            // (shard) weight decay flag of each element of my shard
    // tensor parallelism: the ranges [first, second) of my shard that the grad norm counts here. A parameter
    // replicated over tp has the same gradient on every rank of the tp group: only tp rank 0 counts it; tp slices
    // and experts count everywhere. Empty: the whole shard.
    std::vector<std::pair<int64_t, int64_t>> norm_ranges;
    bool norm_partial = false;        // true: only norm_ranges count
    // the state lives in the run's memory (core/memory.h), where the backend's optimizer ops run on it
    Floats master, g;                 // (shard) FP32 master weights, reduced gradients (groups of more than one)
    // the reduced gradients of my shard for step(), set by reduce_grads: g, or -- a group of one -- the bucket's range
    // of the gradients passed to it (contiguous: model/params.h), read in place instead of copied
    const float* grad = nullptr;
    Floats m, v;                      // (shard) FP32 moments, or
    Buffer<uint16_t> m16, v16;        //         BF16 moments
    int group = 0;                    // GroupKind
  };
  const std::vector<Bucket>& buckets() const { return buckets_; }
  // checkpoint restore (io/checkpoint.cpp): the shards' master weights and moments, and the step count
  std::vector<Bucket>& buckets() { return buckets_; }
  void set_t(int64_t t) { t_ = t; }

 private:
  void pack(const Params& src, const Bucket& b, Floats& flat) const;
  void unpack(const Floats& flat, const Bucket& b, Params& dst) const;
  int64_t contiguous_offset(const Params& p, size_t k) const;  // bucket k's flat form in p, or -1
  // true: the bucket's group has more than one rank (its gradients reduce-scattered, its weights all-gathered)
  bool gathered(const Bucket& b) const;
  AdamWConfig cfg_;
  const Comm* comm_;
  std::unique_ptr<Backend> own_be_;  // the CPU backend when none was given
  Backend* be_;
  int64_t t_ = 0;
  std::vector<Bucket> buckets_;
};

}  // namespace dsv3
