// defines: SamplerOptions, sample_token — greedy, temperature and nucleus (top-p) sampling of next-token logits
#pragma once
#include <cstdint>
#include <random>

namespace dsv3 {

struct SamplerOptions {
  double temperature = 0.0;  // 0: greedy (argmax, ties to the lower id)
  double top_p = 1.0;        // keep the smallest set of most likely tokens whose probability reaches top_p
};

int64_t sample_token(const float* logits, int64_t V, const SamplerOptions& o, std::mt19937_64& rng);

}  // namespace dsv3
