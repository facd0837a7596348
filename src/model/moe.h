// defines: MoeWeights, Routing, Dispatch, moe_route, moe_dispatch, moe_experts, moe_combine, seq_balance_loss,
//          routed_node_spans, router_spec, swiglu_mlp_forward/backward
// DeepSeekMoE as four named phases (the structure expert parallelism later splits across ranks):
//   route    : sigmoid scores, bias-steered group-limited top-k, normalised weights x routed_scaling_factor
//   dispatch : tokens grouped by expert (counting sort), rows gathered into one contiguous buffer
//   experts  : each local expert's SwiGLU on its contiguous rows
//   combine  : rows scattered back, weighted, summed per token (+ the shared experts, computed on all tokens)
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"
#include "model/config.h"
#include "model/params.h"
#include "model/tensor_parallel.h"
#include "ops/backend.h"

namespace dsv3 {

class Comm;

// The expert-parallel group of this rank: the routed experts of every MoE layer are split into `size` contiguous
// ranges and tokens travel to the rank that holds their expert (all-to-all); size 1: every expert is local.
// Expert tensor parallelism (etp = tp > 1): every routed expert is also cut along its intermediate dimension over
// the tensor-parallel group; the ranks of that group then run all tokens through their slices and the tp sum that
// completes the MoE output adds the slices' partial outputs.
struct ExpertGroup {
  const Comm* comm = nullptr;
  int size = 1, rank = 0;
  int etp_size = 1, etp_rank = 0;  // expert-tensor-parallel size and rank (the tp group's when > 1)
};

// Pointers into a Params store: the weights, or (same layout) their gradients.
struct MoeWeights {
  float* gate = nullptr;       // (E, D) router
  float* bias = nullptr;       // (E) e_score_correction_bias (selection only)
  float* w_gate = nullptr;     // (E, I, D)
  float* w_up = nullptr;       // (E, I, D)
  float* w_down = nullptr;     // (E, D, I)
  float* sh_gate = nullptr;    // (I*n_shared, D) or null
  float* sh_up = nullptr;
  float* sh_down = nullptr;    // (D, I*n_shared)
  static MoeWeights from(Params& p, const ModelConfig& c, int64_t layer);
};

// SwiGLU intermediates for backward: gate/up pre-activations and the product, (rows, I)
struct MlpActs {
  Floats g, u, a;
};

struct Routing {
  int64_t T = 0, E = 0, K = 0;
  std::vector<float> scores;   // (T, E) unbiased sigmoid scores
  std::vector<int32_t> idx;    // (T, K) chosen experts, ascending
  std::vector<float> weight;   // (T, K) combine weights
  std::vector<int64_t> counts; // (E) tokens dispatched to each expert
};

struct Dispatch {
  std::vector<int64_t> offset;   // (E+1) first row of each expert in the grouped buffer
  std::vector<int32_t> pos;      // (T*K) the grouped row of each (token, slot)
  Floats x;                      // (T*K, D) gathered inputs, grouped by expert
  Floats y;                      // (T*K, D) expert outputs
};

// The model's routing rule (group limit, node limit, k, normalisation, scale) for Backend::router_forward.
RouterSpec router_spec(const ModelConfig& c);
Routing moe_route(Backend& be, const ModelConfig& c, const MoeWeights& w, const float* x_norm, int64_t T);
Dispatch moe_dispatch(Backend& be, const Routing& r, const float* x_norm, int64_t D);
// The local experts' SwiGLU on rows grouped by local expert (offset: E_local+1 row offsets): y (rows, D). I: the
// intermediate width held here (moe_intermediate_size / etp: under expert tensor parallelism y is a partial sum).
void moe_experts(Backend& be, const ModelConfig& c, const MoeWeights& w, const std::vector<int64_t>& offset,
                 const float* x, float* y, int64_t I, MlpActs* acts = nullptr);
// Its gradients given dy (rows, D): the local experts' weight gradients accumulate into g, dx (rows, D) too.
// m: the forward's intermediates (the SwiGLU product rebuilt when selective recompute dropped it).
void moe_experts_backward(Backend& be, const ModelConfig& c, const MoeWeights& w, MoeWeights& g,
                          const std::vector<int64_t>& offset, const float* x, const MlpActs& m, const float* dy,
                          int64_t I, float* dx);
// out (T, D) = sum_k weight * expert_k(x)  (+ shared experts when present)
void moe_combine(Backend& be, const Routing& r, const Dispatch& d, int64_t D, float* out);

// The node groups (ModelConfig::route_nodes) the experts of each token lie on, summed over the tokens of idx (T, K):
// how many nodes the tokens' all-to-all reaches.
int64_t routed_node_spans(const ModelConfig& c, const std::vector<int32_t>& idx);

// Sequence-wise balance loss (paper eq. 17-20, without alpha), averaged over the B sequences of T/B tokens:
// f_i = E/(K*T_seq) * tokens of the sequence dispatched to i, P_i = mean_t s_it / sum_j s_jt, L = sum_i f_i P_i.
double seq_balance_loss(const Routing& r, int64_t B);

// Dense SwiGLU MLP: out (T, D) = down(silu(gate(x)) * up(x)) (+= when accumulate); intermediates into acts.
void swiglu_mlp_forward(Backend& be, const float* x, int64_t T, int64_t D, int64_t I, const float* w_gate,
                        const float* w_up, const float* w_down, float* out, bool accumulate, MlpActs* acts = nullptr);
// Its gradients given dy (T, D): dW accumulate, dx (T, D) accumulates. m: the forward's intermediates (T, I; the
// SwiGLU product rebuilt when selective recompute dropped it).
void swiglu_mlp_backward(Backend& be, const float* x, int64_t T, int64_t D, int64_t I, const float* w_gate,
                         const float* w_up, const float* w_down, const MlpActs& m, const float* dy, float* gw_gate,
                         float* gw_up, float* gw_down, float* dx);

// A whole MoE block, forward and backward (shared experts included); what backward needs is kept in MoeActs.
// Expert parallelism: where the dispatched rows go and how the received ones are ordered for the local experts.
struct ExpertExchange {
  std::vector<int64_t> send_rows, recv_rows;  // (ep) rows to / from each rank of the group
  std::vector<int64_t> offset;                // (E_local+1) rows of each local expert in the expert-major buffer
  std::vector<int32_t> perm;                  // received row (source-rank major) -> expert-major row
  std::vector<int32_t> inv;                   // the inverse: expert-major row -> received row
  Floats x;                                   // (rows received, D) expert-major inputs of the local experts
};

struct MoeActs {
  int64_t B = 0;
  Routing r;          // every token of the micro-batch (the balance loss and the expert loads)
  // tensor parallelism: the tokens are replicated over tp and each rank sends the slice [t0, t0 + rs.T) through
  // dispatch -> experts -> combine, so that every token meets its experts exactly once; rs is r restricted to it.
  // With expert tensor parallelism every rank sends all tokens through its slices of the experts instead.
  bool sliced = false;  // tp > 1 and etp = 1: the routed part runs on the slice rs
  int64_t t0 = 0;
  Routing rs;         // (sliced only; otherwise r)
  Dispatch d;
  ExpertExchange ex;  // ep > 1
  MlpActs experts;    // the local experts' rows (rows, I)
  MlpActs shared;     // (T, I*n_shared)
};
// route -> dispatch (-> all-to-all to the experts' ranks) -> experts (-> all-to-all back) -> combine
// tp: the router runs on every token everywhere (replicated), the routed part on this rank's token slice (or, with
// expert tensor parallelism, on every token through this rank's slices of the experts), the shared experts
// column/row-parallel; one all-reduce over tp completes out (sp: x_norm is the all-gathered
// (B*S, D), out this rank's rows (B*S/tp, D) of the sum, a reduce-scatter; the routed slice is those rows).
// moe_backward is the same with and without sp: dout (B*S, D) whole (the caller all-gathers it under sp).
void moe_forward(Backend& be, const ModelConfig& c, const MoeWeights& w, const ExpertGroup& ep, const float* x_norm,
                 int64_t B, int64_t S, float* out, MoeActs& acts, const TensorGroup& tp = {});
// aux_coef: the weight of this layer's balance loss in the total loss (aux_alpha x loss scale). tp: dx_norm gets
// this rank's partial gradient (its token slice, its shared-expert columns): the caller sums it over tp; the
// router's gradient is summed over tp here.
void moe_backward(Backend& be, const ModelConfig& c, const MoeWeights& w, MoeWeights& g, const ExpertGroup& ep,
                  const float* x_norm, const MoeActs& a, const float* dout, double aux_coef, float* dx_norm,
                  const TensorGroup& tp = {});

}  // namespace dsv3
