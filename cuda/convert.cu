// defines: CudaBackend::to_bf16 / from_bf16 / dequantize_fp8 — precision conversions, elementwise, grid-stride.
// The per-element arithmetic is core/numerics.h, the same functions the host code uses (io/safetensors.cpp,
// io/fp8.cpp): integer operations on the bits, plus one FP32 multiply for the FP8 block scale, so every result is
// bit-identical to the CPU backend (a NaN code times its scale is a NaN on both sides; its payload may differ).
#include <cstdint>

#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"
#include "core/numerics.h"

namespace dsv3 {

namespace {
__global__ void to_bf16_kernel(const float* __restrict__ x, int64_t n, uint16_t* __restrict__ out) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = f32_to_bf16_bits(x[i]);
}

__global__ void from_bf16_kernel(const uint16_t* __restrict__ x, int64_t n, float* __restrict__ out) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = bf16_bits_to_f32(x[i]);
}

// out[r, c] = decode(codes[r, c]) * scale_inv[r / br, c / bc]; nbc = ceil(cols / bc) scale columns
__global__ void dequantize_fp8_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scale_inv,
                                      int64_t rows, int64_t cols, int64_t br, int64_t bc, int64_t nbc,
                                      float* __restrict__ out) {
  const int64_t n = rows * cols;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = t / cols, c = t % cols;
    out[t] = fp8_e4m3_bits_to_f32(codes[t]) * scale_inv[(r / br) * nbc + c / bc];
  }
}
}  // namespace

void CudaBackend::to_bf16(const float* x, int64_t n, uint16_t* out) {
  if (n <= 0) return;
  to_bf16_kernel<<<cuda::grid_for(n), cuda::kBlock, 0, stream_>>>(x, n, out);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::from_bf16(const uint16_t* x, int64_t n, float* out) {
  if (n <= 0) return;
  from_bf16_kernel<<<cuda::grid_for(n), cuda::kBlock, 0, stream_>>>(x, n, out);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::dequantize_fp8(const uint8_t* codes, const float* scale_inv, int64_t rows, int64_t cols,
                                 int64_t block_rows, int64_t block_cols, float* out) {
  DSV3_CHECK(rows >= 0 && cols >= 0 && block_rows > 0 && block_cols > 0 && (cols == 0 || rows <= INT64_MAX / cols),
             "dequantize_fp8: invalid sizes rows " << rows << " cols " << cols << " block " << block_rows << "x"
                                                   << block_cols);
  const int64_t numel = rows * cols, nbc = cols / block_cols + (cols % block_cols != 0);  // as io/fp8_num_blocks
  if (numel == 0) return;
  dequantize_fp8_kernel<<<cuda::grid_for(numel), cuda::kBlock, 0, stream_>>>(codes, scale_inv, rows, cols, block_rows,
                                                                             block_cols, nbc, out);
  DSV3_CUDA_LAUNCH_CHECK();
}

}  // namespace dsv3
