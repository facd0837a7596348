#include "train/trainer.h"

#include <algorithm>
#include <cmath>
#include <optional>

#include "core/deck.h"
#include "core/error.h"
#include "parallel/comm.h"
#include "parallel/context.h"
#include "pipeline/executor.h"

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
  c.inject_nan_at = d.get<int64_t>("debug.inject_nan_at");
  return c;
}

Trainer::Trainer(Model& m, const TrainerConfig& c, const Comm* comm, Backend* be)
    : model_(m), cfg_(c), comm_(comm), grads_(m.params().table(), m.params().plan()),
      opt_(m.params(), c.adamw, comm, be) {
  // BF16 model weights: the working copy starts as the rounded master
  if (cfg_.adamw.bf16_params) {
    for (const ParamSpec& p : m.params().table())
      if (p.trainable && m.params().held(p)) round_to_bf16(opt_.backend(), m.params().get(p.name), m.params().local_numel(p));
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
  // the step's ops may run ahead of the host (the device has finished all of them when step() returns); not when
  // MPI moves device memory itself (several ranks without a device transport): it reads the buffers from the host
  std::optional<DeferredSync> deferred;
  if (!comm_ || comm_->size() == 1 || comm_->device_transport()) deferred.emplace(opt_.backend());
  StepStats st;
  st.lr = lr;
  st.mtp_lambda = mtp_lambda;
  st.gamma = gamma;
  grads_.zero();
  // micro-batch i: sequences [i*mb, i*mb + n) of this rank's share; its losses are means over its sequences'
  // tokens, so its share of the global batch's loss (and the scale of its gradients) is n / B_global
  std::vector<MicroBatch> mbs(M);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t n = std::clamp<int64_t>(B - i * mb, 0, mb);
    mbs[i] = {tokens + i * mb * S, labels ? labels + i * mb * S : nullptr, n, (double)n / B_global};
  }
  PipelineResult pr = run_pipeline(model_, comm_, mbs, S, mtp_lambda, cfg_.aux_alpha, &grads_);
  combine_over_ranks(pr);
  st.loss = pr.loss;
  st.expert_load = std::move(pr.expert_load);
  st.nodes_per_token = pr.routed_tokens > 0 ? (double)pr.node_spans / (double)pr.routed_tokens : 0.0;
  if (comm_) sync_tied_grads(grads_, *comm_);  // the MTP's use of the embedding on the last pipeline stage
  if (cfg_.bf16_grads) round_to_bf16(opt_.backend(), grads_.data(), grads_.size());
  if (++steps_ == cfg_.inject_nan_at && grads_.size() > 0) {  // fault injection
    const float nan = std::nanf("");
    default_memory().copy(grads_.data(), &nan, sizeof nan);
  }
  st.grad_norm = opt_.reduce_grads(grads_);  // summed over the replicas into this rank's shard (ZeRO-1)
  // A NaN/Inf anywhere shows in the global norm (every rank has the same one) or in the loss: no update at all, so
  // the weights, the optimizer state and the expert biases stay the last good ones.
  if (!std::isfinite(st.grad_norm) || !std::isfinite(st.loss.total)) {
    st.skipped = true;
    return st;
  }
  st.clip_coef = clip_coefficient(st.grad_norm, cfg_.clip_grad);
  opt_.step(model_.params(), lr, st.clip_coef);
  if (comm_) sync_tied_weights(model_.params(), *comm_);
  // aux-loss-free balancing: b_i += gamma * sign(mean load - load_i), over the whole step's tokens
  for (const auto& [layer, load] : st.expert_load) {
    const std::string name = "model.layers." + std::to_string(layer) + ".mlp.gate.e_score_correction_bias";
    if (!model_.params().held(model_.params().spec(name))) continue;  // another pipeline stage's layer
    double mean = 0;
    for (int64_t c : load) mean += (double)c;
    mean /= (double)load.size();
    std::vector<float> delta(load.size());  // on the host, added by the backend where the bias lives
    for (size_t e = 0; e < load.size(); ++e) {
      const double d = mean - (double)load[e];
      delta[e] = (float)gamma * (float)((d > 0) - (d < 0));
    }
    opt_.backend().add(delta.data(), (int64_t)delta.size(), model_.params().get(name));
  }
  return st;
}

Losses Trainer::evaluate(const int64_t* tokens, int64_t B, int64_t S, double mtp_lambda, const int64_t* labels,
                         int64_t B_global) {
  const int64_t mb = cfg_.micro_batch;
  const int dp = comm_ ? comm_->group_size(GroupKind::dp) : 1;
  if (B_global < 0) B_global = B * dp;
  const int64_t M = ((B_global + dp - 1) / dp + mb - 1) / mb;
  std::vector<MicroBatch> mbs(M);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t n = std::clamp<int64_t>(B - i * mb, 0, mb);
    mbs[i] = {tokens + i * mb * S, labels ? labels + i * mb * S : nullptr, n, (double)n / B_global};
  }
  PipelineResult pr = run_pipeline(model_, comm_, mbs, S, mtp_lambda, cfg_.aux_alpha, nullptr);
  combine_over_ranks(pr);
  return pr.loss;
}

void Trainer::combine_over_ranks(PipelineResult& pr) const {
  if (!comm_) return;
  // losses: each pipeline stage holds its part (lm/mtp on the last, the balance losses of its own layers), each
  // data-parallel rank its share of the batch: sums over both; the node-group counts of the layers and tokens too
  Losses& loss = pr.loss;
  double l[6] = {loss.lm, loss.mtp, loss.aux, loss.total, (double)pr.node_spans, (double)pr.routed_tokens};
  comm_->allreduce_sum(GroupKind::pp, l, 6);
  comm_->allreduce_sum(GroupKind::dp, l, 6);
  loss = {l[0], l[1], l[2], l[3]};
  pr.node_spans = (int64_t)l[4];
  pr.routed_tokens = (int64_t)l[5];
  auto& loads = pr.expert_load;
  // expert loads of every MoE layer (from the stage that holds it), summed over the data-parallel ranks
  const ModelConfig& c = model_.config();
  const int64_t E = c.n_routed_experts;
  std::vector<int64_t> all;
  std::vector<int64_t> moe_layers;
  for (int64_t l2 = 0; l2 < c.total_layers(); ++l2)
    if (c.is_moe_layer(l2)) moe_layers.push_back(l2);
  all.assign(moe_layers.size() * E, 0);
  for (size_t k = 0; k < moe_layers.size(); ++k)
    if (auto it = loads.find(moe_layers[k]); it != loads.end()) std::copy(it->second.begin(), it->second.end(), all.begin() + k * E);
  comm_->allreduce_sum(GroupKind::pp, all.data(), (int64_t)all.size());
  comm_->allreduce_sum(GroupKind::dp, all.data(), (int64_t)all.size());
  loads.clear();
  for (size_t k = 0; k < moe_layers.size(); ++k) loads[moe_layers[k]].assign(all.begin() + k * E, all.begin() + (k + 1) * E);
}

}  // namespace dsv3
