// tests: GPT sample building (Megatron's document/sample/shuffle indices), splits, index cache, blending,
// synthetic data and make_dataset from the deck
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "core/deck.h"
#include "core/error.h"
#include "data/gpt_dataset.h"
#include "io/indexed_dataset.h"

using namespace dsv3;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

std::string make_tmp_dir() {
  std::string t = ::testing::TempDir() + "dsv3_gpt_XXXXXX";
  std::vector<char> buf(t.begin(), t.end());
  buf.push_back('\0');
  char* d = ::mkdtemp(buf.data());
  EXPECT_NE(d, nullptr);
  return std::string(d);
}

// n documents; document d has length (d * 7) % 23 (document 0 is empty), token j of d is d * 100 + j.
std::vector<std::vector<int64_t>> make_docs(int n) {
  std::vector<std::vector<int64_t>> docs(n);
  for (int d = 0; d < n; ++d)
    for (int j = 0; j < (d * 7) % 23; ++j) docs[d].push_back(d * 100 + j);
  return docs;
}

std::string write_docs(const std::string& prefix, const std::vector<std::vector<int64_t>>& docs) {
  auto b = IndexedDatasetBuilder::for_vocab(prefix, 65000);
  for (const auto& d : docs) b.add_document(d);
  b.finalize();
  return prefix;
}

GptDatasetOptions opts_for(const std::string& prefix, int64_t seq, int64_t n, const std::string& split = "100") {
  GptDatasetOptions o;
  o.prefix = prefix;
  o.seq_length = seq;
  o.num_samples = n;
  o.seed = 7;
  o.split = split;
  o.use_cache = false;
  return o;
}

}  // namespace

TEST(GptDataset, SplitBoundaries) {
  EXPECT_EQ(split_boundaries("98,2,0", 50), (std::vector<int64_t>{0, 49, 50, 50}));
  EXPECT_EQ(split_boundaries("1", 50), (std::vector<int64_t>{0, 50, 50, 50}));
  EXPECT_EQ(split_boundaries("8, 1, 1", 1000), (std::vector<int64_t>{0, 800, 900, 1000}));
  // Megatron: 3 + 3 + 3 = 9, and the shortfall of 1 shifts every boundary after the first
  EXPECT_EQ(split_boundaries("1,1,1", 10), (std::vector<int64_t>{0, 4, 7, 10}));
  for (const char* bad : {"a,b", "0,0,0", "1,2,3,4", "", "1,-1", "1,,2"}) {
    try {
      split_boundaries(bad, 10);
      ADD_FAILURE() << bad;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("data.split"));
    }
  }
  EXPECT_EQ(split_number("valid"), 1);
  EXPECT_THROW(split_number("validation"), Error);
}

TEST(GptDataset, SamplesAreConsecutiveTokensOfShuffledDocuments) {
  const std::string dir = make_tmp_dir();
  const auto docs = make_docs(40);
  const std::string prefix = write_docs(dir + "/d", docs);
  int64_t total = 0;
  for (const auto& d : docs) total += (int64_t)d.size();
  const int64_t seq = 16;
  GptDataset ds(opts_for(prefix, seq, (total - 1) / seq));  // exactly one epoch
  ASSERT_EQ(ds.num_epochs(), 1);
  EXPECT_EQ(ds.tokens_per_epoch(), total);
  EXPECT_EQ(ds.size(), (total - 1) / seq);
  // the document index is a permutation of the documents, not the identity
  std::vector<int64_t> perm = ds.document_index();
  EXPECT_NE(perm, [] { std::vector<int64_t> v(40); std::iota(v.begin(), v.end(), 0); return v; }());
  std::sort(perm.begin(), perm.end());
  for (int64_t d = 0; d < 40; ++d) EXPECT_EQ(perm[d], d);
  // sample k = tokens [k*seq, k*seq + seq] of the concatenation: every token of the epoch once (bar the tail)
  std::vector<int64_t> cat;
  for (int64_t d : ds.document_index()) cat.insert(cat.end(), docs[d].begin(), docs[d].end());
  for (int64_t k = 0; k < ds.size(); ++k) {
    const auto s = ds.sample_unshuffled(k);
    ASSERT_EQ((int64_t)s.size(), seq + 1);
    ASSERT_TRUE(std::equal(s.begin(), s.end(), cat.begin() + k * seq)) << "sample " << k;
  }
  EXPECT_LT(total - 1 - ds.size() * seq, seq);  // only the tail shorter than a sample is left out
  // get(i) is sample shuffle[i]; the shuffle is a permutation
  std::vector<int64_t> sh = ds.shuffle_index();
  std::vector<int64_t> out(seq + 1);
  for (int64_t i = 0; i < ds.size(); ++i) {
    ds.get(i, out.data());
    EXPECT_EQ(out, ds.sample_unshuffled(sh[i]));
  }
  std::sort(sh.begin(), sh.end());
  for (int64_t i = 0; i < ds.size(); ++i) EXPECT_EQ(sh[i], i);
  EXPECT_THROW(ds.get(ds.size(), out.data()), Error);
}

TEST(GptDataset, ManyEpochsEachAPermutation) {
  const std::string dir = make_tmp_dir();
  const auto docs = make_docs(12);
  const std::string prefix = write_docs(dir + "/d", docs);
  int64_t total = 0;
  for (const auto& d : docs) total += (int64_t)d.size();
  const int64_t seq = 8, n = 200;
  GptDataset ds(opts_for(prefix, seq, n));
  EXPECT_EQ(ds.num_epochs(), (n * seq + 1 + total - 1) / total);
  EXPECT_GE(ds.size(), n);
  const auto& di = ds.document_index();
  ASSERT_EQ((int64_t)di.size(), ds.num_epochs() * 12);
  std::set<std::vector<int64_t>> orders;
  for (int64_t e = 0; e < ds.num_epochs(); ++e) {
    std::vector<int64_t> ep(di.begin() + e * 12, di.begin() + (e + 1) * 12);
    orders.insert(ep);
    std::sort(ep.begin(), ep.end());
    for (int d = 0; d < 12; ++d) EXPECT_EQ(ep[d], d);
  }
  EXPECT_GT(orders.size(), 1u);  // shuffled anew each epoch
  std::vector<int64_t> cat;
  for (int64_t d : di) cat.insert(cat.end(), docs[d].begin(), docs[d].end());
  for (int64_t k = 0; k < ds.size(); ++k) {
    const auto s = ds.sample_unshuffled(k);
    ASSERT_TRUE(std::equal(s.begin(), s.end(), cat.begin() + k * seq)) << "sample " << k;
  }
}

TEST(GptDataset, DeterministicSplitsAndVocabCheck) {
  const std::string dir = make_tmp_dir();
  const std::string prefix = write_docs(dir + "/d", make_docs(50));
  GptDataset a(opts_for(prefix, 10, 100, "80,20,0")), b(opts_for(prefix, 10, 100, "80,20,0"));
  EXPECT_EQ(a.document_index(), b.document_index());
  EXPECT_EQ(a.sample_index(), b.sample_index());
  EXPECT_EQ(a.shuffle_index(), b.shuffle_index());
  auto o = opts_for(prefix, 10, 100, "80,20,0");
  o.seed = 8;
  GptDataset c(o);
  EXPECT_NE(a.shuffle_index(), c.shuffle_index());
  // train: documents [0, 40), valid: [40, 50)
  EXPECT_EQ(a.first_document(), 0);
  EXPECT_EQ(a.end_document(), 40);
  o = opts_for(prefix, 10, 20, "80,20,0");
  o.split_index = 1;
  GptDataset v(o);
  EXPECT_EQ(v.first_document(), 40);
  for (int64_t d : v.document_index()) EXPECT_TRUE(d >= 40 && d < 50);
  // an empty split cannot give samples
  o = opts_for(prefix, 10, 5, "100,0,0");
  o.split_index = 2;
  try {
    GptDataset e(o);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("test split"));
    EXPECT_THAT(e.what(), HasSubstr(prefix));
  }
  o.num_samples = 0;
  EXPECT_EQ(GptDataset(o).size(), 0);
  // tokens beyond the model's vocabulary are reported
  o = opts_for(prefix, 10, 10);
  o.vocab_size = 100;
  GptDataset small(o);
  std::vector<int64_t> out(11);
  try {
    for (int64_t i = 0; i < small.size(); ++i) small.get(i, out.data());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("outside the vocabulary"));
  }
}

TEST(GptDataset, IndexCacheIsReused) {
  const std::string dir = make_tmp_dir();
  const std::string prefix = write_docs(dir + "/d", make_docs(30));
  auto o = opts_for(prefix, 12, 50);
  o.use_cache = true;
  o.cache_dir = dir + "/cache";
  GptDataset first(o);
  EXPECT_FALSE(first.loaded_from_cache());
  for (const char* ext : {".doc_idx", ".sample_idx", ".shuffle_idx"})
    EXPECT_TRUE(fs::exists(first.cache_prefix() + ext)) << first.cache_prefix() << ext;
  GptDataset second(o);
  EXPECT_TRUE(second.loaded_from_cache());
  EXPECT_EQ(second.cache_prefix(), first.cache_prefix());
  EXPECT_EQ(first.document_index(), second.document_index());
  EXPECT_EQ(first.sample_index(), second.sample_index());
  EXPECT_EQ(first.shuffle_index(), second.shuffle_index());
  // other parameters: another key
  o.num_samples = 51;
  GptDataset other(o);
  EXPECT_FALSE(other.loaded_from_cache());
  EXPECT_NE(other.cache_prefix(), first.cache_prefix());
  // a damaged cache file is rebuilt, giving the same indices
  o.num_samples = 50;
  fs::resize_file(first.cache_prefix() + ".shuffle_idx", 30);
  GptDataset rebuilt(o);
  EXPECT_FALSE(rebuilt.loaded_from_cache());
  EXPECT_EQ(rebuilt.shuffle_index(), first.shuffle_index());
  EXPECT_TRUE(GptDataset(o).loaded_from_cache());
  // default location: next to the data
  o.cache_dir = "";
  GptDataset beside(o);
  EXPECT_EQ(fs::path(beside.cache_prefix()).parent_path(), fs::path(dir));
}

TEST(BlendedDataset, RatiosTrackWeights) {
  const std::vector<double> w{0.5, 0.3, 0.2};
  const int64_t n = 10000;
  const BlendIndices bi = blend_indices(w, n);
  std::vector<int64_t> seen(3, 0);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(bi.dataset_sample[i], seen[bi.dataset[i]]);
    ++seen[bi.dataset[i]];
    if (i >= 1000) {  // the running mixture tracks the weights all along
      for (int k = 0; k < 3; ++k) ASSERT_NEAR((double)seen[k] / (i + 1), w[k], 0.01);
    }
  }
  EXPECT_EQ(seen, bi.counts);
  for (int k = 0; k < 3; ++k) EXPECT_NEAR((double)bi.counts[k] / n, w[k], 0.01);
  // unnormalised weights give the same assignment
  EXPECT_EQ(blend_indices({5, 3, 2}, n).dataset, bi.dataset);
  EXPECT_THROW(blend_indices({1, 0}, 10), Error);
}

TEST(BlendedDataset, RoutesSamples) {
  std::vector<std::unique_ptr<TokenSource>> ds;
  ds.push_back(std::make_unique<SyntheticDataset>(700, 4, 50, 1));
  ds.push_back(std::make_unique<SyntheticDataset>(300, 4, 50, 2));
  const SyntheticDataset a(700, 4, 50, 1), b(300, 4, 50, 2);
  BlendedDataset bl(std::move(ds), {7, 3}, 1000);
  EXPECT_EQ(bl.size(), 1000);
  EXPECT_NEAR(bl.weights()[0], 0.7, 1e-12);
  std::vector<int64_t> x(5), y(5);
  for (int64_t i = 0; i < 1000; i += 37) {
    bl.get(i, x.data());
    (bl.indices().dataset[i] == 0 ? a : b).get(bl.indices().dataset_sample[i], y.data());
    EXPECT_EQ(x, y);
  }
  std::vector<std::unique_ptr<TokenSource>> few;
  few.push_back(std::make_unique<SyntheticDataset>(10, 4, 50, 1));
  few.push_back(std::make_unique<SyntheticDataset>(10, 4, 50, 2));
  EXPECT_THROW(BlendedDataset(std::move(few), {1, 1}, 100), Error);  // not enough samples
}

TEST(SyntheticDataset, DeterministicAndInRange) {
  SyntheticDataset a(100, 32, 1000, 5), b(100, 32, 1000, 5), c(100, 32, 1000, 6);
  std::vector<int64_t> x(33), y(33), z(33), w(33);
  a.get(17, x.data());
  b.get(17, y.data());
  c.get(17, z.data());
  a.get(18, w.data());
  EXPECT_EQ(x, y);
  EXPECT_NE(x, z);
  EXPECT_NE(x, w);
  for (int64_t t : x) EXPECT_TRUE(t >= 0 && t < 1000);
  EXPECT_THROW(a.get(100, x.data()), Error);
}

TEST(MakeDataset, FromDeck) {
  const std::string dir = make_tmp_dir();
  write_docs(dir + "/a", make_docs(30));
  write_docs(dir + "/b", make_docs(20));
  const std::string cache = "data.cache_dir=" + dir + "/cache";
  {
    const Deck d = Deck::defaults_only({"data.paths=0.7 " + dir + "/a 0.3 " + dir + "/b", cache, "data.split=80,20,0"});
    auto src = make_dataset(d, "train", 1000, 8, 65000);
    auto* bl = dynamic_cast<BlendedDataset*>(src.get());
    ASSERT_NE(bl, nullptr);
    EXPECT_EQ(src->size(), 1000);
    EXPECT_EQ(src->seq_length(), 8);
    EXPECT_NEAR((double)bl->indices().counts[0] / 1000, 0.7, 0.01);
    auto again = make_dataset(d, "train", 1000, 8, 65000);
    std::vector<int64_t> x(9), y(9);
    for (int64_t i = 0; i < 1000; i += 13) {
      src->get(i, x.data());
      again->get(i, y.data());
      ASSERT_EQ(x, y);
    }
    auto valid = make_dataset(d, "valid", 10, 8, 65000);
    EXPECT_EQ(valid->size(), 10);
  }
  {
    const Deck d = Deck::defaults_only({"data.paths=" + dir + "/a", cache});
    auto src = make_dataset(d, "train", 20, 8, 65000);
    EXPECT_NE(dynamic_cast<GptDataset*>(src.get()), nullptr);
    EXPECT_GE(src->size(), 20);
  }
  {
    const Deck d = Deck::defaults_only({"data.paths=synthetic", "train.seed=3"});
    auto t = make_dataset(d, "train", 5, 8, 100), v = make_dataset(d, "valid", 5, 8, 100);
    std::vector<int64_t> x(9), y(9);
    t->get(0, x.data());
    v->get(0, y.data());
    EXPECT_NE(x, y);  // the splits differ
  }
  auto expect_error = [&](const std::vector<std::string>& ov, const std::string& what) {
    try {
      make_dataset(Deck::defaults_only(ov), "train", 5, 8, 100);
      ADD_FAILURE() << what;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(what));
    }
  };
  expect_error({}, "data.paths");
  expect_error({"data.paths=0.5 " + dir + "/a 0.5"}, "data.paths");
  expect_error({"data.paths=x " + dir + "/a 0.5 " + dir + "/b"}, "weight 'x'");
  expect_error({"data.paths=" + dir + "/nope"}, dir + "/nope.idx");
  expect_error({"data.paths=" + dir + "/a", "data.split=1,x"}, "data.split");
}
