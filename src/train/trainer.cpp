#include "train/trainer.h"

#include <algorithm>

#include "core/deck.h"
#include "core/error.h"
#include "parallel/comm.h"

namespace dsv3 {

TrainerConfig TrainerConfig::from_deck(const Deck& d) {
  TrainerConfig c;
  c.adamw.beta1 = d.get<double>("optim.beta1");
  c.adamw.beta2 = d.get<double>("optim.beta2");
  c.adamw.eps = d.get<double>("optim.eps");
  c.adamw.weight_decay = d.get<double>("optim.weight_decay");
  c.adamw.bf16_params = d.get<std::string>("optim.param_dtype") == "bf16";
  c.adamw.bf16_moments = d.get<std::string>("optim.moment_dtype") == "bf16";
  c.bf16_grads = d.get<std::string>("optim.grad_dtype") == "bf16";
  c.clip_grad = d.get<double>("optim.clip_grad");
  c.aux_alpha = d.get<double>("train.aux_alpha");
  c.micro_batch = d.get<int64_t>("train.micro_batch");
  return c;
}

Trainer::Trainer(Model& m, const TrainerConfig& c, const Comm* comm)
    : model_(m), cfg_(c), comm_(comm), grads_(m.params().table(), m.params().plan()), opt_(m.params(), c.adamw, comm) {
  // BF16 model weights: the working copy starts as the rounded master
  if (cfg_.adamw.bf16_params) {
    for (const ParamSpec& p : m.params().table())
      if (p.trainable) round_to_bf16(m.params().get(p.name), m.params().local_numel(p));
  }
}

StepStats Trainer::step(const int64_t* tokens, int64_t B, int64_t S, double lr, double mtp_lambda, double gamma,
                        const int64_t* labels, int64_t B_global) {
  const int64_t mb = cfg_.micro_batch;
  const int dp = comm_ ? comm_->group_size(GroupKind::dp) : 1;
  if (B_global < 0) B_global = B * dp;
  DSV3_CHECK(B_global > 0, "a step needs at least one sequence");
  // every rank runs the same number of micro-batches (expert parallelism exchanges tokens in each of them); a rank
  // whose share of the batch is smaller runs some with fewer (or no) sequences
  const int64_t M = ((B_global + dp - 1) / dp + mb - 1) / mb;
  StepStats st;
  st.lr = lr;
  st.mtp_lambda = mtp_lambda;
  st.gamma = gamma;
  std::fill(grads_.data(), grads_.data() + grads_.size(), 0.0f);
  for (int64_t i = 0; i < M; ++i) {
    ForwardTrace tr;
    const int64_t n = std::clamp<int64_t>(B - i * mb, 0, mb);
    // a micro-batch's losses are means over its sequences' tokens: its share of the global batch's is n / B_global
    const double w = (double)n / B_global;
    const Losses l = model_.forward_backward(tokens + i * mb * S, n, S, mtp_lambda, cfg_.aux_alpha, w, grads_, &tr,
                                             labels ? labels + i * mb * S : nullptr);
    st.loss.lm += l.lm * w;
    st.loss.mtp += l.mtp * w;
    st.loss.aux += l.aux * w;
    st.loss.total += l.total * w;
    for (auto& [layer, mt] : tr.moe) {
      auto& load = st.expert_load[layer];
      load.resize(mt.counts.size(), 0);
      for (size_t e = 0; e < mt.counts.size(); ++e) load[e] += mt.counts[e];
    }
  }
  if (comm_ && dp > 1) {  // the global batch's losses and expert loads
    double l[4] = {st.loss.lm, st.loss.mtp, st.loss.aux, st.loss.total};
    comm_->allreduce_sum(GroupKind::dp, l, 4);
    st.loss = {l[0], l[1], l[2], l[3]};
    for (auto& [layer, load] : st.expert_load) comm_->allreduce_sum(GroupKind::dp, load.data(), (int64_t)load.size());
  }
  if (cfg_.bf16_grads) round_to_bf16(grads_.data(), grads_.size());
  st.grad_norm = opt_.reduce_grads(grads_);  // summed over the replicas into this rank's shard (ZeRO-1)
  st.clip_coef = clip_coefficient(st.grad_norm, cfg_.clip_grad);
  opt_.step(model_.params(), lr, st.clip_coef);
  // aux-loss-free balancing: b_i += gamma * sign(mean load - load_i), over the whole step's tokens
  for (const auto& [layer, load] : st.expert_load) {
    float* bias = model_.params().get("model.layers." + std::to_string(layer) + ".mlp.gate.e_score_correction_bias");
    double mean = 0;
    for (int64_t c : load) mean += (double)c;
    mean /= (double)load.size();
    for (size_t e = 0; e < load.size(); ++e) {
      const double d = mean - (double)load[e];
      bias[e] += (float)gamma * (float)((d > 0) - (d < 0));
    }
  }
  return st;
}

Losses Trainer::evaluate(const int64_t* tokens, int64_t B, int64_t S, double mtp_lambda, const int64_t* labels,
                         int64_t B_global) {
  const int64_t mb = cfg_.micro_batch;
  const int dp = comm_ ? comm_->group_size(GroupKind::dp) : 1;
  if (B_global < 0) B_global = B * dp;
  const int64_t M = ((B_global + dp - 1) / dp + mb - 1) / mb;
  double l[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < M; ++i) {
    const int64_t n = std::clamp<int64_t>(B - i * mb, 0, mb);
    const double w = (double)n / B_global;
    const Losses x = model_.forward(tokens + i * mb * S, n, S, mtp_lambda, cfg_.aux_alpha, nullptr,
                                    labels ? labels + i * mb * S : nullptr);
    l[0] += x.lm * w, l[1] += x.mtp * w, l[2] += x.aux * w, l[3] += x.total * w;
  }
  if (comm_ && dp > 1) comm_->allreduce_sum(GroupKind::dp, l, 4);
  return {l[0], l[1], l[2], l[3]};
}

}  // namespace dsv3
