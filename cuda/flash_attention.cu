// defines: CudaBackend::mla_flash_attention_forward / mla_flash_attention_backward — MLA causal attention in the
// FlashAttention-2 form: no (S,S) matrix anywhere (attention.cu keeps probs (B,H,S,S): 8 GiB per sequence and layer
// at S = 4096 and 128 heads).
//   forward   one CTA per (block of kBM query rows, head, sequence) loops over the blocks of kBN keys up to the
//             causal limit with a running max m and sum l per row (online softmax); the output accumulates in FP32
//             in shared memory, rescaled by exp(m_old - m_new) per block and divided by l at the end; lse = m + log l
//             (B,H,S) is all that backward needs to recompute P.
//   backward  (1) D = rowsum(dO * O) per (sequence, head, row);
//             (2) dk/dv: one CTA per (key block, head, sequence) loops over the query blocks that see it,
//                 recomputing P = exp(score - lse): dV += P^T dO, dS = scale P (dO V^T - D), dK += dS^T Q;
//                 k_pe is shared by the heads, so its gradient goes per head to a (B,H,S,dr) scratch buffer,
//             (3) dq: one CTA per (query block, head, sequence) loops over its key blocks: dQ += dS K (dq is written
//                 by its owner only: no atomics),
//             (4) dkpe += the per-head buffer summed over the heads in head order (deterministic, as every kernel of
//                 this backend: no float atomics).
// The head dims are runtime values (the tiny test models' 16/8/16, DeepSeek-V3's 128/64/128): tiles live in dynamic
// shared memory sized from them, and rows read column-wise by a warp are padded to an odd number of floats (lane l
// reads row l: conflict-free banks). Above 48 KiB the kernels opt in with cudaFuncSetAttribute (DeepSeek-V3's dims:
// ~86 KiB forward, ~130 KiB dk/dv, ~111 KiB dq; an H100/H200 allows 227 KiB).
// These are the FP32 kernels (run.attention_dtype = fp32): plain FP32 FMA loops over shared memory, no tensor cores
// (perhaps a tenth of the GPU's FP32 peak). In BF16 attention mode (Backend::set_bf16_attention) the ops call the
// tensor-core kernels of flash_attention_bf16.cuh instead; D and the dk_pe sum over the heads are shared.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "flash_attention.cuh"
#include "flash_attention_fp32.cuh"
#include "kernel_utils.cuh"

namespace dsv3 {

namespace {

using cuda::request_smem;

void check_sizes(const char* op, int64_t B, int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv) {
  DSV3_CHECK(S <= INT_MAX && B <= 65535 && H <= 65535 && dn + dr + dv <= 65536,
             op << ": B = " << B << ", S = " << S << ", H = " << H << ", dn + dr + dv = " << dn + dr + dv
                << " exceed the kernels' grid/index ranges");
}

}  // namespace

void CudaBackend::mla_flash_attention_forward(const float* q, const float* kv, const float* kpe, int64_t ldkpe,
                                              int64_t B, int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv,
                                              float scale, float* o, float* lse) {
  if (B == 0 || S == 0 || H == 0) return;
  check_sizes("mla_flash_attention_forward", B, S, H, dn, dr, dv);
  if (bf16_attention_) {  // the tensor-core kernels (flash_attention_bf16.cu)
    cuda::flash_bf16_forward({q, kv, kpe, ldkpe, (int)B, (int)S, (int)H, (int)dn, (int)dr, (int)dv, scale}, o, lse,
                             stream_, device_);
    return;
  }
  const size_t smem = fwd_smem_bytes((int)(dn + dr), (int)dv);
  request_smem(flash_fwd_kernel, smem, device_, "mla_flash_attention_forward", (int)dn, (int)dr, (int)dv);
  const dim3 grid((unsigned)((S + kBM - 1) / kBM), (unsigned)H, (unsigned)B);
  flash_fwd_kernel<<<grid, kThreads, smem, stream_>>>(q, kv, kpe, ldkpe, (int)S, (int)H, (int)dn, (int)dr, (int)dv,
                                                      scale, o, lse);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::mla_flash_attention_backward(const float* q, const float* kv, const float* kpe, int64_t ldkpe,
                                               const float* o, const float* lse, const float* dout, int64_t B,
                                               int64_t S, int64_t H, int64_t dn, int64_t dr, int64_t dv, float scale,
                                               float* dq, float* dkv, float* dkpe) {
  if (B == 0 || S == 0 || H == 0) return;
  check_sizes("mla_flash_attention_backward", B, S, H, dn, dr, dv);
  const int64_t T = B * S;
  // scratch: the per-head dk_pe (B,H,S,dr), then D (B,H,S)
  float* dkpe_h = static_cast<float*>(scratch(sizeof(float) * (size_t)(B * H * S) * (size_t)(dr + 1)));
  float* D = dkpe_h + B * H * S * dr;
  const int iS = (int)S, iH = (int)H, idn = (int)dn, idr = (int)dr, idv = (int)dv;

  flash_bwd_rowdot_kernel<<<cuda::grid_for(T * H * 32), cuda::kBlock, 0, stream_>>>(o, dout, T, iS, iH, idv, D);
  DSV3_CUDA_LAUNCH_CHECK();

  if (bf16_attention_) {  // the tensor-core kernels (flash_attention_bf16.cu)
    cuda::flash_bf16_backward({q, kv, kpe, ldkpe, (int)B, iS, iH, idn, idr, idv, scale}, lse, D, dout, dq, dkv, dkpe_h,
                              stream_, device_);
  } else {
    const size_t smem_kv = dkv_smem_bytes(idn + idr, idv);
    request_smem(flash_bwd_dkv_kernel, smem_kv, device_, "mla_flash_attention_backward", idn, idr, idv);
    const dim3 grid_kv((unsigned)((S + kBN - 1) / kBN), (unsigned)H, (unsigned)B);
    flash_bwd_dkv_kernel<<<grid_kv, kThreads, smem_kv, stream_>>>(q, kv, kpe, ldkpe, lse, D, dout, iS, iH, idn, idr,
                                                                  idv, scale, dkv, dkpe_h);
    DSV3_CUDA_LAUNCH_CHECK();

    const size_t smem_q = dq_smem_bytes(idn + idr, idv);
    request_smem(flash_bwd_dq_kernel, smem_q, device_, "mla_flash_attention_backward", idn, idr, idv);
    const dim3 grid_q((unsigned)((S + kBM - 1) / kBM), (unsigned)H, (unsigned)B);
    flash_bwd_dq_kernel<<<grid_q, kThreads, smem_q, stream_>>>(q, kv, kpe, ldkpe, lse, D, dout, iS, iH, idn, idr, idv,
                                                               scale, dq);
    DSV3_CUDA_LAUNCH_CHECK();
  }

  if (dr > 0) {
    flash_bwd_dkpe_kernel<<<cuda::grid_for(T * dr), cuda::kBlock, 0, stream_>>>(dkpe_h, T, iS, iH, idr, dkpe, ldkpe);
    DSV3_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace dsv3
