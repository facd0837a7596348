#include "ops/cpu/cpu_backend.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"  // float_to_bf16 / bf16_to_float

namespace dsv3 {

CpuBackend::CpuBackend(int threads) {
  if (threads > 0) {
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
  }
}

namespace {
// BF16 matmul mode: the operand's rows rounded to BF16 into `buf` with the same leading dimension (the columns between
// rows are left as they are, never read by the GEMM)
const float* bf16_operand(const float* X, int64_t rows, int64_t cols, int64_t ld, std::vector<float>& buf) {
  if (rows == 0 || cols == 0) return X;
  buf.resize((size_t)((rows - 1) * ld + cols));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) buf[r * ld + c] = bf16_to_float(float_to_bf16(X[r * ld + c]));
  return buf.data();
}
}  // namespace

// A (ra, ca) and B (rb, cb) as stored; in BF16 mode both are rounded first
void CpuBackend::gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (bf16_matmul_) {
    A = bf16_operand(A, ta ? K : M, ta ? M : K, lda, bf16_a_);
    B = bf16_operand(B, tb ? N : K, tb ? K : N, ldb, bf16_b_);
  }
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda,
              B, ldb, beta, C, ldc);
}

void CpuBackend::rmsnorm_forward(const float* x, int64_t ldx, const float* w, float eps, int64_t rows, int64_t dim,
                                 float* y, float* rstd) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    double ss = 0;  // double accumulation: the reference's float32 mean differs by ~1 ulp at most
    for (int64_t i = 0; i < dim; ++i) ss += (double)xr[i] * xr[i];
    const float rs = (float)(1.0 / std::sqrt(ss / dim + eps));
    if (rstd) rstd[r] = rs;
    float* yr = y + r * dim;
    for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * rs * w[i];
  }
}

// the definition: the two ops in turn (the CUDA kernel fuses them with the same arithmetic)
void CpuBackend::add_rmsnorm_forward(const float* r, float* x, const float* w, float eps, int64_t rows, int64_t dim,
                                     float* y, float* rstd) {
  add(r, rows * dim, x);
  rmsnorm_forward(x, dim, w, eps, rows, dim, y, rstd);
}

void CpuBackend::rope_forward(float* x, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride,
                              int64_t rope_dim, const int64_t* pos, const float* cos, const float* sin) {
  const int64_t half = rope_dim / 2;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + pos[r] * half;
    const float* s = sin + pos[r] * half;
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + r * ldx + h * head_stride;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * c[i] - b * s[i];
        v[2 * i + 1] = a * s[i] + b * c[i];
      }
    }
  }
}

namespace {
// One head of one sequence in MLA attention's operands: row 0 of the head in each. T = const float for the inputs,
// float for their gradients (dq, dkv, dkpe are laid out as q, kv, kpe).
template <class T>
struct MlaHead {
  T* q;    // (S, dn + dr) q_nope | q_pe, rows MlaLayout::ldq apart
  T* k;    // (S, dn) k_nope, rows ldkv apart
  T* v;    // (S, dv) = k + dn, rows ldkv apart
  T* kpe;  // (S, dr) k_pe, rows ldkpe apart: the same rows for every head
};

// The layout of MLA attention's operands (backend.h): q (B,S,H,dn+dr), kv (B,S,H,dn+dv) with k_nope | v per head,
// k_pe rows ldkpe apart shared by the heads, o and dout (B,S,H,dv), probs (B,H,S,S), lse (B,H,S).
struct MlaLayout {
  int64_t S, H, dn, dr, dv, ldkpe, ldq, ldkv, ldo;
  MlaLayout(int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv, int64_t ldkpe)
      : S(S), H(H), dn(dn), dr(dr), dv(dv), ldkpe(ldkpe), ldq(H * (dn + dr)), ldkv(H * (dn + dv)), ldo(H * dv) {}
  // head h of sequence b in q, kv and kpe (or dq, dkv and dkpe)
  template <class T>
  MlaHead<T> head(T* q, T* kv, T* kpe, int64_t b, int64_t h) const {
    T* k = kv + b * S * ldkv + h * (dn + dv);
    return {q + b * S * ldq + h * (dn + dr), k, k + dn, kpe + b * S * ldkpe};
  }
  int64_t o(int64_t b, int64_t h) const { return b * S * ldo + h * dv; }  // row 0 of the head in o and dout
  int64_t rows(int64_t b, int64_t h) const { return (b * H + h) * S; }    // the head's S values in lse (B,H,S)
  // the scaled scores scale * (q_nope k_nope^T + q_pe k_pe^T) of the head's query rows i0..i0+m-1 against keys
  // 0..n-1 into p (m, n), leading dimension n
  void scores(const MlaHead<const float>& x, int64_t i0, int64_t m, int64_t n, float scale, float* p) const {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, dn, scale, x.q + i0 * ldq, ldq, x.k, ldkv, 0.0f, p, n);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, dr, scale, x.q + i0 * ldq + dn, ldq, x.kpe, ldkpe,
                1.0f, p, n);
  }
};
}  // namespace

namespace {
// Softmax of one score row in place over keys 0..i (float exponentials summed in double); returns its log-sum-exp.
float causal_softmax_row(float* row, int64_t i) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, row[j]);
  double sum = 0;
  for (int64_t j = 0; j <= i; ++j) {
    row[j] = std::exp(row[j] - mx);
    sum += row[j];
  }
  const float inv = (float)(1.0 / sum);
  for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
  return (float)(mx + std::log(sum));
}
}  // namespace

void CpuBackend::mla_attention_forward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, int64_t B,
                                       int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale, float* o,
                                       float* probs) {
  const MlaLayout L(S, H, dn, dr, dv, ldkpe);
  std::vector<float> scores(S * S);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const MlaHead<const float> x = L.head(q, kv, kpe, b, h);
      L.scores(x, 0, S, S, scale, scores.data());  // (S,S)
      // causal softmax: row i sees keys 0..i
      for (int64_t i = 0; i < S; ++i) {
        float* row = scores.data() + i * S;
        causal_softmax_row(row, i);
        for (int64_t j = i + 1; j < S; ++j) row[j] = 0.0f;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, S, dv, S, 1.0f, scores.data(), S, x.v, L.ldkv, 0.0f,
                  o + L.o(b, h), L.ldo);
      if (probs) std::copy(scores.begin(), scores.end(), probs + L.rows(b, h) * S);
    }
  }
}

void CpuBackend::swiglu_forward(const float* gate, const float* up, int64_t rows, int64_t cols, int64_t ld_in,
                                float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < cols; ++i) {
      const float g = gate[r * ld_in + i];
      out[r * cols + i] = g / (1.0f + std::exp(-g)) * up[r * ld_in + i];
    }
  }
}

// the whole vocabulary is the slice [0, kWholeVocabulary): every id is in it (the same copies)
void CpuBackend::embedding_forward(const int64_t* ids, int64_t n, const float* table, int64_t dim, float* out) {
  embedding_forward_slice(ids, n, table, 0, kWholeVocabulary, dim, out);
}

void CpuBackend::router_forward(const float* logits, const float* bias, int64_t T, const RouterSpec& r,
                                float* scores, int32_t* idx, float* weight) {
  const int64_t E = r.E, k = r.k, n_group = r.n_group, topk_group = r.topk_group;
  const int64_t per_group = E / n_group, per_node = E / r.n_nodes;
  const float ninf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> sel(E), gscore(std::max(n_group, r.n_nodes));
    std::vector<int32_t> order(std::max({E, n_group, r.n_nodes}));
    float* s = scores + t * E;
    for (int64_t e = 0; e < E; ++e) {
      s[e] = 1.0f / (1.0f + std::exp(-logits[t * E + e]));
      sel[e] = s[e] + bias[e];  // the bias steers selection only; weights use the unbiased s
    }
    // keep the `keep` best of n blocks of `per` experts (ties: lower index), mask the experts of the others
    auto keep_best = [&](int64_t n, int64_t per, int64_t keep) {
      std::iota(order.begin(), order.begin() + n, 0);
      std::stable_sort(order.begin(), order.begin() + n, [&](int32_t a, int32_t b) { return gscore[a] > gscore[b]; });
      for (int64_t q = keep; q < n; ++q)
        for (int64_t e = order[q] * per; e < (order[q] + 1) * per; ++e) sel[e] = ninf;
    };
    if (r.node_limited()) {
      // node score = the node_topk best biased scores of its experts, summed largest first
      const int64_t m = r.node_topk();
      std::vector<float> best(per_node);
      for (int64_t nd = 0; nd < r.n_nodes; ++nd) {
        std::copy_n(sel.begin() + nd * per_node, per_node, best.begin());
        std::partial_sort(best.begin(), best.begin() + m, best.end(), std::greater<float>());
        float sum = best[0];
        for (int64_t j = 1; j < m; ++j) sum += best[j];
        gscore[nd] = sum;
      }
      keep_best(r.n_nodes, per_node, r.max_nodes);
    }
    // group score = sum of the two best biased scores in the group (one if a group has a single expert)
    for (int64_t g = 0; g < n_group; ++g) {
      float b1 = ninf, b2 = ninf;
      for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
        if (sel[e] > b1) {
          b2 = b1;
          b1 = sel[e];
        } else if (sel[e] > b2) {
          b2 = sel[e];
        }
      }
      gscore[g] = per_group >= 2 ? b1 + b2 : b1;
    }
    keep_best(n_group, per_group, topk_group);
    // top-k of the remaining biased scores (ties: lower index), then reported in ascending expert id
    std::iota(order.begin(), order.begin() + E, 0);
    std::partial_sort(order.begin(), order.begin() + k, order.begin() + E, [&](int32_t a, int32_t b) {
      return sel[a] > sel[b] || (sel[a] == sel[b] && a < b);
    });
    std::sort(order.begin(), order.begin() + k);
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += s[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      idx[t * k + j] = order[j];
      weight[t * k + j] = (r.norm ? (float)(s[order[j]] / sum) : s[order[j]]) * r.scale;
    }
  }
}

void CpuBackend::gather_rows(const float* x, int64_t ldx, const int32_t* src, int64_t rows, int64_t D, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) std::copy_n(x + src[i] * ldx, D, out + i * D);
}

void CpuBackend::combine_rows(const float* y, const int32_t* pos, const float* weight, int64_t T, int64_t K, int64_t D,
                              float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float* o = out + t * D;
    for (int64_t k = 0; k < K; ++k) {
      const float* yr = y + (int64_t)pos[t * K + k] * D;
      if (weight) {
        const float wk = weight[t * K + k];
        for (int64_t i = 0; i < D; ++i) o[i] += wk * yr[i];
      } else {
        for (int64_t i = 0; i < D; ++i) o[i] += yr[i];
      }
    }
  }
}

void CpuBackend::combine_rows_backward(const float* dout, const float* y, const int32_t* pos, const float* weight,
                                       int64_t T, int64_t K, int64_t D, float* dy, float* dweight) {
#pragma omp parallel for schedule(static)
  for (int64_t tk = 0; tk < T * K; ++tk) {
    const float* go = dout + (tk / K) * D;
    const float* yr = y + (int64_t)pos[tk] * D;
    float* g = dy + (int64_t)pos[tk] * D;
    const float wk = weight[tk];
    double dot = 0;
    for (int64_t j = 0; j < D; ++j) {
      g[j] = wk * go[j];
      dot += (double)go[j] * yr[j];
    }
    dweight[tk] = (float)dot;
  }
}

namespace {
// log-sum-exp of one row of V logits: float exponentials (exact to an ulp) summed in double
double row_logsumexp(const float* l, int64_t V) {
  float mx = l[0];
  for (int64_t v = 1; v < V; ++v) mx = std::max(mx, l[v]);
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp(l[v] - mx);
  return std::log(sum) + mx;
}
}  // namespace

double CpuBackend::cross_entropy_forward(const float* logits, int64_t rows, int64_t V, const int64_t* targets,
                                         int64_t* count, float* lse) {
  // per-row losses summed serially afterwards: bit-identical results run to run (an OpenMP reduction is not)
  std::vector<double> row_loss(rows, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * V;
    const double ls = row_logsumexp(l, V);
    if (lse) lse[r] = (float)ls;
    if (targets[r] >= 0) row_loss[r] = ls - l[targets[r]];
  }
  double total = 0;
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r) {
    total += row_loss[r];
    n += targets[r] >= 0;
  }
  if (count) *count = n;
  return total;
}

}  // namespace dsv3

// ---- backward ------------------------------------------------------------------------------------------

namespace dsv3 {

void CpuBackend::rmsnorm_backward(const float* x, int64_t ldx, const float* w, const float* rstd, const float* dy,
                                  int64_t rows, int64_t dim, float* dx, int64_t lddx, float* dw) {
  // y = x r w, r = (mean x^2 + eps)^-1/2:  dx = r (dy w) - x r^3 (sum_i dy_i w_i x_i) / dim;  dw = sum_r dy x r
  const int nt = omp_get_max_threads();
  std::vector<double> dw_part(nt * dim, 0.0);
#pragma omp parallel
  {
    double* dwp = dw_part.data() + omp_get_thread_num() * dim;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * ldx;
      const float* g = dy + r * dim;
      const double rs = rstd[r];
      double dot = 0;
      for (int64_t i = 0; i < dim; ++i) dot += (double)g[i] * w[i] * xr[i];
      const double c = dot * rs * rs * rs / dim;
      float* d = dx + r * lddx;
      for (int64_t i = 0; i < dim; ++i) {
        d[i] += (float)(rs * g[i] * w[i] - xr[i] * c);
        dwp[i] += (double)g[i] * xr[i] * rs;
      }
    }
  }
  for (int t = 0; t < nt; ++t)
    for (int64_t i = 0; i < dim; ++i) dw[i] += (float)dw_part[t * dim + i];
}

void CpuBackend::rope_backward(float* dx, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride,
                               int64_t rope_dim, const int64_t* pos, const float* cos, const float* sin) {
  const int64_t half = rope_dim / 2;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + pos[r] * half;
    const float* s = sin + pos[r] * half;
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = dx + r * ldx + h * head_stride;
      for (int64_t i = 0; i < half; ++i) {  // R^T: rotate by the negative angle
        const float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * c[i] + b * s[i];
        v[2 * i + 1] = -a * s[i] + b * c[i];
      }
    }
  }
}

void CpuBackend::mla_attention_backward(const float* q, const float* kv, const float* kpe, int64_t ldkpe,
                                        const float* probs, const float* dout, int64_t B, int64_t S, int64_t H,
                                        int64_t dn, int64_t dr, int64_t dv, float scale, float* dq, float* dkv,
                                        float* dkpe) {
  const MlaLayout L(S, H, dn, dr, dv, ldkpe);
  const int64_t ldq = L.ldq, ldkv = L.ldkv, ldo = L.ldo;
  std::vector<float> dp(S * S);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const float* P = probs + L.rows(b, h) * S;
      const MlaHead<const float> x = L.head(q, kv, kpe, b, h);
      const MlaHead<float> dx = L.head(dq, dkv, dkpe, b, h);
      const float* doh = dout + L.o(b, h);
      // O = P V:  dP = dO V^T (S,S),  dV = P^T dO (S,dv)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, S, S, dv, 1.0f, doh, ldo, x.v, ldkv, 0.0f, dp.data(), S);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, S, dv, S, 1.0f, P, S, doh, ldo, 0.0f, dx.v, ldkv);
      // softmax: dScore = P * (dP - rowsum(dP * P)), times the softmax scale
      for (int64_t i = 0; i < S; ++i) {
        const float* pr = P + i * S;
        float* g = dp.data() + i * S;
        double dot = 0;
        for (int64_t j = 0; j <= i; ++j) dot += (double)g[j] * pr[j];
        for (int64_t j = 0; j <= i; ++j) g[j] = scale * pr[j] * (float)(g[j] - dot);
        for (int64_t j = i + 1; j < S; ++j) g[j] = 0.0f;
      }
      // score = q_nope k_nope^T + q_pe k_pe^T
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, S, dn, S, 1.0f, dp.data(), S, x.k, ldkv, 0.0f, dx.q, ldq);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, S, dr, S, 1.0f, dp.data(), S, x.kpe, ldkpe, 0.0f,
                  dx.q + dn, ldq);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, S, dn, S, 1.0f, dp.data(), S, x.q, ldq, 0.0f, dx.k, ldkv);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, S, dr, S, 1.0f, dp.data(), S, x.q + dn, ldq, 1.0f, dx.kpe,
                  ldkpe);
    }
  }
}

// ---- MLA attention, flash form: the same arithmetic as above (float scores from sgemm, float exponentials summed in
// double), but a tile of query rows at a time, so a head needs (kFlashRows, S) floats instead of (S, S). Tiles
// over the keys as well (the online softmax) would save nothing more here: O(S) per head is the point.
// BF16 attention (Backend::set_bf16_attention) rounds the operands once into copies with the same layout, rounds
// P / dS where they enter products, and reproduces the kernels' per-key-block running maximum for the rounding of the
// forward's probabilities.
namespace {
constexpr int64_t kFlashRows = 64;  // query rows per tile

struct Bf16Operands {  // BF16 copies of the attention operands (empty in FP32 mode: the pointers stay as given)
  std::vector<float> q, kv, kpe, dout;
};
inline float bf16_round(float x) { return bf16_to_float(float_to_bf16(x)); }

// BF16 forward of one score row (keys 0..i of `row`, scaled scores in, weights of P V out): see Backend's definition
float flash_row_bf16(float* row, int64_t i, std::vector<float>& block_max) {
  constexpr int64_t KB = Backend::kFlashKeyBlock;
  const int64_t nb = i / KB + 1;
  block_max.resize(nb);
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t jb = 0; jb < nb; ++jb) {
    for (int64_t j = jb * KB; j <= std::min(jb * KB + KB - 1, i); ++j) mx = std::max(mx, row[j]);
    block_max[jb] = mx;  // the running maximum after block jb
  }
  double sum = 0;
  for (int64_t j = 0; j <= i; ++j) sum += std::exp(row[j] - mx);
  const float inv = (float)(1.0 / sum);
  for (int64_t jb = 0; jb < nb; ++jb) {  // block jb's p rounded, then rescaled to the final maximum and normalised
    const float mb = block_max[jb], f = std::exp(mb - mx) * inv;
    for (int64_t j = jb * KB; j <= std::min(jb * KB + KB - 1, i); ++j) row[j] = bf16_round(std::exp(row[j] - mb)) * f;
  }
  return (float)(mx + std::log(sum));
}
}  // namespace

void CpuBackend::mla_flash_attention_forward(const float* q, const float* kv, const float* kpe, int64_t ldkpe,
                                             int64_t B, int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv,
                                             float scale, float* o, float* lse) {
  const MlaLayout L(S, H, dn, dr, dv, ldkpe);
  Bf16Operands rounded;
  if (bf16_attention_) {
    q = bf16_operand(q, B * S, L.ldq, L.ldq, rounded.q);
    kv = bf16_operand(kv, B * S, L.ldkv, L.ldkv, rounded.kv);
    kpe = bf16_operand(kpe, B * S, dr, ldkpe, rounded.kpe);
  }
  std::vector<float> p(std::min(kFlashRows, S) * S), block_max;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const MlaHead<const float> x = L.head(q, kv, kpe, b, h);
      float* lh = lse + L.rows(b, h);
      for (int64_t i0 = 0; i0 < S; i0 += kFlashRows) {
        // rows i0..i0+m-1 see keys 0..n-1 at most (causal): the tile's scores are (m, n), leading dimension n
        const int64_t m = std::min(kFlashRows, S - i0), n = i0 + m;
        L.scores(x, i0, m, n, scale, p.data());
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          float* row = p.data() + r * n;
          lh[i] = bf16_attention_ ? flash_row_bf16(row, i, block_max) : causal_softmax_row(row, i);
          for (int64_t j = i + 1; j < n; ++j) row[j] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, dv, n, 1.0f, p.data(), n, x.v, L.ldkv, 0.0f,
                    o + L.o(b, h) + i0 * L.ldo, L.ldo);
      }
    }
  }
}

void CpuBackend::mla_flash_attention_backward(const float* q, const float* kv, const float* kpe, int64_t ldkpe,
                                              const float* o, const float* lse, const float* dout, int64_t B,
                                              int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale,
                                              float* dq, float* dkv, float* dkpe) {
  const MlaLayout L(S, H, dn, dr, dv, ldkpe);
  const int64_t ldq = L.ldq, ldkv = L.ldkv, ldo = L.ldo;
  const float* dout_prod = dout;  // dout where it enters products (BF16 copy in BF16 mode); D takes it as given
  Bf16Operands rounded;
  if (bf16_attention_) {
    q = bf16_operand(q, B * S, ldq, ldq, rounded.q);
    kv = bf16_operand(kv, B * S, ldkv, ldkv, rounded.kv);
    kpe = bf16_operand(kpe, B * S, dr, ldkpe, rounded.kpe);
    dout_prod = bf16_operand(dout, B * S, ldo, ldo, rounded.dout);
  }
  std::vector<float> p(std::min(kFlashRows, S) * S), dp(p.size()), p16(bf16_attention_ ? p.size() : 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const MlaHead<const float> x = L.head(q, kv, kpe, b, h);
      const MlaHead<float> dx = L.head(dq, dkv, dkpe, b, h);
      const float* oh = o + L.o(b, h);
      const float* doh = dout + L.o(b, h);
      const float* doh_prod = dout_prod + L.o(b, h);
      const float* lh = lse + L.rows(b, h);
      // dk and dv collect every query tile's share: this head's columns of dkv start from zero (the op writes dkv)
      for (int64_t t = 0; t < S; ++t) std::fill(dx.k + t * ldkv, dx.k + t * ldkv + dn + dv, 0.0f);
      for (int64_t i0 = 0; i0 < S; i0 += kFlashRows) {
        const int64_t m = std::min(kFlashRows, S - i0), n = i0 + m;
        // P (m, n) recomputed from the scores and lse: exp(score - lse), zero above the diagonal
        L.scores(x, i0, m, n, scale, p.data());
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          float* row = p.data() + r * n;
          for (int64_t j = 0; j <= i; ++j) row[j] = std::exp(row[j] - lh[i]);
          for (int64_t j = i + 1; j < n; ++j) row[j] = 0.0f;
        }
        const float* p_prod = p.data();  // P where it enters dV = P^T dO (BF16 in BF16 mode; dS takes it in FP32)
        if (bf16_attention_) {
          for (int64_t e = 0; e < m * n; ++e) p16[e] = bf16_round(p[e]);
          p_prod = p16.data();
        }
        // O = P V:  dP = dO V^T (m, n),  dV(0..n-1) += P^T dO
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, dv, 1.0f, doh_prod + i0 * ldo, ldo, x.v, ldkv,
                    0.0f, dp.data(), n);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, dv, m, 1.0f, p_prod, n, doh_prod + i0 * ldo, ldo,
                    1.0f, dx.v, ldkv);
        // softmax: dScore = scale * P * (dP - D_i) with D_i = rowsum(dO_i * O_i) (= rowsum(dP_i * P_i))
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          const float* orow = oh + i * ldo;
          const float* grow = doh + i * ldo;
          double d = 0;
          for (int64_t c = 0; c < dv; ++c) d += (double)grow[c] * orow[c];
          const float* pr = p.data() + r * n;
          float* g = dp.data() + r * n;
          for (int64_t j = 0; j <= i; ++j) g[j] = scale * pr[j] * (float)(g[j] - d);
          if (bf16_attention_)
            for (int64_t j = 0; j <= i; ++j) g[j] = bf16_round(g[j]);
          for (int64_t j = i + 1; j < n; ++j) g[j] = 0.0f;
        }
        // score = q_nope k_nope^T + q_pe k_pe^T: the tile's dq rows are whole; dk_nope, dk_pe (0..n-1) accumulate
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, dn, n, 1.0f, dp.data(), n, x.k, ldkv, 0.0f,
                    dx.q + i0 * ldq, ldq);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, dr, n, 1.0f, dp.data(), n, x.kpe, ldkpe, 0.0f,
                    dx.q + i0 * ldq + dn, ldq);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, dn, m, 1.0f, dp.data(), n, x.q + i0 * ldq, ldq, 1.0f,
                    dx.k, ldkv);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, dr, m, 1.0f, dp.data(), n, x.q + i0 * ldq + dn, ldq,
                    1.0f, dx.kpe, ldkpe);
      }
    }
  }
}

void CpuBackend::embedding_forward_slice(const int64_t* ids, int64_t n, const float* table, int64_t v0, int64_t vl,
                                         int64_t dim, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    const int64_t v = ids[t] - v0;
    if (v >= 0 && v < vl) std::copy_n(table + v * dim, dim, out + t * dim);
    else std::fill(out + t * dim, out + (t + 1) * dim, 0.0f);
  }
}

void CpuBackend::embedding_backward_slice(const int64_t* ids, int64_t n, const float* dy, int64_t v0, int64_t vl,
                                          int64_t dim, float* dtable) {
  for (int64_t t = 0; t < n; ++t) {  // token order: repeated ids accumulate deterministically
    const int64_t v = ids[t] - v0;
    if (v < 0 || v >= vl) continue;
    float* row = dtable + v * dim;
    const float* g = dy + t * dim;
    for (int64_t j = 0; j < dim; ++j) row[j] += g[j];
  }
}

void CpuBackend::cross_entropy_slice_forward(const float* logits, int64_t rows, int64_t vl, const int64_t* targets,
                                             int64_t v0, double* lse, double* tgt) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * vl;
    lse[r] = row_logsumexp(l, vl);
    const int64_t t = targets[r] - v0;
    if (targets[r] >= 0 && t >= 0 && t < vl) tgt[r] = l[t];
  }
}

void CpuBackend::cross_entropy_slice_backward(const float* logits, const float* lse, int64_t rows, int64_t vl,
                                              const int64_t* targets, int64_t v0, float scale, float* dlogits) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dlogits + r * vl;
    if (targets[r] < 0) {
      std::fill(d, d + vl, 0.0f);
      continue;
    }
    const float* l = logits + r * vl;
    const float m = lse[r];
    for (int64_t v = 0; v < vl; ++v) d[v] = scale * std::exp(l[v] - m);
    const int64_t t = targets[r] - v0;
    if (t >= 0 && t < vl) d[t] -= scale;
  }
}

void CpuBackend::add(const float* x, int64_t n, float* y) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void CpuBackend::copy_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  if (rows <= 0 || cols <= 0) return;
  if (lds == cols && ldd == cols) {  // one block (memmove: the model's slices never overlap, but it costs nothing)
    std::memmove(dst, src, sizeof(float) * (size_t)(rows * cols));
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ldd, src + r * lds, sizeof(float) * (size_t)cols);
}

void CpuBackend::fill(float* x, int64_t n, float v) {
  if (n > 0) std::fill(x, x + n, v);
}

void CpuBackend::swiglu_backward(const float* gate, const float* up, const float* dout, int64_t rows, int64_t cols,
                                 float* dgate, float* dup) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows * cols; ++i) {
    const float g = gate[i], sg = 1.0f / (1.0f + std::exp(-g));
    dup[i] = dout[i] * g * sg;
    dgate[i] = dout[i] * up[i] * sg * (1.0f + g * (1.0f - sg));  // silu'(g) = s (1 + g (1 - s))
  }
}

void CpuBackend::embedding_backward(const int64_t* ids, int64_t n, const float* dy, int64_t dim, float* dtable) {
  embedding_backward_slice(ids, n, dy, 0, kWholeVocabulary, dim, dtable);
}

// the whole vocabulary is the slice [0, V)
void CpuBackend::cross_entropy_backward(const float* logits, const float* lse, int64_t rows, int64_t V,
                                        const int64_t* targets, float scale, float* dlogits) {
  cross_entropy_slice_backward(logits, lse, rows, V, targets, 0, scale, dlogits);
}

void CpuBackend::router_backward(const float* scores, const int32_t* idx, const float* dweight, int64_t T, int64_t E,
                                 int64_t K, bool norm, float scale, int64_t seq_len, const float* f, float aux_coef,
                                 float* dlogits) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const float* s = scores + t * E;
    const float* fb = f ? f + (t / seq_len) * E : nullptr;
    std::vector<double> ds(E, 0.0);
    // combine weights: w_k = scale * s_k / Z_C (Z_C = sum over the chosen) when normalised, else scale * s_k
    if (norm) {
      double z = 0, dot = 0;
      for (int64_t k = 0; k < K; ++k) {
        z += s[idx[t * K + k]];
        dot += (double)dweight[t * K + k] * s[idx[t * K + k]];
      }
      for (int64_t k = 0; k < K; ++k) ds[idx[t * K + k]] += scale * (dweight[t * K + k] / z - dot / (z * z));
    } else {
      for (int64_t k = 0; k < K; ++k) ds[idx[t * K + k]] += scale * dweight[t * K + k];
    }
    // balance loss through P: d/ds_e (sum_i f_i s_i / Z) = f_e / Z - sum_i f_i s_i / Z^2
    if (fb && aux_coef != 0.0f) {
      double z = 0, fs = 0;
      for (int64_t e = 0; e < E; ++e) z += s[e], fs += (double)fb[e] * s[e];
      for (int64_t e = 0; e < E; ++e) ds[e] += aux_coef * (fb[e] / z - fs / (z * z));
    }
    for (int64_t e = 0; e < E; ++e) dlogits[t * E + e] = (float)(ds[e] * s[e] * (1.0 - s[e]));  // sigmoid'
  }
}

}  // namespace dsv3
