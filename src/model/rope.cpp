#include "model/rope.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace dsv3 {

namespace {
double yarn_mscale(double factor, double mscale) { return factor <= 1 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0; }
}  // namespace

std::vector<double> yarn_inv_freq(const ModelConfig& c) {
  const int64_t d = c.qk_rope_head_dim, half = d / 2;
  std::vector<double> f(half);
  for (int64_t i = 0; i < half; ++i) f[i] = std::pow(c.rope_theta, -(2.0 * i) / d);
  const RopeScaling& y = c.rope_scaling;
  if (y.type != "yarn") return f;
  // correction dim: the rotation index whose wavelength fits `r` times into the original context
  auto cd = [&](double r) {
    return d * std::log(y.original_max_position_embeddings / (r * 2 * M_PI)) / (2 * std::log(c.rope_theta));
  };
  const double low = std::max(std::floor(cd(y.beta_fast)), 0.0);
  double high = std::min(std::ceil(cd(y.beta_slow)), (double)(d - 1));
  if (low == high) high += 0.001;  // avoid a zero-width ramp (as the reference does)
  for (int64_t i = 0; i < half; ++i) {
    const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    f[i] = f[i] / y.factor * ramp + f[i] * (1 - ramp);
  }
  return f;
}

double attention_softmax_scale(const ModelConfig& c) {
  double s = 1.0 / std::sqrt((double)c.qk_head_dim());
  if (c.rope_scaling.type == "yarn") {
    const double m = yarn_mscale(c.rope_scaling.factor, c.rope_scaling.mscale_all_dim);
    s *= m * m;
  }
  return s;
}

RopeTable make_rope_table(const ModelConfig& c, int64_t max_pos) {
  RopeTable t;
  t.max_pos = max_pos;
  t.half = c.qk_rope_head_dim / 2;
  // (validate() bounds max_position_embeddings the same way; this also covers a caller's own max_pos)
  int64_t bytes = 0;
  DSV3_CHECK(max_pos >= 0 && t.half >= 0 && !__builtin_mul_overflow(max_pos, t.half * 8, &bytes) &&
                 bytes <= kMaxRopeTableBytes,
             "RoPE table of " << max_pos << " positions x qk_rope_head_dim " << c.qk_rope_head_dim
                              << " floats: more than dsv3's bound of " << (kMaxRopeTableBytes >> 30) << " GiB");
  const auto f = yarn_inv_freq(c);
  double m = 1.0;  // YaRN "attention factor" on cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim)
  if (c.rope_scaling.type == "yarn")
    m = yarn_mscale(c.rope_scaling.factor, c.rope_scaling.mscale) /
        yarn_mscale(c.rope_scaling.factor, c.rope_scaling.mscale_all_dim);
  std::vector<float> cos(max_pos * t.half), sin(max_pos * t.half);  // built on the host, then one copy each
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < t.half; ++i) {
      const double a = p * f[i];
      cos[p * t.half + i] = (float)(std::cos(a) * m);
      sin[p * t.half + i] = (float)(std::sin(a) * m);
    }
  t.cos = Floats(cos);
  t.sin = Floats(sin);
  return t;
}

const int64_t* RopeTable::positions(int64_t B, int64_t S) const {
  auto it = positions_.find({B, S});
  if (it == positions_.end()) {
    std::vector<int64_t> pos(B * S);
    for (int64_t t = 0; t < B * S; ++t) pos[t] = t % S;
    it = positions_.emplace(std::make_pair(B, S), Buffer<int64_t>(pos)).first;
  }
  return it->second.data();
}

}  // namespace dsv3
