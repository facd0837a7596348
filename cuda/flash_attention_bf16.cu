// defines: cuda::flash_bf16_forward / flash_bf16_backward — the launchers of the BF16 tensor-core flash-attention
// kernels (flash_attention_bf16.cuh: the algorithm, tiles and fragment layouts)
#include <cuda_runtime.h>

#include "cuda_check.cuh"
#include "flash_attention.cuh"
#include "flash_attention_bf16.cuh"

namespace dsv3::cuda {

namespace {

dim3 grid_of(const FlashShape& x) {
  return dim3((unsigned)((x.S + kRows - 1) / kRows), (unsigned)x.H, (unsigned)x.B);
}

// mma.sync with BF16 operands needs sm_80 (Ampere) or later
void check_arch(int device) {
  int major = 0;
  DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  DSV3_CHECK(major >= 8, "run.attention_dtype = bf16: the BF16 tensor-core attention kernels need compute capability "
                         "8.0 or later; device "
                             << device << " has " << major << ".x (use run.attention_dtype = fp32)");
}

}  // namespace

void flash_bf16_forward(const FlashShape& x, float* o, float* lse, cudaStream_t stream, int device) {
  check_arch(device);
  const size_t smem = fwd_smem(x.dn + x.dr, x.dv);
  request_smem(flash_bf16_fwd_kernel, smem, device, "mla_flash_attention_forward (bf16)", x.dn, x.dr, x.dv);
  flash_bf16_fwd_kernel<<<grid_of(x), kThreads, smem, stream>>>(x, o, lse);
  DSV3_CUDA_LAUNCH_CHECK();
}

void flash_bf16_backward(const FlashShape& x, const float* lse, const float* D, const float* dout, float* dq,
                         float* dkv, float* dkpe_h, cudaStream_t stream, int device) {
  check_arch(device);
  const int dqk = x.dn + x.dr;
  const size_t smem_kv = dkv_smem(dqk, x.dv);
  request_smem(flash_bf16_dkv_kernel, smem_kv, device, "mla_flash_attention_backward (bf16)", x.dn, x.dr, x.dv);
  flash_bf16_dkv_kernel<<<grid_of(x), kThreads, smem_kv, stream>>>(x, lse, D, dout, dkv, dkpe_h);
  DSV3_CUDA_LAUNCH_CHECK();
  const size_t smem_q = dq_smem(dqk, x.dv);
  request_smem(flash_bf16_dq_kernel, smem_q, device, "mla_flash_attention_backward (bf16)", x.dn, x.dr, x.dv);
  flash_bf16_dq_kernel<<<grid_of(x), kThreads, smem_q, stream>>>(x, lse, D, dout, dq);
  DSV3_CUDA_LAUNCH_CHECK();
}

}  // namespace dsv3::cuda
