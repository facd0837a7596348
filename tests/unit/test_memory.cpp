// Buffers (core/memory.h): the std::vector contract the model relied on (zeroed, resize keeps and zeroes, copies),
// through the resource only; and the CPU backend's elementwise ops that replaced the model's host loops.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "core/memory.h"
#include "ops/cpu/cpu_backend.h"

namespace dsv3 {
namespace {

TEST(Buffer, BehavesAsTheVectorItReplaced) {
  Floats a(5);
  EXPECT_EQ(a.size(), 5u);
  EXPECT_EQ(a.to_host(), std::vector<float>(5, 0.0f));
  std::vector<float> h{1, 2, 3, 4, 5};
  a.assign(h.data(), h.data() + 5);
  a.resize(7);  // kept, then zeros
  EXPECT_EQ(a.to_host(), (std::vector<float>{1, 2, 3, 4, 5, 0, 0}));
  a.resize(3);
  EXPECT_EQ(a.to_host(), (std::vector<float>{1, 2, 3}));
  Floats b(a);  // a copy, not an alias
  b[0] = 9;
  EXPECT_EQ(a[0], 1.0f);
  Floats c(std::move(b));
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(c.to_host(), (std::vector<float>{9, 2, 3}));
  c.zero();
  EXPECT_EQ(c.to_host(), std::vector<float>(3, 0.0f));
  c.clear();
  EXPECT_TRUE(c.empty());
  EXPECT_EQ(c.data(), nullptr);
  Buffer<uint16_t> u(std::vector<uint16_t>{7, 8});
  EXPECT_EQ(u.to_host(), (std::vector<uint16_t>{7, 8}));
}

TEST(Buffer, TakesTheInstalledResourceAndReturnsToItsOwn) {
  // a resource that counts: a Buffer keeps the resource it came from even after another is installed
  struct Counting final : MemoryResource {
    int live = 0;
    const char* name() const override { return "counting"; }
    void* allocate(size_t b) override {
      ++live;
      return host_memory().allocate(b);
    }
    void deallocate(void* p, size_t b) noexcept override {
      --live;
      host_memory().deallocate(p, b);
    }
    void copy(void* d, const void* s, size_t b) override { host_memory().copy(d, s, b); }
    void zero(void* p, size_t b) override { host_memory().zero(p, b); }
  } counting;
  set_default_memory(&counting);
  {
    Floats a(10);
    EXPECT_EQ(counting.live, 1);
    set_default_memory(nullptr);
    Floats b(10);  // host memory
    EXPECT_EQ(counting.live, 1);
    EXPECT_EQ(a.resource(), &counting);
    EXPECT_EQ(b.resource(), &host_memory());
  }
  EXPECT_EQ(counting.live, 0);
}

TEST(CpuOps, ElementwiseAndRowCopies) {
  CpuBackend be(2);
  std::vector<float> x(10), y(10);
  std::iota(x.begin(), x.end(), 1.0f);
  std::iota(y.begin(), y.end(), 100.0f);
  be.add(x.data(), 10, y.data());
  for (int i = 0; i < 10; ++i) EXPECT_EQ(y[i], 101.0f + 2 * i);
  be.fill(y.data() + 2, 3, -1.0f);
  EXPECT_EQ(y[1], 103.0f);
  EXPECT_EQ(y[2], -1.0f);
  EXPECT_EQ(y[4], -1.0f);
  EXPECT_EQ(y[5], 111.0f);
  // 3 rows of 2 columns: from stride 4 into stride 3, the third column of each destination row untouched
  std::vector<float> src(12), dst(9, -7.0f);
  std::iota(src.begin(), src.end(), 0.0f);
  be.copy_rows(src.data(), 4, 3, 2, dst.data(), 3);
  EXPECT_EQ(dst, (std::vector<float>{0, 1, -7, 4, 5, -7, 8, 9, -7}));
}

}  // namespace
}  // namespace dsv3
