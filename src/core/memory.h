// defines: dsv3::MemoryResource, host_memory, default_memory / set_default_memory, dsv3::Buffer<T> (Floats)
// Where the model's tensors live. The parameters, gradients, optimizer state and activations are Buffers; a Buffer
// takes its memory from the run's MemoryResource, which the backend installs when it is made (make_backend): the CPU
// backend keeps host memory, the CUDA backend its device pool (cuda/managed_pool.cu: CUDA managed memory, cached by
// size, so the steady-state loop allocates nothing). The backend's ops then run on the Buffers' pointers in place:
// no per-op copies. Host code reaches the contents only through the resource's copies (to_host, assign, upload) or
// through data() where the resource is host-accessible (the CUDA pool is: managed memory), e.g. checkpoint I/O.
// Unlike std::vector, a Buffer never touches its elements on the host: new memory is zeroed by the resource (a
// device memset on the GPU), growth and copies go through the resource's copy.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace dsv3 {

class MemoryResource {
 public:
  virtual ~MemoryResource() = default;
  virtual const char* name() const = 0;
  // `bytes` of zeroed memory, aligned for any element type (nullptr for 0 bytes); dsv3::Error naming the size when
  // none is left
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p, size_t bytes) noexcept = 0;
  // dst <- src, either of them in this resource's memory or in host memory; returns when the copy is done
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void zero(void* p, size_t bytes) = 0;
  // statistics: bytes held (live + cached), calls that had to get new memory from the system
  struct Stats {
    size_t live_bytes = 0, held_bytes = 0, peak_live_bytes = 0;
    int64_t system_allocations = 0;
  };
  virtual Stats stats() const { return {}; }
};

// plain host memory (calloc/free, memcpy): the CPU backend's, and every Buffer's before a backend is made
MemoryResource& host_memory();
// the resource new Buffers take their memory from (host_memory() unless a backend installed its own)
MemoryResource& default_memory();
// installs mr (nullptr: host memory again); the backend calls it when made. A Buffer keeps the resource it was
// allocated from, so it may outlive a later change.
void set_default_memory(MemoryResource* mr);

template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) { resize(n); }
  explicit Buffer(const std::vector<T>& h) { assign(h.data(), h.data() + h.size()); }
  Buffer(const Buffer& o) { assign(o.data(), o.data() + o.size()); }
  Buffer(Buffer&& o) noexcept
      : mr_(std::exchange(o.mr_, nullptr)), p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  Buffer& operator=(const Buffer& o) {
    if (this != &o) assign(o.data(), o.data() + o.size());
    return *this;
  }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      clear();
      mr_ = std::exchange(o.mr_, nullptr);
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~Buffer() { clear(); }

  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  MemoryResource* resource() const { return mr_; }
  // element access from host code: host memory, or the CUDA pool's managed memory outside the backend's ops (the
  // checkpoint's element conversions); never in the training loop
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }

  // n elements: the first min(n, size()) kept, the rest zero (the same contract as std::vector::resize)
  void resize(size_t n) {
    if (n == n_) return;
    Buffer b = zeros(n);
    if (n_ && n) b.mr_->copy(b.p_, p_, (n < n_ ? n : n_) * sizeof(T));
    *this = std::move(b);
  }
  // the elements [first, last) (host memory or any resource's)
  void assign(const T* first, const T* last) {
    const size_t n = (size_t)(last - first);
    if (n != n_) {
      clear();
      *this = zeros(n);
    }
    if (n) mr_->copy(p_, first, n * sizeof(T));
  }
  // every element zero again, the size kept
  void zero() {
    if (n_) mr_->zero(p_, n_ * sizeof(T));
  }
  // releases the memory (size 0): what std::vector<T>().swap(v) did
  void clear() noexcept {
    if (p_) mr_->deallocate(p_, n_ * sizeof(T));
    p_ = nullptr;
    n_ = 0;
  }
  std::vector<T> to_host() const {
    std::vector<T> h(n_);
    if (n_) mr_->copy(h.data(), p_, n_ * sizeof(T));
    return h;
  }

 private:
  static Buffer zeros(size_t n) {
    Buffer b;
    if (n == 0) return b;
    b.mr_ = &default_memory();
    b.p_ = static_cast<T*>(b.mr_->allocate(n * sizeof(T)));
    b.n_ = n;
    return b;
  }
  MemoryResource* mr_ = nullptr;
  T* p_ = nullptr;
  size_t n_ = 0;
};

using Floats = Buffer<float>;

}  // namespace dsv3
