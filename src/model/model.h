// defines: dsv3::Model (parameters + forward pass of DeepSeek-V3 with MTP), ForwardTrace, Losses, KvCache
// The forward pass reads top to bottom: embedding -> decoder layers (MLA + dense MLP or MoE, pre-norm residual)
// -> final norm -> LM head; then the MTP module on (embedding of t+1, final-norm hidden of t); then the losses.
#pragma once
#include <cstdint>
#include <map>
#include <vector>

#include "model/config.h"
#include "model/mla.h"
#include "model/moe.h"
#include "model/params.h"
#include "model/rope.h"
#include "model/tensor_parallel.h"
#include "ops/backend.h"
#include "pipeline/layout.h"

namespace dsv3 {

class HfCheckpoint;

// The part of the model one pipeline stage runs (pipeline/layout.h): count 1 = the whole model.
struct PipelineStage {
  int index = 0, count = 0;  // count 0: not set (the whole model)
  StageLayout layout;
  static PipelineStage whole(const ModelConfig& c);
};

struct MoeTrace {
  std::vector<int32_t> idx;      // (T, K)
  std::vector<float> weight;     // (T, K)
  std::vector<int64_t> counts;   // (E)
  double balance_loss = 0;       // this layer's sequence-wise balance loss (without alpha)
};

// What a forward pass can report besides the losses (validation, metrics, the bias update).
struct ForwardTrace {
  bool keep_hidden = false;                   // store the hidden states below (validation only: memory)
  std::vector<float> embed;                   // (B, S, D)
  std::vector<std::vector<float>> layer_out;  // per main layer, residual stream after it (B, S, D)
  std::vector<float> final_norm;              // (B, S, D)
  std::vector<float> mtp_eh_proj, mtp_block;  // (B, S-1, D)
  std::vector<float> logits, mtp_logits;      // (B, S, V), (B, S-1, V) when keep_hidden
  std::map<int64_t, MoeTrace> moe;            // by layer index (MTP layers included)
};

struct Losses {
  double lm = 0, mtp = 0, aux = 0, total = 0;
};

// Everything one decoder layer's backward needs from its forward.
struct LayerActs {
  int64_t B = 0, S = 0;
  bool sp = false;  // sequence parallel: x_in, x_mid, the rstds hold this rank's T/tp rows; xn1, xn2 all T rows
  Floats x_in, rstd1, xn1;   // residual in (T, D), input_layernorm rstd (T) and output (T, D)
  Floats x_mid, rstd2, xn2;  // residual after attention, post_attention_layernorm rstd and output
  MlaActs att;
  MlpActs mlp;   // dense layers
  MoeActs moe;   // MoE layers
};

// The activations of a whole forward pass (one micro-batch), kept for backward. The float tensors are Buffers in the
// run's memory (core/memory.h); token ids and targets stay on the host (the ops that read them stage a few KiB).
struct Activations {
  int64_t B = 0, S = 0;
  std::vector<int64_t> tokens;           // (B, S)
  std::vector<LayerActs> layers;         // main layers, then the MTP layer
  Floats x_final, rstd_final, h;              // residual after the last layer (sp: T/tp rows), model.norm rstd (same
                                              // rows) and output (T, D: all rows, the heads' input)
  Floats logits, lse;                    // (T, V/tp) this rank's vocabulary slice, per-row log-sum-exp (T)
  std::vector<int64_t> targets;          // (T), -1 where no target
  // MTP depth 1 (Tm = B*(S-1) positions)
  std::vector<int64_t> mtp_next;         // (Tm) token i+1
  Floats mtp_e, mtp_e_rstd, mtp_hin, mtp_h_rstd, mtp_cat;  // embedding (Tm,D), h slice (Tm,D), cat (Tm,2D)
  Floats mtp_x, mtp_rstd_out, mtp_hn, mtp_logits, mtp_lse;  // block output, shared_head.norm, logits
  std::vector<int64_t> mtp_targets;      // (Tm)
  bool mtp_sp = false;                   // the MTP layer ran sequence-parallel (mtp_x, mtp_rstd_out: Tm/tp rows)
};

struct KvCache {
  std::vector<MlaCache> layers;  // main-model layers only (generation does not use MTP)
};

class Model {
 public:
  // ep: the expert-parallel group this rank belongs to (default: none; the model holds every expert)
  // stage: the pipeline stage this rank runs (default: the whole model); it holds only that stage's parameters.
  // tp: the tensor-parallel group (default: none); the rank holds its slice of every tp-sharded parameter.
  Model(const ModelConfig& cfg, Backend& be, const ExpertGroup& ep = {}, const PipelineStage& stage = {},
        const TensorGroup& tp = {});
  const TensorGroup& tensor_group() const { return tp_; }
  // Selective recompute (train.recompute = selective, DeepSeek-V3's recipe): the forward drops the RMSNorm outputs,
  // the MLA up-projections (q, kv and the normalised latents) and the SwiGLU products; backward rebuilds them from
  // what stays (the residual stream, the rstds, the latents, the gate/up pre-activations), bit-identically.
  void set_selective_recompute(bool on) { recompute_ = on; }
  bool selective_recompute() const { return recompute_; }
  // rows of the residual stream a pipeline stage sends/receives for B sequences of S tokens (B*S/tp under sp)
  int64_t stage_rows(int64_t B, int64_t S) const { return tp_.sp_rows(B * S); }
  const ExpertGroup& expert_group() const { return ep_; }
  const PipelineStage& stage() const { return stage_; }
  const ModelConfig& config() const { return cfg_; }
  Params& params() { return params_; }
  const Params& params() const { return params_; }

  // Every parameter of the table from an HF checkpoint (shapes checked, experts stacked, FP8 dequantized).
  // Tensors of the checkpoint that the table does not know are an error (a config/checkpoint mismatch).
  void load_hf(const HfCheckpoint& ck);
  // Fresh weights (training from scratch): linear weights and embeddings N(0, initializer_range^2), norms 1,
  // expert biases 0. Each element's value depends only on (seed, parameter name, index): any layout that holds a
  // shard of a tensor draws the same numbers.
  void init_random(uint64_t seed);

  // Full forward of B sequences of S tokens (tokens (B, S)); losses weighted by mtp_lambda and aux_alpha.
  // Targets: without `labels`, position s predicts tokens[s+1] (S-1 LM targets; the MTP module predicts s+2,
  // S-2 targets) as in the golden data; with labels (B, S) (= the next token of each position, Megatron's
  // tokens[1:S+1] of an S+1-token sample), every position has an LM target and the MTP S-1.
  Losses forward(const int64_t* tokens, int64_t B, int64_t S, double mtp_lambda, double aux_alpha,
                 ForwardTrace* trace = nullptr, const int64_t* labels = nullptr);

  // Forward and backward of one micro-batch: gradients of loss_scale * total loss accumulate into `grads` (a
  // Params with this model's table). Returns the (unscaled) losses; the trace gets routing and counts.
  Losses forward_backward(const int64_t* tokens, int64_t B, int64_t S, double mtp_lambda, double aux_alpha,
                          double loss_scale, Params& grads, ForwardTrace* trace = nullptr,
                          const int64_t* labels = nullptr);

  // One pipeline stage of forward_backward: forward takes the previous stage's output x_in (B*S, D) unless the
  // stage embeds the tokens, and leaves its own output in a.x_final for the next stage unless it computes the
  // losses (which it then returns; inner stages return only their layers' balance losses). backward takes the
  // next stage's gradient dx_out unless it holds the losses, and returns the gradient for the previous stage in
  // dx_in unless it holds the embedding.
  Losses forward_stage(const int64_t* tokens, const int64_t* labels, int64_t B, int64_t S, double mtp_lambda,
                       double aux_alpha, ForwardTrace* trace, Activations& a, const float* x_in);
  void backward_stage(const Activations& a, double mtp_lambda, double aux_alpha, double loss_scale, Params& grads,
                      const float* dx_out, std::vector<float>* dx_in);

  // Main-model logits (B, S, V) without the losses or MTP (generation without a cache).
  std::vector<float> logits(const int64_t* tokens, int64_t B, int64_t S);

  // Generation with the MLA latent cache: feeds n tokens of one sequence, returns the logits (V) of the last one.
  KvCache make_cache(int64_t capacity) const;
  std::vector<float> forward_cached(const int64_t* tokens, int64_t n, KvCache& cache);

 private:
  // One decoder layer on the residual stream x (B*S, D), updated in place. With `cache` (B = 1), attention uses and
  // extends the latent cache instead of attending within the S tokens only.
  // logits of every position (last_only: of each sequence's last), through the pipeline stages
  std::vector<float> infer(const int64_t* tokens, int64_t B, int64_t S, KvCache* cache, bool last_only);
  // `la` keeps what backward needs (null: inference, nothing kept beyond the call).
  // sp: x holds this rank's B*S/tp rows (sequence parallelism; tp_.sp must be on), else all of them.
  void layer_forward(int64_t layer, float* x, int64_t B, int64_t S, MlaCache* cache, MoeTrace* mt, LayerActs* la,
                     bool sp = false);
  // dx (T, D): gradient w.r.t. the layer's output residual in, w.r.t. its input out (in place).
  void layer_backward(int64_t layer, const LayerActs& la, float* dx, double aux_coef, Params& grads);
  // An RMSNorm of x (this rank's Tl rows) as a tp region's input: out all rows (Tl*tp, D: gathered under tp.sp),
  // rstd (Tl) when non-null. The norms before MLA, the MLP and the heads, and selective recompute's rebuild.
  void norm_gathered(const float* x, const std::string& weight, int64_t Tl, const TensorGroup& tp, float* out,
                     float* rstd);
  // The same after the residual add it is fused with: x += residual, then the norm of the new x.
  void add_norm_gathered(const float* residual, float* x, const std::string& weight, int64_t Tl, const TensorGroup& tp,
                         float* out, float* rstd);
  // An RMSNorm's backward on `rows` rows: dx += , the weight's gradient += (summed over tp under tp.sp)
  void norm_backward(const float* x, const std::string& weight, const float* rstd, const float* dy, int64_t rows,
                     float* dx, Params& grads, const TensorGroup& tp);
  // The forward pass of the whole model into `a` (losses and trace filled); the shared path of forward() and
  // forward_backward().
  Losses forward_into(const int64_t* tokens, const int64_t* labels, int64_t B, int64_t S, double mtp_lambda,
                      double aux_alpha, ForwardTrace* tr, Activations& a, const float* x_in);

  ModelConfig cfg_;
  Backend& be_;
  ExpertGroup ep_;
  PipelineStage stage_;
  TensorGroup tp_;
  Params params_;
  RopeTable rope_;
  bool recompute_ = false;
};

}  // namespace dsv3
