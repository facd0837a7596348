// GPT training samples (Megatron's GPTDataset), blending, synthetic data; see gpt_dataset.h.
#include "data/gpt_dataset.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>

#include "core/deck.h"
#include "core/error.h"
#include "core/log.h"

namespace dsv3 {

namespace {

namespace fs = std::filesystem;

const char* kSplitNames[3] = {"train", "valid", "test"};
constexpr char kCacheMagic[8] = {'D', 'S', 'V', '3', 'I', 'D', 'X', '1'};

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// A platform-independent random stream: splitmix64 over a counter.
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(splitmix64(seed)) {}
  uint64_t next() { return splitmix64(state += 0x9E3779B97F4A7C15ULL); }
  uint64_t below(uint64_t n) {  // uniform in [0, n), Lemire's method with rejection
    uint64_t x = next();
    __uint128_t m = (__uint128_t)x * n;
    uint64_t lo = (uint64_t)m;
    if (lo < n) {
      const uint64_t t = (0 - n) % n;
      while (lo < t) {
        x = next();
        m = (__uint128_t)x * n;
        lo = (uint64_t)m;
      }
    }
    return (uint64_t)(m >> 64);
  }
};

uint64_t mix(uint64_t a, uint64_t b) { return splitmix64(a ^ splitmix64(b + 0x632BE59BD9B4E019ULL)); }

template <class T>
void shuffle(std::vector<T>& v, Rng& rng) {  // Fisher-Yates
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(i)]);
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xCBF29CE484222325ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001B3ULL;
  }
  return h;
}

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

}  // namespace

int split_number(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kSplitNames[i]) return i;
  DSV3_FAIL("unknown data split '" << name << "' (train, valid or test)");
}

std::vector<int64_t> split_boundaries(const std::string& split, int64_t n, const std::string& what) {
  std::vector<double> w;
  std::stringstream ss(split);
  for (std::string tok; std::getline(ss, tok, ',');) {
    tok = trim(tok);
    size_t used = 0;
    double v = -1;
    try {
      v = std::stod(tok, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    DSV3_CHECK(used == tok.size() && !tok.empty() && std::isfinite(v) && v >= 0,
               what << " '" << split << "': '" << tok << "' is not a non-negative number");
    w.push_back(v);
  }
  DSV3_CHECK(!w.empty() && w.size() <= 3, what << " '" << split << "': expected 1 to 3 comma-separated weights");
  w.resize(3, 0.0);
  const double sum = w[0] + w[1] + w[2];
  DSV3_CHECK(sum > 0, what << " '" << split << "': the weights sum to 0");
  std::vector<int64_t> b{0};
  for (double x : w) b.push_back(b.back() + (int64_t)std::nearbyint(x / sum * (double)n));  // Python round
  const int64_t diff = b.back() - n;
  for (size_t i = 1; i < b.size(); ++i) b[i] = std::clamp<int64_t>(b[i] - diff, 0, n);
  return b;
}

// ---- GptDataset ------------------------------------------------------------------------------------

GptDataset::GptDataset(const GptDatasetOptions& opts) : opts_(opts), data_(opts.prefix) {
  DSV3_CHECK(opts.seq_length >= 1, opts.prefix << ": seq_length " << opts.seq_length << " must be >= 1");
  DSV3_CHECK(opts.num_samples >= 0, opts.prefix << ": num_samples " << opts.num_samples << " must be >= 0");
  DSV3_CHECK(opts.split_index >= 0 && opts.split_index < 3, opts.prefix << ": split index " << opts.split_index);
  const auto b = split_boundaries(opts.split, data_.num_documents());
  doc_begin_ = b[opts.split_index];
  doc_end_ = b[opts.split_index + 1];
  for (int64_t d = doc_begin_; d < doc_end_; ++d) tokens_per_epoch_ += data_.document_length(d);
  const char* sname = kSplitNames[opts.split_index];
  if (tokens_per_epoch_ == 0) {
    DSV3_CHECK(opts.num_samples == 0, opts.prefix << ": the " << sname << " split (documents [" << doc_begin_ << ", "
                                                  << doc_end_ << ") of " << data_.num_documents() << ", data.split '"
                                                  << opts.split << "') has no tokens, " << opts.num_samples
                                                  << " samples requested");
    sample_idx_ = {0, 0};
    return;
  }
  // Megatron's _get_num_epochs: the fewest epochs giving num_samples samples.
  num_epochs_ = 1;
  while ((num_epochs_ * tokens_per_epoch_ - 1) / opts.seq_length < opts.num_samples) ++num_epochs_;

  std::error_code ec;
  const fs::path abs = fs::absolute(fs::path(opts.prefix), ec);
  std::ostringstream desc;
  desc << "dsv3 GptDataset v1\npath=" << (ec ? opts.prefix : abs.lexically_normal().string())
       << "\nidx_bytes=" << fs::file_size(opts.prefix + ".idx", ec) << "\nnum_documents=" << data_.num_documents()
       << "\nsplit=" << opts.split << "\nsplit_index=" << opts.split_index << "\nseq_length=" << opts.seq_length
       << "\nseed=" << opts.seed << "\nnum_samples=" << opts.num_samples << "\n";
  hash_ = fnv1a(desc.str());
  if (opts.use_cache) {
    const fs::path p(opts.prefix);
    const fs::path dir = opts.cache_dir.empty() ? p.parent_path() : fs::path(opts.cache_dir);
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", (unsigned long long)hash_);
    cache_prefix_ = (dir / (p.filename().string() + "." + sname + "." + hex)).string();
    if (load_cache()) {
      from_cache_ = true;
      return;
    }
  }
  build();
  if (opts.use_cache) save_cache();
}

void GptDataset::build() {
  const int64_t n_docs = doc_end_ - doc_begin_, seq = opts_.seq_length;
  const uint64_t base = mix(opts_.seed, 0x5EED0000ULL + (uint64_t)opts_.split_index);
  // document index: each epoch a fresh permutation of the split's documents
  doc_idx_.resize(num_epochs_ * n_docs);
  for (int64_t e = 0; e < num_epochs_; ++e) {
    std::vector<int64_t> perm(n_docs);
    std::iota(perm.begin(), perm.end(), doc_begin_);
    Rng rng(mix(base, 0xD0C0000000ULL + (uint64_t)e));
    shuffle(perm, rng);
    std::copy(perm.begin(), perm.end(), doc_idx_.begin() + e * n_docs);
  }
  // sample index (Megatron helpers.cpp build_sample_idx with one extra token per sample)
  const int64_t n_samples = (num_epochs_ * tokens_per_epoch_ - 1) / seq;
  sample_idx_.resize(2 * (n_samples + 1));
  int64_t pos = 0, off = 0;
  sample_idx_[0] = 0;
  sample_idx_[1] = 0;
  for (int64_t s = 1; s <= n_samples; ++s) {
    int64_t remaining = seq + 1;
    while (remaining != 0) {
      const int64_t len = data_.document_length(doc_idx_[pos]) - off;
      remaining -= len;
      if (remaining <= 0) {
        off += remaining + len - 1;  // the last token is also the next sample's first
        remaining = 0;
      } else {
        ++pos;
        off = 0;
      }
    }
    sample_idx_[2 * s] = pos;
    sample_idx_[2 * s + 1] = off;
  }
  shuffle_idx_.resize(n_samples);
  std::iota(shuffle_idx_.begin(), shuffle_idx_.end(), 0);
  Rng rng(mix(base, 0x5A0FF1E000ULL));
  shuffle(shuffle_idx_, rng);
}

namespace {

bool read_cache_file(const std::string& path, uint64_t hash, size_t count, std::vector<int64_t>& v) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  char magic[8];
  uint64_t h = 0, n = 0;
  f.read(magic, 8);
  f.read(reinterpret_cast<char*>(&h), 8);
  f.read(reinterpret_cast<char*>(&n), 8);
  if (!f || std::memcmp(magic, kCacheMagic, 8) != 0 || h != hash || n != count) return false;
  v.resize(count);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(8 * count));
  if (!f) return false;
  f.peek();
  return f.eof();  // nothing after the data
}

void write_cache_file(const std::string& path, uint64_t hash, const std::vector<int64_t>& v) {
  // unique among the ranks (of all hosts) that may write the same cache at once
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  const std::string tmp = path + ".tmp." + host + "." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    DSV3_CHECK(f.good(), tmp << ": cannot open for writing (" << std::strerror(errno) << ")");
    const uint64_t n = v.size();
    f.write(kCacheMagic, 8);
    f.write(reinterpret_cast<const char*>(&hash), 8);
    f.write(reinterpret_cast<const char*>(&n), 8);
    f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(8 * n));
    f.close();
    DSV3_CHECK(!f.fail(), tmp << ": write failed");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);  // atomic: concurrent ranks never see a partial file
  if (ec) {
    fs::remove(tmp, ec);
    DSV3_FAIL(path << ": cannot rename the cache file into place");
  }
}

}  // namespace

bool GptDataset::load_cache() {
  const int64_t n_docs = doc_end_ - doc_begin_;
  const int64_t n_samples = (num_epochs_ * tokens_per_epoch_ - 1) / opts_.seq_length;
  std::vector<int64_t> d, s, sh;
  if (!read_cache_file(cache_prefix_ + ".doc_idx", hash_, num_epochs_ * n_docs, d) ||
      !read_cache_file(cache_prefix_ + ".sample_idx", hash_, 2 * (n_samples + 1), s) ||
      !read_cache_file(cache_prefix_ + ".shuffle_idx", hash_, n_samples, sh))
    return false;
  // contents: documents of the split, samples in order and in range, a permutation
  for (int64_t x : d)
    if (x < doc_begin_ || x >= doc_end_) return false;
  for (int64_t k = 0; k <= n_samples; ++k) {
    const int64_t p = s[2 * k], o = s[2 * k + 1];
    if (p < 0 || p >= (int64_t)d.size() || o < 0 || o >= data_.document_length(d[p])) return false;
    if (k > 0 && (p < s[2 * k - 2] || (p == s[2 * k - 2] && o <= s[2 * k - 1]))) return false;
  }
  std::vector<char> seen(n_samples, 0);
  for (int64_t x : sh) {
    if (x < 0 || x >= n_samples || seen[x]) return false;
    seen[x] = 1;
  }
  doc_idx_ = std::move(d);
  sample_idx_ = std::move(s);
  shuffle_idx_ = std::move(sh);
  DSV3_LOG(debug) << "data: loaded index cache " << cache_prefix_ << ".*";
  return true;
}

void GptDataset::save_cache() const {
  try {
    std::error_code ec;
    const fs::path dir = fs::path(cache_prefix_).parent_path();
    if (!dir.empty()) fs::create_directories(dir, ec);
    write_cache_file(cache_prefix_ + ".doc_idx", hash_, doc_idx_);
    write_cache_file(cache_prefix_ + ".sample_idx", hash_, sample_idx_);
    write_cache_file(cache_prefix_ + ".shuffle_idx", hash_, shuffle_idx_);
  } catch (const Error& e) {
    DSV3_LOG(warning) << "data: index cache not written (" << e.what() << "); the indices stay in memory";
  }
}

void GptDataset::fill(int64_t k, int64_t* out) const {
  int64_t p = sample_idx_[2 * k], o = sample_idx_[2 * k + 1];
  const int64_t p1 = sample_idx_[2 * k + 2], o1 = sample_idx_[2 * k + 3];
  int64_t n = 0;
  while (p < p1) {
    const int64_t len = data_.document_length(doc_idx_[p]) - o;
    data_.read_document(doc_idx_[p], o, len, out + n);
    n += len;
    ++p;
    o = 0;
  }
  data_.read_document(doc_idx_[p1], o, o1 - o + 1, out + n);
  n += o1 - o + 1;
  DSV3_CHECK(n == opts_.seq_length + 1, opts_.prefix << ": sample " << k << " has " << n << " tokens, expected "
                                                     << opts_.seq_length + 1 << " (corrupt index?)");
  if (opts_.vocab_size > 0)
    for (int64_t j = 0; j < n; ++j)
      DSV3_CHECK(out[j] >= 0 && out[j] < opts_.vocab_size,
                 opts_.prefix << ".bin: token " << out[j] << " outside the vocabulary [0, " << opts_.vocab_size
                              << ") (sample " << k << "; tokenizer and model.vocab_size differ?)");
}

void GptDataset::get(int64_t i, int64_t* out) const {
  DSV3_CHECK(i >= 0 && i < size(), opts_.prefix << ": sample " << i << " out of range [0, " << size() << ")");
  fill(shuffle_idx_[i], out);
}

std::vector<int64_t> GptDataset::sample_unshuffled(int64_t k) const {
  DSV3_CHECK(k >= 0 && k < size(), opts_.prefix << ": sample " << k << " out of range [0, " << size() << ")");
  std::vector<int64_t> v(opts_.seq_length + 1);
  fill(k, v.data());
  return v;
}

std::string GptDataset::describe() const {
  std::ostringstream os;
  os << "GptDataset " << opts_.prefix << " [" << kSplitNames[opts_.split_index] << ": documents " << doc_begin_ << ".."
     << doc_end_ << " of " << data_.num_documents() << ", " << tokens_per_epoch_ << " tokens/epoch, " << num_epochs_
     << " epoch(s), " << size() << " samples of " << opts_.seq_length + 1 << " tokens"
     << (from_cache_ ? ", indices from cache" : "") << "]";
  return os.str();
}

// ---- blending --------------------------------------------------------------------------------------

BlendIndices blend_indices(const std::vector<double>& weights, int64_t n) {
  DSV3_CHECK(!weights.empty(), "blend: no datasets");
  DSV3_CHECK(weights.size() < (size_t)INT32_MAX, "blend: too many datasets");
  double sum = 0;
  for (double w : weights) {
    DSV3_CHECK(std::isfinite(w) && w > 0, "blend: dataset weight " << w << " must be > 0");
    sum += w;
  }
  BlendIndices b;
  b.dataset.resize(n);
  b.dataset_sample.resize(n);
  b.counts.assign(weights.size(), 0);
  for (int64_t i = 0; i < n; ++i) {
    const double x = std::max<double>((double)i, 1.0);
    size_t best = 0;
    double best_err = weights[0] / sum * x - (double)b.counts[0];
    for (size_t k = 1; k < weights.size(); ++k) {
      const double err = weights[k] / sum * x - (double)b.counts[k];
      if (err > best_err) {
        best_err = err;
        best = k;
      }
    }
    b.dataset[i] = (int32_t)best;
    b.dataset_sample[i] = b.counts[best]++;
  }
  return b;
}

BlendedDataset::BlendedDataset(std::vector<std::unique_ptr<TokenSource>> datasets, std::vector<double> weights,
                               int64_t num_samples)
    : datasets_(std::move(datasets)), weights_(std::move(weights)) {
  DSV3_CHECK(!datasets_.empty() && datasets_.size() == weights_.size(),
             "blend: " << datasets_.size() << " datasets but " << weights_.size() << " weights");
  bi_ = blend_indices(weights_, num_samples);
  const double sum = std::accumulate(weights_.begin(), weights_.end(), 0.0);
  for (auto& w : weights_) w /= sum;
  for (size_t k = 0; k < datasets_.size(); ++k) {
    DSV3_CHECK(datasets_[k]->seq_length() == datasets_[0]->seq_length(),
               "blend: " << datasets_[k]->describe() << " has another seq_length than " << datasets_[0]->describe());
    DSV3_CHECK(datasets_[k]->size() >= bi_.counts[k], "blend: " << datasets_[k]->describe() << " has "
                                                                << datasets_[k]->size() << " samples, the mixture needs "
                                                                << bi_.counts[k]);
  }
}

void BlendedDataset::get(int64_t i, int64_t* out) const {
  DSV3_CHECK(i >= 0 && i < size(), "blended dataset: sample " << i << " out of range [0, " << size() << ")");
  datasets_[bi_.dataset[i]]->get(bi_.dataset_sample[i], out);
}

std::string BlendedDataset::describe() const {
  std::ostringstream os;
  os << "BlendedDataset of " << datasets_.size() << " (" << size() << " samples):";
  for (size_t k = 0; k < datasets_.size(); ++k) os << " " << weights_[k] << " x " << datasets_[k]->describe() << ";";
  return os.str();
}

// ---- synthetic -------------------------------------------------------------------------------------

SyntheticDataset::SyntheticDataset(int64_t num_samples, int64_t seq_length, int64_t vocab_size, uint64_t seed)
    : n_(num_samples), seq_(seq_length), vocab_(vocab_size), seed_(seed) {
  DSV3_CHECK(num_samples >= 0 && seq_length >= 1 && vocab_size >= 1,
             "synthetic data: bad sizes (samples " << num_samples << ", seq_length " << seq_length << ", vocab "
                                                   << vocab_size << ")");
}

void SyntheticDataset::get(int64_t i, int64_t* out) const {
  DSV3_CHECK(i >= 0 && i < n_, "synthetic data: sample " << i << " out of range [0, " << n_ << ")");
  const uint64_t base = mix(seed_, (uint64_t)i);
  for (int64_t j = 0; j <= seq_; ++j)
    out[j] = (int64_t)(((__uint128_t)splitmix64(base + (uint64_t)j * 0x9E3779B97F4A7C15ULL) * (uint64_t)vocab_) >> 64);
}

std::string SyntheticDataset::describe() const {
  std::ostringstream os;
  os << "SyntheticDataset (" << n_ << " samples of " << seq_ + 1 << " random tokens < " << vocab_ << ", seed " << seed_
     << ")";
  return os.str();
}

// ---- from the deck ---------------------------------------------------------------------------------

std::unique_ptr<TokenSource> make_dataset(const Deck& deck, const std::string& split, int64_t num_samples,
                                          int64_t seq_length, int64_t vocab_size) {
  const int s = split_number(split);
  DSV3_CHECK(num_samples >= 0, "data: num_samples " << num_samples << " must be >= 0");
  DSV3_CHECK(seq_length >= 1, "data: seq_length " << seq_length << " must be >= 1");
  DSV3_CHECK(vocab_size >= 1, "data: vocab_size " << vocab_size << " must be >= 1");
  const uint64_t seed = (uint64_t)deck.get<int64_t>("train.seed");
  const std::string paths = trim(deck.get<std::string>("data.paths"));
  const std::string where = "data.paths (" + deck.origin("data.paths") + ")";
  DSV3_CHECK(!paths.empty(), where << " is empty: give dataset prefixes (\"0.7 a 0.3 b\") or synthetic");
  std::unique_ptr<TokenSource> src;
  if (paths == "synthetic") {
    src = std::make_unique<SyntheticDataset>(num_samples, seq_length, vocab_size, mix(seed, 0x5717000ULL + (uint64_t)s));
  } else {
    std::vector<std::string> tok;
    {
      std::stringstream ss(paths);
      for (std::string t; ss >> t;) tok.push_back(t);
    }
    std::vector<double> weights;
    std::vector<std::string> prefixes;
    if (tok.size() == 1) {
      weights = {1.0};
      prefixes = tok;
    } else {
      DSV3_CHECK(tok.size() % 2 == 0, where << ": expected PREFIX or 'WEIGHT PREFIX WEIGHT PREFIX ...', got '" << paths << "'");
      for (size_t i = 0; i < tok.size(); i += 2) {
        size_t used = 0;
        double w = -1;
        try {
          w = std::stod(tok[i], &used);
        } catch (const std::exception&) {
          used = 0;
        }
        DSV3_CHECK(used == tok[i].size() && std::isfinite(w) && w > 0,
                   where << ": weight '" << tok[i] << "' (before '" << tok[i + 1] << "') is not a positive number");
        weights.push_back(w);
        prefixes.push_back(tok[i + 1]);
      }
    }
    const std::string split_text = deck.get<std::string>("data.split");
    split_boundaries(split_text, 1, "data.split (" + deck.origin("data.split") + ")");  // validates the text
    GptDatasetOptions o;
    o.seq_length = seq_length;
    o.seed = seed;
    o.split = split_text;
    o.split_index = s;
    o.cache_dir = deck.path("data.cache_dir");
    o.vocab_size = vocab_size;
    auto open = [&](size_t k, int64_t n) {
      o.prefix = deck.resolve_path("data.paths", prefixes[k]);
      o.num_samples = n;
      try {
        return std::make_unique<GptDataset>(o);
      } catch (const Error& e) {
        DSV3_FAIL(where << " entry '" << prefixes[k] << "': " << e.what());
      }
    };
    if (prefixes.size() == 1) {
      src = open(0, num_samples);
    } else {
      const BlendIndices bi = blend_indices(weights, num_samples);
      std::vector<std::unique_ptr<TokenSource>> ds;
      for (size_t k = 0; k < prefixes.size(); ++k) ds.push_back(open(k, bi.counts[k]));
      src = std::make_unique<BlendedDataset>(std::move(ds), weights, num_samples);
    }
  }
  DSV3_LOG(info) << "data (" << split << "): " << src->describe();
  return src;
}

}  // namespace dsv3
