#include "optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <vector>
#include <cstring>

#include "core/error.h"
#include "io/safetensors.h"  // float_to_bf16 / bf16_to_float

namespace dsv3 {

double global_grad_norm(const Params& grads) {
  double ss = 0;
  for (const ParamSpec& p : grads.table()) {
    if (!p.trainable) continue;
    const float* g = grads.get(p.name);
    const int64_t n = p.numel();
    // fixed-size chunks summed in order: the same bits on every run and any thread count
    constexpr int64_t kChunk = 4096;
    const int64_t nc = (n + kChunk - 1) / kChunk;
    std::vector<double> part(nc, 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) part[c] += (double)g[i] * g[i];
    for (double v : part) ss += v;
  }
  return std::sqrt(ss);
}

double clip_grads(Params& grads, double norm, double max_norm) {
  if (max_norm <= 0) return 1.0;
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1.0) return 1.0;
  const float c = (float)coef;
  float* g = grads.data();
  const int64_t n = grads.size();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) g[i] *= c;
  return coef;
}

void round_to_bf16(float* x, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] = bf16_to_float(float_to_bf16(x[i]));
}

AdamW::AdamW(const Params& params, const AdamWConfig& cfg) : cfg_(cfg) {
  const int64_t n = params.size();
  if (cfg_.bf16_moments) {
    m16_.assign(n, 0);
    v16_.assign(n, 0);
  } else {
    m_.assign(n, 0.0f);
    v_.assign(n, 0.0f);
  }
  if (cfg_.bf16_params) master_.assign(params.data(), params.data() + n);
}

void AdamW::step(Params& params, const Params& grads, double lr) {
  DSV3_CHECK(grads.size() == params.size(), "AdamW: gradients do not match the parameters");
  ++t_;
  const float b1 = (float)cfg_.beta1, b2 = (float)cfg_.beta2, eps = (float)cfg_.eps;
  const float bc1 = (float)(1.0 - std::pow(cfg_.beta1, (double)t_));
  const float bc2 = (float)(1.0 - std::pow(cfg_.beta2, (double)t_));
  const float flr = (float)lr, decay = (float)(1.0 - lr * cfg_.weight_decay);
  float* work = params.data();
  float* p_all = cfg_.bf16_params ? master_.data() : work;
  const float* g_all = grads.data();
  for (const ParamSpec& spec : params.table()) {
    if (!spec.trainable) continue;
    const int64_t off = params.offset(spec.name), n = spec.numel();
    const bool wd = spec.decay;
#pragma omp parallel for schedule(static)
    for (int64_t i = off; i < off + n; ++i) {
      const float g = g_all[i];
      float m = cfg_.bf16_moments ? bf16_to_float(m16_[i]) : m_[i];
      float v = cfg_.bf16_moments ? bf16_to_float(v16_[i]) : v_[i];
      m = b1 * m + (1 - b1) * g;
      v = b2 * v + (1 - b2) * g * g;
      float p = p_all[i];
      if (wd) p *= decay;
      p -= flr * (m / bc1) / (std::sqrt(v / bc2) + eps);
      p_all[i] = p;
      if (cfg_.bf16_moments) {
        m16_[i] = float_to_bf16(m);
        v16_[i] = float_to_bf16(v);
      } else {
        m_[i] = m;
        v_[i] = v;
      }
      if (cfg_.bf16_params) work[i] = bf16_to_float(float_to_bf16(p));
    }
  }
}

std::vector<float> AdamW::moment(int which) const {
  if (!cfg_.bf16_moments) return which == 0 ? m_ : v_;
  const auto& s = which == 0 ? m16_ : v16_;
  std::vector<float> out(s.size());
  for (size_t i = 0; i < s.size(); ++i) out[i] = bf16_to_float(s[i]);
  return out;
}

void AdamW::set_moment(int which, const std::vector<float>& x) {
  if (!cfg_.bf16_moments) {
    (which == 0 ? m_ : v_) = x;
    return;
  }
  auto& s = which == 0 ? m16_ : v16_;
  s.resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) s[i] = float_to_bf16(x[i]);
}

}  // namespace dsv3
