// defines: CudaBackend::rmsnorm_forward / add_rmsnorm_forward / rmsnorm_backward.
// Forward: one block per row, sum of squares in double (as the CPU op). Backward: dx by one block per row; dw
// deterministically (no float atomics): per-chunk-of-rows partial sums in double, then one pass over the chunks.
#include <algorithm>

#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"
#include "rmsnorm.cuh"

namespace dsv3 {

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
