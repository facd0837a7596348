#include "model/moe.h"

#include <algorithm>

#include "core/error.h"

namespace dsv3 {

MoeWeights MoeWeights::from(const Params& p, const ModelConfig& c, int64_t layer) {
  const std::string m = "model.layers." + std::to_string(layer) + ".mlp.";
  MoeWeights w;
  w.gate = p.get(m + "gate.weight");
  w.bias = p.get(m + "gate.e_score_correction_bias");
  w.w_gate = p.get(m + "experts.gate_proj.weight");
  w.w_up = p.get(m + "experts.up_proj.weight");
  w.w_down = p.get(m + "experts.down_proj.weight");
  if (c.n_shared_experts > 0) {
    w.sh_gate = p.get(m + "shared_experts.gate_proj.weight");
    w.sh_up = p.get(m + "shared_experts.up_proj.weight");
    w.sh_down = p.get(m + "shared_experts.down_proj.weight");
  }
  return w;
}

Routing moe_route(Backend& be, const ModelConfig& c, const MoeWeights& w, const float* xn, int64_t T) {
  Routing r;
  r.T = T;
  r.E = c.n_routed_experts;
  r.K = c.num_experts_per_tok;
  std::vector<float> logits(T * r.E);
  be.gemm_nt(T, r.E, c.hidden_size, 1.0f, xn, c.hidden_size, w.gate, c.hidden_size, 0.0f, logits.data(), r.E);
  r.scores.resize(T * r.E);
  r.idx.resize(T * r.K);
  r.weight.resize(T * r.K);
  be.router_forward(logits.data(), w.bias, T, r.E, c.n_group, c.topk_group, r.K, c.norm_topk_prob,
                    (float)c.routed_scaling_factor, r.scores.data(), r.idx.data(), r.weight.data());
  r.counts.assign(r.E, 0);
  for (int32_t e : r.idx) ++r.counts[e];
  return r;
}

Dispatch moe_dispatch(const Routing& r, const float* xn, int64_t D) {
  Dispatch d;
  d.offset.assign(r.E + 1, 0);
  for (int64_t e = 0; e < r.E; ++e) d.offset[e + 1] = d.offset[e] + r.counts[e];
  const int64_t rows = r.T * r.K;
  d.row_src.resize(rows);
  std::vector<int64_t> fill(d.offset.begin(), d.offset.end() - 1);
  for (int64_t tk = 0; tk < rows; ++tk) d.row_src[fill[r.idx[tk]]++] = (int32_t)tk;  // stable: token order kept
  d.x.resize(rows * D);
  d.y.resize(rows * D);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) std::copy_n(xn + (d.row_src[i] / r.K) * D, D, d.x.data() + i * D);
  return d;
}

void swiglu_mlp_forward(Backend& be, const float* x, int64_t T, int64_t D, int64_t I, const float* w_gate,
                        const float* w_up, const float* w_down, float* out, bool accumulate) {
  if (T == 0) return;
  std::vector<float> g(T * I), u(T * I), a(T * I);
  be.gemm_nt(T, I, D, 1.0f, x, D, w_gate, D, 0.0f, g.data(), I);
  be.gemm_nt(T, I, D, 1.0f, x, D, w_up, D, 0.0f, u.data(), I);
  be.swiglu_forward(g.data(), u.data(), T, I, I, a.data());
  be.gemm_nt(T, D, I, 1.0f, a.data(), I, w_down, I, accumulate ? 1.0f : 0.0f, out, D);
}

void moe_experts(Backend& be, const ModelConfig& c, const MoeWeights& w, Dispatch& d) {
  const int64_t D = c.hidden_size, I = c.moe_intermediate_size, E = (int64_t)d.offset.size() - 1;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = d.offset[e + 1] - d.offset[e];
    if (n == 0) continue;
    swiglu_mlp_forward(be, d.x.data() + d.offset[e] * D, n, D, I, w.w_gate + e * I * D, w.w_up + e * I * D,
                       w.w_down + e * D * I, d.y.data() + d.offset[e] * D, false);
  }
}

void moe_combine(const Routing& r, const Dispatch& d, int64_t D, float* out) {
  // inverse permutation: grouped row of (token, slot)
  std::vector<int64_t> row_of(r.T * r.K);
  for (int64_t i = 0; i < r.T * r.K; ++i) row_of[d.row_src[i]] = i;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < r.T; ++t) {
    float* o = out + t * D;
    for (int64_t k = 0; k < r.K; ++k) {  // slots in ascending expert order: a fixed summation order
      const float wk = r.weight[t * r.K + k];
      const float* y = d.y.data() + row_of[t * r.K + k] * D;
      for (int64_t i = 0; i < D; ++i) o[i] += wk * y[i];
    }
  }
}

double seq_balance_loss(const Routing& r, int64_t B) {
  DSV3_CHECK(B > 0 && r.T % B == 0, "balance loss: " << r.T << " tokens do not split into " << B << " sequences");
  const int64_t Ts = r.T / B;
  double total = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> f(r.E, 0.0), P(r.E, 0.0);
    for (int64_t t = b * Ts; t < (b + 1) * Ts; ++t) {
      for (int64_t k = 0; k < r.K; ++k) f[r.idx[t * r.K + k]] += 1.0;
      double sum = 0;
      for (int64_t e = 0; e < r.E; ++e) sum += r.scores[t * r.E + e];
      for (int64_t e = 0; e < r.E; ++e) P[e] += r.scores[t * r.E + e] / sum;
    }
    double L = 0;
    for (int64_t e = 0; e < r.E; ++e) L += (double)r.E / (r.K * Ts) * f[e] * (P[e] / Ts);
    total += L;
  }
  return total / B;
}

}  // namespace dsv3
