#include <cctype>
#include <cerrno>
#include <cstring>
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
    errno = 0;
    std::ifstream f(path);
    const int err = errno;
    DSV3_CHECK(f, "model.hf_config = '" << path << "' " << deck.where_set({"model.hf_config"})
                                        << ": cannot open it: " << (err ? std::strerror(err) : "open failed"));
    try {
      j = nlohmann::json::parse(f);
    } catch (const nlohmann::json::exception& e) {
      DSV3_FAIL("model.hf_config = '" << path << "' " << deck.where_set({"model.hf_config"})
                                      << ": not valid JSON: " << e.what());
    }
    source = path;
  }
  bool overridden = false;
  std::vector<const KeySpec*> given;  // the model.* keys the deck sets
  for (const KeySpec& k : deck_keys()) {
    if (k.name.rfind("model.", 0) != 0 || k.name == "model.hf_config" || k.name == "model.hf_weights") continue;
    if (!deck.given(k.name)) continue;
    given.push_back(&k);
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
  try {
    ModelConfig c = model_config_from_json(j, source);
    c.validate();
    return c;
  } catch (const Error& e) {
    // The config module names a key by its HF name (n_group, rope_scaling.factor); when the deck set it, add
    // the deck key, its value and where it was set: "... [model.n_group = 3 at run.deck:12]".
    const std::string msg = e.what();
    auto names = [&](const std::string& word) {  // msg holds word as a whole word
      auto part = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
      for (size_t p = msg.find(word); p != std::string::npos; p = msg.find(word, p + 1))
        if ((p == 0 || !part(msg[p - 1])) && (p + word.size() == msg.size() || !part(msg[p + word.size()])))
          return true;
      return false;
    };
    std::string where;
    for (const KeySpec* k : given) {
      const std::string hf = k->name.substr(6);  // "n_group", "rope_scaling.factor"
      if (!names(hf) && !names(hf.substr(hf.rfind('.') + 1))) continue;
      const std::string o = deck.origin(k->name);
      where += (where.empty() ? " [" : "; ") + k->name + " = " + deck.get<std::string>(k->name) + " " +
               (o == "command line" ? "on the command line" : "at " + o);
    }
    if (where.empty()) throw;
    // before the " (src/model/config.cpp:248)" that DSV3_FAIL ends every message with
    const size_t loc = msg.rfind(" (");
    const bool has_loc = loc != std::string::npos && msg.back() == ')' && msg.find(".cpp:", loc) != std::string::npos;
    throw Error(has_loc ? msg.substr(0, loc) + where + "]" + msg.substr(loc) : msg + where + "]");
  }
}

}  // namespace dsv3
