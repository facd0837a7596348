#include "optim/schedule.h"

#include <cmath>
#include <sstream>

#include "core/deck.h"
#include "core/error.h"

namespace dsv3 {

Schedule Schedule::from_deck(const Deck& d) {
  Schedule s;
  s.lr_kind = d.get<std::string>("optim.lr_schedule");
  s.lr = d.get<double>("optim.lr");
  s.min_lr = d.get<double>("optim.min_lr");
  s.warmup_iters = d.get<int64_t>("optim.warmup_iters");
  s.decay_iters = d.get<int64_t>("optim.decay_iters");
  if (s.decay_iters == 0) s.decay_iters = d.get<int64_t>("train.iters");
  DSV3_CHECK(s.lr_kind != "cosine" || s.decay_iters > s.warmup_iters,
             "optim.decay_iters (" << s.decay_iters << ") must exceed optim.warmup_iters (" << s.warmup_iters << ")");
  s.decay_start_tokens = d.get<double>("optim.decay_start_tokens");
  s.decay_tokens = d.get<double>("optim.decay_tokens");
  {
    std::istringstream in(d.get<std::string>("optim.lr_tail"));
    for (std::string item; in >> item;) {
      const auto colon = item.find(':');
      double tok = 0, lr = 0;
      try {
        DSV3_CHECK(colon != std::string::npos, "");
        tok = std::stod(item.substr(0, colon));
        lr = std::stod(item.substr(colon + 1));
      } catch (...) {
        DSV3_FAIL("optim.lr_tail (" << d.origin("optim.lr_tail") << "): '" << item << "' is not TOKENS:LR");
      }
      DSV3_CHECK(tok > 0 && lr >= 0, "optim.lr_tail: '" << item << "' needs TOKENS > 0 and LR >= 0");
      s.lr_tail.emplace_back(tok, lr);
    }
  }
  DSV3_CHECK(s.lr_kind != "multiphase" || s.decay_tokens > 0,
             "optim.lr_schedule = multiphase needs optim.decay_tokens > 0");
  s.global_batch = d.get<int64_t>("train.global_batch");
  {
    const std::string ramp = d.get<std::string>("train.batch_ramp");
    if (!ramp.empty()) {
      std::istringstream in(ramp);
      double start = 0, inc = 0, tok = 0;
      DSV3_CHECK((in >> start >> inc >> tok) && start >= 1 && inc >= 1 && tok > 0 && start <= s.global_batch,
                 "train.batch_ramp (" << d.origin("train.batch_ramp") << ") = '" << ramp
                                      << "': expected 'START INCREMENT TOKENS' with 1 <= START <= train.global_batch");
      s.ramp_start = (int64_t)start;
      s.ramp_increment = (int64_t)inc;
      s.ramp_tokens = tok;
    }
  }
  s.mtp_lambda = d.get<double>("train.mtp_lambda");
  s.mtp_lambda_final = d.given("train.mtp_lambda_final") ? d.get<double>("train.mtp_lambda_final") : s.mtp_lambda;
  s.mtp_switch_tokens = d.get<double>("train.mtp_lambda_switch_tokens");
  s.gamma = d.get<double>("moe.bias_update_rate");
  s.gamma_stop_tokens = d.get<double>("moe.bias_update_stop_tokens");
  return s;
}

double Schedule::lr_at(int64_t iter, double tokens) const {
  if (iter < warmup_iters) return lr * (iter + 1) / warmup_iters;
  if (lr_kind == "constant") return lr;
  auto cosine = [&](double frac) {
    frac = std::min(std::max(frac, 0.0), 1.0);
    return min_lr + 0.5 * (lr - min_lr) * (1 + std::cos(M_PI * frac));
  };
  if (lr_kind == "cosine") return cosine((double)(iter - warmup_iters) / (decay_iters - warmup_iters));
  // multiphase: constant, cosine over decay_tokens, then the tail phases
  if (tokens < decay_start_tokens) return lr;
  double t = tokens - decay_start_tokens;
  if (t < decay_tokens) return cosine(t / decay_tokens);
  t -= decay_tokens;
  double lr_now = min_lr;
  for (const auto& [len, phase_lr] : lr_tail) {
    lr_now = phase_lr;
    if (t < len) return phase_lr;
    t -= len;
  }
  return lr_now;
}

int64_t Schedule::batch_at(double tokens) const {
  if (ramp_tokens <= 0 || tokens >= ramp_tokens) return global_batch;
  // Megatron: the batch grows by `increment` in equal token intervals between start and the final size
  const int64_t steps = (global_batch - ramp_start) / ramp_increment;
  if (steps <= 0) return global_batch;
  const double per_step = ramp_tokens / steps;
  const int64_t k = (int64_t)(tokens / per_step);
  return std::min(global_batch, ramp_start + k * ramp_increment);
}

double Schedule::mtp_lambda_at(double tokens) const {
  return (mtp_switch_tokens > 0 && tokens >= mtp_switch_tokens) ? mtp_lambda_final : mtp_lambda;
}

double Schedule::gamma_at(double tokens) const {
  return (gamma_stop_tokens > 0 && tokens >= gamma_stop_tokens) ? 0.0 : gamma;
}

}  // namespace dsv3
