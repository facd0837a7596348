// The FP32 flash-attention kernels (cuda/flash_attention_fp32.cuh) run on the CPU through the host SIMT emulation
// (simt_emulation.h) against the CPU backend's flash ops, with the launch configurations of cuda/flash_attention.cu
// (the grid-stride row-dot and k_pe-sum kernels on 2 blocks: their results do not depend on the grid). On the H200
// (run 7) these kernels matched the CPU to NMSE 2e-13 and compute-sanitizer's memcheck found nothing; what the
// emulation adds, in CI, is the same comparison on every commit and, under ThreadSanitizer (ctest
// simt_flash_bf16_thread), a race check of their shared-memory protocol that never ran on the GPU (racecheck).
#include "simt_emulation.h"  // first: it defines what the kernels' header expects from CUDA

#include "../../cuda/flash_attention_fp32.cuh"

#include <gtest/gtest.h>

#include <cmath>
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

// The GPU test's tolerance for these kernels (tests/gpu/test_ops_cuda.cpp, kTolGemm): FP32 summation order only.
constexpr double kTol = 1e-8;

struct Case {
  int B, S, H, dn, dr, dv;
  int64_t ldkpe;
};

// the kernels against the CPU ops on one shape: o, lse, dq, dkv, dkpe
void check_case(const Case& c, uint64_t seed) {
  const int dqk = c.dn + c.dr, T = c.B * c.S;
  const float scale = 1.0f / std::sqrt((float)dqk);
  const auto q = randn((size_t)T * c.H * dqk, ++seed), kv = randn((size_t)T * c.H * (c.dn + c.dv), ++seed),
             kpe = randn((size_t)T * c.ldkpe, ++seed), dout = randn((size_t)T * c.H * c.dv, ++seed);
  CpuBackend cpu(1);
  std::vector<float> o((size_t)T * c.H * c.dv), lse((size_t)c.B * c.H * c.S);
  cpu.mla_flash_attention_forward(q.data(), kv.data(), kpe.data(), c.ldkpe, c.B, c.S, c.H, c.dn, c.dr, c.dv, scale,
                                  o.data(), lse.data());
  const auto dkpe0 = randn(kpe.size(), ++seed);
  auto dq = randn(q.size(), ++seed, 100.0f), dkv = randn(kv.size(), ++seed, 100.0f), dkpe = dkpe0;
  cpu.mla_flash_attention_backward(q.data(), kv.data(), kpe.data(), c.ldkpe, o.data(), lse.data(), dout.data(),
                                   c.B, c.S, c.H, c.dn, c.dr, c.dv, scale, dq.data(), dkv.data(), dkpe.data());

  // forward: grid (ceil(S / kBM), H, B), kThreads, fwd_smem_bytes
  std::vector<float> o_k(o.size(), 7.0f), lse_k(lse.size(), 7.0f);
  const SimtDim3 grid_q{(unsigned)((c.S + kBM - 1) / kBM), (unsigned)c.H, (unsigned)c.B};
  const SimtDim3 grid_k{(unsigned)((c.S + kBN - 1) / kBN), (unsigned)c.H, (unsigned)c.B};
  simt::launch(grid_q, kThreads, fwd_smem_bytes(dqk, c.dv), [&] {
    flash_fwd_kernel(q.data(), kv.data(), kpe.data(), c.ldkpe, c.S, c.H, c.dn, c.dr, c.dv, scale, o_k.data(),
                     lse_k.data());
  });
  // backward from the CPU's o and lse (what the GPU test gives both sides): D, dk/dv, dq, then the heads' dk_pe sum
  std::vector<float> D(lse.size(), 7.0f), dkpe_h((size_t)c.B * c.H * c.S * c.dr, 7.0f);
  auto dq_k = randn(q.size(), ++seed, 100.0f), dkv_k = randn(kv.size(), ++seed, 100.0f), dkpe_k = dkpe0;
  simt::launch({2, 1, 1}, cuda::kBlock, 0, [&] {
    flash_bwd_rowdot_kernel(o.data(), dout.data(), T, c.S, c.H, c.dv, D.data());
  });
  simt::launch(grid_k, kThreads, dkv_smem_bytes(dqk, c.dv), [&] {
    flash_bwd_dkv_kernel(q.data(), kv.data(), kpe.data(), c.ldkpe, lse.data(), D.data(), dout.data(), c.S, c.H,
                         c.dn, c.dr, c.dv, scale, dkv_k.data(), dkpe_h.data());
  });
  simt::launch(grid_q, kThreads, dq_smem_bytes(dqk, c.dv), [&] {
    flash_bwd_dq_kernel(q.data(), kv.data(), kpe.data(), c.ldkpe, lse.data(), D.data(), dout.data(), c.S, c.H,
                        c.dn, c.dr, c.dv, scale, dq_k.data());
  });
  simt::launch({2, 1, 1}, cuda::kBlock, 0, [&] {
    flash_bwd_dkpe_kernel(dkpe_h.data(), T, c.S, c.H, c.dr, dkpe_k.data(), c.ldkpe);
  });

  char tag[64];
  std::snprintf(tag, sizeof tag, "B%d S%d H%d d%d/%d/%d", c.B, c.S, c.H, c.dn, c.dr, c.dv);
  const std::pair<const char*, std::pair<const std::vector<float>*, const std::vector<float>*>> fields[] = {
      {"o", {&o, &o_k}}, {"lse", {&lse, &lse_k}}, {"dq", {&dq, &dq_k}}, {"dkv", {&dkv, &dkv_k}},
      {"dkpe", {&dkpe, &dkpe_k}}};
  for (const auto& [name, v] : fields) {
    const double e = nmse(*v.first, *v.second);
    std::printf("  [ nmse     ] %-4s %-24s %.2e\n", name, tag, e);
    EXPECT_LE(e, kTol) << name << " " << tag;
  }
}

}  // namespace

// odd head dims, S = 45 across two 32-row / 32-key tiles with a partial one, B, H > 1
TEST(FlashFp32Simt, SmallShapes) { check_case({2, 45, 2, 8, 4, 12, 28}, 3000); }

// S = 70 across three tiles: every barrier of the block loops at work (what ThreadSanitizer runs)
TEST(FlashFp32Simt, SeveralBlocks) { check_case({1, 70, 1, 16, 8, 16, 24}, 3100); }

// DeepSeek-V3's head dims with k_pe inside kv_a's 576-wide row (86-130 KiB of shared memory)
TEST(FlashFp32Simt, DeepSeekV3HeadDims) { check_case({1, 70, 1, 128, 64, 128, 576}, 3200); }
