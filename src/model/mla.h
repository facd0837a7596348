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

#include "model/config.h"
#include "model/params.h"
#include "model/rope.h"
#include "ops/backend.h"

namespace dsv3 {

struct MlaWeights {
  const float* q_a = nullptr;      // (q_lora_rank, D)
  const float* q_a_norm = nullptr; // (q_lora_rank)
  const float* q_b = nullptr;      // (H*(dn+dr), q_lora_rank)
  const float* q = nullptr;        // (H*(dn+dr), D) when q_lora_rank = 0
  const float* kv_a = nullptr;     // (kvr+dr, D)
  const float* kv_a_norm = nullptr;// (kvr)
  const float* kv_b = nullptr;     // (H*(dn+dv), kvr)
  const float* o = nullptr;        // (D, H*dv)
  static MlaWeights from(const Params& p, const ModelConfig& c, int64_t layer);
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

// x_norm (B*S, D) -> out (B*S, D); positions 0..S-1 in each sequence.
void mla_forward(Backend& be, const ModelConfig& c, const MlaWeights& w, const RopeTable& rope, const float* x_norm,
                 int64_t B, int64_t S, float* out);

// One sequence, n new tokens at positions cache.len.., attending to the cache (weights absorbed into the query:
// score = (q_nope W_uk) . c + q_pe . k_pe; output = W_uv (sum p c)). x_norm (n, D) -> out (n, D).
void mla_forward_cached(Backend& be, const ModelConfig& c, const MlaWeights& w, const RopeTable& rope,
                        const float* x_norm, int64_t n, MlaCache& cache, float* out);

}  // namespace dsv3
