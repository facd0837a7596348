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
#include "ops/backend.h"

namespace dsv3 {

class HfCheckpoint;

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

struct KvCache {
  std::vector<MlaCache> layers;  // main-model layers only (generation does not use MTP)
};

class Model {
 public:
  Model(const ModelConfig& cfg, Backend& be);
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
  Losses forward(const int64_t* tokens, int64_t B, int64_t S, double mtp_lambda, double aux_alpha,
                 ForwardTrace* trace = nullptr);

  // Main-model logits (B, S, V) without the losses or MTP (generation without a cache).
  std::vector<float> logits(const int64_t* tokens, int64_t B, int64_t S);

  // Generation with the MLA latent cache: feeds n tokens of one sequence, returns the logits (V) of the last one.
  KvCache make_cache(int64_t capacity) const;
  std::vector<float> forward_cached(const int64_t* tokens, int64_t n, KvCache& cache);

 private:
  // One decoder layer on the residual stream x (B*S, D), updated in place. With `cache` (B = 1), attention uses and
  // extends the latent cache instead of attending within the S tokens only.
  void layer_forward(int64_t layer, float* x, int64_t B, int64_t S, MlaCache* cache, MoeTrace* mt);
  // hidden (B*S, D) after the final norm of the main model
  void main_forward(const int64_t* tokens, int64_t B, int64_t S, std::vector<float>& h, ForwardTrace* trace);

  ModelConfig cfg_;
  Backend& be_;
  Params params_;
  RopeTable rope_;
};

}  // namespace dsv3
