// defines: CudaBackend::embedding_forward / embedding_backward — the vocabulary-slice kernels of vocab_slices.cuh over
// the slice [0, kWholeVocabulary) that holds every id. The backward is deterministic without atomics: each thread owns
// one column and adds the tokens' gradients in token order (repeated ids accumulate exactly as in the CPU op).
#include "cuda_backend.cuh"

namespace dsv3 {

void CudaBackend::embedding_forward(const int64_t* ids, int64_t n, const float* table, int64_t dim, float* out) {
  embedding_forward_slice(ids, n, table, 0, kWholeVocabulary, dim, out);
}

void CudaBackend::embedding_backward(const int64_t* ids, int64_t n, const float* dy, int64_t dim, float* dtable) {
  embedding_backward_slice(ids, n, dy, 0, kWholeVocabulary, dim, dtable);
}

}  // namespace dsv3
