// defines: TrainerConfig, StepStats, Trainer — one optimizer step of the whole model on one rank:
//   micro-batches -> forward/backward (gradients accumulate, each scaled by 1/micro-batches) -> (BF16 grads) ->
//   global grad norm -> clip -> AdamW -> expert-bias update from the step's expert loads
#pragma once
#include <cstdint>
#include <map>
#include <vector>

#include "model/model.h"
#include "optim/adamw.h"

namespace dsv3 {

struct PipelineResult;

class Deck;

struct TrainerConfig {
  AdamWConfig adamw;
  double clip_grad = 1.0;    // max global norm (<= 0: off)
  double aux_alpha = 1e-4;   // sequence-wise balance loss weight
  int64_t micro_batch = 1;   // sequences per forward/backward
  bool bf16_grads = false;   // gradients rounded to BF16 after accumulation
  int64_t inject_nan_at = 0; // fault injection: a NaN in the gradients of this step (1-based; 0 never)
  static TrainerConfig from_deck(const Deck& d);
};

struct StepStats {
  Losses loss;               // averaged over the micro-batches
  double grad_norm = 0, clip_coef = 1, lr = 0, mtp_lambda = 0, gamma = 0;
  std::map<int64_t, std::vector<int64_t>> expert_load;  // MoE layer -> tokens dispatched per expert this step
  double nodes_per_token = 0;  // node groups a token's experts lie on, mean over tokens and MoE layers (0: no groups)
  bool skipped = false;      // a NaN/Inf loss or gradient: no update was made (the weights are the last good ones)
};

class Trainer {
 public:
  // comm: the data-parallel groups (null: one rank). With dp ranks, each rank is given its own share of the global
  // batch; gradients, losses and expert loads are combined over the data-parallel group (ZeRO-1 optimizer).
  // be: the backend of the optimizer's arithmetic (the run's, the model's; null: a CPU backend).
  Trainer(Model& m, const TrainerConfig& c, const Comm* comm = nullptr, Backend* be = nullptr);
  // One step on this rank's B sequences of S tokens (tokens (B, S), labels (B, S) or null: see Model::forward);
  // B must divide into micro-batches. The returned losses and loads are those of the global batch.
  // B_global: the sequences of the whole step over all data-parallel ranks (default B x dp); a rank's B may be
  // any share of it (dp_slice), even none.
  StepStats step(const int64_t* tokens, int64_t B, int64_t S, double lr, double mtp_lambda, double gamma,
                 const int64_t* labels = nullptr, int64_t B_global = -1);
  // Loss of a batch without any update (validation), the same way.
  Losses evaluate(const int64_t* tokens, int64_t B, int64_t S, double mtp_lambda, const int64_t* labels = nullptr,
                  int64_t B_global = -1);
  Params& grads() { return grads_; }
  AdamW& optimizer() { return opt_; }
  const TrainerConfig& config() const { return cfg_; }

 private:
  // losses and expert loads of this rank's stage and data -> those of the whole model and the global batch
  void combine_over_ranks(PipelineResult& pr) const;
  Model& model_;
  TrainerConfig cfg_;
  const Comm* comm_;
  Params grads_;
  AdamW opt_;
  int64_t steps_ = 0;
};

}  // namespace dsv3
