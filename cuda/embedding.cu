// defines: CudaBackend::embedding_forward / embedding_backward.
// The backward is deterministic without atomics: each thread owns one column and adds the tokens' gradients in token
// order (repeated ids accumulate exactly as in the CPU op, bit for bit). A sorted, segmented version comes later.
#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"

namespace dsv3 {

namespace {
__global__ void embedding_fwd_kernel(const int64_t* __restrict__ ids, int64_t n, const float* __restrict__ table,
                                     int64_t dim, float* __restrict__ out) {
  const int64_t total = n * dim;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = t / dim, j = t % dim;
    out[t] = table[ids[i] * dim + j];
  }
}

__global__ void embedding_bwd_kernel(const int64_t* __restrict__ ids, int64_t n, const float* __restrict__ dy,
                                     int64_t dim, float* dtable) {
  const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  for (int64_t i = 0; i < n; ++i) dtable[ids[i] * dim + j] += dy[i * dim + j];
}
}  // namespace

void CudaBackend::embedding_forward(const int64_t* ids, int64_t n, const float* table, int64_t dim, float* out) {
  if (n == 0 || dim == 0) return;
  embedding_fwd_kernel<<<cuda::grid_for(n * dim), cuda::kBlock, 0, stream_>>>(ids, n, table, dim, out);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::embedding_backward(const int64_t* ids, int64_t n, const float* dy, int64_t dim, float* dtable) {
  if (n == 0 || dim == 0) return;
  const int block = 128;  // more blocks for the usual dims (7168 columns: 56 blocks)
  embedding_bwd_kernel<<<(unsigned)((dim + block - 1) / block), block, 0, stream_>>>(ids, n, dy, dim, dtable);
  DSV3_CUDA_LAUNCH_CHECK();
}

}  // namespace dsv3
