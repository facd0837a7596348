// defines: MicroBatch, PipelineResult, run_pipeline — runs micro-batches through this rank's pipeline stage with
// the 1F1B schedule (pipeline/schedule.h): receive the previous stage's activations, forward, send them on; later
// receive the next stage's gradient, backward, send the gradient back. With one stage it is plain gradient
// accumulation over the micro-batches (the same code, no communication).
#pragma once
#include <cstdint>
#include <map>
#include <vector>

#include "model/model.h"

namespace dsv3 {

class Comm;

struct MicroBatch {
  const int64_t* tokens = nullptr;  // (n, S)
  const int64_t* labels = nullptr;  // (n, S) or null
  int64_t n = 0;                    // sequences (may be 0 on a data-parallel rank without data)
  double weight = 0;                // its losses' share of the step's (n / global batch): the loss scale
};

struct PipelineResult {
  Losses loss;  // weighted sum over the micro-batches of this stage's losses (lm/mtp only on the loss stage)
  std::map<int64_t, std::vector<int64_t>> expert_load;  // this stage's MoE layers: tokens per expert
  // with node groups (ModelConfig::route_nodes > 1), over this stage's MoE layers and tokens: the node groups each
  // token's experts lie on, summed, and the tokens counted (their ratio: the all-to-all's fan-out per token)
  int64_t node_spans = 0, routed_tokens = 0;
  std::vector<ForwardTrace> traces;                     // per micro-batch, when keep_hidden was asked
};

// grads null: forward only. keep_hidden: keep every micro-batch's ForwardTrace with the hidden states (checks).
PipelineResult run_pipeline(Model& m, const Comm* comm, const std::vector<MicroBatch>& mbs, int64_t S,
                            double mtp_lambda, double aux_alpha, Params* grads, bool keep_hidden = false);

}  // namespace dsv3
