// defines: float8 e4m3fn conversions and block-wise (de)quantization (see fp8.h)
#include "io/fp8.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/numerics.h"

namespace dsv3 {

namespace {

// the decode is core/numerics.h's, which the CUDA kernel shares; a table of its 256 values here
std::array<float, 256> make_decode_table() {
  std::array<float, 256> t{};
  for (int c = 0; c < 256; ++c) t[c] = fp8_e4m3_bits_to_f32(static_cast<uint8_t>(c));
  return t;
}

const std::array<float, 256>& decode_table() {
  static const std::array<float, 256> t = make_decode_table();
  return t;
}

// Round a non-negative float (whose fractional part is exactly representable) to the nearest integer,
// ties to even, independent of the floating-point environment.
inline int round_half_even(float q) {
  const float fl = std::floor(q);
  const float d = q - fl;  // exact
  int r = static_cast<int>(fl);
  if (d > 0.5f || (d == 0.5f && (r & 1))) ++r;
  return r;
}

}  // namespace

float fp8_e4m3_to_float(uint8_t code) { return decode_table()[code]; }

uint8_t float_to_fp8_e4m3(float x) {
  if (std::isnan(x)) return 0x7F;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  const float a = std::fabs(x);
  if (a >= 448.0f) return sign | 0x7E;
  if (a < 0x1p-6f) {
    // subnormal range (and the rounding up into the smallest normal): code = round(a / 2^-9)
    const int m = round_half_even(a * 512.0f);  // exact scaling; m in [0, 8]; 8 == code of 2^-6
    return sign | static_cast<uint8_t>(m);
  }
  int k;
  std::frexp(a, &k);                  // a = f * 2^k, f in [0.5, 1)
  int e = k - 1;                      // a in [2^e, 2^(e+1)), e in [-6, 8]
  int r = round_half_even(std::ldexp(a, 3 - e));  // in [8, 16]
  if (r == 16) {
    r = 8;
    ++e;
  }
  const int code = ((e + 7) << 3) | (r - 8);  // <= 0x7E because a < 448
  return sign | static_cast<uint8_t>(code);
}

int64_t fp8_num_blocks(int64_t n, int64_t block) {
  DSV3_CHECK(n >= 0 && block >= 1, "fp8_num_blocks: a dimension of " << n << " elements in blocks of " << block
                                                                      << ": needs a size >= 0 and a block >= 1");
  return n / block + (n % block != 0 ? 1 : 0);
}

std::vector<int64_t> fp8_scale_shape(const std::string& tensor, int64_t rows, int64_t cols, int64_t block_rows,
                                     int64_t block_cols) {
  auto where = [&] {
    return "FP8 tensor '" + tensor + "' [" + std::to_string(rows) + ", " + std::to_string(cols) + "] with block " +
           std::to_string(block_rows) + "x" + std::to_string(block_cols);
  };
  DSV3_CHECK(rows >= 0 && cols >= 0 && block_rows >= 1 && block_cols >= 1,
             where() << ": sizes must be >= 0 and blocks >= 1");
  const int64_t nbr = fp8_num_blocks(rows, block_rows), nbc = fp8_num_blocks(cols, block_cols);
  int64_t bytes = 0;
  DSV3_CHECK(!__builtin_mul_overflow(nbr, nbc, &bytes) && !__builtin_mul_overflow(bytes, int64_t(4), &bytes),
             where() << ": its scale_inv [" << nbr << ", " << nbc << "] has more bytes than int64 can count");
  return {nbr, nbc};
}

void fp8_dequantize(const uint8_t* codes, const float* scale_inv, int64_t rows, int64_t cols, int block_rows,
                    int block_cols, float* out) {
  int64_t numel = 0;
  DSV3_CHECK(rows >= 0 && cols >= 0 && block_rows > 0 && block_cols > 0 && !__builtin_mul_overflow(rows, cols, &numel),
             "fp8_dequantize: invalid sizes rows " << rows << " cols " << cols << " block " << block_rows << "x"
                                                   << block_cols);
  const int64_t nbc = fp8_num_blocks(cols, block_cols);
  const std::array<float, 256>& kDecode = decode_table();
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const float* srow = scale_inv + (r / block_rows) * nbc;
    const uint8_t* crow = codes + r * cols;
    float* orow = out + r * cols;
    for (int64_t c = 0; c < cols; ++c) orow[c] = kDecode[crow[c]] * srow[c / block_cols];
  }
}

void fp8_quantize(const float* w, int64_t rows, int64_t cols, int block_rows, int block_cols, uint8_t* codes,
                  float* scale_inv) {
  int64_t numel = 0;
  DSV3_CHECK(rows >= 0 && cols >= 0 && block_rows > 0 && block_cols > 0 && !__builtin_mul_overflow(rows, cols, &numel),
             "fp8_quantize: invalid sizes rows " << rows << " cols " << cols << " block " << block_rows << "x"
                                                 << block_cols);
  const int64_t nbr = fp8_num_blocks(rows, block_rows), nbc = fp8_num_blocks(cols, block_cols);
  for (int64_t br = 0; br < nbr; ++br) {
    const int64_t r0 = br * block_rows, r1 = std::min<int64_t>(rows, r0 + block_rows);
    for (int64_t bc = 0; bc < nbc; ++bc) {
      const int64_t c0 = bc * block_cols, c1 = std::min<int64_t>(cols, c0 + block_cols);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          const float v = w[r * cols + c];
          if (!std::isfinite(v)) DSV3_FAIL("fp8_quantize: non-finite weight " << v << " at [" << r << ", " << c << "]");
          amax = std::max(amax, std::fabs(v));
        }
      float s;
      if (amax == 0.0f) {
        s = 1.0f;
      } else {
        s = amax / 448.0f;
        if (s == 0.0f) s = std::numeric_limits<float>::denorm_min();
      }
      scale_inv[br * nbc + bc] = s;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) codes[r * cols + c] = float_to_fp8_e4m3(w[r * cols + c] / s);
    }
  }
}

}  // namespace dsv3
