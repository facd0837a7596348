// defines: dsv3::Deck (the input deck), dsv3::KeySpec / deck_keys() (the table of every deck key)
// A deck is `[section]` headers, `key = value` lines (key becomes `section.key`), `#` comments and
// `include = other.deck` lines (relative to the including file). Trailing `section.key=value` overrides
// win over the deck; a later line wins over an earlier one (included lines count where the include is).
// Every key is declared once, in src/core/deck_keys.cpp; Boost.Program_options does the typing,
// defaults and value validation. Every user error is a one-line dsv3::Error naming the key and its
// origin ("input/tiny.deck:12", "command line" or "default").
// Paths in a deck are relative to the directory of the deck file they appear in: use Deck::path().
#pragma once
#include <boost/program_options/variables_map.hpp>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace dsv3 {

// One deck key. The table (deck_keys()) lists every key the program understands.
struct KeySpec {
  enum class Type { Int, Float, Bool, String, Path };
  std::string name;                  // "train.iters": section is the part before the first '.'
  Type type = Type::String;
  const char* def = nullptr;         // default as deck text; nullptr: none (see required)
  bool required = false;             // must be given (checked by Deck::require_keys())
  std::vector<std::string> choices;  // allowed values of a String key (empty: any)
  std::optional<double> min;         // Int/Float lower bound
  bool min_exclusive = false;        // true: value > min, false: value >= min
  std::optional<double> max;         // Int/Float upper bound
  bool max_exclusive = false;
  std::string help;                  // one line
};
const std::vector<KeySpec>& deck_keys();  // defined in deck_keys.cpp
// Checks a key table (deck_keys() is checked once, before its first use): every name declared once and with a
// section, no required key with a default, and every default a valid value of its key (type, bounds, choices).
// Throws a dsv3::Error naming the key.
void check_key_table(const std::vector<KeySpec>& keys);

class Deck {
 public:
  Deck();
  // path: the deck file; origins read "path:line". Includes are relative to the including file.
  static Deck parse_file(const std::string& path, const std::vector<std::string>& overrides = {});
  // name is used in origins; includes (and path-valued keys) of the text resolve relative to the cwd.
  static Deck parse_text(const std::string& text, const std::string& name,
                         const std::vector<std::string>& overrides = {});
  static Deck defaults_only(const std::vector<std::string>& overrides = {});  // tools: overrides only

  void require_keys() const;  // throws naming every required key that was not given
  bool given(const std::string& key) const;  // set by the deck or an override (not just a default)
  bool has(const std::string& key) const;    // has a value (given or default)
  // T: int64_t, int, double, bool, std::string. Int keys convert to int/double; every key reads as
  // std::string (its deck text). Throws for an unknown key, a key without a value or a wrong type.
  template <class T>
  T get(const std::string& key) const;
  std::string get_or(const std::string& key, const std::string& fallback) const;  // deck text or fallback
  std::string origin(const std::string& key) const;  // "file:line", "command line" or "default"
  // Where the values of keys came from, for the messages of checks that involve several keys:
  // "(parallel.tp at t.deck:5, parallel.pp on the command line, parallel.ep by default)".
  std::string where_set(const std::vector<std::string>& keys) const;
  // A path-valued key resolved against the directory of the deck file it came from (unchanged for
  // absolute paths, the command line and defaults, i.e. relative to the cwd). "" stays "".
  std::string path(const std::string& key) const;
  // The same for a path that is part of a key's value (e.g. one entry of data.paths).
  std::string resolve_path(const std::string& key, const std::string& p) const;

  // Every key with a value (given and defaulted) as a deck, section by section, each line with a
  // "# from <origin>" comment. parse_text(resolved_text(), ...) reproduces the same values.
  std::string resolved_text() const;
  std::string serialize() const;  // rank 0 -> all ranks broadcast; origins and path bases are kept
  static Deck deserialize(const std::string& s);
  static std::string help();  // every key: name, type, default, description, grouped by section

 private:
  struct Entry {
    std::string raw;       // value text (quotes removed)
    std::string origin;    // "file:line" or "command line"
    std::string base_dir;  // directory relative paths in the value are resolved against ("": cwd)
  };
  void set(const std::string& key, Entry e);  // checks and stores one entry (last wins)
  void finish();                              // stores every entry into vm_ (typed), validates
  std::map<std::string, Entry> given_;
  boost::program_options::variables_map vm_;
  friend struct DeckBuilder;
};

extern template int64_t Deck::get<int64_t>(const std::string&) const;
extern template int Deck::get<int>(const std::string&) const;
extern template double Deck::get<double>(const std::string&) const;
extern template bool Deck::get<bool>(const std::string&) const;
extern template std::string Deck::get<std::string>(const std::string&) const;

}  // namespace dsv3
