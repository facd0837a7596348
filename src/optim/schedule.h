// defines: Schedule — learning rate, global batch size, MTP weight and expert-bias update rate as pure functions
// of the iteration and the tokens consumed so far (everything from the deck; see input/deepseek-paper.deck).
//   lr: linear warmup over optim.warmup_iters to optim.lr, then
//       constant | cosine (to optim.min_lr at optim.decay_iters, default train.iters) |
//       multiphase (the paper: constant until optim.decay_start_tokens, cosine to optim.min_lr over
//       optim.decay_tokens, then the optim.lr_tail phases "TOKENS:LR ..." in order, the last one held)
//   batch: train.batch_ramp = "START INCREMENT TOKENS" ramps the global batch linearly in steps of INCREMENT from
//       START to train.global_batch over the first TOKENS tokens (Megatron's rampup_batch_size, in tokens)
//   mtp_lambda: train.mtp_lambda until train.mtp_lambda_switch_tokens, train.mtp_lambda_final after
//   gamma: moe.bias_update_rate until moe.bias_update_stop_tokens, 0 after
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

class Deck;

struct Schedule {
  std::string lr_kind = "constant";
  double lr = 3e-4, min_lr = 3e-5;
  int64_t warmup_iters = 0, decay_iters = 0;
  double decay_start_tokens = 0, decay_tokens = 0;
  std::vector<std::pair<double, double>> lr_tail;  // (tokens, lr) phases after the cosine
  int64_t global_batch = 1, ramp_start = 0, ramp_increment = 0;
  double ramp_tokens = 0;
  double mtp_lambda = 0.3, mtp_lambda_final = 0.3, mtp_switch_tokens = 0;
  double gamma = 1e-3, gamma_stop_tokens = 0;

  static Schedule from_deck(const Deck& d);  // errors name the key
  double lr_at(int64_t iter, double tokens) const;     // iter counts from 0
  int64_t batch_at(double tokens) const;               // sequences per optimizer step
  double mtp_lambda_at(double tokens) const;
  double gamma_at(double tokens) const;
};

}  // namespace dsv3
