// libFuzzer target: the input deck parser (src/core/deck.cpp) and the model config built from a deck.
// The input selects what it is by its first line:
//   "#!overrides"     the remaining lines are command-line overrides (section.key=value), one per line
//   "dsv3-deck-v1..." a serialized deck (Deck::deserialize, what rank 0 broadcasts)
//   anything else     deck text (Deck::parse_text; includes resolve against the cwd)
// Properties checked on success: resolved_text() parses back to the same values (not for serialized decks, which
// may hold values no deck text can express); serialize() round-trips;
// a deck that sets model.* keys yields a validated ModelConfig whose parameter count does not overflow.
#include <cstdint>
#include <string>
#include <vector>

#include "core/deck.h"
#include "fuzz_common.h"
#include "model/config.h"
#include "model/params.h"

using namespace dsv3;
using dsv3_fuzz::die;
using dsv3_fuzz::expect_ok_or_error;

namespace {

void same_values(const Deck& a, const Deck& b, const char* what) {
  for (const KeySpec& k : deck_keys()) {
    if (a.has(k.name) != b.has(k.name)) die(std::string(what) + ": key " + k.name + " has a value in one deck only");
    if (a.get_or(k.name, "") != b.get_or(k.name, ""))
      die(std::string(what) + ": key " + k.name + " is '" + a.get_or(k.name, "") + "' vs '" + b.get_or(k.name, "") + "'");
  }
}

// round_trip: check resolved_text() (for decks from text and overrides; a corrupt serialized deck may hold any
// value, e.g. one with a line break, that no deck text can express).
void exercise(const Deck& d, bool round_trip = true) {
  if (round_trip) {  // resolved_text() is documented to parse back to the same values
    Deck back;
    try {
      back = Deck::parse_text(d.resolved_text(), "resolved");
    } catch (const Error& e) {
      die(std::string("resolved_text() does not parse back: ") + e.what() + "\n--- resolved text ---\n" + d.resolved_text());
    }
    same_values(d, back, "resolved_text round trip");
  }
  Deck again;
  try {
    again = Deck::deserialize(d.serialize());
  } catch (const Error& e) {
    die(std::string("serialize() does not deserialize: ") + e.what());
  }
  same_values(d, again, "serialize round trip");
  expect_ok_or_error([&] { d.require_keys(); });
  for (const KeySpec& k : deck_keys()) {
    (void)d.origin(k.name);
    if (k.type == KeySpec::Type::Path) (void)d.path(k.name);
  }

  // The model of the deck (only when it names no config file, or names a regular one: never a device).
  bool any_model = false;
  for (const KeySpec& k : deck_keys())
    if (k.name.rfind("model.", 0) == 0 && d.given(k.name)) any_model = true;
  if (!any_model) return;
  if (d.given("model.hf_config")) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(d.path("model.hf_config"), ec)) return;
  }
  expect_ok_or_error([&] {
    const ModelConfig c = model_config_from_deck(d);  // validates
    if (c.num_hidden_layers <= 64) (void)count_params(c);  // larger tables are valid, just slow to build here
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(dsv3_fuzz::as_view(data, size));
  static const std::string kOverrides = "#!overrides\n", kSerial = "dsv3-deck-v1";
  if (in.rfind(kOverrides, 0) == 0) {
    std::vector<std::string> ovs;
    size_t pos = kOverrides.size();
    while (pos <= in.size()) {
      const size_t nl = in.find('\n', pos);
      ovs.push_back(in.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos));
      if (nl == std::string::npos) break;
      pos = nl + 1;
    }
    expect_ok_or_error([&] { exercise(Deck::defaults_only(ovs)); });
    expect_ok_or_error([&] { exercise(Deck::parse_text("[train]\niters = 3\n", "fuzz.deck", ovs)); });
  } else if (in.rfind(kSerial, 0) == 0) {
    expect_ok_or_error([&] { exercise(Deck::deserialize(in), false); });
  } else {
    expect_ok_or_error([&] { exercise(Deck::parse_text(in, "fuzz.deck")); });
  }
  return 0;
}
