#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace dsv3 {

namespace {

using nlohmann::json;

// Fuzzing fix: error messages used to print an offending value with dump(), which recurses once per nesting
// level: a deeply nested value ([[[[...]]]], a few hundred KB) overflowed the stack. Scalars and short arrays
// of scalars are printed, anything deeper only named.
std::string json_brief(const json& v) {
  if (v.is_object()) return "an object";
  if (v.is_array()) {
    if (v.size() > 16) return "an array of " + std::to_string(v.size());
    for (const json& e : v)
      if (e.is_structured()) return "a nested array";
  }
  std::string s = v.dump();
  return s.size() > 200 ? s.substr(0, 200) + "..." : s;
}

// Reads j[key] into out when present; null means "absent" (HF writes q_lora_rank: null for V2-Lite).
template <class T>
void read_key(const json& j, const char* key, T& out, const std::string& src) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  try {
    if constexpr (std::is_same_v<T, bool>) {
      DSV3_CHECK(it->is_boolean(), src << ": config key '" << key << "' must be a boolean, got " << json_brief(*it));
    } else if constexpr (std::is_integral_v<T>) {
      // Fuzzing fix: integers used to go through double ((T)get<double>()), which is undefined behaviour for
      // values outside int64 (1e30, 18446744073709551615) and rounds values above 2^53. Integers are now read
      // exactly; a float must be integral and inside int64 ("4.0" as HF sometimes writes).
      static_assert(std::is_same_v<T, int64_t>);
      if (it->is_number_unsigned()) {
        DSV3_CHECK(it->get<uint64_t>() <= (uint64_t)std::numeric_limits<int64_t>::max(),
                   src << ": config key '" << key << "' = " << it->get<uint64_t>() << " does not fit in int64");
        out = (T)it->get<uint64_t>();
      } else if (it->is_number_integer()) {
        out = it->get<int64_t>();
      } else {
        const double x = it->is_number_float() ? it->get<double>() : 0.5;
        // [-2^63, 2^63): the doubles that convert to int64 without overflow
        DSV3_CHECK(it->is_number_float() && x == std::trunc(x) && x >= -9223372036854775808.0 && x < 9223372036854775808.0,
                   src << ": config key '" << key << "' must be an integer (fitting in int64), got " << json_brief(*it));
        out = (T)x;
      }
      return;
    } else if constexpr (std::is_floating_point_v<T>) {
      DSV3_CHECK(it->is_number(), src << ": config key '" << key << "' must be a number, got " << json_brief(*it));
    } else {
      DSV3_CHECK(it->is_string(), src << ": config key '" << key << "' must be a string, got " << json_brief(*it));
    }
    out = it->get<T>();
  } catch (const json::exception& e) {
    DSV3_FAIL(src << ": config key '" << key << "': " << e.what());
  }
}

}  // namespace

ModelConfig model_config_from_json(const json& j, const std::string& src) {
  DSV3_CHECK(j.is_object(), src << ": config must be a JSON object");
  ModelConfig c;
  c.source = src;
  read_key(j, "vocab_size", c.vocab_size, src);
  read_key(j, "hidden_size", c.hidden_size, src);
  read_key(j, "intermediate_size", c.intermediate_size, src);
  read_key(j, "moe_intermediate_size", c.moe_intermediate_size, src);
  read_key(j, "num_hidden_layers", c.num_hidden_layers, src);
  read_key(j, "first_k_dense_replace", c.first_k_dense_replace, src);
  read_key(j, "moe_layer_freq", c.moe_layer_freq, src);
  read_key(j, "num_attention_heads", c.num_attention_heads, src);
  c.num_key_value_heads = c.num_attention_heads;
  read_key(j, "num_key_value_heads", c.num_key_value_heads, src);
  read_key(j, "q_lora_rank", c.q_lora_rank, src);
  read_key(j, "kv_lora_rank", c.kv_lora_rank, src);
  read_key(j, "qk_nope_head_dim", c.qk_nope_head_dim, src);
  read_key(j, "qk_rope_head_dim", c.qk_rope_head_dim, src);
  read_key(j, "v_head_dim", c.v_head_dim, src);
  read_key(j, "n_routed_experts", c.n_routed_experts, src);
  read_key(j, "n_shared_experts", c.n_shared_experts, src);
  read_key(j, "num_experts_per_tok", c.num_experts_per_tok, src);
  read_key(j, "n_group", c.n_group, src);
  read_key(j, "topk_group", c.topk_group, src);
  read_key(j, "routed_scaling_factor", c.routed_scaling_factor, src);
  read_key(j, "norm_topk_prob", c.norm_topk_prob, src);
  read_key(j, "scoring_func", c.scoring_func, src);
  read_key(j, "topk_method", c.topk_method, src);
  read_key(j, "rms_norm_eps", c.rms_norm_eps, src);
  read_key(j, "rope_theta", c.rope_theta, src);
  read_key(j, "max_position_embeddings", c.max_position_embeddings, src);
  read_key(j, "num_nextn_predict_layers", c.num_nextn_predict_layers, src);
  read_key(j, "tie_word_embeddings", c.tie_word_embeddings, src);
  read_key(j, "rope_interleave", c.rope_interleave, src);
  read_key(j, "bos_token_id", c.bos_token_id, src);
  read_key(j, "eos_token_id", c.eos_token_id, src);
  read_key(j, "aux_loss_alpha", c.aux_loss_alpha, src);
  read_key(j, "initializer_range", c.initializer_range, src);
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    DSV3_CHECK(it->is_object(), src << ": config key 'rope_scaling' must be an object");
    const std::string rs = src + " rope_scaling";
    read_key(*it, "type", c.rope_scaling.type, rs);
    read_key(*it, "rope_type", c.rope_scaling.type, rs);  // newer HF spelling
    read_key(*it, "factor", c.rope_scaling.factor, rs);
    read_key(*it, "original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings, rs);
    read_key(*it, "beta_fast", c.rope_scaling.beta_fast, rs);
    read_key(*it, "beta_slow", c.rope_scaling.beta_slow, rs);
    read_key(*it, "mscale", c.rope_scaling.mscale, rs);
    read_key(*it, "mscale_all_dim", c.rope_scaling.mscale_all_dim, rs);
  }
  if (auto it = j.find("quantization_config"); it != j.end() && it->is_object()) {
    if (auto b = it->find("weight_block_size"); b != it->end()) {
      // Fuzzing fix: get<int>() truncated 2^32+16 to 16; the sizes are now range-checked as int64 first.
      auto positive_int = [](const json& x) {
        return x.is_number_integer() && (x.is_number_unsigned() ? x.get<uint64_t>() <= (uint64_t)std::numeric_limits<int>::max()
                                                                : x.get<int64_t>() > 0 && x.get<int64_t>() <= std::numeric_limits<int>::max());
      };
      DSV3_CHECK(b->is_array() && b->size() == 2 && positive_int((*b)[0]) && positive_int((*b)[1]) &&
                     (*b)[0].get<int64_t>() > 0 && (*b)[1].get<int64_t>() > 0,
                 src << ": quantization_config.weight_block_size must be two positive integers, got " << json_brief(*b));
      c.fp8_block = {(*b)[0].get<int>(), (*b)[1].get<int>()};
    }
  }
  return c;
}

ModelConfig model_config_from_file(const std::string& path) {
  std::ifstream f(path);
  DSV3_CHECK(f, "cannot open model config '" << path << "'");
  json j;
  try {
    j = json::parse(f);
  } catch (const json::exception& e) {
    DSV3_FAIL(path << ": not valid JSON: " << e.what());
  }
  return model_config_from_json(j, path);
}

json model_config_to_json(const ModelConfig& c) {
  json j = {
      {"architectures", {"DeepseekV3ForCausalLM"}},
      {"model_type", "deepseek_v3"},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"moe_intermediate_size", c.moe_intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"first_k_dense_replace", c.first_k_dense_replace},
      {"moe_layer_freq", c.moe_layer_freq},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"q_lora_rank", c.q_lora_rank > 0 ? json(c.q_lora_rank) : json(nullptr)},
      {"kv_lora_rank", c.kv_lora_rank},
      {"qk_nope_head_dim", c.qk_nope_head_dim},
      {"qk_rope_head_dim", c.qk_rope_head_dim},
      {"v_head_dim", c.v_head_dim},
      {"n_routed_experts", c.n_routed_experts > 0 ? json(c.n_routed_experts) : json(nullptr)},
      {"n_shared_experts", c.n_shared_experts},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"n_group", c.n_group},
      {"topk_group", c.topk_group},
      {"routed_scaling_factor", c.routed_scaling_factor},
      {"norm_topk_prob", c.norm_topk_prob},
      {"scoring_func", c.scoring_func},
      {"topk_method", c.topk_method},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"max_position_embeddings", c.max_position_embeddings},
      {"num_nextn_predict_layers", c.num_nextn_predict_layers},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"rope_interleave", c.rope_interleave},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_id},
      {"aux_loss_alpha", c.aux_loss_alpha},
      {"initializer_range", c.initializer_range},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"seq_aux", true},
  };
  if (!c.rope_scaling.type.empty())
    j["rope_scaling"] = {{"type", c.rope_scaling.type},
                         {"factor", c.rope_scaling.factor},
                         {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings},
                         {"beta_fast", c.rope_scaling.beta_fast},
                         {"beta_slow", c.rope_scaling.beta_slow},
                         {"mscale", c.rope_scaling.mscale},
                         {"mscale_all_dim", c.rope_scaling.mscale_all_dim}};
  return j;
}

void ModelConfig::validate() const {
  const std::string& s = source;
  auto positive = [&](int64_t v, const char* key) {
    DSV3_CHECK(v > 0, s << ": model key '" << key << "' must be > 0, got " << v);
  };
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(kv_lora_rank, "kv_lora_rank");
  positive(qk_nope_head_dim, "qk_nope_head_dim");
  positive(qk_rope_head_dim, "qk_rope_head_dim");
  positive(v_head_dim, "v_head_dim");
  positive(moe_layer_freq, "moe_layer_freq");
  positive(max_position_embeddings, "max_position_embeddings");
  DSV3_CHECK(q_lora_rank >= 0, s << ": model key 'q_lora_rank' must be >= 0 (0 = no q compression), got " << q_lora_rank);
  DSV3_CHECK(qk_rope_head_dim % 2 == 0,
             s << ": model key 'qk_rope_head_dim' must be even (RoPE rotates pairs), got " << qk_rope_head_dim);
  DSV3_CHECK(num_key_value_heads == num_attention_heads,
             s << ": model key 'num_key_value_heads' (" << num_key_value_heads << ") must equal num_attention_heads ("
               << num_attention_heads << "): MLA has one key/value head per query head");
  DSV3_CHECK(first_k_dense_replace >= 0 && first_k_dense_replace <= num_hidden_layers,
             s << ": model key 'first_k_dense_replace' (" << first_k_dense_replace << ") must be in [0, num_hidden_layers="
               << num_hidden_layers << "]");
  DSV3_CHECK(num_nextn_predict_layers == 0 || num_nextn_predict_layers == 1,
             s << ": model key 'num_nextn_predict_layers' = " << num_nextn_predict_layers
               << " is not supported (DeepSeek-V3 uses 1; 0 disables MTP)");
  DSV3_CHECK(rms_norm_eps > 0, s << ": model key 'rms_norm_eps' must be > 0");
  DSV3_CHECK(rope_theta > 0, s << ": model key 'rope_theta' must be > 0");
  DSV3_CHECK(bos_token_id >= 0 && bos_token_id < vocab_size && eos_token_id >= 0 && eos_token_id < vocab_size,
             s << ": model keys 'bos_token_id'/'eos_token_id' must be < vocab_size=" << vocab_size);
  // Fuzzing fix: a config.json with num_hidden_layers = 10^12 hung here (this loop) and then in build_param_table.
  // No real model is near the bound (DeepSeek-V3: 61 layers); it keeps every per-layer loop and table finite.
  constexpr int64_t kMaxLayers = 4096;
  DSV3_CHECK(num_hidden_layers <= kMaxLayers,
             s << ": model key 'num_hidden_layers' = " << num_hidden_layers << " is larger than dsv3 supports (" << kMaxLayers
               << ")");
  bool any_dense = false;
  for (int64_t i = 0; i < total_layers(); ++i) any_dense |= !is_moe_layer(i);
  if (any_dense) positive(intermediate_size, "intermediate_size");
  if (n_routed_experts > 0) {
    positive(moe_intermediate_size, "moe_intermediate_size");
    positive(num_experts_per_tok, "num_experts_per_tok");
    positive(n_group, "n_group");
    positive(topk_group, "topk_group");
    DSV3_CHECK(n_shared_experts >= 0, s << ": model key 'n_shared_experts' must be >= 0");
    DSV3_CHECK(n_routed_experts % n_group == 0, s << ": model key 'n_routed_experts' (" << n_routed_experts
                                                  << ") must be divisible by n_group (" << n_group << ")");
    DSV3_CHECK(topk_group <= n_group,
               s << ": model key 'topk_group' (" << topk_group << ") must be <= n_group (" << n_group << ")");
    DSV3_CHECK(num_experts_per_tok <= topk_group * (n_routed_experts / n_group),
               s << ": model key 'num_experts_per_tok' (" << num_experts_per_tok << ") exceeds the experts in the "
                 << topk_group << " kept groups (" << topk_group * (n_routed_experts / n_group) << ")");
    DSV3_CHECK(route_nodes >= 1 && n_routed_experts % route_nodes == 0,
               "moe.nodes: the " << n_routed_experts << " routed experts cannot be split evenly over " << route_nodes
                                 << " nodes");
    if (route_max_nodes > 0) {  // node-limited routing: the deck's moe.max_nodes over moe.nodes
      const int64_t N = route_nodes, M = route_max_nodes, E = n_routed_experts, K = num_experts_per_tok;
      DSV3_CHECK(n_group == 1 || n_group % N == 0,
                 "moe.max_nodes: the " << n_group << " expert groups (model n_group) do not nest in the " << N
                                       << " nodes (n_group must be 1 or a multiple of moe.nodes)");
      // the experts left after both limits: whole groups of the kept nodes
      const int64_t kept_groups = n_group == 1 ? 1 : std::min(topk_group, M * (n_group / N));
      const int64_t left = n_group == 1 ? std::min(M, N) * (E / N) : kept_groups * (E / n_group);
      DSV3_CHECK(K <= left, "moe.max_nodes = " << M << ": a token's " << K << " experts (num_experts_per_tok) do not fit "
                                               << "in the " << left << " experts the limit leaves (" << std::min(M, N)
                                               << " of " << N << " nodes of " << E / N << " experts"
                                               << (n_group > 1 ? ", within the kept groups)" : ")"));
      DSV3_CHECK(K / M <= 32, "moe.max_nodes = " << M << ": num_experts_per_tok / max_nodes = " << K / M
                                                 << " exceeds 32 (the node score's top-k)");
    }
    DSV3_CHECK(scoring_func == "sigmoid",
               s << ": model key 'scoring_func' = '" << scoring_func << "' is not supported (DeepSeek-V3: sigmoid)");
    DSV3_CHECK(topk_method == "noaux_tc", s << ": model key 'topk_method' = '" << topk_method
                                            << "' is not supported (DeepSeek-V3: noaux_tc)");
    DSV3_CHECK(routed_scaling_factor > 0, s << ": model key 'routed_scaling_factor' must be > 0");
  }
  if (!rope_scaling.type.empty()) {
    DSV3_CHECK(rope_scaling.type == "yarn",
               s << ": model key 'rope_scaling.type' = '" << rope_scaling.type << "' is not supported (yarn)");
    DSV3_CHECK(rope_scaling.factor >= 1, s << ": model key 'rope_scaling.factor' must be >= 1");
    DSV3_CHECK(rope_scaling.original_max_position_embeddings > 0,
               s << ": model key 'rope_scaling.original_max_position_embeddings' must be > 0");
    DSV3_CHECK(rope_scaling.beta_fast > rope_scaling.beta_slow,
               s << ": model keys 'rope_scaling.beta_fast' must exceed 'rope_scaling.beta_slow'");
  }
  // Fuzzing fix: the derived sizes (qk_head_dim, heads x head dims, ...) and every parameter tensor's element
  // count (build_param_table) used to overflow int64 -- undefined behaviour -- for sizes like hidden_size = 2^32.
  // Each product is checked here, so everything downstream can use plain int64 arithmetic.
  auto add = [&](int64_t a, int64_t b, const char* what) {
    int64_t r = 0;
    DSV3_CHECK(!__builtin_add_overflow(a, b, &r), s << ": model sizes overflow int64: " << what << " = " << a << " + " << b);
    return r;
  };
  auto fits = [&](std::initializer_list<int64_t> dims, const char* what) {
    int64_t n = 1;
    bool overflow = false;
    for (int64_t d : dims) overflow |= __builtin_mul_overflow(n, d, &n);
    if (!overflow) return;
    std::ostringstream shape;
    for (int64_t d : dims) shape << (shape.tellp() > 0 ? " x " : "") << d;
    DSV3_FAIL(s << ": model sizes overflow int64: " << what << " has " << shape.str() << " elements");
  };
  const int64_t qk = add(qk_nope_head_dim, qk_rope_head_dim, "qk_head_dim (qk_nope_head_dim + qk_rope_head_dim)");
  const int64_t H = num_attention_heads, D = hidden_size;
  fits({H, qk}, "num_attention_heads x qk_head_dim");
  if (q_lora_rank > 0) {
    fits({q_lora_rank, D}, "q_a_proj (q_lora_rank x hidden_size)");
    fits({H, qk, q_lora_rank}, "q_b_proj (num_attention_heads x qk_head_dim x q_lora_rank)");
  } else {
    fits({H, qk, D}, "q_proj (num_attention_heads x qk_head_dim x hidden_size)");
  }
  fits({add(kv_lora_rank, qk_rope_head_dim, "kv_lora_rank + qk_rope_head_dim"), D},
       "kv_a_proj_with_mqa ((kv_lora_rank + qk_rope_head_dim) x hidden_size)");
  fits({H, add(qk_nope_head_dim, v_head_dim, "qk_nope_head_dim + v_head_dim"), kv_lora_rank},
       "kv_b_proj (num_attention_heads x (qk_nope_head_dim + v_head_dim) x kv_lora_rank)");
  fits({D, H, v_head_dim}, "o_proj (hidden_size x num_attention_heads x v_head_dim)");
  fits({vocab_size, D}, "embed_tokens / lm_head (vocab_size x hidden_size)");
  fits({D, 2, D}, "eh_proj (hidden_size x 2 hidden_size)");
  if (any_dense) fits({intermediate_size, D}, "dense MLP (intermediate_size x hidden_size)");
  if (n_routed_experts > 0) {
    fits({n_routed_experts, moe_intermediate_size, D}, "routed experts (n_routed_experts x moe_intermediate_size x hidden_size)");
    fits({moe_intermediate_size, n_shared_experts, D}, "shared experts (moe_intermediate_size x n_shared_experts x hidden_size)");
  }
  fits({max_position_embeddings, qk_rope_head_dim}, "RoPE table (max_position_embeddings x qk_rope_head_dim)");
  // Fuzzing note: max_position_embeddings = 10^12 passed every check and make_rope_table then tried to allocate it.
  int64_t rope_bytes = 0;
  if (__builtin_mul_overflow(max_position_embeddings * qk_rope_head_dim, int64_t(4), &rope_bytes) ||
      rope_bytes > kMaxRopeTableBytes)
    DSV3_FAIL(s << ": model key 'max_position_embeddings' = " << max_position_embeddings << " needs a RoPE table of "
                << (double)max_position_embeddings * qk_rope_head_dim * 4 / (1 << 30) << " GiB ("
                << max_position_embeddings << " positions x qk_rope_head_dim " << qk_rope_head_dim
                << " floats), more than dsv3's bound of " << (kMaxRopeTableBytes >> 30) << " GiB ("
                << kMaxRopeTableBytes / (qk_rope_head_dim * 4) << " positions at this qk_rope_head_dim; DeepSeek-V3 has "
                   "163840)");
  DSV3_CHECK(!tie_word_embeddings, s << ": model key 'tie_word_embeddings' = true is not supported (DeepSeek-V3: false)");
  DSV3_CHECK(rope_interleave, s << ": model key 'rope_interleave' = false is not supported: dsv3 applies the "
                                   "interleaved RoPE of the released weights as stored");
}

}  // namespace dsv3
