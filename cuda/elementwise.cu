// defines: CudaBackend::add / copy_rows / fill — the elementwise ops and row copies the model runs between the
// heavier ops (residual adds, gradient sums, the MTP's concatenation and split, stage hand-offs), so that its tensors
// stay in device memory (core/memory.h).
#include <cuda_runtime.h>

#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"

namespace dsv3 {

namespace {

__global__ void add_kernel(const float* __restrict__ x, int64_t n, float* __restrict__ y) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] += x[i];
}

__global__ void fill_kernel(float* __restrict__ x, int64_t n, float v) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    x[i] = v;
}

}  // namespace

void CudaBackend::add(const float* x, int64_t n, float* y) {
  if (n <= 0) return;
  add_kernel<<<cuda::grid_for(n), cuda::kBlock, 0, stream_>>>(x, n, y);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::copy_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  if (rows <= 0 || cols <= 0) return;
  DSV3_CHECK(lds >= cols && ldd >= cols, "copy_rows: row strides " << lds << "/" << ldd << " < columns " << cols);
  // a strided copy by the copy engine: no kernel needed, any pitch
  DSV3_CUDA_CHECK(cudaMemcpy2DAsync(dst, (size_t)ldd * sizeof(float), src, (size_t)lds * sizeof(float),
                                    (size_t)cols * sizeof(float), (size_t)rows, cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::fill(float* x, int64_t n, float v) {
  if (n <= 0) return;
  fill_kernel<<<cuda::grid_for(n), cuda::kBlock, 0, stream_>>>(x, n, v);
  DSV3_CUDA_LAUNCH_CHECK();
}

}  // namespace dsv3
