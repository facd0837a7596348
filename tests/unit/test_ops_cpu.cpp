// The CPU backend's ops against naive double-precision loops (the CPU backend is the oracle for the CUDA backend,
// so it is itself checked against the definitions).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "ops/cpu/cpu_backend.h"

using namespace dsv3;

namespace {
std::vector<float> randn(size_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}
double max_diff(const std::vector<float>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}
}  // namespace

TEST(CpuOps, GemmVariantsOddShapes) {
  CpuBackend be(2);
  const int64_t M = 7, N = 13, K = 5;
  auto A = randn(M * K, 1), Bt = randn(N * K, 2), Bn = randn(K * N, 3), At = randn(K * M, 4);
  std::vector<float> C(M * N, 1.0f);
  std::vector<double> ref(M * N);
  be.gemm_nt(M, N, K, 2.0f, A.data(), K, Bt.data(), K, 0.5f, C.data(), N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += (double)A[i * K + k] * Bt[j * K + k];
      ref[i * N + j] = 2 * s + 0.5;
    }
  EXPECT_LT(max_diff(C, ref), 1e-5);
  be.gemm_nn(M, N, K, 1.0f, A.data(), K, Bn.data(), N, 0.0f, C.data(), N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += (double)A[i * K + k] * Bn[k * N + j];
      ref[i * N + j] = s;
    }
  EXPECT_LT(max_diff(C, ref), 1e-5);
  be.gemm_tn(M, N, K, 1.0f, At.data(), M, Bn.data(), N, 0.0f, C.data(), N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += (double)At[k * M + i] * Bn[k * N + j];
      ref[i * N + j] = s;
    }
  EXPECT_LT(max_diff(C, ref), 1e-5);
}

TEST(CpuOps, RmsNormWithStride) {
  CpuBackend be(2);
  const int64_t rows = 5, dim = 11, ld = 16;
  auto x = randn(rows * ld, 5), w = randn(dim, 6);
  std::vector<float> y(rows * dim), rstd(rows);
  be.rmsnorm_forward(x.data(), ld, w.data(), 1e-6f, rows, dim, y.data(), rstd.data());
  std::vector<double> ref(rows * dim);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += (double)x[r * ld + i] * x[r * ld + i];
    const double rs = 1 / std::sqrt(ss / dim + 1e-6);
    EXPECT_NEAR(rstd[r], rs, 1e-5 * rs);
    for (int64_t i = 0; i < dim; ++i) ref[r * dim + i] = x[r * ld + i] * rs * w[i];
  }
  EXPECT_LT(max_diff(y, ref), 1e-5);
}

TEST(CpuOps, MlaAttentionAgainstNaiveCausalSoftmax) {
  CpuBackend be(2);
  const int64_t B = 2, S = 9, H = 3, dn = 5, dr = 4, dv = 6;
  auto q = randn(B * S * H * (dn + dr), 7), kv = randn(B * S * H * (dn + dv), 8), kpe = randn(B * S * dr, 9);
  std::vector<float> o(B * S * H * dv), probs(B * H * S * S);
  const float scale = 0.3f;
  be.mla_attention_forward(q.data(), kv.data(), kpe.data(), dr, B, S, H, dn, dr, dv, scale, o.data(), probs.data());
  std::vector<double> ref(o.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < S; ++i) {
        std::vector<double> s(i + 1);
        double mx = -1e300, z = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double d = 0;
          const float* qi = &q[(b * S + i) * H * (dn + dr) + h * (dn + dr)];
          const float* kj = &kv[(b * S + j) * H * (dn + dv) + h * (dn + dv)];
          for (int64_t c = 0; c < dn; ++c) d += (double)qi[c] * kj[c];
          for (int64_t c = 0; c < dr; ++c) d += (double)qi[dn + c] * kpe[(b * S + j) * dr + c];
          s[j] = d * scale;
          mx = std::max(mx, s[j]);
        }
        for (auto& v : s) z += (v = std::exp(v - mx));
        for (int64_t j = 0; j <= i; ++j) EXPECT_NEAR(probs[((b * H + h) * S + i) * S + j], s[j] / z, 1e-6);
        for (int64_t j = i + 1; j < S; ++j) EXPECT_EQ(probs[((b * H + h) * S + i) * S + j], 0.0f);
        for (int64_t c = 0; c < dv; ++c) {
          double acc = 0;
          for (int64_t j = 0; j <= i; ++j) acc += s[j] / z * kv[(b * S + j) * H * (dn + dv) + h * (dn + dv) + dn + c];
          ref[(b * S + i) * H * dv + h * dv + c] = acc;
        }
      }
  EXPECT_LT(max_diff(o, ref), 1e-5);
}

TEST(CpuOps, SwigluEmbeddingCrossEntropy) {
  CpuBackend be(2);
  auto g = randn(12, 10), u = randn(12, 11);
  std::vector<float> out(12);
  be.swiglu_forward(g.data(), u.data(), 3, 4, 4, out.data());
  for (int i = 0; i < 12; ++i) EXPECT_NEAR(out[i], g[i] / (1 + std::exp(-(double)g[i])) * u[i], 1e-6);
  auto table = randn(6 * 3, 12);
  const int64_t ids[] = {5, 0, 5};
  std::vector<float> e(9);
  be.embedding_forward(ids, 3, table.data(), 3, e.data());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(e[6 + i], table[15 + i]);
  auto lg = randn(3 * 7, 13);
  const int64_t tg[] = {2, -1, 6};
  int64_t n = 0;
  const double sum = be.cross_entropy_forward(lg.data(), 3, 7, tg, &n);
  EXPECT_EQ(n, 2);
  double ref = 0;
  for (int r : {0, 2}) {
    double z = 0;
    for (int v = 0; v < 7; ++v) z += std::exp((double)lg[r * 7 + v]);
    ref += std::log(z) - lg[r * 7 + tg[r]];
  }
  EXPECT_NEAR(sum, ref, 1e-9);
}
