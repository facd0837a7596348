// defines: dsv3::cuda::DeviceBuffer<T> — RAII device memory (cudaMalloc/cudaFree) with host copies, for the tests,
// the benchmark and the backend's scratch space. Host-only header.
#pragma once
#include <cstddef>
#include <utility>
#include <vector>

#include "cuda_check.cuh"

namespace dsv3::cuda {

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { allocate(n); }
  explicit DeviceBuffer(const std::vector<T>& h) {
    allocate(h.size());
    upload(h);
  }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }

  T* get() { return p_; }
  const T* get() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

  // (re)allocates n elements; the old contents are lost
  void allocate(size_t n) {
    release();
    if (n == 0) return;
    void* p = nullptr;
    DSV3_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T)));
    p_ = static_cast<T*>(p);
    n_ = n;
  }
  void upload(const std::vector<T>& h) {
    DSV3_CHECK(h.size() == n_, "DeviceBuffer::upload: " << h.size() << " elements into a buffer of " << n_);
    if (n_) DSV3_CUDA_CHECK(cudaMemcpy(p_, h.data(), bytes(), cudaMemcpyHostToDevice));
  }
  // waits for all work on the device first (the backend's kernels run on its own stream)
  std::vector<T> to_host() const {
    std::vector<T> h(n_);
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    if (n_) DSV3_CUDA_CHECK(cudaMemcpy(h.data(), p_, bytes(), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  void release() noexcept {
    if (p_) cudaFree(p_);  // no throw from a destructor; a failing free means the context is already gone
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace dsv3::cuda
