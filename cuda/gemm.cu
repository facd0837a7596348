// defines: CudaBackend::gemm, gemm_grouped, gemm_grouped_tn — cuBLAS FP32 GEMMs on row-major operands; in BF16 matmul mode
// (Backend::set_bf16_matmul) both operands are rounded to BF16 in scratch and cublasGemmEx multiplies them on the
// tensor cores with FP32 accumulation into the FP32 C. CudaBackend::gemm_bf16 takes operands already in BF16.
// Row-major X (r, c) with leading dimension ld is, to column-major cuBLAS, X^T (c, r) with the same ld. So the
// row-major C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T: B first, M and N swapped.
#include <cuda_bf16.h>

#include <algorithm>
#include <vector>

#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"

namespace dsv3 {

namespace {
// ab: CUDA_R_32F (FP32 SGEMM arithmetic) or CUDA_R_16BF (tensor cores); C is FP32 and accumulation FP32 either way
void gemm_rowmajor(cublasHandle_t h, bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha,
                   const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C, int64_t ldc,
                   cudaDataType_t ab) {
  if (M == 0 || N == 0) return;
  using cuda::to_int;
  // column-major: C^T (N, M) = op(B)^T (N, K) . op(A)^T (K, M). The column-major view of a stored operand is its
  // transpose, so op(X)^T is the view itself (CUBLAS_OP_N) when X is used as stored, and its transpose otherwise.
  const cublasOperation_t opB = transB ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opA = transA ? CUBLAS_OP_T : CUBLAS_OP_N;
  DSV3_CUBLAS_CHECK(cublasGemmEx(h, opB, opA, to_int(N, "gemm N"), to_int(M, "gemm M"), to_int(K, "gemm K"), &alpha, B,
                                 ab, to_int(ldb, "gemm ldb"), A, ab, to_int(lda, "gemm lda"), &beta, C, CUDA_R_32F,
                                 to_int(ldc, "gemm ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

__global__ void to_bf16_kernel(const float* __restrict__ x, int64_t n, __nv_bfloat16* __restrict__ y) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}

size_t extent(int64_t rows, int64_t cols, int64_t ld) { return rows && cols ? (size_t)((rows - 1) * ld + cols) : 0; }
}  // namespace

void CudaBackend::gemm_bf16(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
                            int64_t lda, const void* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_rowmajor(cublas_, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, CUDA_R_16BF);
}

void CudaBackend::gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                       const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (!bf16_matmul_) return gemm_rowmajor(cublas_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, CUDA_R_32F);
  if (M == 0 || N == 0) return;
  // the stored extents of A (M,K or K,M) and B (K,N or N,K), rounded to BF16 with the same leading dimensions
  const size_t na = extent(ta ? K : M, ta ? M : K, lda), nb = extent(tb ? N : K, tb ? K : N, ldb);
  const size_t na_pad = (na + 127) / 128 * 128;  // B starts 256-byte aligned
  auto* a16 = static_cast<__nv_bfloat16*>(scratch(sizeof(__nv_bfloat16) * (na_pad + nb)));
  __nv_bfloat16* b16 = a16 + na_pad;
  const unsigned grid_a = (unsigned)std::min<size_t>((na + cuda::kBlock - 1) / cuda::kBlock, 65535);
  const unsigned grid_b = (unsigned)std::min<size_t>((nb + cuda::kBlock - 1) / cuda::kBlock, 65535);
  if (na) to_bf16_kernel<<<grid_a, cuda::kBlock, 0, stream_>>>(A, (int64_t)na, a16);
  DSV3_CUDA_LAUNCH_CHECK();
  if (nb) to_bf16_kernel<<<grid_b, cuda::kBlock, 0, stream_>>>(B, (int64_t)nb, b16);
  DSV3_CUDA_LAUNCH_CHECK();
  gemm_rowmajor(cublas_, ta, tb, M, N, K, alpha, a16, lda, b16, ldb, beta, C, ldc, CUDA_R_16BF);
}

// Row-major grouped GEMMs as column-major ones (see the top): group i computes C_i^T = op(B_i)^T op(A_i)^T. One
// cublasGemmGroupedBatchedEx call, each non-empty group its own cuBLAS group of one (the sizes differ per expert);
// the pointer arrays go to device scratch first (cuBLAS reads them on the device).
void CudaBackend::grouped(bool ta, bool tb, const std::vector<GroupedGemm>& gs, float alpha, float beta) {
  const int n = (int)gs.size();
  if (n == 0) return;
  if (n == 1) {  // one block (a dense MLP, or one local expert): the plain GEMM, no pointer arrays
    const GroupedGemm& g = gs[0];
    return gemm_rowmajor(cublas_, ta, tb, g.M, g.N, g.K, alpha, g.A, g.lda, g.B, g.ldb, beta, g.C, g.ldc, CUDA_R_32F);
  }
  std::vector<cublasOperation_t> opA(n, tb ? CUBLAS_OP_T : CUBLAS_OP_N), opB(n, ta ? CUBLAS_OP_T : CUBLAS_OP_N);
  std::vector<int> m(n), nn(n), k(n), lda(n), ldb(n), ldc(n), size(n, 1);
  std::vector<float> alphas(n, alpha), betas(n, beta);
  std::vector<void*> ptrs(3 * n);  // cuBLAS A (our B), cuBLAS B (our A), C (the inputs only read by cuBLAS)
  for (int i = 0; i < n; ++i) {
    const GroupedGemm& g = gs[i];
    m[i] = cuda::to_int(g.N, "grouped gemm N");
    nn[i] = cuda::to_int(g.M, "grouped gemm M");
    k[i] = cuda::to_int(g.K, "grouped gemm K");
    lda[i] = cuda::to_int(g.ldb, "grouped gemm ldb");
    ldb[i] = cuda::to_int(g.lda, "grouped gemm lda");
    ldc[i] = cuda::to_int(g.ldc, "grouped gemm ldc");
    ptrs[i] = const_cast<float*>(g.B);
    ptrs[n + i] = const_cast<float*>(g.A);
    ptrs[2 * n + i] = g.C;
  }
  auto* dev = static_cast<void**>(scratch(sizeof(void*) * 3 * n));
  // pageable source: the copy has read it before returning, so `ptrs` may go out of scope afterwards
  DSV3_CUDA_CHECK(cudaMemcpyAsync(dev, ptrs.data(), sizeof(void*) * 3 * n, cudaMemcpyHostToDevice, stream_));
  DSV3_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(cublas_, opA.data(), opB.data(), m.data(), nn.data(), k.data(),
                                               alphas.data(), dev, CUDA_R_32F, lda.data(), dev + n, CUDA_R_32F,
                                               ldb.data(), betas.data(), dev + 2 * n,
                                               CUDA_R_32F, ldc.data(), n, size.data(), CUBLAS_COMPUTE_32F));
}

void CudaBackend::gemm_grouped(bool tb, int64_t groups, const int64_t* row0, int64_t N, int64_t K, float alpha,
                               const float* A, int64_t lda, const float* B, int64_t strideB, int64_t ldb, float beta,
                               float* C, int64_t ldc) {
  if (bf16_matmul_ || N == 0)
    return Backend::gemm_grouped(tb, groups, row0, N, K, alpha, A, lda, B, strideB, ldb, beta, C, ldc);
  std::vector<GroupedGemm> gs;
  for (int64_t g = 0; g < groups; ++g)
    if (row0[g + 1] > row0[g])
      gs.push_back({row0[g + 1] - row0[g], N, K, A + row0[g] * lda, lda, B + g * strideB, ldb, C + row0[g] * ldc, ldc});
  grouped(false, tb, gs, alpha, beta);
}

void CudaBackend::gemm_grouped_tn(int64_t groups, const int64_t* row0, int64_t M, int64_t N, float alpha,
                                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                                  int64_t strideC, int64_t ldc) {
  if (bf16_matmul_ || M == 0 || N == 0)
    return Backend::gemm_grouped_tn(groups, row0, M, N, alpha, A, lda, B, ldb, beta, C, strideC, ldc);
  std::vector<GroupedGemm> gs;
  for (int64_t g = 0; g < groups; ++g)
    if (row0[g + 1] > row0[g])
      gs.push_back({M, N, row0[g + 1] - row0[g], A + row0[g] * lda, lda, B + row0[g] * ldb, ldb, C + g * strideC, ldc});
  grouped(true, false, gs, alpha, beta);
}

}  // namespace dsv3
