// defines: yarn_inv_freq, attention_softmax_scale, RopeTable (cos/sin per position)
// YaRN exactly as DeepSeek's inference code and HF transformers compute it (see tests/golden/tiny/README.md):
// frequencies below the correction range are divided by the factor, those above are kept, with a linear ramp
// between; the attention temperature is folded into the softmax scale.
#pragma once
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "core/memory.h"
#include "model/config.h"

namespace dsv3 {

std::vector<double> yarn_inv_freq(const ModelConfig& c);   // (qk_rope_head_dim/2), e.g. tiny: 1, .025, .0025, .00025
double attention_softmax_scale(const ModelConfig& c);      // qk_head_dim^-0.5 * mscale^2, e.g. tiny 0.264642258

// The tables and the positions live in the run's memory (core/memory.h: the CUDA pool under run.device = cuda), so
// that the rope ops read them in place instead of staging them from the host at every call.
struct RopeTable {
  int64_t max_pos = 0, half = 0;
  Floats cos, sin;  // (max_pos, half): angles in float64, cast to float32, times the YaRN cos/sin mscale
  // (B*S): positions 0..S-1 of each of B sequences; made on a shape's first use (a copy into the run's memory), then
  // kept (a step has two shapes: S and the MTP layer's S - 1)
  const int64_t* positions(int64_t B, int64_t S) const;

 private:
  mutable std::map<std::pair<int64_t, int64_t>, Buffer<int64_t>> positions_;
};
RopeTable make_rope_table(const ModelConfig& c, int64_t max_pos);

}  // namespace dsv3
