// tests: Megatron .bin/.idx writer/reader round trip, byte layout, and every malformed-index error
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/indexed_dataset.h"

using namespace dsv3;
using ::testing::HasSubstr;

namespace {

std::string make_tmp_dir() {
  std::string t = ::testing::TempDir() + "dsv3_idx_XXXXXX";
  std::vector<char> buf(t.begin(), t.end());
  buf.push_back('\0');
  char* d = ::mkdtemp(buf.data());
  EXPECT_NE(d, nullptr);
  return std::string(d);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

template <class T>
void poke(std::string& s, size_t off, T v) {
  std::memcpy(&s[off], &v, sizeof v);
}

// Three documents: {1,2,3}, {}, {65535, 0, 7, 8} (uint16 range).
std::vector<std::vector<int64_t>> sample_docs() { return {{1, 2, 3}, {}, {65535, 0, 7, 8}}; }

std::string write_sample(const std::string& dir) {
  const std::string prefix = dir + "/ds";
  IndexedDatasetBuilder b(prefix, MmidxDtype::U16);
  for (const auto& d : sample_docs()) b.add_document(d);
  b.finalize();
  return prefix;
}

// Expects IndexedDataset(prefix) to throw a message naming the .idx file and containing what.
void expect_error(const std::string& prefix, const std::string& what, const std::string& file_suffix = ".idx") {
  try {
    IndexedDataset ds(prefix);
    ADD_FAILURE() << "no error for '" << what << "'";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(prefix + file_suffix));
    EXPECT_THAT(e.what(), HasSubstr(what));
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << "one line";
  }
}

}  // namespace

TEST(IndexedDataset, RoundTripUint16) {
  const std::string dir = make_tmp_dir(), prefix = write_sample(dir);
  IndexedDataset ds(prefix);
  const auto docs = sample_docs();
  EXPECT_EQ(ds.dtype(), MmidxDtype::U16);
  ASSERT_EQ(ds.num_sequences(), 3);
  ASSERT_EQ(ds.num_documents(), 3);
  EXPECT_EQ(ds.total_tokens(), 7);
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(ds.get(i), docs[i]);
    EXPECT_EQ(ds.document_length(i), (int64_t)docs[i].size());
  }
  int64_t two[2];
  ds.read(2, 1, 2, two);
  EXPECT_EQ(two[0], 0);
  EXPECT_EQ(two[1], 7);
  EXPECT_THROW(ds.read(2, 3, 2, two), Error);
  EXPECT_THROW(ds.get(3), Error);
}

TEST(IndexedDataset, ByteLayoutIsMegatrons) {
  const std::string dir = make_tmp_dir(), prefix = write_sample(dir);
  const std::string idx = read_file(prefix + ".idx"), bin = read_file(prefix + ".bin");
  ASSERT_EQ(idx.size(), 34u + 3 * 4 + 3 * 8 + 4 * 8);
  EXPECT_EQ(idx.substr(0, 9), std::string("MMIDIDX\0\0", 9));
  uint64_t version, s, d;
  std::memcpy(&version, &idx[9], 8);
  std::memcpy(&s, &idx[18], 8);
  std::memcpy(&d, &idx[26], 8);
  EXPECT_EQ(version, 1u);
  EXPECT_EQ(idx[17], 8);  // uint16
  EXPECT_EQ(s, 3u);
  EXPECT_EQ(d, 4u);       // boundaries: documents + 1
  int32_t sizes[3];
  int64_t ptr[3], doc[4];
  std::memcpy(sizes, &idx[34], 12);
  std::memcpy(ptr, &idx[46], 24);
  std::memcpy(doc, &idx[70], 32);
  EXPECT_EQ(std::vector<int32_t>(sizes, sizes + 3), (std::vector<int32_t>{3, 0, 4}));
  EXPECT_EQ(std::vector<int64_t>(ptr, ptr + 3), (std::vector<int64_t>{0, 6, 6}));
  EXPECT_EQ(std::vector<int64_t>(doc, doc + 4), (std::vector<int64_t>{0, 1, 2, 3}));
  ASSERT_EQ(bin.size(), 14u);
  uint16_t t[7];
  std::memcpy(t, bin.data(), 14);
  EXPECT_EQ(std::vector<uint16_t>(t, t + 7), (std::vector<uint16_t>{1, 2, 3, 65535, 0, 7, 8}));
}

TEST(IndexedDataset, DtypeFromVocabAndMultiSequenceDocuments) {
  EXPECT_EQ(mmidx_dtype_for_vocab(4096), MmidxDtype::U16);
  EXPECT_EQ(mmidx_dtype_for_vocab(65499), MmidxDtype::U16);
  EXPECT_EQ(mmidx_dtype_for_vocab(65500), MmidxDtype::I32);
  EXPECT_EQ(mmidx_dtype_for_vocab(129280), MmidxDtype::I32);
  const std::string dir = make_tmp_dir(), prefix = dir + "/big";
  {
    auto b = IndexedDatasetBuilder::for_vocab(prefix, 129280);
    b.add_sequence(std::vector<int64_t>{129279, 5});
    b.add_sequence(std::vector<int64_t>{6});
    b.end_document();
    b.add_document(std::vector<int64_t>{100000});
    const std::vector<int64_t> too_big{129280};
    EXPECT_THROW(b.add_document(too_big), Error);
    const std::vector<int64_t> negative{-1};
    EXPECT_THROW(b.add_document(negative), Error);
    b.finalize();
    EXPECT_THROW(b.finalize(), Error);
  }
  IndexedDataset ds(prefix);
  EXPECT_EQ(ds.dtype(), MmidxDtype::I32);
  EXPECT_EQ(ds.num_sequences(), 3);
  EXPECT_EQ(ds.num_documents(), 2);
  EXPECT_EQ(ds.document_length(0), 3);
  int64_t t[3];
  ds.read_document(0, 0, 3, t);
  EXPECT_EQ(std::vector<int64_t>(t, t + 3), (std::vector<int64_t>{129279, 5, 6}));
  ds.read_document(0, 1, 2, t);
  EXPECT_EQ(std::vector<int64_t>(t, t + 2), (std::vector<int64_t>{5, 6}));
  EXPECT_EQ(ds.get(2), (std::vector<int64_t>{100000}));
  // a uint16 builder refuses tokens beyond 65535 and names the file
  auto small = IndexedDatasetBuilder::for_vocab(dir + "/small", 1000);
  try {
    small.add_document(std::vector<int64_t>{1000});
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(dir + "/small.bin"));
  }
}

TEST(IndexedDataset, MalformedIndexErrors) {
  const std::string dir = make_tmp_dir(), good_prefix = write_sample(dir);
  const std::string good = read_file(good_prefix + ".idx"), bin = read_file(good_prefix + ".bin");
  int n = 0;
  auto variant = [&](const std::string& idx, const std::string& bin_bytes) {
    const std::string p = dir + "/bad" + std::to_string(n++);
    write_file(p + ".idx", idx);
    write_file(p + ".bin", bin_bytes);
    return p;
  };
  expect_error(variant(good.substr(0, 20), bin), "truncated header");
  expect_error(variant(good.substr(0, good.size() - 8), bin), "truncated");
  expect_error(variant(good + std::string(8, '\0'), bin), "trailing bytes");
  {
    std::string s = good;
    s[0] = 'X';
    expect_error(variant(s, bin), "bad magic");
  }
  {
    std::string s = good;
    poke<uint64_t>(s, 9, 2);
    expect_error(variant(s, bin), "unsupported version 2");
  }
  {
    std::string s = good;
    s[17] = 9;
    expect_error(variant(s, bin), "unknown dtype code 9");
    s[17] = 6;
    expect_error(variant(s, bin), "not a token type");
  }
  {
    std::string s = good;
    poke<uint64_t>(s, 18, 1000000);  // sequence count larger than the file holds
    expect_error(variant(s, bin), "truncated or corrupt");
  }
  {
    std::string s = good;
    poke<int32_t>(s, 34 + 8, 5);  // third sequence: 5 tokens from byte 6 -> 16 > 14 bytes
    expect_error(variant(s, bin), "beyond the end");
  }
  {
    std::string s = good;
    poke<int64_t>(s, 46 + 16, 100);  // third sequence's offset past the .bin
    expect_error(variant(s, bin), "beyond the end");
    poke<int64_t>(s, 46 + 16, 7);  // not a multiple of the item size
    expect_error(variant(s, bin), "bad byte offset");
  }
  {
    std::string s = good;
    poke<int32_t>(s, 34, -1);
    expect_error(variant(s, bin), "negative length");
  }
  expect_error(variant(good, bin.substr(0, 10)), "beyond the end");  // truncated .bin
  {
    std::string s = good;
    poke<int64_t>(s, 70 + 16, 1);  // doc indices 0, 1, 1, 3 are fine; 0, 2, 1, 3 are not
    poke<int64_t>(s, 70 + 8, 2);
    expect_error(variant(s, bin), "not monotone");
  }
  {
    std::string s = good;
    poke<int64_t>(s, 70, 1);
    expect_error(variant(s, bin), "must start at 0");
  }
  {
    std::string s = good;
    poke<int64_t>(s, 70 + 24, 2);
    expect_error(variant(s, bin), "must equal the sequence count 3");
  }
  {
    std::string s = good;
    poke<int64_t>(s, 70 + 24, 4);
    expect_error(variant(s, bin), "> sequence count");
  }
  {
    const std::string p = variant(good, bin);
    std::remove((p + ".bin").c_str());
    expect_error(p, "cannot open", ".bin");
  }
  expect_error(dir + "/missing", "cannot open");
  EXPECT_NO_THROW(IndexedDataset(variant(good, bin)));  // the unmodified copy still loads
}
