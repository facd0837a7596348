// defines: DSV3_HD, f32_bits / f32_from_bits, f32_to_bf16_bits / bf16_bits_to_f32, fp8_e4m3_bits_to_f32 — the
// scalar conversions shared by the host code (io/safetensors.cpp, io/fp8.cpp, the CPU backend) and the CUDA kernels
// (cuda/convert.cu, cuda/optimizer.cu): one definition of the arithmetic, so that both sides give the same bits.
// Integer operations on the representations only: no rounding mode, FTZ or FMA setting can change a result.
// Header-only (inline); includable from .cpp (C++20) and .cu (C++17) files.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DSV3_HD __host__ __device__
#else
#define DSV3_HD
#endif

namespace dsv3 {

DSV3_HD inline uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

DSV3_HD inline float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// BF16 = the upper 16 bits of an FP32. Widening is exact.
DSV3_HD inline float bf16_bits_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// Round to nearest, ties to even mantissa (carry into the exponent rounds up to the next binade and, from the largest
// finite values, to infinity); +-inf stay inf; a NaN stays a NaN of the same sign, quieted (bit 6 set) so that the
// truncated payload can never become an infinity; subnormals round like any other value (no flush to zero).
DSV3_HD inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// float8 e4m3fn (io/fp8.h): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits, no infinities; 0x7F/0xFF are NaN
// (returned as the quiet NaN 0x7FC00000 with the code's sign). Exact: every code is an FP32 value.
DSV3_HD inline float fp8_e4m3_bits_to_f32(uint8_t code) {
  const uint32_t s = static_cast<uint32_t>(code >> 7) << 31, e = (code >> 3) & 0xFu, m = code & 7u;
  if (e == 15 && m == 7) return f32_from_bits(s | 0x7FC00000u);
  if (e == 0) {
    // subnormal: m/8 * 2^(1-7) = m * 2^-9, a normal FP32 (or zero): exponent field of 2^-9 is 118
    if (m == 0) return f32_from_bits(s);
    // m in 1..7: m * 2^-9 = 1.f * 2^(k-9) with k = floor(log2 m); mantissa m << (23 - k) without the leading one
    const uint32_t k = m >= 4 ? 2u : (m >= 2 ? 1u : 0u);
    return f32_from_bits(s | ((118u + k) << 23) | ((m << (23 - k)) & 0x7FFFFFu));
  }
  // normal: (1 + m/8) * 2^(e-7): FP32 exponent field e - 7 + 127
  return f32_from_bits(s | ((e + 120u) << 23) | (m << 20));
}

}  // namespace dsv3
