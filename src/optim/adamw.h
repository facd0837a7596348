// defines: AdamWConfig, AdamW (FP32 master weights; BF16 gradients / moments / model weights optional),
//          global_grad_norm, clip_grads, round_to_bf16
// AdamW with decoupled weight decay exactly as the golden train.json states it:
//   t += 1; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; if decay: p *= 1 - lr wd;
//   p -= lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
// on every trainable parameter (decay only on >= 2-D ones), every element (also rows whose gradient is zero).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/params.h"

namespace dsv3 {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  bool bf16_params = false;   // model weights held in BF16 (FP32 master kept by the optimizer)
  bool bf16_moments = false;  // Adam m and v stored in BF16 (the "precision-aware optimizer")
};

// Global L2 norm over the trainable parameters (each tied parameter once), accumulated in double.
double global_grad_norm(const Params& grads);
// coef = max_norm / (norm + 1e-6); if coef < 1 every gradient is scaled by it. Returns the coefficient applied
// (1 when not clipping; max_norm <= 0 disables clipping).
double clip_grads(Params& grads, double norm, double max_norm);
// Rounds every value to the nearest BF16 (RNE): how BF16 storage of gradients/weights is emulated bit-exactly.
void round_to_bf16(float* x, int64_t n);

class AdamW {
 public:
  AdamW(const Params& params, const AdamWConfig& cfg);
  // One step at learning rate lr on `params` (the model's working weights) with `grads`.
  void step(Params& params, const Params& grads, double lr);
  int64_t t() const { return t_; }
  // Optimizer state, by parameter table order (for checkpoints): master weights (empty unless bf16_params),
  // moments as float (converted when stored in BF16).
  const AdamWConfig& config() const { return cfg_; }
  std::vector<float>& master() { return master_; }
  std::vector<float> moment(int which) const;            // 0: m, 1: v
  void set_moment(int which, const std::vector<float>& x);
  void set_t(int64_t t) { t_ = t; }

 private:
  AdamWConfig cfg_;
  int64_t t_ = 0;
  std::vector<float> master_;                 // FP32 master weights when the model holds BF16
  std::vector<float> m_, v_;                  // FP32 moments
  std::vector<uint16_t> m16_, v16_;           // BF16 moments
};

}  // namespace dsv3
