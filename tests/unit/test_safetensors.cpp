// tests: safetensors reader validation, writer round trip, bf16/f16 conversions, golden file read
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"

using ::testing::HasSubstr;

namespace {

std::string make_tmp_dir() {
  std::string t = ::testing::TempDir() + "dsv3_st_XXXXXX";
  std::vector<char> buf(t.begin(), t.end());
  buf.push_back('\0');
  char* d = ::mkdtemp(buf.data());
  EXPECT_NE(d, nullptr);
  return std::string(d);
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

// A file with the given header JSON (length taken from it) and data_bytes bytes of data.
std::string st_bytes(const std::string& header, size_t data_bytes) {
  return le64(header.size()) + header + std::string(data_bytes, '\x01');
}

// Returns the dsv3::Error message of opening the file with these bytes ("" if it opened).
std::string open_error(const std::string& bytes) {
  static int counter = 0;
  static const std::string dir = make_tmp_dir();
  const std::string path = dir + "/bad" + std::to_string(counter++) + ".safetensors";
  write_bytes(path, bytes);
  try {
    dsv3::SafetensorsFile f(path);
  } catch (const dsv3::Error& e) {
    std::string msg = e.what();
    EXPECT_THAT(msg, HasSubstr(path)) << "message must name the file";
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "message must be one line: " << msg;
    return msg;
  }
  return "";
}

std::string one(const std::string& entry) { return "{\"t\":" + entry + "}"; }

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

}  // namespace

TEST(Safetensors, DtypeNamesAndSizes) {
  using dsv3::DType;
  EXPECT_EQ(dsv3::dtype_size(DType::F32), 4u);
  EXPECT_EQ(dsv3::dtype_size(DType::F16), 2u);
  EXPECT_EQ(dsv3::dtype_size(DType::BF16), 2u);
  EXPECT_EQ(dsv3::dtype_size(DType::F8_E4M3), 1u);
  EXPECT_EQ(dsv3::dtype_size(DType::I64), 8u);
  EXPECT_EQ(dsv3::dtype_size(DType::I32), 4u);
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::I64, DType::I32})
    EXPECT_EQ(dsv3::dtype_from_name(dsv3::dtype_name(t), "ctx"), t);
  EXPECT_STREQ(dsv3::dtype_name(DType::F8_E4M3), "F8_E4M3");
  try {
    dsv3::dtype_from_name("F64", "my.tensor");
    FAIL() << "no throw";
  } catch (const dsv3::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("my.tensor"));
    EXPECT_THAT(e.what(), HasSubstr("F64"));
  }
}

TEST(Safetensors, Bf16F16Conversions) {
  EXPECT_EQ(dsv3::float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(dsv3::bf16_to_float(0x3F80), 1.0f);
  EXPECT_EQ(dsv3::bf16_to_float(0xC040), -3.0f);
  // ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1 (even); 1 + 3*2^-8 -> 1 + 2^-6
  EXPECT_EQ(dsv3::float_to_bf16(1.0f + 0x1p-8f), 0x3F80);
  EXPECT_EQ(dsv3::float_to_bf16(1.0f + 3 * 0x1p-8f), 0x3F82);
  EXPECT_EQ(dsv3::float_to_bf16(std::nextafter(1.0f + 0x1p-8f, 2.0f)), 0x3F81);
  EXPECT_EQ(dsv3::float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(dsv3::float_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  // rounds up to inf at the top of the range
  EXPECT_EQ(dsv3::float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);
  // NaN stays NaN (a payload only in the low bits must not round to inf)
  uint32_t nan_low = 0x7F800001u;
  float fn;
  std::memcpy(&fn, &nan_low, 4);
  EXPECT_TRUE(std::isnan(dsv3::bf16_to_float(dsv3::float_to_bf16(fn))));
  EXPECT_TRUE(std::isnan(dsv3::bf16_to_float(dsv3::float_to_bf16(-std::numeric_limits<float>::quiet_NaN()))));
  // every bf16 value round-trips
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = dsv3::bf16_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(dsv3::float_to_bf16(f), h);
  }
  EXPECT_EQ(dsv3::f16_to_float(0x3C00), 1.0f);
  EXPECT_EQ(dsv3::f16_to_float(0xC000), -2.0f);
  EXPECT_EQ(dsv3::f16_to_float(0x7BFF), 65504.0f);
  EXPECT_EQ(dsv3::f16_to_float(0x0001), 0x1p-24f);
  EXPECT_EQ(dsv3::f16_to_float(0x03FF), 1023 * 0x1p-24f);
  EXPECT_EQ(dsv3::f16_to_float(0x0400), 0x1p-14f);
  EXPECT_EQ(dsv3::f16_to_float(0x3555), 0x1.554p-2f);
  EXPECT_EQ(dsv3::f16_to_float(0x7C00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(dsv3::f16_to_float(0xFC00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(dsv3::f16_to_float(0x7E00)));
  EXPECT_EQ(bits(dsv3::f16_to_float(0x8000)), 0x80000000u);
}

TEST(Safetensors, RoundTripEveryDtype) {
  const std::string dir = make_tmp_dir();
  const std::string path = dir + "/rt.safetensors";
  dsv3::SafetensorsWriter w;
  const std::vector<float> f32 = {1.5f, -2.25f, 3.0e-7f, 1e30f, -0.0f, 42.0f};
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x0001};  // 1, -2, 2^-24
  const std::vector<uint16_t> bf16 = {dsv3::float_to_bf16(0.5f), dsv3::float_to_bf16(-7.0f),
                                      dsv3::float_to_bf16(1e-3f), dsv3::float_to_bf16(3.0f)};
  const std::vector<uint8_t> f8 = {0x00, 0x7E, 0x80, 0x38, 0x01};
  const std::vector<int64_t> i64 = {0, -1, (int64_t(1) << 40), std::numeric_limits<int64_t>::min()};
  const std::vector<int32_t> i32 = {7, -8, 2147483647};
  w.add_f32("z.f32", {2, 3}, f32.data());  // added out of order: the file is in sorted-name order
  w.add("a.f16", dsv3::DType::F16, {3}, f16.data(), f16.size() * 2);
  w.add("b.bf16", dsv3::DType::BF16, {2, 2}, bf16.data(), bf16.size() * 2);
  w.add("c.f8", dsv3::DType::F8_E4M3, {5, 1}, f8.data(), f8.size());
  w.add("d.i64", dsv3::DType::I64, {4}, i64.data(), i64.size() * 8);
  w.add("e.i32", dsv3::DType::I32, {1, 3}, i32.data(), i32.size() * 4);
  w.add("f.empty", dsv3::DType::F32, {0, 4}, nullptr, 0);
  w.add("g.scalar", dsv3::DType::F32, {}, f32.data(), 4);
  w.write(path, {{"format", "pt"}, {"note", "hi"}});

  // layout: header length, padding to 8-byte alignment, no leftover .tmp
  {
    std::ifstream f(path, std::ios::binary);
    std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(all[i]);
    EXPECT_EQ((8 + n) % 8, 0u);
    EXPECT_EQ(all[8], '{');
    EXPECT_FALSE(std::ifstream(path + ".tmp").good());
    // a.f16 comes first in the data section
    uint16_t first;
    std::memcpy(&first, all.data() + 8 + n, 2);
    EXPECT_EQ(first, 0x3C00);
  }

  dsv3::SafetensorsFile r(path);
  EXPECT_EQ(r.path(), path);
  EXPECT_EQ(r.names(), (std::vector<std::string>{"a.f16", "b.bf16", "c.f8", "d.i64", "e.i32", "f.empty", "g.scalar",
                                                 "z.f32"}));
  EXPECT_EQ(r.metadata().at("format"), "pt");
  EXPECT_EQ(r.metadata().at("note"), "hi");
  EXPECT_TRUE(r.has("c.f8"));
  EXPECT_FALSE(r.has("nope"));

  const auto& vz = r.get("z.f32");
  EXPECT_EQ(vz.dtype, dsv3::DType::F32);
  EXPECT_EQ(vz.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(vz.numel(), 6);
  EXPECT_EQ(vz.nbytes, 24u);
  auto zf = r.to_f32("z.f32");
  ASSERT_EQ(zf.size(), f32.size());
  EXPECT_EQ(std::memcmp(zf.data(), f32.data(), 24), 0);

  auto af = r.to_f32("a.f16");
  EXPECT_EQ(af, (std::vector<float>{1.0f, -2.0f, 0x1p-24f}));
  auto bf = r.to_f32("b.bf16");
  EXPECT_EQ(r.get("b.bf16").shape, (std::vector<int64_t>{2, 2}));
  for (size_t i = 0; i < bf16.size(); ++i) EXPECT_EQ(bf[i], dsv3::bf16_to_float(bf16[i]));
  EXPECT_EQ(bf[1], -7.0f);

  const auto& v8 = r.get("c.f8");
  EXPECT_EQ(v8.dtype, dsv3::DType::F8_E4M3);
  EXPECT_EQ(v8.shape, (std::vector<int64_t>{5, 1}));
  ASSERT_EQ(v8.nbytes, 5u);
  EXPECT_EQ(std::memcmp(v8.data, f8.data(), 5), 0);

  EXPECT_EQ(r.to_i64("d.i64"), i64);
  EXPECT_EQ(r.to_i64("e.i32"), (std::vector<int64_t>{7, -8, 2147483647}));
  EXPECT_EQ(r.get("f.empty").numel(), 0);
  EXPECT_TRUE(r.to_f32("f.empty").empty());
  EXPECT_EQ(r.get("g.scalar").shape.size(), 0u);
  EXPECT_EQ(r.to_f32("g.scalar"), std::vector<float>{1.5f});

  // wrong conversions and unknown names throw, naming tensor and file
  try {
    r.to_f32("c.f8");
    FAIL();
  } catch (const dsv3::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("c.f8"));
    EXPECT_THAT(e.what(), HasSubstr("F8_E4M3"));
    EXPECT_THAT(e.what(), HasSubstr(path));
  }
  EXPECT_THROW(r.to_f32("d.i64"), dsv3::Error);
  EXPECT_THROW(r.to_i64("z.f32"), dsv3::Error);
  try {
    r.get("missing.weight");
    FAIL();
  } catch (const dsv3::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("missing.weight"));
    EXPECT_THAT(e.what(), HasSubstr(path));
  }

  // movable
  dsv3::SafetensorsFile moved(std::move(r));
  EXPECT_EQ(moved.to_f32("a.f16")[0], 1.0f);

  // no metadata
  dsv3::SafetensorsWriter w2;
  w2.add_f32("x", {1}, f32.data());
  w2.write(dir + "/nometa.safetensors", {});
  EXPECT_TRUE(dsv3::SafetensorsFile(dir + "/nometa.safetensors").metadata().empty());
}

TEST(Safetensors, WriterRejectsBadInput) {
  dsv3::SafetensorsWriter w;
  float x[4] = {};
  EXPECT_THROW(w.add("a", dsv3::DType::F32, {2, 2}, x, 12), dsv3::Error);
  EXPECT_THROW(w.add("__metadata__", dsv3::DType::F32, {1}, x, 4), dsv3::Error);
  EXPECT_THROW(w.add("n", dsv3::DType::F32, {-1}, x, 4), dsv3::Error);
  w.add("a", dsv3::DType::F32, {2, 2}, x, 16);
  EXPECT_THROW(w.add("a", dsv3::DType::F32, {1}, x, 4), dsv3::Error);
  EXPECT_THROW(w.write("/nonexistent_dir_dsv3/x.safetensors"), dsv3::Error);
}

TEST(Safetensors, ValidHandBuiltFileOpens) {
  // sanity for the malformed cases below: the same construction with valid values opens
  EXPECT_EQ(open_error(st_bytes(one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})"), 8)), "");
  EXPECT_EQ(open_error(st_bytes(R"({"__metadata__":{"format":"pt"},"a":{"dtype":"I32","shape":[1],"data_offsets":[4,8]},)"
                                R"("b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
                                8)),
            "");
  EXPECT_EQ(open_error(st_bytes("{}", 0)), "");
  EXPECT_EQ(open_error(st_bytes("{}    ", 0)), "");  // space padding
}

TEST(Safetensors, MalformedTooShortAndHeaderLength) {
  EXPECT_THAT(open_error(""), HasSubstr("shorter than 8 bytes"));
  EXPECT_THAT(open_error("abcde"), HasSubstr("shorter than 8 bytes"));
  EXPECT_THAT(open_error(le64(1000) + "{}"), HasSubstr("header length 1000 is larger than the file"));
  EXPECT_THAT(open_error(le64(~uint64_t(0)) + "{}"), HasSubstr("is larger than the file"));
  EXPECT_THAT(open_error(le64(~uint64_t(0) - 7) + "{}"), HasSubstr("is larger than the file"));
  EXPECT_THAT(open_error(le64(3) + "{}"), HasSubstr("is larger than the file"));
}

TEST(Safetensors, MalformedJson) {
  EXPECT_THAT(open_error(st_bytes("{\"a\":", 0)), HasSubstr("not valid JSON"));
  EXPECT_THAT(open_error(le64(0)), HasSubstr("not valid JSON"));
  EXPECT_THAT(open_error(st_bytes("[1,2]", 0)), HasSubstr("not a JSON object"));
  EXPECT_THAT(open_error(st_bytes("\"str\"", 0)), HasSubstr("not a JSON object"));
  EXPECT_THAT(open_error(st_bytes(one("5"), 0)), HasSubstr("entry is not a JSON object"));
}

TEST(Safetensors, MalformedEntryFields) {
  EXPECT_THAT(open_error(st_bytes(one(R"({"shape":[1],"data_offsets":[0,4]})"), 4)), HasSubstr("missing 'dtype'"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","data_offsets":[0,4]})"), 4)), HasSubstr("missing 'shape'"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[1]})"), 4)), HasSubstr("missing 'data_offsets'"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":4,"shape":[1],"data_offsets":[0,4]})"), 4)),
              HasSubstr("'dtype' is not a string"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":"1","data_offsets":[0,4]})"), 4)),
              HasSubstr("'shape' is not an array"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[1.5],"data_offsets":[0,4]})"), 4)),
              HasSubstr("is not an integer"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":{"a":0}})"), 4)),
              HasSubstr("'data_offsets' is not an array"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[0]})"), 4)),
              HasSubstr("is not [begin, end]"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[0,4,8]})"), 4)),
              HasSubstr("is not [begin, end]"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})"), 4)),
              HasSubstr("is not [begin, end]"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":["0","4"]})"), 4)),
              HasSubstr("is not [begin, end]"));
  // the tensor's name is in the message
  EXPECT_THAT(open_error(st_bytes(R"({"my.weight":{"dtype":"F32","shape":[1]}})", 4)), HasSubstr("my.weight"));
}

TEST(Safetensors, MalformedDtypeAndShape) {
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F99","shape":[1],"data_offsets":[0,4]})"), 4)),
              HasSubstr("unknown dtype 'F99'"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[2,-1],"data_offsets":[0,4]})"), 4)),
              HasSubstr("negative dimension -1"));
  // 2^32 * 2^32 elements overflows int64/uint64
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]})"), 4)),
              HasSubstr("overflows"));
  // 2^62 elements * 4 bytes overflows only in the byte count
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,4]})"), 4)),
              HasSubstr("overflows"));
  // a dimension beyond int64
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]})"), 4)),
              HasSubstr("overflows"));
  // overflow that wraps to exactly the data size (2^62 * 2^2 * 4 bytes == 2^66 -> wraps to 0) must not pass
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]})"), 0)),
              HasSubstr("overflows"));
}

TEST(Safetensors, MalformedOffsets) {
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[4,0]})"), 4)),
              HasSubstr("begin > end"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[4,8]})"), 4)),
              HasSubstr("beyond the data section (4 bytes)"));
  EXPECT_THAT(
      open_error(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[18446744073709551612,18446744073709551615]})"), 4)),
      HasSubstr("beyond the data section"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,4]})"), 4)),
              HasSubstr("does not match"));
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F16","shape":[3],"data_offsets":[0,8]})"), 8)),
              HasSubstr("does not match"));
}

TEST(Safetensors, MalformedCoverage) {
  // overlap
  EXPECT_THAT(open_error(st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                  12)),
              HasSubstr("overlaps"));
  // the same range twice
  EXPECT_THAT(open_error(st_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                  R"("b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
                                  4)),
              HasSubstr("overlaps"));
  // gap between tensors
  EXPECT_THAT(open_error(st_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                  R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                                  12)),
              HasSubstr("gap in the data section: bytes [4, 8)"));
  // gap at the start
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[4,8]})"), 8)),
              HasSubstr("gap in the data section: bytes [0, 4)"));
  // trailing garbage
  EXPECT_THAT(open_error(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})"), 6)),
              HasSubstr("2 trailing bytes"));
  EXPECT_THAT(open_error(st_bytes("{}", 3)), HasSubstr("3 trailing bytes"));
}

TEST(Safetensors, MalformedMetadata) {
  EXPECT_THAT(open_error(st_bytes(R"({"__metadata__":[1]})", 0)), HasSubstr("__metadata__ is not a JSON object"));
  EXPECT_THAT(open_error(st_bytes(R"({"__metadata__":{"format":"pt","n":3}})", 0)),
              HasSubstr("__metadata__ value of 'n' is not a string"));
}

TEST(Safetensors, MissingFileAndDirectory) {
  const std::string dir = make_tmp_dir();
  try {
    dsv3::SafetensorsFile f(dir + "/nope.safetensors");
    FAIL();
  } catch (const dsv3::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(dir + "/nope.safetensors"));
    EXPECT_THAT(e.what(), HasSubstr("cannot open"));
  }
  EXPECT_THROW(dsv3::SafetensorsFile f(dir), dsv3::Error);
}

TEST(Safetensors, ReadsGoldenTinyModel) {
  dsv3::SafetensorsFile f(DSV3_TEST_DIR "/golden/tiny/model.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "pt");
  const auto& v = f.get("model.embed_tokens.weight");
  EXPECT_EQ(v.dtype, dsv3::DType::F32);
  EXPECT_EQ(v.shape, (std::vector<int64_t>{512, 64}));
  EXPECT_EQ(f.get("model.layers.0.input_layernorm.weight").shape, (std::vector<int64_t>{64}));
  auto emb = f.to_f32("model.embed_tokens.weight");
  ASSERT_EQ(emb.size(), 512u * 64u);
  // embeddings ~ N(0,1): finite, non-trivial
  double ss = 0;
  for (float x : emb) {
    ASSERT_TRUE(std::isfinite(x));
    ss += double(x) * x;
  }
  EXPECT_NEAR(ss / emb.size(), 1.0, 0.1);
  // tied copies are equal (README)
  EXPECT_EQ(f.to_f32("model.layers.4.embed_tokens.weight"), emb);

  dsv3::SafetensorsFile g(DSV3_TEST_DIR "/golden/tiny/golden.safetensors");
  EXPECT_EQ(g.get("input_ids").dtype, dsv3::DType::I64);
  EXPECT_EQ(g.get("input_ids").shape, (std::vector<int64_t>{2, 64}));
  auto ids = g.to_i64("input_ids");
  for (int64_t t : ids) {
    EXPECT_GE(t, 0);
    EXPECT_LT(t, 512);
  }
}
