// defines: yarn_inv_freq, attention_softmax_scale, RopeTable (cos/sin per position)
// YaRN exactly as DeepSeek's inference code and HF transformers compute it (see tests/golden/tiny/README.md):
// frequencies below the correction range are divided by the factor, those above are kept, with a linear ramp
// between; the attention temperature is folded into the softmax scale.
#pragma once
#include <cstdint>
#include <vector>

#include "model/config.h"

namespace dsv3 {

std::vector<double> yarn_inv_freq(const ModelConfig& c);   // (qk_rope_head_dim/2), e.g. tiny: 1, .025, .0025, .00025
double attention_softmax_scale(const ModelConfig& c);      // qk_head_dim^-0.5 * mscale^2, e.g. tiny 0.264642258

struct RopeTable {
  int64_t max_pos = 0, half = 0;
  std::vector<float> cos, sin;  // (max_pos, half): angles in float64, cast to float32, times the YaRN cos/sin mscale
};
RopeTable make_rope_table(const ModelConfig& c, int64_t max_pos);

}  // namespace dsv3
