// The CPU backend's ops against naive double-precision loops (the CPU backend is the oracle for the CUDA backend,
// so it is itself checked against the definitions).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include "io/safetensors.h"  // float_to_bf16 / bf16_to_float
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

// BF16 matmul mode: every gemm_* multiplies the BF16-rounded operands (nearest even) in FP32. The result must be
// bit-identical to an FP32 GEMM of operands rounded beforehand (only the rows' used columns of a padded operand), and
// differ from the FP32 GEMM of the unrounded operands by about BF16's resolution, not more.
TEST(CpuOps, GemmBf16RoundsBothOperands) {
  const int64_t M = 9, N = 7, K = 33, lda = K + 3, ldb = K + 2, ldc = N + 1;
  auto A = randn(M * lda, 40), B = randn(N * ldb, 41);
  auto rounded = [](std::vector<float> x, int64_t rows, int64_t cols, int64_t ld) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) x[r * ld + c] = bf16_to_float(float_to_bf16(x[r * ld + c]));
    return x;
  };
  const auto Ar = rounded(A, M, K, lda), Br = rounded(B, N, K, ldb);
  CpuBackend be(1);
  std::vector<float> c16(M * ldc, 3.0f), cref(M * ldc, 3.0f), c32(M * ldc, 3.0f);
  be.set_bf16_matmul(true);
  EXPECT_TRUE(be.bf16_matmul());
  be.gemm_nt(M, N, K, 1.0f, A.data(), lda, B.data(), ldb, 0.5f, c16.data(), ldc);
  be.set_bf16_matmul(false);
  be.gemm_nt(M, N, K, 1.0f, Ar.data(), lda, Br.data(), ldb, 0.5f, cref.data(), ldc);
  be.gemm_nt(M, N, K, 1.0f, A.data(), lda, B.data(), ldb, 0.5f, c32.data(), ldc);
  double worst = 0, scale = 0;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < N; ++c) {
      EXPECT_EQ(c16[r * ldc + c], cref[r * ldc + c]) << r << "," << c;
      worst = std::max(worst, (double)std::fabs(c16[r * ldc + c] - c32[r * ldc + c]));
      scale = std::max(scale, (double)std::fabs(c32[r * ldc + c]));
    }
  for (int64_t r = 0; r < M; ++r) EXPECT_EQ(c16[r * ldc + N], 3.0f);  // padding column untouched
  EXPECT_GT(worst, 0.0);                  // the rounding happened
  EXPECT_LT(worst, 2.0 * K * 0.0078 * scale / std::sqrt((double)K));  // and is of BF16's size (2^-7 per product, bound)
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
  EXPECT_NEAR(sum, ref, 1e-6 * ref);  // float exponentials: float32 precision
}

// ---- backward ops against central finite differences of their forward ops (loss = sum(out * w), w random) ----

namespace {
// d/dx_i of f(x) by central differences, f evaluated in float; h relative to |x_i|
template <class F>
std::vector<double> numeric_grad(std::vector<float> x, F f, float h = 1e-2f) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2.0 * h);
  }
  return g;
}
double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (double)a[i] * b[i];
  return s;
}
void expect_close(const std::vector<float>& got, const std::vector<double>& want, double rel, const char* what) {
  double mx = 0, err = 0;
  for (size_t i = 0; i < want.size(); ++i) mx = std::max(mx, std::fabs(want[i])), err = std::max(err, std::fabs(got[i] - want[i]));
  EXPECT_LT(err, rel * mx + 1e-6) << what << ": max err " << err << " of max " << mx;
  EXPECT_GT(mx, 1e-4) << what << ": gradient is trivially zero";
}
}  // namespace

TEST(CpuOpsBackward, RmsNorm) {
  CpuBackend be(1);
  const int64_t rows = 3, dim = 7;
  auto x = randn(rows * dim, 20), w = randn(dim, 21), wy = randn(rows * dim, 22);
  std::vector<float> y(rows * dim), rstd(rows), dx(rows * dim, 0.0f), dw(dim, 0.0f);
  be.rmsnorm_forward(x.data(), dim, w.data(), 1e-6f, rows, dim, y.data(), rstd.data());
  be.rmsnorm_backward(x.data(), dim, w.data(), rstd.data(), wy.data(), rows, dim, dx.data(), dim, dw.data());
  auto fx = [&](const std::vector<float>& xx) {
    std::vector<float> yy(rows * dim);
    be.rmsnorm_forward(xx.data(), dim, w.data(), 1e-6f, rows, dim, yy.data(), nullptr);
    return dot(yy, wy);
  };
  auto fw = [&](const std::vector<float>& ww) {
    std::vector<float> yy(rows * dim);
    be.rmsnorm_forward(x.data(), dim, ww.data(), 1e-6f, rows, dim, yy.data(), nullptr);
    return dot(yy, wy);
  };
  expect_close(dx, numeric_grad(x, fx), 2e-3, "dx");
  expect_close(dw, numeric_grad(w, fw), 2e-3, "dw");
}

TEST(CpuOpsBackward, RopeIsTheInverseRotation) {
  CpuBackend be(1);
  std::vector<float> cos = {1.0f, 0.6f, std::cos(0.3f), std::cos(2.0f)}, sin = {0.0f, 0.8f, std::sin(0.3f), std::sin(2.0f)};
  auto x = randn(2 * 4, 23);
  const auto x0 = x;
  const int64_t pos[] = {1, 0};  // table (2 positions, 2 pairs)
  be.rope_forward(x.data(), 2, 4, 1, 0, 4, pos, cos.data(), sin.data());
  be.rope_backward(x.data(), 2, 4, 1, 0, 4, pos, cos.data(), sin.data());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], x0[i], 1e-6);
}

TEST(CpuOpsBackward, MlaAttention) {
  CpuBackend be(1);
  const int64_t B = 2, S = 5, H = 2, dn = 3, dr = 2, dv = 3;
  const float scale = 0.4f;
  auto q = randn(B * S * H * (dn + dr), 24), kv = randn(B * S * H * (dn + dv), 25), kpe = randn(B * S * dr, 26);
  auto wo = randn(B * S * H * dv, 27);
  std::vector<float> o(B * S * H * dv), probs(B * H * S * S);
  be.mla_attention_forward(q.data(), kv.data(), kpe.data(), dr, B, S, H, dn, dr, dv, scale, o.data(), probs.data());
  std::vector<float> dq(q.size()), dkv(kv.size()), dkpe(kpe.size(), 0.0f);
  be.mla_attention_backward(q.data(), kv.data(), kpe.data(), dr, probs.data(), wo.data(), B, S, H, dn, dr, dv, scale,
                            dq.data(), dkv.data(), dkpe.data());
  auto loss = [&](const std::vector<float>& qq, const std::vector<float>& kk, const std::vector<float>& pp) {
    std::vector<float> oo(o.size());
    be.mla_attention_forward(qq.data(), kk.data(), pp.data(), dr, B, S, H, dn, dr, dv, scale, oo.data(), nullptr);
    return dot(oo, wo);
  };
  expect_close(dq, numeric_grad(q, [&](const std::vector<float>& v) { return loss(v, kv, kpe); }), 3e-3, "dq");
  expect_close(dkv, numeric_grad(kv, [&](const std::vector<float>& v) { return loss(q, v, kpe); }), 3e-3, "dkv");
  expect_close(dkpe, numeric_grad(kpe, [&](const std::vector<float>& v) { return loss(q, kv, v); }), 3e-3, "dkpe");
}

// ---- flash-form MLA attention against the form that keeps probs -----------------------------------------------
// Odd shapes: S = 131 crosses the CPU's 64-row query tiles twice and ends in a partial tile, H = 3, dn/dr/dv small
// and different, k_pe rows padded (ldkpe 7 > dr 4), two sequences.
namespace {
struct FlashCase {
  static constexpr int64_t B = 2, S = 131, H = 3, dn = 5, dr = 4, dv = 6, ldkpe = 7;
  static constexpr float scale = 0.37f;
  std::vector<float> q = randn(B * S * H * (dn + dr), 41), kv = randn(B * S * H * (dn + dv), 42),
                     kpe = randn(B * S * ldkpe, 43), dout = randn(B * S * H * dv, 44);
};
double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, (double)std::fabs(a[i] - b[i]));
  return m;
}
double max_abs(const std::vector<float>& a) {
  double m = 0;
  for (float v : a) m = std::max(m, (double)std::fabs(v));
  return m;
}
}  // namespace

TEST(CpuOps, MlaFlashAttentionForwardEqualsStandard) {
  CpuBackend be(1);
  const FlashCase c;
  const int64_t B = c.B, S = c.S, H = c.H, dn = c.dn, dr = c.dr, dv = c.dv, ld = c.ldkpe;
  std::vector<float> o(B * S * H * dv), probs(B * H * S * S), o_flash(o.size(), 99.0f), lse(B * H * S, 99.0f);
  be.mla_attention_forward(c.q.data(), c.kv.data(), c.kpe.data(), ld, B, S, H, dn, dr, dv, c.scale, o.data(),
                           probs.data());
  be.mla_flash_attention_forward(c.q.data(), c.kv.data(), c.kpe.data(), ld, B, S, H, dn, dr, dv, c.scale,
                                 o_flash.data(), lse.data());
  // the same float arithmetic tile by tile: equal up to the GEMMs' summation order
  const double d_o = max_abs_diff(o, o_flash);
  std::printf("  flash vs standard forward: max |o| diff %.3e (max |o| %.3f)\n", d_o, max_abs(o));
  EXPECT_LT(d_o, 1e-6);
  EXPECT_GT(max_abs(o), 0.5);
  // lse against a double-precision log-sum-exp of the scaled scores (padding columns of k_pe never read)
  double d_lse = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < S; ++i) {
        std::vector<double> sc(i + 1);
        double mx = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          const float* qi = &c.q[(b * S + i) * H * (dn + dr) + h * (dn + dr)];
          const float* kj = &c.kv[(b * S + j) * H * (dn + dv) + h * (dn + dv)];
          double d = 0;
          for (int64_t k = 0; k < dn; ++k) d += (double)qi[k] * kj[k];
          for (int64_t k = 0; k < dr; ++k) d += (double)qi[dn + k] * c.kpe[(b * S + j) * ld + k];
          mx = std::max(mx, sc[j] = d * c.scale);
        }
        double z = 0;
        for (double v : sc) z += std::exp(v - mx);
        d_lse = std::max(d_lse, std::fabs(lse[(b * H + h) * S + i] - (mx + std::log(z))));
      }
  std::printf("  flash lse vs double log-sum-exp: max diff %.3e\n", d_lse);
  EXPECT_LT(d_lse, 5e-6);
  // the first row of a sequence sees one key: its lse is that score
  double s00 = 0;
  for (int64_t k = 0; k < dn; ++k) s00 += (double)c.q[k] * c.kv[k];
  for (int64_t k = 0; k < dr; ++k) s00 += (double)c.q[dn + k] * c.kpe[k];
  s00 *= c.scale;
  EXPECT_NEAR(lse[0], s00, 1e-5);
}

TEST(CpuOpsBackward, MlaFlashAttentionEqualsStandard) {
  CpuBackend be(1);
  const FlashCase c;
  const int64_t B = c.B, S = c.S, H = c.H, dn = c.dn, dr = c.dr, dv = c.dv, ld = c.ldkpe;
  std::vector<float> o(B * S * H * dv), probs(B * H * S * S), o_flash(o.size()), lse(B * H * S);
  be.mla_attention_forward(c.q.data(), c.kv.data(), c.kpe.data(), ld, B, S, H, dn, dr, dv, c.scale, o.data(),
                           probs.data());
  be.mla_flash_attention_forward(c.q.data(), c.kv.data(), c.kpe.data(), ld, B, S, H, dn, dr, dv, c.scale,
                                 o_flash.data(), lse.data());
  // dq, dkv written (both start from different garbage), dkpe accumulates (both start from the same values, and the
  // padding columns 4..6 of every k_pe row must keep them)
  const auto dkpe0 = randn(c.kpe.size(), 45);
  auto dq = randn(c.q.size(), 46), dkv = randn(c.kv.size(), 47), dkpe = dkpe0;
  auto dq_f = randn(c.q.size(), 48), dkv_f = randn(c.kv.size(), 49), dkpe_f = dkpe0;
  be.mla_attention_backward(c.q.data(), c.kv.data(), c.kpe.data(), ld, probs.data(), c.dout.data(), B, S, H, dn, dr,
                            dv, c.scale, dq.data(), dkv.data(), dkpe.data());
  be.mla_flash_attention_backward(c.q.data(), c.kv.data(), c.kpe.data(), ld, o_flash.data(), lse.data(),
                                  c.dout.data(), B, S, H, dn, dr, dv, c.scale, dq_f.data(), dkv_f.data(),
                                  dkpe_f.data());
  const double e_dq = max_abs_diff(dq, dq_f), e_dkv = max_abs_diff(dkv, dkv_f), e_dkpe = max_abs_diff(dkpe, dkpe_f);
  std::printf("  flash vs standard backward: max diff dq %.3e (max %.3f), dkv %.3e (max %.3f), dkpe %.3e (max %.3f)\n",
              e_dq, max_abs(dq), e_dkv, max_abs(dkv), e_dkpe, max_abs(dkpe));
  EXPECT_GT(max_abs(dq), 0.5);
  EXPECT_GT(max_abs(dkv), 0.5);
  EXPECT_LT(e_dq, 2e-6 * max_abs(dq));
  EXPECT_LT(e_dkv, 2e-6 * max_abs(dkv));
  EXPECT_LT(e_dkpe, 2e-6 * max_abs(dkpe));
  int64_t pad_changed = 0;
  for (int64_t t = 0; t < B * S; ++t)
    for (int64_t k = dr; k < ld; ++k) pad_changed += dkpe_f[t * ld + k] != dkpe0[t * ld + k];
  EXPECT_EQ(pad_changed, 0);
}

TEST(CpuOpsBackward, SwigluAndCrossEntropy) {
  CpuBackend be(1);
  auto g = randn(10, 28), u = randn(10, 29), w = randn(10, 30);
  std::vector<float> dg(10), du(10);
  be.swiglu_backward(g.data(), u.data(), w.data(), 2, 5, dg.data(), du.data());
  auto f = [&](const std::vector<float>& gg, const std::vector<float>& uu) {
    std::vector<float> o(10);
    be.swiglu_forward(gg.data(), uu.data(), 2, 5, 5, o.data());
    return dot(o, w);
  };
  expect_close(dg, numeric_grad(g, [&](const std::vector<float>& v) { return f(v, u); }), 2e-3, "dgate");
  expect_close(du, numeric_grad(u, [&](const std::vector<float>& v) { return f(g, v); }), 2e-3, "dup");

  const int64_t rows = 3, V = 6;
  auto lg = randn(rows * V, 31);
  const int64_t tg[] = {4, -1, 0};
  std::vector<float> lse(rows), d(rows * V);
  int64_t n = 0;
  be.cross_entropy_forward(lg.data(), rows, V, tg, &n, lse.data());
  be.cross_entropy_backward(lg.data(), lse.data(), rows, V, tg, 0.5f, d.data());
  auto fl = [&](const std::vector<float>& l) { return 0.5 * be.cross_entropy_forward(l.data(), rows, V, tg, nullptr); };
  expect_close(d, numeric_grad(lg, fl), 2e-3, "dlogits");
  for (int64_t v = 0; v < V; ++v) EXPECT_EQ(d[V + v], 0.0f);  // the ignored row
}

TEST(CpuOpsBackward, RouterCombineWeightsAndBalanceLoss) {
  CpuBackend be(1);
  const int64_t T = 4, E = 8, K = 2, n_group = 4, topk_group = 2;
  auto logits = randn(T * E, 32), dw = randn(T * K, 33);
  std::vector<float> bias(E, 0.0f), scores(T * E), weight(T * K);
  std::vector<int32_t> idx(T * K);
  const RouterSpec spec{.E = E, .k = K, .n_group = n_group, .topk_group = topk_group, .norm = true, .scale = 2.5f};
  be.router_forward(logits.data(), bias.data(), T, spec, scores.data(), idx.data(), weight.data());
  // balance-loss term for 2 sequences of 2 tokens: f fixed (from the selection), coefficient c
  std::vector<float> f(2 * E, 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) f[(t / 2) * E + idx[t * K + k]] += (float)E / (K * 2);
  const float c = 0.7f;
  std::vector<float> dl(T * E);
  be.router_backward(scores.data(), idx.data(), dw.data(), T, E, K, true, 2.5f, 2, f.data(), c, dl.data());
  // the same objective in float: sum dw*weight (selection held fixed) + c * sum_t sum_e f_e s_te / Z_t
  auto obj = [&](const std::vector<float>& l) {
    double out = 0;
    for (int64_t t = 0; t < T; ++t) {
      double z = 0, zc = 0;
      std::vector<double> s(E);
      for (int64_t e = 0; e < E; ++e) z += (s[e] = 1.0 / (1.0 + std::exp(-(double)l[t * E + e])));
      for (int64_t k = 0; k < K; ++k) zc += s[idx[t * K + k]];
      for (int64_t k = 0; k < K; ++k) out += dw[t * K + k] * 2.5 * s[idx[t * K + k]] / zc;
      for (int64_t e = 0; e < E; ++e) out += c * f[(t / 2) * E + e] * s[e] / z;
    }
    return out;
  };
  expect_close(dl, numeric_grad(logits, obj, 1e-3f), 2e-3, "dlogits");
}

// MoE permutation ops against plain loops: 7 tokens, top-3 of 5 experts, D 13 with a padded source (ldx 16); the
// grouped rows in expert order, as moe_dispatch makes them.
TEST(CpuOps, MoePermutationGatherCombineAndBackward) {
  CpuBackend be(2);
  const int64_t T = 7, K = 3, D = 13, ldx = 16, rows = T * K;
  auto x = randn(T * ldx, 40), y = randn(rows * D, 41), w = randn(rows, 42), dout = randn(T * D, 43);
  std::mt19937_64 g(44);
  std::vector<int32_t> pos(rows), token(rows);
  std::vector<int32_t> order(rows);
  for (int32_t i = 0; i < (int32_t)rows; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), g);  // any bijection (t,k) -> grouped row
  for (int64_t tk = 0; tk < rows; ++tk) pos[tk] = order[tk], token[order[tk]] = (int32_t)(tk / K);
  // gather: out[i] = x[token[i]]
  std::vector<float> gx(rows * D);
  be.gather_rows(x.data(), ldx, token.data(), rows, D, gx.data());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < D; ++j) ASSERT_EQ(gx[i * D + j], x[token[i] * ldx + j]);
  // combine: out[t] += sum_k w y[pos] in slot order (bit-exact: the same float operations in the same order)
  for (const bool weighted : {true, false}) {
    std::vector<float> out = randn(T * D, 45), want = out;
    be.combine_rows(y.data(), pos.data(), weighted ? w.data() : nullptr, T, K, D, out.data());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < D; ++j)
          want[t * D + j] += (weighted ? w[t * K + k] : 1.0f) * y[pos[t * K + k] * D + j];
    EXPECT_EQ(out, want) << (weighted ? "weighted" : "plain");
  }
  // backward: dy[pos] = w dout[t], dweight = dout[t] . y[pos] (double)
  std::vector<float> dy(rows * D, -7.0f), dw(rows, -7.0f);
  be.combine_rows_backward(dout.data(), y.data(), pos.data(), w.data(), T, K, D, dy.data(), dw.data());
  for (int64_t tk = 0; tk < rows; ++tk) {
    double dot = 0;
    for (int64_t j = 0; j < D; ++j) {
      ASSERT_EQ(dy[pos[tk] * D + j], w[tk] * dout[(tk / K) * D + j]);
      dot += (double)dout[(tk / K) * D + j] * y[pos[tk] * D + j];
    }
    EXPECT_EQ(dw[tk], (float)dot);
  }
  // the gradient of the combine by finite differences on one weight: d/dw sum(dout * out) = dweight
  const int64_t tk = 10;
  auto loss = [&](float wv) {
    std::vector<float> ww = w, out(T * D, 0.0f);
    ww[tk] = wv;
    be.combine_rows(y.data(), pos.data(), ww.data(), T, K, D, out.data());
    double s = 0;
    for (int64_t i = 0; i < T * D; ++i) s += (double)dout[i] * out[i];
    return s;
  };
  EXPECT_NEAR((loss(w[tk] + 1e-2f) - loss(w[tk] - 1e-2f)) / 2e-2, dw[tk], 1e-3);
}

// Grouped GEMMs (the local experts): 4 groups of 5, 0, 7 and 1 rows, against plain triple loops per group.
TEST(CpuOps, GroupedGemmsPerRowBlock) {
  CpuBackend be(2);
  const int64_t G = 4, N = 6, K = 9;
  const std::vector<int64_t> row0 = {0, 5, 5, 12, 13};
  const int64_t rows = row0.back();
  auto A = randn(rows * K, 60), Bt = randn(G * N * K, 61), Bn = randn(G * K * N, 62), C0 = randn(rows * N, 63);
  for (const bool tb : {true, false}) {
    std::vector<float> C = C0;
    be.gemm_grouped(tb, G, row0.data(), N, K, 1.5f, A.data(), K, tb ? Bt.data() : Bn.data(), N * K, tb ? K : N, 0.5f,
                    C.data(), N);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = row0[g]; r < row0[g + 1]; ++r)
        for (int64_t j = 0; j < N; ++j) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k)
            s += (double)A[r * K + k] * (tb ? Bt[g * N * K + j * K + k] : Bn[g * K * N + k * N + j]);
          EXPECT_NEAR(C[r * N + j], 1.5 * s + 0.5 * C0[r * N + j], 1e-4) << "tb " << tb << " g " << g;
        }
  }
  // weight gradients: C_g (K, N) += A[rows_g]^T B[rows_g]; the empty group's C stays as it was
  auto B = randn(rows * N, 64), W0 = randn(G * K * N, 65);
  std::vector<float> W = W0;
  be.gemm_grouped_tn(G, row0.data(), K, N, 1.0f, A.data(), K, B.data(), N, 1.0f, W.data(), K * N, N);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0;
        for (int64_t r = row0[g]; r < row0[g + 1]; ++r) s += (double)A[r * K + i] * B[r * N + j];
        EXPECT_NEAR(W[g * K * N + i * N + j], W0[g * K * N + i * N + j] + s, 1e-4) << "g " << g;
      }
}

// ---- BF16 flash attention (Backend::set_bf16_attention) against its definition in double precision ----------------
// The reference rounds what the definition rounds (q, k, v, dout; the forward's unnormalised p per 64-key block with
// the running maximum; P for dV; dS) and computes everything else in double. The op's FP32 arithmetic differs from it
// by FP32 rounding, which moves a BF16 rounding of p or dS by one BF16 ulp only where the two straddle a rounding
// boundary (~2^-24 / 2^-8 of the elements): NMSE ~1e-9 at most (measured 1e-10 .. 7e-16). An op that skipped a
// rounding would be off by BF16 rounding noise: the FP32 op is 1e4-1e8 times further from the same definition (lse,
// which only the rounding of q and k moves: 1e-7).
namespace {
double bf(double x) { return bf16_to_float(float_to_bf16((float)x)); }
double nmse(const std::vector<float>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return num / std::max(den, 1e-300);
}
struct Bf16FlashReference {
  std::vector<double> o, lse, dq, dkv, dkpe;
};
// forward from q/kv/kpe; backward from the op's o and lse (what the backward is given) and dout; dkpe from dkpe0
Bf16FlashReference bf16_flash_reference(const FlashCase& c, const std::vector<float>& o_op,
                                        const std::vector<float>& lse_op, const std::vector<float>& dkpe0) {
  const int64_t B = c.B, S = c.S, H = c.H, dn = c.dn, dr = c.dr, dv = c.dv, ld = c.ldkpe, KB = Backend::kFlashKeyBlock;
  const int64_t ldq = H * (dn + dr), ldkv = H * (dn + dv), ldo = H * dv;
  Bf16FlashReference r;
  r.o.assign(B * S * ldo, 0);
  r.lse.assign(B * H * S, 0);
  r.dq.assign(B * S * ldq, 0);
  r.dkv.assign(B * S * ldkv, 0);
  r.dkpe.assign(dkpe0.begin(), dkpe0.end());
  auto Q = [&](int64_t b, int64_t i, int64_t h, int64_t k) { return bf(c.q[(b * S + i) * ldq + h * (dn + dr) + k]); };
  auto K = [&](int64_t b, int64_t j, int64_t h, int64_t k) {
    return bf(k < dn ? c.kv[(b * S + j) * ldkv + h * (dn + dv) + k] : c.kpe[(b * S + j) * ld + k - dn]);
  };
  auto V = [&](int64_t b, int64_t j, int64_t h, int64_t x) { return bf(c.kv[(b * S + j) * ldkv + h * (dn + dv) + dn + x]); };
  auto dO = [&](int64_t b, int64_t i, int64_t h, int64_t x) { return bf(c.dout[(b * S + i) * ldo + h * dv + x]); };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < S; ++i) {
        std::vector<double> s(i + 1), mb(i / KB + 1);
        double m = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          double d = 0;
          for (int64_t k = 0; k < dn + dr; ++k) d += Q(b, i, h, k) * K(b, j, h, k);
          s[j] = d * c.scale;
          m = std::max(m, s[j]);
          mb[j / KB] = m;
        }
        double l = 0;
        for (int64_t j = 0; j <= i; ++j) l += std::exp(s[j] - m);
        r.lse[(b * H + h) * S + i] = m + std::log(l);
        for (int64_t j = 0; j <= i; ++j) {
          const double w = bf(std::exp(s[j] - mb[j / KB])) * std::exp(mb[j / KB] - m) / l;
          for (int64_t x = 0; x < dv; ++x) r.o[(b * S + i) * ldo + h * dv + x] += w * V(b, j, h, x);
        }
        // backward of row i: P from the op's lse, D from the op's o and dout as given
        double D = 0;
        for (int64_t x = 0; x < dv; ++x)
          D += (double)c.dout[(b * S + i) * ldo + h * dv + x] * o_op[(b * S + i) * ldo + h * dv + x];
        for (int64_t j = 0; j <= i; ++j) {
          const double P = std::exp(s[j] - lse_op[(b * H + h) * S + i]);
          double dP = 0;
          for (int64_t x = 0; x < dv; ++x) {
            dP += dO(b, i, h, x) * V(b, j, h, x);
            r.dkv[(b * S + j) * ldkv + h * (dn + dv) + dn + x] += bf(P) * dO(b, i, h, x);
          }
          const double dS = bf(c.scale * P * (dP - D));
          for (int64_t k = 0; k < dn + dr; ++k) {
            r.dq[(b * S + i) * ldq + h * (dn + dr) + k] += dS * K(b, j, h, k);
            if (k < dn)
              r.dkv[(b * S + j) * ldkv + h * (dn + dv) + k] += dS * Q(b, i, h, k);
            else
              r.dkpe[(b * S + j) * ld + k - dn] += dS * Q(b, i, h, k);
          }
        }
      }
  return r;
}
}  // namespace

TEST(CpuOpsBackward, MlaFlashAttentionBf16AgainstItsDefinition) {
  const FlashCase c;
  const int64_t B = c.B, S = c.S, H = c.H, dn = c.dn, dr = c.dr, dv = c.dv, ld = c.ldkpe;
  const auto dkpe0 = randn(c.kpe.size(), 50);
  struct Run {
    std::vector<float> o, lse, dq, dkv, dkpe;
  };
  auto run = [&](bool bf16) {
    CpuBackend be(1);
    be.set_bf16_attention(bf16);
    Run x{std::vector<float>(B * S * H * dv), std::vector<float>(B * H * S), randn(c.q.size(), 51),
          randn(c.kv.size(), 52), dkpe0};
    be.mla_flash_attention_forward(c.q.data(), c.kv.data(), c.kpe.data(), ld, B, S, H, dn, dr, dv, c.scale,
                                   x.o.data(), x.lse.data());
    be.mla_flash_attention_backward(c.q.data(), c.kv.data(), c.kpe.data(), ld, x.o.data(), x.lse.data(),
                                    c.dout.data(), B, S, H, dn, dr, dv, c.scale, x.dq.data(), x.dkv.data(),
                                    x.dkpe.data());
    return x;
  };
  const Run b16 = run(true), f32 = run(false);
  const Bf16FlashReference ref = bf16_flash_reference(c, b16.o, b16.lse, dkpe0);
  const Bf16FlashReference ref_f32_inputs = bf16_flash_reference(c, f32.o, f32.lse, dkpe0);
  struct Field {
    const char* name;
    const std::vector<float>& bf16_op;
    const std::vector<float>& fp32_op;
    const std::vector<double>& ref;
    const std::vector<double>& ref_fp32;
  };
  const Field fields[] = {{"o", b16.o, f32.o, ref.o, ref.o},
                          {"lse", b16.lse, f32.lse, ref.lse, ref.lse},
                          {"dq", b16.dq, f32.dq, ref.dq, ref_f32_inputs.dq},
                          {"dkv", b16.dkv, f32.dkv, ref.dkv, ref_f32_inputs.dkv},
                          {"dkpe", b16.dkpe, f32.dkpe, ref.dkpe, ref_f32_inputs.dkpe}};
  for (const Field& f : fields) {
    const double e = nmse(f.bf16_op, f.ref), e_f32 = nmse(f.fp32_op, f.ref_fp32);
    std::printf("  bf16 flash %-4s NMSE vs its definition %.2e; the FP32 op vs the same definition %.2e\n", f.name, e,
                e_f32);
    EXPECT_LE(e, 1e-8) << f.name;
    EXPECT_GE(e_f32, 100 * std::max(e, 1e-10)) << f.name << ": the definition's roundings must be visible";
  }
  int64_t pad_changed = 0;
  for (int64_t t = 0; t < B * S; ++t)
    for (int64_t k = dr; k < ld; ++k) pad_changed += b16.dkpe[t * ld + k] != dkpe0[t * ld + k];
  EXPECT_EQ(pad_changed, 0);
}
