// A host emulation of the few CUDA features the tensor-core attention kernels use (cuda/flash_attention_bf16.cuh), so
// that their indexing, masking, tiling, online softmax and synchronisation run here, on machines without a GPU, against
// the CPU backend. Each CUDA thread of a CTA is a std::thread; __syncthreads is a barrier of the CTA's threads;
// __shfl_xor_sync and mma.sync exchange the 32 lanes' registers through memory between two barriers of the warp, and
// the mma is computed from the fragment layouts the PTX ISA gives for mma.m16n8k16 (.bf16 in, .f32 accumulate).
// CTAs run one after another. What it cannot show: timing, races the hardware would expose (the emulated threads do
// run concurrently, but without the GPU's memory model), and the hardware's own fragment layouts (the emulation uses
// the documented ones, which the kernels are written against).
// Include this before the kernels' header; it defines DSV3_SIMT_EMULATION.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "io/safetensors.h"  // float_to_bf16 (round to nearest even, as __float2bfloat16_rn) / bf16_to_float

#define DSV3_SIMT_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)

struct SimtDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local SimtDim3 threadIdx, blockIdx, blockDim, gridDim;
// a kernel's static __shared__ array: one per instantiation, shared by the threads of the (one) CTA running
#define __shared__ static

struct __nv_bfloat16 {
  uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return {dsv3::float_to_bf16(x)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 x) { return x.bits; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline float max(float a, float b) { return a < b ? b : a; }  // CUDA's device overloads, NaN aside
inline double max(double a, double b) { return a < b ? b : a; }

namespace simt {

// one CTA's shared state: dynamic shared memory, the block barrier, and per warp a barrier and exchange slots
struct Cta {
  struct Warp {
    std::barrier<> bar{32};
    unsigned char v[32][8];  // shuffled values (up to 8 bytes)
    uint32_t a[32][4], b[32][2];
    float c[32][4];
  };
  // exactly smem_bytes (operator new[] aligns to 16): an access past the kernel's dynamic shared memory is a heap
  // overflow that AddressSanitizer reports
  explicit Cta(int threads, size_t smem_bytes)
      : smem(new unsigned char[smem_bytes ? smem_bytes : 1]), block(threads), warps(threads / 32) {
    std::memset(smem.get(), 0xFF, smem_bytes);  // garbage (NaN patterns): what the kernel reads before writing shows
  }
  std::unique_ptr<unsigned char[]> smem;
  std::barrier<> block;
  std::vector<Warp> warps;
};
inline thread_local Cta* cta = nullptr;
inline Cta::Warp& my_warp() { return cta->warps[threadIdx.x >> 5]; }
inline int my_lane() { return (int)(threadIdx.x & 31); }

inline float lo(uint32_t r) { return dsv3::bf16_to_float((uint16_t)(r & 0xFFFF)); }
inline float hi(uint32_t r) { return dsv3::bf16_to_float((uint16_t)(r >> 16)); }

// Run `kernel()` on a grid of CTAs of `threads` threads with `smem_bytes` of dynamic shared memory.
template <class Kernel>
void launch(SimtDim3 grid, int threads, size_t smem_bytes, Kernel kernel) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Cta c(threads, smem_bytes);
        std::vector<std::thread> ts;
        ts.reserve(threads);
        for (int i = 0; i < threads; ++i)
          ts.emplace_back([&, i] {
            threadIdx = {(unsigned)i, 0, 0};
            blockIdx = {x, y, z};
            blockDim = {(unsigned)threads, 1, 1};
            gridDim = grid;
            cta = &c;
            kernel();
          });
        for (auto& t : ts) t.join();
      }
}

}  // namespace simt

#define DSV3_DYNAMIC_SMEM(name) unsigned char* name = simt::cta->smem.get()

inline void __syncthreads() { simt::cta->block.arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) <= 8, "a shuffle moves up to 8 bytes");
  simt::Cta::Warp& w = simt::my_warp();
  const int l = simt::my_lane();
  std::memcpy(w.v[l], &v, sizeof v);
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, w.v[l ^ mask], sizeof r);
  w.bar.arrive_and_wait();  // every lane has read before the slots are reused
  return r;
}

// D = A B + C for the warp (mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32), in double: the tensor cores' FP32
// accumulation order is unspecified, and the tests' tolerances cover FP32 summation order anyway
inline void simt_emulation_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  simt::Cta::Warp& w = simt::my_warp();
  const int l = simt::my_lane();
  std::memcpy(w.a[l], a, sizeof a);
  std::memcpy(w.b[l], b, sizeof b);
  std::memcpy(w.c[l], d, sizeof d);
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8], C[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L >> 2, t = L & 3;
    const uint32_t* ar = w.a[L];
    A[g][2 * t] = simt::lo(ar[0]), A[g][2 * t + 1] = simt::hi(ar[0]);
    A[g + 8][2 * t] = simt::lo(ar[1]), A[g + 8][2 * t + 1] = simt::hi(ar[1]);
    A[g][2 * t + 8] = simt::lo(ar[2]), A[g][2 * t + 9] = simt::hi(ar[2]);
    A[g + 8][2 * t + 8] = simt::lo(ar[3]), A[g + 8][2 * t + 9] = simt::hi(ar[3]);
    B[2 * t][g] = simt::lo(w.b[L][0]), B[2 * t + 1][g] = simt::hi(w.b[L][0]);
    B[2 * t + 8][g] = simt::lo(w.b[L][1]), B[2 * t + 9][g] = simt::hi(w.b[L][1]);
    C[g][2 * t] = w.c[L][0], C[g][2 * t + 1] = w.c[L][1];
    C[g + 8][2 * t] = w.c[L][2], C[g + 8][2 * t + 1] = w.c[L][3];
  }
  w.bar.arrive_and_wait();  // every lane has gathered before the slots are reused
  const int g = l >> 2, t = l & 3;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int e = 0; e < 4; ++e) {
    double acc = C[rows[e]][cols[e]];
    for (int k = 0; k < 16; ++k) acc += (double)A[rows[e]][k] * B[k][cols[e]];
    d[e] = (float)acc;
  }
}
