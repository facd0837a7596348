// defines: what the two flash-attention files share — the dynamic shared-memory opt-in and the launchers of the BF16
// tensor-core kernels (flash_attention_bf16.cu) that flash_attention.cu's ops call in BF16 attention mode
// (Backend::set_bf16_attention). .cu files only.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda_check.cuh"
#include "flash_shape.h"

namespace dsv3::cuda {

// Dynamic shared memory above the 48 KiB default must be requested per kernel; more than the device offers is an
// error naming the head dims.
template <class Kernel>
void request_smem(Kernel* kernel, size_t bytes, int device, const char* op, int dn, int dr, int dv) {
  if (bytes <= 48 * 1024) return;
  int optin = 0;
  DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  DSV3_CHECK(bytes <= (size_t)optin, op << ": head dims dn " << dn << ", dr " << dr << ", dv " << dv << " need "
                                        << bytes << " bytes of shared memory per block; the device allows " << optin);
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}


// o (B*S, H*dv) and lse (B,H,S) in BF16 attention mode
void flash_bf16_forward(const FlashShape& x, float* o, float* lse, cudaStream_t stream, int device);
// dq and dkv written, this head's dk_pe into dkpe_h (B,H,S,dr) (summed over the heads by the caller), from lse, D (B,H,S)
// = rowsum(dout * o) and dout
void flash_bf16_backward(const FlashShape& x, const float* lse, const float* D, const float* dout, float* dq,
                         float* dkv, float* dkpe_h, cudaStream_t stream, int device);

}  // namespace dsv3::cuda
