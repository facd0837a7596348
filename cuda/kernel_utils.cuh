// defines: warp/block reductions and launch-size helpers shared by the CUDA backend's kernels (.cu files only), and
// DSV3_DYNAMIC_SMEM (a kernel's dynamic shared memory). Reductions use a fixed tree, so a kernel's result is the same
// run to run (no float atomics anywhere). With DSV3_SIMT_EMULATION (tests/unit/simt_emulation.h) it compiles for the
// host, where the kernels that include it run in the emulation.
#pragma once
#ifndef DSV3_SIMT_EMULATION
#include <cuda_runtime.h>
#define DSV3_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include <algorithm>
#include <cstdint>

namespace dsv3::cuda {

constexpr int kBlock = 256;  // threads of the row kernels (a multiple of 32: the reductions need full warps)

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32 (<= 1024); every thread calls it.
template <class T>
__device__ T block_sum(T v) {
  __shared__ T sh[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  T r = lane < nw ? sh[lane] : T(0);
  r = warp_sum(r);  // every warp reduces the partials itself: no second broadcast needed
  return r;
}

template <class T>
__device__ T block_max(T v, T identity) {
  __shared__ T sh[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  T r = lane < nw ? sh[lane] : identity;
  r = warp_max(r);
  return r;
}

// log-sum-exp of the row l (V values), returned to every thread of the block: the maximum, then float exponentials
// summed in double (the CPU ops' arithmetic). Every thread calls it.
__device__ inline double block_logsumexp(const float* __restrict__ l, int64_t V) {
  float mx = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, l[v]);
  mx = block_max(mx, -INFINITY);
  double sum = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) sum += expf(l[v] - mx);
  sum = block_sum(sum);
  return log(sum) + mx;
}

// blocks for a grid-stride loop over n items
inline unsigned grid_for(int64_t n, int block = kBlock) {
  const int64_t g = (n + block - 1) / block;
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>(g, int64_t(1) << 20));
}

}  // namespace dsv3::cuda
