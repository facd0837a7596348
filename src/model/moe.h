// defines: MoeWeights, Routing, Dispatch, moe_route, moe_dispatch, moe_experts, moe_combine, seq_balance_loss,
//          swiglu_mlp_forward
// DeepSeekMoE as four named phases (the structure expert parallelism later splits across ranks):
//   route    : sigmoid scores, bias-steered group-limited top-k, normalised weights x routed_scaling_factor
//   dispatch : tokens grouped by expert (counting sort), rows gathered into one contiguous buffer
//   experts  : each local expert's SwiGLU on its contiguous rows
//   combine  : rows scattered back, weighted, summed per token (+ the shared experts, computed on all tokens)
#pragma once
#include <cstdint>
#include <vector>

#include "model/config.h"
#include "model/params.h"
#include "ops/backend.h"

namespace dsv3 {

struct MoeWeights {
  const float* gate = nullptr;       // (E, D) router
  const float* bias = nullptr;       // (E) e_score_correction_bias (selection only)
  const float* w_gate = nullptr;     // (E, I, D)
  const float* w_up = nullptr;       // (E, I, D)
  const float* w_down = nullptr;     // (E, D, I)
  const float* sh_gate = nullptr;    // (I*n_shared, D) or null
  const float* sh_up = nullptr;
  const float* sh_down = nullptr;    // (D, I*n_shared)
  static MoeWeights from(const Params& p, const ModelConfig& c, int64_t layer);
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
  std::vector<int32_t> row_src;  // (T*K) token*K + slot that each grouped row came from
  std::vector<float> x;          // (T*K, D) gathered inputs, grouped by expert
  std::vector<float> y;          // (T*K, D) expert outputs
};

Routing moe_route(Backend& be, const ModelConfig& c, const MoeWeights& w, const float* x_norm, int64_t T);
Dispatch moe_dispatch(const Routing& r, const float* x_norm, int64_t D);
void moe_experts(Backend& be, const ModelConfig& c, const MoeWeights& w, Dispatch& d);
// out (T, D) = sum_k weight * expert_k(x)  (+ shared experts when present)
void moe_combine(const Routing& r, const Dispatch& d, int64_t D, float* out);

// Sequence-wise balance loss (paper eq. 17-20, without alpha), averaged over the B sequences of T/B tokens:
// f_i = E/(K*T_seq) * tokens of the sequence dispatched to i, P_i = mean_t s_it / sum_j s_jt, L = sum_i f_i P_i.
double seq_balance_loss(const Routing& r, int64_t B);

// Dense SwiGLU MLP: out (T, D) = down(silu(gate(x)) * up(x)) (+= when accumulate)
void swiglu_mlp_forward(Backend& be, const float* x, int64_t T, int64_t D, int64_t I, const float* w_gate,
                        const float* w_up, const float* w_down, float* out, bool accumulate);

}  // namespace dsv3
