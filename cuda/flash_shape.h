// defines: cuda::FlashShape — the operands and sizes of one MLA flash-attention call, shared by the launchers
// (flash_attention.cuh) and the kernels (flash_attention_bf16.cuh); plain C++ so that the kernels' host emulation
// (tests/unit/test_flash_bf16_simt.cpp) can include it.
#pragma once
#include <cstdint>

namespace dsv3::cuda {

// One head-batched MLA attention call: the operands and sizes of Backend::mla_flash_attention_forward.
struct FlashShape {
  const float* q;
  const float* kv;
  const float* kpe;
  int64_t ldkpe;
  int B, S, H, dn, dr, dv;
  float scale;
};

}  // namespace dsv3::cuda
