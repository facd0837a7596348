#include "model/mla.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace dsv3 {

MlaWeights MlaWeights::from(Params& p, const ModelConfig& c, int64_t layer) {
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

// The q-LoRA latent qa (T, q_lora_rank) = q_a(x_norm); nothing without q-LoRA (q comes from x_norm directly).
void project_q_latent(Backend& be, const ModelConfig& c, const MlaWeights& w, const float* xn, int64_t T,
                      Floats& qa) {
  if (c.q_lora_rank == 0) return;
  qa.resize(T * c.q_lora_rank);
  be.gemm_nt(T, c.q_lora_rank, c.hidden_size, 1.0f, xn, c.hidden_size, w.q_a, c.hidden_size, 0.0f, qa.data(),
             c.q_lora_rank);
}

// q (T, H*(dn+dr)) before RoPE into u.q: q_b(rmsnorm(qa)) under q-LoRA (u.qan, u.qa_rstd too), else q_proj(x_norm)
void up_project_q(Backend& be, const ModelConfig& c, const MlaWeights& w, const float* xn, const float* qa, int64_t T,
                  int64_t H, MlaActs& u) {
  const int64_t D = c.hidden_size, dqk = c.qk_head_dim();
  u.q.resize(T * H * dqk);
  if (c.q_lora_rank > 0) {
    const int64_t r = c.q_lora_rank;
    u.qan.resize(T * r);
    u.qa_rstd.resize(T);
    be.rmsnorm_forward(qa, r, w.q_a_norm, (float)c.rms_norm_eps, T, r, u.qan.data(), u.qa_rstd.data());
    be.gemm_nt(T, H * dqk, r, 1.0f, u.qan.data(), r, w.q_b, r, 0.0f, u.q.data(), H * dqk);
  } else {
    be.gemm_nt(T, H * dqk, D, 1.0f, xn, D, w.q, D, 0.0f, u.q.data(), H * dqk);
  }
}

// The up-projections, from the kept latents: q (RoPE applied) = q_b(rmsnorm(qa)) under q-LoRA, else q_proj(x_norm);
// kv = kv_b(cn), cn = rmsnorm(c) of the latent c in kva's first kvr columns. Into u: qan, q, cn, kv and the norms'
// rstd (qa_rstd, c_rstd). The forward pass and selective recompute (mla_backward) both run exactly this, so the
// rebuilt tensors are bit-identical to the forward's.
void up_project(Backend& be, const ModelConfig& c, const MlaWeights& w, const RopeTable& rope, const float* xn,
                const float* qa, const float* kva, int64_t T, int64_t H, const int64_t* pos, MlaActs& u) {
  const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
  const int64_t kvr = c.kv_lora_rank, dqk = dn + dr;
  up_project_q(be, c, w, xn, qa, T, H, u);
  be.rope_forward(u.q.data() + dn, T, H * dqk, H, dqk, dr, pos, rope.cos.data(), rope.sin.data());
  u.cn.resize(T * kvr);
  u.c_rstd.resize(T);
  u.kv.resize(T * H * (dn + dv));
  be.rmsnorm_forward(kva, kvr + dr, w.kv_a_norm, (float)c.rms_norm_eps, T, kvr, u.cn.data(), u.c_rstd.data());
  be.gemm_nt(T, H * (dn + dv), kvr, 1.0f, u.cn.data(), kvr, w.kv_b, kvr, 0.0f, u.kv.data(), H * (dn + dv));
}

}  // namespace

void mla_drop_up_projections(MlaActs& a) {
  for (auto* v : {&a.qan, &a.q, &a.cn, &a.kv}) v->clear();
}

void mla_forward(Backend& be, const ModelConfig& c, const MlaWeights& w, const RopeTable& rope, const float* xn,
                 int64_t B, int64_t S, float* out, MlaActs& a, const TensorGroup& tp) {
  const int64_t T = B * S, D = c.hidden_size, H = c.num_attention_heads / tp.size;  // this rank's heads
  const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, kvr = c.kv_lora_rank;
  DSV3_CHECK(S <= rope.max_pos, "sequence length " << S << " exceeds max_position_embeddings (" << rope.max_pos << ")");
  a.kva.resize(T * (kvr + dr));
  if (be.flash_attention())
    a.lse.resize(B * H * S);
  else
    a.probs.resize(B * H * S * S);
  a.o.resize(T * H * dv);
  const int64_t* pos = rope.positions(B, S);

  // the down-projections to the latents (kept for backward), then the up-projections from them
  project_q_latent(be, c, w, xn, T, a.qa);
  be.gemm_nt(T, kvr + dr, D, 1.0f, xn, D, w.kv_a, D, 0.0f, a.kva.data(), kvr + dr);
  // RoPE on the single shared k_pe (the last dr columns of kv_a's output; the latent columns stay as they are)
  be.rope_forward(a.kva.data() + kvr, T, kvr + dr, 1, 0, dr, pos, rope.cos.data(), rope.sin.data());
  up_project(be, c, w, rope, xn, a.qa.data(), a.kva.data(), T, H, pos, a);
  const float scale = (float)attention_softmax_scale(c);
  if (be.flash_attention())
    be.mla_flash_attention_forward(a.q.data(), a.kv.data(), a.kva.data() + kvr, kvr + dr, B, S, H, dn, dr, dv, scale,
                                   a.o.data(), a.lse.data());
  else
    be.mla_attention_forward(a.q.data(), a.kv.data(), a.kva.data() + kvr, kvr + dr, B, S, H, dn, dr, dv, scale,
                             a.o.data(), a.probs.data());
  // o_proj is row-parallel: each rank's heads give a partial sum, completed over tp (sp: this rank's rows of it)
  Floats part(tp.sp ? T * D : 0);
  float* o = tp.sp ? part.data() : out;
  be.gemm_nt(T, D, H * dv, 1.0f, a.o.data(), H * dv, w.o, H * dv, 0.0f, o, D);
  tp.sum_partial_rows(o, T, D, out);
}

void mla_backward(Backend& be, const ModelConfig& c, const MlaWeights& w, MlaWeights& g, const RopeTable& rope,
                  const float* xn, int64_t B, int64_t S, const MlaActs& a, const float* dout, float* dxn,
                  const TensorGroup& tp) {
  const int64_t T = B * S, D = c.hidden_size, H = c.num_attention_heads / tp.size;  // this rank's heads
  const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, kvr = c.kv_lora_rank;
  const int64_t dqk = dn + dr;
  const int64_t* pos = rope.positions(B, S);
  // sp: dxn holds this rank's rows [t0, t0 + Tl) only (the transpose of the input's all-gather)
  const int64_t Tl = tp.sp_rows(T), t0 = tp.sp ? tp.rank * Tl : 0;
  // selective recompute: the up-projections were dropped after the forward; rebuild them from the kept latents
  MlaActs rebuilt;
  const bool dropped = a.q.empty() && T > 0;
  if (dropped) up_project(be, c, w, rope, xn, a.qa.data(), a.kva.data(), T, H, pos, rebuilt);
  const MlaActs& u = dropped ? rebuilt : a;  // qan, q, cn, kv
  // o_proj: out = o Wo^T
  Floats d_o(T * H * dv), dq(T * H * dqk), dkv(T * H * (dn + dv)), dkva(T * (kvr + dr));
  be.gemm_tn(D, H * dv, T, 1.0f, dout, D, a.o.data(), H * dv, 1.0f, g.o, H * dv);
  be.gemm_nn(T, H * dv, D, 1.0f, dout, D, w.o, H * dv, 0.0f, d_o.data(), H * dv);
  // attention core -> dq (rotated space), dkv, dk_pe (rotated space, into the k_pe columns of dkva)
  const float scale = (float)attention_softmax_scale(c);
  if (be.flash_attention()) {  // the forward ran on the same backend: it kept lse, not probs
    DSV3_CHECK((int64_t)a.lse.size() == B * H * S, "mla_backward: run.attention = flash, but the forward kept no lse");
    be.mla_flash_attention_backward(u.q.data(), u.kv.data(), a.kva.data() + kvr, kvr + dr, a.o.data(), a.lse.data(),
                                    d_o.data(), B, S, H, dn, dr, dv, scale, dq.data(), dkv.data(), dkva.data() + kvr);
  } else {
    DSV3_CHECK((int64_t)a.probs.size() == B * H * S * S,
               "mla_backward: run.attention = standard, but the forward kept no probs");
    be.mla_attention_backward(u.q.data(), u.kv.data(), a.kva.data() + kvr, kvr + dr, a.probs.data(), d_o.data(), B,
                              S, H, dn, dr, dv, scale, dq.data(), dkv.data(), dkva.data() + kvr);
  }
  be.rope_backward(dq.data() + dn, T, H * dqk, H, dqk, dr, pos, rope.cos.data(), rope.sin.data());
  be.rope_backward(dkva.data() + kvr, T, kvr + dr, 1, 0, dr, pos, rope.cos.data(), rope.sin.data());
  // kv_b: kv = cn Wkvb^T;  cn = rmsnorm(c)
  Floats dcn(T * kvr);
  be.gemm_tn(H * (dn + dv), kvr, T, 1.0f, dkv.data(), H * (dn + dv), u.cn.data(), kvr, 1.0f, g.kv_b, kvr);
  be.gemm_nn(T, kvr, H * (dn + dv), 1.0f, dkv.data(), H * (dn + dv), w.kv_b, kvr, 0.0f, dcn.data(), kvr);
  // the latent and k_pe are shared by every head: sum the heads of all ranks (dkva holds only k_pe's part yet)
  tp.allreduce(dcn.data(), T * kvr);
  tp.allreduce(dkva.data(), T * (kvr + dr));
  be.rmsnorm_backward(a.kva.data(), kvr + dr, w.kv_a_norm, a.c_rstd.data(), dcn.data(), T, kvr, dkva.data(), kvr + dr,
                      g.kv_a_norm);
  // kv_a: kva = xn Wkva^T
  be.gemm_tn(kvr + dr, D, T, 1.0f, dkva.data(), kvr + dr, xn, D, 1.0f, g.kv_a, D);
  // dkva is whole on every rank (summed above): the input gradient of this rank's rows needs no communication
  be.gemm_nn(Tl, D, kvr + dr, 1.0f, dkva.data() + t0 * (kvr + dr), kvr + dr, w.kv_a, D, 1.0f, dxn, D);
  // q path
  if (c.q_lora_rank > 0) {
    const int64_t r = c.q_lora_rank;
    Floats dqan(T * r), dqa(T * r);
    be.gemm_tn(H * dqk, r, T, 1.0f, dq.data(), H * dqk, u.qan.data(), r, 1.0f, g.q_b, r);
    be.gemm_nn(T, r, H * dqk, 1.0f, dq.data(), H * dqk, w.q_b, r, 0.0f, dqan.data(), r);
    tp.allreduce(dqan.data(), T * r);  // the q latent is shared by every head
    be.rmsnorm_backward(a.qa.data(), r, w.q_a_norm, a.qa_rstd.data(), dqan.data(), T, r, dqa.data(), r, g.q_a_norm);
    be.gemm_tn(r, D, T, 1.0f, dqa.data(), r, xn, D, 1.0f, g.q_a, D);
    be.gemm_nn(Tl, D, r, 1.0f, dqa.data() + t0 * r, r, w.q_a, D, 1.0f, dxn, D);
  } else {
    be.gemm_tn(H * dqk, D, T, 1.0f, dq.data(), H * dqk, xn, D, 1.0f, g.q, D);
    if (tp.size == 1) {
      be.gemm_nn(T, D, H * dqk, 1.0f, dq.data(), H * dqk, w.q, D, 1.0f, dxn, D);
    } else {  // q_proj is column-parallel: this rank's heads give a partial input gradient
      Floats dxq(T * D);
      be.gemm_nn(T, D, H * dqk, 1.0f, dq.data(), H * dqk, w.q, D, 0.0f, dxq.data(), D);
      if (tp.sp) {  // reduce-scatter: this rank's rows of the sum
        Floats loc(Tl * D);
        tp.reduce_scatter_rows(dxq.data(), Tl, D, loc.data());
        be.add(loc.data(), Tl * D, dxn);
      } else {
        tp.allreduce(dxq.data(), T * D);
        be.add(dxq.data(), T * D, dxn);
      }
    }
  }
}

void mla_forward_cached(Backend& be, const ModelConfig& c, const MlaWeights& w, const RopeTable& rope,
                        const float* xn, int64_t n, MlaCache& cache, float* out, const TensorGroup& tp) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads / tp.size;  // this rank's heads
  const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, kvr = c.kv_lora_rank;
  const int64_t p0 = cache.len, len = p0 + n;
  DSV3_CHECK(len <= cache.cap && len <= rope.max_pos,
             "generation reached position " << len << ", beyond the cache/RoPE capacity " << std::min(cache.cap, rope.max_pos));
  MlaActs up;  // q's path as in training: the latent, then the up-projection
  project_q_latent(be, c, w, xn, n, up.qa);
  up_project_q(be, c, w, xn, up.qa.data(), n, H, up);
  Floats& q = up.q;
  std::vector<float> kva(n * (kvr + dr));
  std::vector<int64_t> pos(n);
  for (int64_t t = 0; t < n; ++t) pos[t] = p0 + t;
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
  tp.allreduce(out, n * D);
}

}  // namespace dsv3
