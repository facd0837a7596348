// defines: CudaBackend::embedding_forward_slice / embedding_backward_slice / cross_entropy_slice_forward /
// cross_entropy_slice_backward — the vocabulary-parallel pieces (tensor parallelism: this rank holds vocabulary rows
// [v0, v0 + vl)); embedding.cu's whole-vocabulary ops are these over [0, kWholeVocabulary), and cross_entropy.cu's
// share their arithmetic (cuda::block_logsumexp): the embedding's backward adds in token order (one thread per column,
// no atomics), the log-sum-exp sums float exponentials in double per row.
#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"
#include "vocab_slices.cuh"

namespace dsv3 {

void CudaBackend::embedding_forward_slice(const int64_t* ids, int64_t n, const float* table, int64_t v0, int64_t vl,
                                          int64_t dim, float* out) {
  if (n == 0 || dim == 0) return;
  emb_slice_fwd_kernel<<<cuda::grid_for(n * dim), kBlock, 0, stream_>>>(ids, n, table, v0, vl, dim, out);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::embedding_backward_slice(const int64_t* ids, int64_t n, const float* dy, int64_t v0, int64_t vl,
                                           int64_t dim, float* dtable) {
  if (n == 0 || dim == 0) return;
  const int block = 128;
  emb_slice_bwd_kernel<<<(unsigned)((dim + block - 1) / block), block, 0, stream_>>>(ids, n, dy, v0, vl, dim, dtable);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::cross_entropy_slice_forward(const float* logits, int64_t rows, int64_t vl, const int64_t* targets,
                                              int64_t v0, double* lse, double* tgt) {
  if (rows == 0) return;
  DSV3_CHECK(rows <= INT32_MAX && vl > 0, "cross_entropy_slice_forward: " << rows << " rows of " << vl);
  ce_slice_fwd_kernel<<<(unsigned)rows, kBlock, 0, stream_>>>(logits, vl, targets, v0, lse, tgt);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::cross_entropy_slice_backward(const float* logits, const float* lse, int64_t rows, int64_t vl,
                                               const int64_t* targets, int64_t v0, float scale, float* dlogits) {
  if (rows == 0) return;
  DSV3_CHECK(rows <= INT32_MAX, "cross_entropy_slice_backward: " << rows << " rows");
  ce_slice_bwd_kernel<<<(unsigned)rows, kBlock, 0, stream_>>>(logits, lse, vl, targets, v0, scale, dlogits);
  DSV3_CUDA_LAUNCH_CHECK();
}

}  // namespace dsv3
