// defines: MlaWeights, MlaCache, mla_forward (training/prefill form), mla_forward_cached (latent KV cache)
// Multi-head Latent Attention (DeepSeek-V2/V3):
//   q    = q_b(rmsnorm(q_a(x)))                 (T, H*(dn+dr))   or q_proj(x) when q_lora_rank = 0
//   c|kp = kv_a(x)                              (T, kvr + dr)    c: the latent, kp: the decoupled RoPE key
//   k|v  = kv_b(rmsnorm(c))                     (T, H*(dn+dv))
//   score = (q_nope.k_nope + rope(q_pe).rope(k_pe)) * softmax_scale, causal softmax, o_proj
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/memory.h"
#include "model/config.h"
#include "model/params.h"
#include "model/rope.h"
#include "model/tensor_parallel.h"
#include "ops/backend.h"

namespace dsv3 {

// Pointers into a Params store: the weights, or (same layout) their gradients. Under tensor parallelism a rank holds
// H/tp heads: q_b (or q_proj) and kv_b are its rows of those heads, o its columns; q_a, kv_a and the norms whole.
struct MlaWeights {
  float* q_a = nullptr;       // (q_lora_rank, D)
  float* q_a_norm = nullptr;  // (q_lora_rank)
  float* q_b = nullptr;       // (H*(dn+dr), q_lora_rank)
  float* q = nullptr;         // (H*(dn+dr), D) when q_lora_rank = 0
  float* kv_a = nullptr;      // (kvr+dr, D)
  float* kv_a_norm = nullptr; // (kvr)
  float* kv_b = nullptr;      // (H*(dn+dv), kvr)
  float* o = nullptr;         // (D, H*dv)
  static MlaWeights from(Params& p, const ModelConfig& c, int64_t layer);
};

// What backward needs from the forward of one MLA block (T = B*S tokens).
// Buffers in the run's memory (core/memory.h).
struct MlaActs {
  Floats qa, qa_rstd, qan;  // q-LoRA: (T, qr) pre-norm, (T), (T, qr) normalised
  Floats q;                 // (T, H*(dn+dr)), RoPE applied
  Floats kva;               // (T, kvr+dr): latent c (pre-norm) | k_pe (RoPE applied)
  Floats c_rstd, cn;        // (T), (T, kvr)
  Floats kv;                // (T, H*(dn+dv))
  Floats probs;             // (B, H, S, S)  run.attention = standard
  Floats lse;               // (B, H, S)     run.attention = flash: per-row log-sum-exp instead of probs
  Floats o;                 // (T, H*dv)
};

// The MLA inference cache of one layer and one sequence: only the normalised latent c (kvr) and the rotated k_pe
// (dr) per position — (kvr+dr) floats per token instead of H*(dn+dr+dv) for full K/V (e.g. 576 vs 40960).
struct MlaCache {
  int64_t len = 0;             // positions filled
  int64_t cap = 0;
  std::vector<float> c;        // (cap, kvr)
  std::vector<float> k_pe;     // (cap, dr)
  void reserve(const ModelConfig& cfg, int64_t capacity);
};

// x_norm (B*S, D) -> out (B*S, D); positions 0..S-1 in each sequence. Fills `acts` (required: the buffers live
// there; pass a scratch object when backward is not needed). tp: this rank's heads; out is summed over the group
// (sp: x_norm is the all-gathered (B*S, D), out this rank's rows (B*S/tp, D) of the sum: a reduce-scatter).
void mla_forward(Backend& be, const ModelConfig& c, const MlaWeights& w, const RopeTable& rope, const float* x_norm,
                 int64_t B, int64_t S, float* out, MlaActs& acts, const TensorGroup& tp = {});
// Selective recompute: frees the up-projections (qan, q, cn, kv: the largest MLA activations, e.g. 57 KiB per
// token at the real dims); mla_backward then rebuilds them from the kept latents (qa, kva) and x_norm.
void mla_drop_up_projections(MlaActs& a);
// Gradients given dout (B*S, D): weight gradients accumulate into g, dx_norm (B*S, D) accumulates (+=). tp: the
// gradients into the replicated q-LoRA latent, kv latent and k_pe (and into x_norm through q_proj) are summed over
// the group, so dx_norm and the replicated weights' gradients are the same on every rank. sp: dout is the
// all-gathered (B*S, D), dx_norm this rank's rows (B*S/tp, D) (q_proj's partial input gradient reduce-scattered).
void mla_backward(Backend& be, const ModelConfig& c, const MlaWeights& w, MlaWeights& g, const RopeTable& rope,
                  const float* x_norm, int64_t B, int64_t S, const MlaActs& a, const float* dout, float* dx_norm,
                  const TensorGroup& tp = {});

// One sequence, n new tokens at positions cache.len.., attending to the cache (weights absorbed into the query:
// score = (q_nope W_uk) . c + q_pe . k_pe; output = W_uv (sum p c)). x_norm (n, D) -> out (n, D).
void mla_forward_cached(Backend& be, const ModelConfig& c, const MlaWeights& w, const RopeTable& rope,
                        const float* x_norm, int64_t n, MlaCache& cache, float* out, const TensorGroup& tp = {});

}  // namespace dsv3
