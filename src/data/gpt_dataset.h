// defines: dsv3::TokenSource (training samples of seq_length+1 tokens), dsv3::GptDataset (Megatron's
//          GPTDataset over a .bin/.idx), dsv3::BlendedDataset (weighted mixture), dsv3::SyntheticDataset,
//          dsv3::make_dataset (from the deck's [data] keys), dsv3::split_boundaries, dsv3::blend_indices
// GptDataset, as Megatron-LM builds it (megatron/core/datasets/gpt_dataset.py + helpers.cpp):
//   documents of the split: [split_boundaries[s], split_boundaries[s+1]) of the file's documents
//   epochs:         the fewest whose tokens give num_samples samples: (epochs * tokens - 1) / seq_length
//   document index: the split's documents, shuffled per epoch, epoch after epoch
//   sample index:   (position in the document index, token offset) where each sample starts; sample k is the
//                   seq_length+1 tokens from its start, across document (and epoch) boundaries, so consecutive
//                   samples share one token (inputs/labels shifted by one)
//   shuffle index:  a permutation of the samples; get(i) returns sample shuffle[i]
// The three arrays are cached in data.cache_dir (default: next to the data) as
// <name>.<split>.<hash>.{doc,sample,shuffle}_idx, hash = FNV-1a of (absolute path, .idx size, split, seq_length,
// seed, num_samples), and reused when present and valid. Randomness is a counter-based splitmix64 stream,
// identical on every platform: the same deck and seed give the same samples.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "io/indexed_dataset.h"

namespace dsv3 {

class Deck;

class TokenSource {
 public:
  virtual ~TokenSource() = default;
  virtual int64_t size() const = 0;        // samples available (get(i) for i in [0, size()))
  virtual int64_t seq_length() const = 0;  // a sample is seq_length() + 1 tokens
  // out receives seq_length() + 1 token ids. Thread-safe.
  virtual void get(int64_t i, int64_t* out) const = 0;
  virtual std::string describe() const = 0;  // one line for the log
};

// data.split text ("98,2,0"; 1-3 non-negative weights, missing ones 0) -> 4 document boundaries for
// train/valid/test, rounded as Megatron does. what names the key in errors.
std::vector<int64_t> split_boundaries(const std::string& split, int64_t num_documents,
                                      const std::string& what = "data.split");
int split_number(const std::string& split_name);  // train 0, valid 1, test 2; throws otherwise

struct GptDatasetOptions {
  std::string prefix;        // the .bin/.idx prefix
  int64_t seq_length = 0;    // tokens per sample minus one
  int64_t num_samples = 0;   // at least this many samples are built
  uint64_t seed = 1234;
  std::string split = "98,2,0";
  int split_index = 0;       // 0 train, 1 valid, 2 test
  std::string cache_dir;     // "": the directory of the data
  bool use_cache = true;     // false: build in memory, read and write no cache files
  int64_t vocab_size = 0;    // > 0: get() checks every token is below it
};

class GptDataset : public TokenSource {
 public:
  explicit GptDataset(const GptDatasetOptions& opts);
  int64_t size() const override { return (int64_t)shuffle_idx_.size(); }
  int64_t seq_length() const override { return opts_.seq_length; }
  void get(int64_t i, int64_t* out) const override;
  std::string describe() const override;

  const IndexedDataset& data() const { return data_; }
  int64_t first_document() const { return doc_begin_; }  // the split's documents: [first, end)
  int64_t end_document() const { return doc_end_; }
  int64_t num_epochs() const { return num_epochs_; }
  int64_t tokens_per_epoch() const { return tokens_per_epoch_; }
  const std::vector<int64_t>& document_index() const { return doc_idx_; }    // file document ids
  const std::vector<int64_t>& sample_index() const { return sample_idx_; }   // 2 * (size() + 1), pairs
  const std::vector<int64_t>& shuffle_index() const { return shuffle_idx_; }
  bool loaded_from_cache() const { return from_cache_; }
  const std::string& cache_prefix() const { return cache_prefix_; }  // "" when not cached
  std::vector<int64_t> sample_unshuffled(int64_t k) const;  // sample k of the sample index (tests)

 private:
  void build();
  bool load_cache();
  void save_cache() const;
  void fill(int64_t k, int64_t* out) const;
  GptDatasetOptions opts_;
  IndexedDataset data_;
  int64_t doc_begin_ = 0, doc_end_ = 0, num_epochs_ = 0, tokens_per_epoch_ = 0;
  uint64_t hash_ = 0;
  std::string cache_prefix_;
  bool from_cache_ = false;
  std::vector<int64_t> doc_idx_, sample_idx_, shuffle_idx_;
};

// Megatron's blending rule: sample i goes to the dataset whose realised count lags its target
// weight * max(i, 1) the most (first on ties); dataset_sample[i] counts that dataset's samples so far.
struct BlendIndices {
  std::vector<int32_t> dataset;         // [n]
  std::vector<int64_t> dataset_sample;  // [n]
  std::vector<int64_t> counts;          // samples per dataset
};
BlendIndices blend_indices(const std::vector<double>& weights, int64_t n);  // weights > 0, normalised inside

class BlendedDataset : public TokenSource {
 public:
  // Each datasets[k] must have at least blend_indices(weights, num_samples).counts[k] samples.
  BlendedDataset(std::vector<std::unique_ptr<TokenSource>> datasets, std::vector<double> weights, int64_t num_samples);
  int64_t size() const override { return (int64_t)bi_.dataset.size(); }
  int64_t seq_length() const override { return datasets_.front()->seq_length(); }
  void get(int64_t i, int64_t* out) const override;
  std::string describe() const override;
  const BlendIndices& indices() const { return bi_; }
  const std::vector<double>& weights() const { return weights_; }  // normalised

 private:
  std::vector<std::unique_ptr<TokenSource>> datasets_;
  std::vector<double> weights_;
  BlendIndices bi_;
};

// Random tokens in [0, vocab): token j of sample i is a hash of (seed, i, j). For benchmarks.
class SyntheticDataset : public TokenSource {
 public:
  SyntheticDataset(int64_t num_samples, int64_t seq_length, int64_t vocab_size, uint64_t seed);
  int64_t size() const override { return n_; }
  int64_t seq_length() const override { return seq_; }
  void get(int64_t i, int64_t* out) const override;
  std::string describe() const override;

 private:
  int64_t n_, seq_, vocab_;
  uint64_t seed_;
};

// From the deck: data.paths ("synthetic", "PREFIX" or "W1 PREFIX1 W2 PREFIX2 ..."; prefixes relative to
// the deck), data.split, data.cache_dir, train.seed. split: "train", "valid" or "test". Returns at least
// num_samples samples of seq_length + 1 tokens, every token < vocab_size.
std::unique_ptr<TokenSource> make_dataset(const Deck& deck, const std::string& split, int64_t num_samples,
                                          int64_t seq_length, int64_t vocab_size);

}  // namespace dsv3
