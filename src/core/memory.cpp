// defines: host_memory, default_memory, set_default_memory (core/memory.h)
#include "core/memory.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "core/error.h"

namespace dsv3 {

namespace {

class HostMemory final : public MemoryResource {
 public:
  const char* name() const override { return "host"; }
  void* allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    void* p = std::calloc(1, bytes);
    DSV3_CHECK(p, "out of host memory allocating " << bytes << " bytes");
    std::lock_guard<std::mutex> lk(mu_);
    s_.live_bytes += bytes;
    s_.held_bytes = s_.live_bytes;
    if (s_.live_bytes > s_.peak_live_bytes) s_.peak_live_bytes = s_.live_bytes;
    ++s_.system_allocations;
    return p;
  }
  void deallocate(void* p, size_t bytes) noexcept override {
    if (!p) return;
    std::free(p);
    std::lock_guard<std::mutex> lk(mu_);
    s_.live_bytes -= bytes;
    s_.held_bytes = s_.live_bytes;
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memmove(dst, src, bytes);
  }
  void zero(void* p, size_t bytes) override {
    if (bytes) std::memset(p, 0, bytes);
  }
  Stats stats() const override {
    std::lock_guard<std::mutex> lk(mu_);
    return s_;
  }

 private:
  mutable std::mutex mu_;
  Stats s_;
};

std::atomic<MemoryResource*> g_default{nullptr};

}  // namespace

MemoryResource& host_memory() {
  static HostMemory* h = new HostMemory;  // never destroyed: Buffers in static storage may outlive main
  return *h;
}

MemoryResource& default_memory() {
  MemoryResource* m = g_default.load(std::memory_order_acquire);
  return m ? *m : host_memory();
}

void set_default_memory(MemoryResource* mr) { g_default.store(mr, std::memory_order_release); }

}  // namespace dsv3
