// defines: the kernels of vocab_slices.cu (the vocabulary-parallel embedding and cross-entropy slices). Device code
// only, included by vocab_slices.cu and, with DSV3_SIMT_EMULATION defined, by tests/unit/test_kernels_simt.cpp, which
// runs them on the CPU against the CPU backend.
#pragma once
#include <cstdint>

#include "kernel_utils.cuh"

namespace dsv3 {

namespace {
using cuda::kBlock;

__global__ void emb_slice_fwd_kernel(const int64_t* __restrict__ ids, int64_t n, const float* __restrict__ table,
                                     int64_t v0, int64_t vl, int64_t dim, float* __restrict__ out) {
  const int64_t total = n * dim;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t v = ids[t / dim] - v0;
    out[t] = v >= 0 && v < vl ? table[v * dim + t % dim] : 0.0f;
  }
}

__global__ void emb_slice_bwd_kernel(const int64_t* __restrict__ ids, int64_t n, const float* __restrict__ dy,
                                     int64_t v0, int64_t vl, int64_t dim, float* dtable) {
  const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = ids[i] - v0;
    if (v >= 0 && v < vl) dtable[v * dim + j] += dy[i * dim + j];
  }
}

// one block per row: lse and (when the target is in the slice) the target's logit
__global__ void ce_slice_fwd_kernel(const float* __restrict__ logits, int64_t vl, const int64_t* __restrict__ targets,
                                    int64_t v0, double* __restrict__ lse, double* __restrict__ tgt) {
  const int64_t r = blockIdx.x;
  const float* l = logits + r * vl;
  const double ls = cuda::block_logsumexp(l, vl);
  if (threadIdx.x == 0) {
    lse[r] = ls;
    const int64_t t = targets[r] - v0;
    if (targets[r] >= 0 && t >= 0 && t < vl) tgt[r] = l[t];
  }
}

__global__ void ce_slice_bwd_kernel(const float* __restrict__ logits, const float* __restrict__ lse, int64_t vl,
                                    const int64_t* __restrict__ targets, int64_t v0, float scale,
                                    float* __restrict__ dlogits) {
  const int64_t r = blockIdx.x;
  float* d = dlogits + r * vl;
  if (targets[r] < 0) {
    for (int64_t v = threadIdx.x; v < vl; v += blockDim.x) d[v] = 0.0f;
    return;
  }
  const int64_t t = targets[r] - v0;
  const float* l = logits + r * vl;
  const float m = lse[r];
  for (int64_t v = threadIdx.x; v < vl; v += blockDim.x) {
    float g = scale * expf(l[v] - m);
    if (v == t) g -= scale;
    d[v] = g;
  }
}
}  // namespace

}  // namespace dsv3
