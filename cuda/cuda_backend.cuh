// defines: dsv3::CudaBackend — the Backend ops on one CUDA device (cuBLAS FP32 GEMMs, plain CUDA kernels), checked op
// by op against the CPU backend (tests/gpu). Every pointer an op takes is a device pointer; ops are queued on the
// backend's stream (a blocking stream: ordered with the legacy default stream, so a plain cudaMemcpy after an op sees
// its result), cross_entropy_forward and sum_squares return only after their work finished. The ops of one family
// live in one .cu file each: gemm.cu, rmsnorm.cu, rope.cu, attention.cu, flash_attention.cu, swiglu.cu,
// embedding.cu, cross_entropy.cu, router.cu, moe_permute.cu, optimizer.cu, convert.cu.
// Host-only header (includable from .cpp files compiled by the C++ compiler).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "device_buffer.cuh"
#include "ops/backend.h"

namespace dsv3 {

// true when a CUDA device can be used (runtime and driver agree, >= 1 device, a context can be made); otherwise
// false with the reason. Calls no cuBLAS function.
bool cuda_device_usable(std::string* reason);
// The device this process uses: the node-local rank (OMPI_COMM_WORLD_LOCAL_RANK, else SLURM_LOCALID, else
// MPI_LOCALRANKID) modulo the device count when set, else `hint` (0 when negative).
int cuda_select_device(int hint, int device_count);
// the device this process uses (cuda_select_device); dsv3::Error naming the reason when no device is usable
int cuda_usable_device(int device_hint);
// make_backend("cuda"): a CudaBackend on cuda_select_device(hint); dsv3::Error with the reason when no device.
std::unique_ptr<Backend> make_cuda_backend(int device_hint);
// make_backend("cuda"): the same ops on the CUDA pool's memory in place and on host pointers staged through the device
// (cuda/host_staged.cu); dsv3::Error when no device.
std::unique_ptr<Backend> make_host_staged_cuda_backend(int device_hint);

class MemoryResource;
// The CUDA backend's memory (cuda/managed_pool.cu): managed memory cached by size; make_backend("cuda") installs it
// as the default for Buffers (core/memory.h). cuda_managed_owns: whether a pointer lies in it (the ops then use it as
// it is).
MemoryResource& cuda_managed_memory();
bool cuda_managed_owns(const void* p);

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  void synchronize();  // waits for every op queued so far
  // Attention without a probs output (forward) and the backward's dP work on chunks of heads whose (S,S) score
  // blocks fit in this many bytes (at least one head at a time). Default 1 GiB.
  void set_attention_chunk_bytes(size_t bytes) { attn_chunk_bytes_ = bytes; }

  // C (FP32) = alpha op(A) op(B) + beta C with A, B already BF16 (__nv_bfloat16, row-major, as the gemm_* ops):
  // tensor cores, FP32 accumulation. What a model holding BF16 weights calls; the benchmark times it.
  void gemm_bf16(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const void* A, int64_t lda,
                 const void* B, int64_t ldb, float beta, float* C, int64_t ldc);
  // FP32 SGEMM, or in BF16 matmul mode both operands rounded to BF16 in scratch and gemm_bf16
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) override;
  // FP32: one cublasGemmGroupedBatchedEx over the non-empty groups; BF16 mode: the per-group default
  void gemm_grouped(bool tb, int64_t groups, const int64_t* row0, int64_t N, int64_t K, float alpha, const float* A,
                    int64_t lda, const float* B, int64_t strideB, int64_t ldb, float beta, float* C,
                    int64_t ldc) override;
  void gemm_grouped_tn(int64_t groups, const int64_t* row0, int64_t M, int64_t N, float alpha, const float* A,
                       int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t strideC,
                       int64_t ldc) override;
  void rmsnorm_forward(const float* x, int64_t ldx, const float* w, float eps, int64_t rows, int64_t dim, float* y,
                       float* rstd) override;
  void add_rmsnorm_forward(const float* r, float* x, const float* w, float eps, int64_t rows, int64_t dim, float* y,
                           float* rstd) override;
  void rope_forward(float* x, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride, int64_t rope_dim,
                    const int64_t* pos, const float* cos, const float* sin) override;
  void mla_attention_forward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, int64_t B, int64_t S,
                             int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale, float* o,
                             float* probs) override;
  void swiglu_forward(const float* gate, const float* up, int64_t rows, int64_t cols, int64_t ld_in,
                      float* out) override;
  void embedding_forward(const int64_t* ids, int64_t n, const float* table, int64_t dim, float* out) override;
  void router_forward(const float* logits, const float* bias, int64_t T, const RouterSpec& r, float* scores,
                      int32_t* idx, float* weight) override;
  void gather_rows(const float* x, int64_t ldx, const int32_t* src, int64_t rows, int64_t D, float* out) override;
  void combine_rows(const float* y, const int32_t* pos, const float* weight, int64_t T, int64_t K, int64_t D,
                    float* out) override;
  void combine_rows_backward(const float* dout, const float* y, const int32_t* pos, const float* weight, int64_t T,
                             int64_t K, int64_t D, float* dy, float* dweight) override;
  // vocab_slices.cu
  void embedding_forward_slice(const int64_t* ids, int64_t n, const float* table, int64_t v0, int64_t vl, int64_t dim,
                               float* out) override;
  void embedding_backward_slice(const int64_t* ids, int64_t n, const float* dy, int64_t v0, int64_t vl, int64_t dim,
                                float* dtable) override;
  void cross_entropy_slice_forward(const float* logits, int64_t rows, int64_t vl, const int64_t* targets, int64_t v0,
                                   double* lse, double* tgt) override;
  void cross_entropy_slice_backward(const float* logits, const float* lse, int64_t rows, int64_t vl,
                                    const int64_t* targets, int64_t v0, float scale, float* dlogits) override;
  // elementwise.cu
  void add(const float* x, int64_t n, float* y) override;
  void copy_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) override;
  void fill(float* x, int64_t n, float v) override;
  void rmsnorm_backward(const float* x, int64_t ldx, const float* w, const float* rstd, const float* dy, int64_t rows,
                        int64_t dim, float* dx, int64_t lddx, float* dw) override;
  void rope_backward(float* dx, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride, int64_t rope_dim,
                     const int64_t* pos, const float* cos, const float* sin) override;
  void mla_attention_backward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, const float* probs,
                              const float* dout, int64_t B, int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv,
                              float scale, float* dq, float* dkv, float* dkpe) override;
  // flash_attention.cu: tiled online-softmax kernels, nothing (S,S) (FP32; BF16 attention mode: the tensor-core kernels
  // of flash_attention_bf16.cuh); backward uses scratch for (B,H,S,dr+1) floats
  void mla_flash_attention_forward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, int64_t B,
                                   int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale, float* o,
                                   float* lse) override;
  void mla_flash_attention_backward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, const float* o,
                                    const float* lse, const float* dout, int64_t B, int64_t S, int64_t H, int64_t dn,
                                    int64_t dr, int64_t dv, float scale, float* dq, float* dkv, float* dkpe) override;
  void swiglu_backward(const float* gate, const float* up, const float* dout, int64_t rows, int64_t cols,
                       float* dgate, float* dup) override;
  void embedding_backward(const int64_t* ids, int64_t n, const float* dy, int64_t dim, float* dtable) override;
  void cross_entropy_backward(const float* logits, const float* lse, int64_t rows, int64_t V, const int64_t* targets,
                              float scale, float* dlogits) override;
  void router_backward(const float* scores, const int32_t* idx, const float* dweight, int64_t T, int64_t E, int64_t K,
                       bool norm, float scale, int64_t seq_len, const float* f, float aux_coef,
                       float* dlogits) override;
  double cross_entropy_forward(const float* logits, int64_t rows, int64_t V, const int64_t* targets,
                               int64_t* count, float* lse = nullptr) override;
  // optimizer.cu (adamw_update, sum_squares), convert.cu (to_bf16, from_bf16, dequantize_fp8)
  void adamw_update(const AdamWShard* shards, int count, const AdamWHyper& h) override;
  double sum_squares(const float* x, int64_t n) override;
  void to_bf16(const float* x, int64_t n, uint16_t* out) override;
  void from_bf16(const uint16_t* x, int64_t n, float* out) override;
  void dequantize_fp8(const uint8_t* codes, const float* scale_inv, int64_t rows, int64_t cols, int64_t block_rows,
                      int64_t block_cols, float* out) override;

 private:
  // one row-major GEMM of a grouped call: C (M,N) = op(A) op(B), the transposes shared by the call
  struct GroupedGemm {
    int64_t M, N, K;
    const float* A;
    int64_t lda;
    const float* B;
    int64_t ldb;
    float* C;
    int64_t ldc;
  };
  void grouped(bool ta, bool tb, const std::vector<GroupedGemm>& gs, float alpha, float beta);
  // device scratch of at least `bytes` (grown on demand, kept; one op uses it at a time, on stream_)
  void* scratch(size_t bytes);

  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cuda::DeviceBuffer<unsigned char> scratch_;
  size_t attn_chunk_bytes_ = size_t(1) << 30;
};

}  // namespace dsv3
