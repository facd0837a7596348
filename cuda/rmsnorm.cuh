// defines: the kernels of rmsnorm.cu (RMSNorm forward, fused add + forward, backward). Device code only, included by
// rmsnorm.cu and, with DSV3_SIMT_EMULATION defined, by tests/unit/test_kernels_simt.cpp, which runs them on the CPU
// against the CPU backend.
#pragma once
#include <cstdint>

#include "kernel_utils.cuh"

namespace dsv3 {

namespace {
using cuda::kBlock;

__global__ void rmsnorm_fwd_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ w, float eps,
                                   int64_t dim, float* __restrict__ y, float* __restrict__ rstd) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * ldx;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss += (double)xr[i] * xr[i];
  ss = cuda::block_sum(ss);
  const float rs = (float)(1.0 / sqrt(ss / dim + eps));
  if (rstd && threadIdx.x == 0) rstd[r] = rs;
  float* yr = y + r * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * rs * w[i];
}

// x += r, then the forward above on the updated row: each thread reads back only the elements it wrote (the same
// i in both loops), so the row needs no barrier between them; the arithmetic of add_kernel + rmsnorm_fwd_kernel
__global__ void add_rmsnorm_fwd_kernel(const float* __restrict__ res, float* __restrict__ x,
                                       const float* __restrict__ w, float eps, int64_t dim, float* __restrict__ y,
                                       float* __restrict__ rstd) {
  const int64_t r = blockIdx.x;
  float* xr = x + r * dim;
  const float* rr = res + r * dim;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = xr[i] + rr[i];
    xr[i] = v;
    ss += (double)v * v;
  }
  ss = cuda::block_sum(ss);
  const float rs = (float)(1.0 / sqrt(ss / dim + eps));
  if (rstd && threadIdx.x == 0) rstd[r] = rs;
  float* yr = y + r * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * rs * w[i];
}

// dx += r (dy w) - x r^3 (sum_i dy_i w_i x_i) / dim
__global__ void rmsnorm_bwd_dx_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ w,
                                      const float* __restrict__ rstd, const float* __restrict__ dy, int64_t dim,
                                      float* __restrict__ dx, int64_t lddx) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * ldx;
  const float* g = dy + r * dim;
  const double rs = rstd[r];
  double dot = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dot += (double)g[i] * w[i] * xr[i];
  dot = cuda::block_sum(dot);
  const double c = dot * rs * rs * rs / dim;
  float* d = dx + r * lddx;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) d[i] += (float)(rs * g[i] * w[i] - xr[i] * c);
}

// part(chunk, i) = sum over the chunk's rows of dy x rstd (double); grid (column tiles, chunks)
__global__ void rmsnorm_bwd_dw_partial_kernel(const float* __restrict__ x, int64_t ldx,
                                              const float* __restrict__ rstd, const float* __restrict__ dy,
                                              int64_t rows, int64_t dim, int64_t rows_per_chunk,
                                              double* __restrict__ part) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= dim) return;
  const int64_t r0 = (int64_t)blockIdx.y * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
  double acc = 0;
  for (int64_t r = r0; r < r1; ++r) acc += (double)dy[r * dim + i] * x[r * ldx + i] * (double)rstd[r];
  part[(int64_t)blockIdx.y * dim + i] = acc;
}

__global__ void rmsnorm_bwd_dw_final_kernel(const double* __restrict__ part, int64_t n_chunks, int64_t dim,
                                            float* __restrict__ dw) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= dim) return;
  double s = 0;
  for (int64_t c = 0; c < n_chunks; ++c) s += part[c * dim + i];
  dw[i] += (float)s;
}
}  // namespace

}  // namespace dsv3
