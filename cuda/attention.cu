// defines: CudaBackend::mla_attention_forward / mla_attention_backward — MLA causal attention, the straightforward
// way: per sequence and chunk of heads, cuBLAS strided-batched SGEMMs for the (S,S) scores and the products with V,
// and one block per score row for the causal softmax (forward) and its gradient (backward). probs (B,H,S,S) has the
// CPU op's layout: row i holds P(i, 0..i) and zeros after. The flash form (no probs): flash_attention.cu.
#include <algorithm>

#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"

namespace dsv3 {

namespace {
using cuda::kBlock;
using cuda::to_int;

// rows of (nh, S, S) scores; grid (S, nh): row i keeps columns 0..i, the rest is zeroed
__global__ void causal_softmax_kernel(float* __restrict__ P, int64_t S) {
  const int64_t i = blockIdx.x;
  float* row = P + (int64_t)blockIdx.y * S * S + i * S;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) mx = fmaxf(mx, row[j]);
  mx = cuda::block_max(mx, -INFINITY);
  double sum = 0;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
    const float e = expf(row[j] - mx);
    row[j] = e;
    sum += e;
  }
  sum = cuda::block_sum(sum);
  const float inv = (float)(1.0 / sum);
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) row[j] *= inv;
  for (int64_t j = i + 1 + threadIdx.x; j < S; j += blockDim.x) row[j] = 0.0f;
}

// dS = scale * P * (dP - rowsum(dP * P)), in place over dP; grid (S, nh)
__global__ void causal_softmax_bwd_kernel(const float* __restrict__ P, float* __restrict__ dP, int64_t S,
                                          float scale) {
  const int64_t i = blockIdx.x, off = (int64_t)blockIdx.y * S * S + i * S;
  const float* pr = P + off;
  float* g = dP + off;
  double dot = 0;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) dot += (double)g[j] * pr[j];
  dot = cuda::block_sum(dot);
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) g[j] = scale * pr[j] * (float)(g[j] - dot);
  for (int64_t j = i + 1 + threadIdx.x; j < S; j += blockDim.x) g[j] = 0.0f;
}

// Row-major batched C_b(M,N) = alpha op(A_b) op(B_b) + beta C_b (see gemm.cu for the column-major mapping).
void sgemm_rowmajor_batched(cublasHandle_t h, bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha,
                            const float* A, int64_t lda, int64_t strideA, const float* B, int64_t ldb,
                            int64_t strideB, float beta, float* C, int64_t ldc, int64_t strideC, int64_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
  const cublasOperation_t opB = transB ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opA = transA ? CUBLAS_OP_T : CUBLAS_OP_N;
  DSV3_CUBLAS_CHECK(cublasSgemmStridedBatched(
      h, opB, opA, to_int(N, "attention gemm N"), to_int(M, "attention gemm M"), to_int(K, "attention gemm K"), &alpha,
      B, to_int(std::max<int64_t>(ldb, 1), "attention ldb"), strideB, A,
      to_int(std::max<int64_t>(lda, 1), "attention lda"), strideA, &beta, C, to_int(ldc, "attention ldc"), strideC,
      to_int(batch, "attention batch")));
}
}  // namespace

void CudaBackend::mla_attention_forward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, int64_t B,
                                        int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale,
                                        float* o, float* probs) {
  if (B == 0 || S == 0 || H == 0) return;
  DSV3_CHECK(S <= INT32_MAX && H <= 65535, "mla_attention_forward: S = " << S << ", H = " << H);
  const int64_t ldq = H * (dn + dr), ldkv = H * (dn + dv), ldo = H * dv, SS = S * S;
  // with probs the scores live there (all heads at once); without, in scratch, a chunk of heads at a time
  const int64_t hc =
      probs ? H : std::clamp<int64_t>((int64_t)(attn_chunk_bytes_ / (sizeof(float) * SS)), int64_t(1), H);
  float* scr = probs ? nullptr : static_cast<float*>(scratch(sizeof(float) * hc * SS));
  cublasHandle_t h = cublas_;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h0 = 0; h0 < H; h0 += hc) {
      const int64_t nh = std::min(hc, H - h0);
      float* P = probs ? probs + (b * H + h0) * SS : scr;
      const float* qh = q + b * S * ldq + h0 * (dn + dr);
      const float* kh = kv + b * S * ldkv + h0 * (dn + dv);
      const float* kp = kpe + b * S * ldkpe;
      // scores = scale (q_nope k_nope^T + q_pe k_pe^T); k_pe is shared by the heads (batch stride 0)
      sgemm_rowmajor_batched(h, false, true, S, S, dn, scale, qh, ldq, dn + dr, kh, ldkv, dn + dv, 0.0f, P, S, SS, nh);
      sgemm_rowmajor_batched(h, false, true, S, S, dr, scale, qh + dn, ldq, dn + dr, kp, ldkpe, 0, 1.0f, P, S, SS,
                             nh);
      causal_softmax_kernel<<<dim3((unsigned)S, (unsigned)nh), kBlock, 0, stream_>>>(P, S);
      DSV3_CUDA_LAUNCH_CHECK();
      // o = P v
      sgemm_rowmajor_batched(h, false, false, S, dv, S, 1.0f, P, S, SS, kh + dn, ldkv, dn + dv, 0.0f,
                             o + b * S * ldo + h0 * dv, ldo, dv, nh);
    }
  }
}

void CudaBackend::mla_attention_backward(const float* q, const float* kv, const float* kpe, int64_t ldkpe,
                                         const float* probs, const float* dout, int64_t B, int64_t S, int64_t H,
                                         int64_t dn, int64_t dr, int64_t dv, float scale, float* dq, float* dkv,
                                         float* dkpe) {
  if (B == 0 || S == 0 || H == 0) return;
  DSV3_CHECK(S <= INT32_MAX && H <= 65535, "mla_attention_backward: S = " << S << ", H = " << H);
  const int64_t ldq = H * (dn + dr), ldkv = H * (dn + dv), ldo = H * dv, SS = S * S;
  const int64_t hc = std::clamp<int64_t>((int64_t)(attn_chunk_bytes_ / (sizeof(float) * SS)), int64_t(1), H);
  float* dP = static_cast<float*>(scratch(sizeof(float) * hc * SS));
  cublasHandle_t h = cublas_;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h0 = 0; h0 < H; h0 += hc) {
      const int64_t nh = std::min(hc, H - h0);
      const float* P = probs + (b * H + h0) * SS;
      const float* qh = q + b * S * ldq + h0 * (dn + dr);
      const float* kh = kv + b * S * ldkv + h0 * (dn + dv);
      const float* vh = kh + dn;
      const float* kp = kpe + b * S * ldkpe;
      const float* doh = dout + b * S * ldo + h0 * dv;
      float* dqh = dq + b * S * ldq + h0 * (dn + dr);
      float* dkh = dkv + b * S * ldkv + h0 * (dn + dv);
      float* dkp = dkpe + b * S * ldkpe;
      // O = P V:  dP = dO V^T (S,S),  dV = P^T dO (S,dv)
      sgemm_rowmajor_batched(h, false, true, S, S, dv, 1.0f, doh, ldo, dv, vh, ldkv, dn + dv, 0.0f, dP, S, SS, nh);
      sgemm_rowmajor_batched(h, true, false, S, dv, S, 1.0f, P, S, SS, doh, ldo, dv, 0.0f, dkh + dn, ldkv, dn + dv,
                             nh);
      causal_softmax_bwd_kernel<<<dim3((unsigned)S, (unsigned)nh), kBlock, 0, stream_>>>(P, dP, S, scale);
      DSV3_CUDA_LAUNCH_CHECK();
      // score = q_nope k_nope^T + q_pe k_pe^T:  dq_nope = dS k_nope, dq_pe = dS k_pe, dk_nope = dS^T q_nope
      sgemm_rowmajor_batched(h, false, false, S, dn, S, 1.0f, dP, S, SS, kh, ldkv, dn + dv, 0.0f, dqh, ldq, dn + dr,
                             nh);
      sgemm_rowmajor_batched(h, false, false, S, dr, S, 1.0f, dP, S, SS, kp, ldkpe, 0, 0.0f, dqh + dn, ldq, dn + dr,
                             nh);
      sgemm_rowmajor_batched(h, true, false, S, dn, S, 1.0f, dP, S, SS, qh, ldq, dn + dr, 0.0f, dkh, ldkv, dn + dv,
                             nh);
      // dk_pe += sum over heads dS^T q_pe: one GEMM per head, in head order (deterministic, as the CPU op)
      for (int64_t j = 0; j < nh; ++j)
        sgemm_rowmajor_batched(h, true, false, S, dr, S, 1.0f, dP + j * SS, S, SS, qh + j * (dn + dr) + dn, ldq, 0,
                               1.0f, dkp, ldkpe, 0, 1);
    }
  }
}

}  // namespace dsv3
