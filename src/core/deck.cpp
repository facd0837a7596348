// defines: dsv3::Deck -- parsing (sections, comments, includes, overrides), typed storage in a
// boost::program_options::variables_map built from the key table, origins, resolved text, help.
#include "core/deck.h"

#include <algorithm>
#include <boost/lexical_cast.hpp>
#include <boost/program_options/errors.hpp>
#include <boost/program_options/options_description.hpp>
#include <boost/program_options/parsers.hpp>
#include <boost/program_options/value_semantic.hpp>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "core/error.h"

namespace po = boost::program_options;
namespace fs = std::filesystem;

namespace dsv3 {

namespace deck_detail {
// Bool deck values: true/false, 1/0, yes/no, on/off (any case).
struct Flag {
  bool value = false;
};
// Found by argument-dependent lookup from po::typed_value<Flag>::xparse.
void validate(boost::any& v, const std::vector<std::string>& values, Flag*, int) {
  po::validators::check_first_occurrence(v);
  std::string s = po::validators::get_single_string(values);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s == "true" || s == "1" || s == "yes" || s == "on")
    v = Flag{true};
  else if (s == "false" || s == "0" || s == "no" || s == "off")
    v = Flag{false};
  else
    throw po::invalid_option_value(s);
}
}  // namespace deck_detail

namespace {
using deck_detail::Flag;
using Type = KeySpec::Type;

const std::map<std::string, const KeySpec*>& key_index() {
  static const std::map<std::string, const KeySpec*> index = [] {
    check_key_table(deck_keys());
    std::map<std::string, const KeySpec*> m;
    for (const KeySpec& k : deck_keys()) m.emplace(k.name, &k);
    return m;
  }();
  return index;
}

const KeySpec* find_key(const std::string& key) {
  auto it = key_index().find(key);
  return it == key_index().end() ? nullptr : it->second;
}

std::string section_of(const std::string& key) { return key.substr(0, key.find('.')); }

// Every section name a [header] may use: "model", and the dotted prefixes such as "model.rope_scaling".
const std::set<std::string>& known_sections() {
  static const std::set<std::string> s = [] {
    std::set<std::string> out;
    for (const KeySpec& k : deck_keys())
      for (size_t p = k.name.find('.'); p != std::string::npos; p = k.name.find('.', p + 1))
        out.insert(k.name.substr(0, p));
    return out;
  }();
  return s;
}

// The typed value of a key's default (k.def set); a default that does not parse throws naming the key.
boost::any default_value(const KeySpec& k) {
  const std::string def = k.def;
  switch (k.type) {
    case Type::Int: {
      int64_t x = 0;
      DSV3_CHECK(boost::conversion::try_lexical_convert(def, x),
                 "deck key '" << k.name << "' has a bad default '" << def << "' (expected an integer)");
      return x;
    }
    case Type::Float: {
      double x = 0;
      DSV3_CHECK(boost::conversion::try_lexical_convert(def, x),
                 "deck key '" << k.name << "' has a bad default '" << def << "' (expected a number)");
      return x;
    }
    case Type::Bool: {
      boost::any a;
      try {
        deck_detail::validate(a, {def}, static_cast<Flag*>(nullptr), 0);
      } catch (const po::error&) {
        DSV3_FAIL("deck key '" << k.name << "' has a bad default '" << def << "' (expected a bool)");
      }
      return a;
    }
    case Type::String:
    case Type::Path: break;
  }
  return def;
}

// The Boost.Program_options description of every key: typed values, defaults, help.
const po::options_description& options() {
  static const po::options_description desc = [] {
    key_index();  // the table is checked (defaults included) before it is used
    po::options_description d("dsv3 deck keys");
    for (const KeySpec& k : deck_keys()) {
      const std::string def = k.def ? k.def : "";
      switch (k.type) {
        case Type::Int: {
          auto* v = po::value<int64_t>();
          if (k.def) v->default_value(boost::any_cast<int64_t>(default_value(k)), def);
          d.add_options()(k.name.c_str(), v, k.help.c_str());
          break;
        }
        case Type::Float: {
          auto* v = po::value<double>();
          if (k.def) v->default_value(boost::any_cast<double>(default_value(k)), def);
          d.add_options()(k.name.c_str(), v, k.help.c_str());
          break;
        }
        case Type::Bool: {
          auto* v = po::value<Flag>();
          if (k.def) v->default_value(boost::any_cast<Flag>(default_value(k)), def);
          d.add_options()(k.name.c_str(), v, k.help.c_str());
          break;
        }
        case Type::String:
        case Type::Path: {
          auto* v = po::value<std::string>();
          if (k.def) v->default_value(def, "\"" + def + "\"");
          d.add_options()(k.name.c_str(), v, k.help.c_str());
          break;
        }
      }
    }
    return d;
  }();
  return desc;
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// " (did you mean 'x'?)" for the closest candidate within edit distance 2, else "".
template <class Range>
std::string suggestion(const std::string& name, const Range& candidates) {
  std::string best;
  size_t best_d = 3;
  for (const std::string& c : candidates) {
    size_t d = edit_distance(name, c);
    if (d < best_d) best_d = d, best = c;
  }
  return best.empty() ? "" : " (did you mean '" + best + "'?)";
}

std::vector<std::string> key_names() {
  std::vector<std::string> v;
  for (const KeySpec& k : deck_keys()) v.push_back(k.name);
  return v;
}

// "at file:12" / "on the command line" / "in the defaults"
std::string where(const std::string& origin) {
  if (origin == "command line") return "on the command line";
  if (origin == "default") return "in the key table default";
  return "at " + origin;
}

std::string type_name(const KeySpec& k) {
  switch (k.type) {
    case Type::Int: return "int";
    case Type::Float: return "float";
    case Type::Bool: return "bool";
    case Type::Path: return "path";
    case Type::String: break;
  }
  if (k.choices.empty()) return "string";
  std::string s;
  for (const auto& c : k.choices) s += (s.empty() ? "" : "|") + c;
  return s;
}

std::string fmt_num(double x) {
  std::ostringstream os;
  os.precision(17);
  os << x;
  return os.str();
}

// "in [0, 1)", ">= 1", "> 0", "" for unbounded.
std::string range_text(const KeySpec& k) {
  if (k.min && k.max)
    return "in " + std::string(k.min_exclusive ? "(" : "[") + fmt_num(*k.min) + ", " + fmt_num(*k.max) +
           (k.max_exclusive ? ")" : "]");
  if (k.min) return std::string(k.min_exclusive ? "> " : ">= ") + fmt_num(*k.min);
  if (k.max) return std::string(k.max_exclusive ? "< " : "<= ") + fmt_num(*k.max);
  return "";
}

std::string expected_text(const KeySpec& k) {
  switch (k.type) {
    case Type::Int: return "an integer";
    case Type::Float: return "a number";
    case Type::Bool: return "a bool (true/false/1/0/yes/no/on/off)";
    default: return "a string";
  }
}

// Values are written as deck text: strings quoted unless they cannot be (they contain a quote).
std::string quote(const KeySpec& k, const std::string& raw) {
  if (k.type != Type::String && k.type != Type::Path) return raw;
  if (raw.find('"') != std::string::npos) return raw;
  return "\"" + raw + "\"";
}

std::string read_file(const std::string& path) {
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  const int err = errno;
  DSV3_CHECK(in, "cannot read deck file '" << path << "': " << (err ? std::strerror(err) : "open failed"));
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

bool valid_name(const std::string& s) {
  if (s.empty() || s.front() == '.' || s.back() == '.') return false;
  return std::all_of(s.begin(), s.end(),
                     [](unsigned char c) { return std::isalnum(c) || c == '_' || c == '.' || c == '-'; });
}

// Length-prefixed fields for serialize(): "<n>:<bytes>".
void put_field(std::string& out, const std::string& s) { out += std::to_string(s.size()) + ":" + s; }
std::string get_field(const std::string& in, size_t& pos) {
  size_t colon = in.find(':', pos);
  DSV3_CHECK(colon != std::string::npos, "corrupt serialized deck (field at byte " << pos << ")");
  size_t n = 0;
  try {
    n = std::stoul(in.substr(pos, colon - pos));
  } catch (const std::exception&) {
    DSV3_FAIL("corrupt serialized deck (field length at byte " << pos << ")");
  }
  // Fuzzing fix: stoul accepts "-1" (= 2^64-1), and colon + 1 + n then wrapped around and passed this check.
  DSV3_CHECK(n <= in.size() - (colon + 1), "corrupt serialized deck (truncated at byte " << pos << ")");
  pos = colon + 1 + n;
  return in.substr(colon + 1, n);
}

constexpr const char* kSerialMagic = "dsv3-deck-v1";
}  // namespace

// ---- parsing -------------------------------------------------------------------------------------

struct DeckBuilder {
  struct Frame {
    std::string display;    // the name used in origins
    std::string canonical;  // for cycle detection ("" for text that is not a file)
  };

  static void parse(Deck& d, const std::string& text, const std::string& display, const fs::path& base,
                    std::vector<Frame>& chain) {
    std::istringstream in(text);
    std::string line, section;
    int lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      const std::string origin = display + ":" + std::to_string(lineno);
      std::string s = trim(line);
      if (s.empty() || s[0] == '#') continue;
      if (s[0] == '[') {
        size_t close = s.find(']');
        std::string rest = close == std::string::npos ? "x" : trim(s.substr(close + 1));
        DSV3_CHECK(close != std::string::npos && (rest.empty() || rest[0] == '#'),
                   "malformed section header at " << origin << ": '" << s << "' (expected '[section]')");
        section = trim(s.substr(1, close - 1));
        DSV3_CHECK(valid_name(section),
                   "malformed section header at " << origin << ": '" << s << "' (expected '[section]')");
        if (!known_sections().count(section))
          DSV3_FAIL("unknown section [" << section << "] at " << origin
                                         << suggestion(section, known_sections()));
        continue;
      }
      size_t eq = s.find('=');
      std::string key = eq == std::string::npos ? "" : trim(s.substr(0, eq));
      if (eq == std::string::npos || !valid_name(key))
        DSV3_FAIL("malformed line at " << origin << ": '" << s << "' (expected 'key = value' or '[section]')");
      std::string value = trim(s.substr(eq + 1));
      if (!value.empty() && value[0] == '"') {  // quoted: up to the next quote, then only a comment
        size_t close = value.find('"', 1);
        std::string rest = close == std::string::npos ? "x" : trim(value.substr(close + 1));
        DSV3_CHECK(close != std::string::npos && (rest.empty() || rest[0] == '#'),
                   "malformed line at " << origin << ": '" << s << "' (unterminated quote or text after it)");
        value = value.substr(1, close - 1);
      } else {
        value = trim(value.substr(0, value.find('#')));
      }
      if (key == "include") {
        include(d, value, origin, base, chain);
        continue;
      }
      DSV3_CHECK(!section.empty(), "key '" << key << "' at " << origin
                                           << " is outside any section (put a [section] header above it)");
      d.set(section + "." + key, Deck::Entry{value, origin, base.string()});
    }
  }

  static void include(Deck& d, const std::string& file, const std::string& origin, const fs::path& base,
                      std::vector<Frame>& chain) {
    DSV3_CHECK(!file.empty(), "include without a file name at " << origin);
    fs::path target = fs::path(file).is_absolute() || base.empty() ? fs::path(file) : base / file;
    target = target.lexically_normal();
    std::error_code ec;
    DSV3_CHECK(fs::is_regular_file(target, ec),
               "include file '" << target.string() << "' not found (included at " << origin << ")");
    std::string canon = fs::weakly_canonical(target, ec).string();
    for (const Frame& f : chain) {
      if (!f.canonical.empty() && f.canonical == canon) {
        std::string cyc;
        for (const Frame& g : chain) cyc += g.display + " -> ";
        DSV3_FAIL("include cycle: " << cyc << target.string() << " (at " << origin << ")");
      }
    }
    chain.push_back({target.string(), canon});
    parse(d, read_file(target.string()), target.string(), target.parent_path(), chain);
    chain.pop_back();
  }

  static void overrides(Deck& d, const std::vector<std::string>& ovs) {
    for (const std::string& o : ovs) {
      size_t eq = o.find('=');
      DSV3_CHECK(eq != std::string::npos,
                 "bad override '" << o << "' on the command line (expected section.key=value)");
      std::string key = trim(o.substr(0, eq));
      DSV3_CHECK(valid_name(key) && key.find('.') != std::string::npos,
                 "bad override '" << o << "' on the command line: key '" << key
                                  << "' has no section (expected section.key=value)");
      std::string value = trim(o.substr(eq + 1));
      if (value.size() >= 2 && value.front() == '"' && value.back() == '"') value = value.substr(1, value.size() - 2);
      // Fuzzing fix: resolved_text() must parse back to the same values, and deck text has no escapes: a value
      // holding a double quote can only be written unquoted (so it cannot start with a quote or contain '#'),
      // and no value can hold a line break. `run.name="abc` used to be stored as '"abc' and written as an
      // unterminated quote.
      DSV3_CHECK(value.find_first_of("\r\n") == std::string::npos,
                 "bad override of key '" << key << "' on the command line: the value contains a line break");
      DSV3_CHECK(value.find('"') == std::string::npos || (value.front() != '"' && value.find('#') == std::string::npos),
                 "bad override '" << o << "' on the command line: unbalanced quote (a value may hold a '\"' only if it "
                                  << "does not start with one and has no '#')");
      d.set(key, Deck::Entry{value, "command line", ""});
    }
  }
};

Deck::Deck() { finish(); }

void Deck::set(const std::string& key, Entry e) {
  if (!find_key(key)) DSV3_FAIL("unknown key '" << key << "' " << where(e.origin) << suggestion(key, key_names()));
  given_[key] = std::move(e);
}

namespace {
void check_bounds(const KeySpec& k, double x, const std::string& raw, const std::string& origin) {
  auto fail = [&](const std::string& why) {
    DSV3_FAIL("bad value '" << raw << "' for key '" << k.name << "' " << where(origin) << " (" << why << ")");
  };
  if (!std::isfinite(x)) fail("must be finite");
  if (k.min && (k.min_exclusive ? !(x > *k.min) : !(x >= *k.min))) fail("must be " + range_text(k));
  if (k.max && (k.max_exclusive ? !(x < *k.max) : !(x <= *k.max))) fail("must be " + range_text(k));
}

// Checks what the po value semantic cannot: bounds and the allowed values of a String key.
void check_value(const KeySpec& k, const boost::any& v, const std::string& raw, const std::string& origin) {
  if (k.type == Type::Int) check_bounds(k, double(boost::any_cast<int64_t>(v)), raw, origin);
  if (k.type == Type::Float) check_bounds(k, boost::any_cast<double>(v), raw, origin);
  if (k.type == Type::String && !k.choices.empty() &&
      std::find(k.choices.begin(), k.choices.end(), raw) == k.choices.end())
    DSV3_FAIL("bad value '" << raw << "' for key '" << k.name << "' " << where(origin) << " (expected one of "
                            << type_name(k) << ")");
}
}  // namespace

void check_key_table(const std::vector<KeySpec>& keys) {
  std::set<std::string> seen;
  for (const KeySpec& k : keys) {
    DSV3_CHECK(seen.insert(k.name).second, "deck key '" << k.name << "' is declared twice");
    DSV3_CHECK(k.name.find('.') != std::string::npos && valid_name(k.name),
               "deck key '" << k.name << "' has no section (expected section.key)");
    DSV3_CHECK(!(k.required && k.def), "deck key '" << k.name << "' is required and has a default");
    if (k.def) check_value(k, default_value(k), k.def, "default");
  }
}

void Deck::finish() {
  const po::options_description& desc = options();
  vm_ = po::variables_map();
  // One option at a time, so that a po error can name the key and its origin.
  for (const auto& [key, e] : given_) {
    const KeySpec& k = *find_key(key);
    po::parsed_options one(&desc);
    po::option opt(key, {e.raw});
    opt.original_tokens = {key, e.raw};
    one.options.push_back(opt);
    try {
      po::store(one, vm_);
    } catch (const po::error& err) {
      DSV3_FAIL("bad value '" << e.raw << "' for key '" << key << "' " << where(e.origin) << " (expected "
                              << expected_text(k) << ")");
    }
    check_value(k, vm_[key].value(), e.raw, e.origin);
  }
  po::store(po::parsed_options(&desc), vm_);  // the defaults of every key not given (checked by check_key_table)
}

Deck Deck::parse_file(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code ec;
  DSV3_CHECK(fs::is_regular_file(path, ec), "deck file '" << path << "' not found");
  Deck d;
  std::vector<DeckBuilder::Frame> chain{{path, fs::weakly_canonical(path, ec).string()}};
  DeckBuilder::parse(d, read_file(path), path, fs::path(path).parent_path(), chain);
  DeckBuilder::overrides(d, overrides);
  d.finish();
  return d;
}

Deck Deck::parse_text(const std::string& text, const std::string& name, const std::vector<std::string>& overrides) {
  Deck d;
  std::vector<DeckBuilder::Frame> chain{{name, ""}};
  DeckBuilder::parse(d, text, name, fs::path(), chain);
  DeckBuilder::overrides(d, overrides);
  d.finish();
  return d;
}

Deck Deck::defaults_only(const std::vector<std::string>& overrides) {
  Deck d;
  DeckBuilder::overrides(d, overrides);
  d.finish();
  return d;
}

// ---- queries -------------------------------------------------------------------------------------

void Deck::require_keys() const {
  std::string missing;
  for (const KeySpec& k : deck_keys()) {
    if (!k.required || given_.count(k.name)) continue;
    missing += (missing.empty() ? "" : "; ") + std::string("missing required key '") + k.name +
               "' (in section [" + section_of(k.name) + "])";
  }
  if (!missing.empty()) DSV3_FAIL(missing);
}

namespace {
const KeySpec& known(const std::string& key) {
  const KeySpec* k = find_key(key);
  if (!k) DSV3_FAIL("unknown deck key '" << key << "'" << suggestion(key, key_names()));
  return *k;
}
}  // namespace

bool Deck::given(const std::string& key) const {
  known(key);
  return given_.count(key) > 0;
}

bool Deck::has(const std::string& key) const {
  known(key);
  return vm_.count(key) > 0;
}

template <class T>
T Deck::get(const std::string& key) const {
  const KeySpec& k = known(key);
  if (!vm_.count(key))
    DSV3_FAIL("deck key '" << key << "' has no value (it is optional and was not given; in section ["
                           << section_of(key) << "])");
  const boost::any& v = vm_[key].value();
  auto wrong = [&](const char* want) -> T {
    DSV3_FAIL("deck key '" << key << "' is of type " << type_name(k) << ", read as " << want);
  };
  if constexpr (std::is_same_v<T, std::string>) {
    return get_or(key, "");
  } else if constexpr (std::is_same_v<T, bool>) {
    if (k.type != Type::Bool) return wrong("bool");
    return boost::any_cast<Flag>(v).value;
  } else if constexpr (std::is_same_v<T, double>) {
    if (k.type == Type::Float) return boost::any_cast<double>(v);
    if (k.type == Type::Int) return double(boost::any_cast<int64_t>(v));
    return wrong("double");
  } else if constexpr (std::is_same_v<T, int64_t>) {
    if (k.type != Type::Int) return wrong("int64");
    return boost::any_cast<int64_t>(v);
  } else if constexpr (std::is_same_v<T, int>) {
    if (k.type != Type::Int) return wrong("int");
    int64_t x = boost::any_cast<int64_t>(v);
    DSV3_CHECK(x >= std::numeric_limits<int>::min() && x <= std::numeric_limits<int>::max(),
               "deck key '" << key << "' = " << x << " (" << where(origin(key)) << ") does not fit an int");
    return int(x);
  } else {
    static_assert(sizeof(T) == 0, "Deck::get<T>: T must be int64_t, int, double, bool or std::string");
  }
}

template int64_t Deck::get<int64_t>(const std::string&) const;
template int Deck::get<int>(const std::string&) const;
template double Deck::get<double>(const std::string&) const;
template bool Deck::get<bool>(const std::string&) const;
template std::string Deck::get<std::string>(const std::string&) const;

std::string Deck::get_or(const std::string& key, const std::string& fallback) const {
  const KeySpec& k = known(key);
  auto it = given_.find(key);
  if (it != given_.end()) return it->second.raw;
  return k.def ? std::string(k.def) : fallback;
}

std::string Deck::origin(const std::string& key) const {
  const KeySpec& k = known(key);
  auto it = given_.find(key);
  if (it != given_.end()) return it->second.origin;
  return k.def ? "default" : "unset";
}

std::string Deck::where_set(const std::vector<std::string>& keys) const {
  std::string out;
  for (const std::string& key : keys) {
    const std::string o = origin(key);
    out += (out.empty() ? "(" : ", ") + key + " " +
           (o == "default" ? "by default" : o == "unset" ? "unset" : o == "command line" ? "on the command line"
                                                                                          : "at " + o);
  }
  return out.empty() ? out : out + ")";
}

std::string Deck::resolve_path(const std::string& key, const std::string& p) const {
  known(key);
  if (p.empty() || fs::path(p).is_absolute()) return p;
  auto it = given_.find(key);
  if (it == given_.end() || it->second.base_dir.empty()) return p;
  return (fs::path(it->second.base_dir) / p).lexically_normal().string();
}

std::string Deck::path(const std::string& key) const { return resolve_path(key, get_or(key, "")); }

// ---- text forms ----------------------------------------------------------------------------------

std::string Deck::resolved_text() const {
  std::ostringstream os;
  os << "# dsv3 resolved deck: every key with a value (given or default) and where it came from\n";
  std::string section;
  for (const KeySpec& k : deck_keys()) {
    if (!vm_.count(k.name)) continue;
    std::string sec = section_of(k.name);
    if (sec != section) {
      os << (section.empty() ? "" : "\n") << "[" << sec << "]\n";
      section = sec;
    }
    const std::string raw = get_or(k.name, "");
    os << k.name.substr(sec.size() + 1) << " = " << quote(k, raw) << "  # from " << origin(k.name);
    if (k.type == Type::Path && path(k.name) != raw) os << " (path: " << path(k.name) << ")";
    os << "\n";
  }
  return os.str();
}

std::string Deck::serialize() const {
  std::string out = kSerialMagic;
  put_field(out, std::to_string(given_.size()));
  for (const auto& [key, e] : given_) {
    put_field(out, key);
    put_field(out, e.raw);
    put_field(out, e.origin);
    put_field(out, e.base_dir);
  }
  return out;
}

Deck Deck::deserialize(const std::string& s) {
  const std::string magic = kSerialMagic;
  DSV3_CHECK(s.compare(0, magic.size(), magic) == 0, "corrupt serialized deck (bad header)");
  size_t pos = magic.size();
  size_t n = 0;
  const std::string count = get_field(s, pos);
  try {
    n = std::stoul(count);
  } catch (const std::exception&) {  // fuzzing fix: std::out_of_range ("99999999999999999999") escaped as well
    DSV3_FAIL("corrupt serialized deck (bad entry count)");
  }
  Deck d;
  for (size_t i = 0; i < n; ++i) {
    std::string key = get_field(s, pos);
    Entry e;
    e.raw = get_field(s, pos);
    e.origin = get_field(s, pos);
    e.base_dir = get_field(s, pos);
    d.set(key, std::move(e));
  }
  DSV3_CHECK(pos == s.size(), "corrupt serialized deck (" << s.size() - pos << " trailing bytes)");
  d.finish();
  return d;
}

std::string Deck::help() {
  size_t wname = 0, wtype = 0, wdef = 0;
  auto def_text = [](const KeySpec& k) {
    return k.required ? std::string("required") : k.def ? "= " + quote(k, k.def) : std::string("optional");
  };
  auto type_text = [](const KeySpec& k) {
    std::string r = range_text(k);
    return type_name(k) + (r.empty() ? "" : " " + r);
  };
  for (const KeySpec& k : deck_keys()) {
    wname = std::max(wname, std::min<size_t>(k.name.size(), 30));  // longer ones push their line right
    wtype = std::max(wtype, std::min<size_t>(type_text(k).size(), 16));
    wdef = std::max(wdef, std::min<size_t>(def_text(k).size(), 12));
  }
  std::ostringstream os;
  os << "Deck keys. In a deck: '[section]' then 'key = value' ('#' comments, 'include = file');\n"
        "on the command line: section.key=value (wins over the deck). Paths are relative to the deck\n"
        "file's directory. 'optional' keys have no default (model.* keys default to model.hf_config).\n";
  std::string section;
  const po::options_description& desc = options();
  for (const KeySpec& k : deck_keys()) {
    std::string sec = section_of(k.name);
    if (sec != section) os << "\n[" << sec << "]\n", section = sec;
    std::string name = k.name, type = type_text(k), def = def_text(k);
    auto pad = [](const std::string& s, size_t w) { return s + std::string(s.size() < w ? w - s.size() : 0, ' ') + "  "; };
    os << "  " << pad(name, wname) << pad(type, wtype) << pad(def, wdef) << desc.find(k.name, false).description()
       << "\n";
  }
  return os.str();
}

}  // namespace dsv3
