#include "ops/cpu/cpu_backend.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace dsv3 {

CpuBackend::CpuBackend(int threads) {
  if (threads > 0) {
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
  }
}

void CpuBackend::gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                         int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void CpuBackend::gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                         int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void CpuBackend::gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                         int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
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

void CpuBackend::mla_attention_forward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, int64_t B,
                                       int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale, float* o,
                                       float* probs) {
  const int64_t ldq = H * (dn + dr), ldkv = H * (dn + dv), ldo = H * dv;
  std::vector<float> scores(S * S);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = q + b * S * ldq + h * (dn + dr);
      const float* kh = kv + b * S * ldkv + h * (dn + dv);
      const float* vh = kh + dn;
      const float* kp = kpe + b * S * ldkpe;
      // scores(S,S) = scale * (q_nope k_nope^T + q_pe k_pe^T)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, S, S, dn, scale, qh, ldq, kh, ldkv, 0.0f, scores.data(), S);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, S, S, dr, scale, qh + dn, ldq, kp, ldkpe, 1.0f,
                  scores.data(), S);
      // causal softmax: row i sees keys 0..i
      for (int64_t i = 0; i < S; ++i) {
        float* row = scores.data() + i * S;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, row[j]);
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        const float inv = (float)(1.0 / sum);
        for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
        for (int64_t j = i + 1; j < S; ++j) row[j] = 0.0f;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, S, dv, S, 1.0f, scores.data(), S, vh, ldkv, 0.0f,
                  o + b * S * ldo + h * dv, ldo);
      if (probs) std::copy(scores.begin(), scores.end(), probs + (b * H + h) * S * S);
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

void CpuBackend::embedding_forward(const int64_t* ids, int64_t n, const float* table, int64_t dim, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) std::copy(table + ids[i] * dim, table + (ids[i] + 1) * dim, out + i * dim);
}

void CpuBackend::router_forward(const float* logits, const float* bias, int64_t T, int64_t E, int64_t n_group,
                                int64_t topk_group, int64_t k, bool norm, float scale, float* scores, int32_t* idx,
                                float* weight) {
  const int64_t per_group = E / n_group;
  const float ninf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> sel(E), gscore(n_group);
    std::vector<int32_t> order(std::max(E, n_group));
    float* s = scores + t * E;
    for (int64_t e = 0; e < E; ++e) {
      s[e] = 1.0f / (1.0f + std::exp(-logits[t * E + e]));
      sel[e] = s[e] + bias[e];  // the bias steers selection only; weights use the unbiased s
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
    // keep the topk_group best groups (ties: lower index), mask the others
    std::iota(order.begin(), order.begin() + n_group, 0);
    std::stable_sort(order.begin(), order.begin() + n_group,
                     [&](int32_t a, int32_t b) { return gscore[a] > gscore[b]; });
    for (int64_t r = topk_group; r < n_group; ++r)
      for (int64_t e = order[r] * per_group; e < (order[r] + 1) * per_group; ++e) sel[e] = ninf;
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
      weight[t * k + j] = (norm ? (float)(s[order[j]] / sum) : s[order[j]]) * scale;
    }
  }
}

double CpuBackend::cross_entropy_forward(const float* logits, int64_t rows, int64_t V, const int64_t* targets,
                                         int64_t* count) {
  double total = 0;
  int64_t n = 0;
#pragma omp parallel for schedule(static) reduction(+ : total, n)
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < 0) continue;
    const float* l = logits + r * V;
    float mx = l[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, l[v]);
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp((double)l[v] - mx);
    total += std::log(sum) + mx - l[targets[r]];
    ++n;
  }
  if (count) *count = n;
  return total;
}

}  // namespace dsv3
