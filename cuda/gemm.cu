// defines: CudaBackend::gemm_nt / gemm_nn / gemm_tn — cuBLAS FP32 SGEMM on row-major operands.
// Row-major X (r, c) with leading dimension ld is, to column-major cuBLAS, X^T (c, r) with the same ld. So the
// row-major C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T: B first, M and N swapped.
#include "cuda_backend.cuh"
#include "cuda_check.cuh"

namespace dsv3 {

namespace {
void sgemm_rowmajor(cublasHandle_t h, bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha,
                    const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  using cuda::to_int;
  // column-major: C^T (N, M) = op(B)^T (N, K) . op(A)^T (K, M). The column-major view of a stored operand is its
  // transpose, so op(X)^T is the view itself (CUBLAS_OP_N) when X is used as stored, and its transpose otherwise.
  const cublasOperation_t opB = transB ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opA = transA ? CUBLAS_OP_T : CUBLAS_OP_N;
  DSV3_CUBLAS_CHECK(cublasSgemm(h, opB, opA, to_int(N, "gemm N"), to_int(M, "gemm M"), to_int(K, "gemm K"), &alpha, B,
                                to_int(ldb, "gemm ldb"), A, to_int(lda, "gemm lda"), &beta, C,
                                to_int(ldc, "gemm ldc")));
}
}  // namespace

// C(M,N) = alpha A(M,K) B(N,K)^T + beta C
void CudaBackend::gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                          int64_t ldb, float beta, float* C, int64_t ldc) {
  sgemm_rowmajor(cublas_, false, true, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// C(M,N) = alpha A(M,K) B(K,N) + beta C
void CudaBackend::gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                          int64_t ldb, float beta, float* C, int64_t ldc) {
  sgemm_rowmajor(cublas_, false, false, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// C(M,N) = alpha A(K,M)^T B(K,N) + beta C
void CudaBackend::gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                          int64_t ldb, float beta, float* C, int64_t ldc) {
  sgemm_rowmajor(cublas_, true, false, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace dsv3
