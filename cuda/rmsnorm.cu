// defines: CudaBackend::rmsnorm_forward / add_rmsnorm_forward / rmsnorm_backward.
// Forward: one block per row, sum of squares in double (as the CPU op). Backward: dx by one block per row; dw
// deterministically (no float atomics): per-chunk-of-rows partial sums in double, then one pass over the chunks.
#include <algorithm>

#include "cuda_backend.cuh"
#include "cuda_check.cuh"
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

void CudaBackend::rmsnorm_forward(const float* x, int64_t ldx, const float* w, float eps, int64_t rows, int64_t dim,
                                  float* y, float* rstd) {
  if (rows == 0) return;
  DSV3_CHECK(rows <= INT32_MAX, "rmsnorm_forward: " << rows << " rows");
  rmsnorm_fwd_kernel<<<(unsigned)rows, kBlock, 0, stream_>>>(x, ldx, w, eps, dim, y, rstd);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::add_rmsnorm_forward(const float* r, float* x, const float* w, float eps, int64_t rows, int64_t dim,
                                      float* y, float* rstd) {
  if (rows == 0) return;
  DSV3_CHECK(rows <= INT32_MAX, "add_rmsnorm_forward: " << rows << " rows");
  add_rmsnorm_fwd_kernel<<<(unsigned)rows, kBlock, 0, stream_>>>(r, x, w, eps, dim, y, rstd);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::rmsnorm_backward(const float* x, int64_t ldx, const float* w, const float* rstd, const float* dy,
                                   int64_t rows, int64_t dim, float* dx, int64_t lddx, float* dw) {
  if (rows == 0 || dim == 0) return;
  DSV3_CHECK(rows <= INT32_MAX, "rmsnorm_backward: " << rows << " rows");
  rmsnorm_bwd_dx_kernel<<<(unsigned)rows, kBlock, 0, stream_>>>(x, ldx, w, rstd, dy, dim, dx, lddx);
  DSV3_CUDA_LAUNCH_CHECK();
  // chunks of rows: enough column-tile x chunk blocks to fill the device, few enough that the final pass is short
  const int64_t col_tiles = (dim + kBlock - 1) / kBlock;
  const int64_t want_chunks = std::max<int64_t>(1, 1024 / col_tiles);
  const int64_t n_chunks0 = std::min<int64_t>({rows, want_chunks, 4096});
  const int64_t rows_per_chunk = (rows + n_chunks0 - 1) / n_chunks0;
  const int64_t n_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  auto* part = static_cast<double*>(scratch(sizeof(double) * n_chunks * dim));
  rmsnorm_bwd_dw_partial_kernel<<<dim3((unsigned)col_tiles, (unsigned)n_chunks), kBlock, 0, stream_>>>(
      x, ldx, rstd, dy, rows, dim, rows_per_chunk, part);
  DSV3_CUDA_LAUNCH_CHECK();
  rmsnorm_bwd_dw_final_kernel<<<(unsigned)col_tiles, kBlock, 0, stream_>>>(part, n_chunks, dim, dw);
  DSV3_CUDA_LAUNCH_CHECK();
}

}  // namespace dsv3
