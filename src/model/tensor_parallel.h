// defines: TensorGroup, vocab_embedding_forward, vocab_embedding_backward, vocab_cross_entropy_forward,
//          vocab_cross_entropy_backward
// Tensor parallelism inside the model (Megatron's scheme). The residual stream is replicated over the tp group;
// each tp region starts from it (column-parallel: q_b/kv_b by heads, gate/up by intermediate columns) and ends in
// a partial sum (row-parallel: o_proj, down_proj) that one all-reduce over tp completes. In backward the gradients
// flowing into replicated tensors are all-reduced the same way, so that every replicated computation (norms,
// q_a/kv_a, the router, eh_proj) and its parameter gradients stay bit-identical on the ranks of a tp group.
// The vocabulary is split into tp equal ranges (no padding: tp must divide vocab_size): the embedding of an id
// outside this rank's range is a zero row before the all-reduce; the LM head's logits stay sharded, and the cross
// entropy combines per-rank log-sum-exps and the target logit of the owning rank (the full logits are never
// gathered in training). A TensorGroup of size 1 calls the backend ops unchanged.
// Sequence parallelism (sp, Megatron's): between the tp regions the residual stream, the RMSNorms and the
// elementwise adds hold only this rank's rows: the micro-batch's B*S tokens flattened (b-major) and cut into tp
// contiguous slices of T/tp rows, rank r holding rows [r*T/tp, (r+1)*T/tp) (tp must divide B*S). A tp region
// starts with an all-gather of its input rows (gather_rows) and ends with a reduce-scatter of its partial output
// (reduce_scatter_rows) instead of the all-reduce; in backward the transposes (the output gradient all-gathered, the
// input gradient reduce-scattered). The routed experts' 1/tp token slice is this same slice.
#pragma once
#include <cstdint>
#include <vector>

#include "ops/backend.h"

namespace dsv3 {

class Comm;

struct TensorGroup {
  const Comm* comm = nullptr;
  int size = 1, rank = 0;
  bool sp = false;  // sequence parallelism (never with size 1)
  // the rows of T that this rank holds between tp regions: T/size under sp, else T
  int64_t sp_rows(int64_t T) const { return sp ? T / size : T; }
  // this group without sequence parallelism (a replicated residual: generation, the MTP's embedding)
  TensorGroup without_sp() const {
    TensorGroup g = *this;
    g.sp = false;
    return g;
  }
  // (rows_local, cols) of each rank -> all (size*rows_local, cols), rank order = token order (a copy for size 1)
  void gather_rows(const float* local, int64_t rows_local, int64_t cols, float* all) const;
  // partial (size*rows_local, cols) on each rank -> local (rows_local, cols): this rank's rows of the sum over tp
  void reduce_scatter_rows(const float* partial, int64_t rows_local, int64_t cols, float* local) const;
  // in-place sum over tp of a replicated parameter's gradient that each rank computed from its own rows (sp)
  void sum_replicated_grad(float* g, int64_t n) const { allreduce(g, n); }
  // in-place sum over the group (nothing for one rank): completes a row-parallel output or an input gradient
  void allreduce(float* x, int64_t n) const;
  // A tp region's result over all T rows as this rank's partial sums (its heads, columns, token slice) -> the sum
  // over the group: this rank's sp_rows(T) rows into out under sp (a reduce-scatter), else all T rows (an
  // all-reduce in place; out may be partial itself, else the sum is copied there).
  void sum_partial_rows(float* partial, int64_t T, int64_t cols, float* out) const;
  // (rows, cols) column slices on each rank -> (rows, size*cols) in rank order (logits for validation/generation)
  std::vector<float> gather_columns(const float* local, int64_t rows, int64_t cols) const;
};

// out (n, D) = the rows of ids from a vocab-parallel table (V/size, D) holding ids [rank*V/size, (rank+1)*V/size);
// under sp out is this rank's rows only (n/size, D): a reduce-scatter instead of the all-reduce
void vocab_embedding_forward(Backend& be, const TensorGroup& tp, const int64_t* ids, int64_t n, const float* table,
                             int64_t V, int64_t D, float* out);
// dtable (V/size, D) += dy rows of the ids in this rank's range (token order: deterministic)
void vocab_embedding_backward(Backend& be, const TensorGroup& tp, const int64_t* ids, int64_t n, const float* dy,
                              int64_t V, int64_t D, float* dtable);
// logits (rows, V/size): this rank's vocabulary slice. Returns the summed loss over rows with a target (the same
// on every rank), *count of those rows, lse (rows) the global log-sum-exp of each row.
double vocab_cross_entropy_forward(Backend& be, const TensorGroup& tp, const float* logits, int64_t rows, int64_t V,
                                   const int64_t* targets, int64_t* count, float* lse);
// dlogits (rows, V/size) = scale * (softmax - onehot) on this rank's slice; rows without a target: 0
void vocab_cross_entropy_backward(Backend& be, const TensorGroup& tp, const float* logits, const float* lse,
                                  int64_t rows, int64_t V, const int64_t* targets, float scale, float* dlogits);

}  // namespace dsv3
