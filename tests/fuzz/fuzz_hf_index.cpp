// libFuzzer target: sharded Hugging Face checkpoints (src/io/hf_checkpoint.cpp: model.safetensors.index.json,
// shard lookup, FP8 block dequantization). A scratch checkpoint directory holds two valid shards written once:
//   model-00001-of-00002.safetensors  a F32 [2,3], b BF16 [4], c I64 [2]
//   model-00002-of-00002.safetensors  w F8_E4M3 [4,6], w_scale_inv F32 [2,3] (2x2 blocks), x F16 [3]
// Input: byte 0 = options (bit 7 clear: fp8 block 2x2, else 1+(bits 0-2) x 1+(bits 3-5); bit 6: open the index
// file itself rather than the directory), then "index JSON [\0 fuzz.safetensors as header JSON \0 data]".
// Every tensor of an opened checkpoint is loaded as float32 (integer tensors must be a clean error).
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_common.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"

using namespace dsv3;
using dsv3_fuzz::die;
using dsv3_fuzz::expect_ok_or_error;

namespace {

const std::filesystem::path& ckpt_dir() {
  static const std::filesystem::path dir = [] {
    const auto d = dsv3_fuzz::scratch_dir() / "ckpt";
    std::filesystem::create_directories(d);
    {
      SafetensorsWriter w;
      const float a[6] = {1, -2, 3.5f, 0, 1e-3f, 7};
      w.add_f32("a", {2, 3}, a);
      const uint16_t b[4] = {0x3F80, 0xC000, 0x7FC0, 0x0001};
      w.add("b", DType::BF16, {4}, b, sizeof b);
      const int64_t c[2] = {5, -1};
      w.add("c", DType::I64, {2}, c, sizeof c);
      w.write((d / "model-00001-of-00002.safetensors").string());
    }
    {
      SafetensorsWriter w;
      uint8_t codes[24];
      for (int i = 0; i < 24; ++i) codes[i] = static_cast<uint8_t>(i * 11);
      w.add("w", DType::F8_E4M3, {4, 6}, codes, sizeof codes);
      const float s[6] = {1, 0.5f, 2, 0.25f, 4, 1};
      w.add_f32("w_scale_inv", {2, 3}, s);
      const uint16_t x[3] = {0x3C00, 0x7C00, 0x8001};
      w.add("x", DType::F16, {3}, x, sizeof x);
      w.write((d / "model-00002-of-00002.safetensors").string());
    }
    return d;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t opt = data[0];
  std::array<int, 2> block = {2, 2};
  if (opt & 0x80) block = {1 + (opt & 7), 1 + ((opt >> 3) & 7)};
  const std::string_view rest = dsv3_fuzz::as_view(data + 1, size - 1);
  const size_t z = rest.find('\0');
  const auto& dir = ckpt_dir();
  const auto index = dir / "model.safetensors.index.json", shard = dir / "fuzz.safetensors";
  dsv3_fuzz::write_file(index, rest.substr(0, z));
  std::error_code ec;
  if (z == std::string_view::npos)
    std::filesystem::remove(shard, ec);
  else
    dsv3_fuzz::write_file(shard, dsv3_fuzz::safetensors_from_split(rest.substr(z + 1)));

  expect_ok_or_error([&] {
    HfCheckpoint ck((opt & 0x40) ? index.string() : dir.string(), block);
    for (const std::string& n : ck.names()) {
      if (!ck.has(n)) die("names() lists " + n + " but has() denies it");
      const TensorView& v = ck.view(n);
      if (ck.shape(n) != v.shape || ck.numel(n) != v.numel() || ck.dtype(n) != v.dtype) die("accessors disagree on " + n);
      if (!ck.file_of(n).has(n)) die("file_of(" + n + ") does not hold it");
      expect_ok_or_error([&] {
        const std::vector<float> x = ck.load_f32(n);
        if (static_cast<int64_t>(x.size()) != v.numel()) die("load_f32 size of " + n);
      });
      expect_ok_or_error([&] {
        std::vector<float> x(static_cast<size_t>(v.numel()) + 1);
        ck.load_f32_into(n, x.data(), v.numel() + 1);  // wrong element count: must be an error
        die("load_f32_into accepted a wrong element count for " + n);
      });
    }
    expect_ok_or_error([&] { (void)ck.view("\x01no such tensor"); });
  });
  return 0;
}
