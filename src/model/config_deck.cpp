#include <fstream>
#include <nlohmann/json.hpp>

#include "core/deck.h"
#include "core/error.h"
#include "model/config.h"

namespace dsv3 {

ModelConfig model_config_from_deck(const Deck& deck) {
  nlohmann::json j = nlohmann::json::object();
  std::string source = "deck [model]";
  if (deck.given("model.hf_config")) {
    const std::string path = deck.path("model.hf_config");
    std::ifstream f(path);
    DSV3_CHECK(f, "model.hf_config (" << deck.origin("model.hf_config") << "): cannot open '" << path << "'");
    try {
      j = nlohmann::json::parse(f);
    } catch (const nlohmann::json::exception& e) {
      DSV3_FAIL("model.hf_config: '" << path << "' is not valid JSON: " << e.what());
    }
    source = path;
  }
  bool overridden = false;
  for (const KeySpec& k : deck_keys()) {
    if (k.name.rfind("model.", 0) != 0 || k.name == "model.hf_config" || k.name == "model.hf_weights") continue;
    if (!deck.given(k.name)) continue;
    // "model.rope_scaling.factor" -> j["rope_scaling"]["factor"]
    nlohmann::json* dst = &j;
    std::string rest = k.name.substr(6);
    for (size_t dot; (dot = rest.find('.')) != std::string::npos; rest = rest.substr(dot + 1)) {
      dst = &(*dst)[rest.substr(0, dot)];
      if (!dst->is_object()) *dst = nlohmann::json::object();
    }
    switch (k.type) {
      case KeySpec::Type::Int: (*dst)[rest] = deck.get<int64_t>(k.name); break;
      case KeySpec::Type::Float: (*dst)[rest] = deck.get<double>(k.name); break;
      case KeySpec::Type::Bool: (*dst)[rest] = deck.get<bool>(k.name); break;
      default: (*dst)[rest] = deck.get<std::string>(k.name); break;
    }
    overridden = true;
  }
  DSV3_CHECK(deck.given("model.hf_config") || overridden,
             "the deck describes no model: set model.hf_config (an HF config.json) and/or the model.* sizes");
  if (overridden) source += " + deck overrides";
  ModelConfig c = model_config_from_json(j, source);
  c.validate();
  return c;
}

}  // namespace dsv3
