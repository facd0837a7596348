// The BF16 tensor-core flash-attention kernels (cuda/flash_attention_bf16.cuh) run on the CPU through the host SIMT
// emulation (simt_emulation.h), against the CPU backend's BF16 attention (the definition in Backend::
// set_bf16_attention, itself checked against a double-precision reference in test_ops_cpu.cpp). This checks the
// kernels' indexing, causal masking, tiling (partial tiles, several key and query blocks, one token), zero padding
// of the head dims, the online softmax and the fragment bookkeeping of the score strips here, before any GPU; what it
// cannot check is listed in simt_emulation.h (tests/gpu/test_ops_cuda.cpp runs the same comparison on the device).
#include "simt_emulation.h"  // first: it defines what the kernels' header expects from CUDA

#include "../../cuda/flash_attention_bf16.cuh"

#include <gtest/gtest.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "ops/cpu/cpu_backend.h"
#include "test_data.h"

using namespace dsv3;
using dsv3::test::nmse;
using dsv3::test::randn;

namespace {

struct Case {
  int B, S, H, dn, dr, dv;
  int64_t ldkpe;
};

std::string tag(const Case& c) {
  char s[96];
  std::snprintf(s, sizeof s, "B%d S%d H%d d%d/%d/%d", c.B, c.S, c.H, c.dn, c.dr, c.dv);
  return s;
}

// The NMSE bound: both sides round the same quantities to BF16; FP32 summation-order differences move a rounding of
// P or dS by one BF16 ulp (2^-8 relative) only where the two straddle a rounding boundary (~1e-4 of the elements):
// NMSE ~1e-9 at most (test_ops_cpu.cpp measures 1e-10 for the CPU against a double-precision reference).
constexpr double kTol = 1e-8;

// the kernels against the CPU definition on one shape: o, lse, dq, dkv, dkpe
void check_case(const Case& c, uint64_t seed) {
  const int dqk = c.dn + c.dr, T = c.B * c.S;
  const float scale = 1.0f / std::sqrt((float)dqk);
  const auto q = randn((size_t)T * c.H * dqk, ++seed), kv = randn((size_t)T * c.H * (c.dn + c.dv), ++seed),
             kpe = randn((size_t)T * c.ldkpe, ++seed), dout = randn((size_t)T * c.H * c.dv, ++seed);
  // CPU: forward, then backward from its o and lse (what both sides get, as in the GPU test)
  CpuBackend cpu(1);
  cpu.set_bf16_attention(true);
  std::vector<float> o((size_t)T * c.H * c.dv), lse((size_t)c.B * c.H * c.S);
  cpu.mla_flash_attention_forward(q.data(), kv.data(), kpe.data(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv, scale,
                                  o.data(), lse.data());
  const auto dkpe0 = randn(kpe.size(), ++seed);
  auto dq = randn(q.size(), ++seed, 100.0f), dkv = randn(kv.size(), ++seed, 100.0f), dkpe = dkpe0;
  cpu.mla_flash_attention_backward(q.data(), kv.data(), kpe.data(), c.ldkpe, o.data(), lse.data(), dout.data(),
                                   c.B, c.S, c.H, c.dn, c.dr, c.dv, scale, dq.data(), dkv.data(), dkpe.data());

  // the kernels, as the launchers of cuda/flash_attention_bf16.cu and the op in flash_attention.cu run them
  const cuda::FlashShape x{q.data(), kv.data(), kpe.data(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv, scale};
  const SimtDim3 grid{(unsigned)((c.S + cuda::kRows - 1) / cuda::kRows), (unsigned)c.H, (unsigned)c.B};
  std::vector<float> o_k(o.size(), 7.0f), lse_k(lse.size(), 7.0f);
  simt::launch(grid, cuda::kThreads, cuda::fwd_smem(dqk, c.dv),
               [&] { cuda::flash_bf16_fwd_kernel(x, o_k.data(), lse_k.data()); });
  // D = rowsum(dout * o) (B,H,S): flash_attention.cu's FP32 row-dot kernel, here a float loop
  std::vector<float> D(lse.size());
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < c.H; ++h) {
      float acc = 0.0f;
      for (int k = 0; k < c.dv; ++k) acc += dout[((size_t)t * c.H + h) * c.dv + k] * o[((size_t)t * c.H + h) * c.dv + k];
      D[((size_t)(t / c.S) * c.H + h) * c.S + t % c.S] = acc;
    }
  auto dq_k = randn(q.size(), ++seed, 100.0f), dkv_k = randn(kv.size(), ++seed, 100.0f), dkpe_k = dkpe0;
  std::vector<float> dkpe_h((size_t)c.B * c.H * c.S * c.dr, 7.0f);
  simt::launch(grid, cuda::kThreads, cuda::dkv_smem(dqk, c.dv), [&] {
    cuda::flash_bf16_dkv_kernel(x, lse.data(), D.data(), dout.data(), dkv_k.data(), dkpe_h.data());
  });
  simt::launch(grid, cuda::kThreads, cuda::dq_smem(dqk, c.dv),
               [&] { cuda::flash_bf16_dq_kernel(x, lse.data(), D.data(), dout.data(), dq_k.data()); });
  for (int t = 0; t < T; ++t)  // the heads' dk_pe summed in head order (flash_attention.cu's dkpe kernel)
    for (int k = 0; k < c.dr; ++k) {
      float acc = 0.0f;
      for (int h = 0; h < c.H; ++h) acc += dkpe_h[(((size_t)(t / c.S) * c.H + h) * c.S + t % c.S) * c.dr + k];
      dkpe_k[(size_t)t * c.ldkpe + k] += acc;
    }

  struct Field {
    const char* name;
    const std::vector<float>& ref;
    const std::vector<float>& got;
  };
  const Field fields[] = {
      {"o", o, o_k}, {"lse", lse, lse_k}, {"dq", dq, dq_k}, {"dkv", dkv, dkv_k}, {"dkpe", dkpe, dkpe_k}};
  for (const Field& f : fields) {
    const double e = nmse(f.ref, f.got);
    std::printf("  [ nmse     ] %-4s %-24s %.2e\n", f.name, tag(c).c_str(), e);
    EXPECT_LE(e, kTol) << f.name << " " << tag(c);
  }
}

}  // namespace

// odd head dims (padding to 16) with a partial tile, whole blocks only, one token per sequence; k_pe rows inside
// wider rows (ldkpe > dr)
TEST(FlashBf16Simt, SmallShapes) {
  const Case cases[] = {{2, 37, 2, 5, 4, 6, 7}, {2, 128, 3, 8, 8, 16, 8}, {3, 1, 1, 3, 2, 5, 2}};
  uint64_t seed = 900;
  for (const Case& c : cases) check_case(c, seed += 100);
}

// S across 3 key/query blocks with a partial one: every barrier of the block loops at work (what ThreadSanitizer runs)
TEST(FlashBf16Simt, SeveralBlocks) { check_case({1, 150, 2, 16, 8, 16, 24}, 1900); }

// DeepSeek-V3's head dims 128/64/128 with k_pe inside kv_a's 576-wide output row (101-169 KiB of shared memory)
TEST(FlashBf16Simt, DeepSeekV3HeadDims) { check_case({1, 70, 1, 128, 64, 128, 576}, 2000); }
