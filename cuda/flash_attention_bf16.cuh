// defines: the kernels of cuda::flash_bf16_forward / flash_bf16_backward (flash_attention_bf16.cu) — MLA causal
// attention in BF16 attention mode (Backend::set_bf16_attention, run.attention_dtype = bf16) on the tensor cores:
// mma.sync m16n8k16 with BF16 operands
// and FP32 accumulators (sm_80 and later), the FlashAttention-2 algorithm of flash_attention.cu (online softmax
// forward, lse kept; backward with D = rowsum(dO o) recomputing P, one kernel for dk/dv per key block and one for dq
// per query block: no atomics).
//
// Tiles: a CTA of 4 warps owns 64 rows (queries in the forward and dq kernels, keys in the dk/dv kernel), a warp 16 of
// them; the other side goes in blocks of 64 (Backend::kFlashKeyBlock: the forward's rounding of P per key block with
// the running maximum is part of the definition the CPU implements). Operands are rounded to BF16 (nearest even) as
// they are loaded from the FP32 tensors into shared memory, head dims padded with zeros to a multiple of 16. A warp's
// 16 x 64 score strip stays in registers (mma's accumulator layout: lane = 4 g + t holds rows g and g + 8, columns
// 2t, 2t + 1 of every 8-column tile), where the softmax works on it and from where it feeds the next product as the
// A operand (two adjacent accumulator tiles are one k16 A fragment). The wide accumulators (O, dK, dV, dQ: up to
// 64 x 192 per CTA) live in shared memory in FP32, each element owned by one thread, updated once per block.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): with g = lane / 4, t = lane % 4,
//   A (16x16, row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   B (16x8, col):  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C (16x8):       c0, c1 = C[g][2t], C[g][2t+1];  c2, c3 = C[g+8][2t], C[g+8][2t+1]
// each register holding two BF16, the lower k index in the lower half.
//
// Device code only, included by flash_attention_bf16.cu and, with DSV3_SIMT_EMULATION defined, by the host test
// tests/unit/test_flash_bf16_simt.cpp, which runs these kernels on the CPU (a thread per CUDA thread, the warp's mma
// and shuffles exchanged through memory: tests/unit/simt_emulation.h) against the CPU backend's BF16 attention.
#pragma once
#ifndef DSV3_SIMT_EMULATION
#include <cuda_bf16.h>
#endif

#include <cstddef>
#include <cstdint>

#include "flash_shape.h"
#include "kernel_utils.cuh"
#include "ops/backend.h"

namespace dsv3::cuda {

namespace {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // rows a CTA owns: 16 per warp
constexpr int kBlk = 64;            // the other side's block: keys (forward, dq) or queries (dk/dv)
constexpr int kNT = kBlk / 8;       // 8-column accumulator tiles of a warp's 16 x kBlk strip
constexpr int kKT = kBlk / 16;      // k16 steps over a block
static_assert(kBlk == Backend::kFlashKeyBlock, "the forward's P rounding per key block is the CPU's definition");
static_assert(kRows == kBlk, "the causal block loops assume square, aligned tiles");

__host__ __device__ inline int pad16(int x) { return (x + 15) / 16 * 16; }
// row stride (elements) of a BF16 tile of `cols` columns: padded to 16, plus 8 so that the eight rows one fragment
// load touches start 4 banks apart ((16 k + 8) / 2 words per row: conflict-free)
__host__ __device__ inline int ld_tile(int cols) { return pad16(cols) + 8; }
// row stride (floats) of an FP32 accumulator tile: +8 keeps a half-warp's float2 updates on distinct banks
__host__ __device__ inline int ld_acc(int cols) { return pad16(cols) + 8; }

__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef DSV3_SIMT_EMULATION
  simt_emulation_mma(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ uint32_t pack(bf16 lo, bf16 hi) {
  return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}
// two FP32 values rounded to BF16 (nearest even), the first in the lower half
__device__ __forceinline__ uint32_t pack_rn(float lo, float hi) {
  return pack(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}
__device__ __forceinline__ uint32_t ld32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A (16x16) = X[m0 + m][k0 + k] of a row-major BF16 tile (row stride ld)
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* X, int ld, int m0, int k0, int g, int t) {
  const bf16* p = X + (m0 + g) * ld + k0 + 2 * t;
  a[0] = ld32(p);
  a[1] = ld32(p + 8 * ld);
  a[2] = ld32(p + 8);
  a[3] = ld32(p + 8 * ld + 8);
}
// B (16x8) with B[k][n] = X[n0 + n][k0 + k]: X's rows are B's columns (K in Q K^T, V in dO V^T, Q in K Q^T, ...)
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[2], const bf16* X, int ld, int n0, int k0, int g, int t) {
  const bf16* p = X + (n0 + g) * ld + k0 + 2 * t;
  b[0] = ld32(p);
  b[1] = ld32(p + 8);
}
// B (16x8) with B[k][n] = X[k0 + k][n0 + n]: X's rows are B's rows (V in P V, K in dS K, Q in dS^T Q, dO in P^T dO)
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[2], const bf16* X, int ld, int k0, int n0, int g, int t) {
  const bf16* p = X + (k0 + 2 * t) * ld + n0 + g;
  b[0] = pack(p[0], p[ld]);
  b[1] = pack(p[8 * ld], p[9 * ld]);
}
// the k16 step kk of a 16 x kBlk accumulator strip as an A fragment, rounded to BF16 (tiles 2kk and 2kk + 1)
__device__ __forceinline__ void strip_as_a(uint32_t (&a)[4], const float (&s)[kNT][4], int kk) {
  a[0] = pack_rn(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack_rn(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack_rn(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack_rn(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// the warp's 16 x kBlk strip = X[m0 .. m0+15] Y[n0 .. n0+kBlk-1]^T over `kp` (a multiple of 16) columns of both
// row-major BF16 tiles (row stride ld)
__device__ __forceinline__ void strip_product(float (&s)[kNT][4], const bf16* X, const bf16* Y, int ld, int m0,
                                              int kp, int g, int t) {
#pragma unroll
  for (int n = 0; n < kNT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
  for (int k0 = 0; k0 < kp; k0 += 16) {
    uint32_t a[4];
    load_a(a, X, ld, m0, k0, g, t);
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      uint32_t b[2];
      load_b_rows(b, Y, ld, n * 8, k0, g, t);
      mma(s[n], a, b);
    }
  }
}

// acc (FP32, row stride lda) rows m0 .. m0+15, all pad16(cols) columns: += A W, A the strip's BF16 fragments (16 x
// kBlk), W (kBlk x pad16(cols)) a row-major BF16 tile (row stride ldw). `rescale` (rows g, g + 8) multiplies the old
// values first (the forward's online softmax), nullptr for none.
__device__ __forceinline__ void strip_times_tile(float* acc, int lda, int m0, const uint32_t (&a)[kKT][4],
                                                 const bf16* W, int ldw, int cols, const float* rescale, int g,
                                                 int t) {
  const int cp = pad16(cols);
  for (int n0 = 0; n0 < cp; n0 += 8) {
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int kk = 0; kk < kKT; ++kk) {
      uint32_t b[2];
      load_b_cols(b, W, ldw, kk * 16, n0, g, t);
      mma(c, a[kk], b);
    }
    float* r0 = acc + (m0 + g) * lda + n0 + 2 * t;
    float* r1 = r0 + 8 * lda;
    const float f0 = rescale ? rescale[0] : 1.0f, f1 = rescale ? rescale[1] : 1.0f;
    r0[0] = r0[0] * f0 + c[0];
    r0[1] = r0[1] * f0 + c[1];
    r1[0] = r1[0] * f1 + c[2];
    r1[1] = r1[1] * f1 + c[3];
  }
}

// rows r0 .. r0 + kRows - 1 of an FP32 matrix (leading dimension ld; columns 0..cols-1 from src, cols..cols2-1 from
// src2 with leading dimension ld2) into a BF16 tile (row stride lds, pad16(cols2) columns), rounded to nearest even;
// rows past S and the padding columns zero
__device__ void load_tile(bf16* dst, int lds, const float* __restrict__ src, int64_t ld, int cols,
                          const float* __restrict__ src2, int64_t ld2, int cols2, int r0, int S) {
  const int cp = pad16(cols2);
  for (int e = threadIdx.x; e < kRows * cp; e += kThreads) {
    const int r = e / cp, c = e % cp, i = r0 + r;
    float v = 0.0f;
    if (i < S && c < cols2) v = c < cols ? src[(int64_t)i * ld + c] : src2[(int64_t)i * ld2 + (c - cols)];
    dst[r * lds + c] = __float2bfloat16_rn(v);
  }
}

// one (sequence, head) of the operands: grid (blocks, H, B)
struct Head {
  int b, h;
  int64_t ldq, ldkv, ldo;
  const float* q;    // row 0 of the head: q_nope | q_pe
  const float* k;    // k_nope; v = k + dn
  const float* kpe;  // k_pe (shared by the heads)
};
__device__ __forceinline__ Head this_head(const FlashShape& x) {
  Head hd;
  hd.h = blockIdx.y;
  hd.b = blockIdx.z;
  hd.ldq = (int64_t)x.H * (x.dn + x.dr);
  hd.ldkv = (int64_t)x.H * (x.dn + x.dv);
  hd.ldo = (int64_t)x.H * x.dv;
  hd.q = x.q + (int64_t)hd.b * x.S * hd.ldq + (int64_t)hd.h * (x.dn + x.dr);
  hd.k = x.kv + (int64_t)hd.b * x.S * hd.ldkv + (int64_t)hd.h * (x.dn + x.dv);
  hd.kpe = x.kpe + (int64_t)hd.b * x.S * x.ldkpe;
  return hd;
}
// Q (q_nope | q_pe), K (k_nope | k_pe) and V tiles of kRows rows from r0
__device__ void load_q(bf16* Qs, const FlashShape& x, const Head& hd, int r0) {
  const int dqk = x.dn + x.dr;
  load_tile(Qs, ld_tile(dqk), hd.q, hd.ldq, dqk, hd.q, hd.ldq, dqk, r0, x.S);
}
__device__ void load_k(bf16* Ks, const FlashShape& x, const Head& hd, int r0) {
  load_tile(Ks, ld_tile(x.dn + x.dr), hd.k, hd.ldkv, x.dn, hd.kpe, x.ldkpe, x.dn + x.dr, r0, x.S);
}
__device__ void load_v(bf16* Vs, const FlashShape& x, const Head& hd, int r0) {
  load_tile(Vs, ld_tile(x.dv), hd.k + x.dn, hd.ldkv, x.dv, hd.k + x.dn, hd.ldkv, x.dv, r0, x.S);
}
__device__ void load_do(bf16* dOs, const FlashShape& x, const Head& hd, const float* dout, int r0) {
  const float* d = dout + (int64_t)hd.b * x.S * hd.ldo + (int64_t)hd.h * x.dv;
  load_tile(dOs, ld_tile(x.dv), d, hd.ldo, x.dv, d, hd.ldo, x.dv, r0, x.S);
}
// lse and D of rows r0 .. r0 + kRows - 1 of the head (0 past S)
__device__ void load_row_stats(float* lse_s, float* D_s, const FlashShape& x, const Head& hd, const float* lse,
                               const float* D, int r0) {
  const int64_t base = ((int64_t)hd.b * x.H + hd.h) * x.S;
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    const int i = r0 + r;
    lse_s[r] = i < x.S ? lse[base + i] : 0.0f;
    D_s[r] = i < x.S ? D[base + i] : 0.0f;
  }
}
__device__ void zero(float* p, int n) {
  for (int e = threadIdx.x; e < n; e += kThreads) p[e] = 0.0f;
}

// element e (0..3) of accumulator tile n of the strip: row offset (0 or 8) + g, column n * 8 + 2t + (e & 1)
__device__ __forceinline__ int elem_row(int e, int g) { return g + (e >> 1) * 8; }
__device__ __forceinline__ int elem_col(int n, int e, int t) { return n * 8 + 2 * t + (e & 1); }

// ---- forward ---------------------------------------------------------------------------------------------------

// shared memory: Q, K (kRows, ld_tile(dqk)) | V (kRows, ld_tile(dv)) BF16 | O (kRows, ld_acc(dv)) FP32 | 1/l (kRows)
size_t fwd_smem(int dqk, int dv) {
  return sizeof(bf16) * (size_t)kRows * (2 * ld_tile(dqk) + ld_tile(dv)) +
         sizeof(float) * ((size_t)kRows * ld_acc(dv) + kRows);
}

// grid (ceil(S / kRows), H, B)
__global__ void __launch_bounds__(kThreads) flash_bf16_fwd_kernel(FlashShape x, float* __restrict__ o,
                                                                   float* __restrict__ lse) {
  DSV3_DYNAMIC_SMEM(smem);
  const int dqk = x.dn + x.dr, lq = ld_tile(dqk), lv = ld_tile(x.dv), lo = ld_acc(x.dv);
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* Ks = Qs + kRows * lq;
  bf16* Vs = Ks + kRows * lq;
  float* Os = reinterpret_cast<float*>(Vs + kRows * lv);  // kRows * (2 lq + lv) is a multiple of 8: 16-byte aligned
  float* inv_l = Os + kRows * lo;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int i0 = blockIdx.x * kRows, m0 = warp * 16;
  const Head hd = this_head(x);

  load_q(Qs, x, hd, i0);
  zero(Os, kRows * lo);
  // rows g and g + 8 of the warp's strip: running maximum and sum (the same in the 4 lanes of a row)
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  const int row_i[2] = {i0 + m0 + g, i0 + m0 + g + 8};
  const int j_end = min(x.S, i0 + kRows);
  for (int j0 = 0; j0 < j_end; j0 += kBlk) {
    __syncthreads();  // the previous block's K and V are consumed (the first time: Q and O are ready)
    load_k(Ks, x, hd, j0);
    load_v(Vs, x, hd, j0);
    __syncthreads();
    float s[kNT][4];
    strip_product(s, Qs, Ks, lq, m0, pad16(dqk), g, t);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kNT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = j0 + elem_col(n, e, t), rr = e >> 1;
        const float v = (j <= row_i[rr] && j < x.S) ? s[n][e] * x.scale : -INFINITY;
        s[n][e] = v;
        mx[rr] = fmaxf(mx[rr], v);
      }
    float f[2], rowsum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {  // the 4 lanes t of a row
      mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 1));
      mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 2));
      // key 0 is visible to every row, so after the first block m is finite (rows past S included)
      const float m_new = fmaxf(m_run[rr], mx[rr]);
      f[rr] = m_run[rr] == -INFINITY ? 0.0f : expf(m_run[rr] - m_new);
      m_run[rr] = m_new;
    }
#pragma unroll
    for (int n = 0; n < kNT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = e >> 1;
        const float p = s[n][e] == -INFINITY ? 0.0f : expf(s[n][e] - m_run[rr]);
        s[n][e] = p;  // FP32 into l; rounded to BF16 for P V (strip_as_a)
        rowsum[rr] += p;
      }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      rowsum[rr] += __shfl_xor_sync(0xffffffffu, rowsum[rr], 1);
      rowsum[rr] += __shfl_xor_sync(0xffffffffu, rowsum[rr], 2);
      l_run[rr] = l_run[rr] * f[rr] + rowsum[rr];
    }
    uint32_t pa[kKT][4];
#pragma unroll
    for (int kk = 0; kk < kKT; ++kk) strip_as_a(pa[kk], s, kk);
    // O = O f + P V (the warp's own rows of O)
    strip_times_tile(Os, lo, m0, pa, Vs, lv, x.dv, f, g, t);
  }
  const int64_t lbase = ((int64_t)hd.b * x.H + hd.h) * x.S;
  if (t == 0) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      inv_l[m0 + g + 8 * rr] = 1.0f / l_run[rr];
      if (row_i[rr] < x.S) lse[lbase + row_i[rr]] = m_run[rr] + logf(l_run[rr]);
    }
  }
  __syncthreads();  // every warp's O rows and 1/l are final
  float* ob = o + (int64_t)hd.b * x.S * hd.ldo + (int64_t)hd.h * x.dv;
  for (int e = threadIdx.x; e < kRows * x.dv; e += kThreads) {
    const int r = e / x.dv, c = e % x.dv, i = i0 + r;
    if (i < x.S) ob[(int64_t)i * hd.ldo + c] = Os[r * lo + c] * inv_l[r];
  }
}

// ---- backward --------------------------------------------------------------------------------------------------

// P and dS of the warp's strip, in place over s (scores in) and dp (dO V^T in): P = exp(scale s - lse) where
// visible (query i, key j: j <= i < S), dS = scale P (dp - D); lse and D per element from the callbacks' row / column
template <class Visible, class Lse, class Dsum>
__device__ __forceinline__ void p_and_ds(float (&s)[kNT][4], float (&dp)[kNT][4], float scale, Visible visible,
                                         Lse lse_of, Dsum D_of, int g, int t) {
#pragma unroll
  for (int n = 0; n < kNT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = elem_row(e, g), c = elem_col(n, e, t);
      const float p = visible(r, c) ? expf(s[n][e] * scale - lse_of(r, c)) : 0.0f;
      s[n][e] = p;
      dp[n][e] = scale * p * (dp[n][e] - D_of(r, c));
    }
}

// shared memory: K, Q (kRows, ld_tile(dqk)) | V, dO (kRows, ld_tile(dv)) BF16 | dK (kRows, ld_acc(dqk)) |
// dV (kRows, ld_acc(dv)) | lse, D (kRows) FP32
size_t dkv_smem(int dqk, int dv) {
  return sizeof(bf16) * (size_t)kRows * 2 * (ld_tile(dqk) + ld_tile(dv)) +
         sizeof(float) * ((size_t)kRows * (ld_acc(dqk) + ld_acc(dv)) + 2 * kRows);
}

// grid (ceil(S / kRows), H, B): the CTA owns keys j0 .. j0 + 63, a warp 16 of them; works on transposed strips
// (keys x queries): S^T = K Q^T, dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q
__global__ void __launch_bounds__(kThreads) flash_bf16_dkv_kernel(FlashShape x, const float* __restrict__ lse,
                                                                  const float* __restrict__ D,
                                                                  const float* __restrict__ dout,
                                                                  float* __restrict__ dkv, float* __restrict__ dkpe_h) {
  DSV3_DYNAMIC_SMEM(smem);
  const int dqk = x.dn + x.dr, lq = ld_tile(dqk), lv = ld_tile(x.dv), lk_acc = ld_acc(dqk), lv_acc = ld_acc(x.dv);
  bf16* Ks = reinterpret_cast<bf16*>(smem);
  bf16* Qs = Ks + kRows * lq;
  bf16* Vs = Qs + kRows * lq;
  bf16* dOs = Vs + kRows * lv;
  float* dKs = reinterpret_cast<float*>(dOs + kRows * lv);
  float* dVs = dKs + kRows * lk_acc;
  float* lse_s = dVs + kRows * lv_acc;
  float* D_s = lse_s + kRows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int j0 = blockIdx.x * kRows, m0 = warp * 16;
  const Head hd = this_head(x);

  load_k(Ks, x, hd, j0);
  load_v(Vs, x, hd, j0);
  zero(dKs, kRows * lk_acc);
  zero(dVs, kRows * lv_acc);
  const int S = x.S;
  // the first query block that sees key j0 is the one holding query j0 (square, aligned tiles)
  for (int i0 = j0; i0 < S; i0 += kBlk) {
    __syncthreads();  // the previous query block is consumed (the first time: K, V and the accumulators are ready)
    load_q(Qs, x, hd, i0);
    load_do(dOs, x, hd, dout, i0);
    load_row_stats(lse_s, D_s, x, hd, lse, D, i0);
    __syncthreads();
    float s[kNT][4], dp[kNT][4];
    strip_product(s, Ks, Qs, lq, m0, pad16(dqk), g, t);    // S^T: keys m0 + r, queries c
    strip_product(dp, Vs, dOs, lv, m0, pad16(x.dv), g, t);  // dP^T
    const int key0 = j0 + m0;
    p_and_ds(
        s, dp, x.scale, [&](int r, int c) { return i0 + c < S && key0 + r <= i0 + c; },
        [&](int, int c) { return lse_s[c]; }, [&](int, int c) { return D_s[c]; }, g, t);
    uint32_t pa[kKT][4], dsa[kKT][4];
#pragma unroll
    for (int kk = 0; kk < kKT; ++kk) {
      strip_as_a(pa[kk], s, kk);    // P^T (keys x queries) in BF16
      strip_as_a(dsa[kk], dp, kk);  // dS^T in BF16
    }
    strip_times_tile(dVs, lv_acc, m0, pa, dOs, lv, x.dv, nullptr, g, t);  // dV += P^T dO
    strip_times_tile(dKs, lk_acc, m0, dsa, Qs, lq, dqk, nullptr, g, t);   // dK += dS^T Q
  }
  __syncthreads();  // every warp's rows of dK and dV are final
  float* kb = dkv + (int64_t)hd.b * S * hd.ldkv + (int64_t)hd.h * (x.dn + x.dv);
  for (int e = threadIdx.x; e < kRows * dqk; e += kThreads) {
    const int r = e / dqk, c = e % dqk, j = j0 + r;
    if (j >= S) continue;
    if (c < x.dn)
      kb[(int64_t)j * hd.ldkv + c] = dKs[r * lk_acc + c];
    else
      dkpe_h[(((int64_t)hd.b * x.H + hd.h) * S + j) * x.dr + (c - x.dn)] = dKs[r * lk_acc + c];
  }
  for (int e = threadIdx.x; e < kRows * x.dv; e += kThreads) {
    const int r = e / x.dv, c = e % x.dv, j = j0 + r;
    if (j < S) kb[(int64_t)j * hd.ldkv + x.dn + c] = dVs[r * lv_acc + c];
  }
}

// shared memory: Q, K (kRows, ld_tile(dqk)) | dO, V (kRows, ld_tile(dv)) BF16 | dQ (kRows, ld_acc(dqk)) |
// lse, D (kRows) FP32
size_t dq_smem(int dqk, int dv) {
  return sizeof(bf16) * (size_t)kRows * 2 * (ld_tile(dqk) + ld_tile(dv)) +
         sizeof(float) * ((size_t)kRows * ld_acc(dqk) + 2 * kRows);
}

// grid (ceil(S / kRows), H, B): the CTA owns queries i0 .. i0 + 63; S = Q K^T, dP = dO V^T, dQ += dS K
__global__ void __launch_bounds__(kThreads) flash_bf16_dq_kernel(FlashShape x, const float* __restrict__ lse,
                                                                 const float* __restrict__ D,
                                                                 const float* __restrict__ dout,
                                                                 float* __restrict__ dq) {
  DSV3_DYNAMIC_SMEM(smem);
  const int dqk = x.dn + x.dr, lq = ld_tile(dqk), lv = ld_tile(x.dv), lq_acc = ld_acc(dqk);
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* Ks = Qs + kRows * lq;
  bf16* dOs = Ks + kRows * lq;
  bf16* Vs = dOs + kRows * lv;
  float* dQs = reinterpret_cast<float*>(Vs + kRows * lv);
  float* lse_s = dQs + kRows * lq_acc;
  float* D_s = lse_s + kRows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int i0 = blockIdx.x * kRows, m0 = warp * 16;
  const Head hd = this_head(x);

  load_q(Qs, x, hd, i0);
  load_do(dOs, x, hd, dout, i0);
  load_row_stats(lse_s, D_s, x, hd, lse, D, i0);
  zero(dQs, kRows * lq_acc);
  const int S = x.S, j_end = min(S, i0 + kRows);
  for (int j0 = 0; j0 < j_end; j0 += kBlk) {
    __syncthreads();  // the previous key block is consumed (the first time: Q, dO, lse, D, dQ are ready)
    load_k(Ks, x, hd, j0);
    load_v(Vs, x, hd, j0);
    __syncthreads();
    float s[kNT][4], dp[kNT][4];
    strip_product(s, Qs, Ks, lq, m0, pad16(dqk), g, t);     // S: queries m0 + r, keys c
    strip_product(dp, dOs, Vs, lv, m0, pad16(x.dv), g, t);  // dP
    p_and_ds(
        s, dp, x.scale, [&](int r, int c) { return i0 + m0 + r < S && j0 + c <= i0 + m0 + r; },
        [&](int r, int) { return lse_s[m0 + r]; }, [&](int r, int) { return D_s[m0 + r]; }, g, t);
    uint32_t dsa[kKT][4];
#pragma unroll
    for (int kk = 0; kk < kKT; ++kk) strip_as_a(dsa[kk], dp, kk);
    strip_times_tile(dQs, lq_acc, m0, dsa, Ks, lq, dqk, nullptr, g, t);  // dQ += dS K
  }
  __syncthreads();
  float* qb = dq + (int64_t)hd.b * S * hd.ldq + (int64_t)hd.h * dqk;
  for (int e = threadIdx.x; e < kRows * dqk; e += kThreads) {
    const int r = e / dqk, c = e % dqk, i = i0 + r;
    if (i < S) qb[(int64_t)i * hd.ldq + c] = dQs[r * lq_acc + c];
  }
}

}  // namespace

}  // namespace dsv3::cuda
