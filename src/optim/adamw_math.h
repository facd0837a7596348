// defines: AdamWCoeffs, adamw_coeffs, adamw_element, check_adamw_shards — the arithmetic of one AdamW step on one element, shared by the
// CPU backend (ops/cpu/optimizer_ops.cpp) and the CUDA kernel (cuda/optimizer.cu) so that both give the same bits.
// The rule (optim/adamw.h): g *= grad_scale (when != 1); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// if decay: p *= 1 - lr wd; p -= lr (m / bc1) / (sqrt(v / bc2) + eps), with bc1 = 1 - b1^t, bc2 = 1 - b2^t.
// FP32 throughout, in exactly this order of operations, with the two moment updates as FMAs:
//   m = fma(b1, m, (1-b1) g),  v = fma(b2, v, ((1-b2) g) g)
// which is what GCC made of the optimizer's original loop (adamw.cpp, -O3 -march=x86-64-v3 contracts those two and
// nothing else). Every other operation is one IEEE FP32 multiply, add, divide or sqrt, correctly rounded. The files
// that evaluate it are compiled without FMA contraction (-ffp-contract=off, nvcc -fmad=false: CMakeLists.txt), so
// no compiler may fuse anything more: the CPU and CUDA updates are bit-identical by construction.
// Header-only (inline); includable from .cpp and .cu files.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/error.h"
#include "core/numerics.h"
#include "ops/backend.h"

namespace dsv3 {

// the FP32 coefficients of one step, derived from the hyperparameters in double as the optimizer always did
struct AdamWCoeffs {
  float b1, b2, eps;  // betas, epsilon
  float bc1, bc2;     // bias corrections 1 - beta^t
  float lr;           // learning rate
  float decay;        // 1 - lr * weight_decay (elements with the decay flag)
  float gs;           // grad_scale (the clip coefficient), applied when `scale`
  bool scale;
};

inline AdamWCoeffs adamw_coeffs(const Backend::AdamWHyper& h) {
  AdamWCoeffs c;
  c.b1 = (float)h.beta1;
  c.b2 = (float)h.beta2;
  c.eps = (float)h.eps;
  c.bc1 = (float)(1.0 - std::pow(h.beta1, (double)h.t));
  c.bc2 = (float)(1.0 - std::pow(h.beta2, (double)h.t));
  c.lr = (float)h.lr;
  c.decay = (float)(1.0 - h.lr * h.weight_decay);
  c.gs = (float)h.grad_scale;
  c.scale = h.grad_scale != 1.0;
  return c;
}

// adamw_update's argument check, the same on every backend: dsv3::Error naming the shard (host code)
inline void check_adamw_shards(const Backend::AdamWShard* shards, int count) {
  DSV3_CHECK(count >= 0 && (count == 0 || shards), "adamw_update: " << count << " shards");
  for (int s = 0; s < count; ++s) {
    const Backend::AdamWShard& sh = shards[s];
    DSV3_CHECK(sh.n >= 0, "adamw_update: shard " << s << " has " << sh.n << " elements");
    if (sh.n == 0) continue;  // nothing to touch
    const bool fp32 = sh.m && sh.v && !sh.m16 && !sh.v16, bf16 = sh.m16 && sh.v16 && !sh.m && !sh.v;
    DSV3_CHECK(sh.master && sh.grad && sh.decay && (fp32 || bf16),
               "adamw_update: shard " << s << " needs master, grad, decay and either FP32 (m, v) or BF16 (m16, v16) "
                                      << "moments");
  }
}

// One element: g the (unscaled) gradient; m, v the FP32 moments (widened from BF16 by the caller); p the FP32 master
// weight; all three updated in place.
DSV3_HD inline void adamw_element(const AdamWCoeffs& c, float g, bool decay, float& m, float& v, float& p) {
  if (c.scale) g = g * c.gs;  // the clipped gradient, as `g *= coef` would give it
  m = fmaf(c.b1, m, (1.0f - c.b1) * g);
  v = fmaf(c.b2, v, (1.0f - c.b2) * g * g);
  if (decay) p = p * c.decay;
  p = p - c.lr * (m / c.bc1) / (sqrtf(v / c.bc2) + c.eps);
}

// Element i of a shard: its moments loaded (FP32, or BF16 widened), adamw_element, stored back (BF16 rounded to
// nearest even), and the new weight into the model's copy when the shard has one. The one loop body of both
// backends' adamw_update.
DSV3_HD inline void adamw_shard_element(const AdamWCoeffs& c, const Backend::AdamWShard& sh, int64_t i) {
  const bool m16 = sh.m16 != nullptr;
  float m = m16 ? bf16_bits_to_f32(sh.m16[i]) : sh.m[i];
  float v = m16 ? bf16_bits_to_f32(sh.v16[i]) : sh.v[i];
  float p = sh.master[i];
  adamw_element(c, sh.grad[i], sh.decay[i] != 0, m, v, p);
  sh.master[i] = p;
  if (sh.weights) sh.weights[i] = sh.bf16_weights ? bf16_bits_to_f32(f32_to_bf16_bits(p)) : p;
  if (m16) {
    sh.m16[i] = f32_to_bf16_bits(m);
    sh.v16[i] = f32_to_bf16_bits(v);
  } else {
    sh.m[i] = m;
    sh.v[i] = v;
  }
}

}  // namespace dsv3
