// CUDA kernels not yet run on a GPU, run on the CPU through the host SIMT emulation (simt_emulation.h) against the
// CPU backend, with the launch configurations of their .cu files: the residual add fused into the RMSNorm
// (cuda/rmsnorm.cuh) and the vocabulary-parallel embedding and cross-entropy slices (cuda/vocab_slices.cuh). Also
// under AddressSanitizer and ThreadSanitizer (ctest simt_flash_address / simt_flash_thread).
#include "simt_emulation.h"  // first: it defines what the kernels' headers expect from CUDA

#include "../../cuda/rmsnorm.cuh"
#include "../../cuda/vocab_slices.cuh"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "ops/cpu/cpu_backend.h"
#include "test_data.h"

using namespace dsv3;
using dsv3::test::nmse;
using dsv3::test::randn;

namespace {
unsigned blocks(int64_t n, int per) { return (unsigned)((n + per - 1) / per); }
}  // namespace

// x += r then the norm: the updated x bit for bit the CPU's (one float add each), y and rstd bit for bit what
// rmsnorm_fwd_kernel gives on that x (the same arithmetic in one kernel), and y within a double-sum reordering of the
// CPU's (the block's tree against the CPU's sequential sum of squares)
TEST(KernelsSimt, AddRmsNormForward) {
  const int64_t rows = 9, dim = 1031;  // a row longer than the block: the strided loops wrap
  const auto x = randn(rows * dim, 11), res = randn(rows * dim, 12), w = randn(dim, 13);
  CpuBackend cpu(1);
  std::vector<float> xs = x, y(rows * dim), rstd(rows);
  cpu.add_rmsnorm_forward(res.data(), xs.data(), w.data(), 1e-6f, rows, dim, y.data(), rstd.data());
  std::vector<float> xk = x, yk(rows * dim, 7.0f), rk(rows, 7.0f), x2 = xs, y2(rows * dim), r2(rows);
  simt::launch({(unsigned)rows, 1, 1}, cuda::kBlock, 0,
               [&] { add_rmsnorm_fwd_kernel(res.data(), xk.data(), w.data(), 1e-6f, dim, yk.data(), rk.data()); });
  simt::launch({(unsigned)rows, 1, 1}, cuda::kBlock, 0,
               [&] { rmsnorm_fwd_kernel(x2.data(), dim, w.data(), 1e-6f, dim, y2.data(), r2.data()); });
  EXPECT_EQ(xk, xs);
  EXPECT_EQ(yk, y2);
  EXPECT_EQ(rk, r2);
  EXPECT_LE(nmse(y, yk), 1e-12);
  EXPECT_LE(nmse(rstd, rk), 1e-12);
}

// this rank's vocabulary rows [v0, v0 + vl) of 50: ids and targets inside and outside it, targets of -1 (ignored)
TEST(KernelsSimt, VocabularySlices) {
  const int64_t n = 13, dim = 70, V = 50, v0 = 20, vl = 17;
  std::vector<int64_t> ids(n), targets(n);
  for (int64_t i = 0; i < n; ++i) {
    ids[i] = (i * 7 + 3) % V;
    targets[i] = i % 5 == 4 ? -1 : (i * 11 + 5) % V;
  }
  ids[1] = ids[6] = v0 + 3;  // a repeated id inside the slice: its gradient rows add in token order
  CpuBackend cpu(1);
  const auto table = randn(vl * dim, 21), dy = randn(n * dim, 22), dtable0 = randn(vl * dim, 23);
  std::vector<float> out(n * dim), out_k(n * dim, 7.0f), dtable = dtable0, dtable_k = dtable0;
  cpu.embedding_forward_slice(ids.data(), n, table.data(), v0, vl, dim, out.data());
  cpu.embedding_backward_slice(ids.data(), n, dy.data(), v0, vl, dim, dtable.data());
  simt::launch({2, 1, 1}, cuda::kBlock, 0,  // grid-stride: 2 blocks for grid_for(n * dim)
               [&] { emb_slice_fwd_kernel(ids.data(), n, table.data(), v0, vl, dim, out_k.data()); });
  simt::launch({blocks(dim, 128), 1, 1}, 128, 0,
               [&] { emb_slice_bwd_kernel(ids.data(), n, dy.data(), v0, vl, dim, dtable_k.data()); });
  EXPECT_EQ(out_k, out);
  EXPECT_EQ(dtable_k, dtable);

  auto logits = randn(n * vl, 24, 3.0f);
  std::vector<double> lse(n, -1.0), tgt(n, -7.0), lse_k(n, -1.0), tgt_k(n, -7.0);
  cpu.cross_entropy_slice_forward(logits.data(), n, vl, targets.data(), v0, lse.data(), tgt.data());
  simt::launch({(unsigned)n, 1, 1}, cuda::kBlock, 0, [&] {
    ce_slice_fwd_kernel(logits.data(), vl, targets.data(), v0, lse_k.data(), tgt_k.data());
  });
  for (int64_t r = 0; r < n; ++r) {
    EXPECT_NEAR(lse_k[r], lse[r], 1e-12 * std::fabs(lse[r])) << r;
    EXPECT_EQ(tgt_k[r], tgt[r]) << r;  // the target's logit, or untouched (-7) outside the slice
  }
  std::vector<float> lse_f(n), dl(n * vl), dl_k(n * vl, 7.0f);
  for (int64_t r = 0; r < n; ++r) lse_f[r] = (float)lse[r] + 0.25f;  // any full-vocabulary lse (from all the slices)
  cpu.cross_entropy_slice_backward(logits.data(), lse_f.data(), n, vl, targets.data(), v0, 0.125f, dl.data());
  simt::launch({(unsigned)n, 1, 1}, cuda::kBlock, 0, [&] {
    ce_slice_bwd_kernel(logits.data(), lse_f.data(), vl, targets.data(), v0, 0.125f, dl_k.data());
  });
  EXPECT_LE(nmse(dl, dl_k), 1e-12);
}
