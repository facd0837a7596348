// libFuzzer target: the tokenizer.json loader and the encoder/decoder (src/data/tokenizer.cpp).
// Byte 0 (mod 3) picks the mode, the rest is:
//   0  a tokenizer.json: loaded; when it loads, sample texts (and its own added tokens) are encoded and decoded
//      and every id (up to 4096) decoded
//   1  text for the shipped tokenizer (data/tokenizer.json): valid UTF-8 must encode to in-range ids and decode
//      back to the same text; invalid UTF-8 must be a clean error
//   2  ids for the shipped tokenizer (little-endian uint16 each, minus 16: some negative, some past the vocab):
//      decode must give valid UTF-8 or a clean error for an out-of-range id
#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "fuzz_common.h"

#ifndef DSV3_SOURCE_DIR
#error "DSV3_SOURCE_DIR must name the repository root (for data/tokenizer.json)"
#endif

using namespace dsv3;
using dsv3_fuzz::die;
using dsv3_fuzz::expect_ok_or_error;

namespace {

const Tokenizer& shipped() {
  static const Tokenizer t = Tokenizer::load(DSV3_SOURCE_DIR "/data/tokenizer.json");
  return t;
}

const char* const kSamples[] = {
    "",
    "Hello, world! It's 2024: 12345 tokens.",
    "  leading and trailing spaces  \n\n\ttabs\r\n",
    "\xe4\xbd\xa0\xe5\xa5\xbd\xe4\xb8\x96\xe7\x95\x8c \xe3\x81\x93\xe3\x82\x93\xe3\x81\xab\xe3\x81\xa1\xe3\x81\xaf",
    "emoji \xf0\x9f\x98\x80\xf0\x9f\x91\x8d\xe2\x80\x8d and \xc2\x85 NEL",
    "<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>text<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
};

void use(const Tokenizer& t) {
  std::vector<std::string> texts(std::begin(kSamples), std::end(kSamples));
  const int64_t v = t.vocab_size();
  for (int64_t id = 0; id < v && id < 4096; ++id)
    if (t.is_special(id)) texts.push_back("x" + t.id_to_token(id) + t.id_to_token(id) + "y");
  for (const std::string& s : texts) {
    expect_ok_or_error([&] {  // user regexes may hit PCRE2's match limit: a clean error
      const std::vector<int64_t> ids = t.encode(s);
      for (int64_t id : ids)
        if (id < 0 || id >= v) die("encode produced id " + std::to_string(id) + " outside [0, " + std::to_string(v) + ")");
      (void)t.decode(ids, false);
      (void)t.decode(ids, true);
    });
  }
  std::vector<int64_t> all;
  for (int64_t id = 0; id < v && id < 4096; ++id) {
    all.push_back(id);
    const std::string tok = t.id_to_token(id);
    if (!tok.empty()) {
      const auto back = t.token_to_id(tok);
      if (!back) die("token_to_id does not find token " + std::to_string(id));
    }
  }
  (void)t.decode(all, false);
  (void)t.decode(all, true);
  expect_ok_or_error([&] { (void)t.id_to_token(v); });
  expect_ok_or_error([&] { (void)t.id_to_token(-1); });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string rest(dsv3_fuzz::as_view(data + 1, size - 1));
  switch (data[0] % 3) {
    case 0:
      expect_ok_or_error([&] {
        const Tokenizer t = Tokenizer::from_json_text(rest, "fuzz-tokenizer.json");
        use(t);
      });
      break;
    case 1: {
      const Tokenizer& t = shipped();
      std::vector<int64_t> ids;
      if (!expect_ok_or_error([&] { ids = t.encode(rest); })) break;  // invalid UTF-8: a clean error
      for (int64_t id : ids)
        if (id < 0 || id >= t.vocab_size()) die("shipped tokenizer: id " + std::to_string(id) + " out of range");
      const std::string back = t.decode(ids);
      if (back != rest) die("shipped tokenizer: decode(encode(x)) != x");
      break;
    }
    case 2: {
      const Tokenizer& t = shipped();
      std::vector<int64_t> ids;
      for (size_t i = 0; i + 1 < rest.size(); i += 2)
        ids.push_back(int64_t(uint8_t(rest[i]) | (uint8_t(rest[i + 1]) << 8)) - 16);
      for (bool skip : {false, true}) {
        std::string text;
        if (!expect_ok_or_error([&] { text = t.decode(ids, skip); })) continue;
        // decode promises valid UTF-8 (invalid bytes become U+FFFD): encode() rejects anything else
        try {
          (void)t.encode(text);
        } catch (const Error& e) {
          die(std::string("decode produced text that encode rejects: ") + e.what());
        }
      }
      break;
    }
  }
  return 0;
}
