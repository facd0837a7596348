// Schedules (pure functions of iteration and tokens), AdamW against the golden update rule written out by hand,
// clipping, BF16 storage, and the deck wiring of all of them.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "core/deck.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "optim/schedule.h"
#include "ops/cpu/cpu_backend.h"
#include "train/trainer.h"

using namespace dsv3;

namespace {
Deck deck(const std::vector<std::string>& extra) {  // the required keys first, so that `extra` wins
  std::vector<std::string> o = {"train.iters=100", "train.global_batch=64", "train.seq_length=16"};
  o.insert(o.end(), extra.begin(), extra.end());
  return Deck::defaults_only(o);
}
}  // namespace

TEST(Schedule, WarmupThenCosine) {
  const Schedule s = Schedule::from_deck(deck({"optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_iters=10",
                                               "optim.lr_schedule=cosine"}));
  EXPECT_DOUBLE_EQ(s.lr_at(0, 0), 1e-4);   // (0+1)/10 of the peak
  EXPECT_DOUBLE_EQ(s.lr_at(9, 0), 1e-3);
  EXPECT_DOUBLE_EQ(s.lr_at(10, 0), 1e-3);  // the cosine starts at the peak ...
  EXPECT_NEAR(s.lr_at(55, 0), 0.5 * (1e-3 + 1e-4), 1e-12);  // ... is half-way at the middle ...
  EXPECT_DOUBLE_EQ(s.lr_at(100, 0), 1e-4);  // ... and ends at min_lr
  EXPECT_DOUBLE_EQ(s.lr_at(500, 0), 1e-4);
  for (int i = 11; i < 100; ++i) EXPECT_LT(s.lr_at(i, 0), s.lr_at(i - 1, 0));
}

TEST(Schedule, PaperMultiphaseByTokens) {
  // warmup to 2.2e-4 over 2K steps, constant until 10T tokens, cosine to 2.2e-5 over 4.3T, 2.2e-5 for 333B, then 7.3e-6
  const Schedule s = Schedule::from_deck(deck({"optim.lr=2.2e-4", "optim.min_lr=2.2e-5", "optim.warmup_iters=2000",
                                               "optim.lr_schedule=multiphase", "optim.decay_start_tokens=10e12",
                                               "optim.decay_tokens=4.3e12", "optim.lr_tail=333e9:2.2e-5 167e9:7.3e-6"}));
  EXPECT_NEAR(s.lr_at(999, 1e9), 1.1e-4, 1e-12);
  EXPECT_DOUBLE_EQ(s.lr_at(5000, 5e12), 2.2e-4);
  EXPECT_NEAR(s.lr_at(5000, 12.15e12), 0.5 * (2.2e-4 + 2.2e-5), 1e-12);
  EXPECT_DOUBLE_EQ(s.lr_at(5000, 14.4e12), 2.2e-5);
  EXPECT_DOUBLE_EQ(s.lr_at(5000, 14.7e12), 7.3e-6);
  EXPECT_DOUBLE_EQ(s.lr_at(5000, 20e12), 7.3e-6);
}

TEST(Schedule, BatchRampLambdaAndGamma) {
  const Schedule s = Schedule::from_deck(deck({"train.global_batch=15360", "train.batch_ramp=3072 3072 469e9",
                                               "train.mtp_lambda=0.3", "train.mtp_lambda_final=0.1",
                                               "train.mtp_lambda_switch_tokens=10e12", "moe.bias_update_rate=0.001",
                                               "moe.bias_update_stop_tokens=14.3e12"}));
  EXPECT_EQ(s.batch_at(0), 3072);
  EXPECT_EQ(s.batch_at(469e9 / 4 * 1.01), 6144);  // 4 increments over the ramp
  EXPECT_EQ(s.batch_at(469e9 * 0.999), 12288);
  EXPECT_EQ(s.batch_at(469e9), 15360);
  EXPECT_DOUBLE_EQ(s.mtp_lambda_at(9.9e12), 0.3);
  EXPECT_DOUBLE_EQ(s.mtp_lambda_at(10e12), 0.1);
  EXPECT_DOUBLE_EQ(s.gamma_at(14e12), 0.001);
  EXPECT_DOUBLE_EQ(s.gamma_at(14.3e12), 0.0);
  EXPECT_THROW(Schedule::from_deck(deck({"train.batch_ramp=3072 x"})), Error);
  EXPECT_THROW(Schedule::from_deck(deck({"optim.lr_tail=333e9"})), Error);
}

// AdamW against the golden train.json rule evaluated by hand in double, for a decayed and an undecayed tensor,
// two steps (bias correction), with BF16 moments and BF16 weights close to it.
TEST(AdamW, MatchesTheRuleAndBf16StorageStaysClose) {
  ModelConfig c = model_config_from_file(std::string(DSV3_TEST_DIR) + "/golden/tiny/config.json");
  CpuBackend be(1);
  Model m(c, be);
  m.init_random(3);
  Params g(m.params().table());
  for (int64_t i = 0; i < g.size(); ++i) g.data()[i] = (float)std::sin(0.37 * i) * 1e-2f;
  const std::vector<float> p0(m.params().data(), m.params().data() + m.params().size());
  AdamWConfig cfg;
  AdamW opt(m.params(), cfg);
  opt.step(m.params(), g, 0.01);
  opt.step(m.params(), g, 0.01);
  for (const char* name : {"model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.input_layernorm.weight"}) {
    const int64_t off = m.params().offset(name);
    const bool decay = m.params().spec(name).decay;
    for (int64_t i = off; i < off + 5; ++i) {
      double p = p0[i], mm = 0, v = 0;
      for (int t = 1; t <= 2; ++t) {
        mm = 0.9 * mm + 0.1 * g.data()[i];
        v = 0.95 * v + 0.05 * (double)g.data()[i] * g.data()[i];
        if (decay) p *= 1 - 0.01 * 0.1;
        p -= 0.01 * (mm / (1 - std::pow(0.9, t))) / (std::sqrt(v / (1 - std::pow(0.95, t))) + 1e-8);
      }
      EXPECT_NEAR(m.params().data()[i], p, 1e-6) << name;
    }
  }
  // BF16 moments and weights: same direction, within BF16 resolution of the FP32 result
  Model b(c, be);
  b.init_random(3);
  AdamWConfig bc;
  bc.bf16_moments = true;
  bc.bf16_params = true;
  AdamW ob(b.params(), bc);
  ob.step(b.params(), g, 0.01);
  ob.step(b.params(), g, 0.01);
  // bound: the BF16 rounding of the weight (2^-8 relative) + 1% of the two updates (lr 0.01 each) from the
  // BF16 moments
  int64_t bad = 0, not_bf16 = 0;
  for (int64_t i = 0; i < b.params().size(); ++i) {
    const float w = b.params().data()[i], ref = m.params().data()[i];
    not_bf16 += w != bf16_to_float(float_to_bf16(w));  // the working weights are BF16 values
    bad += !(std::fabs(w - ref) <= std::fabs(ref) / 256 + 2e-4);
  }
  EXPECT_EQ(not_bf16, 0);
  EXPECT_EQ(bad, 0);
  int64_t trainable = 0, held = 0;
  for (const auto& p : b.params().table()) trainable += p.trainable ? p.numel() : 0;
  for (const auto& bk : ob.buckets()) held += (int64_t)bk.master.size();
  EXPECT_EQ(held, trainable);  // one rank: the FP32 master copy of every trainable element, once
}

// Parameters are stored by optimizer bucket (model/params.h): on one rank each bucket's gradients are read where they
// lie (no packed copy of the whole gradient), and the step equals the packed path's (a Params in table order would
// need it: the buckets interleave there)
TEST(AdamW, OneRankReadsTheBucketsGradientsInPlace) {
  ModelConfig c = model_config_from_file(std::string(DSV3_TEST_DIR) + "/golden/tiny/config.json");
  CpuBackend be(1);
  Model m(c, be);
  m.init_random(5);
  Params g(m.params().table());
  for (int64_t i = 0; i < g.size(); ++i) g.data()[i] = (float)std::cos(0.11 * i) * 1e-2f;
  AdamW opt(m.params(), AdamWConfig{});
  opt.reduce_grads(g);
  int64_t expect_off = 0;
  for (const auto& b : opt.buckets()) {
    ASSERT_FALSE(b.params.empty());
    EXPECT_EQ(b.g.size(), 0u);  // no copy
    EXPECT_EQ(b.grad, g.data() + expect_off);  // the dense bucket first, then the experts
    EXPECT_EQ(b.grad, g.get(g.table()[b.params.front()].name));
    expect_off += b.size;
  }
  // against the rule on a parameter of each bucket, after one step: the gradient each element saw is its own
  const std::vector<float> p0(m.params().data(), m.params().data() + m.params().size());
  opt.step(m.params(), 0.01);
  for (const char* name : {"model.layers.1.self_attn.kv_b_proj.weight", "model.layers.3.mlp.experts.up_proj.weight",
                           "model.norm.weight"}) {
    const int64_t off = m.params().offset(name), n = m.params().local_numel(m.params().spec(name));
    const bool decay = m.params().spec(name).decay;
    for (int64_t i = off; i < off + n; i += std::max<int64_t>(1, n / 7)) {
      const double gi = g.get(name)[i - off];
      double p = p0[i];
      if (decay) p *= 1 - 0.01 * 0.1;
      p -= 0.01 * (0.1 * gi / 0.1) / (std::sqrt(0.05 * gi * gi / 0.05) + 1e-8);
      EXPECT_NEAR(m.params().data()[i], p, 1e-6) << name << " element " << i - off;
    }
  }
}

TEST(Clip, ScalesOnlyAboveTheMaximum) {
  ModelConfig c = model_config_from_file(std::string(DSV3_TEST_DIR) + "/golden/tiny/config.json");
  Params g(build_param_table(c));
  for (int64_t i = 0; i < g.size(); ++i) g.data()[i] = 0.001f;
  const double n = global_grad_norm(g);
  int64_t trainable = 0;
  for (const auto& p : g.table()) trainable += p.trainable ? p.numel() : 0;
  EXPECT_NEAR(n, (double)0.001f * std::sqrt((double)trainable), 1e-12);
  EXPECT_EQ(clip_grads(g, n, 10 * n), 1.0);
  EXPECT_EQ(g.data()[0], 0.001f);
  const double coef = clip_grads(g, n, 0.5 * n);
  EXPECT_NEAR(coef, 0.5 * n / (n + 1e-6), 1e-12);
  EXPECT_NEAR(global_grad_norm(g), 0.5 * n, 1e-6);
}

// Training is deterministic: the same seed and batches give bit-identical losses and weights.
TEST(Trainer, BitIdenticalRuns) {
  ModelConfig c = model_config_from_file(std::string(DSV3_TEST_DIR) + "/golden/tiny/config.json");
  CpuBackend be(2);
  std::vector<int64_t> toks(4 * 32);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = (int64_t)((i * 7919) % 512);
  auto run = [&](std::vector<float>& w) {
    Model m(c, be);
    m.init_random(11);
    TrainerConfig tc;
    tc.micro_batch = 2;
    Trainer t(m, tc);
    std::vector<double> losses;
    for (int s = 0; s < 3; ++s) losses.push_back(t.step(toks.data(), 4, 32, 1e-3, 0.3, 1e-3).loss.total);
    w.assign(m.params().data(), m.params().data() + m.params().size());
    return losses;
  };
  std::vector<float> w1, w2;
  const auto l1 = run(w1), l2 = run(w2);
  EXPECT_EQ(l1, l2);
  EXPECT_EQ(0, std::memcmp(w1.data(), w2.data(), w1.size() * 4));
  EXPECT_LT(l1[2], l1[0]);  // and it learns
}
