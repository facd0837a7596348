// defines: dsv3::CpuBackend — the reference implementation of every op (OpenBLAS GEMMs, OpenMP loops); the
// optimizer ops and conversions are in optimizer_ops.cpp
#pragma once
#include <vector>

#include "ops/backend.h"

namespace dsv3 {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads = 0);
  std::string name() const override { return "cpu"; }
  // op(A) (M,K) . op(B) (K,N) with OpenBLAS; BF16 rounding of both operands in BF16 mode
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) override;
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
  void embedding_forward_slice(const int64_t* ids, int64_t n, const float* table, int64_t v0, int64_t vl, int64_t dim,
                               float* out) override;
  void embedding_backward_slice(const int64_t* ids, int64_t n, const float* dy, int64_t v0, int64_t vl, int64_t dim,
                                float* dtable) override;
  void cross_entropy_slice_forward(const float* logits, int64_t rows, int64_t vl, const int64_t* targets, int64_t v0,
                                   double* lse, double* tgt) override;
  void cross_entropy_slice_backward(const float* logits, const float* lse, int64_t rows, int64_t vl,
                                    const int64_t* targets, int64_t v0, float scale, float* dlogits) override;
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
  // optimizer ops and conversions: ops/cpu/optimizer_ops.cpp
  void adamw_update(const AdamWShard* shards, int count, const AdamWHyper& h) override;
  double sum_squares(const float* x, int64_t n) override;
  void to_bf16(const float* x, int64_t n, uint16_t* out) override;
  void from_bf16(const uint16_t* x, int64_t n, float* out) override;
  void dequantize_fp8(const uint8_t* codes, const float* scale_inv, int64_t rows, int64_t cols, int64_t block_rows,
                      int64_t block_cols, float* out) override;

 private:
  std::vector<float> bf16_a_, bf16_b_;  // the rounded operands of the BF16 mode (kept: no allocation per GEMM)
};

}  // namespace dsv3
