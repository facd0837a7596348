// defines: CudaBackend::adamw_update / sum_squares — the optimizer's arithmetic on the device.
// adamw_update: multi-tensor — up to kShardsPerLaunch shards travel by value in one kernel argument; blockIdx.y picks
// the shard, a grid-stride loop over x covers its elements. Per element the shared adamw_element
// (optim/adamw_math.h): this file is compiled with -fmad=false (CMakeLists.txt), so nvcc fuses nothing beyond the two
// FMAs written there, and IEEE division/sqrt are the defaults (no fast-math): bit-identical to the CPU backend.
// sum_squares: the CPU backend's order exactly — lane c sums chunk c (4096 elements) in order, in double, its
// elements read through shared-memory tiles so that the warp's loads are coalesced; then one block adds the chunk
// sums in chunk order (staged through shared memory, added by one thread). A float's square is exact in double, so
// each partial, and the total, has the CPU's bits; deterministic, no atomics. (The first version read each chunk
// with one thread: uncoalesced, ~10 ms for the proxy's 10 GB bucket.)
#include <algorithm>

#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"
#include "optim/adamw_math.h"

namespace dsv3 {

namespace {
using cuda::kBlock;

constexpr int kShardsPerLaunch = 16;  // 16 x 80-byte shards: well inside the 4 KiB of kernel arguments
constexpr int64_t kChunk = 4096;      // sum_squares: the CPU backend's chunk (ops/cpu/optimizer_ops.cpp)

struct ShardBatch {
  Backend::AdamWShard s[kShardsPerLaunch];
};
static_assert(sizeof(ShardBatch) <= 4096, "adamw_kernel's shard table must fit the kernel argument space");

// __grid_constant__: the shard table is read in place from the argument space (indexed by blockIdx.y), not copied
__global__ void adamw_kernel(const __grid_constant__ ShardBatch batch, const AdamWCoeffs c) {
  const Backend::AdamWShard& sh = batch.s[blockIdx.y];
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < sh.n; i += (int64_t)gridDim.x * blockDim.x)
    adamw_shard_element(c, sh, i);
}

constexpr int kSqWarps = kBlock / 32;  // warps per block of chunk_squares_kernel

// part[c] = sum of x[i]^2 over chunk c, in order. A warp takes 32 consecutive chunks, lane l chunk c0 + l, and reads
// them as 32 x 32 tiles through shared memory (tile row r: 32 consecutive elements of chunk c0 + r, one coalesced
// 128-byte load), so every global read is coalesced while each lane still adds its own chunk's elements in order.
// Positions past n read as 0: adding +0.0 to a sum of squares (>= +0) leaves it bit-identical.
__global__ void chunk_squares_kernel(const float* __restrict__ x, int64_t n, int64_t nc, double* __restrict__ part) {
  __shared__ float tile[kSqWarps][32][33];  // row stride 33: lane l reading row l, column k hits bank (l + k) % 32
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  float(*t)[33] = tile[w];
  const int64_t warps = (int64_t)gridDim.x * kSqWarps;
  for (int64_t c0 = ((int64_t)blockIdx.x * kSqWarps + w) * 32; c0 < nc; c0 += warps * 32) {
    double s = 0;
    for (int64_t k0 = 0; k0 < kChunk; k0 += 32) {
      for (int r = 0; r < 32; ++r) {
        const int64_t i = (c0 + r) * kChunk + k0 + lane;
        t[r][lane] = i < n ? x[i] : 0.0f;
      }
      __syncwarp();
#pragma unroll 8
      for (int k = 0; k < 32; ++k) {
        const double v = (double)t[lane][k];
        s += v * v;  // exact square in double: fused or not, the same bits
      }
      __syncwarp();  // the tile is overwritten next round
    }
    if (c0 + lane < nc) part[c0 + lane] = s;
  }
}

// *total = part[0] + part[1] + ... in order (one block: tiles loaded by all threads, added by thread 0)
__global__ void ordered_sum_kernel(const double* __restrict__ part, int64_t nc, double* __restrict__ total) {
  __shared__ double tile[kBlock];
  double ss = 0;
  for (int64_t t0 = 0; t0 < nc; t0 += kBlock) {
    const int64_t len = min((int64_t)kBlock, nc - t0);
    if (threadIdx.x < len) tile[threadIdx.x] = part[t0 + threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0)
      for (int64_t k = 0; k < len; ++k) ss += tile[k];
    __syncthreads();  // the tile is overwritten next round
  }
  if (threadIdx.x == 0) *total = ss;
}
}  // namespace

void CudaBackend::adamw_update(const AdamWShard* shards, int count, const AdamWHyper& h) {
  const AdamWCoeffs c = adamw_coeffs(h);
  check_adamw_shards(shards, count);
  for (int s0 = 0; s0 < count; s0 += kShardsPerLaunch) {
    ShardBatch batch{};
    int k = 0;
    int64_t longest = 0;
    for (int s = s0; s < std::min(count, s0 + kShardsPerLaunch); ++s)
      if (shards[s].n > 0) {
        batch.s[k++] = shards[s];
        longest = std::max(longest, shards[s].n);
      }
    if (k == 0) continue;
    adamw_kernel<<<dim3(cuda::grid_for(longest), k), kBlock, 0, stream_>>>(batch, c);
    DSV3_CUDA_LAUNCH_CHECK();
  }
}

double CudaBackend::sum_squares(const float* x, int64_t n) {
  if (n <= 0) return 0.0;
  const int64_t nc = (n + kChunk - 1) / kChunk;
  auto* part = static_cast<double*>(scratch(sizeof(double) * (nc + 1)));
  double* d_total = part + nc;
  chunk_squares_kernel<<<cuda::grid_for((nc + 31) / 32, kSqWarps), kBlock, 0, stream_>>>(x, n, nc, part);
  DSV3_CUDA_LAUNCH_CHECK();
  ordered_sum_kernel<<<1, kBlock, 0, stream_>>>(part, nc, d_total);
  DSV3_CUDA_LAUNCH_CHECK();
  double total = 0;
  DSV3_CUDA_CHECK(cudaMemcpyAsync(&total, d_total, sizeof(total), cudaMemcpyDeviceToHost, stream_));
  DSV3_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return total;
}

}  // namespace dsv3
