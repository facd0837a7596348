// defines: dsv3::ModelConfig (the DeepSeek-V3 architecture, field names as in the Hugging Face config.json),
//          model_config_from_json, ModelConfig::validate, ModelConfig::is_moe_layer
// Every size the model uses comes from here: nothing in dsv3 is hard-wired to the tiny or the 671B sizes.
#pragma once
#include <array>
#include <cstdint>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace dsv3 {

// dsv3 builds the RoPE cos/sin table of every position up to max_position_embeddings at start-up (model/rope.h):
// max_position_embeddings x qk_rope_head_dim floats. This bound turns a typo or a fuzzed config.json (10^12
// positions) into a clear error instead of a giant allocation: 1 GiB, i.e. 4,194,304 positions at qk_rope_head_dim
// 64, 25x DeepSeek-V3's 163,840 (a 40 MiB table).
constexpr int64_t kMaxRopeTableBytes = int64_t(1) << 30;

struct RopeScaling {
  std::string type;                           // "yarn" or "" (no scaling)
  double factor = 1.0;                        // e.g. 40 (671B), 4 (tiny)
  int64_t original_max_position_embeddings = 0;  // e.g. 4096
  double beta_fast = 32, beta_slow = 1;
  double mscale = 1.0, mscale_all_dim = 1.0;
};

struct ModelConfig {
  int64_t vocab_size = 0;              // e.g. 129280
  int64_t hidden_size = 0;             // e.g. 7168
  int64_t intermediate_size = 0;       // dense SwiGLU width, e.g. 18432
  int64_t moe_intermediate_size = 0;   // per routed/shared expert, e.g. 2048
  int64_t num_hidden_layers = 0;       // main-model decoder layers, e.g. 61
  int64_t first_k_dense_replace = 0;   // the first k layers are dense, e.g. 3
  int64_t moe_layer_freq = 1;
  int64_t num_attention_heads = 0;     // e.g. 128
  int64_t num_key_value_heads = 0;     // MLA: equal to the heads
  int64_t q_lora_rank = 0;             // e.g. 1536; 0 = no q compression (q_proj)
  int64_t kv_lora_rank = 0;            // e.g. 512
  int64_t qk_nope_head_dim = 0;        // e.g. 128
  int64_t qk_rope_head_dim = 0;        // e.g. 64 (decoupled RoPE part, one k_pe shared by all heads)
  int64_t v_head_dim = 0;              // e.g. 128
  int64_t n_routed_experts = 0;        // e.g. 256; 0 = no MoE layers
  int64_t n_shared_experts = 0;        // e.g. 1
  int64_t num_experts_per_tok = 0;     // top-k, e.g. 8
  int64_t n_group = 1;                 // expert groups, e.g. 8
  int64_t topk_group = 1;              // groups kept per token, e.g. 4
  double routed_scaling_factor = 1.0;  // e.g. 2.5
  bool norm_topk_prob = true;
  std::string scoring_func = "sigmoid";
  std::string topk_method = "noaux_tc";
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  int64_t max_position_embeddings = 0;   // e.g. 163840 (its RoPE table is bounded: kMaxRopeTableBytes)
  int64_t num_nextn_predict_layers = 0;  // MTP depth, e.g. 1
  bool tie_word_embeddings = false;
  bool rope_interleave = true;
  int64_t bos_token_id = 0, eos_token_id = 1;
  double aux_loss_alpha = 1e-4;          // not in the released config (Megatron-Bridge default)
  // Node-limited routing (deck moe.max_nodes / moe.nodes, not HF keys): the experts lie in route_nodes contiguous
  // blocks (the nodes expert parallelism spreads them over); a token's experts span at most route_max_nodes of them.
  // route_max_nodes 0: off. RouterSpec (ops/backend.h) states the rule.
  int64_t route_nodes = 1, route_max_nodes = 0;
  double initializer_range = 0.006;
  RopeScaling rope_scaling;
  std::array<int, 2> fp8_block = {128, 128};  // quantization_config.weight_block_size
  std::string source;                    // where it came from, for error messages

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }  // e.g. 192
  // HF rule: layer i is MoE iff experts exist, i >= first_k_dense_replace and i % moe_layer_freq == 0.
  // MTP layers (i >= num_hidden_layers) follow the same rule.
  bool is_moe_layer(int64_t i) const {
    return n_routed_experts > 0 && i >= first_k_dense_replace && i % moe_layer_freq == 0;
  }
  int64_t total_layers() const { return num_hidden_layers + num_nextn_predict_layers; }
  // Throws dsv3::Error naming the inconsistent key (e.g. n_routed_experts not divisible by n_group).
  void validate() const;
};

// Reads an HF DeepSeek-V3 config.json object (null q_lora_rank/n_routed_experts mean 0). `source` names the file.
ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& source);
ModelConfig model_config_from_file(const std::string& path);
nlohmann::json model_config_to_json(const ModelConfig& c);

}  // namespace dsv3

namespace dsv3 {
class Deck;
// The model of a deck: model.hf_config (if given) read first, then every given model.<hf key> applied on top
// (model.rope_scaling.<key> for the nested YaRN fields), then validated. Errors name the deck key or the file; a
// value the config rejects that the deck set also names its deck key, value and origin ("[model.n_group = 3 at
// run.deck:12]").
ModelConfig model_config_from_deck(const Deck& deck);
}  // namespace dsv3
