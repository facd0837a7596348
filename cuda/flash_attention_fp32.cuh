// defines: the FP32 flash-attention kernels of flash_attention.cu (the algorithm is described there) and their shared-
// memory sizes. Device code only, included by flash_attention.cu and, with DSV3_SIMT_EMULATION defined, by the host
// test tests/unit/test_flash_fp32_simt.cpp, which runs them on the CPU (tests/unit/simt_emulation.h) against the CPU
// backend's flash ops, also under AddressSanitizer and ThreadSanitizer.
#pragma once
#include <climits>
#include <cstddef>
#include <cstdint>

#include "kernel_utils.cuh"

namespace dsv3 {

namespace {

constexpr int kThreads = 256;                   // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 32;                         // query rows per block
constexpr int kBN = 32;                         // keys per block: one per lane of a warp
constexpr int kRowsPerWarp = kBM / kWarps;      // warp w owns the rows w, w + 8, w + 16, w + 24 of a block
constexpr int kLdP = kBN + 1;                   // P / dS tiles (kBM, kBN), padded
static_assert(kBN == 32, "a key block is one warp wide: lane = key");
static_assert(kBM % kWarps == 0, "every warp owns the same number of query rows");

__host__ __device__ inline int odd(int x) { return x | 1; }  // a row stride whose column reads hit distinct banks

// ---- what the kernels share --------------------------------------------------------------------------------------

// This CTA's head h = blockIdx.y of sequence b = blockIdx.z: the row strides of the operands (q and dq: q_nope | q_pe,
// H * (dn + dr) per token; kv and dkv: k_nope | v, H * (dn + dv); o and dout: H * dv) and row 0 of the head in q, kv
// and kpe (k_pe: the same rows for every head, ldkpe apart).
struct Head {
  int b, h;
  int64_t ldq, ldkv, ldo, ldkpe;
  const float* q;
  const float* kv;
  const float* kpe;
};
__device__ __forceinline__ Head this_head(const float* q, const float* kv, const float* kpe, int64_t ldkpe, int S,
                                          int H, int dn, int dr, int dv) {
  Head x;
  x.h = blockIdx.y;
  x.b = blockIdx.z;
  x.ldq = (int64_t)H * (dn + dr);
  x.ldkv = (int64_t)H * (dn + dv);
  x.ldo = (int64_t)H * dv;
  x.ldkpe = ldkpe;
  x.q = q + (int64_t)x.b * S * x.ldq + (int64_t)x.h * (dn + dr);
  x.kv = kv + (int64_t)x.b * S * x.ldkv + (int64_t)x.h * (dn + dv);
  x.kpe = kpe + (int64_t)x.b * S * ldkpe;
  return x;
}

// K block of the head (kBN keys from j0, per key k_nope(dn) | k_pe(dr): the score's dot product runs over dn + dr)
// into Ks with row stride ldk, and V (dv) into Vs with row stride ldv; rows past S are zero.
__device__ void load_kv_block(float* Ks, int ldk, float* Vs, int ldv, const Head& hd, int j0, int S, int dn, int dr,
                              int dv) {
  const float* __restrict__ kb = hd.kv;
  const float* __restrict__ pb = hd.kpe;
  const int64_t ldkv = hd.ldkv, ldkpe = hd.ldkpe;
  const int dqk = dn + dr;
  for (int e = threadIdx.x; e < kBN * dqk; e += kThreads) {
    const int r = e / dqk, k = e % dqk, j = j0 + r;
    float v = 0.0f;
    if (j < S) v = k < dn ? kb[(int64_t)j * ldkv + k] : pb[(int64_t)j * ldkpe + (k - dn)];
    Ks[r * ldk + k] = v;
  }
  for (int e = threadIdx.x; e < kBN * dv; e += kThreads) {
    const int r = e / dv, c = e % dv, j = j0 + r;
    Vs[r * ldv + c] = j < S ? kb[(int64_t)j * ldkv + dn + c] : 0.0f;
  }
}

// `rows` rows of `cols` floats from row r0 of src (leading dimension ld) into dst (row stride ldd); rows past S zero
__device__ void load_rows(float* dst, int ldd, const float* __restrict__ src, int64_t ld, int r0, int rows, int cols,
                          int S) {
  for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
    const int r = e / cols, c = e % cols, i = r0 + r;
    dst[r * ldd + c] = i < S ? src[(int64_t)i * ld + c] : 0.0f;
  }
}

__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
  float acc = 0.0f;
  for (int k = 0; k < n; ++k) acc = fmaf(a[k], b[k], acc);
  return acc;
}

// the scaled score of query row r of the Q tile and key `lane` of the K tile: scale (q_nope . k_nope + q_pe . k_pe),
// one dot product over the dqk = dn + dr columns of both tiles (row stride ldk)
__device__ __forceinline__ float score(const float* Qs, const float* Ks, int ldk, int dqk, int r, int lane,
                                       float scale) {
  return scale * dot(Qs + r * ldk, Ks + lane * ldk, dqk);
}

// ---- forward ---------------------------------------------------------------------------------------------------

// shared memory, in floats: Q (kBM, odd(dqk)) | K (kBN, odd(dqk)) | V (kBN, dv) | P (kBM, kLdP) | O (kBM, dv) |
// per-row factor (kBM)
size_t fwd_smem_bytes(int dqk, int dv) {
  const size_t f = (size_t)(kBM + kBN) * odd(dqk) + (size_t)kBN * dv + (size_t)kBM * kLdP + (size_t)kBM * dv + kBM;
  return f * sizeof(float);
}

// grid (ceil(S/kBM), H, B), kThreads threads, fwd_smem_bytes(dn + dr, dv) of dynamic shared memory
__global__ void __launch_bounds__(kThreads)
    flash_fwd_kernel(const float* __restrict__ q, const float* __restrict__ kv, const float* __restrict__ kpe,
                     int64_t ldkpe, int S, int H, int dn, int dr, int dv, float scale, float* __restrict__ o,
                     float* __restrict__ lse) {
  DSV3_DYNAMIC_SMEM(smem_bytes);
  float* smem = reinterpret_cast<float*>(smem_bytes);
  const int dqk = dn + dr, ldk = odd(dqk);
  const int i0 = blockIdx.x * kBM;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Head hd = this_head(q, kv, kpe, ldkpe, S, H, dn, dr, dv);
  float* Qs = smem;
  float* Ks = Qs + kBM * ldk;
  float* Vs = Ks + kBN * ldk;
  float* Ps = Vs + kBN * dv;
  float* Os = Ps + kBM * kLdP;
  float* row_f = Os + kBM * dv;  // per row: exp(m_old - m_new) in the loop, 1/l at the end

  load_rows(Qs, ldk, hd.q, hd.ldq, i0, kBM, dqk, S);
  for (int e = threadIdx.x; e < kBM * dv; e += kThreads) Os[e] = 0.0f;
  float m_run[kRowsPerWarp], l_run[kRowsPerWarp];  // the same in every lane of the owning warp
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) m_run[rr] = -INFINITY, l_run[rr] = 0.0f;

  // keys past the block's last row are masked for all of its rows; key 0 is visible to every row, so after the first
  // block m is finite and l >= 1 in every row (rows past S included: computed, never stored)
  const int j_end = min(S, i0 + kBM);
  for (int j0 = 0; j0 < j_end; j0 += kBN) {
    __syncthreads();  // the previous block's K, V and P are consumed
    load_kv_block(Ks, ldk, Vs, dv, hd, j0, S, dn, dr, dv);
    __syncthreads();
    const int j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp + rr * kWarps, i = i0 + r;
      float s = -INFINITY;
      if (j <= i && j < S) s = score(Qs, Ks, ldk, dqk, r, lane, scale);
      const float m_new = fmaxf(m_run[rr], cuda::warp_max(s));
      const float p = s == -INFINITY ? 0.0f : expf(s - m_new);
      const float f = m_run[rr] == -INFINITY ? 0.0f : expf(m_run[rr] - m_new);
      l_run[rr] = l_run[rr] * f + cuda::warp_sum(p);
      m_run[rr] = m_new;
      Ps[r * kLdP + lane] = p;
      if (lane == 0) row_f[r] = f;
    }
    __syncthreads();
    // O = O * f + P V
    for (int e = threadIdx.x; e < kBM * dv; e += kThreads) {
      const int r = e / dv, c = e % dv;
      const float* pr = Ps + r * kLdP;
      float acc = Os[e] * row_f[r];
      for (int jj = 0; jj < kBN; ++jj) acc = fmaf(pr[jj], Vs[jj * dv + c], acc);
      Os[e] = acc;
    }
  }
  __syncthreads();  // every thread has read row_f for the last time
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp + rr * kWarps, i = i0 + r;
    if (lane == 0) {
      row_f[r] = 1.0f / l_run[rr];
      if (i < S) lse[((int64_t)hd.b * H + hd.h) * S + i] = m_run[rr] + logf(l_run[rr]);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kBM * dv; e += kThreads) {
    const int r = e / dv, c = e % dv, i = i0 + r;
    if (i < S) o[((int64_t)hd.b * S + i) * hd.ldo + (int64_t)hd.h * dv + c] = Os[e] * row_f[r];
  }
}

// ---- backward --------------------------------------------------------------------------------------------------

// D (B,H,S) = rowsum(dout * o) of each head's dv values; one warp per (token, head), grid-stride
__global__ void flash_bwd_rowdot_kernel(const float* __restrict__ o, const float* __restrict__ dout, int64_t tokens,
                                        int S, int H, int dv, float* __restrict__ D) {
  const int lane = threadIdx.x & 31;
  const int64_t n = tokens * H, nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < n; w += nwarps) {
    const int64_t t = w / H, h = w % H, base = t * H * dv + h * dv;
    float acc = 0.0f;
    for (int c = lane; c < dv; c += 32) acc = fmaf(dout[base + c], o[base + c], acc);
    acc = cuda::warp_sum(acc);
    if (lane == 0) D[((t / S) * H + h) * S + t % S] = acc;
  }
}

// P(i, j) and dS(i, j) = scale P (dO_i . V_j - D_i) of query row r (i = i0 + r) and key j = j0 + lane, from the tiles
// in shared memory; both 0 where masked (j > i, or past S)
struct PdS {
  float p, ds;
};
__device__ __forceinline__ PdS p_ds(const float* Qs, const float* Ks, int ldk, int dqk, const float* dOs,
                                    const float* Vs, int ldv, int dv, float lse_r, float D_r, int r, int lane, int i,
                                    int j, int S, float scale) {
  PdS x{0.0f, 0.0f};
  if (j <= i && i < S) {
    x.p = expf(score(Qs, Ks, ldk, dqk, r, lane, scale) - lse_r);
    x.ds = scale * x.p * (dot(dOs + r * ldv, Vs + lane * ldv, dv) - D_r);
  }
  return x;
}

// the query rows i0..i0+kBM-1 of the head that both backward kernels need: Q into Qs (row stride ldk), dO into dOs
// (row stride ldv), lse and D into lse_s and D_s; rows past S are zero
__device__ void load_query_block(float* Qs, int ldk, float* dOs, int ldv, float* lse_s, float* D_s, const Head& hd,
                                 const float* __restrict__ dout, const float* __restrict__ lse,
                                 const float* __restrict__ D, int i0, int S, int H, int dqk, int dv) {
  const float* dob = dout + (int64_t)hd.b * S * hd.ldo + (int64_t)hd.h * dv;
  const float* lb = lse + ((int64_t)hd.b * H + hd.h) * S;
  const float* Db = D + ((int64_t)hd.b * H + hd.h) * S;
  load_rows(Qs, ldk, hd.q, hd.ldq, i0, kBM, dqk, S);
  load_rows(dOs, ldv, dob, hd.ldo, i0, kBM, dv, S);
  for (int r = threadIdx.x; r < kBM; r += kThreads) {
    const int i = i0 + r;
    lse_s[r] = i < S ? lb[i] : 0.0f;
    D_s[r] = i < S ? Db[i] : 0.0f;
  }
}

// C (kBN, cols) += A^T B over the kBM query rows: A (kBM, kBN) a P or dS tile (row stride kLdP), B (kBM, cols) with row
// stride ldb, C dense
__device__ void add_At_B(float* C, int cols, const float* A, const float* B, int ldb) {
  for (int e = threadIdx.x; e < kBN * cols; e += kThreads) {
    const int c = e / cols, k = e % cols;
    float acc = C[e];
    for (int r = 0; r < kBM; ++r) acc = fmaf(A[r * kLdP + c], B[r * ldb + k], acc);
    C[e] = acc;
  }
}

// shared memory, in floats: K (kBN, odd(dqk)) | V (kBN, odd(dv)) | Q (kBM, odd(dqk)) | dO (kBM, odd(dv)) |
// P, dS (kBM, kLdP) each | dK (kBN, dqk) | dV (kBN, dv) | lse, D (kBM) each
size_t dkv_smem_bytes(int dqk, int dv) {
  const size_t f = (size_t)(kBN + kBM) * (odd(dqk) + odd(dv)) + 2 * (size_t)kBM * kLdP + (size_t)kBN * (dqk + dv) +
                   2 * kBM;
  return f * sizeof(float);
}

// grid (ceil(S/kBN), H, B): dk_nope and dv into dkv (written), dk_pe of this head into dkpe_h (B,H,S,dr)
__global__ void __launch_bounds__(kThreads)
    flash_bwd_dkv_kernel(const float* __restrict__ q, const float* __restrict__ kv, const float* __restrict__ kpe,
                         int64_t ldkpe, const float* __restrict__ lse, const float* __restrict__ D,
                         const float* __restrict__ dout, int S, int H, int dn, int dr, int dv, float scale,
                         float* __restrict__ dkv, float* __restrict__ dkpe_h) {
  DSV3_DYNAMIC_SMEM(smem_bytes);
  float* smem = reinterpret_cast<float*>(smem_bytes);
  const int dqk = dn + dr, ldk = odd(dqk), ldv = odd(dv);
  const int j0 = blockIdx.x * kBN;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Head hd = this_head(q, kv, kpe, ldkpe, S, H, dn, dr, dv);
  float* Ks = smem;
  float* Vs = Ks + kBN * ldk;
  float* Qs = Vs + kBN * ldv;
  float* dOs = Qs + kBM * ldk;
  float* Ps = dOs + kBM * ldv;
  float* dSs = Ps + kBM * kLdP;
  float* dKs = dSs + kBM * kLdP;
  float* dVs = dKs + kBN * dqk;
  float* lse_s = dVs + kBN * dv;
  float* D_s = lse_s + kBM;

  load_kv_block(Ks, ldk, Vs, ldv, hd, j0, S, dn, dr, dv);
  for (int e = threadIdx.x; e < kBN * dqk; e += kThreads) dKs[e] = 0.0f;
  for (int e = threadIdx.x; e < kBN * dv; e += kThreads) dVs[e] = 0.0f;
  // the first query row that sees key j0 is j0 itself
  for (int i0 = j0 / kBM * kBM; i0 < S; i0 += kBM) {
    __syncthreads();  // the previous query block's tiles are consumed (the first time: K, V are loaded)
    load_query_block(Qs, ldk, dOs, ldv, lse_s, D_s, hd, dout, lse, D, i0, S, H, dqk, dv);
    __syncthreads();
    const int j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp + rr * kWarps;
      const PdS x = p_ds(Qs, Ks, ldk, dqk, dOs, Vs, ldv, dv, lse_s[r], D_s[r], r, lane, i0 + r, j, S, scale);
      Ps[r * kLdP + lane] = x.p;
      dSs[r * kLdP + lane] = x.ds;
    }
    __syncthreads();
    // dV(c, k) += sum_r P(r, c) dO(r, k);  dK(c, k) += sum_r dS(r, c) Q(r, k)
    add_At_B(dVs, dv, Ps, dOs, ldv);
    add_At_B(dKs, dqk, dSs, Qs, ldk);
  }
  __syncthreads();
  float* dkb = dkv + (int64_t)hd.b * S * hd.ldkv + (int64_t)hd.h * (dn + dv);
  for (int e = threadIdx.x; e < kBN * dqk; e += kThreads) {
    const int c = e / dqk, k = e % dqk, j = j0 + c;
    if (j >= S) continue;
    if (k < dn)
      dkb[(int64_t)j * hd.ldkv + k] = dKs[e];
    else
      dkpe_h[(((int64_t)hd.b * H + hd.h) * S + j) * dr + (k - dn)] = dKs[e];
  }
  for (int e = threadIdx.x; e < kBN * dv; e += kThreads) {
    const int c = e / dv, k = e % dv, j = j0 + c;
    if (j < S) dkb[(int64_t)j * hd.ldkv + dn + k] = dVs[e];
  }
}

// shared memory, in floats: Q (kBM, odd(dqk)) | dO (kBM, odd(dv)) | K (kBN, odd(dqk)) | V (kBN, odd(dv)) |
// dS (kBM, kLdP) | dQ (kBM, dqk) | lse, D (kBM) each
size_t dq_smem_bytes(int dqk, int dv) {
  const size_t f =
      (size_t)(kBM + kBN) * (odd(dqk) + odd(dv)) + (size_t)kBM * kLdP + (size_t)kBM * dqk + 2 * kBM;
  return f * sizeof(float);
}

// grid (ceil(S/kBM), H, B): dq (q_nope | q_pe of this head) written
__global__ void __launch_bounds__(kThreads)
    flash_bwd_dq_kernel(const float* __restrict__ q, const float* __restrict__ kv, const float* __restrict__ kpe,
                        int64_t ldkpe, const float* __restrict__ lse, const float* __restrict__ D,
                        const float* __restrict__ dout, int S, int H, int dn, int dr, int dv, float scale,
                        float* __restrict__ dq) {
  DSV3_DYNAMIC_SMEM(smem_bytes);
  float* smem = reinterpret_cast<float*>(smem_bytes);
  const int dqk = dn + dr, ldk = odd(dqk), ldv = odd(dv);
  const int i0 = blockIdx.x * kBM;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Head hd = this_head(q, kv, kpe, ldkpe, S, H, dn, dr, dv);
  float* Qs = smem;
  float* dOs = Qs + kBM * ldk;
  float* Ks = dOs + kBM * ldv;
  float* Vs = Ks + kBN * ldk;
  float* dSs = Vs + kBN * ldv;
  float* dQs = dSs + kBM * kLdP;
  float* lse_s = dQs + kBM * dqk;
  float* D_s = lse_s + kBM;

  load_query_block(Qs, ldk, dOs, ldv, lse_s, D_s, hd, dout, lse, D, i0, S, H, dqk, dv);
  for (int e = threadIdx.x; e < kBM * dqk; e += kThreads) dQs[e] = 0.0f;
  const int j_end = min(S, i0 + kBM);
  for (int j0 = 0; j0 < j_end; j0 += kBN) {
    __syncthreads();  // the previous key block is consumed (the first time: Q, dO, lse, D are loaded)
    load_kv_block(Ks, ldk, Vs, ldv, hd, j0, S, dn, dr, dv);
    __syncthreads();
    const int j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp + rr * kWarps;
      dSs[r * kLdP + lane] =
          p_ds(Qs, Ks, ldk, dqk, dOs, Vs, ldv, dv, lse_s[r], D_s[r], r, lane, i0 + r, j, S, scale).ds;
    }
    __syncthreads();
    // dQ(r, k) += sum_c dS(r, c) K(c, k)
    for (int e = threadIdx.x; e < kBM * dqk; e += kThreads) {
      const int r = e / dqk, k = e % dqk;
      float acc = dQs[e];
      for (int c = 0; c < kBN; ++c) acc = fmaf(dSs[r * kLdP + c], Ks[c * ldk + k], acc);
      dQs[e] = acc;
    }
  }
  __syncthreads();
  float* dqb = dq + (int64_t)hd.b * S * hd.ldq + (int64_t)hd.h * dqk;
  for (int e = threadIdx.x; e < kBM * dqk; e += kThreads) {
    const int r = e / dqk, k = e % dqk, i = i0 + r;
    if (i < S) dqb[(int64_t)i * hd.ldq + k] = dQs[e];
  }
}

// dkpe(t, k) += sum over h (in order) of dkpe_h(b, h, s, k), t = b*S + s; grid-stride over the B*S*dr values
__global__ void flash_bwd_dkpe_kernel(const float* __restrict__ dkpe_h, int64_t tokens, int S, int H, int dr,
                                      float* __restrict__ dkpe, int64_t ldkpe) {
  const int64_t n = tokens * dr;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = e / dr, k = e % dr, b = t / S, s = t % S;
    float acc = 0.0f;
    for (int h = 0; h < H; ++h) acc += dkpe_h[((b * H + h) * S + s) * dr + k];
    dkpe[t * ldkpe + k] += acc;
  }
}

}  // namespace

}  // namespace dsv3
