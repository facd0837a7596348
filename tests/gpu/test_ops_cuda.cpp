// The CUDA backend against the CPU backend (the oracle), op by op, in the style of ggml's test-backend-ops: random
// inputs with odd shapes (rows and dims not multiples of the warp size, padded leading dimensions), the same op on
// both backends, and the normalised mean squared error NMSE = sum (cpu - cuda)^2 / sum cpu^2 below a per-op bound:
//   kTolElementwise 1e-10  FP32 elementwise and row ops (rmsnorm, rope, swiglu, cross entropy, router): the two sides
//                          differ by a few ulps (expf vs glibc exp, FMA contraction, reduction order)
//   kTolGemm        1e-8   GEMM and attention: K-long dot products summed in another order (cuBLAS vs OpenBLAS)
//   exact                  embedding forward/backward, the router's expert ids, and the optimizer ops and conversions
//                          (adamw_update, sum_squares, to_bf16, from_bf16, dequantize_fp8): bit-identical by
//                          construction (see the section of those tests)
// The backward ops are checked the same way (the CPU backward ops are themselves checked against finite differences in
// tests/unit/test_ops_cpu.cpp). Without a usable device every test is skipped with the reason.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/memory.h"
#include "core/numerics.h"
#include "cuda_backend.cuh"
#include "device_buffer.cuh"
#include "gpu_test_util.h"  // randn, random_vector
#include "ops/cpu/cpu_backend.h"

using namespace dsv3;
using cuda::DeviceBuffer;
using dsv3::test::random_vector;
using dsv3::test::randn;

namespace {

constexpr double kTolElementwise = 1e-10;
constexpr double kTolGemm = 1e-8;

struct GpuEnv {
  bool usable = false;
  std::string reason;
};
const GpuEnv& gpu_env() {
  static const GpuEnv env = [] {
    GpuEnv e;
    e.usable = cuda_device_usable(&e.reason);
    return e;
  }();
  return env;
}

std::vector<int64_t> randint(size_t n, int64_t lo, int64_t hi, uint64_t seed) {  // [lo, hi)
  return random_vector<int64_t>(n, seed, std::uniform_int_distribution<int64_t>(lo, hi - 1));
}

double nmse(const std::vector<float>& ref, const std::vector<float>& got) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = (double)ref[i] - got[i];
    num += d * d;
    den += (double)ref[i] * ref[i];
  }
  if (std::isnan(num)) return INFINITY;
  return den > 0 ? num / den : num;
}

void expect_nmse(const std::string& what, const std::vector<float>& ref, const std::vector<float>& got, double tol) {
  ASSERT_EQ(ref.size(), got.size()) << what;
  const double e = nmse(ref, got);
  std::printf("  [ NMSE     ] %-44s %.3e (tol %.0e)\n", what.c_str(), e, tol);
  EXPECT_LE(e, tol) << what << ": NMSE " << e;
}

template <class T>
DeviceBuffer<T> dev(const std::vector<T>& h) {
  return DeviceBuffer<T>(h);
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu_env().usable) GTEST_SKIP() << "no CUDA device: " << gpu_env().reason;
    gpu_ = make_cuda_backend(0);  // device pointers (make_backend("cuda") is the host-staged form, tested below)
    ASSERT_EQ(gpu_->name(), "cuda");
    cuda_ = dynamic_cast<CudaBackend*>(gpu_.get());
    ASSERT_NE(cuda_, nullptr);
  }
  Backend& gpu() { return *gpu_; }
  CpuBackend cpu{2};
  std::unique_ptr<Backend> gpu_;
  CudaBackend* cuda_ = nullptr;
};

// ---- GEMM ----------------------------------------------------------------------------------------------------

enum class Gemm { NT, NN, TN };

void check_gemm(Backend& cpu, Backend& gpu, Gemm kind, int64_t M, int64_t N, int64_t K, float alpha, float beta,
                uint64_t seed) {
  // padded leading dimensions
  const int64_t lda = (kind == Gemm::TN ? M : K) + 3, ldb = (kind == Gemm::NT ? K : N) + 1, ldc = N + 2;
  const int64_t a_rows = kind == Gemm::TN ? K : M, b_rows = kind == Gemm::NT ? N : K;
  auto A = randn(a_rows * lda, seed), B = randn(b_rows * ldb, seed + 1), C = randn(M * ldc, seed + 2);
  auto dA = dev(A), dB = dev(B), dC = dev(C);
  auto call = [&](Backend& be, const float* a, const float* b, float* c) {
    switch (kind) {
      case Gemm::NT: be.gemm_nt(M, N, K, alpha, a, lda, b, ldb, beta, c, ldc); break;
      case Gemm::NN: be.gemm_nn(M, N, K, alpha, a, lda, b, ldb, beta, c, ldc); break;
      case Gemm::TN: be.gemm_tn(M, N, K, alpha, a, lda, b, ldb, beta, c, ldc); break;
    }
  };
  call(cpu, A.data(), B.data(), C.data());
  call(gpu, dA.get(), dB.get(), dC.get());
  const char* names[] = {"gemm_nt", "gemm_nn", "gemm_tn"};
  expect_nmse(std::string(names[(int)kind]) + (gpu.bf16_matmul() ? " bf16 " : " ") + std::to_string(M) + "x" + std::to_string(N) + "x" +
                  std::to_string(K) + " beta " + std::to_string(beta).substr(0, 3),
              C, dC.to_host(), kTolGemm);
}

void check_gemm_all(Backend& cpu, Backend& gpu, Gemm kind) {
  const int64_t shapes[][3] = {{7, 13, 5}, {67, 129, 257}, {1, 300, 33}, {130, 1, 70}};
  uint64_t seed = 100 + 10 * (int)kind;
  for (const auto& s : shapes) {
    check_gemm(cpu, gpu, kind, s[0], s[1], s[2], 1.5f, 0.5f, seed += 3);
    check_gemm(cpu, gpu, kind, s[0], s[1], s[2], 1.0f, 0.0f, seed += 3);
  }
}

TEST_F(CudaOps, GemmNT) { check_gemm_all(cpu, gpu(), Gemm::NT); }
TEST_F(CudaOps, GemmNN) { check_gemm_all(cpu, gpu(), Gemm::NN); }
TEST_F(CudaOps, GemmTN) { check_gemm_all(cpu, gpu(), Gemm::TN); }
// BF16 matmul mode: both backends round the operands to BF16 (nearest even) and accumulate in FP32, so the products
// are exact and only the summation order differs: the FP32 GEMM tolerance applies
TEST_F(CudaOps, GemmBf16) {
  cpu.set_bf16_matmul(true);
  gpu().set_bf16_matmul(true);
  for (Gemm kind : {Gemm::NT, Gemm::NN, Gemm::TN}) check_gemm_all(cpu, gpu(), kind);
}

// make_backend("cuda"): the same ops on host pointers, each copying its operands' regions to the device and back.
// Strided operands move row by row: the padding columns between the rows (other tensors' data in the model) are
// never written, and accumulating outputs keep what they held.
// Grouped GEMMs (the local experts' SwiGLU): one cublasGemmGroupedBatchedEx call against the CPU's per-group loop,
// with empty groups, DeepSeek-V3's expert shapes in small (I 2048 -> 256, D 7168 -> 448), both transposes of B, and
// the weight-gradient form; in BF16 mode the CUDA side falls back to per-group BF16 GEMMs.
TEST_F(CudaOps, GroupedGemms) {
  const std::vector<int64_t> row0 = {0, 37, 37, 100, 101, 164};
  const int64_t G = 5, rows = row0.back(), N = 256, K = 448;
  for (const bool bf16 : {false, true}) {
    cpu.set_bf16_matmul(bf16);
    gpu().set_bf16_matmul(bf16);
    const double tol = kTolGemm;
    for (const bool tb : {true, false}) {
      auto A = randn(rows * K, 1600), B = randn(G * N * K, 1601, 0.05f), C = randn(rows * N, 1602);
      auto dA = dev(A), dB = dev(B), dC = dev(C);
      cpu.gemm_grouped(tb, G, row0.data(), N, K, 1.0f, A.data(), K, B.data(), N * K, tb ? K : N, 0.5f, C.data(), N);
      gpu().gemm_grouped(tb, G, row0.data(), N, K, 1.0f, dA.get(), K, dB.get(), N * K, tb ? K : N, 0.5f, dC.get(), N);
      expect_nmse(std::string("gemm_grouped") + (tb ? " nt" : " nn") + (bf16 ? " bf16" : ""), C, dC.to_host(), tol);
    }
    auto A = randn(rows * K, 1603), B = randn(rows * N, 1604), W = randn(G * K * N, 1605);
    auto dA = dev(A), dB = dev(B), dW = dev(W);
    cpu.gemm_grouped_tn(G, row0.data(), K, N, 1.0f, A.data(), K, B.data(), N, 1.0f, W.data(), K * N, N);
    gpu().gemm_grouped_tn(G, row0.data(), K, N, 1.0f, dA.get(), K, dB.get(), N, 1.0f, dW.get(), K * N, N);
    expect_nmse(std::string("gemm_grouped_tn") + (bf16 ? " bf16" : ""), W, dW.to_host(), tol);
  }
  cpu.set_bf16_matmul(false);
  gpu().set_bf16_matmul(false);
}

TEST_F(CudaOps, HostStagedPaddingUntouched) {
  auto staged = make_backend("cuda");
  const int64_t M = 37, N = 29, K = 41, ldc = N + 5;
  auto A = randn(M * K, 901), B = randn(N * K, 902), C0 = randn(M * ldc, 903);
  auto c_cpu = C0, c_gpu = C0;
  cpu.gemm_nt(M, N, K, 1.0f, A.data(), K, B.data(), K, 0.5f, c_cpu.data(), ldc);
  staged->gemm_nt(M, N, K, 1.0f, A.data(), K, B.data(), K, 0.5f, c_gpu.data(), ldc);
  expect_nmse("host-staged gemm_nt (ldc padded)", c_cpu, c_gpu, kTolGemm);
  int64_t pad_changed = 0;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = N; c < ldc; ++c) pad_changed += c_gpu[r * ldc + c] != C0[r * ldc + c];
  EXPECT_EQ(pad_changed, 0);
  // rmsnorm backward: dx strided and accumulated (+=), dw accumulated
  const int64_t rows = 23, dim = 19, ldx = 24, lddx = 27;
  auto x = randn(rows * ldx, 904), w = randn(dim, 905), gy = randn(rows * dim, 906);
  std::vector<float> y(rows * dim), rstd(rows);
  cpu.rmsnorm_forward(x.data(), ldx, w.data(), 1e-6f, rows, dim, y.data(), rstd.data());
  auto dx0 = randn(rows * lddx, 907), dw0 = randn(dim, 908);
  auto dx_cpu = dx0, dx_gpu = dx0, dw_cpu = dw0, dw_gpu = dw0;
  cpu.rmsnorm_backward(x.data(), ldx, w.data(), rstd.data(), gy.data(), rows, dim, dx_cpu.data(), lddx, dw_cpu.data());
  staged->rmsnorm_backward(x.data(), ldx, w.data(), rstd.data(), gy.data(), rows, dim, dx_gpu.data(), lddx,
                           dw_gpu.data());
  expect_nmse("host-staged rmsnorm_backward dx (+=, strided)", dx_cpu, dx_gpu, kTolElementwise);
  expect_nmse("host-staged rmsnorm_backward dw (+=)", dw_cpu, dw_gpu, kTolElementwise);
  pad_changed = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = dim; c < lddx; ++c)
      pad_changed += dx_gpu[r * lddx + c] != dx0[r * lddx + c];
  EXPECT_EQ(pad_changed, 0);
}

// ---- RMSNorm -------------------------------------------------------------------------------------------------

TEST_F(CudaOps, RmsNormForward) {
  const int64_t cfg[][3] = {{37, 13, 20}, {5, 1031, 1031}, {300, 77, 80}};  // rows, dim, ldx
  uint64_t seed = 200;
  for (const auto& c : cfg) {
    const int64_t rows = c[0], dim = c[1], ldx = c[2];
    auto x = randn(rows * ldx, ++seed), w = randn(dim, ++seed);
    std::vector<float> y(rows * dim), rstd(rows);
    auto dx = dev(x), dw = dev(w);
    DeviceBuffer<float> dy(rows * dim), drstd(rows);
    cpu.rmsnorm_forward(x.data(), ldx, w.data(), 1e-6f, rows, dim, y.data(), rstd.data());
    gpu().rmsnorm_forward(dx.get(), ldx, dw.get(), 1e-6f, rows, dim, dy.get(), drstd.get());
    const std::string tag = " " + std::to_string(rows) + "x" + std::to_string(dim);
    expect_nmse("rmsnorm_forward y" + tag, y, dy.to_host(), kTolElementwise);
    expect_nmse("rmsnorm_forward rstd" + tag, rstd, drstd.to_host(), kTolElementwise);
  }
}

// the residual add fused into the norm: against the CPU (its definition: add, then rmsnorm_forward) and bit for bit
// against this backend's own add + rmsnorm_forward (the same arithmetic, one kernel)
TEST_F(CudaOps, AddRmsNormForward) {
  const int64_t cfg[][2] = {{37, 13}, {5, 1031}, {300, 7168 / 16}};  // rows, dim
  uint64_t seed = 250;
  for (const auto& c : cfg) {
    const int64_t rows = c[0], dim = c[1];
    auto x = randn(rows * dim, ++seed), res = randn(rows * dim, ++seed), w = randn(dim, ++seed);
    std::vector<float> y(rows * dim), rstd(rows), xs = x;
    cpu.add_rmsnorm_forward(res.data(), xs.data(), w.data(), 1e-6f, rows, dim, y.data(), rstd.data());
    auto d_x = dev(x), d_x2 = dev(x), d_res = dev(res), d_w = dev(w);
    DeviceBuffer<float> d_y(rows * dim), d_rstd(rows), d_y2(rows * dim), d_rstd2(rows);
    gpu().add_rmsnorm_forward(d_res.get(), d_x.get(), d_w.get(), 1e-6f, rows, dim, d_y.get(), d_rstd.get());
    gpu().add(d_res.get(), rows * dim, d_x2.get());
    gpu().rmsnorm_forward(d_x2.get(), dim, d_w.get(), 1e-6f, rows, dim, d_y2.get(), d_rstd2.get());
    const std::string tag = " " + std::to_string(rows) + "x" + std::to_string(dim);
    expect_nmse("add_rmsnorm_forward x" + tag, xs, d_x.to_host(), kTolElementwise);
    expect_nmse("add_rmsnorm_forward y" + tag, y, d_y.to_host(), kTolElementwise);
    expect_nmse("add_rmsnorm_forward rstd" + tag, rstd, d_rstd.to_host(), kTolElementwise);
    EXPECT_EQ(d_y.to_host(), d_y2.to_host()) << "fused against add + rmsnorm_forward" << tag;
    EXPECT_EQ(d_rstd.to_host(), d_rstd2.to_host()) << tag;
    EXPECT_EQ(d_x.to_host(), d_x2.to_host()) << tag;
  }
}

TEST_F(CudaOps, RmsNormBackward) {
  const int64_t cfg[][4] = {{37, 13, 20, 15}, {300, 77, 80, 77}, {1500, 5, 5, 9}, {3, 700, 701, 700}};
  uint64_t seed = 300;
  for (const auto& c : cfg) {
    const int64_t rows = c[0], dim = c[1], ldx = c[2], lddx = c[3];
    auto x = randn(rows * ldx, ++seed), w = randn(dim, ++seed), gy = randn(rows * dim, ++seed);
    std::vector<float> y(rows * dim), rstd(rows);
    cpu.rmsnorm_forward(x.data(), ldx, w.data(), 1e-6f, rows, dim, y.data(), rstd.data());
    auto gx = randn(rows * lddx, ++seed), gw = randn(dim, ++seed);  // both accumulate (+=)
    auto d_x = dev(x), d_w = dev(w), d_rstd = dev(rstd), d_gy = dev(gy), d_gx = dev(gx), d_gw = dev(gw);
    cpu.rmsnorm_backward(x.data(), ldx, w.data(), rstd.data(), gy.data(), rows, dim, gx.data(), lddx, gw.data());
    gpu().rmsnorm_backward(d_x.get(), ldx, d_w.get(), d_rstd.get(), d_gy.get(), rows, dim, d_gx.get(), lddx,
                           d_gw.get());
    const std::string tag = " " + std::to_string(rows) + "x" + std::to_string(dim);
    expect_nmse("rmsnorm_backward dx" + tag, gx, d_gx.to_host(), kTolElementwise);
    expect_nmse("rmsnorm_backward dw" + tag, gw, d_gw.to_host(), kTolElementwise);
  }
}

// ---- RoPE ----------------------------------------------------------------------------------------------------

void rope_tables(int64_t max_pos, int64_t half, std::vector<float>& cs, std::vector<float>& sn) {
  cs.resize(max_pos * half);
  sn.resize(max_pos * half);
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double a = p * std::pow(10000.0, -2.0 * i / (2.0 * half));
      cs[p * half + i] = (float)std::cos(a);
      sn[p * half + i] = (float)std::sin(a);
    }
}

TEST_F(CudaOps, RopeForwardBackward) {
  // rows, n_heads, head_stride, rope_dim, ldx, offset of the first slice in the row, max_pos
  const int64_t cfg[][7] = {{19, 3, 11, 6, 40, 0, 23}, {33, 5, 192, 64, 5 * 192 + 3, 128, 100}, {7, 1, 4, 4, 4, 0, 7}};
  uint64_t seed = 400;
  for (const auto& c : cfg) {
    const int64_t rows = c[0], nh = c[1], hs = c[2], rd = c[3], ldx = c[4], off = c[5], max_pos = c[6];
    std::vector<float> cs, sn;
    rope_tables(max_pos, rd / 2, cs, sn);
    auto pos = randint(rows, 0, max_pos, ++seed);
    auto x = randn(rows * ldx, ++seed);
    auto d_x = dev(x), d_cs = dev(cs), d_sn = dev(sn);
    auto d_pos = dev(pos);
    const std::string tag = " " + std::to_string(rows) + "x" + std::to_string(nh) + "x" + std::to_string(rd);
    cpu.rope_forward(x.data() + off, rows, ldx, nh, hs, rd, pos.data(), cs.data(), sn.data());
    gpu().rope_forward(d_x.get() + off, rows, ldx, nh, hs, rd, d_pos.get(), d_cs.get(), d_sn.get());
    expect_nmse("rope_forward" + tag, x, d_x.to_host(), kTolElementwise);
    auto g = randn(rows * ldx, ++seed);
    auto d_g = dev(g);
    cpu.rope_backward(g.data() + off, rows, ldx, nh, hs, rd, pos.data(), cs.data(), sn.data());
    gpu().rope_backward(d_g.get() + off, rows, ldx, nh, hs, rd, d_pos.get(), d_cs.get(), d_sn.get());
    expect_nmse("rope_backward" + tag, g, d_g.to_host(), kTolElementwise);
  }
}

// ---- MLA attention -------------------------------------------------------------------------------------------

struct AttnCfg {
  int64_t B, S, H, dn, dr, dv, ldkpe;
};
const AttnCfg kAttnCfgs[] = {{2, 37, 3, 5, 4, 6, 7}, {1, 133, 2, 16, 8, 12, 8}, {3, 1, 2, 3, 2, 5, 2}};

std::string attn_tag(const AttnCfg& c) {
  return " B" + std::to_string(c.B) + " S" + std::to_string(c.S) + " H" + std::to_string(c.H);
}

// A config's random operands, drawn in this order from ++seed: q (B,S,H,dn+dr), kv (B,S,H,dn+dv), kpe (B*S, ldkpe),
// and for a backward test dout (B,S,H,dv); then the gradients' initial values: dq and dkv garbage (the ops write
// them), dkpe (accumulated into).
struct AttnData {
  int64_t T;    // tokens B*S
  float scale;  // 1/sqrt(dn + dr)
  std::vector<float> q, kv, kpe, dout;
  AttnData(const AttnCfg& c, uint64_t& seed, bool backward)
      : T(c.B * c.S),
        scale(1.0f / std::sqrt((float)(c.dn + c.dr))),
        q(randn(T * c.H * (c.dn + c.dr), ++seed)),
        kv(randn(T * c.H * (c.dn + c.dv), ++seed)),
        kpe(randn(T * c.ldkpe, ++seed)),
        dout(backward ? randn(T * c.H * c.dv, ++seed) : std::vector<float>()) {}
  struct Grads {
    std::vector<float> dq, dkv, dkpe;
  };
  Grads initial_grads(uint64_t& seed) const {
    Grads g;
    g.dq = randn(q.size(), ++seed, 100.0f);
    g.dkv = randn(kv.size(), ++seed, 100.0f);
    g.dkpe = randn(kpe.size(), ++seed);
    return g;
  }
};

TEST_F(CudaOps, MlaAttentionForward) {
  uint64_t seed = 500;
  for (const auto& c : kAttnCfgs) {
    const AttnData a(c, seed, false);
    std::vector<float> o(a.T * c.H * c.dv), probs(c.B * c.H * c.S * c.S);
    cpu.mla_attention_forward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv,
                              a.scale, o.data(), probs.data());
    auto d_q = dev(a.q), d_kv = dev(a.kv), d_kpe = dev(a.kpe);
    DeviceBuffer<float> d_o(o.size()), d_probs(probs.size());
    gpu().mla_attention_forward(d_q.get(), d_kv.get(), d_kpe.get(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv, a.scale,
                                d_o.get(), d_probs.get());
    expect_nmse("mla_attention_forward o" + attn_tag(c), o, d_o.to_host(), kTolGemm);
    expect_nmse("mla_attention_forward probs" + attn_tag(c), probs, d_probs.to_host(), kTolGemm);
    // without probs: the scores go to scratch, one head at a time here
    cuda_->set_attention_chunk_bytes(sizeof(float) * c.S * c.S);
    DeviceBuffer<float> d_o2(o.size());
    gpu().mla_attention_forward(d_q.get(), d_kv.get(), d_kpe.get(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv, a.scale,
                                d_o2.get(), nullptr);
    expect_nmse("mla_attention_forward o (no probs, chunked)" + attn_tag(c), o, d_o2.to_host(), kTolGemm);
    cuda_->set_attention_chunk_bytes(size_t(1) << 30);
  }
}

TEST_F(CudaOps, MlaAttentionBackward) {
  uint64_t seed = 600;
  for (const auto& c : kAttnCfgs) {
    for (const size_t chunk : {size_t(1) << 30, sizeof(float) * c.S * c.S}) {
      const AttnData a(c, seed, true);
      std::vector<float> o(a.T * c.H * c.dv), probs(c.B * c.H * c.S * c.S);
      cpu.mla_attention_forward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv,
                                a.scale, o.data(), probs.data());
      auto [dq, dkv, dkpe] = a.initial_grads(seed);
      auto d_q = dev(a.q), d_kv = dev(a.kv), d_kpe = dev(a.kpe), d_probs = dev(probs), d_dout = dev(a.dout),
           d_dq = dev(dq), d_dkv = dev(dkv), d_dkpe = dev(dkpe);
      cpu.mla_attention_backward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, probs.data(), a.dout.data(), c.B,
                                 c.S, c.H, c.dn, c.dr, c.dv, a.scale, dq.data(), dkv.data(), dkpe.data());
      cuda_->set_attention_chunk_bytes(chunk);
      gpu().mla_attention_backward(d_q.get(), d_kv.get(), d_kpe.get(), c.ldkpe, d_probs.get(), d_dout.get(), c.B, c.S,
                                   c.H, c.dn, c.dr, c.dv, a.scale, d_dq.get(), d_dkv.get(), d_dkpe.get());
      cuda_->set_attention_chunk_bytes(size_t(1) << 30);
      const std::string tag = attn_tag(c) + (chunk < (size_t(1) << 30) ? " chunked" : "");
      expect_nmse("mla_attention_backward dq" + tag, dq, d_dq.to_host(), kTolGemm);
      expect_nmse("mla_attention_backward dkv" + tag, dkv, d_dkv.to_host(), kTolGemm);
      expect_nmse("mla_attention_backward dkpe" + tag, dkpe, d_dkpe.to_host(), kTolGemm);
    }
  }
}

// ---- MLA flash attention -------------------------------------------------------------------------------------
// cuda/flash_attention.cu against the CPU flash ops (which equal the probs form: tests/unit/test_ops_cpu.cpp): S not a
// multiple of the 32-row/32-key tiles, S = 300 across ten query and key blocks, S = 1, S = 32 (one full tile), the
// golden models' head dims (tiny 16/8/16, alt 8/4/12) and DeepSeek-V3's (128/64/128, k_pe inside kv_a's output row:
// ldkpe = 512 + 64; ~86-130 KiB of shared memory per block) with small H and S.
const AttnCfg kFlashCfgs[] = {{2, 37, 3, 5, 4, 6, 7},    {1, 300, 2, 16, 8, 16, 24}, {3, 1, 2, 3, 2, 5, 2},
                              {1, 32, 4, 16, 8, 16, 24}, {2, 45, 3, 8, 4, 12, 28},   {1, 70, 2, 128, 64, 128, 576},
                              {2, 33, 3, 128, 64, 128, 64}};

std::string flash_tag(const AttnCfg& c) {
  return attn_tag(c) + " d" + std::to_string(c.dn) + "/" + std::to_string(c.dr) + "/" + std::to_string(c.dv);
}

TEST_F(CudaOps, MlaFlashAttentionForward) {
  uint64_t seed = 1400;
  for (const auto& c : kFlashCfgs) {
    const AttnData a(c, seed, false);
    std::vector<float> o(a.T * c.H * c.dv), lse(c.B * c.H * c.S);
    cpu.mla_flash_attention_forward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv,
                                    a.scale, o.data(), lse.data());
    auto d_q = dev(a.q), d_kv = dev(a.kv), d_kpe = dev(a.kpe);
    DeviceBuffer<float> d_o(o.size()), d_lse(lse.size());
    gpu().mla_flash_attention_forward(d_q.get(), d_kv.get(), d_kpe.get(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv,
                                      a.scale, d_o.get(), d_lse.get());
    expect_nmse("mla_flash_attention_forward o" + flash_tag(c), o, d_o.to_host(), kTolGemm);
    expect_nmse("mla_flash_attention_forward lse" + flash_tag(c), lse, d_lse.to_host(), kTolGemm);
  }
}

TEST_F(CudaOps, MlaFlashAttentionBackward) {
  uint64_t seed = 1500;
  for (const auto& c : kFlashCfgs) {
    const AttnData a(c, seed, true);
    std::vector<float> o(a.T * c.H * c.dv), lse(c.B * c.H * c.S);
    cpu.mla_flash_attention_forward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv,
                                    a.scale, o.data(), lse.data());
    // both sides get the CPU's o and lse
    auto [dq, dkv, dkpe] = a.initial_grads(seed);
    const auto dkpe0 = dkpe;
    auto d_q = dev(a.q), d_kv = dev(a.kv), d_kpe = dev(a.kpe), d_o = dev(o), d_lse = dev(lse), d_dout = dev(a.dout),
         d_dq = dev(dq), d_dkv = dev(dkv), d_dkpe = dev(dkpe);
    cpu.mla_flash_attention_backward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, o.data(), lse.data(),
                                     a.dout.data(), c.B, c.S, c.H, c.dn, c.dr, c.dv, a.scale, dq.data(), dkv.data(),
                                     dkpe.data());
    gpu().mla_flash_attention_backward(d_q.get(), d_kv.get(), d_kpe.get(), c.ldkpe, d_o.get(), d_lse.get(),
                                       d_dout.get(), c.B, c.S, c.H, c.dn, c.dr, c.dv, a.scale, d_dq.get(), d_dkv.get(),
                                       d_dkpe.get());
    if (c.S > 1) {
      expect_nmse("mla_flash_attention_backward dq" + flash_tag(c), dq, d_dq.to_host(), kTolGemm);
    } else {
      // One key per sequence: P = 1, so dS = scale (dO.V - D) with D = dO.o = dO.V is zero up to rounding (the
      // softmax of one score has no gradient) and dq is that rounding on both sides (the CPU forms D in double, the
      // GPU by a warp sum in FP32): an NMSE against it compares two noises (the GPU's first run: 6.8). Both must be
      // that noise: |dq| <= 1e-5 scale dv max|dO| max|v| max|k| (a float dot product of dv terms rounds to ~dv 6e-8).
      auto amax = [](const std::vector<float>& v) {
        float m = 0;
        for (float x : v) m = std::max(m, std::fabs(x));
        return m;
      };
      const float bound =
          1e-5f * a.scale * (float)c.dv * amax(a.dout) * amax(a.kv) * std::max(amax(a.kv), amax(a.kpe));
      const float cpu_max = amax(dq), gpu_max = amax(d_dq.to_host());
      std::printf("  [ abs      ] %-44s cpu %.2e gpu %.2e (bound %.1e)\n",
                  ("mla_flash_attention_backward dq" + flash_tag(c)).c_str(), cpu_max, gpu_max, bound);
      EXPECT_LE(cpu_max, bound);
      EXPECT_LE(gpu_max, bound);
    }
    expect_nmse("mla_flash_attention_backward dkv" + flash_tag(c), dkv, d_dkv.to_host(), kTolGemm);
    const auto got_dkpe = d_dkpe.to_host();
    expect_nmse("mla_flash_attention_backward dkpe" + flash_tag(c), dkpe, got_dkpe, kTolGemm);
    int64_t pad_changed = 0;  // the columns of a k_pe row past dr (kv_a's latent in the model) are never written
    for (int64_t t = 0; t < a.T; ++t)
      for (int64_t k = c.dr; k < c.ldkpe; ++k) pad_changed += got_dkpe[t * c.ldkpe + k] != dkpe0[t * c.ldkpe + k];
    EXPECT_EQ(pad_changed, 0) << flash_tag(c);
  }
}

// BF16 attention (run.attention_dtype=bf16): the tensor-core kernels (cuda/flash_attention_bf16.cuh) against the
// CPU's BF16 definition (Backend::set_bf16_attention; test_ops_cpu.cpp checks it against double precision and
// test_flash_bf16_simt.cpp runs these kernels in a host emulation). kTolBf16Attention: where the two sides' values
// before a BF16 rounding (P, dS) differ by a relative eps (FP32 summation order: tensor-core accumulation against
// OpenBLAS), the rounding lands on the other neighbour for a fraction <= eps / 2^-8 of the elements, each then off by
// one ulp (<= 2^-7 relative), so NMSE <= eps 2^8 2^-14 = eps / 64; FP32 dot products of <= 192 exact BF16 products
// at these magnitudes differ by eps <~ 1e-6 in any order: NMSE <= 1.6e-8 (the host emulation, double against FP32:
// 8e-11). The kernels must also be >= 100 times closer to the BF16 definition than to FP32 attention: a kernel that
// skipped a rounding is not. Both backward calls get the CPU's BF16 o and lse.
constexpr double kTolBf16Attention = 2e-8;

TEST_F(CudaOps, MlaFlashAttentionBf16) {
  uint64_t seed = 1600;
  CpuBackend cpu32(2);  // FP32 attention: what the kernels must be far from
  cpu.set_bf16_attention(true);
  gpu().set_bf16_attention(true);
  auto expect_bf16 = [](const std::string& what, const std::vector<float>& ref, const std::vector<float>& ref32,
                        const std::vector<float>& got) {
    expect_nmse(what, ref, got, kTolBf16Attention);
    const double e = nmse(ref, got), e32 = nmse(ref32, got);
    std::printf("  [ vs FP32  ] %-44s %.3e\n", what.c_str(), e32);
    EXPECT_GE(e32, 100 * std::max(e, 1e-12)) << what << ": as close to FP32 attention as to the BF16 definition";
  };
  for (const auto& c : kFlashCfgs) {
    const AttnData a(c, seed, true);
    std::vector<float> o(a.T * c.H * c.dv), lse(c.B * c.H * c.S), o32(o.size()), lse32(lse.size());
    cpu.mla_flash_attention_forward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv,
                                    a.scale, o.data(), lse.data());
    cpu32.mla_flash_attention_forward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr,
                                      c.dv, a.scale, o32.data(), lse32.data());
    auto d_q = dev(a.q), d_kv = dev(a.kv), d_kpe = dev(a.kpe);
    DeviceBuffer<float> d_o(o.size()), d_lse(lse.size());
    gpu().mla_flash_attention_forward(d_q.get(), d_kv.get(), d_kpe.get(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv,
                                      a.scale, d_o.get(), d_lse.get());
    expect_bf16("bf16 flash forward o" + flash_tag(c), o, o32, d_o.to_host());
    expect_bf16("bf16 flash forward lse" + flash_tag(c), lse, lse32, d_lse.to_host());

    auto [dq, dkv, dkpe] = a.initial_grads(seed);
    auto dq32 = dq, dkv32 = dkv, dkpe32 = dkpe;
    auto d_o_cpu = dev(o), d_lse_cpu = dev(lse), d_dout = dev(a.dout), d_dq = dev(dq), d_dkv = dev(dkv),
         d_dkpe = dev(dkpe);
    cpu.mla_flash_attention_backward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, o.data(), lse.data(),
                                     a.dout.data(), c.B, c.S, c.H, c.dn, c.dr, c.dv, a.scale, dq.data(), dkv.data(),
                                     dkpe.data());
    cpu32.mla_flash_attention_backward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, o.data(), lse.data(),
                                       a.dout.data(), c.B, c.S, c.H, c.dn, c.dr, c.dv, a.scale, dq32.data(),
                                       dkv32.data(), dkpe32.data());
    gpu().mla_flash_attention_backward(d_q.get(), d_kv.get(), d_kpe.get(), c.ldkpe, d_o_cpu.get(), d_lse_cpu.get(),
                                       d_dout.get(), c.B, c.S, c.H, c.dn, c.dr, c.dv, a.scale, d_dq.get(),
                                       d_dkv.get(), d_dkpe.get());
    if (c.S > 1) {
      expect_bf16("bf16 flash backward dq" + flash_tag(c), dq, dq32, d_dq.to_host());
    } else {
      // One key per sequence: P = 1 and dS = scale (dP - D), dP = bf16(dO).bf16(V) against D = dO.o in FP32, is
      // what the BF16 rounding of dO and V leaves (~2^-8 of the dot products): a cancellation that magnifies the two
      // sides' FP32 summation-order difference ~500 times before dS is rounded, so one side's dS may land on the
      // other BF16 neighbour (the NMSE derivation above assumes eps ~1e-6 before a rounding). With one key dq =
      // bf16(dS) bf16(k): element by element the two agree within one BF16 ulp of dS, <= 2^-7 |dq| (+ FP32 noise).
      const auto got = d_dq.to_host();
      float dq_max = 0;
      for (float x : dq) dq_max = std::max(dq_max, std::fabs(x));
      int64_t off = 0;
      for (size_t i = 0; i < dq.size(); ++i)
        off += std::fabs(got[i] - dq[i]) > 0x1p-7f * std::fabs(dq[i]) + 1e-6f * dq_max;
      std::printf("  [ ulp      ] %-44s %lld of %zu elements beyond one BF16 ulp of dS\n",
                  ("bf16 flash backward dq" + flash_tag(c)).c_str(), (long long)off, dq.size());
      EXPECT_EQ(off, 0) << flash_tag(c);
      EXPECT_GT(dq_max, 0.0f) << flash_tag(c) << ": the BF16 roundings leave a gradient with one key";
    }
    expect_bf16("bf16 flash backward dkv" + flash_tag(c), dkv, dkv32, d_dkv.to_host());
    expect_bf16("bf16 flash backward dkpe" + flash_tag(c), dkpe, dkpe32, d_dkpe.to_host());
  }
  cpu.set_bf16_attention(false);
}

// the flash pair on host pointers (make_backend("cuda"), what run.device=cuda run.attention=flash calls)
TEST_F(CudaOps, MlaFlashAttentionHostStaged) {
  auto staged = make_backend("cuda");
  const AttnCfg c{2, 41, 3, 16, 8, 16, 24};  // the tiny golden model's head dims, k_pe inside kv_a's row
  uint64_t seed = 1600;
  const AttnData a(c, seed, true);
  const float scale = 0.25f;
  std::vector<float> o(a.T * c.H * c.dv), lse(c.B * c.H * c.S), o_g(o.size()), lse_g(lse.size());
  cpu.mla_flash_attention_forward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv,
                                  scale, o.data(), lse.data());
  staged->mla_flash_attention_forward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv,
                                      scale, o_g.data(), lse_g.data());
  expect_nmse("host-staged mla_flash_attention_forward o", o, o_g, kTolGemm);
  expect_nmse("host-staged mla_flash_attention_forward lse", lse, lse_g, kTolGemm);
  auto [dq, dkv, dkpe] = a.initial_grads(seed);
  auto dq_g = dq, dkv_g = dkv, dkpe_g = dkpe;
  cpu.mla_flash_attention_backward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, o.data(), lse.data(),
                                   a.dout.data(), c.B, c.S, c.H, c.dn, c.dr, c.dv, scale, dq.data(), dkv.data(),
                                   dkpe.data());
  staged->mla_flash_attention_backward(a.q.data(), a.kv.data(), a.kpe.data(), c.ldkpe, o.data(), lse.data(),
                                       a.dout.data(), c.B, c.S, c.H, c.dn, c.dr, c.dv, scale, dq_g.data(), dkv_g.data(),
                                       dkpe_g.data());
  expect_nmse("host-staged mla_flash_attention_backward dq", dq, dq_g, kTolGemm);
  expect_nmse("host-staged mla_flash_attention_backward dkv", dkv, dkv_g, kTolGemm);
  expect_nmse("host-staged mla_flash_attention_backward dkpe (+=, strided)", dkpe, dkpe_g, kTolGemm);
}

// ---- SwiGLU --------------------------------------------------------------------------------------------------

// ---- elementwise ops and row copies (the model's residual adds, gradient sums, concatenations) --------------

TEST_F(CudaOps, ElementwiseAndRowCopies) {
  uint64_t seed = 650;
  for (int64_t n : {1, 37, 1000003}) {  // y += x, then fill: exact (one add per element on both sides)
    auto x = randn(n, ++seed), y = randn(n, ++seed);
    auto d_x = dev(x), d_y = dev(y);
    cpu.add(x.data(), n, y.data());
    gpu().add(d_x.get(), n, d_y.get());
    expect_nmse("add n" + std::to_string(n) + " (exact)", y, d_y.to_host(), 0.0);
    cpu.fill(y.data(), n, -2.5f);
    gpu().fill(d_y.get(), n, -2.5f);
    expect_nmse("fill n" + std::to_string(n) + " (exact)", y, d_y.to_host(), 0.0);
  }
  // rows x cols from a source with row stride lds into a destination with row stride ldd: the rest of dst untouched
  const int64_t cfg[][4] = {{5, 7, 7, 7}, {37, 13, 29, 40}, {300, 64, 128, 64}, {1, 1000, 1000, 2000}};
  for (const auto& c : cfg) {
    const int64_t rows = c[0], cols = c[1], lds = c[2], ldd = c[3];
    auto src = randn(rows * lds, ++seed), dst = randn(rows * ldd, ++seed, 100.0f);
    auto d_src = dev(src), d_dst = dev(dst);
    cpu.copy_rows(src.data(), lds, rows, cols, dst.data(), ldd);
    gpu().copy_rows(d_src.get(), lds, rows, cols, d_dst.get(), ldd);
    expect_nmse("copy_rows " + std::to_string(rows) + "x" + std::to_string(cols) + " lds " + std::to_string(lds) +
                    " ldd " + std::to_string(ldd) + " (exact)",
                dst, d_dst.to_host(), 0.0);
  }
}

// make_backend("cuda"): Buffers (core/memory.h) come from the CUDA pool, zeroed, reused by size, and the ops run on
// them in place; host vectors are still staged
TEST_F(CudaOps, BuffersLiveInTheCudaPool) {
  auto be = make_backend("cuda");
  ASSERT_STREQ(default_memory().name(), "cuda-managed");
  const int64_t n = 4099;
  auto hx = randn(n, 660), hy = randn(n, 661);
  Floats x(hx), y(hy);
  EXPECT_TRUE(cuda_managed_owns(x.data()) && cuda_managed_owns(y.data() + n - 1));
  be->add(x.data(), n, y.data());  // in place on the pool's memory
  cpu.add(hx.data(), n, hy.data());
  expect_nmse("add on pool Buffers (exact)", hy, y.to_host(), 0.0);
  std::vector<float> host(hx);  // a host operand next to a pool one: staged
  be->add(y.data(), n, host.data());
  cpu.add(hy.data(), n, hx.data());
  expect_nmse("add into a host vector (exact)", hx, host, 0.0);
  // a freed block of the same size is handed out again, zeroed, without a new cudaMallocManaged
  const float* first = nullptr;
  {
    Floats a(n);
    be->fill(a.data(), n, 7.0f);
    first = a.data();
  }
  const auto before = default_memory().stats();
  Floats b(n);
  const auto after = default_memory().stats();
  EXPECT_EQ(b.data(), first);
  EXPECT_EQ(after.system_allocations, before.system_allocations);
  const auto hb = b.to_host();
  EXPECT_EQ(std::count(hb.begin(), hb.end(), 0.0f), n);
  // growth keeps the old elements and zeroes the new ones
  b.assign(hx.data(), hx.data() + n);
  b.resize(n + 5);
  const auto hb2 = b.to_host();
  EXPECT_TRUE(std::equal(hx.begin(), hx.end(), hb2.begin()));
  EXPECT_EQ(std::count(hb2.begin() + n, hb2.end(), 0.0f), 5);
  set_default_memory(nullptr);
}

TEST_F(CudaOps, SwigluForward) {
  const int64_t cfg[][3] = {{37, 29, 64}, {3, 1000, 2000}, {1, 1, 2}};  // rows, cols, ld_in (gate | up in one row)
  uint64_t seed = 700;
  for (const auto& c : cfg) {
    const int64_t rows = c[0], cols = c[1], ld = c[2];
    auto in = randn(rows * ld, ++seed, 3.0f);
    std::vector<float> out(rows * cols);
    auto d_in = dev(in);
    DeviceBuffer<float> d_out(out.size());
    cpu.swiglu_forward(in.data(), in.data() + cols, rows, cols, ld, out.data());
    gpu().swiglu_forward(d_in.get(), d_in.get() + cols, rows, cols, ld, d_out.get());
    expect_nmse("swiglu_forward " + std::to_string(rows) + "x" + std::to_string(cols), out, d_out.to_host(),
                kTolElementwise);
  }
}

TEST_F(CudaOps, SwigluBackward) {
  const int64_t cfg[][2] = {{37, 29}, {3, 1000}};
  uint64_t seed = 800;
  for (const auto& c : cfg) {
    const int64_t rows = c[0], cols = c[1], n = rows * cols;
    auto gate = randn(n, ++seed, 3.0f), up = randn(n, ++seed), dout = randn(n, ++seed);
    auto dgate = randn(n, ++seed, 100.0f), dup = randn(n, ++seed, 100.0f);  // written: start from garbage
    auto d_gate = dev(gate), d_up = dev(up), d_dout = dev(dout), d_dgate = dev(dgate), d_dup = dev(dup);
    cpu.swiglu_backward(gate.data(), up.data(), dout.data(), rows, cols, dgate.data(), dup.data());
    gpu().swiglu_backward(d_gate.get(), d_up.get(), d_dout.get(), rows, cols, d_dgate.get(), d_dup.get());
    const std::string tag = " " + std::to_string(rows) + "x" + std::to_string(cols);
    expect_nmse("swiglu_backward dgate" + tag, dgate, d_dgate.to_host(), kTolElementwise);
    expect_nmse("swiglu_backward dup" + tag, dup, d_dup.to_host(), kTolElementwise);
  }
}

// ---- embedding -----------------------------------------------------------------------------------------------

TEST_F(CudaOps, EmbeddingForwardBackward) {
  const int64_t vocab = 50, dim = 37, n = 101;  // ids repeat
  auto ids = randint(n, 0, vocab, 900);
  auto table = randn(vocab * dim, 901), dy = randn(n * dim, 902), dtable = randn(vocab * dim, 903);
  auto d_ids = dev(ids);
  auto d_table = dev(table), d_dy = dev(dy), d_dtable = dev(dtable);
  std::vector<float> out(n * dim);
  DeviceBuffer<float> d_out(out.size());
  cpu.embedding_forward(ids.data(), n, table.data(), dim, out.data());
  gpu().embedding_forward(d_ids.get(), n, d_table.get(), dim, d_out.get());
  expect_nmse("embedding_forward (exact)", out, d_out.to_host(), 0.0);
  cpu.embedding_backward(ids.data(), n, dy.data(), dim, dtable.data());
  gpu().embedding_backward(d_ids.get(), n, d_dy.get(), dim, d_dtable.get());
  expect_nmse("embedding_backward (exact)", dtable, d_dtable.to_host(), 0.0);
}

// the vocabulary-parallel pieces: this rank's rows [v0, v0 + vl) of a vocabulary of 3 * vl, ids and targets over all
TEST_F(CudaOps, VocabularySlices) {
  const int64_t vl = 41, v0 = vl, V = 3 * vl, dim = 29, n = 97, rows = 53;
  auto ids = randint(n, 0, V, 950);  // in and out of the slice, repeated
  auto table = randn(vl * dim, 951), dy = randn(n * dim, 952), dtable = randn(vl * dim, 953);
  auto d_ids = dev(ids);
  auto d_table = dev(table), d_dy = dev(dy), d_dtable = dev(dtable);
  std::vector<float> out(n * dim, 5.0f);  // written everywhere (zeros outside the slice)
  auto d_out = dev(out);
  cpu.embedding_forward_slice(ids.data(), n, table.data(), v0, vl, dim, out.data());
  gpu().embedding_forward_slice(d_ids.get(), n, d_table.get(), v0, vl, dim, d_out.get());
  expect_nmse("embedding_forward_slice (exact)", out, d_out.to_host(), 0.0);
  cpu.embedding_backward_slice(ids.data(), n, dy.data(), v0, vl, dim, dtable.data());
  gpu().embedding_backward_slice(d_ids.get(), n, d_dy.get(), v0, vl, dim, d_dtable.get());
  expect_nmse("embedding_backward_slice (exact)", dtable, d_dtable.to_host(), 0.0);

  auto logits = randn(rows * vl, 954, 3.0f);
  auto targets = randint(rows, 0, V, 955);
  for (int64_t r = 0; r < rows; r += 7) targets[r] = -1;
  auto d_logits = dev(logits);
  auto d_targets = dev(targets);
  std::vector<double> lse(rows), tgt(rows, -7.0);  // tgt stays -7 where the target lies in another slice
  DeviceBuffer<double> d_lse(rows), d_tgt(tgt);
  cpu.cross_entropy_slice_forward(logits.data(), rows, vl, targets.data(), v0, lse.data(), tgt.data());
  gpu().cross_entropy_slice_forward(d_logits.get(), rows, vl, d_targets.get(), v0, d_lse.get(), d_tgt.get());
  const auto g_lse = d_lse.to_host(), g_tgt = d_tgt.to_host();
  // Both sides sum expf(l - mx) in double over the same mx; the terms differ by CUDA expf's <= 2 ulp against glibc's
  // <= 0.5 ulp (2^-23 relative each), so log(sum) by <= 2.5 2^-23 ~ 3e-7, absolute (lse may be near 0: not relative).
  // (The SIMT emulation, host expf on both sides, gets within 1e-12.)
  const double lse_bound = 2.5 * 0x1p-23 + 1e-12;
  double worst = 0;
  for (int64_t r = 0; r < rows; ++r) worst = std::max(worst, std::fabs(g_lse[r] - lse[r]));
  std::printf("  [ abs      ] %-44s %.3e (bound %.1e)\n", "cross_entropy_slice_forward lse", worst, lse_bound);
  EXPECT_LE(worst, lse_bound);
  EXPECT_EQ(tgt, g_tgt);  // a copied logit (or the untouched -7): exact
  std::vector<float> lse32(lse.begin(), lse.end()), dl(rows * vl, 9.0f);
  auto d_lse32 = dev(lse32), d_dl = dev(dl);
  cpu.cross_entropy_slice_backward(logits.data(), lse32.data(), rows, vl, targets.data(), v0, 0.25f, dl.data());
  gpu().cross_entropy_slice_backward(d_logits.get(), d_lse32.get(), rows, vl, d_targets.get(), v0, 0.25f, d_dl.get());
  expect_nmse("cross_entropy_slice_backward", dl, d_dl.to_host(), kTolElementwise);
}

// ---- cross entropy -------------------------------------------------------------------------------------------

TEST_F(CudaOps, CrossEntropyForwardBackward) {
  const int64_t cfg[][2] = {{37, 1000}, {5, 50021}, {300, 33}};  // rows, V
  uint64_t seed = 1000;
  for (const auto& c : cfg) {
    const int64_t rows = c[0], V = c[1];
    auto logits = randn(rows * V, ++seed, 3.0f);
    auto targets = randint(rows, 0, V, ++seed);
    for (int64_t r = 0; r < rows; r += 5) targets[r] = -1;  // ignored rows (the first among them)
    auto d_logits = dev(logits);
    auto d_targets = dev(targets);
    std::vector<float> lse(rows);
    DeviceBuffer<float> d_lse(rows);
    int64_t n_cpu = -1, n_gpu = -2;
    const double l_cpu = cpu.cross_entropy_forward(logits.data(), rows, V, targets.data(), &n_cpu, lse.data());
    const double l_gpu = gpu().cross_entropy_forward(d_logits.get(), rows, V, d_targets.get(), &n_gpu, d_lse.get());
    const std::string tag = " " + std::to_string(rows) + "x" + std::to_string(V);
    EXPECT_EQ(n_cpu, n_gpu) << tag;
    EXPECT_NEAR(l_gpu, l_cpu, 1e-9 * std::fabs(l_cpu)) << "cross_entropy_forward loss" << tag;
    std::printf("  [ loss     ] cross_entropy_forward%-23s cpu %.10f cuda %.10f (count %lld)\n", tag.c_str(), l_cpu,
                l_gpu, (long long)n_gpu);
    expect_nmse("cross_entropy_forward lse" + tag, lse, d_lse.to_host(), kTolElementwise);
    int64_t n_nolse = -1;  // lse is optional
    EXPECT_NEAR(gpu().cross_entropy_forward(d_logits.get(), rows, V, d_targets.get(), &n_nolse), l_cpu,
                1e-9 * std::fabs(l_cpu));
    EXPECT_EQ(n_nolse, n_cpu);

    const float scale = 1.0f / (float)n_cpu;
    auto dl = randn(rows * V, ++seed, 100.0f);  // written: start from garbage
    auto d_dl = dev(dl);
    cpu.cross_entropy_backward(logits.data(), lse.data(), rows, V, targets.data(), scale, dl.data());
    auto d_lse_cpu = dev(lse);  // the same lse on both sides
    gpu().cross_entropy_backward(d_logits.get(), d_lse_cpu.get(), rows, V, d_targets.get(), scale, d_dl.get());
    const auto got = d_dl.to_host();
    expect_nmse("cross_entropy_backward" + tag, dl, got, kTolElementwise);
    for (int64_t r = 0; r < rows; r += 5)
      for (int64_t v = 0; v < V; ++v) ASSERT_EQ(got[r * V + v], 0.0f) << "ignored row " << r;
  }
  // every row ignored
  const int64_t rows = 4, V = 9;
  auto logits = randn(rows * V, 1099);
  std::vector<int64_t> targets(rows, -1);
  auto d_logits = dev(logits);
  auto d_targets = dev(targets);
  int64_t n = -1;
  EXPECT_EQ(gpu().cross_entropy_forward(d_logits.get(), rows, V, d_targets.get(), &n), 0.0);
  EXPECT_EQ(n, 0);
}

// ---- router --------------------------------------------------------------------------------------------------

struct RouterCfg {
  int64_t T, E, n_group, topk_group, k;
  bool norm;
  float scale;
  int64_t n_nodes = 1, max_nodes = 0;  // node-limited routing when max_nodes > 0
  RouterSpec spec() const {
    return RouterSpec{.E = E, .k = k, .n_group = n_group, .topk_group = topk_group, .n_nodes = n_nodes,
                      .max_nodes = max_nodes, .norm = norm, .scale = scale};
  }
};

void check_router_forward(Backend& cpu, Backend& gpu, const RouterCfg& c, const std::vector<float>& logits,
                          const std::vector<float>& bias, const std::string& what) {
  std::vector<float> scores(c.T * c.E), weight(c.T * c.k);
  std::vector<int32_t> idx(c.T * c.k);
  cpu.router_forward(logits.data(), bias.data(), c.T, c.spec(), scores.data(), idx.data(), weight.data());
  auto d_logits = dev(logits), d_bias = dev(bias);
  DeviceBuffer<float> d_scores(scores.size()), d_weight(weight.size());
  DeviceBuffer<int32_t> d_idx(idx.size());
  gpu.router_forward(d_logits.get(), d_bias.get(), c.T, c.spec(), d_scores.get(), d_idx.get(), d_weight.get());
  const std::string tag = what + " T" + std::to_string(c.T) + " E" + std::to_string(c.E) + " g" +
                          std::to_string(c.n_group) + "/" + std::to_string(c.topk_group) + " k" + std::to_string(c.k) +
                          (c.max_nodes ? " n" + std::to_string(c.n_nodes) + "/" + std::to_string(c.max_nodes) : "");
  const auto gidx = d_idx.to_host();
  EXPECT_EQ(idx, gidx) << "router_forward idx" << tag;
  std::printf("  [ idx      ] router_forward%-30s %s\n", tag.c_str(), idx == gidx ? "identical" : "DIFFER");
  expect_nmse("router_forward scores" + tag, scores, d_scores.to_host(), kTolElementwise);
  expect_nmse("router_forward weight" + tag, weight, d_weight.to_host(), kTolElementwise);
}

TEST_F(CudaOps, RouterForward) {
  const RouterCfg cfgs[] = {
      {37, 64, 8, 3, 6, true, 2.5f},  {37, 48, 1, 1, 5, false, 1.0f}, {37, 16, 16, 4, 3, true, 1.0f},
      {131, 256, 8, 4, 8, true, 2.5f},  // DeepSeek-V3's router
      {20, 30, 4, 2, 5, true, 1.0f},    // 30 experts in 4 groups of 7: the last two are in no group
      // node-limited routing: V3's router over 16 nodes (groups span nodes: n_group 1), at most 4 nodes; V3's
      // groups nested in 4 nodes (2 groups each) at most 2 nodes; node_topk 3 (k 6, 2 nodes) on 37 tokens
      {131, 256, 1, 1, 8, true, 2.5f, 16, 4},
      {131, 256, 8, 4, 8, true, 2.5f, 4, 2},
      {37, 48, 1, 1, 6, false, 1.0f, 6, 2},
  };
  uint64_t seed = 1100;
  for (const auto& c : cfgs) {
    const auto logits = randn(c.T * c.E, ++seed);
    const auto bias = randn(c.E, ++seed, 0.1f);
    check_router_forward(cpu, gpu(), c, logits, bias, "");
  }
}

TEST_F(CudaOps, RouterForwardTies) {
  // few distinct values: ties everywhere, in the group scores and in the top-k; lower index must win on both sides
  const RouterCfg c{64, 32, 4, 2, 4, true, 1.0f};
  std::mt19937_64 g(1200);
  const float vals[] = {-1.0f, 0.0f, 0.5f, 1.0f};
  std::vector<float> logits(c.T * c.E), bias(c.E);
  for (auto& v : logits) v = vals[g() % 4];
  for (auto& v : bias) v = (g() % 2) ? 0.25f : 0.0f;
  check_router_forward(cpu, gpu(), c, logits, bias, " ties");
  std::fill(bias.begin(), bias.end(), 0.0f);
  std::fill(logits.begin(), logits.end(), 0.0f);
  check_router_forward(cpu, gpu(), c, logits, bias, " all equal");
  // the node limit's scores tie as much: lower node index must win on both sides
  const RouterCfg cn{64, 32, 4, 2, 4, true, 1.0f, 4, 2};
  for (auto& v : logits) v = vals[g() % 4];
  check_router_forward(cpu, gpu(), cn, logits, bias, " ties");
}

TEST_F(CudaOps, RouterBackward) {
  const int64_t T = 36, E = 64, K = 6, seq_len = 12;
  std::vector<float> logits = randn(T * E, 1300), bias = randn(E, 1301, 0.1f);
  std::vector<float> scores(T * E), weight(T * K);
  std::vector<int32_t> idx(T * K);
  const RouterSpec spec{.E = E, .k = K, .n_group = 8, .topk_group = 4, .norm = true, .scale = 2.5f};
  cpu.router_forward(logits.data(), bias.data(), T, spec, scores.data(), idx.data(), weight.data());
  auto dweight = randn(T * K, 1302);
  std::vector<float> f(T / seq_len * E);
  std::mt19937_64 g(1303);
  for (auto& v : f) v = (float)(g() % 1000) / 250.0f;
  auto d_scores = dev(scores), d_dweight = dev(dweight), d_f = dev(f);
  auto d_idx = dev(idx);
  for (const bool norm : {true, false})
    for (const float aux : {0.0f, 0.01f})
      for (const bool with_f : {true, false}) {
        std::vector<float> dl(T * E, 123.0f);  // written
        DeviceBuffer<float> d_dl(dl);
        const float* fp = with_f ? f.data() : nullptr;
        const float* dfp = with_f ? d_f.get() : nullptr;
        cpu.router_backward(scores.data(), idx.data(), dweight.data(), T, E, K, norm, 2.5f, seq_len, fp, aux,
                            dl.data());
        gpu().router_backward(d_scores.get(), d_idx.get(), d_dweight.get(), T, E, K, norm, 2.5f, seq_len, dfp, aux,
                              d_dl.get());
        expect_nmse(std::string("router_backward") + (norm ? " norm" : " no-norm") + " aux " +
                        std::to_string(aux).substr(0, 4) + (with_f ? " f" : " no-f"),
                    dl, d_dl.to_host(), kTolElementwise);
      }
}

// ---- MoE permutation ---------------------------------------------------------------------------------------------

// DeepSeek-V3's shape in small (top-8, D 7168 columns: the column loop runs 28 times per thread) and odd ones; the
// grouped rows are a random bijection of (token, slot) as moe_dispatch makes one. gather: exact; combine and its
// backward: mul-then-add in slot order on both sides (exact but for the CPU compiler's own contraction), the dot
// products in double.
TEST_F(CudaOps, MoePermutation) {
  struct Shape {
    int64_t T, K, D, ldx;
  };
  const Shape shapes[] = {{37, 8, 7168, 7168}, {101, 3, 13, 16}, {1, 1, 300, 301}};
  uint64_t seed = 1500;
  for (const auto& sh : shapes) {
    const int64_t rows = sh.T * sh.K;
    const std::string tag = " T" + std::to_string(sh.T) + " K" + std::to_string(sh.K) + " D" + std::to_string(sh.D);
    std::vector<int32_t> pos(rows), token(rows);
    for (int32_t i = 0; i < (int32_t)rows; ++i) pos[i] = i;
    std::mt19937_64 g(++seed);
    std::shuffle(pos.begin(), pos.end(), g);
    for (int64_t tk = 0; tk < rows; ++tk) token[pos[tk]] = (int32_t)(tk / sh.K);
    auto x = randn(sh.T * sh.ldx, ++seed), y = randn(rows * sh.D, ++seed), w = randn(rows, ++seed);
    auto dout = randn(sh.T * sh.D, ++seed), out0 = randn(sh.T * sh.D, ++seed);
    auto d_x = dev(x), d_y = dev(y), d_w = dev(w), d_dout = dev(dout);
    auto d_pos = dev(pos), d_token = dev(token);
    std::vector<float> gx(rows * sh.D);
    DeviceBuffer<float> d_gx(gx.size());
    cpu.gather_rows(x.data(), sh.ldx, token.data(), rows, sh.D, gx.data());
    gpu().gather_rows(d_x.get(), sh.ldx, d_token.get(), rows, sh.D, d_gx.get());
    expect_nmse("gather_rows (exact)" + tag, gx, d_gx.to_host(), 0.0);
    for (const bool weighted : {true, false}) {
      std::vector<float> out = out0;
      DeviceBuffer<float> d_out(out0);
      cpu.combine_rows(y.data(), pos.data(), weighted ? w.data() : nullptr, sh.T, sh.K, sh.D, out.data());
      gpu().combine_rows(d_y.get(), d_pos.get(), weighted ? d_w.get() : nullptr, sh.T, sh.K, sh.D, d_out.get());
      expect_nmse(std::string("combine_rows") + (weighted ? " weighted" : " plain") + tag, out, d_out.to_host(),
                  kTolElementwise);
    }
    std::vector<float> dy(rows * sh.D), dw(rows);
    DeviceBuffer<float> d_dy(dy.size()), d_dw(dw.size());
    cpu.combine_rows_backward(dout.data(), y.data(), pos.data(), w.data(), sh.T, sh.K, sh.D, dy.data(), dw.data());
    gpu().combine_rows_backward(d_dout.get(), d_y.get(), d_pos.get(), d_w.get(), sh.T, sh.K, sh.D, d_dy.get(),
                                d_dw.get());
    expect_nmse("combine_rows_backward dy" + tag, dy, d_dy.to_host(), kTolElementwise);
    expect_nmse("combine_rows_backward dweight" + tag, dw, d_dw.to_host(), kTolElementwise);
  }
}


// ---- optimizer ops and conversions -----------------------------------------------------------------------------
// Tolerance: none. adamw_update evaluates the shared adamw_element (optim/adamw_math.h) on both sides: IEEE FP32
// multiplies, adds, divisions and sqrt (correctly rounded: no fast-math) plus the two FMAs it writes out, with FMA
// contraction off in both files (-ffp-contract=off for the CPU op, -fmad=false for cuda/optimizer.cu); without that,
// nvcc would fuse e.g. `p * decay` into the subtraction and the weights would differ by an ulp now and then.
// sum_squares adds the same exact double squares in the same order (4096-element chunks) on both. The conversions
// are integer operations on the bits (FP8: plus one FP32 multiply). Only NaNs may differ in their payload (the GPU
// returns its canonical NaN from arithmetic): none of these inputs makes one except the FP8 NaN codes.

template <class T>
int64_t bit_diffs(const std::vector<T>& a, const std::vector<T>& b) {
  EXPECT_EQ(a.size(), b.size());
  int64_t d = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) d += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
  return d;
}

struct OptShard {  // one shard's AdamW state on the host
  std::vector<float> master, g, m, v;
  std::vector<uint16_t> m16, v16;
  std::vector<uint8_t> decay;
  std::vector<float> weights;  // the model's weights, written by the update (empty: none)
  bool bf16 = false, bf16_weights = false;
  int64_t n() const { return (int64_t)master.size(); }
};

OptShard opt_shard(int64_t n, bool bf16, uint64_t seed) {
  OptShard s;
  s.bf16 = bf16;
  s.master = randn(n, seed, 0.05f);
  s.g = randn(n, seed + 1, 0.3f);
  std::mt19937_64 g(seed + 2);
  s.decay.resize(n);
  for (auto& d : s.decay) d = (g() % 3) != 0;
  auto m = randn(n, seed + 3, 0.01f), v = randn(n, seed + 4, 0.01f);
  for (auto& x : v) x = x * x;
  if (bf16) {
    s.m16.resize(n);
    s.v16.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      s.m16[i] = f32_to_bf16_bits(m[i]);
      s.v16[i] = f32_to_bf16_bits(v[i]);
    }
  } else {
    s.m = m;
    s.v = v;
  }
  if (seed % 3 != 0) {  // two shards in three carry the model's weights: FP32 or BF16-rounded
    s.weights.assign(n, -5.0f);
    s.bf16_weights = seed % 3 == 2;
  }
  return s;
}

Backend::AdamWShard host_view(OptShard& s) {
  Backend::AdamWShard o;
  o.master = s.master.data();
  o.grad = s.g.data();
  o.decay = s.decay.data();
  if (s.bf16) {
    o.m16 = s.m16.data();
    o.v16 = s.v16.data();
  } else {
    o.m = s.m.data();
    o.v = s.v.data();
  }
  if (!s.weights.empty()) {
    o.weights = s.weights.data();
    o.bf16_weights = s.bf16_weights;
  }
  o.n = s.n();
  return o;
}

struct DevShard {  // the same on the device
  DeviceBuffer<float> master, g, m, v, weights;
  DeviceBuffer<uint16_t> m16, v16;
  DeviceBuffer<uint8_t> decay;
  explicit DevShard(const OptShard& s)
      : master(s.master), g(s.g), m(s.m), v(s.v), weights(s.weights), m16(s.m16), v16(s.v16), decay(s.decay) {}
  Backend::AdamWShard view(const OptShard& s) {
    Backend::AdamWShard o;
    o.master = master.get();
    o.grad = g.get();
    o.decay = decay.get();
    if (s.bf16) {
      o.m16 = m16.get();
      o.v16 = v16.get();
    } else {
      o.m = m.get();
      o.v = v.get();
    }
    if (!s.weights.empty()) {
      o.weights = weights.get();
      o.bf16_weights = s.bf16_weights;
    }
    o.n = s.n();
    return o;
  }
  void expect_equal(const OptShard& s, const std::string& what) const {
    EXPECT_EQ(bit_diffs(s.master, master.to_host()), 0) << what << " master";
    EXPECT_EQ(bit_diffs(s.weights, weights.to_host()), 0) << what << " weights";
    EXPECT_EQ(bit_diffs(s.m, m.to_host()), 0) << what << " m";
    EXPECT_EQ(bit_diffs(s.v, v.to_host()), 0) << what << " v";
    EXPECT_EQ(bit_diffs(s.m16, m16.to_host()), 0) << what << " m16";
    EXPECT_EQ(bit_diffs(s.v16, v16.to_host()), 0) << what << " v16";
  }
};

Backend::AdamWHyper adamw_hyper(int64_t t, double lr, double grad_scale) {
  Backend::AdamWHyper h;
  h.lr = lr;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.weight_decay = 0.1;
  h.grad_scale = grad_scale;
  h.t = t;
  return h;
}

// 20 shards in one call (two launches of 16), FP32 and BF16 moments mixed, odd sizes (100003), empty shards; three
// steps with changing lr and grad_scale
TEST_F(CudaOps, AdamwUpdate) {
  std::vector<OptShard> host;
  for (int k = 0; k < 20; ++k) {
    const int64_t n = k == 0 ? 100003 : (k % 7 == 6 ? 0 : 129 * k + 3);
    host.push_back(opt_shard(n, k % 2 == 1, 2000 + 10 * k));
  }
  std::vector<std::unique_ptr<DevShard>> devs;
  for (const auto& s : host) devs.push_back(std::make_unique<DevShard>(s));
  const double lrs[] = {1e-3, 3e-4, 2.2e-4}, scales[] = {1.0, 0.37, 1.0 / 3.0};
  for (int64_t t = 1; t <= 3; ++t) {
    std::vector<Backend::AdamWShard> hv, dv;
    for (size_t k = 0; k < host.size(); ++k) {
      hv.push_back(host_view(host[k]));
      dv.push_back(devs[k]->view(host[k]));
    }
    cpu.adamw_update(hv.data(), (int)hv.size(), adamw_hyper(t, lrs[t - 1], scales[t - 1]));
    gpu().adamw_update(dv.data(), (int)dv.size(), adamw_hyper(t, lrs[t - 1], scales[t - 1]));
    for (size_t k = 0; k < host.size(); ++k)
      devs[k]->expect_equal(host[k], "adamw_update step " + std::to_string(t) + " shard " + std::to_string(k) +
                                         (host[k].bf16 ? " bf16" : " fp32") + " n " + std::to_string(host[k].n()));
  }
  std::printf("  [ exact    ] adamw_update: 20 shards x 3 steps, FP32 and BF16 moments, model weights FP32/BF16/none\n");
}

TEST_F(CudaOps, SumSquares) {
  for (const int64_t n : {int64_t(0), int64_t(1), int64_t(4095), int64_t(4096), int64_t(4097), int64_t(100003),
                          int64_t(3) << 20}) {
    auto x = randn(n, 3000 + n, 2.0f);
    DeviceBuffer<float> dx(x);
    const double want = cpu.sum_squares(x.data(), n), got = gpu().sum_squares(dx.get(), n);
    // bit-identical by construction; 1e-12 relative is what a different summation order would still have to meet
    EXPECT_EQ(got, want) << "n " << n;
    EXPECT_NEAR(got, want, 1e-12 * want) << "n " << n;
    std::printf("  [ sum_sq   ] n %-9lld rel diff %.3e\n", (long long)n, want > 0 ? std::fabs(got - want) / want : 0.0);
  }
}

TEST_F(CudaOps, Bf16Conversions) {
  std::vector<float> x = randn(100003, 3100);
  std::mt19937_64 g(3101);
  for (size_t i = 0; i < x.size(); i += 3) {  // every bit pattern there is, NaN/Inf/subnormal included
    const uint32_t u = (uint32_t)g();
    std::memcpy(&x[i], &u, 4);
  }
  const uint32_t special[] = {0x3F808000u, 0x3F818000u, 0x7F7FFFFFu, 0x7F800000u, 0xFF800000u,
                              0x7F800001u, 0xFF800001u, 0x00008000u, 0x00018000u, 0x80000000u};
  for (size_t i = 0; i < sizeof(special) / 4; ++i) std::memcpy(&x[i], &special[i], 4);
  std::vector<uint16_t> h_cpu(x.size());
  cpu.to_bf16(x.data(), (int64_t)x.size(), h_cpu.data());
  DeviceBuffer<float> dx(x);
  DeviceBuffer<uint16_t> dh(x.size());
  gpu().to_bf16(dx.get(), (int64_t)x.size(), dh.get());
  EXPECT_EQ(bit_diffs(h_cpu, dh.to_host()), 0) << "to_bf16";
  std::vector<uint16_t> all(65536);
  for (int i = 0; i < 65536; ++i) all[i] = (uint16_t)i;
  std::vector<float> w_cpu(65536);
  cpu.from_bf16(all.data(), 65536, w_cpu.data());
  DeviceBuffer<uint16_t> dall(all);
  DeviceBuffer<float> dw(65536);
  gpu().from_bf16(dall.get(), 65536, dw.get());
  EXPECT_EQ(bit_diffs(w_cpu, dw.to_host()), 0) << "from_bf16";
  std::printf("  [ exact    ] to_bf16 (100003 values), from_bf16 (all 65536 patterns)\n");
}

TEST_F(CudaOps, DequantizeFp8) {
  const int64_t R = 261, C = 389, br = 128, bc = 128;  // partial edge blocks both ways
  std::mt19937_64 g(3200);
  std::vector<uint8_t> codes(R * C);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = i < 256 ? (uint8_t)i : (uint8_t)g();  // every code
  const int64_t nbr = (R + br - 1) / br, nbc = (C + bc - 1) / bc;
  std::vector<float> scale(nbr * nbc);
  for (auto& s : scale) s = std::ldexp(1.0f + (float)(g() % 1000) / 1000.0f, (int)(g() % 60) - 40);
  std::vector<float> want(R * C);
  cpu.dequantize_fp8(codes.data(), scale.data(), R, C, br, bc, want.data());
  DeviceBuffer<uint8_t> dcodes(codes);
  DeviceBuffer<float> dscale(scale), dout(R * C);
  gpu().dequantize_fp8(dcodes.get(), dscale.get(), R, C, br, bc, dout.get());
  const auto got = dout.to_host();
  int64_t diff = 0;
  for (size_t i = 0; i < want.size(); ++i)
    diff += std::isnan(want[i]) ? !std::isnan(got[i]) : std::memcmp(&want[i], &got[i], 4) != 0;
  EXPECT_EQ(diff, 0) << "dequantize_fp8";
  std::printf("  [ exact    ] dequantize_fp8 %lldx%lld in %lldx%lld blocks\n", (long long)R, (long long)C,
              (long long)br, (long long)bc);
}

// make_backend("cuda"): the same ops on host pointers (cuda/host_staged.cu), as the optimizer calls them
TEST_F(CudaOps, HostStagedOptimizerOps) {
  auto staged = make_backend("cuda");
  std::vector<OptShard> a{opt_shard(100003, false, 3300), opt_shard(0, true, 3310), opt_shard(4099, true, 3320)};
  auto b = a;
  std::vector<Backend::AdamWShard> va, vb;
  for (size_t k = 0; k < a.size(); ++k) {
    va.push_back(host_view(a[k]));
    vb.push_back(host_view(b[k]));
  }
  cpu.adamw_update(va.data(), (int)va.size(), adamw_hyper(2, 1e-3, 0.5));
  staged->adamw_update(vb.data(), (int)vb.size(), adamw_hyper(2, 1e-3, 0.5));
  for (size_t k = 0; k < a.size(); ++k) {
    EXPECT_EQ(bit_diffs(a[k].master, b[k].master), 0) << k;
    EXPECT_EQ(bit_diffs(a[k].m, b[k].m) + bit_diffs(a[k].v, b[k].v), 0) << k;
    EXPECT_EQ(bit_diffs(a[k].m16, b[k].m16) + bit_diffs(a[k].v16, b[k].v16), 0) << k;
    EXPECT_EQ(bit_diffs(a[k].weights, b[k].weights), 0) << k << ": the model's weights (seeds 3310, 3320 carry them)";
  }
  EXPECT_EQ(staged->sum_squares(a[0].g.data(), a[0].n()), cpu.sum_squares(a[0].g.data(), a[0].n()));
  std::vector<uint16_t> h1(a[0].n()), h2(a[0].n());
  cpu.to_bf16(a[0].master.data(), a[0].n(), h1.data());
  staged->to_bf16(a[0].master.data(), a[0].n(), h2.data());
  EXPECT_EQ(bit_diffs(h1, h2), 0);
  std::vector<float> w1(h1.size()), w2(h1.size());
  cpu.from_bf16(h1.data(), (int64_t)h1.size(), w1.data());
  staged->from_bf16(h1.data(), (int64_t)h1.size(), w2.data());
  EXPECT_EQ(bit_diffs(w1, w2), 0);
  std::vector<uint8_t> codes(300);
  for (size_t i = 0; i < codes.size(); ++i) {
    codes[i] = (uint8_t)(i * 7 + 1);
    if ((codes[i] & 0x7F) == 0x7F) codes[i] = 0x10;  // no NaN codes: compare bits
  }
  const std::vector<float> scale{0.5f, 2.0f, 0.25f, 8.0f};  // (10 rows / 5, 30 cols / 16) blocks = 2 x 2
  std::vector<float> d1(300), d2(300);
  cpu.dequantize_fp8(codes.data(), scale.data(), 10, 30, 5, 16, d1.data());
  staged->dequantize_fp8(codes.data(), scale.data(), 10, 30, 5, 16, d2.data());
  EXPECT_EQ(bit_diffs(d1, d2), 0);
}

}  // namespace
