// Byte-level BPE tokenizer (Hugging Face tokenizer.json, DeepSeek-V3's format) and its trainer.
#include "data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <queue>
#include <set>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"

namespace dsv3 {

namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

// ---- UTF-8 -----------------------------------------------------------------------------------------

// Length of the well-formed UTF-8 sequence at s[i] (Unicode table 3-7), or 0 when it is not one.
// *valid_prefix gets how many bytes form a valid prefix (>= 1), for lossy replacement.
size_t utf8_seq(std::string_view s, size_t i, size_t* valid_prefix = nullptr) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  size_t need = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) need = 1;
  else if (c == 0xE0) need = 2, lo = 0xA0;
  else if (c >= 0xE1 && c <= 0xEC) need = 2;
  else if (c == 0xED) need = 2, hi = 0x9F;
  else if (c >= 0xEE && c <= 0xEF) need = 2;
  else if (c == 0xF0) need = 3, lo = 0x90;
  else if (c >= 0xF1 && c <= 0xF3) need = 3;
  else if (c == 0xF4) need = 3, hi = 0x8F;
  size_t k = 1;
  if (need) {
    for (; k <= need && i + k < s.size(); ++k) {
      const unsigned char x = b(i + k);
      if (k == 1 ? (x < lo || x > hi) : (x < 0x80 || x > 0xBF)) break;
    }
  }
  if (valid_prefix) *valid_prefix = k;
  return (need && k == need + 1) ? k : 0;
}

size_t first_invalid_utf8(std::string_view s) {  // npos when valid
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_seq(s, i);
    if (!n) return i;
    i += n;
  }
  return std::string_view::npos;
}

std::string utf8_lossy(std::string_view s) {  // each maximal invalid subpart -> U+FFFD
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t prefix = 1;
    const size_t n = utf8_seq(s, i, &prefix);
    if (n) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += prefix;
    }
  }
  return out;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// GPT-2's byte <-> printable character map (tokenizers' ByteLevel).
struct ByteMap {
  std::string byte_char[256];                // byte -> UTF-8 of its character
  std::unordered_map<uint32_t, uint8_t> cp_byte;  // character -> byte
  ByteMap() {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    std::vector<bool> in(256, false);
    for (int b : bs) in[b] = true;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const uint32_t cp = in[b] ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      append_utf8(byte_char[b], cp);
      cp_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

// Decodes a byte-mapped token back to bytes; false when a character is not in the map.
bool unmap_bytes(std::string_view tok, std::string& out) {
  const auto& m = byte_map();
  std::string tmp;
  for (size_t i = 0; i < tok.size();) {
    const size_t n = utf8_seq(tok, i);
    if (!n) return false;
    uint32_t cp = 0;
    const auto c = static_cast<unsigned char>(tok[i]);
    if (n == 1) cp = c;
    else if (n == 2) cp = ((c & 0x1Fu) << 6) | (tok[i + 1] & 0x3F);
    else return false;  // every mapped character is < U+0800
    const auto it = m.cp_byte.find(cp);
    if (it == m.cp_byte.end()) return false;
    tmp += static_cast<char>(it->second);
    i += n;
  }
  out += tmp;
  return true;
}

// ---- PCRE2 -----------------------------------------------------------------------------------------

// \s / \S outside character classes also cover U+0085 (NEL): Oniguruma (Hugging Face) counts it as
// white space, PCRE2's UCP \s does not.
std::string oniguruma_compat(const std::string& p) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char n = p[i + 1];
      if (!in_class && n == 's') out += "[\\s\\x{85}]";
      else if (!in_class && n == 'S') out += "[^\\s\\x{85}]";
      else if (in_class && n == 's') out += "\\s\\x{85}";
      else out.append(p, i, 2);
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];  // a leading ']' is literal
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

struct Regex {
  pcre2_code* code = nullptr;
  Regex() = default;
  Regex(const std::string& pattern, bool literal, const std::string& where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    const std::string p = literal ? pattern : oniguruma_compat(pattern);
    code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(),
                         PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0), &err, &off, nullptr);
    if (!code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      DSV3_FAIL(where << ": regex does not compile at offset " << off << ": " << reinterpret_cast<char*>(msg));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  Regex(Regex&& o) noexcept : code(std::exchange(o.code, nullptr)) {}
  Regex& operator=(Regex&& o) noexcept {
    std::swap(code, o.code);
    return *this;
  }
  ~Regex() {
    if (code) pcre2_code_free(code);
  }
  // Split behavior Isolated: every match and every gap between matches is a piece (empty ones dropped).
  void split(std::string_view s, pcre2_match_data* md, std::vector<std::string_view>& out) const {
    size_t pos = 0, prev = 0;
    while (pos <= s.size()) {
      const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, PCRE2_NO_UTF_CHECK, md,
                                 nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        DSV3_FAIL("tokenizer regex match failed: " << reinterpret_cast<char*>(msg));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t b = ov[0], e = ov[1];
      if (e == b) {  // empty match: no piece; step one character
        if (b >= s.size()) break;
        pos = b + std::max<size_t>(1, utf8_seq(s, b));
        continue;
      }
      if (b > prev) out.push_back(s.substr(prev, b - prev));
      out.push_back(s.substr(b, e - b));
      prev = pos = e;
    }
    if (prev < s.size()) out.push_back(s.substr(prev));
  }
};

struct MatchData {
  pcre2_match_data* md;
  MatchData() : md(pcre2_match_data_create(1, nullptr)) {}
  ~MatchData() { pcre2_match_data_free(md); }
};

const char* kGpt2Pattern = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

}  // namespace

// ---- the tokenizer ---------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string name;
  struct Added {
    std::string content;
    int64_t id;
    bool special;
  };
  std::vector<Added> added;  // matched in the raw text before anything else
  std::vector<Regex> splits;
  bool add_prefix_space = false;
  Regex gpt2;  // ByteLevel use_regex
  bool use_gpt2 = false;

  std::unordered_map<std::string, int32_t> vocab;  // byte-mapped token -> id
  std::vector<std::string> id_tok;                 // id -> token ("" for unused ids)
  std::vector<int8_t> id_special;                  // 1: an added token (content stored in id_tok raw)
  std::vector<int8_t> id_added;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, merged id)
  int32_t byte_id[256];
  int32_t unk = -1;
  bool ignore_merges = false;

  // Calls fn(segment, added_index) for the text split at added tokens (added_index -1: ordinary text).
  template <class F>
  void split_added(std::string_view text, F&& fn) const {
    if (added.empty()) {
      if (!text.empty()) fn(text, -1);
      return;
    }
    std::vector<size_t> next(added.size());
    for (size_t k = 0; k < added.size(); ++k) next[k] = text.find(added[k].content);
    size_t pos = 0;
    while (pos < text.size()) {
      int best = -1;
      for (size_t k = 0; k < added.size(); ++k) {
        if (next[k] != std::string_view::npos && next[k] < pos) next[k] = text.find(added[k].content, pos);
        if (next[k] == std::string_view::npos) continue;
        if (best < 0 || next[k] < next[best] ||
            (next[k] == next[best] && added[k].content.size() > added[best].content.size()))
          best = static_cast<int>(k);
      }
      if (best < 0) break;
      if (next[best] > pos) fn(text.substr(pos, next[best] - pos), -1);
      fn(std::string_view(added[best].content), best);
      pos = next[best] + added[best].content.size();
    }
    if (pos < text.size()) fn(text.substr(pos), -1);
  }

  // Calls fn(piece) for each pre-token (raw bytes, before the byte mapping) of an ordinary segment.
  template <class F>
  void pretokenize(std::string_view seg, pcre2_match_data* md, F&& fn) const {
    std::vector<std::string_view> cur{seg}, nxt;
    for (const Regex& r : splits) {
      nxt.clear();
      for (auto p : cur) r.split(p, md, nxt);
      cur.swap(nxt);
    }
    std::string tmp;
    std::vector<std::string_view> sub;
    for (auto p : cur) {
      if (add_prefix_space && (p.empty() || p[0] != ' ')) {
        tmp.assign(1, ' ');
        tmp += p;
        p = tmp;
      }
      if (use_gpt2) {
        sub.clear();
        gpt2.split(p, md, sub);
        for (auto q : sub) fn(q);
      } else {
        fn(p);
      }
    }
  }

  // tokenizers' BPE Word::merge_all: merges by lowest rank, leftmost on ties, with lazy invalidation.
  void bpe(std::string_view piece, std::vector<int64_t>& out) const {
    if (ignore_merges) {
      std::string mapped;
      for (unsigned char c : piece) mapped += byte_map().byte_char[c];
      const auto it = vocab.find(mapped);
      if (it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    struct Sym {
      int32_t c, prev, next;
      bool dead;
    };
    std::vector<Sym> sy;
    sy.reserve(piece.size());
    for (unsigned char b : piece) {
      int32_t id = byte_id[b];
      if (id < 0) {
        if (unk < 0) continue;  // tokenizers drops characters it cannot map when there is no unk token
        id = unk;
      }
      sy.push_back({id, (int32_t)sy.size() - 1, (int32_t)sy.size() + 1, false});
    }
    if (sy.empty()) return;
    sy.back().next = -1;
    if (sy.size() > 1 && !merges.empty()) {
      struct M {
        int32_t rank, pos, id;
        bool operator<(const M& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }  // min-heap
      };
      std::priority_queue<M> q;
      for (size_t i = 0; i + 1 < sy.size(); ++i) {
        const auto it = merges.find(pair_key(sy[i].c, sy[i + 1].c));
        if (it != merges.end()) q.push({it->second.first, (int32_t)i, it->second.second});
      }
      while (!q.empty()) {
        const M top = q.top();
        q.pop();
        Sym& s = sy[top.pos];
        if (s.dead || s.next < 0) continue;
        const int32_t nx = s.next;
        const auto it = merges.find(pair_key(s.c, sy[nx].c));
        if (it == merges.end() || it->second.second != top.id) continue;  // an expired entry
        s.c = top.id;
        sy[nx].dead = true;
        s.next = sy[nx].next;
        if (s.next >= 0) sy[s.next].prev = top.pos;
        if (s.prev >= 0) {
          const auto jt = merges.find(pair_key(sy[s.prev].c, s.c));
          if (jt != merges.end()) q.push({jt->second.first, s.prev, jt->second.second});
        }
        if (s.next >= 0) {
          const auto jt = merges.find(pair_key(s.c, sy[s.next].c));
          if (jt != merges.end()) q.push({jt->second.first, top.pos, jt->second.second});
        }
      }
    }
    for (const Sym& s : sy)
      if (!s.dead) out.push_back(s.c);
  }
};

namespace {

[[noreturn]] void bad(const std::string& name, const std::string& what) { DSV3_FAIL(name << ": " << what); }

std::string jstr(const json& j) { return j.is_string() ? j.get<std::string>() : j.dump(); }

void add_pretokenizer(Tokenizer::Impl& t, const json& p, bool last) {
  const std::string& n = t.name;
  if (!p.is_object() || !p.contains("type")) bad(n, "pre_tokenizer entry without a type: " + p.dump());
  const std::string type = p["type"].get<std::string>();
  if (type == "Split") {
    const json& pat = p.value("pattern", json());
    const std::string behavior = p.value("behavior", std::string("?"));
    if (behavior != "Isolated") bad(n, "pre_tokenizer Split behavior '" + behavior + "' is not supported (only Isolated)");
    if (p.value("invert", false)) bad(n, "pre_tokenizer Split with invert true is not supported");
    if (pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string())
      t.splits.emplace_back(pat["Regex"].get<std::string>(), false, n + ": pre_tokenizer Split " + pat.dump());
    else if (pat.is_object() && pat.contains("String") && pat["String"].is_string())
      t.splits.emplace_back(pat["String"].get<std::string>(), true, n + ": pre_tokenizer Split " + pat.dump());
    else
      bad(n, "pre_tokenizer Split pattern must be {\"Regex\": ...} or {\"String\": ...}, got " + pat.dump());
  } else if (type == "ByteLevel") {
    if (!last) bad(n, "pre_tokenizer ByteLevel must come last in the Sequence");
    t.add_prefix_space = p.value("add_prefix_space", false);
    t.use_gpt2 = p.value("use_regex", true);
    if (t.use_gpt2) t.gpt2 = Regex(kGpt2Pattern, false, n + ": ByteLevel regex");
  } else {
    bad(n, "pre_tokenizer type '" + type + "' is not supported (Split, ByteLevel)");
  }
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  DSV3_CHECK(f.good(), path << ": cannot open tokenizer file");
  std::stringstream ss;
  ss << f.rdbuf();
  return from_json_text(ss.str(), path);
}

Tokenizer Tokenizer::from_json_text(const std::string& text, const std::string& name) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    bad(name, std::string("not valid JSON (") + e.what() + ")");
  }
  if (!j.is_object()) bad(name, "not a tokenizer.json object");
  // Fuzzing fix: the loader copies sub-objects (json::value()) and prints them (dump()) in errors, both recursive
  // per nesting level: a value nested a few hundred thousand deep overflowed the stack. Real tokenizer.json files
  // nest 5 levels; deeper ones are rejected here, by an iterative walk.
  {
    constexpr size_t kMaxDepth = 64;
    std::vector<std::pair<const json*, size_t>> todo{{&j, 0}};
    while (!todo.empty()) {
      const auto [p, depth] = todo.back();
      todo.pop_back();
      if (!p->is_structured()) continue;
      if (depth >= kMaxDepth) bad(name, "arrays/objects nested more than " + std::to_string(kMaxDepth) + " levels deep");
      for (const json& e : *p) todo.emplace_back(&e, depth + 1);
    }
  }
  auto t = std::make_unique<Impl>();
  t->name = name;
  try {
    // normalizer: none
    const json& norm = j.value("normalizer", json());
    if (!norm.is_null() && !(norm.value("type", "") == "Sequence" && norm.value("normalizers", json::array()).empty()))
      bad(name, "normalizer " + norm.dump() + " is not supported (only null)");
    // model
    if (!j.contains("model") || !j["model"].is_object()) bad(name, "no \"model\" object");
    const json& m = j["model"];
    if (m.value("type", std::string("BPE")) != "BPE") bad(name, "model type '" + jstr(m["type"]) + "' is not BPE");
    if (m.contains("dropout") && !m["dropout"].is_null()) bad(name, "model.dropout is not supported");
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (m.contains(k) && !m[k].is_null() && !(m[k].is_string() && m[k].get<std::string>().empty()))
        bad(name, std::string("model.") + k + " is not supported");
    if (m.value("byte_fallback", false)) bad(name, "model.byte_fallback is not supported");
    t->ignore_merges = m.value("ignore_merges", false);
    if (!m.contains("vocab") || !m["vocab"].is_object()) bad(name, "model.vocab is not an object");
    int64_t max_id = -1;
    for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
      if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() >= (1LL << 31))
        bad(name, "model.vocab[\"" + it.key() + "\"] is not a valid id");
      const int64_t id = it.value().get<int64_t>();
      t->vocab[it.key()] = static_cast<int32_t>(id);
      max_id = std::max(max_id, id);
    }
    // added tokens
    for (const json& a : j.value("added_tokens", json::array())) {
      if (!a.is_object() || !a.contains("id") || !a.contains("content") || !a["content"].is_string() ||
          !a["id"].is_number_integer() || a["id"].get<int64_t>() < 0 || a["id"].get<int64_t>() >= (1LL << 31))
        bad(name, "added_tokens entry " + a.dump() + " needs an integer id and a string content");
      for (const char* k : {"lstrip", "rstrip", "single_word"})
        if (a.value(k, false)) bad(name, "added token " + a["content"].get<std::string>() + ": " + k + " is not supported");
      if (a["content"].get<std::string>().empty()) bad(name, "added token with empty content");
      t->added.push_back({a["content"].get<std::string>(), a["id"].get<int64_t>(), a.value("special", false)});
      max_id = std::max(max_id, a["id"].get<int64_t>());
    }
    // Fuzzing fix: the id tables below are dense (max_id + 1 entries), so a single id of 2^31-1 allocated 64 GB.
    // Unused ids are allowed (HF tokenizers have a few), up to 2^20 more than there are tokens.
    const int64_t n_tokens = (int64_t)m["vocab"].size() + (int64_t)t->added.size();
    if (max_id >= n_tokens + (int64_t(1) << 20))
      bad(name, "largest token id " + std::to_string(max_id) + " is far beyond the " + std::to_string(n_tokens) +
                    " tokens (more than 2^20 unused ids): sparse vocabularies are not supported");
    t->id_tok.assign(max_id + 1, std::string());
    t->id_special.assign(max_id + 1, 0);
    t->id_added.assign(max_id + 1, 0);
    for (const auto& [tok, id] : t->vocab) t->id_tok[id] = tok;
    for (const auto& a : t->added) {
      t->id_tok[a.id] = a.content;
      t->id_added[a.id] = 1;
      t->id_special[a.id] = a.special ? 1 : 0;
    }
    // merges
    if (!m.contains("merges") || !m["merges"].is_array()) bad(name, "model.merges is not an array");
    int32_t rank = 0;
    for (const json& mg : m["merges"]) {
      std::string a, b;
      if (mg.is_string()) {
        const std::string s = mg.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          bad(name, "merge " + mg.dump() + " is not \"a b\"");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
        a = mg[0].get<std::string>();
        b = mg[1].get<std::string>();
      } else {
        bad(name, "merge " + mg.dump() + " is neither \"a b\" nor [a, b]");
      }
      const auto ia = t->vocab.find(a), ib = t->vocab.find(b), iab = t->vocab.find(a + b);
      if (ia == t->vocab.end() || ib == t->vocab.end()) bad(name, "merge " + mg.dump() + ": a part is not in the vocab");
      if (iab == t->vocab.end()) bad(name, "merge " + mg.dump() + ": the merged token is not in the vocab");
      t->merges.try_emplace(pair_key(ia->second, ib->second), rank, iab->second);  // first occurrence wins
      ++rank;
    }
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      const auto it = t->vocab.find(m["unk_token"].get<std::string>());
      if (it == t->vocab.end()) bad(name, "model.unk_token is not in the vocab");
      t->unk = it->second;
    }
    for (int b = 0; b < 256; ++b) {
      const auto it = t->vocab.find(byte_map().byte_char[b]);
      t->byte_id[b] = it == t->vocab.end() ? -1 : it->second;
    }
    // pre-tokenizer
    const json& pre = j.value("pre_tokenizer", json());
    bool byte_level = false;
    auto note = [&](const json& p) { byte_level |= p.is_object() && p.value("type", "") == "ByteLevel"; };
    if (pre.is_object() && pre.value("type", "") == "Sequence") {
      const json& ps = pre.value("pretokenizers", json::array());
      for (size_t i = 0; i < ps.size(); ++i) {
        add_pretokenizer(*t, ps[i], i + 1 == ps.size());
        note(ps[i]);
      }
    } else if (pre.is_object()) {
      add_pretokenizer(*t, pre, true);
      note(pre);
    }
    if (!byte_level) bad(name, "pre_tokenizer has no ByteLevel step (only byte-level BPE is supported)");
    const json& dec = j.value("decoder", json());
    if (!dec.is_null() && dec.value("type", "") != "ByteLevel")
      bad(name, "decoder " + dec.dump() + " is not supported (only ByteLevel)");
  } catch (const json::exception& e) {
    bad(name, std::string("unexpected tokenizer.json structure (") + e.what() + ")");
  }
  return Tokenizer(std::move(t));
}

std::vector<int64_t> Tokenizer::encode(std::string_view text) const {
  const size_t badpos = first_invalid_utf8(text);
  DSV3_CHECK(badpos == std::string_view::npos,
             "tokenizer " << impl_->name << ": input is not valid UTF-8 (byte offset " << badpos << ")");
  std::vector<int64_t> out;
  out.reserve(text.size() / 3 + 4);
  MatchData md;
  impl_->split_added(text, [&](std::string_view seg, int added) {
    if (added >= 0) {
      out.push_back(impl_->added[added].id);
      return;
    }
    impl_->pretokenize(seg, md.md, [&](std::string_view piece) { impl_->bpe(piece, out); });
  });
  return out;
}

std::string Tokenizer::decode(std::span<const int64_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  for (int64_t id : ids) {
    DSV3_CHECK(id >= 0 && id < (int64_t)impl_->id_tok.size(),
               "tokenizer " << impl_->name << ": cannot decode id " << id << " (vocab size " << impl_->id_tok.size() << ")");
    if (impl_->id_added[id]) {
      if (!(skip_special_tokens && impl_->id_special[id])) bytes += impl_->id_tok[id];
      continue;
    }
    const std::string& tok = impl_->id_tok[id];
    if (!unmap_bytes(tok, bytes)) bytes += tok;  // not byte-mapped: as is (like tokenizers' ByteLevel decoder)
  }
  return utf8_lossy(bytes);
}

int64_t Tokenizer::vocab_size() const { return (int64_t)impl_->id_tok.size(); }

std::optional<int64_t> Tokenizer::token_to_id(const std::string& token) const {
  for (const auto& a : impl_->added)
    if (a.content == token) return a.id;
  const auto it = impl_->vocab.find(token);
  if (it == impl_->vocab.end()) return std::nullopt;
  return it->second;
}

std::string Tokenizer::id_to_token(int64_t id) const {
  DSV3_CHECK(id >= 0 && id < (int64_t)impl_->id_tok.size(),
             "tokenizer " << impl_->name << ": id " << id << " out of range (vocab size " << impl_->id_tok.size() << ")");
  return impl_->id_tok[id];
}

bool Tokenizer::is_special(int64_t id) const {
  return id >= 0 && id < (int64_t)impl_->id_special.size() && impl_->id_special[id];
}

const std::string& Tokenizer::name() const { return impl_->name; }

const std::vector<std::string>& deepseek_v3_split_regexes() {
  static const std::vector<std::string> r = {
      "\\p{N}{1,3}",
      "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| "
      "?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
  };
  return r;
}

// ---- trainer ---------------------------------------------------------------------------------------

std::string train_bpe(std::span<const std::string> texts, const BpeTrainerOptions& opts) {
  const int64_t n_special = (int64_t)opts.special_tokens.size();
  DSV3_CHECK(opts.vocab_size >= n_special + 256,
             "train_bpe: vocab_size " << opts.vocab_size << " < " << n_special << " special tokens + 256 byte tokens");
  DSV3_CHECK(opts.min_frequency >= 1, "train_bpe: min_frequency must be >= 1");
  {
    std::set<std::string> seen;
    for (const auto& s : opts.special_tokens)
      DSV3_CHECK(!s.empty() && seen.insert(s).second, "train_bpe: special token '" << s << "' is empty or repeated");
  }
  const ByteMap& bm = byte_map();

  // The pre-tokenizer of the tokenizer we write: the splits, then ByteLevel without its regex.
  Tokenizer::Impl pre;
  pre.name = "train_bpe";
  for (size_t i = 0; i < opts.special_tokens.size(); ++i) pre.added.push_back({opts.special_tokens[i], (int64_t)i, true});
  for (const auto& r : opts.split_regexes) pre.splits.emplace_back(r, false, "train_bpe: split regex '" + r + "'");

  // Word counts.
  std::unordered_map<std::string, int64_t> counts;
  {
    MatchData md;
    for (size_t i = 0; i < texts.size(); ++i) {
      const size_t badpos = first_invalid_utf8(texts[i]);
      DSV3_CHECK(badpos == std::string_view::npos,
                 "train_bpe: text " << i << " is not valid UTF-8 (byte offset " << badpos << ")");
      pre.split_added(texts[i], [&](std::string_view seg, int added) {
        if (added < 0) pre.pretokenize(seg, md.md, [&](std::string_view piece) { ++counts[std::string(piece)]; });
      });
    }
  }
  std::vector<std::pair<std::string, int64_t>> sorted(counts.begin(), counts.end());
  std::sort(sorted.begin(), sorted.end());
  counts.clear();

  std::vector<std::string> tok;  // id -> byte-mapped token
  std::unordered_map<std::string, int32_t> tok_id;
  for (const auto& s : opts.special_tokens) tok.push_back(s);
  for (int b = 0; b < 256; ++b) {
    tok_id[bm.byte_char[b]] = (int32_t)tok.size();
    tok.push_back(bm.byte_char[b]);
  }
  std::vector<std::vector<int32_t>> words(sorted.size());
  std::vector<int64_t> wcount(sorted.size());
  for (size_t w = 0; w < sorted.size(); ++w) {
    for (unsigned char c : sorted[w].first) words[w].push_back((int32_t)(n_special + c));
    wcount[w] = sorted[w].second;
  }
  sorted.clear();

  std::unordered_map<uint64_t, int64_t> pc;                 // pair -> count
  std::unordered_map<uint64_t, std::vector<int32_t>> where;  // pair -> words that had it (may be stale)
  for (size_t w = 0; w < words.size(); ++w)
    for (size_t i = 0; i + 1 < words[w].size(); ++i) {
      const uint64_t k = pair_key(words[w][i], words[w][i + 1]);
      pc[k] += wcount[w];
      auto& v = where[k];
      if (v.empty() || v.back() != (int32_t)w) v.push_back((int32_t)w);
    }
  struct Entry {
    int64_t count;
    uint64_t pair;
    bool operator<(const Entry& o) const { return count != o.count ? count < o.count : pair > o.pair; }
  };
  std::priority_queue<Entry> heap;
  {
    std::vector<Entry> init;
    for (const auto& [k, c] : pc) init.push_back({c, k});
    std::sort(init.begin(), init.end(), [](const Entry& a, const Entry& b) { return b < a; });
    for (const auto& e : init) heap.push(e);
  }

  std::vector<std::pair<int32_t, int32_t>> merges;
  std::unordered_set<uint64_t> changed;
  std::vector<int32_t> nw;
  while ((int64_t)tok.size() < opts.vocab_size && !heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    const auto pit = pc.find(top.pair);
    const int64_t cur = pit == pc.end() ? 0 : pit->second;
    if (cur != top.count) {
      if (cur > 0) heap.push({cur, top.pair});
      continue;
    }
    if (cur < opts.min_frequency) break;
    const int32_t a = int32_t(top.pair >> 32), b = int32_t(uint32_t(top.pair));
    const std::string merged = tok[a] + tok[b];
    int32_t id;
    if (const auto it = tok_id.find(merged); it != tok_id.end()) {
      id = it->second;
    } else {
      id = (int32_t)tok.size();
      tok.push_back(merged);
      tok_id[merged] = id;
    }
    merges.emplace_back(a, b);
    std::vector<int32_t> ws = std::move(where[top.pair]);
    where.erase(top.pair);
    std::sort(ws.begin(), ws.end());
    ws.erase(std::unique(ws.begin(), ws.end()), ws.end());
    changed.clear();
    for (int32_t w : ws) {
      auto& s = words[w];
      bool has = false;
      for (size_t i = 0; i + 1 < s.size() && !has; ++i) has = s[i] == a && s[i + 1] == b;
      if (!has) continue;
      const int64_t c = wcount[w];
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        const uint64_t k = pair_key(s[i], s[i + 1]);
        pc[k] -= c;
        changed.insert(k);
      }
      nw.clear();
      for (size_t i = 0; i < s.size();) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          nw.push_back(id);
          i += 2;
        } else {
          nw.push_back(s[i++]);
        }
      }
      s = nw;
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        const uint64_t k = pair_key(s[i], s[i + 1]);
        pc[k] += c;
        changed.insert(k);
        if (s[i] == id || s[i + 1] == id) {
          auto& v = where[k];
          if (v.empty() || v.back() != w) v.push_back(w);
        }
      }
    }
    std::vector<uint64_t> ch(changed.begin(), changed.end());
    std::sort(ch.begin(), ch.end());
    for (uint64_t k : ch) {
      const auto it = pc.find(k);
      if (it == pc.end()) continue;
      if (it->second <= 0) pc.erase(it);
      else heap.push({it->second, k});
    }
  }

  // tokenizer.json
  ojson j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  ojson added = ojson::array();
  for (int64_t i = 0; i < n_special; ++i)
    added.push_back(ojson{{"id", i}, {"content", tok[i]}, {"single_word", false}, {"lstrip", false},
                          {"rstrip", false}, {"normalized", false}, {"special", true}});
  j["added_tokens"] = added;
  j["normalizer"] = nullptr;
  ojson pts = ojson::array();
  for (const auto& r : opts.split_regexes)
    pts.push_back(ojson{{"type", "Split"}, {"pattern", ojson{{"Regex", r}}}, {"behavior", "Isolated"}, {"invert", false}});
  pts.push_back(ojson{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}});
  j["pre_tokenizer"] = ojson{{"type", "Sequence"}, {"pretokenizers", pts}};
  j["post_processor"] = nullptr;
  j["decoder"] = ojson{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  ojson model;
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = nullptr;
  model["continuing_subword_prefix"] = nullptr;
  model["end_of_word_suffix"] = nullptr;
  model["fuse_unk"] = false;
  model["byte_fallback"] = false;
  ojson vocab = ojson::object();
  for (size_t i = 0; i < tok.size(); ++i) vocab[tok[i]] = (int64_t)i;
  model["vocab"] = vocab;
  ojson ms = ojson::array();
  for (const auto& [a, b] : merges) ms.push_back(tok[a] + " " + tok[b]);
  model["merges"] = ms;
  j["model"] = model;
  return j.dump(1) + "\n";
}

}  // namespace dsv3
