// The pipeline layout parser: a small recursive-descent expansion of Megatron's layout syntax into symbols
// that remember where they came from in the spec, then one pass that splits and checks the stages.
#include "pipeline/layout.h"

#include <sstream>

#include "core/error.h"

namespace dsv3 {

namespace {

// An expanded symbol (E t m L |) and the 0-based character of the spec it was written at.
struct Sym {
  char c;
  size_t pos;
};

// A generous bound on the expanded length: a real layout is a few hundred symbols; this stops "(t*999)*999".
constexpr size_t kMaxSymbols = 1 << 20;
constexpr int kMaxDepth = 32;  // nested '(' (the recursion depth of the parser)

class Parser {
 public:
  Parser(const std::string& spec, const std::string& where) : spec_(spec), where_(where.empty() ? "" : " " + where) {}

  std::vector<Sym> expand() {
    std::vector<Sym> out = sequence(/*depth=*/0);
    skip_blank();
    if (i_ < spec_.size()) fail_at(i_, "')' without a matching '('");
    return out;
  }

  [[noreturn]] void fail_at(size_t pos, const std::string& what) const {
    DSV3_FAIL("parallel.pp_layout \"" << spec_ << "\" at character " << pos + 1 << ": " << what << where_);
  }

 private:
  void skip_blank() {
    while (i_ < spec_.size() && (spec_[i_] == ' ' || spec_[i_] == '\t' || spec_[i_] == ',' || spec_[i_] == '\n' ||
                                 spec_[i_] == '\r'))
      ++i_;
  }

  // seq := item*   (ends at the end of the spec or at a ')', which the caller consumes)
  std::vector<Sym> sequence(int depth) {
    std::vector<Sym> out;
    for (;;) {
      skip_blank();
      if (i_ >= spec_.size() || spec_[i_] == ')') return out;
      const size_t start = i_;
      append(out, item(depth), 1, start);
    }
  }

  // item := atom ('*' count)*
  std::vector<Sym> item(int depth) {
    const size_t start = i_;
    std::vector<Sym> a = atom(depth);
    for (;;) {
      skip_blank();
      if (i_ >= spec_.size() || spec_[i_] != '*') return a;
      const size_t star = i_++;
      const long n = count(star);
      std::vector<Sym> r;
      append(r, a, n, start);
      a = std::move(r);
    }
  }

  // atom := E | t | m | L | '|' | '(' seq ')'
  std::vector<Sym> atom(int depth) {
    const size_t pos = i_;
    const char c = spec_[i_];
    if (c == 'E' || c == 't' || c == 'm' || c == 'L' || c == '|') {
      ++i_;
      return {Sym{c, pos}};
    }
    if (c == '(') {
      if (depth >= kMaxDepth) fail_at(pos, "groups nested deeper than " + std::to_string(kMaxDepth));
      ++i_;
      std::vector<Sym> inner = sequence(depth + 1);
      if (i_ >= spec_.size()) fail_at(pos, "'(' is never closed");
      ++i_;  // ')'
      if (inner.empty()) fail_at(pos, "empty group '()'");
      return inner;
    }
    if (c == '*') fail_at(pos, "'*' must follow a symbol or a ')'");
    if (c >= '0' && c <= '9') fail_at(pos, "a repeat count without '*' before it");
    std::string what = "unknown symbol '";
    what += c;
    what += "' (expected E, t, m, L, |, (, ), *N)";
    fail_at(pos, what);
  }

  // The repeat count after the '*' at `star`: digits (blanks between them are ignored), >= 1.
  long count(size_t star) {
    skip_blank();
    if (i_ >= spec_.size() || spec_[i_] < '0' || spec_[i_] > '9') fail_at(star, "'*' needs a repeat count");
    long n = 0;
    while (i_ < spec_.size() && spec_[i_] >= '0' && spec_[i_] <= '9') {
      n = n * 10 + (spec_[i_] - '0');
      if (n > static_cast<long>(kMaxSymbols)) fail_at(star, "repeat count is too large");
      ++i_;
      skip_blank();
    }
    if (n == 0) fail_at(star, "repeat count 0 (a '*N' needs N >= 1)");
    return n;
  }

  // out += a repeated `times` times; `pos` (where a starts) is blamed when the expansion gets too long.
  void append(std::vector<Sym>& out, const std::vector<Sym>& a, long times, size_t pos) const {
    if (out.size() + a.size() * static_cast<size_t>(times) > kMaxSymbols)
      fail_at(pos, "expands to more than " + std::to_string(kMaxSymbols) + " symbols");
    for (long k = 0; k < times; ++k) out.insert(out.end(), a.begin(), a.end());
  }

  const std::string& spec_;
  const std::string where_;  // " (parallel.pp_layout at run.deck:7, ...)" or ""
  size_t i_ = 0;
};

std::vector<StageLayout> even_split(int pp, int num_layers, int mtp_layers, const std::string& where) {
  DSV3_CHECK(pp <= num_layers, "parallel.pp=" << pp << " exceeds the decoder layers (" << num_layers
                                              << "): the even split needs one per stage (or give parallel.pp_layout)"
                                              << where);
  std::vector<StageLayout> out(pp);
  const int base = num_layers / pp, extra = num_layers % pp;
  int next = 0;
  for (int s = 0; s < pp; ++s) {
    const int n = base + (s < extra ? 1 : 0);
    for (int k = 0; k < n; ++k) out[s].layers.push_back(next++);
  }
  out.front().embedding = true;
  out.back().mtp = mtp_layers > 0;
  out.back().loss = true;
  return out;
}

}  // namespace

std::vector<StageLayout> parse_pp_layout(const std::string& spec, int pp, int num_layers, int mtp_layers,
                                         const std::string& where_set) {
  const std::string where = where_set.empty() ? "" : " " + where_set;
  DSV3_CHECK(pp >= 1, "parallel.pp=" << pp << " must be at least 1" << where);
  DSV3_CHECK(num_layers >= 1, "num_hidden_layers=" << num_layers << " must be at least 1");
  DSV3_CHECK(mtp_layers >= 0, "num_nextn_predict_layers=" << mtp_layers << " must be >= 0");
  if (spec.find_first_not_of(" \t,\r\n") == std::string::npos) return even_split(pp, num_layers, mtp_layers, where);

  Parser parser(spec, where_set);
  const std::vector<Sym> syms = parser.expand();

  // Split into stages first so that a wrong stage count is reported before what is on the stages.
  int stages = 1;
  for (const Sym& s : syms) stages += s.c == '|';
  if (stages != pp)
    DSV3_FAIL("parallel.pp_layout \"" << spec << "\" has " << stages << " stage" << (stages == 1 ? "" : "s")
                                      << " but parallel.pp=" << pp << where);

  std::vector<StageLayout> out(pp);
  int stage = 0, layers = 0, mtps = 0;
  // Order inside a stage: E (0), t (1), m (2), L (3); `rank` is the highest seen on this stage.
  int rank = -1;
  size_t embedding_at = std::string::npos, loss_at = std::string::npos;
  for (const Sym& s : syms) {
    StageLayout& st = out[stage];
    auto order = [&](int r, const char* name) {
      if (r < rank)
        parser.fail_at(s.pos, std::string(name) + " on stage " + std::to_string(stage) +
                                  " comes after a later part (the order in a stage is E, t..., m..., L)");
      rank = r;
    };
    switch (s.c) {
      case '|':
        ++stage;
        rank = -1;
        break;
      case 'E':
        if (embedding_at != std::string::npos)
          parser.fail_at(s.pos, "E (embedding) appears twice (first at character " + std::to_string(embedding_at + 1) +
                                    ")");
        if (stage != 0) parser.fail_at(s.pos, "E (embedding) must be on the first stage, not stage " +
                                                  std::to_string(stage));
        order(0, "E");
        embedding_at = s.pos;
        st.embedding = true;
        break;
      case 't':
        order(1, "t");
        if (layers >= num_layers)
          parser.fail_at(s.pos, "more decoder layers (t) than num_hidden_layers=" + std::to_string(num_layers));
        st.layers.push_back(layers++);
        break;
      case 'm':
        if (stage != pp - 1)
          parser.fail_at(s.pos, "m (MTP) must be on the last stage (" + std::to_string(pp - 1) + "), not stage " +
                                    std::to_string(stage) + ": the MTP module needs the loss stage");
        order(2, "m");
        if (mtps >= mtp_layers)
          parser.fail_at(s.pos, "more MTP layers (m) than num_nextn_predict_layers=" + std::to_string(mtp_layers));
        ++mtps;
        st.mtp = true;
        break;
      case 'L':
        if (loss_at != std::string::npos)
          parser.fail_at(s.pos, "L (loss) appears twice (first at character " + std::to_string(loss_at + 1) + ")");
        if (stage != pp - 1)
          parser.fail_at(s.pos, "L (loss) must be on the last stage (" + std::to_string(pp - 1) + "), not stage " +
                                    std::to_string(stage));
        order(3, "L");
        loss_at = s.pos;
        st.loss = true;
        break;
    }
  }
  auto whole = [&](const std::string& what) { DSV3_FAIL("parallel.pp_layout \"" << spec << "\": " << what << where); };
  if (embedding_at == std::string::npos) whole("no E (embedding): the first stage must start with E");
  if (loss_at == std::string::npos) whole("no L (loss): the last stage must end with L");
  if (layers != num_layers)
    whole("has " + std::to_string(layers) + " decoder layers (t) but num_hidden_layers=" + std::to_string(num_layers));
  if (mtps != mtp_layers)
    whole("has " + std::to_string(mtps) + " MTP layers (m) but num_nextn_predict_layers=" +
          std::to_string(mtp_layers) + " (put them on the last stage, before L)");
  return out;
}

std::string format_layout(const std::vector<StageLayout>& layout) {
  std::ostringstream os;
  for (size_t s = 0; s < layout.size(); ++s) {
    const StageLayout& st = layout[s];
    os << (s ? " | " : "") << "pp" << s << ":";
    bool any = false;
    if (st.embedding) os << " E", any = true;
    if (!st.layers.empty()) {
      os << " t" << st.layers.front();
      if (st.layers.size() > 1) os << "-" << st.layers.back();
      any = true;
    }
    if (st.mtp) os << " m", any = true;
    if (st.loss) os << " L", any = true;
    if (!any) os << " -";
  }
  return os.str();
}

std::string layout_spec(const std::vector<StageLayout>& layout, int mtp_layers) {
  std::ostringstream os;
  auto run = [&](char c, size_t n) {
    if (n == 1) os << c;
    if (n > 1) os << c << '*' << n;
  };
  for (size_t s = 0; s < layout.size(); ++s) {
    const StageLayout& st = layout[s];
    if (s) os << '|';
    if (st.embedding) os << 'E';
    run('t', st.layers.size());
    if (st.mtp) run('m', static_cast<size_t>(mtp_layers));
    if (st.loss) os << 'L';
  }
  return os.str();
}

}  // namespace dsv3
