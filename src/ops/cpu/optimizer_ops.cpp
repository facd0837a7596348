// defines: CpuBackend::adamw_update, sum_squares, to_bf16, from_bf16, dequantize_fp8 — the optimizer's arithmetic
// and the precision conversions on the CPU (OpenMP loops).
// Compiled with -ffp-contract=off (CMakeLists.txt): the only fused multiply-adds are the ones adamw_element writes
// out, which keeps this file bit-identical to the CUDA kernels (cuda/optimizer.cu, cuda/convert.cu).
#include <algorithm>
#include <vector>

#include "core/error.h"
#include "core/numerics.h"
#include "io/fp8.h"
#include "ops/cpu/cpu_backend.h"
#include "optim/adamw_math.h"

namespace dsv3 {

void CpuBackend::adamw_update(const AdamWShard* shards, int count, const AdamWHyper& h) {
  check_adamw_shards(shards, count);
  const AdamWCoeffs c = adamw_coeffs(h);
  for (int s = 0; s < count; ++s) {
    const AdamWShard& sh = shards[s];
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < sh.n; ++i) adamw_shard_element(c, sh, i);
  }
}

double CpuBackend::sum_squares(const float* x, int64_t n) {
  // fixed-size chunks summed in order: the same bits on every run and any thread count (and on the CUDA backend)
  constexpr int64_t kChunk = 4096;
  const int64_t nc = (n + kChunk - 1) / kChunk;
  std::vector<double> part(nc, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nc; ++c) {
    double s = 0;
    for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) s += (double)x[i] * x[i];  // exact square
    part[c] = s;
  }
  double ss = 0;
  for (double v : part) ss += v;
  return ss;
}

void CpuBackend::to_bf16(const float* x, int64_t n, uint16_t* out) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16_bits(x[i]);
}

void CpuBackend::from_bf16(const uint16_t* x, int64_t n, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_bits_to_f32(x[i]);
}

void CpuBackend::dequantize_fp8(const uint8_t* codes, const float* scale_inv, int64_t rows, int64_t cols,
                                int64_t block_rows, int64_t block_cols, float* out) {
  DSV3_CHECK(block_rows > 0 && block_rows <= INT32_MAX && block_cols > 0 && block_cols <= INT32_MAX,
             "dequantize_fp8: block " << block_rows << "x" << block_cols);
  dsv3::fp8_dequantize(codes, scale_inv, rows, cols, (int)block_rows, (int)block_cols, out);
}

}  // namespace dsv3
