// defines: CudaBackend::gather_rows / combine_rows / combine_rows_backward — MoE dispatch and combine as row gathers
// fused with the combine weights (the "MoE permute fusion"): one block per output row, threads over the D columns.
// No atomics: combine_rows sums a token's K rows in slot order and the dot products of combine_rows_backward reduce
// over a fixed tree in double, so results are the same run to run and within a few ulps of the CPU op.
#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"

namespace dsv3 {

namespace {
// grid-stride over output rows (gridDim.x <= 2^20 blocks), threads over columns
__global__ void gather_rows_kernel(const float* __restrict__ x, int64_t ldx, const int32_t* __restrict__ src,
                                   int64_t rows, int64_t D, float* __restrict__ out) {
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const float* xr = x + (int64_t)src[i] * ldx;
    float* o = out + i * D;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) o[j] = xr[j];
  }
}

__global__ void combine_rows_kernel(const float* __restrict__ y, const int32_t* __restrict__ pos,
                                    const float* __restrict__ weight, int64_t T, int64_t K, int64_t D,
                                    float* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    float* o = out + t * D;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
      float acc = o[j];
      // slot order, as the CPU op. The CPU oracle's `o[i] += wk * yr[i]` is compiled to a fused multiply-add (GCC's
      // default -ffp-contract=fast with -march=x86-64-v3: vfmadd in both its vector and scalar loops), so one
      // correctly rounded fmaf per slot here; the former mul-then-add differed from the CPU by a few ulps per slot.
      for (int64_t k = 0; k < K; ++k) {
        const float v = y[(int64_t)pos[t * K + k] * D + j];
        acc = weight ? __fmaf_rn(weight[t * K + k], v, acc) : __fadd_rn(acc, v);
      }
      o[j] = acc;
    }
  }
}

__global__ void combine_rows_bwd_kernel(const float* __restrict__ dout, const float* __restrict__ y,
                                        const int32_t* __restrict__ pos, const float* __restrict__ weight, int64_t TK,
                                        int64_t K, int64_t D, float* __restrict__ dy, float* __restrict__ dweight) {
  for (int64_t tk = blockIdx.x; tk < TK; tk += gridDim.x) {  // uniform per block: block_sum is reached by all
    const float* go = dout + (tk / K) * D;
    const int64_t row = pos[tk];
    const float* yr = y + row * D;
    float* g = dy + row * D;
    const float wk = weight[tk];
    double dot = 0;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
      g[j] = __fmul_rn(wk, go[j]);
      dot += (double)go[j] * yr[j];
    }
    dot = cuda::block_sum(dot);
    if (threadIdx.x == 0) dweight[tk] = (float)dot;
  }
}
}  // namespace

void CudaBackend::gather_rows(const float* x, int64_t ldx, const int32_t* src, int64_t rows, int64_t D, float* out) {
  if (rows == 0 || D == 0) return;
  gather_rows_kernel<<<cuda::grid_for(rows, 1), cuda::kBlock, 0, stream_>>>(x, ldx, src, rows, D, out);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::combine_rows(const float* y, const int32_t* pos, const float* weight, int64_t T, int64_t K,
                               int64_t D, float* out) {
  if (T == 0 || K == 0 || D == 0) return;
  combine_rows_kernel<<<cuda::grid_for(T, 1), cuda::kBlock, 0, stream_>>>(y, pos, weight, T, K, D, out);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::combine_rows_backward(const float* dout, const float* y, const int32_t* pos, const float* weight,
                                        int64_t T, int64_t K, int64_t D, float* dy, float* dweight) {
  if (T == 0 || K == 0) return;
  combine_rows_bwd_kernel<<<cuda::grid_for(T * K, 1), cuda::kBlock, 0, stream_>>>(dout, y, pos, weight, T * K, K, D,
                                                                                   dy, dweight);
  DSV3_CUDA_LAUNCH_CHECK();
}

}  // namespace dsv3
