#include "model/mla.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace dsv3 {

MlaWeights MlaWeights::from(const Params& p, const ModelConfig& c, int64_t layer) {
  const std::string at = "model.layers." + std::to_string(layer) + ".self_attn.";
  MlaWeights w;
  if (c.q_lora_rank > 0) {
    w.q_a = p.get(at + "q_a_proj.weight");
    w.q_a_norm = p.get(at + "q_a_layernorm.weight");
    w.q_b = p.get(at + "q_b_proj.weight");
  } else {
    w.q = p.get(at + "q_proj.weight");
  }
  w.kv_a = p.get(at + "kv_a_proj_with_mqa.weight");
  w.kv_a_norm = p.get(at + "kv_a_layernorm.weight");
  w.kv_b = p.get(at + "kv_b_proj.weight");
  w.o = p.get(at + "o_proj.weight");
  return w;
}

void MlaCache::reserve(const ModelConfig& cfg, int64_t capacity) {
  cap = capacity;
  c.assign(capacity * cfg.kv_lora_rank, 0.0f);
  k_pe.assign(capacity * cfg.qk_rope_head_dim, 0.0f);
}

namespace {

// q (T, H*(dn+dr)) from x_norm (T, D)
void project_q(Backend& be, const ModelConfig& c, const MlaWeights& w, const float* xn, int64_t T, float* q) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads, dqk = c.qk_head_dim();
  if (c.q_lora_rank > 0) {
    const int64_t r = c.q_lora_rank;
    std::vector<float> qa(T * r), qan(T * r);
    be.gemm_nt(T, r, D, 1.0f, xn, D, w.q_a, D, 0.0f, qa.data(), r);
    be.rmsnorm_forward(qa.data(), r, w.q_a_norm, (float)c.rms_norm_eps, T, r, qan.data(), nullptr);
    be.gemm_nt(T, H * dqk, r, 1.0f, qan.data(), r, w.q_b, r, 0.0f, q, H * dqk);
  } else {
    be.gemm_nt(T, H * dqk, D, 1.0f, xn, D, w.q, D, 0.0f, q, H * dqk);
  }
}

}  // namespace

void mla_forward(Backend& be, const ModelConfig& c, const MlaWeights& w, const RopeTable& rope, const float* xn,
                 int64_t B, int64_t S, float* out) {
  const int64_t T = B * S, D = c.hidden_size, H = c.num_attention_heads;
  const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, kvr = c.kv_lora_rank;
  DSV3_CHECK(S <= rope.max_pos, "sequence length " << S << " exceeds the RoPE table (" << rope.max_pos << ")");
  std::vector<float> q(T * H * (dn + dr)), kva(T * (kvr + dr)), cn(T * kvr), kv(T * H * (dn + dv)), o(T * H * dv);
  std::vector<int64_t> pos(T);
  for (int64_t t = 0; t < T; ++t) pos[t] = t % S;

  project_q(be, c, w, xn, T, q.data());
  be.gemm_nt(T, kvr + dr, D, 1.0f, xn, D, w.kv_a, D, 0.0f, kva.data(), kvr + dr);
  be.rmsnorm_forward(kva.data(), kvr + dr, w.kv_a_norm, (float)c.rms_norm_eps, T, kvr, cn.data(), nullptr);
  be.gemm_nt(T, H * (dn + dv), kvr, 1.0f, cn.data(), kvr, w.kv_b, kvr, 0.0f, kv.data(), H * (dn + dv));
  // RoPE on q_pe of every head and on the single shared k_pe (the last dr columns of kv_a's output)
  be.rope_forward(q.data() + dn, T, H * (dn + dr), H, dn + dr, dr, pos.data(), rope.cos.data(), rope.sin.data());
  be.rope_forward(kva.data() + kvr, T, kvr + dr, 1, 0, dr, pos.data(), rope.cos.data(), rope.sin.data());
  be.mla_attention_forward(q.data(), kv.data(), kva.data() + kvr, kvr + dr, B, S, H, dn, dr, dv,
                           (float)attention_softmax_scale(c), o.data(), nullptr);
  be.gemm_nt(T, D, H * dv, 1.0f, o.data(), H * dv, w.o, H * dv, 0.0f, out, D);
}

void mla_forward_cached(Backend& be, const ModelConfig& c, const MlaWeights& w, const RopeTable& rope,
                        const float* xn, int64_t n, MlaCache& cache, float* out) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads;
  const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, kvr = c.kv_lora_rank;
  const int64_t p0 = cache.len, len = p0 + n;
  DSV3_CHECK(len <= cache.cap && len <= rope.max_pos,
             "generation reached position " << len << ", beyond the cache/RoPE capacity " << std::min(cache.cap, rope.max_pos));
  std::vector<float> q(n * H * (dn + dr)), kva(n * (kvr + dr));
  std::vector<int64_t> pos(n);
  for (int64_t t = 0; t < n; ++t) pos[t] = p0 + t;
  project_q(be, c, w, xn, n, q.data());
  be.gemm_nt(n, kvr + dr, D, 1.0f, xn, D, w.kv_a, D, 0.0f, kva.data(), kvr + dr);
  be.rope_forward(q.data() + dn, n, H * (dn + dr), H, dn + dr, dr, pos.data(), rope.cos.data(), rope.sin.data());
  be.rope_forward(kva.data() + kvr, n, kvr + dr, 1, 0, dr, pos.data(), rope.cos.data(), rope.sin.data());
  // append the new latents (normalised) and rotated k_pe to the cache
  be.rmsnorm_forward(kva.data(), kvr + dr, w.kv_a_norm, (float)c.rms_norm_eps, n, kvr, cache.c.data() + p0 * kvr,
                     nullptr);
  for (int64_t t = 0; t < n; ++t)
    std::copy_n(kva.data() + t * (kvr + dr) + kvr, dr, cache.k_pe.data() + (p0 + t) * dr);
  cache.len = len;

  const float scale = (float)attention_softmax_scale(c);
  std::vector<float> q_lat(n * kvr), scores(n * len), o_lat(n * kvr), o(n * H * dv);
  for (int64_t h = 0; h < H; ++h) {
    const float* w_uk = w.kv_b + h * (dn + dv) * kvr;  // (dn, kvr): rows of kv_b producing head h's k_nope
    const float* w_uv = w_uk + dn * kvr;               // (dv, kvr): rows producing head h's v
    const float* qh = q.data() + h * (dn + dr);
    // absorbed query: q_lat (n, kvr) = q_nope (n, dn) . W_uk (dn, kvr)
    be.gemm_nn(n, kvr, dn, 1.0f, qh, H * (dn + dr), w_uk, kvr, 0.0f, q_lat.data(), kvr);
    // scores (n, len) = scale * (q_lat . c^T + q_pe . k_pe^T)
    be.gemm_nt(n, len, kvr, scale, q_lat.data(), kvr, cache.c.data(), kvr, 0.0f, scores.data(), len);
    be.gemm_nt(n, len, dr, scale, qh + dn, H * (dn + dr), cache.k_pe.data(), dr, 1.0f, scores.data(), len);
    for (int64_t t = 0; t < n; ++t) {  // causal: new token t sees positions 0..p0+t
      float* row = scores.data() + t * len;
      const int64_t vis = p0 + t + 1;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < vis; ++j) mx = std::max(mx, row[j]);
      double sum = 0;
      for (int64_t j = 0; j < vis; ++j) sum += (row[j] = std::exp(row[j] - mx));
      for (int64_t j = 0; j < vis; ++j) row[j] = (float)(row[j] / sum);
      std::fill(row + vis, row + len, 0.0f);
    }
    // o_lat (n, kvr) = p . c;  o_h (n, dv) = o_lat . W_uv^T
    be.gemm_nn(n, kvr, len, 1.0f, scores.data(), len, cache.c.data(), kvr, 0.0f, o_lat.data(), kvr);
    be.gemm_nt(n, dv, kvr, 1.0f, o_lat.data(), kvr, w_uv, kvr, 0.0f, o.data() + h * dv, H * dv);
  }
  be.gemm_nt(n, D, H * dv, 1.0f, o.data(), H * dv, w.o, H * dv, 0.0f, out, D);
}

}  // namespace dsv3
