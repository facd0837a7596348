// The streaming converters (io/convert.h, dsv3-hftoh5 / dsv3-h5tohf) on one process: the golden tiny model
// HF (F32) -> HDF5 -> HF (fp32) is bit-identical tensor by tensor with the same names (MTP copies included), also
// when every tensor is moved in many small pieces; the released-format FP8 file imports to exactly the golden
// dequantized values; the fp8 export reproduces the golden codes and scales bit-exactly; the bf16 export is the
// rounded weights; an hftoh5 checkpoint loads into training with weights_only (finetune); a training checkpoint
// (config from its deck) exports; a corrupt dataset, a missing tensor and bad sizes are named.
// The memory bound, sharded inputs and MPI are tests/convert_memory.sh.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/deck.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/convert.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "ops/cpu/cpu_backend.h"
#include "train/trainer.h"
#include "test_util.h"

using namespace dsv3;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

const std::string kTiny = std::string(DSV3_TEST_DIR) + "/golden/tiny";

using dsv3::test::TmpDir;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// raw bytes of a tensor
std::vector<uint8_t> bytes_of(const TensorView& v) { return std::vector<uint8_t>(v.data, v.data + v.nbytes); }

// An HF directory holding the golden config.json and `weights` as model.safetensors.
std::string hf_dir_with(const std::string& root, const std::string& weights) {
  const std::string d = root + "/hf_in";
  fs::create_directories(d);
  fs::copy_file(kTiny + "/config.json", d + "/config.json");
  fs::copy_file(weights, d + "/model.safetensors");
  return d;
}

H5ToHfOptions h5tohf(const std::string& dtype, int64_t shard = 5000000000, int64_t mem = 1 << 30) {
  H5ToHfOptions o;
  o.dtype = dtype;
  o.shard_bytes = shard;
  o.max_memory = mem;
  o.progress = false;
  return o;
}
HfToH5Options hftoh5(int64_t mem = 1 << 30) {
  HfToH5Options o;
  o.max_memory = mem;
  o.progress = false;
  return o;
}

}  // namespace

TEST(Convert, TinyF32RoundTripIsBitIdenticalTensorByTensor) {
  TmpDir t;
  for (const int64_t mem : {int64_t(1) << 30, int64_t(700)}) {  // whole tensors; pieces of a few rows
    SCOPED_TRACE("max_memory " + std::to_string(mem));
    const std::string ck = t.path + "/ck" + std::to_string(mem), out = t.path + "/hf" + std::to_string(mem);
    const ConvertStats a = convert_hf_to_h5(kTiny, ck, nullptr, hftoh5(mem));
    EXPECT_EQ(a.path, ck + "/iter_0000000.h5");
    EXPECT_EQ(read_latest(ck), a.path);
    EXPECT_EQ(verify_checkpoint(a.path), "");
    const ConvertStats b = convert_h5_to_hf(ck, out, nullptr, h5tohf("fp32", 256 << 10, mem));
    EXPECT_GE(b.shards, 3);
    EXPECT_LE(a.peak_buffer, std::max<int64_t>(mem, 128 * (4 + 4)));  // a piece is at least one row (<= 128 wide)
    EXPECT_LE(b.peak_buffer, std::max<int64_t>(mem, 128 * 4));
    SafetensorsFile orig(kTiny + "/model.safetensors");
    HfCheckpoint got(out);
    EXPECT_EQ(got.names(), orig.names());  // the same tensors, the MTP's embed/head copies included
    for (const std::string& n : orig.names()) {
      ASSERT_EQ(got.dtype(n), DType::F32) << n;
      EXPECT_EQ(got.shape(n), orig.get(n).shape) << n;
      EXPECT_EQ(bytes_of(got.view(n)), bytes_of(orig.get(n))) << n;
    }
    // config.json: the original's fields; no quantization_config (the weights are not quantized)
    std::ifstream f(out + "/config.json");
    const auto j = nlohmann::json::parse(f);
    EXPECT_FALSE(j.contains("quantization_config"));
    EXPECT_EQ(j["torch_dtype"], "float32");
    EXPECT_EQ(j["num_nextn_predict_layers"], 1);
  }
}

TEST(Convert, CheckpointDatasetsAddUpToTheParameterCount) {
  TmpDir t;
  const ConvertStats a = convert_hf_to_h5(kTiny, t.path, nullptr, hftoh5());
  CheckpointFileReader rd(t.path);
  const ModelConfig cfg = model_config_from_file(kTiny + "/config.json");
  const ParamCounts pc = count_params(cfg);
  int64_t total = 0;
  for (const std::string& ds : rd.datasets()) {
    EXPECT_EQ(ds.rfind("/model/", 0), 0u) << ds;  // weights only: no /optim
    int64_t n = 1;
    for (int64_t d : rd.shape(ds)) n *= d;
    total += n;
  }
  EXPECT_EQ(total, pc.main + pc.mtp);
  EXPECT_EQ(a.params, pc.main + pc.mtp);
  const CheckpointInfo info = rd.info();
  EXPECT_EQ(info.state.iteration, 0);
  EXPECT_EQ(info.moment_dtype, "none");
  EXPECT_THAT(rd.attr("hf_config"), HasSubstr("\"num_nextn_predict_layers\""));
}

TEST(Convert, Fp8ImportGivesTheExactDequantizedValues) {
  TmpDir t;
  const std::string hf = hf_dir_with(t.path, kTiny + "/model-fp8.safetensors");
  for (const int64_t mem : {int64_t(1) << 30, int64_t(64 * 16 * 5)}) {  // whole; one 16-row block row at a time
    SCOPED_TRACE("max_memory " + std::to_string(mem));
    const std::string ck = t.path + "/ck" + std::to_string(mem);
    convert_hf_to_h5(hf, ck, nullptr, hftoh5(mem));
    CheckpointFileReader rd(ck);
    SafetensorsFile deq(kTiny + "/model-fp8-dequant.safetensors"), f32(kTiny + "/model.safetensors");
    const auto table = build_param_table(model_config_from_file(kTiny + "/config.json"));
    int quantized = 0;
    for (const ParamSpec& p : table) {
      const int64_t per = p.numel() / p.n_experts();
      std::vector<float> x(p.numel());
      rd.read("/model/" + p.name, 0, p.numel(), x.data());
      for (int64_t e = 0; e < p.n_experts(); ++e) {
        const std::string hfn = p.hf_name_of(e);
        const bool q = deq.has(hfn);
        EXPECT_EQ(q, p.fp8) << hfn;
        const auto ref = q ? deq.to_f32(hfn) : f32.to_f32(hfn);
        ASSERT_EQ((int64_t)ref.size(), per);
        EXPECT_EQ(0, std::memcmp(ref.data(), x.data() + e * per, per * 4)) << hfn;
        quantized += q;
      }
    }
    EXPECT_GT(quantized, 50);
  }
}

TEST(Convert, Fp8ExportReproducesTheGoldenCodesAndScales) {
  TmpDir t;
  convert_hf_to_h5(kTiny, t.path + "/ck", nullptr, hftoh5());
  for (const int64_t mem : {int64_t(1) << 30, int64_t(64 * 16 * 6)}) {
    SCOPED_TRACE("max_memory " + std::to_string(mem));
    const std::string out = t.path + "/fp8_" + std::to_string(mem);
    convert_h5_to_hf(t.path + "/ck", out, nullptr, h5tohf("fp8", 300 << 10, mem));  // block 16 from the config
    SafetensorsFile gold(kTiny + "/model-fp8.safetensors");
    HfCheckpoint got(out, {16, 16});
    EXPECT_EQ(got.names(), gold.names());
    int quantized = 0;
    for (const std::string& n : gold.names()) {
      const TensorView& g = gold.get(n);
      if (g.dtype == DType::F8_E4M3 || (n.size() > 10 && n.compare(n.size() - 10, 10, "_scale_inv") == 0)) {
        ASSERT_EQ(got.dtype(n), g.dtype) << n;
        EXPECT_EQ(got.shape(n), g.shape) << n;
        EXPECT_EQ(bytes_of(got.view(n)), bytes_of(g)) << n;  // codes and scales bit-exact
        quantized += g.dtype == DType::F8_E4M3;
      } else if (n.find("e_score_correction_bias") != std::string::npos) {
        ASSERT_EQ(got.dtype(n), DType::F32) << n;  // the released weights keep the bias F32
        EXPECT_EQ(bytes_of(got.view(n)), bytes_of(g)) << n;
      } else {
        ASSERT_EQ(got.dtype(n), DType::BF16) << n;  // the other unquantized weights: BF16 as released
        const auto a = got.load_f32(n), b = gold.to_f32(n);
        for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], bf16_to_float(float_to_bf16(b[i]))) << n << " " << i;
      }
    }
    EXPECT_GT(quantized, 50);
    std::ifstream f(out + "/config.json");
    const auto j = nlohmann::json::parse(f);
    EXPECT_EQ(j["quantization_config"]["quant_method"], "fp8");
    EXPECT_EQ(j["quantization_config"]["fmt"], "e4m3");
    EXPECT_EQ(j["quantization_config"]["activation_scheme"], "dynamic");
    EXPECT_EQ(j["quantization_config"]["weight_block_size"], nlohmann::json::array({16, 16}));
  }
  // and the fp8 export reads back (hftoh5) as the golden dequantized values
  convert_hf_to_h5(t.path + "/fp8_" + std::to_string(1 << 30), t.path + "/ck8", nullptr, hftoh5());
  CheckpointFileReader rd(t.path + "/ck8");
  SafetensorsFile deq(kTiny + "/model-fp8-dequant.safetensors");
  const std::string n = "model.layers.2.mlp.experts.5.down_proj.weight";
  std::vector<float> x(64 * 32);
  rd.read("/model/model.layers.2.mlp.experts.down_proj.weight", 5 * 64 * 32, 64 * 32, x.data());
  EXPECT_EQ(x, deq.to_f32(n));
}

TEST(Convert, Bf16ExportIsTheRoundedWeights) {
  TmpDir t;
  convert_hf_to_h5(kTiny, t.path + "/ck", nullptr, hftoh5());
  const ConvertStats s = convert_h5_to_hf(t.path + "/ck", t.path + "/bf", nullptr, h5tohf("bf16", 5000000000, 1000));
  EXPECT_EQ(s.shards, 1);
  SafetensorsFile orig(kTiny + "/model.safetensors");
  HfCheckpoint got(t.path + "/bf");
  EXPECT_EQ(got.names(), orig.names());
  for (const std::string& n : orig.names()) {
    const auto a = got.load_f32(n), b = orig.to_f32(n);
    ASSERT_EQ(a.size(), b.size());
    if (n.find("e_score_correction_bias") != std::string::npos) {
      EXPECT_EQ(got.dtype(n), DType::F32) << n;
      EXPECT_EQ(a, b) << n;
      continue;
    }
    ASSERT_EQ(got.dtype(n), DType::BF16) << n;
    for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], bf16_to_float(float_to_bf16(b[i]))) << n << " " << i;
  }
}

TEST(Convert, Hftoh5CheckpointLoadsIntoTrainingWithFinetune) {
  TmpDir t;
  const ConvertStats s = convert_hf_to_h5(kTiny, t.path, nullptr, hftoh5());
  const ModelConfig cfg = model_config_from_file(kTiny + "/config.json");
  CpuBackend be(1);
  Model ref(cfg, be);
  ref.load_hf(HfCheckpoint(kTiny, cfg.fp8_block));
  Model m(cfg, be);
  m.init_random(5);
  TrainerConfig tc;
  tc.micro_batch = 2;
  Trainer tr(m, tc);
  // without finetune the missing optimizer state is an error naming the dataset
  EXPECT_THAT(error_of([&] { load_checkpoint(s.path, nullptr, m.params(), &tr.optimizer(), false); }),
              HasSubstr("/optim/"));
  const TrainState st = load_checkpoint(s.path, nullptr, m.params(), &tr.optimizer(), /*weights_only=*/true);
  EXPECT_EQ(st.iteration, 0);
  ASSERT_EQ(m.params().size(), ref.params().size());
  EXPECT_EQ(0, std::memcmp(m.params().data(), ref.params().data(), m.params().size() * 4));
  EXPECT_EQ(tr.optimizer().t(), 0);
  for (const auto& b : tr.optimizer().buckets()) {
    for (float v : b.m.to_host()) ASSERT_EQ(v, 0.0f);
    // the master weights are the loaded weights
    for (float v : b.master.to_host()) ASSERT_TRUE(std::isfinite(v));
  }
  // and it trains
  std::vector<int64_t> tok(4 * 32);
  for (size_t i = 0; i < tok.size(); ++i) tok[i] = (int64_t)((i * 7919 + 13) % 512);
  EXPECT_TRUE(std::isfinite(tr.step(tok.data(), 4, 32, 1e-3, 0.3, 1e-3).loss.total));
}

TEST(Convert, TrainingCheckpointExportsWithTheConfigFromItsDeck) {
  TmpDir t;
  const ModelConfig cfg = model_config_from_file(kTiny + "/config.json");
  CpuBackend be(1);
  Model m(cfg, be);
  m.load_hf(HfCheckpoint(kTiny, cfg.fp8_block));
  const std::string deck =
      Deck::parse_text("[model]\nhf_config = \"" + fs::absolute(kTiny + "/config.json").string() + "\"\n", "test")
          .resolved_text();
  save_checkpoint(t.path + "/ck", nullptr, m.params(), nullptr, {3, 12, 384, 7}, deck, "test", 0);
  convert_h5_to_hf(t.path + "/ck", t.path + "/hf", nullptr, h5tohf("fp32"));
  SafetensorsFile orig(kTiny + "/model.safetensors");
  HfCheckpoint got(t.path + "/hf");
  EXPECT_EQ(got.names(), orig.names());
  for (const std::string& n : orig.names()) EXPECT_EQ(bytes_of(got.view(n)), bytes_of(orig.get(n))) << n;
  const ModelConfig back = model_config_from_file(t.path + "/hf/config.json");
  EXPECT_EQ(back.num_hidden_layers, cfg.num_hidden_layers);
  EXPECT_EQ(back.n_routed_experts, cfg.n_routed_experts);
  EXPECT_EQ(back.rope_scaling.factor, cfg.rope_scaling.factor);
}

TEST(Convert, CorruptDatasetMissingTensorAndBadSizesAreNamed) {
  TmpDir t;
  const ConvertStats s = convert_hf_to_h5(kTiny, t.path + "/ck", nullptr, hftoh5());
  // flip one byte of a dataset: h5tohf checks every dataset it reads against its checksum
  const std::string ds = "/model/model.layers.1.mlp.experts.gate_proj.weight";
  {
    const hid_t f = H5Fopen(s.path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    const hid_t d = H5Dopen2(f, ds.c_str(), H5P_DEFAULT);
    const haddr_t off = H5Dget_offset(d);
    H5Dclose(d);
    H5Fclose(f);
    std::FILE* fp = std::fopen(s.path.c_str(), "r+b");
    ASSERT_NE(fp, nullptr);
    std::fseek(fp, (long)off + 101, SEEK_SET);
    const int c = std::fgetc(fp);
    std::fseek(fp, (long)off + 101, SEEK_SET);
    std::fputc(c ^ 0x20, fp);
    std::fclose(fp);
  }
  const std::string e = error_of([&] { convert_h5_to_hf(t.path + "/ck", t.path + "/hf", nullptr, h5tohf("bf16")); });
  EXPECT_THAT(e, HasSubstr(ds));
  EXPECT_THAT(e, HasSubstr("checksum mismatch"));
  // an HF directory without one expert's tensor
  {
    SafetensorsFile orig(kTiny + "/model.safetensors");
    SafetensorsWriter w;
    for (const std::string& n : orig.names())
      if (n != "model.layers.3.mlp.experts.7.up_proj.weight") {
        const TensorView& v = orig.get(n);
        w.add(n, v.dtype, v.shape, v.data, v.nbytes);
      }
    fs::create_directories(t.path + "/partial");
    fs::copy_file(kTiny + "/config.json", t.path + "/partial/config.json");
    w.write(t.path + "/partial/model.safetensors");
  }
  EXPECT_THAT(error_of([&] { convert_hf_to_h5(t.path + "/partial", t.path + "/ck2", nullptr, hftoh5()); }),
              HasSubstr("model.layers.3.mlp.experts.7.up_proj.weight"));
  EXPECT_EQ(parse_byte_size("5GB", "x"), 5000000000);
  EXPECT_EQ(parse_byte_size("64MiB", "x"), 64 << 20);
  EXPECT_EQ(parse_byte_size("64mb", "x"), 64000000);
  EXPECT_EQ(parse_byte_size("1e9", "x"), 1000000000);
  EXPECT_EQ(parse_byte_size("123", "x"), 123);
  EXPECT_THAT(error_of([] { parse_byte_size("5 parsecs", "--shard-size"); }), HasSubstr("--shard-size"));
  EXPECT_THAT(error_of([] { parse_byte_size("0", "--max-memory"); }), HasSubstr("--max-memory"));
  EXPECT_THAT(error_of([&] { convert_h5_to_hf(t.path + "/ck", t.path + "/x", nullptr, h5tohf("int4")); }),
              HasSubstr("--dtype"));
}
