// tests: inputs the libFuzzer targets (tests/fuzz/) found or that the hardening review derived from them: each used
// to crash (signal, sanitizer report), hang, allocate without bound or escape as a non-dsv3 exception; each must now
// be a one-line dsv3::Error naming the problem (or, where the input is legal, be handled without the bug).
// The fuzz target and the fixed source are named in each test.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/deck.h"
#include "core/error.h"
#include "data/tokenizer.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/params.h"

using ::testing::HasSubstr;
using nlohmann::json;

namespace {

std::string tmp_dir() {
  std::string t = ::testing::TempDir() + "dsv3_fuzzreg_XXXXXX";
  std::vector<char> buf(t.begin(), t.end());
  buf.push_back('\0');
  const char* d = ::mkdtemp(buf.data());
  EXPECT_NE(d, nullptr);
  return d ? std::string(d) : std::string();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

std::string safetensors_bytes(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

std::string nested(size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

json tiny_config() {
  std::ifstream f(std::string(DSV3_TEST_DIR) + "/golden/tiny/config.json");
  return json::parse(f);
}

// The message of the dsv3::Error fn throws ("" and a test failure when it throws nothing or something else).
template <class F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const dsv3::Error& e) {
    const std::string m = e.what();
    EXPECT_EQ(m.find('\n'), std::string::npos) << "multi-line error: " << m;
    return m;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected dsv3::Error, got " << typeid(e).name() << ": " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected dsv3::Error, nothing was thrown";
  return "";
}

dsv3::ModelConfig config_with(const json& patch) {
  json j = tiny_config();
  j.merge_patch(patch);
  return dsv3::model_config_from_json(j, "fuzz-config.json");
}

}  // namespace

// fuzz_config / fuzz_deck, src/model/config.cpp read_key: integers were converted through double, undefined
// behaviour outside int64 (UBSan: "1e+30 is outside the range of representable values of type 'long'").
TEST(FuzzRegressions, ConfigIntegerOutsideInt64IsAnError) {
  EXPECT_THAT(error_of([] { config_with({{"kv_lora_rank", 1e30}}); }),
              HasSubstr("config key 'kv_lora_rank' must be an integer (fitting in int64), got 1e+30"));
  EXPECT_THAT(error_of([] { config_with({{"num_hidden_layers", 18446744073709551615ull}}); }),
              HasSubstr("config key 'num_hidden_layers' = 18446744073709551615 does not fit in int64"));
  EXPECT_THAT(error_of([] { config_with({{"vocab_size", 9223372036854775808.0}}); }),
              HasSubstr("config key 'vocab_size' must be an integer (fitting in int64)"));
  EXPECT_THAT(error_of([] { config_with({{"hidden_size", 64.5}}); }), HasSubstr("must be an integer"));
  // integers are read exactly now (they were rounded to a double), integral floats still accepted
  EXPECT_EQ(config_with({{"max_position_embeddings", 9007199254740993}}).max_position_embeddings, 9007199254740993);
  EXPECT_EQ(config_with({{"vocab_size", 9223372036854775807}}).vocab_size, std::numeric_limits<int64_t>::max());
  EXPECT_EQ(config_with({{"num_hidden_layers", 4.0}}).num_hidden_layers, 4);
}

// fuzz_config, src/model/config.cpp validate + src/model/params.cpp: sizes whose products overflow int64
// (UBSan: "signed integer overflow: 4294967296 * 4294967296" in ParamSpec::numel).
TEST(FuzzRegressions, ConfigSizesOverflowingInt64AreAnError) {
  EXPECT_THAT(error_of([] { config_with({{"hidden_size", 4294967296}, {"intermediate_size", 4294967296}}).validate(); }),
              HasSubstr("model sizes overflow int64"));
  EXPECT_THAT(error_of([] { config_with({{"vocab_size", 9223372036854775807}}).validate(); }),
              HasSubstr("model sizes overflow int64: embed_tokens / lm_head (vocab_size x hidden_size)"));
  EXPECT_THAT(error_of([] { config_with({{"qk_nope_head_dim", 9223372036854775807}}).validate(); }),
              HasSubstr("qk_head_dim (qk_nope_head_dim + qk_rope_head_dim)"));
  EXPECT_THAT(error_of([] { config_with({{"max_position_embeddings", 9223372036854775807}}).validate(); }),
              HasSubstr("RoPE table"));
}

// count_params: every tensor fits, their sum does not (embed_tokens and lm_head are 2^62 elements each).
TEST(FuzzRegressions, ParameterCountOverflowIsAnError) {
  const dsv3::ModelConfig c = config_with({{"vocab_size", int64_t(1) << 32}, {"hidden_size", int64_t(1) << 30}});
  c.validate();
  EXPECT_THAT(error_of([&] { dsv3::count_params(c); }), HasSubstr("parameter count overflows int64"));
}

// fuzz_config: num_hidden_layers = 10^12 hung in validate() (a loop over the layers), then build_param_table.
TEST(FuzzRegressions, ConfigHugeLayerCountIsAnErrorNotAHang) {
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THAT(error_of([] { config_with({{"num_hidden_layers", 1000000000000}}).validate(); }),
              HasSubstr("'num_hidden_layers' = 1000000000000 is larger than dsv3 supports"));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
}

// fuzz_config: weight_block_size 2^32+16 was truncated to 16 by get<int>().
TEST(FuzzRegressions, ConfigBlockSizeBeyondIntIsAnError) {
  EXPECT_THAT(error_of([] { config_with({{"quantization_config", {{"weight_block_size", {4294967312ull, 16}}}}}); }),
              HasSubstr("weight_block_size must be two positive integers, got [4294967312,16]"));
}

// fuzz_config / fuzz_safetensors / fuzz_tokenizer: JSON nested ~10^5 deep overflowed the stack in nlohmann's
// recursive dump() / copy (ASan: stack-overflow in serializer::dump).
TEST(FuzzRegressions, DeeplyNestedJsonIsAnErrorNotAStackOverflow) {
  const std::string deep = nested(200000);
  EXPECT_THAT(error_of([&] { dsv3::model_config_from_json(json::parse("{\"vocab_size\": " + deep + "}"), "cfg"); }),
              HasSubstr("config key 'vocab_size' must be an integer (fitting in int64), got a nested array"));

  const std::string dir = tmp_dir();
  const std::string st = dir + "/deep.safetensors";
  write_bytes(st, safetensors_bytes("{\"x\":{\"dtype\":\"F32\",\"shape\":" + deep + ",\"data_offsets\":[0,0]}}"));
  EXPECT_THAT(error_of([&] { dsv3::SafetensorsFile f(st); }), HasSubstr("header nests arrays/objects more than 64 levels"));

  EXPECT_THAT(error_of([&] { dsv3::Tokenizer::from_json_text("{\"normalizer\": " + deep + ", \"model\": {}}", "tok.json"); }),
              HasSubstr("tok.json: arrays/objects nested more than 64 levels deep"));
  EXPECT_THAT(error_of([&] { dsv3::Tokenizer::from_json_text("{\"model\": {\"vocab\": {}, \"merges\": []}, "
                                                             "\"pre_tokenizer\": " + deep + "}", "tok.json"); }),
              HasSubstr("nested more than 64 levels deep"));
}

// fuzz_hf_index, src/io/hf_checkpoint.cpp: an F8_E4M3 tensor [2^63-1, 0] (0 bytes, legal) overflowed
// fp8_num_blocks (UBSan: "9223372036854775807 + 127 cannot be represented") and then looped over 2^63 empty rows.
TEST(FuzzRegressions, EmptyFp8TensorWithHugeRowCountLoadsWithoutOverflow) {
  const std::string dir = tmp_dir();
  const std::string header =
      "{\"q\":{\"dtype\":\"F8_E4M3\",\"shape\":[9223372036854775807,0],\"data_offsets\":[0,0]},"
      "\"q_scale_inv\":{\"dtype\":\"F32\",\"shape\":[72057594037927936,0],\"data_offsets\":[0,0]},"
      "\"r\":{\"dtype\":\"F8_E4M3\",\"shape\":[9223372036854775807,0],\"data_offsets\":[0,0]},"
      "\"r_scale_inv\":{\"dtype\":\"F32\",\"shape\":[72057594037927935,0],\"data_offsets\":[0,0]}}";
  write_bytes(dir + "/model.safetensors", safetensors_bytes(header));
  const dsv3::HfCheckpoint ck(dir, {128, 128});
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(ck.load_f32("q").empty());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  EXPECT_THAT(error_of([&] { ck.load_f32("r"); }),
              HasSubstr("scale_inv tensor 'r_scale_inv' has shape [72057594037927935, 0], expected [72057594037927936, 0]"));
}

// fuzz_tokenizer, src/data/tokenizer.cpp: one vocab id of 2^31-2 made the loader allocate dense id tables of
// 2^31 entries (ASan: allocator is out of memory trying to allocate 0xfffffffe0 bytes).
TEST(FuzzRegressions, TokenizerWithHugeSparseIdIsAnError) {
  const std::string text = R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 2147483646}, "merges": []},
                              "pre_tokenizer": {"type": "ByteLevel"}})";
  EXPECT_THAT(error_of([&] { dsv3::Tokenizer::from_json_text(text, "tok.json"); }),
              HasSubstr("tok.json: largest token id 2147483646 is far beyond the 2 tokens"));
  // a few unused ids stay legal
  const std::string holes = R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1000}, "merges": []},
                               "pre_tokenizer": {"type": "ByteLevel"}})";
  EXPECT_EQ(dsv3::Tokenizer::from_json_text(holes, "tok.json").vocab_size(), 1001);
}

// fuzz_deck, src/core/deck.cpp Deck::deserialize: an entry count beyond unsigned long escaped as std::out_of_range;
// a field length of "-1" wrapped the bounds check around.
TEST(FuzzRegressions, CorruptSerializedDeckIsAnError) {
  EXPECT_THAT(error_of([] { dsv3::Deck::deserialize("dsv3-deck-v123:999999999999999999999995:x"); }),
              HasSubstr("corrupt serialized deck (bad entry count)"));
  EXPECT_THAT(error_of([] { dsv3::Deck::deserialize("dsv3-deck-v11:1-1:x"); }),
              HasSubstr("corrupt serialized deck (truncated at byte"));
}

// fuzz_deck (property: resolved_text() parses back to the same values), src/core/deck.cpp overrides: the override
// `run.name="xbias_update_stop_tokens = ` (found by fuzz_deck; seed overrides-quote) was stored as
// '"xbias_update_stop_tokens =' and written by resolved_text() as an unterminated quote that no longer parsed.
TEST(FuzzRegressions, OverrideValueThatDeckTextCannotExpressIsAnError) {
  const std::vector<std::string> fuzzed = {"train.iters=5", "model.hidden_size=38", "run.name=\"xbias_update_stop_tokens = "};
  EXPECT_THAT(error_of([&] { dsv3::Deck::parse_text("", "fuzz.deck", fuzzed); }),
              HasSubstr("bad override 'run.name=\"xbias_update_stop_tokens = ' on the command line: unbalanced quote"));
  EXPECT_THAT(error_of([] { dsv3::Deck::defaults_only({"run.name=a\"b#c"}); }), HasSubstr("unbalanced quote"));
  EXPECT_THAT(error_of([] { dsv3::Deck::defaults_only({"run.name=a\nb"}); }),
              HasSubstr("bad override of key 'run.name' on the command line: the value contains a line break"));
  // what deck text can express still works, and round-trips through resolved_text()
  for (const char* v : {"a\"b", "\"a#b\"", "\"a\"b\"", "plain"}) {
    const dsv3::Deck d = dsv3::Deck::defaults_only({std::string("run.name=") + v});
    const dsv3::Deck back = dsv3::Deck::parse_text(d.resolved_text(), "resolved");
    EXPECT_EQ(back.get<std::string>("run.name"), d.get<std::string>("run.name")) << v;
  }
}
