// defines: CudaBackend::cross_entropy_forward / cross_entropy_backward.
// Forward: one block per row (max, sum of float exponentials in double, log-sum-exp), per-row losses in double, then
// one block sums them in a fixed order: the returned double is the same run to run. Rows with target < 0 give 0 and
// are not counted; lse is written for every row.
#include <cstring>

#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"

namespace dsv3 {

namespace {
using cuda::kBlock;

__global__ void ce_fwd_rows_kernel(const float* __restrict__ logits, int64_t V, const int64_t* __restrict__ targets,
                                   double* __restrict__ row_loss, float* __restrict__ lse) {
  const int64_t r = blockIdx.x;
  const float* l = logits + r * V;
  const double ls = cuda::block_logsumexp(l, V);
  if (threadIdx.x == 0) {
    if (lse) lse[r] = (float)ls;
    const int64_t t = targets[r];
    row_loss[r] = t >= 0 ? ls - l[t] : 0.0;
  }
}

// one block: total = sum of row_loss, count = rows with target >= 0
__global__ void ce_fwd_total_kernel(const double* __restrict__ row_loss, const int64_t* __restrict__ targets,
                                    int64_t rows, double* __restrict__ out_total,
                                    unsigned long long* __restrict__ out_count) {
  double s = 0;
  unsigned long long c = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    s += row_loss[r];
    c += targets[r] >= 0;
  }
  s = cuda::block_sum(s);
  c = cuda::block_sum(c);
  if (threadIdx.x == 0) {
    *out_total = s;
    *out_count = c;
  }
}

}  // namespace

double CudaBackend::cross_entropy_forward(const float* logits, int64_t rows, int64_t V, const int64_t* targets,
                                          int64_t* count, float* lse) {
  if (rows == 0) {
    if (count) *count = 0;
    return 0.0;
  }
  DSV3_CHECK(rows <= INT32_MAX, "cross_entropy_forward: " << rows << " rows");
  // scratch: row losses (rows doubles), then the total (double) and the count (u64)
  auto* base = static_cast<double*>(scratch(sizeof(double) * (rows + 2)));
  double* row_loss = base;
  double* d_total = base + rows;
  auto* d_count = reinterpret_cast<unsigned long long*>(base + rows + 1);
  ce_fwd_rows_kernel<<<(unsigned)rows, kBlock, 0, stream_>>>(logits, V, targets, row_loss, lse);
  DSV3_CUDA_LAUNCH_CHECK();
  ce_fwd_total_kernel<<<1, 1024, 0, stream_>>>(row_loss, targets, rows, d_total, d_count);
  DSV3_CUDA_LAUNCH_CHECK();
  double host[2];
  DSV3_CUDA_CHECK(cudaMemcpyAsync(host, d_total, sizeof(host), cudaMemcpyDeviceToHost, stream_));
  DSV3_CUDA_CHECK(cudaStreamSynchronize(stream_));
  unsigned long long n = 0;
  static_assert(sizeof(n) == sizeof(double));
  std::memcpy(&n, &host[1], sizeof(n));
  if (count) *count = (int64_t)n;
  return host[0];
}

void CudaBackend::cross_entropy_backward(const float* logits, const float* lse, int64_t rows, int64_t V,
                                         const int64_t* targets, float scale, float* dlogits) {
  if (rows == 0 || V == 0) return;
  cross_entropy_slice_backward(logits, lse, rows, V, targets, 0, scale, dlogits);  // the slice [0, V): vocab_slices.cu
}

}  // namespace dsv3
