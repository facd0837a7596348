#include "model/tensor_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/memory.h"
#include "parallel/comm.h"

namespace dsv3 {

namespace {
// a 1-rank group's "collective": a copy in the run's memory (core/memory.h), so device buffers stay on the device
void copy_floats(float* dst, const float* src, int64_t n) {
  if (n > 0 && dst != src) default_memory().copy(dst, src, sizeof(float) * (size_t)n);
}
}  // namespace

void TensorGroup::allreduce(float* x, int64_t n) const {
  if (size > 1) comm->allreduce_sum(GroupKind::tp, x, n);
}

void TensorGroup::gather_rows(const float* local, int64_t rows_local, int64_t cols, float* all) const {
  if (size == 1) {
    copy_floats(all, local, rows_local * cols);
    return;
  }
  comm->allgather(GroupKind::tp, local, all, rows_local * cols);
}

void TensorGroup::reduce_scatter_rows(const float* partial, int64_t rows_local, int64_t cols, float* local) const {
  if (size == 1) {
    copy_floats(local, partial, rows_local * cols);
    return;
  }
  comm->reduce_scatter(GroupKind::tp, partial, local, rows_local * cols);
}

void TensorGroup::sum_partial_rows(float* partial, int64_t T, int64_t cols, float* out) const {
  if (sp) return reduce_scatter_rows(partial, T / size, cols, out);
  allreduce(partial, T * cols);
  copy_floats(out, partial, T * cols);
}

std::vector<float> TensorGroup::gather_columns(const float* local, int64_t rows, int64_t cols) const {
  if (size == 1) return std::vector<float>(local, local + rows * cols);
  std::vector<float> all(size * rows * cols), out(rows * size * cols);
  comm->allgather(GroupKind::tp, local, all.data(), rows * cols);
  for (int r = 0; r < size; ++r)
    for (int64_t i = 0; i < rows; ++i)
      std::copy_n(all.data() + (r * rows + i) * cols, cols, out.data() + i * size * cols + r * cols);
  return out;
}

void vocab_embedding_forward(Backend& be, const TensorGroup& tp, const int64_t* ids, int64_t n, const float* table,
                             int64_t V, int64_t D, float* out) {
  if (tp.size == 1) return be.embedding_forward(ids, n, table, D, out);
  const int64_t Vl = V / tp.size, v0 = tp.rank * Vl;
  Floats part(tp.sp ? n * D : 0);
  float* o = tp.sp ? part.data() : out;
  be.embedding_forward_slice(ids, n, table, v0, Vl, D, o);
  tp.sum_partial_rows(o, n, D, out);  // exactly one rank contributes each row: the sum is the row itself
}

void vocab_embedding_backward(Backend& be, const TensorGroup& tp, const int64_t* ids, int64_t n, const float* dy,
                              int64_t V, int64_t D, float* dtable) {
  if (tp.size == 1) return be.embedding_backward(ids, n, dy, D, dtable);
  const int64_t Vl = V / tp.size, v0 = tp.rank * Vl;
  be.embedding_backward_slice(ids, n, dy, v0, Vl, D, dtable);
}

double vocab_cross_entropy_forward(Backend& be, const TensorGroup& tp, const float* logits, int64_t rows, int64_t V,
                                   const int64_t* targets, int64_t* count, float* lse) {
  if (tp.size == 1) return be.cross_entropy_forward(logits, rows, V, targets, count, lse);
  const int64_t Vl = V / tp.size, v0 = tp.rank * Vl;
  // per row: this slice's log-sum-exp (slot `rank` of `part`, others 0) and the target logit if this slice owns it;
  // one double all-reduce gives every rank every slice's value
  std::vector<double> part((tp.size + 1) * rows, 0.0);
  double* tgt = part.data() + tp.size * rows;
  be.cross_entropy_slice_forward(logits, rows, Vl, targets, v0, part.data() + tp.rank * rows, tgt);
  tp.comm->allreduce_sum(GroupKind::tp, part.data(), (int64_t)part.size());
  double total = 0;
  int64_t n = 0;
  std::vector<float> lse_h(rows);  // on the host, then where lse lives (device memory under run.device = cuda)
  for (int64_t r = 0; r < rows; ++r) {
    double mx = part[r];
    for (int k = 1; k < tp.size; ++k) mx = std::max(mx, part[k * rows + r]);
    double s = 0;
    for (int k = 0; k < tp.size; ++k) s += std::exp(part[k * rows + r] - mx);
    const double ls = std::log(s) + mx;
    lse_h[r] = (float)ls;
    if (targets[r] >= 0) total += ls - tgt[r], ++n;
  }
  if (lse && rows > 0) default_memory().copy(lse, lse_h.data(), sizeof(float) * (size_t)rows);
  if (count) *count = n;
  return total;
}

void vocab_cross_entropy_backward(Backend& be, const TensorGroup& tp, const float* logits, const float* lse,
                                  int64_t rows, int64_t V, const int64_t* targets, float scale, float* dlogits) {
  if (tp.size == 1) return be.cross_entropy_backward(logits, lse, rows, V, targets, scale, dlogits);
  const int64_t Vl = V / tp.size, v0 = tp.rank * Vl;
  be.cross_entropy_slice_backward(logits, lse, rows, Vl, targets, v0, scale, dlogits);
}

}  // namespace dsv3
