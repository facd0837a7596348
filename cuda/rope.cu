// defines: CudaBackend::rope_forward / rope_backward — in-place interleaved RoPE, one thread per (row, head, pair).
// Tables cos/sin are (max_pos, rope_dim/2); pos (rows) int64 on the device.
#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"

namespace dsv3 {

namespace {
template <bool kInverse>
__global__ void rope_kernel(float* __restrict__ x, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride,
                            int64_t half, const int64_t* __restrict__ pos, const float* __restrict__ cos_t,
                            const float* __restrict__ sin_t) {
  const int64_t total = rows * n_heads * half;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = t % half, rh = t / half, h = rh % n_heads, r = rh / n_heads;
    const int64_t p = pos[r];
    const float c = cos_t[p * half + i], s = sin_t[p * half + i];
    float* v = x + r * ldx + h * head_stride + 2 * i;
    const float a = v[0], b = v[1];
    if (kInverse) {  // R^T: rotate by the negative angle
      v[0] = a * c + b * s;
      v[1] = -a * s + b * c;
    } else {
      v[0] = a * c - b * s;
      v[1] = a * s + b * c;
    }
  }
}
}  // namespace

void CudaBackend::rope_forward(float* x, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride,
                               int64_t rope_dim, const int64_t* pos, const float* cos, const float* sin) {
  const int64_t half = rope_dim / 2, total = rows * n_heads * half;
  if (total == 0) return;
  rope_kernel<false><<<cuda::grid_for(total), cuda::kBlock, 0, stream_>>>(x, rows, ldx, n_heads, head_stride, half,
                                                                          pos, cos, sin);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::rope_backward(float* dx, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride,
                                int64_t rope_dim, const int64_t* pos, const float* cos, const float* sin) {
  const int64_t half = rope_dim / 2, total = rows * n_heads * half;
  if (total == 0) return;
  rope_kernel<true><<<cuda::grid_for(total), cuda::kBlock, 0, stream_>>>(dx, rows, ldx, n_heads, head_stride, half,
                                                                         pos, cos, sin);
  DSV3_CUDA_LAUNCH_CHECK();
}

}  // namespace dsv3
