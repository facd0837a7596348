// tests: HfCheckpoint over sharded / single-file checkpoints, FP8 loading and its error paths
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/fp8.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"

using ::testing::HasSubstr;

namespace {

const char* kFp8 = DSV3_TEST_DIR "/golden/tiny/model-fp8.safetensors";
const char* kDequant = DSV3_TEST_DIR "/golden/tiny/model-fp8-dequant.safetensors";
const char* kModel = DSV3_TEST_DIR "/golden/tiny/model.safetensors";

std::string make_tmp_dir() {
  std::string t = ::testing::TempDir() + "dsv3_hf_XXXXXX";
  std::vector<char> buf(t.begin(), t.end());
  buf.push_back('\0');
  char* d = ::mkdtemp(buf.data());
  EXPECT_NE(d, nullptr);
  return std::string(d);
}

void write_text(const std::string& path, const std::string& s) { std::ofstream(path) << s; }

// Splits model-fp8.safetensors into two shards (a weight and its scale_inv deliberately in different
// shards for some tensors) plus an index; returns the weight_map.
nlohmann::json build_sharded(const std::string& dir) {
  dsv3::SafetensorsFile src(kFp8);
  dsv3::SafetensorsWriter w[2];
  nlohmann::json wm = nlohmann::json::object();
  const char* shard_names[2] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
  size_t i = 0;
  for (const auto& n : src.names()) {
    const auto& v = src.get(n);
    const int s = static_cast<int>((i++ / 3) % 2);
    w[s].add(n, v.dtype, v.shape, v.data, v.nbytes);
    wm[n] = shard_names[s];
  }
  for (int s = 0; s < 2; ++s) w[s].write(dir + "/" + shard_names[s]);
  nlohmann::json idx = {{"metadata", {{"total_size", 0}}}, {"weight_map", wm}};
  write_text(dir + "/model.safetensors.index.json", idx.dump(2));
  return wm;
}

std::string ctor_error(const std::string& path, std::array<int, 2> blk = {16, 16}) {
  try {
    dsv3::HfCheckpoint ck(path, blk);
  } catch (const dsv3::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(HfCheckpoint, ShardedLoadsAndDequantizesBitExact) {
  const std::string dir = make_tmp_dir();
  const auto wm = build_sharded(dir);
  dsv3::HfCheckpoint ck(dir, {16, 16});
  dsv3::SafetensorsFile src(kFp8), dq(kDequant), orig(kModel);
  EXPECT_EQ(ck.names(), src.names());
  EXPECT_EQ(ck.names().size(), wm.size());
  // both shards are really used
  EXPECT_NE(ck.file_of("lm_head.weight").path(), ck.file_of("model.layers.0.mlp.down_proj.weight").path());
  int n8 = 0;
  for (const auto& n : ck.names()) {
    const auto& v = ck.view(n);
    EXPECT_EQ(v.dtype, src.get(n).dtype) << n;
    EXPECT_EQ(ck.shape(n), src.get(n).shape) << n;
    if (v.dtype == dsv3::DType::F8_E4M3) {
      ++n8;
      const auto got = ck.load_f32(n);
      const auto& want = dq.get(n);
      ASSERT_EQ(got.size() * 4, want.nbytes) << n;
      EXPECT_EQ(std::memcmp(got.data(), want.data, want.nbytes), 0) << n;
    } else if (n.find("_scale_inv") == std::string::npos) {
      EXPECT_EQ(ck.load_f32(n), orig.to_f32(n)) << n;
    }
  }
  EXPECT_EQ(static_cast<size_t>(n8), dq.size());

  // load_f32_into: checks the element count
  const std::string q = "model.layers.1.self_attn.q_b_proj.weight";
  ASSERT_TRUE(ck.has(q));
  std::vector<float> buf(ck.view(q).numel());
  ck.load_f32_into(q, buf.data(), static_cast<int64_t>(buf.size()));
  EXPECT_EQ(std::memcmp(buf.data(), dq.get(q).data, buf.size() * 4), 0);
  try {
    ck.load_f32_into(q, buf.data(), static_cast<int64_t>(buf.size()) - 1);
    FAIL();
  } catch (const dsv3::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(q));
    EXPECT_THAT(e.what(), HasSubstr("expected " + std::to_string(buf.size() - 1)));
  }
  try {
    ck.view("no.such.tensor");
    FAIL();
  } catch (const dsv3::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("no.such.tensor"));
  }
  // the index file itself can be given
  dsv3::HfCheckpoint by_index(dir + "/model.safetensors.index.json", {16, 16});
  EXPECT_EQ(by_index.names().size(), ck.names().size());
}

TEST(HfCheckpoint, SingleFileAndDirectory) {
  dsv3::HfCheckpoint f(kModel);
  EXPECT_TRUE(f.has("model.embed_tokens.weight"));
  EXPECT_EQ(f.shape("model.embed_tokens.weight"), (std::vector<int64_t>{512, 64}));
  const std::string dir = make_tmp_dir();
  std::filesystem::copy_file(kFp8, dir + "/model.safetensors");
  dsv3::HfCheckpoint d(dir, {16, 16});
  const std::string n = "model.layers.0.mlp.down_proj.weight";
  EXPECT_EQ(d.view(n).dtype, dsv3::DType::F8_E4M3);
  dsv3::SafetensorsFile dq(kDequant);
  EXPECT_EQ(d.load_f32(n), dq.to_f32(n));
  // the wrong block size is caught by the scale_inv shape check
  dsv3::HfCheckpoint d128(dir);  // default 128x128
  try {
    d128.load_f32(n);
    FAIL();
  } catch (const dsv3::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(n + "_scale_inv"));
    EXPECT_THAT(e.what(), HasSubstr("expected [1, 1]"));
  }
  EXPECT_THAT(ctor_error(make_tmp_dir()), HasSubstr("neither model.safetensors.index.json nor model.safetensors"));
  EXPECT_THAT(ctor_error(dir + "/missing"), HasSubstr("not found"));
}

TEST(HfCheckpoint, MissingShard) {
  const std::string dir = make_tmp_dir();
  build_sharded(dir);
  std::filesystem::remove(dir + "/model-00002-of-00002.safetensors");
  const std::string msg = ctor_error(dir);
  EXPECT_THAT(msg, HasSubstr("model-00002-of-00002.safetensors"));
  EXPECT_THAT(msg, HasSubstr("does not exist"));
}

TEST(HfCheckpoint, TensorMissingFromItsShard) {
  const std::string dir = make_tmp_dir();
  auto wm = build_sharded(dir);
  wm["model.extra.weight"] = "model-00001-of-00002.safetensors";
  write_text(dir + "/model.safetensors.index.json", nlohmann::json{{"weight_map", wm}}.dump());
  const std::string msg = ctor_error(dir);
  EXPECT_THAT(msg, HasSubstr("model.extra.weight"));
  EXPECT_THAT(msg, HasSubstr("model-00001-of-00002.safetensors"));
  EXPECT_THAT(msg, HasSubstr("does not contain it"));
  // a tensor mapped to the wrong shard
  wm.erase("model.extra.weight");
  wm["lm_head.weight"] = "model-00002-of-00002.safetensors";
  write_text(dir + "/model.safetensors.index.json", nlohmann::json{{"weight_map", wm}}.dump());
  EXPECT_THAT(ctor_error(dir), HasSubstr("'lm_head.weight' is mapped to shard"));
}

TEST(HfCheckpoint, BadIndex) {
  const std::string dir = make_tmp_dir();
  build_sharded(dir);
  const std::string idx = dir + "/model.safetensors.index.json";
  write_text(idx, R"({"metadata": {}})");
  EXPECT_THAT(ctor_error(dir), HasSubstr("no \"weight_map\""));
  write_text(idx, R"({"weight_map": [1]})");
  EXPECT_THAT(ctor_error(dir), HasSubstr("\"weight_map\" is not a JSON object"));
  write_text(idx, R"({"weight_map": {"a": 3}})");
  EXPECT_THAT(ctor_error(dir), HasSubstr("tensor 'a' is not a string"));
  write_text(idx, "{oops");
  EXPECT_THAT(ctor_error(dir), HasSubstr("not valid JSON"));
}

TEST(HfCheckpoint, BadScaleInv) {
  const std::string dir = make_tmp_dir();
  std::vector<uint8_t> codes(32 * 40, 0x38);
  std::vector<float> good(2 * 3, 0.5f), bad(2 * 2, 0.5f);
  {
    dsv3::SafetensorsWriter w;
    w.add("a.weight", dsv3::DType::F8_E4M3, {32, 40}, codes.data(), codes.size());
    w.add_f32("a.weight_scale_inv", {2, 2}, bad.data());  // needs [2, 3] for 16x16 blocks
    w.add("b.weight", dsv3::DType::F8_E4M3, {32, 40}, codes.data(), codes.size());
    w.add_f32("b.weight_scale_inv", {2, 3}, good.data());
    w.add("c.weight", dsv3::DType::F8_E4M3, {32, 40}, codes.data(), codes.size());  // no scale_inv
    std::vector<uint16_t> bf(6, dsv3::float_to_bf16(0.5f));
    w.add("d.weight", dsv3::DType::F8_E4M3, {32, 40}, codes.data(), codes.size());
    w.add("d.weight_scale_inv", dsv3::DType::BF16, {2, 3}, bf.data(), bf.size() * 2);
    w.add("e.weight", dsv3::DType::F8_E4M3, {1280}, codes.data(), codes.size());
    std::vector<int64_t> ids = {1, 2};
    w.add("ids", dsv3::DType::I64, {2}, ids.data(), 16);
    w.write(dir + "/model.safetensors");
  }
  dsv3::HfCheckpoint ck(dir, {16, 16});
  auto err = [&](const std::string& n) -> std::string {
    try {
      ck.load_f32(n);
    } catch (const dsv3::Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_THAT(err("a.weight"), HasSubstr("'a.weight_scale_inv' has shape [2, 2], expected [2, 3]"));
  EXPECT_THAT(err("c.weight"), HasSubstr("no scale tensor 'c.weight_scale_inv'"));
  EXPECT_THAT(err("d.weight"), HasSubstr("is BF16, expected F32"));
  EXPECT_THAT(err("e.weight"), HasSubstr("expected 2-D"));
  EXPECT_THAT(err("ids"), HasSubstr("not a float tensor"));
  const auto b = ck.load_f32("b.weight");
  ASSERT_EQ(b.size(), codes.size());
  for (float x : b) ASSERT_EQ(x, 0.5f);  // code 0x38 = 1.0 times 0.5
}
