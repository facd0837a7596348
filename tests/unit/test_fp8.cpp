// tests: float8 e4m3fn encode/decode, block (de)quantization, bit-exactness against the golden FP8 files
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"
#include "io/fp8.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace {

// Independent decode: (-1)^s * 2^(e-7) * (1 + m/8) for e > 0, (-1)^s * 2^-6 * m/8 for e == 0; e=15,m=7 NaN.
double ref_decode(int code) {
  const int s = (code >> 7) & 1, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? std::pow(2.0, -6) * (m / 8.0) : std::pow(2.0, e - 7) * (1.0 + m / 8.0);
  return s ? -mag : mag;
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

std::array<int, 2> golden_block() {
  std::ifstream f(DSV3_TEST_DIR "/golden/tiny/config.json");
  nlohmann::json j = nlohmann::json::parse(f);
  auto b = j.at("quantization_config").at("weight_block_size");
  return {b.at(0).get<int>(), b.at(1).get<int>()};
}

}  // namespace

TEST(Fp8, DecodeAll256Codes) {
  for (int c = 0; c < 256; ++c) {
    const float got = dsv3::fp8_e4m3_to_float(static_cast<uint8_t>(c));
    const double want = ref_decode(c);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "code " << c;
      continue;
    }
    EXPECT_EQ(static_cast<double>(got), want) << "code " << c;
    EXPECT_EQ(std::signbit(got), c >= 128) << "code " << c;
  }
  // spot checks of the format's landmarks
  EXPECT_EQ(dsv3::fp8_e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(dsv3::fp8_e4m3_to_float(0xFE), -448.0f);
  EXPECT_EQ(dsv3::fp8_e4m3_to_float(0x01), 0x1p-9f);
  EXPECT_EQ(dsv3::fp8_e4m3_to_float(0x07), 7 * 0x1p-9f);
  EXPECT_EQ(dsv3::fp8_e4m3_to_float(0x08), 0x1p-6f);
  EXPECT_EQ(dsv3::fp8_e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(dsv3::fp8_e4m3_to_float(0x78), 256.0f);  // e=15 m=0 is a normal number (no inf)
  EXPECT_EQ(bits(dsv3::fp8_e4m3_to_float(0x80)), 0x80000000u);
  EXPECT_TRUE(std::isnan(dsv3::fp8_e4m3_to_float(0x7F)));
  EXPECT_TRUE(std::isnan(dsv3::fp8_e4m3_to_float(0xFF)));
}

TEST(Fp8, EncodeRoundTripsEveryFiniteCode) {
  for (int c = 0; c < 256; ++c) {
    if (c == 0x7F || c == 0xFF) continue;
    EXPECT_EQ(dsv3::float_to_fp8_e4m3(dsv3::fp8_e4m3_to_float(static_cast<uint8_t>(c))), c) << "code " << c;
  }
}

TEST(Fp8, EncodeRoundsToNearestEven) {
  // For every pair of adjacent finite codes: the exact midpoint goes to the even code, values just off
  // the midpoint go to the nearer code.
  for (int sign : {0, 0x80}) {
    for (int c = 0; c < 0x7E; ++c) {
      const int lo = sign | c, hi = sign | (c + 1);
      const float a = dsv3::fp8_e4m3_to_float(static_cast<uint8_t>(lo));
      const float b = dsv3::fp8_e4m3_to_float(static_cast<uint8_t>(hi));
      const float mid = (a + b) / 2;  // exact in float32
      ASSERT_EQ(static_cast<double>(mid), (static_cast<double>(a) + b) / 2);
      const int even = (lo & 1) == 0 ? lo : hi;
      EXPECT_EQ(dsv3::float_to_fp8_e4m3(mid), even) << "midpoint of codes " << lo << "," << hi;
      EXPECT_EQ(dsv3::float_to_fp8_e4m3(std::nextafter(mid, a)), lo) << "below midpoint " << lo;
      EXPECT_EQ(dsv3::float_to_fp8_e4m3(std::nextafter(mid, b)), hi) << "above midpoint " << lo;
    }
  }
  // hand-checked values
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(1.0625f), 0x38);  // 1 + 1/16: tie between 1.0 (0x38) and 1.125 -> even 0x38
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(1.1875f), 0x3A);  // tie between 1.125 (0x39) and 1.25 (0x3A) -> 0x3A
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(3 * 0x1p-10f), 0x02);  // subnormal tie 1.5*2^-9 -> 2*2^-9
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(15 * 0x1p-10f), 0x08);  // 7.5*2^-9 -> rounds up into the min normal
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(0.3f), 0x2A);  // 0.3 = 1.2*2^-2: e=5, m = round(1.6) = 2 -> 0.3125
}

TEST(Fp8, EncodeSaturatesAndHandlesSpecials) {
  const float inf = std::numeric_limits<float>::infinity();
  for (float x : {448.0f, 449.0f, 464.0f, 479.9f, 480.0f, 500.0f, 1e30f, inf}) {
    EXPECT_EQ(dsv3::float_to_fp8_e4m3(x), 0x7E) << x;
    EXPECT_EQ(dsv3::float_to_fp8_e4m3(-x), 0xFE) << -x;
  }
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(440.0f), 0x7E);  // tie 416|448 -> 448 (m=6 even)
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(431.0f), 0x7D);  // 416
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(-std::numeric_limits<float>::quiet_NaN()), 0x7F);
  // zeros and tiny values keep their sign
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(0.0f), 0x00);
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(-0.0f), 0x80);
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(1e-30f), 0x00);
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(-1e-30f), 0x80);
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(-std::numeric_limits<float>::denorm_min()), 0x80);
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(-0x1p-11f), 0x80);
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(-0x1p-10f), 0x80);  // exactly half the min subnormal: tie -> even 0
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(std::nextafter(-0x1p-10f, -1.0f)), 0x81);
  EXPECT_EQ(dsv3::float_to_fp8_e4m3(0x1p-10f), 0x00);
}

TEST(Fp8, QuantizeDequantizeSmallBlocks) {
  // 5x7 with 4x4 blocks: partial edge blocks; scale layout [2, 2]
  const int64_t R = 5, C = 7;
  std::vector<float> w(R * C);
  for (int64_t i = 0; i < R * C; ++i) w[i] = std::sin(0.7f * static_cast<float>(i)) * (1 + i % 5);
  w[4 * C + 6] = 0.0f;  // block (1,1) is the single element (4,6)... plus (4,4),(4,5)
  std::vector<uint8_t> codes(R * C);
  std::vector<float> s(4);
  dsv3::fp8_quantize(w.data(), R, C, 4, 4, codes.data(), s.data());
  for (int br = 0; br < 2; ++br)
    for (int bc = 0; bc < 2; ++bc) {
      float amax = 0;
      for (int64_t r = br * 4; r < std::min<int64_t>(R, br * 4 + 4); ++r)
        for (int64_t c = bc * 4; c < std::min<int64_t>(C, bc * 4 + 4); ++c) amax = std::max(amax, std::fabs(w[r * C + c]));
      EXPECT_EQ(bits(s[br * 2 + bc]), bits(amax / 448.0f)) << br << "," << bc;
      for (int64_t r = br * 4; r < std::min<int64_t>(R, br * 4 + 4); ++r)
        for (int64_t c = bc * 4; c < std::min<int64_t>(C, bc * 4 + 4); ++c)
          EXPECT_EQ(codes[r * C + c], dsv3::float_to_fp8_e4m3(w[r * C + c] / s[br * 2 + bc]));
    }
  std::vector<float> d(R * C);
  dsv3::fp8_dequantize(codes.data(), s.data(), R, C, 4, 4, d.data());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const float want = dsv3::fp8_e4m3_to_float(codes[r * C + c]) * s[(r / 4) * 2 + c / 4];
      EXPECT_EQ(bits(d[r * C + c]), bits(want));
      EXPECT_NEAR(d[r * C + c], w[r * C + c], std::fabs(w[r * C + c]) / 8 + 1e-6);
    }
}

TEST(Fp8, AllZeroBlockGivesScaleOneAndZeros) {
  std::vector<float> w = {0.0f, -0.0f, 5.0f, 0.0f, 0.0f, -2.0f};  // 2x3, blocks 2x2: block 0 all zero
  std::vector<uint8_t> codes(6);
  std::vector<float> s(2);
  dsv3::fp8_quantize(w.data(), 2, 3, 2, 2, codes.data(), s.data());
  EXPECT_EQ(s[0], 1.0f);
  EXPECT_EQ(codes[0], 0x00);
  EXPECT_EQ(codes[1], 0x80);
  EXPECT_EQ(codes[3], 0x00);
  EXPECT_EQ(codes[4], 0x00);
  EXPECT_EQ(bits(s[1]), bits(5.0f / 448.0f));
  EXPECT_EQ(codes[2], 0x7E);
  EXPECT_EQ(codes[5], dsv3::float_to_fp8_e4m3(-2.0f / s[1]));
  std::vector<float> d(6);
  dsv3::fp8_dequantize(codes.data(), s.data(), 2, 3, 2, 2, d.data());
  for (float x : d) EXPECT_FALSE(std::isnan(x));
  EXPECT_EQ(d[0], 0.0f);
  EXPECT_EQ(d[1], 0.0f);
  EXPECT_TRUE(std::signbit(d[1]));
  // underflowing amax/448 never gives NaN either
  std::vector<float> t = {std::numeric_limits<float>::denorm_min(), 0.0f};
  dsv3::fp8_quantize(t.data(), 1, 2, 1, 2, codes.data(), s.data());
  EXPECT_GT(s[0], 0.0f);
  dsv3::fp8_dequantize(codes.data(), s.data(), 1, 2, 1, 2, d.data());
  EXPECT_FALSE(std::isnan(d[0]));
  // non-finite input is an error
  std::vector<float> bad = {1.0f, std::numeric_limits<float>::infinity()};
  EXPECT_THROW(dsv3::fp8_quantize(bad.data(), 1, 2, 1, 2, codes.data(), s.data()), dsv3::Error);
}

TEST(Fp8, GoldenDequantizationIsBitExact) {
  const auto blk = golden_block();
  ASSERT_EQ(blk, (std::array<int, 2>{16, 16}));
  dsv3::SafetensorsFile q(DSV3_TEST_DIR "/golden/tiny/model-fp8.safetensors");
  dsv3::SafetensorsFile dq(DSV3_TEST_DIR "/golden/tiny/model-fp8-dequant.safetensors");
  int n = 0;
  for (const auto& name : q.names()) {
    const auto& v = q.get(name);
    if (v.dtype != dsv3::DType::F8_E4M3) continue;
    ++n;
    ASSERT_EQ(v.shape.size(), 2u) << name;
    const int64_t R = v.shape[0], C = v.shape[1];
    const auto& sv = q.get(name + "_scale_inv");
    ASSERT_EQ(sv.shape, (std::vector<int64_t>{(R + blk[0] - 1) / blk[0], (C + blk[1] - 1) / blk[1]})) << name;
    const auto scale = q.to_f32(name + "_scale_inv");
    std::vector<float> out(R * C);
    dsv3::fp8_dequantize(v.data, scale.data(), R, C, blk[0], blk[1], out.data());
    const auto& want = dq.get(name);
    ASSERT_EQ(want.shape, v.shape) << name;
    ASSERT_EQ(want.nbytes, out.size() * 4) << name;
    EXPECT_EQ(std::memcmp(out.data(), want.data, want.nbytes), 0) << name << " dequantization not bit-exact";
  }
  EXPECT_GT(n, 0);
  EXPECT_EQ(static_cast<size_t>(n), dq.size());  // the dequant file holds exactly the quantized tensors
}

TEST(Fp8, GoldenRequantizationIsBitExact) {
  const auto blk = golden_block();
  dsv3::SafetensorsFile q(DSV3_TEST_DIR "/golden/tiny/model-fp8.safetensors");
  dsv3::SafetensorsFile orig(DSV3_TEST_DIR "/golden/tiny/model.safetensors");
  dsv3::SafetensorsFile dq(DSV3_TEST_DIR "/golden/tiny/model-fp8-dequant.safetensors");
  int n = 0, dq_exact = 0;
  for (const auto& name : q.names()) {
    const auto& v = q.get(name);
    if (v.dtype != dsv3::DType::F8_E4M3) {
      if (name.size() < 10 || name.compare(name.size() - 10, 10, "_scale_inv") != 0) {
        // unquantized tensors are the original F32 values
        EXPECT_EQ(q.to_f32(name), orig.to_f32(name)) << name;
      }
      continue;
    }
    ++n;
    const int64_t R = v.shape[0], C = v.shape[1];
    const auto scale = q.to_f32(name + "_scale_inv");
    for (int src = 0; src < 2; ++src) {
      const auto w = src == 0 ? orig.to_f32(name) : dq.to_f32(name);
      std::vector<uint8_t> codes(R * C);
      std::vector<float> s(scale.size());
      dsv3::fp8_quantize(w.data(), R, C, blk[0], blk[1], codes.data(), s.data());
      const bool codes_eq = std::memcmp(codes.data(), v.data, v.nbytes) == 0;
      const bool scale_eq = std::memcmp(s.data(), scale.data(), scale.size() * 4) == 0;
      if (src == 0) {
        EXPECT_TRUE(codes_eq) << name << ": codes from model.safetensors differ";
        EXPECT_TRUE(scale_eq) << name << ": scale_inv from model.safetensors differs";
      } else {
        dq_exact += codes_eq && scale_eq;
      }
    }
  }
  EXPECT_GT(n, 0);
  // Re-quantizing the dequantized values: every block's max code is +-448 (amax/scale_inv rounds to
  // 448), so amax' = 448 * scale_inv and scale_inv' = amax'/448 == scale_inv, and each code c maps back to
  // decode(c)*s/s == decode(c) exactly -> the same codes. Check this holds for every tensor.
  EXPECT_EQ(dq_exact, n);
}

// Fuzz notes: the block count (n + block - 1) / block overflowed int64 for a dimension near 2^63; now it cannot, and
// the scale shape of a tensor whose scale would not fit int64 bytes is an error naming the tensor and its shape.
TEST(Fp8, BlockCountCannotOverflow) {
  const int64_t big = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(dsv3::fp8_num_blocks(0, 128), 0);
  EXPECT_EQ(dsv3::fp8_num_blocks(1, 128), 1);
  EXPECT_EQ(dsv3::fp8_num_blocks(128, 128), 1);
  EXPECT_EQ(dsv3::fp8_num_blocks(129, 128), 2);
  EXPECT_EQ(dsv3::fp8_num_blocks(big, 128), big / 128 + 1);
  EXPECT_EQ(dsv3::fp8_num_blocks(big, big), 1);
  EXPECT_ERROR(dsv3::fp8_num_blocks(-1, 128), "a dimension of -1 elements in blocks of 128");
  EXPECT_ERROR(dsv3::fp8_num_blocks(5, 0), "a dimension of 5 elements in blocks of 0");
}

TEST(Fp8, ScaleShapeIsCheckedAndNamesTheTensor) {
  const int64_t big = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(dsv3::fp8_scale_shape("w", 7168, 18432, 128, 128), (std::vector<int64_t>{56, 144}));
  EXPECT_EQ(dsv3::fp8_scale_shape("w", 130, 0, 128, 128), (std::vector<int64_t>{2, 0}));
  EXPECT_EQ(dsv3::fp8_scale_shape("w", big, 0, 128, 128), (std::vector<int64_t>{big / 128 + 1, 0}));
  EXPECT_ERROR(dsv3::fp8_scale_shape("model.layers.3.mlp.gate_proj.weight", big, big, 1, 1),
               "FP8 tensor 'model.layers.3.mlp.gate_proj.weight' [9223372036854775807, 9223372036854775807] with "
               "block 1x1: its scale_inv [9223372036854775807, 9223372036854775807] has more bytes than int64");
  EXPECT_ERROR(dsv3::fp8_scale_shape("q", int64_t(1) << 31, int64_t(1) << 31, 1, 1), "FP8 tensor 'q'");
  EXPECT_ERROR(dsv3::fp8_scale_shape("q", 4, -4, 128, 128), "FP8 tensor 'q' [4, -4] with block 128x128: sizes");
  EXPECT_ERROR(dsv3::fp8_scale_shape("q", 4, 4, 0, 128), "FP8 tensor 'q' [4, 4] with block 0x128: sizes");
}
