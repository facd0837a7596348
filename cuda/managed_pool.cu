// defines: dsv3::cuda_managed_memory — the CUDA backend's MemoryResource (core/memory.h): CUDA managed memory,
// cached by size. Why managed memory: the model's tensors then live on the GPU (the kernels' first touch places the
// pages there, cudaMemAdviseSetPreferredLocation keeps them), the backend's ops take their pointers as they are (no
// copies per op: cuda/host_staged.cu passes them through), and the host code that reads parameters outside the
// training loop (checkpoints, HF import/export, validation) keeps working through the same pointers.
// Why a cache: the activations of a micro-batch are freed at its end and allocated again with the same sizes by the
// next; freed blocks are kept by size and handed out again (as PyTorch's caching allocator does), so after the first
// step the loop makes no cudaMallocManaged call (stats().system_allocations stays put; the trainer logs it).
// Memory is never given back to CUDA: the pool lives until the process ends.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>

#include "core/error.h"
#include "core/memory.h"
#include "cuda_backend.cuh"
#include "cuda_check.cuh"

namespace dsv3 {

namespace {

// Copies and zeroing inside the pool run as kernels: the GPU itself touches the pages, so they stay (or become)
// device-resident whatever the driver would do for cudaMemcpy/cudaMemset on managed memory (not measured: in the GPU
// run that prompted this the pages left the GPU for another reason, a host memcpy in the 1-rank Comm; see
// validation/gpu-results/README.md, runs 4-6).
__global__ void copy_kernel(unsigned char* __restrict__ dst, const unsigned char* __restrict__ src, size_t n) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if ((((uintptr_t)dst | (uintptr_t)src) & 15) == 0) {  // 16-byte words, then the tail
    const size_t words = n / 16;
    auto* d = reinterpret_cast<uint4*>(dst);
    const auto* s = reinterpret_cast<const uint4*>(src);
    for (size_t k = i; k < words; k += stride) d[k] = s[k];
    for (size_t k = words * 16 + i; k < n; k += stride) dst[k] = src[k];
  } else {
    for (size_t k = i; k < n; k += stride) dst[k] = src[k];
  }
}

__global__ void zero_kernel(unsigned char* __restrict__ p, size_t n) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (((uintptr_t)p & 15) == 0) {
    const size_t words = n / 16;
    auto* d = reinterpret_cast<uint4*>(p);
    for (size_t k = i; k < words; k += stride) d[k] = make_uint4(0, 0, 0, 0);
    for (size_t k = words * 16 + i; k < n; k += stride) p[k] = 0;
  } else {
    for (size_t k = i; k < n; k += stride) p[k] = 0;
  }
}

unsigned blocks_for(size_t bytes) {  // enough 256-thread blocks for 16 bytes per thread, capped (grid-stride)
  return (unsigned)std::max<size_t>(1, std::min<size_t>((bytes / 16 + 255) / 256, 8192));
}

class ManagedPool final : public MemoryResource {
 public:
  const char* name() const override { return "cuda-managed"; }

  void* allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    const size_t rounded = round_up(bytes);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = free_.find(rounded);
      if (it != free_.end()) {
        p = it->second;
        free_.erase(it);
      }
    }
    if (!p) {
      int device = 0;
      DSV3_CUDA_CHECK(cudaGetDevice(&device));
      const cudaError_t e = cudaMallocManaged(&p, rounded, cudaMemAttachGlobal);
      DSV3_CHECK(e == cudaSuccess, "CUDA managed memory: cannot allocate " << rounded << " bytes ("
                                       << (held() >> 20) << " MiB held already): " << cudaGetErrorString(e));
      cudaMemLocation loc{};
      loc.type = cudaMemLocationTypeDevice;
      loc.id = device;
      DSV3_CUDA_CHECK(cudaMemAdvise(p, rounded, cudaMemAdviseSetPreferredLocation, loc));
      // populate the pages on the device now (not on the first touch, wherever that happens)
      DSV3_CUDA_CHECK(cudaMemPrefetchAsync(p, rounded, loc, 0, 0));
      std::lock_guard<std::mutex> lk(mu_);
      blocks_[(uintptr_t)p] = rounded;
      s_.held_bytes += rounded;
      ++s_.system_allocations;
    }
    zero(p, bytes);  // on the device: the pages stay where the kernels use them
    std::lock_guard<std::mutex> lk(mu_);
    s_.live_bytes += rounded;
    if (s_.live_bytes > s_.peak_live_bytes) s_.peak_live_bytes = s_.live_bytes;
    return p;
  }

  void deallocate(void* p, size_t bytes) noexcept override {
    if (!p) return;
    std::lock_guard<std::mutex> lk(mu_);
    const size_t rounded = round_up(bytes);
    free_.emplace(rounded, p);
    s_.live_bytes -= rounded;
  }

  // Both in the pool: a copy kernel. Host memory on either side: cudaMemcpyDefault. Either way after the device's
  // queued work (the legacy default stream, which the backend's blocking stream is ordered with) and finished on
  // return.
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0 || dst == src) return;
    if (owns(dst) && owns(src)) {
      copy_kernel<<<blocks_for(bytes), 256, 0, 0>>>(static_cast<unsigned char*>(dst),
                                                    static_cast<const unsigned char*>(src), bytes);
      DSV3_CUDA_LAUNCH_CHECK();
      DSV3_CUDA_CHECK(cudaStreamSynchronize(0));
      return;
    }
    DSV3_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
  }
  void zero(void* p, size_t bytes) override {
    if (bytes == 0) return;
    zero_kernel<<<blocks_for(bytes), 256, 0, 0>>>(static_cast<unsigned char*>(p), bytes);
    DSV3_CUDA_LAUNCH_CHECK();
    DSV3_CUDA_CHECK(cudaStreamSynchronize(0));
  }
  Stats stats() const override {
    std::lock_guard<std::mutex> lk(mu_);
    return s_;
  }
  // true when p lies inside a block of this pool (live or cached)
  bool owns(const void* p) const {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = blocks_.upper_bound((uintptr_t)p);
    if (it == blocks_.begin()) return false;
    --it;
    return (uintptr_t)p < it->first + it->second;
  }

 private:
  // 512-byte granules below 1 MiB, 2 MiB above: sizes that repeat step after step map to the same cached block
  static size_t round_up(size_t b) {
    const size_t g = b < (size_t(1) << 20) ? 512 : (size_t(2) << 20);
    return (b + g - 1) / g * g;
  }
  size_t held() {
    std::lock_guard<std::mutex> lk(mu_);
    return s_.held_bytes;
  }
  mutable std::mutex mu_;
  std::multimap<size_t, void*> free_;     // cached blocks by size
  std::map<uintptr_t, size_t> blocks_;    // every block: base -> size
  Stats s_;
};

ManagedPool& pool() {
  static ManagedPool* p = new ManagedPool;  // never destroyed (Buffers in static storage, CUDA teardown at exit)
  return *p;
}

}  // namespace

MemoryResource& cuda_managed_memory() { return pool(); }
bool cuda_managed_owns(const void* p) { return pool().owns(p); }

}  // namespace dsv3
