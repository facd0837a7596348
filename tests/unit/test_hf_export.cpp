// HF export: golden tiny weights -> export (F32, several shards) -> import is bit-identical; BF16 export rounds.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "io/hf_checkpoint.h"
#include "io/hf_export.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "ops/cpu/cpu_backend.h"

using namespace dsv3;

TEST(HfExport, F32RoundTripIsBitIdenticalAcrossShards) {
  const std::string src = std::string(DSV3_TEST_DIR) + "/golden/tiny";
  const std::string dir = ::testing::TempDir() + "/dsv3_hf_export_f32";
  std::filesystem::remove_all(dir);
  ModelConfig cfg = model_config_from_file(src + "/config.json");
  CpuBackend be(1);
  Model a(cfg, be);
  a.load_hf(HfCheckpoint(src, cfg.fp8_block));
  const int shards = write_hf_checkpoint(dir, cfg, a.params(), {"fp32", 256 << 10});
  EXPECT_GE(shards, 3);
  ModelConfig cfg2 = model_config_from_file(dir + "/config.json");
  cfg2.validate();
  Model b(cfg2, be);
  b.load_hf(HfCheckpoint(dir, cfg2.fp8_block));
  ASSERT_EQ(a.params().size(), b.params().size());
  EXPECT_EQ(0, std::memcmp(a.params().data(), b.params().data(), a.params().size() * 4));
  // the export holds exactly the tensors of the original checkpoint (MTP copies included)
  SafetensorsFile orig(src + "/model.safetensors");
  HfCheckpoint out(dir);
  EXPECT_EQ(out.names(), orig.names());
  EXPECT_EQ(0, std::memcmp(out.load_f32("model.layers.4.embed_tokens.weight").data(),
                           orig.to_f32("model.embed_tokens.weight").data(), 512 * 64 * 4));
}

TEST(HfExport, Bf16ExportIsTheRoundedWeights) {
  const std::string src = std::string(DSV3_TEST_DIR) + "/golden/tiny";
  const std::string dir = ::testing::TempDir() + "/dsv3_hf_export_bf16";
  std::filesystem::remove_all(dir);
  ModelConfig cfg = model_config_from_file(src + "/config.json");
  CpuBackend be(1);
  Model a(cfg, be);
  a.load_hf(HfCheckpoint(src, cfg.fp8_block));
  EXPECT_EQ(write_hf_checkpoint(dir, cfg, a.params(), {"bf16", 1LL << 30}), 1);
  HfCheckpoint out(dir);
  EXPECT_EQ(out.view("lm_head.weight").dtype, DType::BF16);
  const auto w = out.load_f32("model.layers.2.mlp.experts.5.down_proj.weight");
  const float* ref = a.params().get("model.layers.2.mlp.experts.down_proj.weight") + 5 * 64 * 32;
  for (size_t i = 0; i < w.size(); ++i) {
    EXPECT_EQ(w[i], bf16_to_float(float_to_bf16(ref[i])));
    EXPECT_NEAR(w[i], ref[i], std::fabs(ref[i]) * 0.004 + 1e-30);
  }
}
