// defines: dsv3::PlanSettings, StagePlan, StageMemory, StepEstimate, Plan, make_plan, plan_settings_from_deck,
//          default_plan_world, model_flops_per_sequence, format_plan, plan_to_json
// The planner: what a run of a deck needs, without running it. A pure function from (model, training and
// parallel settings, world size) to a Plan: exact parameter counts (from the ParamSpec table, the same one the
// model allocates from), per pipeline stage the bytes one rank holds (weights, gradients, ZeRO-1 optimizer shard,
// activations of the micro-batches 1F1B keeps in flight, the backward pass's working set, communication buffers),
// the pipeline bubble, the model FLOPs per token, and a step-time estimate from stated device and network figures.
//
// ---- What is counted (the buffers the trainer allocates: src/train, src/optim, src/model, src/pipeline) --------
// weights     every parameter the stage holds (its layers; routed experts / ep / etp; tp-sharded tensors / tp;
//             the word-embedding copy the MTP module uses on the last stage; the non-trainable expert biases)
// gradients   the same elements again (Trainer::grads_ has the model's shard plan)
// optimizer   per ZeRO-1 bucket (dense over dp, routed experts over edp; pipeline copies excluded) one shard of
//             ceil(elements / group) elements: FP32 master + m + v (optim.moment_dtype) + the reduced FP32
//             gradient shard (groups of more than one; a group of one reads the gradients in place) + one
//             weight-decay flag byte (optim/adamw.h's Bucket)
// activations what one micro-batch's forward keeps for its backward (model.h's Activations: every LayerActs,
//             the logits, the MTP module's inputs) times the micro-batches alive at once on the stage under
//             non-interleaved 1F1B: min(pp - stage, m) (pipeline/schedule.h); the attention K/V part (the latent
//             c|k_pe, the normalised latent and the up-projected k|v) is also reported on its own
//             plan.recompute: none     = what dsv3 keeps today (the (S, S) attention probabilities included);
//                             selective = the attention core recomputed (flash attention): per head and position
//                                         one softmax statistic instead of S probabilities;
//                             full      = each decoder layer keeps only its input; one layer's activations are
//                                         rebuilt at a time in the backward pass (counted in the workspace)
// workspace   the largest set of temporaries alive inside one micro-batch's backward pass (gradient of the
//             logits, of the residual stream, one layer's backward buffers)
// comm        ZeRO-1 staging (with BF16 weights the rounded shard of a bucket over more than one rank, FP32 +
//             BF16, optimizer phase only; the buckets reduce-scatter from the gradients and gather into the
//             weights in place, a group of one's update writes the weights itself), pipeline
//             receive/send buffers (one (tokens, D) buffer each way), expert all-to-all staging (ep > 1)
// other       the RoPE cos/sin table, the rank's token and label batch
// total       weights + gradients + optimizer + other + max(activations + workspace + pipeline/expert buffers,
//             ZeRO staging): the optimizer step runs after the micro-batches' activations are gone.
// Dtypes: run.device = cpu stores every weight, gradient and activation in FP32 (BF16 is emulated by rounding),
// moments per optim.moment_dtype; run.device = cuda takes optim.param_dtype / grad_dtype / moment_dtype as the
// storage and BF16 activations when param_dtype = bf16. Tensor and sequence parallelism: tp-sharded weights and
// per-head / intermediate activations / tp, token-sized ones / tp with sp.
//
// ---- FLOPs (model FLOPs, as MFU counts them: no recomputation, causal attention) ------------------------------
// forward per sequence = 2 x (elements of every matmul weight a token passes through) x tokens + attention core;
// matmuls: MLA q_a/q_b (or q_proj), kv_a, kv_b, o; dense MLP 3 x I x D; MoE router E x D, top-k routed experts
// K x 3 x I x D, shared experts; the LM head V x D; the MTP module's eh_proj, decoder layer and (shared) head on
// S-1 positions. The embedding lookup is free. Attention core: QK^T over H x (dn+dr) and PV over H x dv for the
// S(S+1)/2 causal query-key pairs, 2 FLOPs each. Training = 3 x forward (backward = 2 x forward).
//
// ---- Step time (documented assumptions, nothing measured) -----------------------------------------------------
// per micro-batch and stage: compute = FLOPs of the stage's layers / tp / (device peak x plan.compute_efficiency);
// expert all-to-all: 4 exchanges per MoE layer (dispatch + combine, forward and backward) of tokens x K x D
// activations, the remote share (ep-1)/ep; pipeline: one activation and one gradient per micro-batch; tensor
// parallel: 4 all-gather/reduce-scatter pairs per layer. Nothing overlaps (an upper bound: dsv3 starts the
// expert all-to-all before the shared experts, which the estimate does not credit).
// step = (m + pp - 1) x the slowest stage's micro-batch time (1F1B; the pp - 1 extra slots are the bubble)
//        + ZeRO-1 reduce-scatter of the gradients and all-gather of the weights over dp (dense) and edp (experts).
// A group whose ranks lie on one node (plan.gpus_per_node) uses plan.nvlink_gbps, otherwise plan.net_gbps.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "model/config.h"
#include "model/params.h"
#include "parallel/topology.h"
#include "pipeline/layout.h"

namespace dsv3 {

class Deck;

enum class Recompute { None, Selective, Full };

struct PlanSettings {
  ParallelSizes sizes;               // tp pp dp ep etp (world = tp*pp*dp)
  std::vector<StageLayout> layout;   // one per stage (parse_pp_layout)
  int64_t seq_length = 0;            // S, e.g. 4096
  int64_t micro_batch = 1;           // sequences per micro-batch per data-parallel rank
  int64_t global_batch = 1;          // sequences per optimizer step (the final one of a batch ramp)
  std::string device = "cpu";        // cpu | cuda
  int weight_bytes = 4, grad_bytes = 4, moment_bytes = 4, act_bytes = 4;  // storage per element (see above)
  bool bf16_params = false;  // optim.param_dtype = bf16: the updated shard is rounded before its all-gather
  Recompute recompute = Recompute::None;
  bool flash_attention = false;      // run.attention = flash: attention keeps its (B,H,S) log-sum-exp, not (B,H,S,S)
  double device_tflops = 989;        // peak per rank (TFLOP/s) of the step-time estimate and the MFU
  double compute_efficiency = 0.5;   // fraction of the peak the kernels reach
  double device_mem_gib = 140;       // memory per rank: a stage whose total exceeds it does not fit
  double net_gbps = 400;             // inter-node bandwidth per rank, Gbit/s per direction
  double nvlink_gbps = 3600;         // intra-node bandwidth per rank, Gbit/s per direction
  int gpus_per_node = 8;
};

// The smallest world a deck's parallel sizes allow when none is given: tp*pp*dp with parallel.dp if set, else
// the smallest dp for which ep*etp divides tp*dp (e.g. pretrain.deck: tp 2, pp 16, ep 64 -> dp 32, 1024 ranks).
int default_plan_world(const Deck& deck);
// Every setting from the deck (train.*, optim.*_dtype, run.device/threads, parallel.*, plan.*) for `world` ranks;
// the layout checks of resolve_sizes and parse_pp_layout apply (errors name the key).
PlanSettings plan_settings_from_deck(const Deck& deck, const ModelConfig& cfg, int world);

struct StageMemory {  // bytes per rank of a stage
  int64_t weights = 0, grads = 0, optimizer = 0;
  int64_t activations = 0;  // stored for backward, all in-flight micro-batches
  int64_t kv = 0;           // the attention K/V part of `activations`
  int64_t workspace = 0;    // one backward pass's temporaries
  int64_t comm_pipeline = 0, comm_zero = 0;  // buffers of the micro-batch phase / the optimizer phase
  int64_t other = 0;
  int64_t total = 0;        // the peak, as defined above
  int64_t comm() const { return comm_pipeline > comm_zero ? comm_pipeline : comm_zero; }
};

struct StagePlan {
  int stage = 0;
  std::string layout;                  // "E t0-3", "t60 m L"
  int64_t params_held = 0;             // elements of the weights buffer of one rank
  int64_t dense_shard = 0, expert_shard = 0;  // ZeRO-1 shard elements
  int inflight = 1;                    // micro-batches whose activations are alive at once
  int64_t act_per_microbatch = 0;      // bytes stored by one micro-batch (the recompute setting applied)
  StageMemory memory;
  bool fits = true;                    // total <= device_mem_gib (cuda only; always true on cpu)
  double flops_per_microbatch = 0;     // model FLOPs of one micro-batch on one rank (forward + backward)
  double t_compute = 0, t_ep = 0, t_pp = 0, t_tp = 0;  // seconds per micro-batch
  double t_microbatch() const { return t_compute + t_ep + t_pp + t_tp; }
};

struct StepEstimate {
  double compute = 0;   // m x the slowest stage's micro-batch compute
  double bubble = 0;    // (pp - 1) x the slowest stage's micro-batch time
  double ep = 0, pp = 0, tp = 0;  // m x the slowest stage's communication per micro-batch
  double dp = 0;        // ZeRO-1 reduce-scatter + all-gather
  double total = 0;
  double tokens_per_s_per_rank = 0;
  double tflops_per_rank = 0, mfu = 0;  // model FLOPs achieved, and as a fraction of the device peak
};

struct Plan {
  ParamCounts params;
  PlanSettings settings;
  std::string model_source;
  int64_t microbatches = 1;          // per data-parallel rank per step (as Trainer::step counts them)
  double bubble_fraction = 0;        // 1F1B: (pp - 1) / (m + pp - 1)
  double bubble_fraction_simulated = 0;  // simulate_1f1b(pp, m) with backward = 2 x forward
  double flops_per_token = 0;        // model FLOPs per token, forward + backward (main + MTP, causal)
  double matmul_flops_per_token = 0, attention_flops_per_token = 0;  // its two parts
  std::vector<StagePlan> stages;
  StepEstimate step;
};

Plan make_plan(const ModelConfig& cfg, const PlanSettings& s);

// Model FLOPs (forward + backward) of one sequence of `seq_length` tokens through the whole model incl. MTP, and
// the two parts; flops per token = this / seq_length. The driver's TFLOP/s and MFU use it.
struct ModelFlops {
  double matmul = 0, attention = 0;
  double total() const { return matmul + attention; }
};
ModelFlops model_flops_per_sequence(const ModelConfig& cfg, int64_t seq_length);

std::string format_plan(const Plan& p);  // the text report of `dsv3 --plan`
nlohmann::json plan_to_json(const Plan& p);  // `dsv3 --plan --json`: params.main/mtp/activated, stages[].memory_bytes

}  // namespace dsv3
