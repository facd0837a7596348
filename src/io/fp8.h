// defines: float8 e4m3fn encode/decode and the DeepSeek-V3 block-wise FP8 weight format
// e4m3fn: 1 sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities; NaN = 0x7F/0xFF;
// largest finite 448 = 0x7E; smallest subnormal 2^-9 = 0x01.
// Block format (the released DeepSeek-V3 checkpoint): a [rows, cols] weight is cut into
// block_rows x block_cols blocks (edge blocks partial); scale_inv is F32 [ceil(rows/br), ceil(cols/bc)]
// row-major, and weight = float(decode(code)) * scale_inv[block].
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

float fp8_e4m3_to_float(uint8_t code);  // exact; 0x7F/0xFF -> NaN
// Round to nearest, ties to even mantissa; |x| >= 448 (incl. inf) saturates to +-448; the sign is kept
// for values that round to zero (tiny negatives -> 0x80); NaN -> 0x7F.
uint8_t float_to_fp8_e4m3(float x);

// ceil(n / block): the blocks along one dimension of n >= 0 elements, block >= 1 (else dsv3::Error). Computed as
// n / block + (n % block != 0), which cannot overflow (the old (n + block - 1) / block did for n near 2^63, e.g. the
// dimension of an empty [2^63-1, 0] tensor, found by fuzzing).
int64_t fp8_num_blocks(int64_t n, int64_t block);
// The scale_inv shape {ceil(rows/br), ceil(cols/bc)} of the [rows, cols] FP8 tensor `tensor`, checked: sizes >= 0,
// blocks >= 1, and the scale's size in bytes (4 per element) representable in int64; else a dsv3::Error naming the
// tensor, its shape and the block.
std::vector<int64_t> fp8_scale_shape(const std::string& tensor, int64_t rows, int64_t cols, int64_t block_rows,
                                     int64_t block_cols);

// out[r, c] = fp8_e4m3_to_float(codes[r, c]) * scale_inv[r / br, c / bc]  (one float32 multiply).
void fp8_dequantize(const uint8_t* codes, const float* scale_inv, int64_t rows, int64_t cols, int block_rows,
                    int block_cols, float* out);

// The released format: per block, scale_inv = float32(amax) / 448.0f (float32 division) and
// code = float_to_fp8_e4m3(w / scale_inv) (float32 division).
// All-zero block (amax == 0): scale_inv = 1.0f and the codes are the signed zeros (0x00, or 0x80 for -0.0),
// so dequantization gives exact (signed) zeros and never NaN. A block whose amax/448 underflows to 0 in
// float32 (amax < ~6.3e-43) uses the smallest positive float (2^-149) instead, again avoiding NaN.
// Non-finite weights are an error (dsv3::Error naming the element).
void fp8_quantize(const float* w, int64_t rows, int64_t cols, int block_rows, int block_cols, uint8_t* codes,
                  float* scale_inv);

}  // namespace dsv3
