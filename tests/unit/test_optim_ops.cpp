// The optimizer's Backend ops on the CPU backend (the oracle): adamw_update bit-identical to the optimizer's original
// loop (copied below as it was in optim/adamw.cpp, compiled with the project's flags), FP32 and BF16 moments, decay
// on and off, grad_scale != 1, several steps, many shards in one call; sum_squares against double references;
// BF16 conversions (ties, NaN, Inf, subnormals, all 65536 patterns); FP8 block dequantization and the shared decode.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/error.h"
#include "core/numerics.h"
#include "io/fp8.h"
#include "io/safetensors.h"  // float_to_bf16 / bf16_to_float: what the original loop called
#include "ops/cpu/cpu_backend.h"

using namespace dsv3;

namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One flat shard with the AdamW state, as AdamW::Bucket holds it
struct Shard {
  std::vector<float> master, g, m, v;
  std::vector<uint16_t> m16, v16;
  std::vector<uint8_t> decay;
  int64_t shard = 0;
  bool bf16 = false;  // moments in m16/v16
};

Shard random_shard(int64_t n, bool bf16, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Shard s;
  s.shard = n;
  s.bf16 = bf16;
  s.master.resize(n);
  s.g.resize(n);
  s.decay.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    s.master[i] = nd(rng) * 0.05f;
    s.g[i] = nd(rng) * (i % 7 == 0 ? 1e-3f : 0.3f);  // some small gradients too
    s.decay[i] = (rng() % 3) != 0;
  }
  if (n > 3) s.g[3] = 0.0f;  // a zero gradient (still updated: decay and the moments' history)
  // moments as after some earlier steps (v >= 0)
  std::vector<float> m(n), v(n);
  for (int64_t i = 0; i < n; ++i) {
    m[i] = nd(rng) * 0.01f;
    v[i] = std::fabs(nd(rng)) * 1e-4f;
  }
  if (bf16) {
    s.m16.resize(n);
    s.v16.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      s.m16[i] = float_to_bf16(m[i]);
      s.v16[i] = float_to_bf16(v[i]);
    }
  } else {
    s.m = m;
    s.v = v;
  }
  return s;
}

struct Hyper {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

// The optimizer's update loop before it became a Backend op (optim/adamw.cpp, AdamW::step), verbatim but for the
// names: the reference the op must reproduce bit for bit.
void original_step(Shard& b, const Hyper& cfg_, int64_t t_, double lr, double grad_scale, bool bf16_moments) {
  const float b1 = (float)cfg_.beta1, b2 = (float)cfg_.beta2, eps = (float)cfg_.eps;
  const float bc1 = (float)(1.0 - std::pow(cfg_.beta1, (double)t_));
  const float bc2 = (float)(1.0 - std::pow(cfg_.beta2, (double)t_));
  const float flr = (float)lr, decay = (float)(1.0 - lr * cfg_.weight_decay), gs = (float)grad_scale;
  const bool scale = grad_scale != 1.0;
  const bool m16 = bf16_moments;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < b.shard; ++i) {
    const float g = scale ? b.g[i] * gs : b.g[i];  // the clipped gradient, as `g *= coef` would give it
    float m = m16 ? bf16_to_float(b.m16[i]) : b.m[i];
    float v = m16 ? bf16_to_float(b.v16[i]) : b.v[i];
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    float p = b.master[i];
    if (b.decay[i]) p *= decay;
    p -= flr * (m / bc1) / (std::sqrt(v / bc2) + eps);
    b.master[i] = p;
    if (m16) {
      b.m16[i] = float_to_bf16(m);
      b.v16[i] = float_to_bf16(v);
    } else {
      b.m[i] = m;
      b.v[i] = v;
    }
  }
}

Backend::AdamWShard as_op(Shard& s) {
  Backend::AdamWShard o;
  o.master = s.master.data();
  o.grad = s.g.data();
  o.decay = s.decay.data();
  if (s.bf16) {
    o.m16 = s.m16.data();
    o.v16 = s.v16.data();
  } else {
    o.m = s.m.data();
    o.v = s.v.data();
  }
  o.n = s.shard;
  return o;
}

Backend::AdamWHyper hyper(const Hyper& c, int64_t t, double lr, double grad_scale) {
  Backend::AdamWHyper h;
  h.lr = lr;
  h.beta1 = c.beta1;
  h.beta2 = c.beta2;
  h.eps = c.eps;
  h.weight_decay = c.weight_decay;
  h.grad_scale = grad_scale;
  h.t = t;
  return h;
}

template <class T>
int64_t count_bit_diffs(const std::vector<T>& a, const std::vector<T>& b) {
  EXPECT_EQ(a.size(), b.size());
  int64_t d = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) d += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
  return d;
}

void expect_same_state(const Shard& want, const Shard& got, const std::string& what) {
  EXPECT_EQ(count_bit_diffs(want.master, got.master), 0) << what << ": master";
  EXPECT_EQ(count_bit_diffs(want.m, got.m), 0) << what << ": m";
  EXPECT_EQ(count_bit_diffs(want.v, got.v), 0) << what << ": v";
  EXPECT_EQ(count_bit_diffs(want.m16, got.m16), 0) << what << ": m16";
  EXPECT_EQ(count_bit_diffs(want.v16, got.v16), 0) << what << ": v16";
}

}  // namespace

// Three steps with changing lr and grad_scale, FP32 and BF16 moments: every bit of the master weights and moments
// equals the original loop's
TEST(OptimOps, AdamwUpdateBitIdenticalToTheOriginalLoop) {
  CpuBackend cpu;
  Hyper cfg;
  for (const bool bf16 : {false, true})
    for (const int64_t n : {int64_t(1), int64_t(100), int64_t(100003)}) {
      Shard ref = random_shard(n, bf16, 7 + n + bf16), op = ref;
      const double lrs[] = {1e-3, 3e-4, 2.2e-4}, scales[] = {1.0, 0.37, 1.0 / 3.0};
      for (int64_t t = 1; t <= 3; ++t) {
        original_step(ref, cfg, t, lrs[t - 1], scales[t - 1], bf16);
        const Backend::AdamWShard s = as_op(op);
        cpu.adamw_update(&s, 1, hyper(cfg, t, lrs[t - 1], scales[t - 1]));
        expect_same_state(ref, op, std::string(bf16 ? "bf16" : "fp32") + " n " + std::to_string(n) + " step " +
                                       std::to_string(t));
      }
      // the weights did move (the test is not comparing two no-ops)
      const Shard init = random_shard(n, bf16, 7 + n + bf16);
      EXPECT_GT(count_bit_diffs(init.master, op.master), n / 2);
    }
}

// decay off everywhere and weight_decay 0 / decay on everywhere: the flags select per element
TEST(OptimOps, AdamwUpdateDecayFlags) {
  CpuBackend cpu;
  for (const uint8_t flag : {uint8_t(0), uint8_t(1)}) {
    Hyper cfg;
    cfg.weight_decay = 0.5;
    Shard ref = random_shard(1000, false, 42);
    std::fill(ref.decay.begin(), ref.decay.end(), flag);
    Shard op = ref;
    original_step(ref, cfg, 1, 1e-2, 1.0, false);
    const Backend::AdamWShard s = as_op(op);
    cpu.adamw_update(&s, 1, hyper(cfg, 1, 1e-2, 1.0));
    expect_same_state(ref, op, flag ? "decay on" : "decay off");
    // the flag matters: the same step with the other flag gives other weights
    Shard other = random_shard(1000, false, 42);
    std::fill(other.decay.begin(), other.decay.end(), (uint8_t)!flag);
    const Backend::AdamWShard so = as_op(other);
    cpu.adamw_update(&so, 1, hyper(cfg, 1, 1e-2, 1.0));
    EXPECT_GT(count_bit_diffs(other.master, op.master), 900);
  }
}

// Many shards in one call (the multi-tensor form; the CUDA kernel takes 16 per launch) = one call per shard,
// mixing FP32 and BF16 moments and empty shards
TEST(OptimOps, AdamwUpdateManyShardsInOneCall) {
  CpuBackend cpu;
  Hyper cfg;
  std::vector<Shard> one, all;
  for (int k = 0; k < 20; ++k) {
    const int64_t n = k % 5 == 4 ? 0 : 37 * k + 1;
    one.push_back(random_shard(n, k % 2 == 1, 1000 + k));
  }
  all = one;
  std::vector<Backend::AdamWShard> table;
  for (Shard& s : all) table.push_back(as_op(s));
  cpu.adamw_update(table.data(), (int)table.size(), hyper(cfg, 5, 1e-3, 0.8));
  for (size_t k = 0; k < one.size(); ++k) {
    const Backend::AdamWShard s = as_op(one[k]);
    cpu.adamw_update(&s, 1, hyper(cfg, 5, 1e-3, 0.8));
    expect_same_state(one[k], all[k], "shard " + std::to_string(k));
  }
}

// A shard with the model's weights attached (a group of one's bucket): the update writes them -- the new master, or
// its BF16 rounding -- and everything else is as without them
TEST(OptimOps, AdamwUpdateWritesTheModelsWeights) {
  CpuBackend cpu;
  Hyper cfg;
  for (const bool bf16_weights : {false, true})
    for (const bool bf16_moments : {false, true}) {
      Shard plain = random_shard(10007, bf16_moments, 77), with = plain;
      std::vector<float> weights(10007, -5.0f);
      for (int64_t t = 1; t <= 2; ++t) {
        const Backend::AdamWShard a = as_op(plain);
        cpu.adamw_update(&a, 1, hyper(cfg, t, 1e-3, 0.5));
        Backend::AdamWShard b = as_op(with);
        b.weights = weights.data();
        b.bf16_weights = bf16_weights;
        cpu.adamw_update(&b, 1, hyper(cfg, t, 1e-3, 0.5));
        const std::string what = std::string(bf16_weights ? "bf16" : "fp32") + " weights, " +
                                 (bf16_moments ? "bf16" : "fp32") + " moments, step " + std::to_string(t);
        expect_same_state(plain, with, what);
        std::vector<float> want(plain.master);
        if (bf16_weights) {
          std::vector<uint16_t> h(want.size());
          cpu.to_bf16(want.data(), (int64_t)want.size(), h.data());
          cpu.from_bf16(h.data(), (int64_t)h.size(), want.data());
          EXPECT_GT(count_bit_diffs(want, plain.master), 10007 / 2) << what << ": the rounding is not a no-op";
        }
        EXPECT_EQ(count_bit_diffs(want, weights), 0) << what;
      }
    }
}

TEST(OptimOps, AdamwUpdateRejectsAmbiguousMoments) {
  CpuBackend cpu;
  Shard s = random_shard(10, false, 1);
  std::vector<uint16_t> m16(10), v16(10);
  Backend::AdamWShard o = as_op(s);
  o.m16 = m16.data();
  o.v16 = v16.data();
  EXPECT_THROW(cpu.adamw_update(&o, 1, hyper(Hyper{}, 1, 1e-3, 1.0)), Error);
  o.m = o.v = nullptr;
  o.m16 = nullptr;
  EXPECT_THROW(cpu.adamw_update(&o, 1, hyper(Hyper{}, 1, 1e-3, 1.0)), Error);
}

// The chunked order (4096-element chunks in order, chunk sums in order) exactly, and within 1e-12 of a plain
// double sum
TEST(OptimOps, SumSquares) {
  CpuBackend cpu;
  std::mt19937_64 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (const int64_t n : {int64_t(0), int64_t(1), int64_t(4095), int64_t(4096), int64_t(4097), int64_t(100003),
                          int64_t(1) << 20}) {
    std::vector<float> x(n);
    for (auto& v : x) v = nd(rng) * 3.0f;
    if (n > 10) x[10] = 1e-40f;  // a subnormal: its square is still exact in double
    double plain = 0, chunked = 0;
    for (int64_t c = 0; c * 4096 < n; ++c) {
      double s = 0;
      for (int64_t i = c * 4096; i < std::min(n, (c + 1) * 4096); ++i) s += (double)x[i] * x[i];
      chunked += s;
    }
    for (float v : x) plain += (double)v * v;
    const double got = cpu.sum_squares(x.data(), n);
    EXPECT_EQ(got, chunked) << "n " << n;
    EXPECT_NEAR(got, plain, 1e-12 * plain) << "n " << n;
  }
  const float big[] = {3e38f, -3e38f};  // squares far beyond FP32's range: fine in double
  EXPECT_EQ(cpu.sum_squares(big, 2), 2 * (double)3e38f * (double)3e38f);
}

// BF16 rounding: nearest, ties to even, carries, NaN (quieted, sign kept), +-Inf, overflow to Inf, subnormals, -0
TEST(OptimOps, Bf16Conversions) {
  CpuBackend cpu;
  const std::pair<uint32_t, uint16_t> cases[] = {
      {0x3F800000u, 0x3F80},  // 1
      {0x3F808000u, 0x3F80},  // 1 + 2^-8: a tie, the even one is down
      {0x3F818000u, 0x3F82},  // a tie, the even one is up
      {0x3F808001u, 0x3F81},  // just above the tie
      {0x3F807FFFu, 0x3F80},  // just below the tie
      {0x3FFF8000u, 0x4000},  // a tie carrying into the exponent
      {0x7F7FFFFFu, 0x7F80},  // the largest float rounds to +Inf
      {0x7F7F7FFFu, 0x7F7F},  // ... a smaller one does not
      {0x7F800000u, 0x7F80},  // +Inf
      {0xFF800000u, 0xFF80},  // -Inf
      {0x7FC00000u, 0x7FC0},  // quiet NaN
      {0x7F800001u, 0x7FC0},  // signalling NaN with a payload only in the low bits: stays NaN (not Inf)
      {0xFF800001u, 0xFFC0},  // negative NaN keeps its sign
      {0x7FA12345u, 0x7FE1},  // payload kept where it fits, quiet bit set
      {0x00000001u, 0x0000},  // smallest subnormal rounds to +0
      {0x00008000u, 0x0000},  // a subnormal tie, down to even
      {0x00018000u, 0x0002},  // a subnormal tie, up to even
      {0x00010000u, 0x0001},  // a BF16 subnormal, exact
      {0x807FFFFFu, 0x8080},  // the largest negative subnormal rounds to -(smallest normal)
      {0x80000000u, 0x8000},  // -0
  };
  std::vector<float> x;
  for (const auto& c : cases) x.push_back(from_bits(c.first));
  std::vector<uint16_t> h(x.size());
  cpu.to_bf16(x.data(), (int64_t)x.size(), h.data());
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(h[i], cases[i].second) << std::hex << "0x" << cases[i].first;
    EXPECT_EQ(h[i], float_to_bf16(x[i])) << "the shared function is io's float_to_bf16";
  }
  // every BF16 pattern widens exactly and rounds back to itself (a signalling NaN comes back quieted)
  std::vector<uint16_t> all(65536), back(65536);
  for (int i = 0; i < 65536; ++i) all[i] = (uint16_t)i;
  std::vector<float> wide(65536);
  cpu.from_bf16(all.data(), 65536, wide.data());
  cpu.to_bf16(wide.data(), 65536, back.data());
  for (int i = 0; i < 65536; ++i) {
    ASSERT_EQ(bits(wide[i]), (uint32_t)i << 16) << i;
    ASSERT_EQ(bits(bf16_to_float((uint16_t)i)), bits(wide[i])) << i;
    const bool nan = (i & 0x7F80) == 0x7F80 && (i & 0x7F) != 0;
    ASSERT_EQ(back[i], nan ? (uint16_t)(i | 0x40) : (uint16_t)i) << i;
  }
  // random floats: the same as the per-element function io uses
  std::mt19937_64 rng(9);
  std::vector<float> r(100003);
  for (auto& v : r) v = from_bits((uint32_t)rng());
  std::vector<uint16_t> rh(r.size());
  cpu.to_bf16(r.data(), (int64_t)r.size(), rh.data());
  for (size_t i = 0; i < r.size(); ++i) ASSERT_EQ(rh[i], float_to_bf16(r[i])) << i;
}

// The shared e4m3 decode (core/numerics.h) against the formula, bit for bit on all 256 codes, and the op against
// io's fp8_dequantize
TEST(OptimOps, Fp8Dequantize) {
  for (int c = 0; c < 256; ++c) {
    const int s = c >> 7, e = (c >> 3) & 0xF, m = c & 7;
    const float got = fp8_e4m3_bits_to_f32((uint8_t)c);
    if (e == 15 && m == 7) {
      EXPECT_EQ(bits(got), (s ? 0xFFC00000u : 0x7FC00000u)) << c;
      continue;
    }
    const float mag = e == 0 ? std::ldexp((float)m, -9) : std::ldexp((float)(8 + m), e - 10);
    EXPECT_EQ(bits(got), bits(s ? -mag : mag)) << c;
    EXPECT_EQ(bits(fp8_e4m3_to_float((uint8_t)c)), bits(got)) << c;
  }
  CpuBackend cpu;
  const int64_t R = 37, C = 301, br = 16, bc = 128;
  std::mt19937_64 rng(3);
  std::vector<uint8_t> codes(R * C);
  for (auto& v : codes) v = (uint8_t)rng();
  std::vector<float> scale(fp8_num_blocks(R, br) * fp8_num_blocks(C, bc));
  for (auto& v : scale) v = std::ldexp(1.0f + (float)(rng() % 1000) / 1000.0f, (int)(rng() % 40) - 30);
  std::vector<float> want(R * C), got(R * C);
  fp8_dequantize(codes.data(), scale.data(), R, C, br, bc, want.data());
  cpu.dequantize_fp8(codes.data(), scale.data(), R, C, br, bc, got.data());
  EXPECT_EQ(count_bit_diffs(want, got), 0);
  EXPECT_THROW(cpu.dequantize_fp8(codes.data(), scale.data(), R, C, 0, bc, got.data()), Error);
}
