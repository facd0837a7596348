// defines: dsv3::Backend (the op interface every device implements), make_backend
// The CPU implementation (ops/cpu/) is the oracle; the CUDA backend (cuda/) implements the same ops and is tested
// against it op by op. Pointers are device pointers of the backend; all matrices are row-major.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace dsv3 {

// The selection rule of the MoE router (model/config.h holds the model's values; moe_route builds it).
//   node-limited (max_nodes > 0, DeepSeek-V3 section 2.1.2): the E experts lie in n_nodes contiguous blocks (the nodes
//     that expert parallelism places them on); a node scores the sum of the node_topk = max(1, k / max_nodes) best
//     biased scores of its experts (largest first); the max_nodes best nodes stay (ties: lower index), the experts
//     of the others are masked. So a token's experts span at most max_nodes nodes and its all-to-all traffic as well.
//   group-limited: n_group contiguous groups, a group scores the sum of its two best biased scores (one if it has a
//     single expert); the topk_group best groups stay (ties: lower index). With a node limit the groups nest in the
//     nodes (n_group a multiple of n_nodes; ModelConfig::validate), so a masked node masks whole groups.
//   then the k best biased scores of the remaining experts (ties: lower id).
struct RouterSpec {
  int64_t E = 0, k = 0;
  int64_t n_group = 1, topk_group = 1;
  int64_t n_nodes = 1, max_nodes = 0;  // max_nodes 0 (or >= n_nodes): no node limit
  bool norm = true;
  float scale = 1.0f;
  bool node_limited() const { return max_nodes > 0 && max_nodes < n_nodes; }
  int64_t node_topk() const { return k / max_nodes > 1 ? k / max_nodes : 1; }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // GEMM operand precision (run.matmul_dtype): false = FP32; true = BF16 — both operands of every gemm_* are rounded
  // to BF16 (nearest even) and the products accumulate in FP32 (tensor cores on CUDA), C stays FP32. The same
  // arithmetic on every backend, so the CPU stays the oracle of a BF16 run.
  virtual void set_bf16_matmul(bool on) { bf16_matmul_ = on; }
  bool bf16_matmul() const { return bf16_matmul_; }
  // Which attention ops the model calls (run.attention): false = mla_attention_* keeping probs (B,H,S,S) for
  // backward; true = mla_flash_attention_* keeping lse (B,H,S) only. Every backend implements both; the flag only
  // travels with the backend so that whatever builds one from the deck (driver, golden, generate) gets the choice.
  void set_flash_attention(bool on) { flash_attention_ = on; }
  bool flash_attention() const { return flash_attention_; }
  // Precision of the flash attention ops (run.attention_dtype): false = FP32 throughout; true = BF16 operands with
  // FP32 accumulation, the arithmetic of FlashAttention-2 on tensor cores, defined here so that the CPU stays the
  // oracle of the CUDA kernels:
  //   forward   q, k (k_nope | k_pe) and v rounded to BF16 (nearest even); scores, the online softmax, l and lse in
  //             FP32; the probabilities enter P V as BF16: per key block of kFlashKeyBlock keys (from key 0), the
  //             unnormalised p = exp(s - m) with m the row's running maximum over the blocks so far (this one
  //             included) is rounded, and the block's product is rescaled by exp(m - m_final) and divided by l;
  //   backward  q, k, v and dout rounded to BF16; P = exp(s - lse) and D = rowsum(dout * o) in FP32 (o and dout as
  //             given); dV += bf16(P)^T bf16(dout); dS = scale P (bf16(dout) bf16(v)^T - D) in FP32, rounded to BF16
  //             for dq = dS k and dk = dS^T q.
  // The probs form (mla_attention_*) is FP32 only.
  virtual void set_bf16_attention(bool on) { bf16_attention_ = on; }
  bool bf16_attention() const { return bf16_attention_; }
  static constexpr int64_t kFlashKeyBlock = 64;
  // Deferred synchronisation (the training step turns it on; DeferredSync below): an op whose outputs are all in the
  // backend's memory may return before the device finished it, so the host prepares the next op meanwhile. Host code
  // must then reach tensor memory only through ops and the memory resource's copies (which wait for the device) until
  // synchronize(): what tests/unit/test_device_resident.cpp checks for the training step. Ops with host outputs
  // (losses, norms, routing tables) still return finished. The CPU backend is synchronous: both are no-ops there.
  virtual void set_deferred_sync(bool) {}
  virtual void synchronize() {}
  // The op profile (DSV3_OP_PROFILE=1, CUDA) starts again: the driver calls it after the first iteration, so that
  // the profile shows the steady state (not CUDA's lazy module loading, cuBLAS's first heuristics, page placement).
  virtual void reset_profile() {}

  // C(M,N) = alpha op(A) op(B) + beta C, row-major: A is (M,K), or (K,M) used transposed when ta; B is (K,N), or
  // (N,K) used transposed when tb. The one GEMM every backend implements; the model calls the three named forms.
  virtual void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) = 0;
  // C(M,N) = alpha * A(M,K) . B(N,K)^T + beta * C   — a Linear layer: y = x W^T with W stored (out, in)
  void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
               float beta, float* C, int64_t ldc) {
    gemm(false, true, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  // C(M,N) = alpha * A(M,K) . B(K,N) + beta * C   — input gradients: dx = dy W
  void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
               float beta, float* C, int64_t ldc) {
    gemm(false, false, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  // C(M,N) = alpha * A(K,M)^T . B(K,N) + beta * C   — weight gradients: dW = dy^T x
  void gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
               float beta, float* C, int64_t ldc) {
    gemm(true, false, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  // Grouped GEMMs over the row blocks [row0[g], row0[g+1]) of A and C, g < groups (the local experts' tokens; row0 a
  // host array of groups+1 offsets): C[rows_g] = alpha A[rows_g] op(B_g) + beta C[rows_g], B_g = B + g * strideB,
  // (K,N) or (N,K) used transposed when tb. Default: one gemm per non-empty group; CUDA: one grouped cuBLAS call.
  virtual void gemm_grouped(bool tb, int64_t groups, const int64_t* row0, int64_t N, int64_t K, float alpha,
                            const float* A, int64_t lda, const float* B, int64_t strideB, int64_t ldb, float beta,
                            float* C, int64_t ldc);
  // The weight-gradient form: C_g (M,N) = alpha A[rows_g]^T B[rows_g] + beta C_g with C_g = C + g * strideC (the
  // groups' row blocks are the reduction dimension).
  virtual void gemm_grouped_tn(int64_t groups, const int64_t* row0, int64_t M, int64_t N, float alpha, const float* A,
                               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t strideC,
                               int64_t ldc);

  // y(rows, dim) = x * rsqrt(mean(x^2) + eps) * w; x rows have stride ldx. rstd(rows) saved for backward if non-null.
  virtual void rmsnorm_forward(const float* x, int64_t ldx, const float* w, float eps, int64_t rows, int64_t dim,
                               float* y, float* rstd) = 0;
  // The residual add fused into the RMSNorm that follows it: x (rows, dim, contiguous) += r, then y = rmsnorm(x) as
  // rmsnorm_forward(x, dim, ...). The same bits as add(r, rows * dim, x) then rmsnorm_forward; one pass less over x.
  virtual void add_rmsnorm_forward(const float* r, float* x, const float* w, float eps, int64_t rows, int64_t dim,
                                   float* y, float* rstd) = 0;

  // In-place interleaved RoPE on `n_heads` slices of `rope_dim` values per row: slice h of row r starts at
  // x + r*ldx + h*head_stride. Pair (x[2i], x[2i+1]) rotates by the angle of position pos[r] and frequency i;
  // cos/sin tables are (max_pos, rope_dim/2).
  virtual void rope_forward(float* x, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride,
                            int64_t rope_dim, const int64_t* pos, const float* cos, const float* sin) = 0;

  // MLA causal attention over B sequences of S tokens and H heads (training / prefill form, K/V expanded):
  //   q   (B*S, H*(dn+dr))  per head: q_nope(dn) | q_pe(dr), RoPE applied
  //   kv  (B*S, H*(dn+dv))  per head: k_nope(dn) | v(dv)
  //   kpe (B*S, ldkpe)      k_pe(dr), RoPE applied, shared by all heads
  //   o   (B*S, H*dv);  probs (B, H, S, S) softmax probabilities kept for backward when non-null
  virtual void mla_attention_forward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, int64_t B,
                                     int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale, float* o,
                                     float* probs) = 0;

  // out(n) = silu(gate) * up; gate/up rows of `cols` with strides, out contiguous (rows, cols)
  virtual void swiglu_forward(const float* gate, const float* up, int64_t rows, int64_t cols, int64_t ld_in,
                              float* out) = 0;

  // out(n, dim) = table[ids[i]]
  virtual void embedding_forward(const int64_t* ids, int64_t n, const float* table, int64_t dim, float* out) = 0;

  // Router of one MoE layer for T tokens (sigmoid scoring, noaux_tc): scores = sigmoid(logits (T,E)); selection
  // uses scores + bias, limited as RouterSpec says (nodes, then groups), then top-k. idx (T,k) ascending expert id;
  // weight (T,k) = unbiased scores normalised (if norm) * scale.
  virtual void router_forward(const float* logits, const float* bias, int64_t T, const RouterSpec& r, float* scores,
                              int32_t* idx, float* weight) = 0;

  // ---- MoE permutation: dispatch and combine as row gathers, fused with the combine weights ----------------
  // Deterministic everywhere (a token's rows are summed in slot order; no atomics), so the CPU stays the oracle.
  // out (rows, D) = x rows src[i] (x rows ldx apart): the dispatch gather and the expert-parallel reorderings.
  virtual void gather_rows(const float* x, int64_t ldx, const int32_t* src, int64_t rows, int64_t D, float* out) = 0;
  // out (T, D) += sum_k weight[t,k] * y[pos[t,k]] in slot order k = 0..K-1 (weight null: plain sums): the combine
  // (pos: the grouped row of each (token, slot)), and with weight null the gradient of the dispatch gather.
  virtual void combine_rows(const float* y, const int32_t* pos, const float* weight, int64_t T, int64_t K, int64_t D,
                            float* out) = 0;

  // ---- vocabulary-parallel pieces (tensor parallelism: this rank holds vocabulary rows [v0, v0 + vl)) -----------
  // the slice of the embedding/cross-entropy slice ops that holds every id: the whole-vocabulary ops are these
  static constexpr int64_t kWholeVocabulary = INT64_MAX;
  // out (n, dim) = table[ids[i] - v0] for the ids in the slice, 0 for the others
  virtual void embedding_forward_slice(const int64_t* ids, int64_t n, const float* table, int64_t v0, int64_t vl,
                                       int64_t dim, float* out) = 0;
  // dtable[ids[i] - v0] += dy[i] for the ids in the slice, in token order (deterministic)
  virtual void embedding_backward_slice(const int64_t* ids, int64_t n, const float* dy, int64_t v0, int64_t vl,
                                        int64_t dim, float* dtable) = 0;
  // Per row of logits (rows, vl), this rank's columns: lse[r] = max + log(sum of the float exp(l - max), summed in
  // double); tgt[r] = the target's logit when targets[r] lies in the slice (tgt[r] untouched otherwise). Host outputs.
  virtual void cross_entropy_slice_forward(const float* logits, int64_t rows, int64_t vl, const int64_t* targets,
                                           int64_t v0, double* lse, double* tgt) = 0;
  // dlogits (rows, vl) = scale * (exp(logits - lse) - onehot(targets - v0)) with the global lse (rows); rows with
  // target < 0 get 0 (written)
  virtual void cross_entropy_slice_backward(const float* logits, const float* lse, int64_t rows, int64_t vl,
                                            const int64_t* targets, int64_t v0, float scale, float* dlogits) = 0;

  // ---- elementwise and copies: what the model's host loops did, now on the backend's memory (core/memory.h) -----
  // y(n) += x(n): the residual adds and gradient sums
  virtual void add(const float* x, int64_t n, float* y) = 0;
  // dst (rows, cols; rows ldd apart) = src (rows lds apart): slices, concatenations and splits of row blocks
  virtual void copy_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) = 0;
  // x(n) = v
  virtual void fill(float* x, int64_t n, float v) = 0;

  // ---- backward ops: gradients accumulate (+=) into dx/dw outputs unless stated otherwise ----------------

  // dx(rows, dim) += d/dx of rmsnorm given dy(rows, dim); dw(dim) += sum_r dy * x * rstd. rstd from the forward.
  virtual void rmsnorm_backward(const float* x, int64_t ldx, const float* w, const float* rstd, const float* dy,
                                int64_t rows, int64_t dim, float* dx, int64_t lddx, float* dw) = 0;
  // In place: rotate back (the transpose of the forward rotation), the gradient of RoPE.
  virtual void rope_backward(float* dx, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride,
                             int64_t rope_dim, const int64_t* pos, const float* cos, const float* sin) = 0;
  // Gradients of mla_attention_forward given do (B*S, H*dv) and the saved probs: dq (B*S, H*(dn+dr)) and
  // dkv (B*S, H*(dn+dv)) are written; dkpe (B*S, ldkpe) accumulates over heads (+=).
  virtual void mla_attention_backward(const float* q, const float* kv, const float* kpe, int64_t ldkpe,
                                      const float* probs, const float* dout, int64_t B, int64_t S, int64_t H,
                                      int64_t dn, int64_t dr, int64_t dv, float scale, float* dq, float* dkv,
                                      float* dkpe) = 0;
  // The same attention in the FlashAttention-2 form: no (S,S) matrix is ever kept (at S = 4096, 128 heads, probs
  // would be 8 GiB per sequence and layer). Same q/kv/kpe conventions as mla_attention_forward.
  //   o   (B*S, H*dv)
  //   lse (B, H, S)  log-sum-exp of row i's scaled scores over keys 0..i: the one number per row that lets the
  //                  backward recompute P(i,j) = exp(scale q_i.k_j - lse_i) instead of storing it
  virtual void mla_flash_attention_forward(const float* q, const float* kv, const float* kpe, int64_t ldkpe,
                                           int64_t B, int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv,
                                           float scale, float* o, float* lse) = 0;
  // Gradients of mla_flash_attention_forward with mla_attention_backward's semantics (dq, dkv written; dkpe
  // accumulates over heads +=), from o and lse (B, H, S) of the forward: P is recomputed block by block and the
  // softmax gradient uses D_i = rowsum(dout_i * o_i) (= rowsum(dP_i * P_i), FlashAttention-2), so again nothing S x S.
  virtual void mla_flash_attention_backward(const float* q, const float* kv, const float* kpe, int64_t ldkpe,
                                            const float* o, const float* lse, const float* dout, int64_t B, int64_t S,
                                            int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale, float* dq,
                                            float* dkv, float* dkpe) = 0;
  // dgate/dup (rows, cols) written from dout (rows, cols)
  virtual void swiglu_backward(const float* gate, const float* up, const float* dout, int64_t rows, int64_t cols,
                               float* dgate, float* dup) = 0;
  // dtable[ids[i]] += dy[i]
  virtual void embedding_backward(const int64_t* ids, int64_t n, const float* dy, int64_t dim, float* dtable) = 0;
  // dlogits (rows, V) = scale * (softmax(logits) - onehot(target)); rows with target < 0 get 0 (written). lse: the
  // per-row log-sum-exp the forward kept, so that the softmax is computed once more, not twice.
  virtual void cross_entropy_backward(const float* logits, const float* lse, int64_t rows, int64_t V,
                                      const int64_t* targets, float scale, float* dlogits) = 0;
  // Router gradient to the logits (T, E) (written). Two sources: the combine weights (dweight (T,K), through the
  // normalisation and the scale; the selection itself is discrete and the bias gets none) and the sequence-wise
  // balance loss through P_i: for token t of sequence b, d/ds_te of aux_coef * sum_i f_bi s_ti / Z_t where
  // Z_t = sum_j s_tj and f (B, E) already holds E/(K*T_seq) * count. seq_len: tokens per sequence.
  virtual void router_backward(const float* scores, const int32_t* idx, const float* dweight, int64_t T,
                               int64_t E, int64_t K, bool norm, float scale, int64_t seq_len, const float* f,
                               float aux_coef, float* dlogits) = 0;

  // The combine's gradients (written): dy[pos[t,k]] = weight[t,k] * dout[t] (rows no (t,k) names stay untouched)
  // and dweight[t,k] = dout[t] . y[pos[t,k]] accumulated in double.
  virtual void combine_rows_backward(const float* dout, const float* y, const int32_t* pos, const float* weight,
                                     int64_t T, int64_t K, int64_t D, float* dy, float* dweight) = 0;

  // Mean-free cross entropy: per row loss_r = logsumexp(logits_r) - logits_r[target_r] (rows with target < 0 give
  // 0 and do not count). Returns the sum of the row losses (double) and writes the counted rows to *count and the
  // per-row log-sum-exp to lse (rows) when non-null.
  virtual double cross_entropy_forward(const float* logits, int64_t rows, int64_t V, const int64_t* targets,
                                       int64_t* count, float* lse = nullptr) = 0;

  // ---- optimizer ops: the arithmetic of the ZeRO-1 AdamW (optim/adamw.cpp) on this rank's flat shards, and the
  // precision conversions. Bit-identical on every backend (optim/adamw_math.h, core/numerics.h), NaN payloads
  // aside (a GPU's arithmetic returns its canonical NaN). -------------------------------------------------------

  // One flat shard of the AdamW state (AdamW::Bucket): n elements of FP32 master weights, gradients and per-element
  // weight-decay flags, and the moments in FP32 (m, v) or in BF16 (m16, v16: the upper halves of FP32s, rounded to
  // nearest even after each update): exactly one pair is set. An empty shard (n = 0) may have no buffers at all.
  struct AdamWShard {
    float* master = nullptr;         // (n) FP32 master weights, updated in place
    const float* grad = nullptr;     // (n) the reduced gradients, before grad_scale
    const uint8_t* decay = nullptr;  // (n) 1: decoupled weight decay on this element (>= 2-D weights)
    float* m = nullptr;              // (n) FP32 first moment, or
    float* v = nullptr;              // (n) FP32 second moment
    uint16_t* m16 = nullptr;         // (n) BF16 first moment, or
    uint16_t* v16 = nullptr;         // (n) BF16 second moment
    // (n) optional: the model's weights, written by the update itself -- the new master, rounded to BF16 (nearest
    // even) when bf16_weights -- where they are this shard's elements contiguously (a group of one's bucket), so that
    // no separate copy of the master into the model follows
    float* weights = nullptr;
    bool bf16_weights = false;
    int64_t n = 0;
  };
  struct AdamWHyper {
    double lr = 0, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
    double grad_scale = 1.0;  // the clip coefficient the gradients are multiplied by (1: not)
    int64_t t = 1;            // the step this update makes (1 for the first): the bias corrections 1 - beta^t
  };
  // One AdamW step on `count` shards in one call (multi-tensor): per element
  //   g *= grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; if decay: p *= 1 - lr wd;
  //   p -= lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
  // in FP32 with exactly the operations of optim/adamw_math.h (adamw_element). dsv3::Error when a non-empty shard
  // has both or neither moment pair.
  virtual void adamw_update(const AdamWShard* shards, int count, const AdamWHyper& h) = 0;
  // sum of x[i]^2 in double (the grad norm's partial): chunks of 4096 elements, each summed from its first element in
  // order, the chunk sums added in chunk order. A float's square is exact in double, so this order fixes every bit:
  // the same result on every backend and thread count.
  virtual double sum_squares(const float* x, int64_t n) = 0;
  // out(n) = the BF16 of x (round to nearest even; NaN stays NaN, quieted; no flush of subnormals)
  virtual void to_bf16(const float* x, int64_t n, uint16_t* out) = 0;
  // out(n) = x widened to FP32 (exact)
  virtual void from_bf16(const uint16_t* x, int64_t n, float* out) = 0;
  // The block-wise FP8 e4m3 weight format (io/fp8.h): out[r, c] = decode(codes[r, c]) * scale_inv[r / br, c / bc]
  // (one FP32 multiply); codes (rows, cols), scale_inv (ceil(rows/br), ceil(cols/bc)). The same bits on every backend
  // but for the payload of NaNs (from the NaN codes 0x7F/0xFF).
  virtual void dequantize_fp8(const uint8_t* codes, const float* scale_inv, int64_t rows, int64_t cols,
                              int64_t block_rows, int64_t block_cols, float* out) = 0;

 protected:
  bool bf16_matmul_ = false;
  bool flash_attention_ = false;
  bool bf16_attention_ = false;
};

// Deferred synchronisation for a scope (the training step); the device has finished everything when it ends.
class DeferredSync {
 public:
  explicit DeferredSync(Backend& be) : be_(be) { be_.set_deferred_sync(true); }
  ~DeferredSync() {
    be_.set_deferred_sync(false);
    be_.synchronize();
  }
  DeferredSync(const DeferredSync&) = delete;
  DeferredSync& operator=(const DeferredSync&) = delete;

 private:
  Backend& be_;
};

// The default grouped GEMMs: one gemm per non-empty group (inline: the Backend stays header-only for the libraries
// that implement it without the core library, e.g. the CUDA benchmark).
inline void Backend::gemm_grouped(bool tb, int64_t groups, const int64_t* row0, int64_t N, int64_t K, float alpha,
                           const float* A, int64_t lda, const float* B, int64_t strideB, int64_t ldb, float beta,
                           float* C, int64_t ldc) {
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t m = row0[g + 1] - row0[g];
    if (m > 0)
      gemm(false, tb, m, N, K, alpha, A + row0[g] * lda, lda, B + g * strideB, ldb, beta, C + row0[g] * ldc, ldc);
  }
}

inline void Backend::gemm_grouped_tn(int64_t groups, const int64_t* row0, int64_t M, int64_t N, float alpha, const float* A,
                              int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t strideC,
                              int64_t ldc) {
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k = row0[g + 1] - row0[g];
    if (k > 0)
      gemm(true, false, M, N, k, alpha, A + row0[g] * lda, lda, B + row0[g] * ldb, ldb, beta, C + g * strideC, ldc);
  }
}

// "cpu" or "cuda"; throws dsv3::Error when the device is not available (e.g. no GPU, or built without CUDA).
std::unique_ptr<Backend> make_backend(const std::string& device, int threads = 0);
// the deck's backend: run.device, run.threads, run.matmul_dtype, run.attention, run.attention_dtype
class Deck;
std::unique_ptr<Backend> make_backend(const Deck& deck);

}  // namespace dsv3
