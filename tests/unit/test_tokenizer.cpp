// tests: byte-level BPE tokenizer (tokenizer.json loading, pre-tokenizer, merges, special tokens,
// decode, errors) and the BPE trainer (format, determinism). Expected ids were checked with Hugging Face
// `tokenizers` 0.23; validation/tokenizer_check.py compares the whole corpus.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/tokenizer.h"

using namespace dsv3;
using ::testing::HasSubstr;
using Ids = std::vector<int64_t>;

namespace {

// A hand-made tokenizer: ids can be followed by hand through the merges.
const char* kHand = R"json({"version":"1.0",
 "added_tokens":[{"id":21,"content":"<|sp|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
 "normalizer":null,
 "pre_tokenizer":{"type":"Sequence","pretokenizers":[
   {"type":"Split","pattern":{"Regex":"\\p{N}{1,3}"},"behavior":"Isolated","invert":false},
   {"type":"Split","pattern":{"Regex":" ?\\p{L}+|\\s+"},"behavior":"Isolated","invert":false},
   {"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":false}]},
 "post_processor":null,
 "decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},
 "model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,
  "fuse_unk":false,"byte_fallback":false,
  "vocab":{"h":0,"e":1,"l":2,"o":3,"Ġ":4,"w":5,"r":6,"d":7,"he":8,"ll":9,"hell":10,"hello":11,"Ġw":12,"or":13,
           "Ġwor":14,"ld":15,"Ġworld":16,"1":17,"2":18,"3":19,"12":20},
  "merges":["h e","l l","he ll","hell o","Ġ w","o r","Ġw or","l d","Ġwor ld","1 2"]}})json";

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

const Tokenizer& corpus_tokenizer() {
  static const Tokenizer t = Tokenizer::load(DSV3_SOURCE_DIR "/data/tokenizer.json");
  return t;
}

std::vector<std::string> corpus_texts() {
  std::vector<std::string> v;
  std::ifstream f(DSV3_SOURCE_DIR "/data/corpus.jsonl");
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) v.push_back(nlohmann::json::parse(line)["text"].get<std::string>());
  return v;
}

}  // namespace

TEST(Tokenizer, HandCheckedMerges) {
  const Tokenizer t = Tokenizer::from_json_text(kHand, "hand.json");
  EXPECT_EQ(t.encode("hello world"), (Ids{11, 16}));  // h e -> he, l l -> ll, he ll, hell o; Ġ w, o r, Ġw or, l d, ...
  EXPECT_EQ(t.encode("hold"), (Ids{0, 3, 15}));       // only l d applies
  EXPECT_EQ(t.encode("lll"), (Ids{9, 2}));            // equal ranks: leftmost first
  EXPECT_EQ(t.encode("hello!"), (Ids{11}));           // '!' has no token and there is no unk: dropped
  // digits in groups of three, then the letter/space split; the special token is matched first
  EXPECT_EQ(t.encode("123123 hello<|sp|>world"), (Ids{20, 19, 20, 19, 4, 11, 21, 5, 13, 15}));
  EXPECT_EQ(t.encode("1212"), (Ids{20, 17, 18}));  // "121" "2"
  EXPECT_EQ(t.decode(Ids{11, 16, 21, 0}), "hello world<|sp|>h");
  EXPECT_EQ(t.decode(Ids{11, 16, 21, 0}, true), "hello worldh");
  EXPECT_EQ(t.vocab_size(), 22);
  EXPECT_EQ(t.token_to_id("<|sp|>"), 21);
  EXPECT_EQ(t.token_to_id("Ġworld"), 16);
  EXPECT_FALSE(t.token_to_id("nope"));
  EXPECT_TRUE(t.is_special(21));
  EXPECT_FALSE(t.is_special(11));
  EXPECT_THROW(t.decode(Ids{22}), Error);
  // merges as [a, b] pairs load the same
  auto j = nlohmann::json::parse(kHand);
  for (auto& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    m = nlohmann::json::array({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
  }
  EXPECT_EQ(Tokenizer::from_json_text(j.dump(), "pairs.json").encode("123123 hello<|sp|>world"),
            t.encode("123123 hello<|sp|>world"));
}

TEST(Tokenizer, CorpusTokenizerMatchesHuggingFace) {
  const Tokenizer& t = corpus_tokenizer();
  EXPECT_EQ(t.vocab_size(), 4096);
  EXPECT_EQ(t.token_to_id(kBosToken), 0);
  EXPECT_EQ(t.token_to_id(kEosToken), 1);
  EXPECT_EQ(t.encode("To be, or not to be: that is the question."),
            (Ids{413, 312, 46, 542, 323, 295, 312, 60, 333, 325, 270, 2000, 48}));
  EXPECT_EQ(t.encode("Hello, world! 12345"), (Ids{74, 411, 113, 46, 875, 35, 34, 51, 52, 53, 54, 55}));
  EXPECT_EQ(t.encode("日本語 and café"), (Ids{232, 153, 167, 232, 158, 174, 234, 172, 160, 296, 284, 99, 104, 197, 171}));
  EXPECT_EQ(t.encode(" \n\n  x"), (Ids{34, 303, 34, 34, 122}));
  EXPECT_EQ(t.id_to_token(2000), "Ġquestion");
}

TEST(Tokenizer, SpecialTokens) {
  const Tokenizer& t = corpus_tokenizer();
  const std::string text = std::string(kBosToken) + "Hi there" + kEosToken + kEosToken;
  const Ids ids = t.encode(text);
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids.front(), 0);
  EXPECT_EQ(ids[ids.size() - 2], 1);
  EXPECT_EQ(ids.back(), 1);
  EXPECT_EQ(t.decode(ids), text);
  EXPECT_EQ(t.decode(ids, true), "Hi there");
  // a prefix of a special token is ordinary text
  const Ids partial = t.encode("<｜begin▁of");
  EXPECT_EQ(std::count(partial.begin(), partial.end(), 0), 0);
}

TEST(Tokenizer, RoundTrip) {
  const Tokenizer& t = corpus_tokenizer();
  const auto texts = corpus_texts();
  ASSERT_GT(texts.size(), 200u);
  for (size_t i = 0; i < texts.size(); ++i) ASSERT_EQ(t.decode(t.encode(texts[i])), texts[i]) << "document " << i;
  for (const std::string s : {"", " ", "\n\n\t", "naïve café — “quotes” ½", "日本語のテキスト 中文", "😀👍🏽 👨‍👩‍👧",
                              "e\u0301 a\u0308", "NBSP\u00a0\u2003\u3000\u0085", "x  \n  y   ", "١٢٣ ①②③"})
    EXPECT_EQ(t.decode(t.encode(s)), s);
  // bytes of a split character decode to U+FFFD
  const Ids e = t.encode("é");
  ASSERT_EQ(e.size(), 2u);
  EXPECT_EQ(t.decode(Ids{e[0]}), "\xEF\xBF\xBD");
  EXPECT_THROW(t.encode("bad \xC3\x28 utf8"), Error);
}

TEST(Tokenizer, LoadErrorsNameTheFile) {
  auto expect_error = [](const std::string& text, const std::string& what) {
    try {
      Tokenizer::from_json_text(text, "tok.json");
      ADD_FAILURE() << what;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("tok.json"));
      EXPECT_THAT(e.what(), HasSubstr(what));
    }
  };
  expect_error("{not json", "not valid JSON");
  expect_error("{}", "model");
  auto j = nlohmann::json::parse(kHand);
  auto bad = j;
  bad["normalizer"] = {{"type", "NFC"}};
  expect_error(bad.dump(), "normalizer");
  bad = j;
  bad["model"]["merges"].push_back("x y");
  expect_error(bad.dump(), "not in the vocab");
  bad = j;
  bad["model"]["merges"].push_back("abc");
  expect_error(bad.dump(), "is not \"a b\"");
  bad = j;
  bad["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithNext";
  expect_error(bad.dump(), "MergedWithNext");
  bad = j;
  bad["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  expect_error(bad.dump(), "regex does not compile");
  bad = j;
  bad["pre_tokenizer"] = nullptr;
  expect_error(bad.dump(), "ByteLevel");
  bad = j;
  bad["added_tokens"][0]["lstrip"] = true;
  expect_error(bad.dump(), "lstrip");
  EXPECT_THROW(Tokenizer::load("/nonexistent/tokenizer.json"), Error);
}

TEST(Tokenizer, TrainerIsDeterministicAndLoadable) {
  std::vector<std::string> texts;
  for (int i = 0; i < 60; ++i)
    texts.push_back("The quick brown fox " + std::to_string(i * 37) + " jumps over the lazy dog; the dog sleeps. " +
                    "Thy thou thee, wherefore art thou? 日本語 テキスト");
  BpeTrainerOptions o;
  o.vocab_size = 300;
  const std::string a = train_bpe(texts, o), b = train_bpe(texts, o);
  EXPECT_EQ(a, b);
  const Tokenizer t = Tokenizer::from_json_text(a, "trained");
  EXPECT_EQ(t.vocab_size(), 300);
  EXPECT_EQ(t.token_to_id(kBosToken), 0);
  EXPECT_EQ(t.token_to_id(kEosToken), 1);
  EXPECT_EQ(t.token_to_id("Ġ"), 2 + ' ');  // byte tokens follow the specials in byte order
  EXPECT_TRUE(t.token_to_id("Ġthe"));
  for (const auto& s : texts) EXPECT_EQ(t.decode(t.encode(s)), s);
  EXPECT_LT(t.encode(texts[0]).size(), texts[0].size() / 2);  // it does compress
  const auto j = nlohmann::json::parse(a);
  EXPECT_EQ(j["pre_tokenizer"]["pretokenizers"].size(), 4u);
  EXPECT_EQ(j["pre_tokenizer"]["pretokenizers"][2]["pattern"]["Regex"], deepseek_v3_split_regexes()[2]);
  EXPECT_EQ(j["model"]["merges"].size(), 300u - 258u);
  EXPECT_THROW(train_bpe(texts, BpeTrainerOptions{.vocab_size = 100}), Error);
}

TEST(Tokenizer, DataTokenizerIsTheTrainersOutput) {
  // data/tokenizer.json = dsv3-train-tokenizer --input data/corpus.jsonl --vocab-size 4096 (regenerate it
  // when the trainer changes)
  BpeTrainerOptions o;
  o.vocab_size = 4096;
  EXPECT_EQ(train_bpe(corpus_texts(), o), slurp(DSV3_SOURCE_DIR "/data/tokenizer.json"));
}
