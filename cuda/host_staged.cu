// defines: dsv3::HostStagedCudaBackend — make_backend("cuda"): the CudaBackend ops on whatever pointers the model
// passes. Operands in the CUDA pool (cuda/managed_pool.cu: the Buffers of core/memory.h, i.e. the model's parameters,
// gradients, optimizer state and activations) are used in place; host operands (token ids, the routing tables the
// model builds on the host, tests' vectors) are staged: copied to a device arena, and the outputs copied back.
// Why both: the model's heavy tensors live in device memory, while a few small ones stay on the host by design (the
// MoE's counting sort runs there), and the golden checks and tests keep passing host vectors to the same backend.
// Synchronisation: an op returns finished, except in deferred mode (Backend::set_deferred_sync, the training step)
// where an op without host outputs returns as soon as it is queued. DSV3_OP_PROFILE=1 times every op (see below).
// Regions: a strided operand (rows with leading dimension ld) is copied with cudaMemcpy2D into a device region of
// the same pitch, so the op sees the same layout and only the bytes it may touch move; columns between rows that
// belong to other tensors are never written back. Accumulating outputs (+=) are copied in and out.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/error.h"
#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "device_buffer.cuh"
#include "optim/adamw_math.h"  // check_adamw_shards

namespace dsv3 {

namespace {

enum Dir { kIn = 1, kOut = 2, kInOut = 3 };

// one operand: `rows` rows of `row_bytes` bytes, `pitch_bytes` apart in host (and device) memory
struct Region {
  const void* host;
  size_t rows, row_bytes, pitch_bytes;
  int dir;
  void* dev = nullptr;
  bool resident = false;  // in the CUDA pool (managed memory): no copy
  size_t extent() const { return rows == 0 ? 0 : (rows - 1) * pitch_bytes + row_bytes; }
};

template <class T>
Region contiguous(const T* p, int64_t n, int dir) {
  return Region{p, n > 0 ? 1u : 0u, (size_t)std::max<int64_t>(n, 0) * sizeof(T), (size_t)std::max<int64_t>(n, 0) * sizeof(T), dir};
}
template <class T>
Region strided(const T* p, int64_t rows, int64_t cols, int64_t ld, int dir) {
  DSV3_CHECK(ld >= cols, "host-staged CUDA op: leading dimension " << ld << " < columns " << cols);
  return Region{p, (size_t)std::max<int64_t>(rows, 0), (size_t)cols * sizeof(T), (size_t)ld * sizeof(T), dir};
}

template <class I>
int64_t rows_for_ids(const I* ids, int64_t n) {  // table rows an id list touches: max id + 1
  int64_t mx = -1;
  for (int64_t i = 0; i < n; ++i) mx = std::max<int64_t>(mx, ids[i]);
  return mx + 1;
}

}  // namespace

class HostStagedCudaBackend final : public Backend {
 public:
  explicit HostStagedCudaBackend(int device) : be_(device) {
    const char* p = std::getenv("DSV3_OP_PROFILE");
    profile_ = p && *p && std::string(p) != "0";
  }
  // DSV3_OP_PROFILE=1: per op, the calls, the wall time (each op ends with a synchronisation, so this is its GPU
  // time plus the launch) and the bytes staged through host memory; and the host time between ops
  ~HostStagedCudaBackend() override {
    if (!profile_ || prof_.empty()) return;
    std::vector<std::pair<std::string, Prof>> v(prof_.begin(), prof_.end());
    std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.second.seconds > b.second.seconds; });
    double total = 0, gaps = 0;
    for (const auto& [n, p] : v) total += p.seconds, gaps += p.gap_before;
    std::fprintf(stderr, "op profile (DSV3_OP_PROFILE%s): %.3f s in ops, %.3f s of host time between them\n",
                 profile_reset_ ? ", the iterations after the first" : "", total, gaps);
    std::fprintf(stderr, "  %-32s %8s %10s %6s %12s %12s %8s\n", "op", "calls", "seconds", "%", "staged MiB",
                 "host gap s", "TFLOP/s");
    for (const auto& [n, p] : v) {
      std::fprintf(stderr, "  %-32s %8lld %10.4f %6.1f %12.1f %12.4f", n.c_str(), (long long)p.calls, p.seconds,
                   total > 0 ? 100 * p.seconds / total : 0.0, p.staged_bytes / 1048576.0, p.gap_before);
      if (p.flops > 0 && p.seconds > 0) std::fprintf(stderr, " %8.1f", p.flops / p.seconds / 1e12);
      std::fprintf(stderr, "\n");
    }
  }
  std::string name() const override { return "cuda"; }
  // deferred: ops with only device outputs return unfinished (Backend::set_deferred_sync); the op profile times each
  // op, so it keeps them synchronous
  void set_deferred_sync(bool on) override { deferred_ = on && !profile_; }
  void synchronize() override { be_.synchronize(); }
  void reset_profile() override {
    prof_.clear();
    have_last_ = false;
    profile_reset_ = true;
  }
  void set_bf16_matmul(bool on) override {
    bf16_matmul_ = on;
    be_.set_bf16_matmul(on);
  }
  void set_bf16_attention(bool on) override {
    bf16_attention_ = on;
    be_.set_bf16_attention(on);
  }

  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) override {
    // A (M,K) or (K,M) and B (K,N) or (N,K) as stored; C read too when beta != 0
    std::vector<Region> r{ta ? strided(A, K, M, lda, kIn) : strided(A, M, K, lda, kIn),
                          tb ? strided(B, N, K, ldb, kIn) : strided(B, K, N, ldb, kIn),
                          strided(C, M, N, ldc, c_dir(beta))};
    // the profile keys GEMMs by shape: which of them are slow is what the next optimisation needs to know
    next_flops_ = 2.0 * (double)M * (double)N * (double)K;
    const std::string name = profile_ ? "gemm " + std::to_string(M) + "x" + std::to_string(N) + "x" +
                                            std::to_string(K) + (ta ? " T" : " N") + (tb ? "T" : "N")
                                      : std::string("gemm");
    run(r, name.c_str(), [&] { be_.gemm(ta, tb, M, N, K, alpha, f(r[0]), lda, f(r[1]), ldb, beta, f(r[2]), ldc); });
  }
  void rmsnorm_forward(const float* x, int64_t ldx, const float* w, float eps, int64_t rows, int64_t dim, float* y,
                       float* rstd) override {
    std::vector<Region> r{strided(x, rows, dim, ldx, kIn), contiguous(w, dim, kIn), contiguous(y, rows * dim, kOut),
                          contiguous(rstd, rows, kOut)};
    run(r, __func__, [&] { be_.rmsnorm_forward(f(r[0]), ldx, f(r[1]), eps, rows, dim, f(r[2]), f(r[3])); });
  }
  void add_rmsnorm_forward(const float* res, float* x, const float* w, float eps, int64_t rows, int64_t dim, float* y,
                           float* rstd) override {
    std::vector<Region> r{contiguous(res, rows * dim, kIn), contiguous(x, rows * dim, kInOut), contiguous(w, dim, kIn),
                          contiguous(y, rows * dim, kOut), contiguous(rstd, rows, kOut)};
    run(r, __func__,
        [&] { be_.add_rmsnorm_forward(f(r[0]), f(r[1]), f(r[2]), eps, rows, dim, f(r[3]), f(r[4])); });
  }
  void rmsnorm_backward(const float* x, int64_t ldx, const float* w, const float* rstd, const float* dy, int64_t rows,
                        int64_t dim, float* dx, int64_t lddx, float* dw) override {
    std::vector<Region> r{strided(x, rows, dim, ldx, kIn),     contiguous(w, dim, kIn),
                          contiguous(rstd, rows, kIn),         contiguous(dy, rows * dim, kIn),
                          strided(dx, rows, dim, lddx, kInOut), contiguous(dw, dim, kInOut)};
    run(r, __func__, [&] { be_.rmsnorm_backward(f(r[0]), ldx, f(r[1]), f(r[2]), f(r[3]), rows, dim, f(r[4]), lddx, f(r[5])); });
  }
  void rope_forward(float* x, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride, int64_t rope_dim,
                    const int64_t* pos, const float* cos, const float* sin) override {
    rope(false, x, rows, ldx, n_heads, head_stride, rope_dim, pos, cos, sin);
  }
  void rope_backward(float* dx, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride, int64_t rope_dim,
                     const int64_t* pos, const float* cos, const float* sin) override {
    rope(true, dx, rows, ldx, n_heads, head_stride, rope_dim, pos, cos, sin);
  }
  void mla_attention_forward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, int64_t B, int64_t S,
                             int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale, float* o,
                             float* probs) override {
    const int64_t T = B * S;
    std::vector<Region> r{contiguous(q, T * H * (dn + dr), kIn), contiguous(kv, T * H * (dn + dv), kIn),
                          strided(kpe, T, dr, ldkpe, kIn), contiguous(o, T * H * dv, kOut),
                          contiguous(probs, B * H * S * S, kOut)};
    run(r, __func__, [&] { be_.mla_attention_forward(f(r[0]), f(r[1]), f(r[2]), ldkpe, B, S, H, dn, dr, dv, scale, f(r[3]),
                                           f(r[4])); });
  }
  void mla_attention_backward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, const float* probs,
                              const float* dout, int64_t B, int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv,
                              float scale, float* dq, float* dkv, float* dkpe) override {
    const int64_t T = B * S;
    std::vector<Region> r{contiguous(q, T * H * (dn + dr), kIn),   contiguous(kv, T * H * (dn + dv), kIn),
                          strided(kpe, T, dr, ldkpe, kIn),         contiguous(probs, B * H * S * S, kIn),
                          contiguous(dout, T * H * dv, kIn),       contiguous(dq, T * H * (dn + dr), kOut),
                          contiguous(dkv, T * H * (dn + dv), kOut), strided(dkpe, T, dr, ldkpe, kInOut)};
    run(r, __func__, [&] { be_.mla_attention_backward(f(r[0]), f(r[1]), f(r[2]), ldkpe, f(r[3]), f(r[4]), B, S, H, dn, dr,
                                            dv, scale, f(r[5]), f(r[6]), f(r[7])); });
  }
  void mla_flash_attention_forward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, int64_t B,
                                   int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale, float* o,
                                   float* lse) override {
    const int64_t T = B * S;
    std::vector<Region> r{contiguous(q, T * H * (dn + dr), kIn), contiguous(kv, T * H * (dn + dv), kIn),
                          strided(kpe, T, dr, ldkpe, kIn), contiguous(o, T * H * dv, kOut),
                          contiguous(lse, B * H * S, kOut)};
    run(r, __func__, [&] { be_.mla_flash_attention_forward(f(r[0]), f(r[1]), f(r[2]), ldkpe, B, S, H, dn, dr, dv, scale,
                                                 f(r[3]), f(r[4])); });
  }
  void mla_flash_attention_backward(const float* q, const float* kv, const float* kpe, int64_t ldkpe, const float* o,
                                    const float* lse, const float* dout, int64_t B, int64_t S, int64_t H, int64_t dn,
                                    int64_t dr, int64_t dv, float scale, float* dq, float* dkv,
                                    float* dkpe) override {
    const int64_t T = B * S;
    std::vector<Region> r{contiguous(q, T * H * (dn + dr), kIn),    contiguous(kv, T * H * (dn + dv), kIn),
                          strided(kpe, T, dr, ldkpe, kIn),          contiguous(o, T * H * dv, kIn),
                          contiguous(lse, B * H * S, kIn),          contiguous(dout, T * H * dv, kIn),
                          contiguous(dq, T * H * (dn + dr), kOut),  contiguous(dkv, T * H * (dn + dv), kOut),
                          strided(dkpe, T, dr, ldkpe, kInOut)};
    run(r, __func__, [&] { be_.mla_flash_attention_backward(f(r[0]), f(r[1]), f(r[2]), ldkpe, f(r[3]), f(r[4]), f(r[5]), B, S,
                                                  H, dn, dr, dv, scale, f(r[6]), f(r[7]), f(r[8])); });
  }
  void swiglu_forward(const float* gate, const float* up, int64_t rows, int64_t cols, int64_t ld_in,
                      float* out) override {
    std::vector<Region> r{strided(gate, rows, cols, ld_in, kIn), strided(up, rows, cols, ld_in, kIn),
                          contiguous(out, rows * cols, kOut)};
    run(r, __func__, [&] { be_.swiglu_forward(f(r[0]), f(r[1]), rows, cols, ld_in, f(r[2])); });
  }
  void swiglu_backward(const float* gate, const float* up, const float* dout, int64_t rows, int64_t cols,
                       float* dgate, float* dup) override {
    const int64_t n = rows * cols;
    std::vector<Region> r{contiguous(gate, n, kIn), contiguous(up, n, kIn), contiguous(dout, n, kIn),
                          contiguous(dgate, n, kOut), contiguous(dup, n, kOut)};
    run(r, __func__, [&] { be_.swiglu_backward(f(r[0]), f(r[1]), f(r[2]), rows, cols, f(r[3]), f(r[4])); });
  }
  void embedding_forward(const int64_t* ids, int64_t n, const float* table, int64_t dim, float* out) override {
    std::vector<Region> r{contiguous(ids, n, kIn), contiguous(table, rows_for_ids(ids, n) * dim, kIn),
                          contiguous(out, n * dim, kOut)};
    run(r, __func__, [&] { be_.embedding_forward(i64(r[0]), n, f(r[1]), dim, f(r[2])); });
  }
  void embedding_backward(const int64_t* ids, int64_t n, const float* dy, int64_t dim, float* dtable) override {
    std::vector<Region> r{contiguous(ids, n, kIn), contiguous(dy, n * dim, kIn),
                          contiguous(dtable, rows_for_ids(ids, n) * dim, kInOut)};
    run(r, __func__, [&] { be_.embedding_backward(i64(r[0]), n, f(r[1]), dim, f(r[2])); });
  }
  void embedding_forward_slice(const int64_t* ids, int64_t n, const float* table, int64_t v0, int64_t vl, int64_t dim,
                               float* out) override {
    std::vector<Region> r{contiguous(ids, n, kIn), contiguous(table, vl * dim, kIn), contiguous(out, n * dim, kOut)};
    run(r, __func__, [&] { be_.embedding_forward_slice(i64(r[0]), n, f(r[1]), v0, vl, dim, f(r[2])); });
  }
  void embedding_backward_slice(const int64_t* ids, int64_t n, const float* dy, int64_t v0, int64_t vl, int64_t dim,
                                float* dtable) override {
    std::vector<Region> r{contiguous(ids, n, kIn), contiguous(dy, n * dim, kIn), contiguous(dtable, vl * dim, kInOut)};
    run(r, __func__, [&] { be_.embedding_backward_slice(i64(r[0]), n, f(r[1]), v0, vl, dim, f(r[2])); });
  }
  // lse and tgt are host outputs (doubles); tgt keeps its values where the target is elsewhere: copied in too
  void cross_entropy_slice_forward(const float* logits, int64_t rows, int64_t vl, const int64_t* targets, int64_t v0,
                                   double* lse, double* tgt) override {
    std::vector<Region> r{contiguous(logits, rows * vl, kIn), contiguous(targets, rows, kIn),
                          contiguous(lse, rows, kOut), contiguous(tgt, rows, kInOut)};
    run(r, __func__, [&] {
      be_.cross_entropy_slice_forward(f(r[0]), rows, vl, i64(r[1]), v0, static_cast<double*>(r[2].dev),
                                      static_cast<double*>(r[3].dev));
    });
  }
  void cross_entropy_slice_backward(const float* logits, const float* lse, int64_t rows, int64_t vl,
                                    const int64_t* targets, int64_t v0, float scale, float* dlogits) override {
    std::vector<Region> r{contiguous(logits, rows * vl, kIn), contiguous(lse, rows, kIn),
                          contiguous(targets, rows, kIn), contiguous(dlogits, rows * vl, kOut)};
    run(r, __func__,
        [&] { be_.cross_entropy_slice_backward(f(r[0]), f(r[1]), rows, vl, i64(r[2]), v0, scale, f(r[3])); });
  }
  void add(const float* x, int64_t n, float* y) override {
    std::vector<Region> r{contiguous(x, n, kIn), contiguous(y, n, kInOut)};
    run(r, __func__, [&] { be_.add(f(r[0]), n, f(r[1])); });
  }
  void copy_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) override {
    std::vector<Region> r{strided(src, rows, cols, lds, kIn), strided(dst, rows, cols, ldd, kOut)};
    run(r, __func__, [&] { be_.copy_rows(f(r[0]), lds, rows, cols, f(r[1]), ldd); });
  }
  void fill(float* x, int64_t n, float v) override {
    std::vector<Region> r{contiguous(x, n, kOut)};
    run(r, __func__, [&] { be_.fill(f(r[0]), n, v); });
  }
  void router_forward(const float* logits, const float* bias, int64_t T, const RouterSpec& rs, float* scores,
                      int32_t* idx, float* weight) override {
    std::vector<Region> r{contiguous(logits, T * rs.E, kIn), contiguous(bias, rs.E, kIn),
                          contiguous(scores, T * rs.E, kOut), contiguous(idx, T * rs.k, kOut),
                          contiguous(weight, T * rs.k, kOut)};
    run(r, __func__, [&] { be_.router_forward(f(r[0]), f(r[1]), T, rs, f(r[2]), static_cast<int32_t*>(r[3].dev), f(r[4])); });
  }
  void gather_rows(const float* x, int64_t ldx, const int32_t* src, int64_t rows, int64_t D, float* out) override {
    std::vector<Region> r{strided(x, rows_for_ids(src, rows), D, ldx, kIn), contiguous(src, rows, kIn),
                          contiguous(out, rows * D, kOut)};
    run(r, __func__, [&] { be_.gather_rows(f(r[0]), ldx, static_cast<const int32_t*>(r[1].dev), rows, D, f(r[2])); });
  }
  void combine_rows(const float* y, const int32_t* pos, const float* weight, int64_t T, int64_t K, int64_t D,
                    float* out) override {
    std::vector<Region> r{contiguous(y, rows_for_ids(pos, T * K) * D, kIn), contiguous(pos, T * K, kIn),
                          contiguous(weight, weight ? T * K : 0, kIn), contiguous(out, T * D, kInOut)};
    run(r, __func__, [&] {
      be_.combine_rows(f(r[0]), static_cast<const int32_t*>(r[1].dev), weight ? f(r[2]) : nullptr, T, K, D, f(r[3]));
    });
  }
  void combine_rows_backward(const float* dout, const float* y, const int32_t* pos, const float* weight, int64_t T,
                             int64_t K, int64_t D, float* dy, float* dweight) override {
    const int64_t yrows = rows_for_ids(pos, T * K);
    // dy: only the rows pos names are written; the others must survive the copy back, so dy is copied in too
    std::vector<Region> r{contiguous(dout, T * D, kIn), contiguous(y, yrows * D, kIn), contiguous(pos, T * K, kIn),
                          contiguous(weight, T * K, kIn), contiguous(dy, yrows * D, kInOut),
                          contiguous(dweight, T * K, kOut)};
    run(r, __func__, [&] {
      be_.combine_rows_backward(f(r[0]), f(r[1]), static_cast<const int32_t*>(r[2].dev), f(r[3]), T, K, D, f(r[4]),
                                f(r[5]));
    });
  }
  void router_backward(const float* scores, const int32_t* idx, const float* dweight, int64_t T, int64_t E, int64_t K,
                       bool norm, float scale, int64_t seq_len, const float* f_, float aux_coef,
                       float* dlogits) override {
    const int64_t n_seq = seq_len > 0 ? (T + seq_len - 1) / seq_len : 0;
    std::vector<Region> r{contiguous(scores, T * E, kIn), contiguous(idx, T * K, kIn), contiguous(dweight, T * K, kIn),
                          contiguous(f_, n_seq * E, kIn), contiguous(dlogits, T * E, kOut)};
    run(r, __func__, [&] { be_.router_backward(f(r[0]), static_cast<const int32_t*>(r[1].dev), f(r[2]), T, E, K, norm, scale,
                                     seq_len, f(r[3]), aux_coef, f(r[4])); });
  }
  void cross_entropy_backward(const float* logits, const float* lse, int64_t rows, int64_t V, const int64_t* targets,
                              float scale, float* dlogits) override {
    std::vector<Region> r{contiguous(logits, rows * V, kIn), contiguous(lse, rows, kIn), contiguous(targets, rows, kIn),
                          contiguous(dlogits, rows * V, kOut)};
    run(r, __func__, [&] { be_.cross_entropy_backward(f(r[0]), f(r[1]), rows, V, i64(r[2]), scale, f(r[3])); });
  }
  double cross_entropy_forward(const float* logits, int64_t rows, int64_t V, const int64_t* targets, int64_t* count,
                               float* lse) override {
    std::vector<Region> r{contiguous(logits, rows * V, kIn), contiguous(targets, rows, kIn),
                          contiguous(lse, rows, kOut)};
    double loss = 0;
    run(r, __func__, [&] { loss = be_.cross_entropy_forward(f(r[0]), rows, V, i64(r[1]), count, f(r[2])); });
    return loss;
  }
  // every shard's master weights and moments in and out, gradients and decay flags in (5 regions per shard)
  void adamw_update(const AdamWShard* shards, int count, const AdamWHyper& h) override {
    check_adamw_shards(shards, count);
    std::vector<Region> r;
    for (int s = 0; s < count; ++s) {
      const AdamWShard& sh = shards[s];
      r.push_back(contiguous(sh.master, sh.n, kInOut));
      r.push_back(contiguous(sh.grad, sh.n, kIn));
      r.push_back(contiguous(sh.decay, sh.n, kIn));
      if (sh.m16) {
        r.push_back(contiguous(sh.m16, sh.n, kInOut));
        r.push_back(contiguous(sh.v16, sh.n, kInOut));
      } else {
        r.push_back(contiguous(sh.m, sh.n, kInOut));
        r.push_back(contiguous(sh.v, sh.n, kInOut));
      }
      r.push_back(contiguous(sh.weights, sh.n, kOut));  // the model's weights, when the shard writes them (else null)
    }
    run(r, __func__, [&] {
      std::vector<AdamWShard> dev(count);
      for (int s = 0; s < count; ++s) {
        const Region* q = &r[6 * (size_t)s];
        dev[s].n = shards[s].n;
        dev[s].master = f(q[0]);
        dev[s].grad = f(q[1]);
        dev[s].decay = static_cast<const uint8_t*>(q[2].dev);
        if (shards[s].m16) {
          dev[s].m16 = u16(q[3]);
          dev[s].v16 = u16(q[4]);
        } else {
          dev[s].m = f(q[3]);
          dev[s].v = f(q[4]);
        }
        dev[s].weights = shards[s].weights ? f(q[5]) : nullptr;
        dev[s].bf16_weights = shards[s].bf16_weights;
      }
      be_.adamw_update(dev.data(), count, h);
    });
  }
  double sum_squares(const float* x, int64_t n) override {
    std::vector<Region> r{contiguous(x, n, kIn)};
    double ss = 0;
    run(r, __func__, [&] { ss = be_.sum_squares(f(r[0]), n); });
    return ss;
  }
  void to_bf16(const float* x, int64_t n, uint16_t* out) override {
    std::vector<Region> r{contiguous(x, n, kIn), contiguous(out, n, kOut)};
    run(r, __func__, [&] { be_.to_bf16(f(r[0]), n, u16(r[1])); });
  }
  void from_bf16(const uint16_t* x, int64_t n, float* out) override {
    std::vector<Region> r{contiguous(x, n, kIn), contiguous(out, n, kOut)};
    run(r, __func__, [&] { be_.from_bf16(u16(r[0]), n, f(r[1])); });
  }
  void dequantize_fp8(const uint8_t* codes, const float* scale_inv, int64_t rows, int64_t cols, int64_t block_rows,
                      int64_t block_cols, float* out) override {
    DSV3_CHECK(rows >= 0 && cols >= 0 && block_rows > 0 && block_cols > 0 && (cols == 0 || rows <= INT64_MAX / cols),
               "dequantize_fp8: invalid sizes rows " << rows << " cols " << cols << " block " << block_rows << "x"
                                                     << block_cols);
    const int64_t nbr = rows / block_rows + (rows % block_rows != 0), nbc = cols / block_cols + (cols % block_cols != 0);
    std::vector<Region> r{contiguous(codes, rows * cols, kIn), contiguous(scale_inv, nbr * nbc, kIn),
                          contiguous(out, rows * cols, kOut)};
    run(r, __func__, [&] {
      be_.dequantize_fp8(static_cast<const uint8_t*>(r[0].dev), f(r[1]), rows, cols, block_rows, block_cols, f(r[2]));
    });
  }

 private:
  static int c_dir(float beta) { return beta == 0.0f ? kOut : kInOut; }
  static float* f(const Region& r) { return static_cast<float*>(r.dev); }
  static const int64_t* i64(const Region& r) { return static_cast<const int64_t*>(r.dev); }
  static uint16_t* u16(const Region& r) { return static_cast<uint16_t*>(r.dev); }

  void rope(bool backward, float* x, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride,
            int64_t rope_dim, const int64_t* pos, const float* cos, const float* sin) {
    // the tables are (max_pos, rope_dim/2); only the positions used are needed: max(pos) + 1 rows
    const int64_t table = rows_for_ids(pos, rows) * (rope_dim / 2);
    const int64_t width = n_heads > 0 ? (n_heads - 1) * head_stride + rope_dim : 0;
    std::vector<Region> r{strided(x, rows, width, ldx, kInOut), contiguous(pos, rows, kIn),
                          contiguous(cos, table, kIn), contiguous(sin, table, kIn)};
    run(r, __func__, [&] {
      if (backward)
        be_.rope_backward(f(r[0]), rows, ldx, n_heads, head_stride, rope_dim, i64(r[1]), f(r[2]), f(r[3]));
      else
        be_.rope_forward(f(r[0]), rows, ldx, n_heads, head_stride, rope_dim, i64(r[1]), f(r[2]), f(r[3]));
    });
  }

  // Pool operands go to the op as they are; host operands get a place in one device arena (256-byte aligned), the
  // inputs copied in, the outputs copied back. Then it waits, so that host buffers hold the results when the op
  // returns, unless deferred mode lets an op without host outputs return queued. DSV3_OP_PROFILE: the op's time.
  template <class Op>
  void run(std::vector<Region>& regions, const char* name, Op&& op) {
    const auto t_start = std::chrono::steady_clock::now();
    size_t staged = 0;
    size_t total = 0;
    for (auto& r : regions) {
      r.resident = r.host && cuda_managed_owns(r.host);
      if (r.host && r.extent() && !r.resident) total += (r.extent() + 255) / 256 * 256;
    }
    if (total > arena_.size()) {
      be_.synchronize();
      arena_.allocate(0);
      arena_.allocate(total + total / 4);
    }
    char* p = arena_.get();
    for (auto& r : regions) {
      if (!r.host || !r.extent()) continue;  // a null operand stays null (e.g. no probs, no rstd)
      if (r.resident) {  // a Buffer's memory (the CUDA pool): used as it is
        r.dev = const_cast<void*>(r.host);
        continue;
      }
      r.dev = p;
      p += (r.extent() + 255) / 256 * 256;
      staged += r.extent() * ((r.dir & kIn ? 1 : 0) + (r.dir & kOut ? 1 : 0));
      if (r.dir & kIn)
        DSV3_CUDA_CHECK(cudaMemcpy2DAsync(r.dev, r.pitch_bytes, r.host, r.pitch_bytes, r.row_bytes, r.rows,
                                          cudaMemcpyHostToDevice, be_.stream()));
    }
    op();
    bool host_out = false;
    for (auto& r : regions)
      if (r.dev && !r.resident && (r.dir & kOut)) {
        host_out = true;
        DSV3_CUDA_CHECK(cudaMemcpy2DAsync(const_cast<void*>(r.host), r.pitch_bytes, r.dev, r.pitch_bytes,
                                          r.row_bytes, r.rows, cudaMemcpyDeviceToHost, be_.stream()));
      }
    // Staged inputs need no wait: a copy from pageable host memory has read its source when it returns, and the
    // next op's staging into the arena is ordered after this op on the stream.
    if (host_out || !deferred_) be_.synchronize();
    if (profile_) {
      const auto t_end = std::chrono::steady_clock::now();
      Prof& q = prof_[name];
      ++q.calls;
      q.flops += next_flops_;
      q.seconds += std::chrono::duration<double>(t_end - t_start).count();
      q.staged_bytes += (double)staged;
      if (have_last_) q.gap_before += std::chrono::duration<double>(t_start - last_end_).count();
      last_end_ = t_end;
      have_last_ = true;
    }
    next_flops_ = 0;
  }
  struct Prof {
    int64_t calls = 0;
    double seconds = 0, staged_bytes = 0, gap_before = 0, flops = 0;
  };
  bool profile_ = false;
  bool deferred_ = false;
  bool profile_reset_ = false;  // reset_profile() was called: the table leaves out the warm-up
  double next_flops_ = 0;  // the FLOPs of the op run() times next (GEMMs), for the profile's TFLOP/s
  std::map<std::string, Prof> prof_;
  std::chrono::steady_clock::time_point last_end_;
  bool have_last_ = false;

  CudaBackend be_;
  cuda::DeviceBuffer<char> arena_;
};

std::unique_ptr<Backend> make_host_staged_cuda_backend(int device_hint) {
  return std::make_unique<HostStagedCudaBackend>(cuda_usable_device(device_hint));
}

}  // namespace dsv3
