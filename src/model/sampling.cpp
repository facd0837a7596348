#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace dsv3 {

int64_t sample_token(const float* logits, int64_t V, const SamplerOptions& o, std::mt19937_64& rng) {
  DSV3_CHECK(o.temperature >= 0, "temperature must be >= 0, got " << o.temperature);
  DSV3_CHECK(o.top_p > 0 && o.top_p <= 1, "top-p must be in (0, 1], got " << o.top_p);
  if (o.temperature == 0) return std::max_element(logits, logits + V) - logits;
  const float mx = *std::max_element(logits, logits + V);
  std::vector<double> p(V);
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += (p[v] = std::exp((logits[v] - mx) / o.temperature));
  std::vector<int64_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
  // nucleus: the most likely tokens until their mass reaches top_p (at least one)
  int64_t keep = 0;
  double mass = 0;
  while (keep < V && (keep == 0 || mass < o.top_p * sum)) mass += p[order[keep++]];
  std::uniform_real_distribution<double> u(0.0, mass);
  double r = u(rng);
  for (int64_t i = 0; i < keep; ++i) {
    r -= p[order[i]];
    if (r <= 0) return order[i];
  }
  return order[keep - 1];
}

}  // namespace dsv3
