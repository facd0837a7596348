// The training step keeps its tensors where the backend's ops run: between two ops no host code reads or writes the
// parameters, gradients, optimizer state or activations (core/memory.h). On a GPU such a touch is a page migration
// over PCIe (or a crash with plain device memory); here it is made a crash on the CPU: the tensor memory is a
// guarded region (mprotect PROT_NONE) that only the backend's ops and the resource's own copies open. A training step
// that touches it from host code dies with SIGSEGV and the address, which fails the test.
// The guarded steps must also give the same bits as the plain CPU run (the guard changes nothing but the memory).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "core/memory.h"
#include "model/model.h"
#include "ops/cpu/cpu_backend.h"
#include "parallel/comm.h"
#include "train/trainer.h"

namespace dsv3 {
namespace {

// Tensor memory in one reserved region: allocations come from it (cached by size), and while armed the region is
// PROT_NONE except inside an op or one of the resource's copies (Unlocked).
class GuardedMemory final : public MemoryResource {
 public:
  explicit GuardedMemory(size_t capacity) : cap_(capacity) {
    void* p = mmap(nullptr, cap_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) std::abort();
    base_ = static_cast<char*>(p);
  }
  ~GuardedMemory() override { munmap(base_, cap_); }
  const char* name() const override { return "guarded"; }
  void* allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    const size_t r = (bytes + 4095) / 4096 * 4096;
    Unlocked u(*this);
    char* p;
    auto it = free_.find(r);
    if (it != free_.end()) {
      p = it->second;
      free_.erase(it);
    } else {
      if (top_ + r > cap_) std::abort();
      p = base_ + top_;
      top_ += r;
    }
    std::memset(p, 0, bytes);
    return p;
  }
  void deallocate(void* p, size_t bytes) noexcept override {
    if (p) free_.emplace((bytes + 4095) / 4096 * 4096, static_cast<char*>(p));
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    Unlocked u(*this);
    std::memmove(dst, src, bytes);
  }
  void zero(void* p, size_t bytes) override {
    Unlocked u(*this);
    std::memset(p, 0, bytes);
  }
  bool contains(const void* p) const { return p >= base_ && p < base_ + top_; }
  void arm() {
    armed_ = true;
    protect(PROT_NONE);
  }
  void disarm() {
    armed_ = false;
    protect(PROT_READ | PROT_WRITE);
  }
  struct Unlocked {
    GuardedMemory& m;
    explicit Unlocked(GuardedMemory& mem) : m(mem) {
      if (m.armed_ && m.open_++ == 0) m.protect(PROT_READ | PROT_WRITE);
    }
    ~Unlocked() {
      if (m.armed_ && --m.open_ == 0) m.protect(PROT_NONE);
    }
  };
  size_t used() const { return top_; }

 private:
  void protect(int prot) {
    if (top_ && mprotect(base_, top_, prot) != 0) std::abort();
  }
  char* base_ = nullptr;
  size_t cap_, top_ = 0;
  bool armed_ = false;
  int open_ = 0;
  std::multimap<size_t, char*> free_;
};

// The CPU backend with every op inside GuardedMemory::Unlocked: what a device backend's ops are to device memory.
class GuardedBackend final : public Backend {
 public:
  explicit GuardedBackend(GuardedMemory& m) : mem_(m), cpu_(1) {}
  std::string name() const override { return "cpu-guarded"; }
  void set_bf16_matmul(bool on) override {
    Backend::set_bf16_matmul(on);
    cpu_.set_bf16_matmul(on);
  }
  void set_bf16_attention(bool on) override {
    Backend::set_bf16_attention(on);
    cpu_.set_bf16_attention(on);
  }
#define DSV3_GUARDED(ret, op, params, args) \
  ret op params override {                  \
    GuardedMemory::Unlocked u(mem_);        \
    return cpu_.op args;                    \
  }
  DSV3_GUARDED(void, gemm,
               (bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc),
               (ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc))
  DSV3_GUARDED(void, rmsnorm_forward,
               (const float* x, int64_t ldx, const float* w, float eps, int64_t rows, int64_t dim, float* y,
                float* rstd),
               (x, ldx, w, eps, rows, dim, y, rstd))
  DSV3_GUARDED(void, add_rmsnorm_forward,
               (const float* r, float* x, const float* w, float eps, int64_t rows, int64_t dim, float* y,
                float* rstd),
               (r, x, w, eps, rows, dim, y, rstd))
  DSV3_GUARDED(void, rope_forward,
               (float* x, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride, int64_t rope_dim,
                const int64_t* pos, const float* cos, const float* sin),
               (x, rows, ldx, n_heads, head_stride, rope_dim, pos, cos, sin))
  DSV3_GUARDED(void, mla_attention_forward,
               (const float* q, const float* kv, const float* kpe, int64_t ldkpe, int64_t B, int64_t S, int64_t H,
                int64_t dn, int64_t dr, int64_t dv, float scale, float* o, float* probs),
               (q, kv, kpe, ldkpe, B, S, H, dn, dr, dv, scale, o, probs))
  DSV3_GUARDED(void, swiglu_forward,
               (const float* gate, const float* up, int64_t rows, int64_t cols, int64_t ld_in, float* out),
               (gate, up, rows, cols, ld_in, out))
  DSV3_GUARDED(void, embedding_forward, (const int64_t* ids, int64_t n, const float* table, int64_t dim, float* out),
               (ids, n, table, dim, out))
  DSV3_GUARDED(void, router_forward,
               (const float* logits, const float* bias, int64_t T, const RouterSpec& r, float* scores, int32_t* idx,
                float* weight),
               (logits, bias, T, r, scores, idx, weight))
  DSV3_GUARDED(void, gather_rows,
               (const float* x, int64_t ldx, const int32_t* src, int64_t rows, int64_t D, float* out),
               (x, ldx, src, rows, D, out))
  DSV3_GUARDED(void, combine_rows,
               (const float* y, const int32_t* pos, const float* weight, int64_t T, int64_t K, int64_t D,
                float* out),
               (y, pos, weight, T, K, D, out))
  DSV3_GUARDED(void, embedding_forward_slice,
               (const int64_t* ids, int64_t n, const float* table, int64_t v0, int64_t vl, int64_t dim, float* out),
               (ids, n, table, v0, vl, dim, out))
  DSV3_GUARDED(void, embedding_backward_slice,
               (const int64_t* ids, int64_t n, const float* dy, int64_t v0, int64_t vl, int64_t dim, float* dtable),
               (ids, n, dy, v0, vl, dim, dtable))
  DSV3_GUARDED(void, cross_entropy_slice_forward,
               (const float* logits, int64_t rows, int64_t vl, const int64_t* targets, int64_t v0, double* lse,
                double* tgt),
               (logits, rows, vl, targets, v0, lse, tgt))
  DSV3_GUARDED(void, cross_entropy_slice_backward,
               (const float* logits, const float* lse, int64_t rows, int64_t vl, const int64_t* targets, int64_t v0,
                float scale, float* dlogits),
               (logits, lse, rows, vl, targets, v0, scale, dlogits))
  DSV3_GUARDED(void, add, (const float* x, int64_t n, float* y), (x, n, y))
  DSV3_GUARDED(void, copy_rows,
               (const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd),
               (src, lds, rows, cols, dst, ldd))
  DSV3_GUARDED(void, fill, (float* x, int64_t n, float v), (x, n, v))
  DSV3_GUARDED(void, rmsnorm_backward,
               (const float* x, int64_t ldx, const float* w, const float* rstd, const float* dy, int64_t rows,
                int64_t dim, float* dx, int64_t lddx, float* dw),
               (x, ldx, w, rstd, dy, rows, dim, dx, lddx, dw))
  DSV3_GUARDED(void, rope_backward,
               (float* dx, int64_t rows, int64_t ldx, int64_t n_heads, int64_t head_stride, int64_t rope_dim,
                const int64_t* pos, const float* cos, const float* sin),
               (dx, rows, ldx, n_heads, head_stride, rope_dim, pos, cos, sin))
  DSV3_GUARDED(void, mla_attention_backward,
               (const float* q, const float* kv, const float* kpe, int64_t ldkpe, const float* probs,
                const float* dout, int64_t B, int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale,
                float* dq, float* dkv, float* dkpe),
               (q, kv, kpe, ldkpe, probs, dout, B, S, H, dn, dr, dv, scale, dq, dkv, dkpe))
  DSV3_GUARDED(void, mla_flash_attention_forward,
               (const float* q, const float* kv, const float* kpe, int64_t ldkpe, int64_t B, int64_t S, int64_t H,
                int64_t dn, int64_t dr, int64_t dv, float scale, float* o, float* lse),
               (q, kv, kpe, ldkpe, B, S, H, dn, dr, dv, scale, o, lse))
  DSV3_GUARDED(void, mla_flash_attention_backward,
               (const float* q, const float* kv, const float* kpe, int64_t ldkpe, const float* o, const float* lse,
                const float* dout, int64_t B, int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale,
                float* dq, float* dkv, float* dkpe),
               (q, kv, kpe, ldkpe, o, lse, dout, B, S, H, dn, dr, dv, scale, dq, dkv, dkpe))
  DSV3_GUARDED(void, swiglu_backward,
               (const float* gate, const float* up, const float* dout, int64_t rows, int64_t cols, float* dgate,
                float* dup),
               (gate, up, dout, rows, cols, dgate, dup))
  DSV3_GUARDED(void, embedding_backward, (const int64_t* ids, int64_t n, const float* dy, int64_t dim, float* dtable),
               (ids, n, dy, dim, dtable))
  DSV3_GUARDED(void, cross_entropy_backward,
               (const float* logits, const float* lse, int64_t rows, int64_t V, const int64_t* targets, float scale,
                float* dlogits),
               (logits, lse, rows, V, targets, scale, dlogits))
  DSV3_GUARDED(void, router_backward,
               (const float* scores, const int32_t* idx, const float* dweight, int64_t T, int64_t E, int64_t K,
                bool norm, float scale, int64_t seq_len, const float* f, float aux_coef, float* dlogits),
               (scores, idx, dweight, T, E, K, norm, scale, seq_len, f, aux_coef, dlogits))
  DSV3_GUARDED(void, combine_rows_backward,
               (const float* dout, const float* y, const int32_t* pos, const float* weight, int64_t T, int64_t K,
                int64_t D, float* dy, float* dweight),
               (dout, y, pos, weight, T, K, D, dy, dweight))
  DSV3_GUARDED(double, cross_entropy_forward,
               (const float* logits, int64_t rows, int64_t V, const int64_t* targets, int64_t* count, float* lse),
               (logits, rows, V, targets, count, lse))
  DSV3_GUARDED(void, adamw_update, (const AdamWShard* shards, int count, const AdamWHyper& h), (shards, count, h))
  DSV3_GUARDED(double, sum_squares, (const float* x, int64_t n), (x, n))
  DSV3_GUARDED(void, to_bf16, (const float* x, int64_t n, uint16_t* out), (x, n, out))
  DSV3_GUARDED(void, from_bf16, (const uint16_t* x, int64_t n, float* out), (x, n, out))
  DSV3_GUARDED(void, dequantize_fp8,
               (const uint8_t* codes, const float* scale_inv, int64_t rows, int64_t cols, int64_t block_rows,
                int64_t block_cols, float* out),
               (codes, scale_inv, rows, cols, block_rows, block_cols, out))
#undef DSV3_GUARDED

 private:
  GuardedMemory& mem_;
  CpuBackend cpu_;
};

// A touch of the guarded region from host code: name the address and leave (the test fails with this message)
void on_segv(int, siginfo_t* si, void*) {
  char msg[200];
  const int n = std::snprintf(msg, sizeof msg,
                              "\nhost code touched tensor memory at %p between two backend ops (a host loop on a "
                              "Buffer in the training step)\n",
                              si->si_addr);
  if (n > 0) (void)!write(2, msg, (size_t)n);
  _exit(3);
}

ModelConfig tiny() { return model_config_from_file(std::string(DSV3_TEST_DIR) + "/golden/tiny/config.json"); }

std::vector<int64_t> tokens() {
  std::vector<int64_t> t(4 * 32);
  for (size_t i = 0; i < t.size(); ++i) t[i] = (int64_t)((i * 7919 + 13) % 512);
  return t;
}

struct Variant {
  const char* name;
  bool flash, recompute, bf16_grads, bf16_moments, bf16_params;
};
// the variant's name in test listings (gtest's default prints the struct's bytes, a pointer among them, so that the
// names ctest discovered would differ from build to build)
void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

// 3 steps of the tiny model: the losses, grad norms and the final parameters
struct Outcome {
  std::vector<double> losses;
  std::vector<float> params;
};
// comm: the driver's 1-rank communicator (DSV3_NO_MPI: no MPI runtime), whose single-rank collectives are copies
Outcome train(Backend& be, const Variant& v, GuardedMemory* guard, const Comm* comm) {
  Model model(tiny(), be);
  model.set_selective_recompute(v.recompute);
  be.set_flash_attention(v.flash);
  model.init_random(11);
  TrainerConfig tc;
  tc.micro_batch = 2;
  tc.bf16_grads = v.bf16_grads;
  tc.adamw.bf16_moments = v.bf16_moments;
  tc.adamw.bf16_params = v.bf16_params;
  Trainer trainer(model, tc, comm, &be);
  const auto t = tokens();
  Outcome out;
  struct sigaction sa {}, old{};
  if (guard) {
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, &old);
    guard->arm();
  }
  for (int i = 0; i < 3; ++i) {
    const StepStats st = trainer.step(t.data(), 4, 32, 1e-3, 0.3, 1e-3);
    out.losses.push_back(st.loss.total);
    out.losses.push_back(st.grad_norm);
  }
  if (guard) {
    guard->disarm();
    sigaction(SIGSEGV, &old, nullptr);
  }
  out.params = std::vector<float>(model.params().data(), model.params().data() + model.params().size());
  return out;
}

// the guard itself: a host write to a Buffer while armed ends the process with the message; ops and the resource's
// copies do not
void touch_after_arm() {
  GuardedMemory mem(size_t(1) << 30);
  GuardedBackend be(mem);
  set_default_memory(&mem);
  Floats x(100);
  Floats y(100);
  struct sigaction sa {};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, nullptr);
  mem.arm();
  be.fill(x.data(), 100, 1.0f);  // an op: allowed
  be.add(x.data(), 100, y.data());
  const std::vector<float> h = y.to_host();  // the resource's copy: allowed
  if (h[99] != 1.0f) _exit(4);
  y.data()[5] = 2.0f;  // host code: caught
  _exit(0);
}

TEST(DeviceResidentGuard, CatchesAHostTouchAndLetsOpsThrough) {
  EXPECT_EXIT(touch_after_arm(), ::testing::ExitedWithCode(3), "host code touched tensor memory");
}

class DeviceResident : public ::testing::TestWithParam<Variant> {};

TEST_P(DeviceResident, TrainingStepsTouchTensorMemoryOnlyThroughTheBackend) {
  const Variant v = GetParam();
  CpuBackend plain(1);
  set_default_memory(nullptr);
  const Outcome ref = train(plain, v, nullptr, nullptr);

  GuardedMemory mem(size_t(16) << 30);
  GuardedBackend guarded(mem);
  set_default_memory(&mem);
  setenv("DSV3_NO_MPI", "1", 1);  // a world of one rank without MPI, as dsv3 on one GPU
  Comm comm(nullptr, nullptr);
  const Outcome got = train(guarded, v, &mem, &comm);
  set_default_memory(nullptr);
  EXPECT_GT(mem.used(), 0u);  // the model's tensors were in the guarded region
  ASSERT_EQ(got.losses.size(), ref.losses.size());
  for (size_t i = 0; i < ref.losses.size(); ++i) EXPECT_EQ(got.losses[i], ref.losses[i]) << v.name << " value " << i;
  ASSERT_EQ(got.params.size(), ref.params.size());
  EXPECT_EQ(0, std::memcmp(got.params.data(), ref.params.data(), ref.params.size() * sizeof(float))) << v.name;
}

INSTANTIATE_TEST_SUITE_P(Variants, DeviceResident,
                         ::testing::Values(Variant{"fp32", false, false, false, false, false},
                                           Variant{"flash_recompute", true, true, false, false, false},
                                           Variant{"bf16_state", false, false, true, true, true}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace dsv3
