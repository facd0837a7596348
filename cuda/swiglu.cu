// defines: CudaBackend::swiglu_forward / swiglu_backward — elementwise, grid-stride.
#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"

namespace dsv3 {

namespace {
__global__ void swiglu_fwd_kernel(const float* __restrict__ gate, const float* __restrict__ up, int64_t rows,
                                  int64_t cols, int64_t ld_in, float* __restrict__ out) {
  const int64_t n = rows * cols;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = t / cols, i = t % cols;
    const float g = gate[r * ld_in + i];
    out[t] = g / (1.0f + expf(-g)) * up[r * ld_in + i];
  }
}

__global__ void swiglu_bwd_kernel(const float* __restrict__ gate, const float* __restrict__ up,
                                  const float* __restrict__ dout, int64_t n, float* __restrict__ dgate,
                                  float* __restrict__ dup) {
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (int64_t)gridDim.x * blockDim.x) {
    const float g = gate[t], sg = 1.0f / (1.0f + expf(-g));
    dup[t] = dout[t] * g * sg;
    dgate[t] = dout[t] * up[t] * sg * (1.0f + g * (1.0f - sg));  // silu'(g) = s (1 + g (1 - s))
  }
}
}  // namespace

void CudaBackend::swiglu_forward(const float* gate, const float* up, int64_t rows, int64_t cols, int64_t ld_in,
                                 float* out) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  swiglu_fwd_kernel<<<cuda::grid_for(n), cuda::kBlock, 0, stream_>>>(gate, up, rows, cols, ld_in, out);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::swiglu_backward(const float* gate, const float* up, const float* dout, int64_t rows, int64_t cols,
                                  float* dgate, float* dup) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  swiglu_bwd_kernel<<<cuda::grid_for(n), cuda::kBlock, 0, stream_>>>(gate, up, dout, n, dgate, dup);
  DSV3_CUDA_LAUNCH_CHECK();
}

}  // namespace dsv3
