// defines: dsv3::Tokenizer (Hugging Face tokenizer.json byte-level BPE, DeepSeek-V3's format),
//          dsv3::train_bpe (BPE trainer writing that format), dsv3::deepseek_v3_split_regexes()
// Supported tokenizer.json (what DeepSeek-V3 and GPT-2-style tokenizers use):
//   normalizer    null or an empty Sequence
//   added_tokens  matched first in the raw text (leftmost, longest on ties); lstrip/rstrip/single_word false
//   pre_tokenizer Sequence of Split {pattern Regex|String, behavior Isolated, invert false} and a final
//                 ByteLevel {add_prefix_space, use_regex (GPT-2 pattern)}, or a lone ByteLevel
//   model         BPE: vocab, merges ("a b" strings or [a, b] pairs), unk_token, ignore_merges;
//                 no dropout, continuing_subword_prefix, end_of_word_suffix or byte_fallback
//   decoder       ByteLevel (or null)
//   post_processor is ignored: encode() adds no BOS/EOS (callers add them).
// Regexes run with PCRE2 in UTF + UCP mode (\p{L}, \p{N}, \s Unicode-aware, lookahead), each Split on
// each piece of the previous one, as `tokenizers` does. BPE merges follow `tokenizers`' order (lowest
// rank first, leftmost on ties), so ids match the Hugging Face library (validation/tokenizer_check.py).
// encode()/decode() are const and thread-safe.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3 {

// DeepSeek-V3's special tokens (ids 0 and 1 in its tokenizer and in ours).
inline constexpr const char* kBosToken = "<｜begin▁of▁sentence｜>";
inline constexpr const char* kEosToken = "<｜end▁of▁sentence｜>";

class Tokenizer {
 public:
  static Tokenizer load(const std::string& path);  // errors name the file and the offending field
  // json_text: the content of a tokenizer.json; name is used in errors.
  static Tokenizer from_json_text(const std::string& json_text, const std::string& name);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  std::vector<int64_t> encode(std::string_view text) const;  // UTF-8 text; throws on invalid UTF-8
  // ByteLevel decoding; invalid UTF-8 of partial sequences becomes U+FFFD (as `tokenizers` does).
  std::string decode(std::span<const int64_t> ids, bool skip_special_tokens = false) const;

  int64_t vocab_size() const;                                  // largest id + 1 (model vocab and added tokens)
  std::optional<int64_t> token_to_id(const std::string& token) const;  // a vocab or added token's id
  std::string id_to_token(int64_t id) const;                   // the token as stored (byte-mapped); throws
  bool is_special(int64_t id) const;
  const std::string& name() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The three Split regexes of DeepSeek-V3's pre_tokenizer (digits, CJK runs, the main pattern).
const std::vector<std::string>& deepseek_v3_split_regexes();

struct BpeTrainerOptions {
  int64_t vocab_size = 4096;  // total, special tokens and the 256 byte tokens included
  std::vector<std::string> special_tokens = {kBosToken, kEosToken};  // ids 0, 1, ...
  std::vector<std::string> split_regexes = deepseek_v3_split_regexes();
  int64_t min_frequency = 2;  // pairs seen fewer times are never merged
};

// Trains byte-level BPE on texts and returns a tokenizer.json (the format above, loadable by Hugging Face
// `tokenizers`): special tokens first, then the 256 byte tokens in byte order, then one token per merge.
// Deterministic: ties between equally frequent pairs go to the pair of smaller ids.
std::string train_bpe(std::span<const std::string> texts, const BpeTrainerOptions& opts);

}  // namespace dsv3
