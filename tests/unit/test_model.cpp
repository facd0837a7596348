// Model-level unit tests: config validation, the parameter table, YaRN, the router, MLA cache vs full attention,
// sampling. Golden-file comparisons of the whole model live in dsv3-golden (ctest golden_tiny).
#include "test_util.h"
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "model/rope.h"
#include "model/sampling.h"
#include "ops/cpu/cpu_backend.h"

using namespace dsv3;
using ::testing::HasSubstr;

using dsv3::test::error_of;

namespace {
const std::string kTiny = std::string(DSV3_TEST_DIR) + "/golden/tiny";
ModelConfig tiny() { return model_config_from_file(kTiny + "/config.json"); }
nlohmann::json tiny_json() {
  std::ifstream f(kTiny + "/config.json");
  return nlohmann::json::parse(f);
}
}  // namespace

TEST(ModelConfig, ReadsTinyAndReal) {
  const ModelConfig c = tiny();
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.qk_head_dim(), 24);
  EXPECT_EQ(c.fp8_block[0], 16);
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(4));  // the MTP block
  c.validate();
  const ModelConfig r = model_config_from_file(std::string(DSV3_SOURCE_DIR) + "/input/models/deepseek-v3.json");
  r.validate();
  EXPECT_EQ(r.fp8_block[0], 128);
  EXPECT_EQ(r.rope_scaling.original_max_position_embeddings, 4096);
}

TEST(ModelConfig, InconsistentSizesNameTheKey) {
  auto bad = [](const char* key, nlohmann::json v) {
    auto j = tiny_json();
    j[key] = v;
    return error_of([&] { model_config_from_json(j, "cfg.json").validate(); });
  };
  EXPECT_THAT(bad("n_group", 3), HasSubstr("n_group"));
  EXPECT_THAT(bad("topk_group", 5), HasSubstr("topk_group"));
  EXPECT_THAT(bad("num_experts_per_tok", 5), HasSubstr("num_experts_per_tok"));
  EXPECT_THAT(bad("qk_rope_head_dim", 7), HasSubstr("qk_rope_head_dim"));
  EXPECT_THAT(bad("num_key_value_heads", 2), HasSubstr("num_key_value_heads"));
  EXPECT_THAT(bad("hidden_size", 0), HasSubstr("hidden_size"));
  EXPECT_THAT(bad("hidden_size", "64"), HasSubstr("must be an integer"));
  EXPECT_THAT(bad("first_k_dense_replace", 9), HasSubstr("first_k_dense_replace"));
  EXPECT_THAT(bad("scoring_func", "softmax"), HasSubstr("scoring_func"));
  EXPECT_THAT(bad("num_nextn_predict_layers", 2), HasSubstr("num_nextn_predict_layers"));
  EXPECT_THAT(bad("norm_topk_prob", 1), HasSubstr("boolean"));
  EXPECT_THAT(error_of([] { model_config_from_file("/nonexistent/config.json"); }), HasSubstr("/nonexistent/config.json"));
}

// The table must describe exactly the tensors of an HF checkpoint: every tensor of the golden model.safetensors
// is named by the table (canonical name or tied alias) with the same shape, and the counts add up.
TEST(ParamTable, MatchesTheHfCheckpointExactly) {
  const ModelConfig c = tiny();
  SafetensorsFile f(kTiny + "/model.safetensors");
  std::map<std::string, std::vector<int64_t>> want;
  for (const auto& n : f.names()) want[n] = f.get(n).shape;
  std::map<std::string, std::vector<int64_t>> got;
  for (const ParamSpec& p : build_param_table(c)) {
    for (int64_t e = 0; e < p.n_experts(); ++e) got[p.hf_name_of(e)] = p.hf_shape();
    for (const auto& a : p.hf_aliases) got[a] = p.hf_shape();
  }
  EXPECT_EQ(got, want);
  int64_t total = 0;
  for (const auto& [n, s] : want) {
    int64_t k = 1;
    for (auto d : s) k *= d;
    total += k;
  }
  const ParamCounts pc = count_params(c);
  EXPECT_EQ(pc.hf_total, total);
  EXPECT_EQ(pc.main + pc.mtp + 2 * c.vocab_size * c.hidden_size, total);  // + the MTP's embed/head copies
}

TEST(ParamTable, RealModelCountsMatchThePublishedSizes) {
  const ModelConfig c = model_config_from_file(std::string(DSV3_SOURCE_DIR) + "/input/models/deepseek-v3.json");
  std::ifstream f(std::string(DSV3_TEST_DIR) + "/data/deepseek-v3-counts.json");
  const auto j = nlohmann::json::parse(f);
  const ParamCounts pc = count_params(c);  // from the table alone: nothing is allocated
  EXPECT_EQ(pc.main, j["main"].get<int64_t>());
  EXPECT_EQ(pc.mtp, j["mtp_unique"].get<int64_t>());
  EXPECT_EQ(pc.hf_total, j["hf_total_without_scale_inv"].get<int64_t>());
  EXPECT_EQ(pc.activated, j["activated"].get<int64_t>());
}

TEST(ParamTable, TraitsForOptimizerAndSharding) {
  const auto table = build_param_table(tiny());
  for (const auto& p : table) {
    EXPECT_EQ(p.decay, p.shape.size() >= 2) << p.name;
    if (p.name.find("e_score_correction_bias") != std::string::npos) { EXPECT_FALSE(p.trainable); }
    if (p.name.find("o_proj") != std::string::npos) { EXPECT_EQ(p.shard_dim, 1) << p.name; }  // row-parallel
    if (p.name.find("q_b_proj") != std::string::npos) { EXPECT_EQ(p.shard_dim, 0) << p.name; }  // column-par.
    if (p.expert_stack) { EXPECT_EQ(p.shape[0], 8) << p.name; }
  }
}

// Storage by optimizer bucket: the dense trainable parameters, then the routed experts, each padded with zeros to its
// ZeRO-1 group's multiple, then the rest (the non-trainable biases); every parameter in its own place
TEST(Params, StoredByOptimizerBucketPaddedToTheGroup) {
  const auto table = build_param_table(tiny());
  ShardPlan plan;
  plan.dense_align = 9;
  plan.expert_align = 5;
  Params p(table, plan);
  int64_t dense = 0, experts = 0, rest = 0;
  for (const auto& q : table) (!q.trainable ? rest : q.expert_stack ? experts : dense) += q.numel();
  const auto [d0, d1] = p.bucket_region(0);
  const auto [e0, e1] = p.bucket_region(1);
  EXPECT_EQ(d0, 0);
  EXPECT_EQ(d1, (dense + 8) / 9 * 9);
  EXPECT_EQ(e0, d1);
  EXPECT_EQ(e1 - e0, (experts + 4) / 5 * 5);
  EXPECT_GT(d1 - d0, dense);  // the tiny model needs padding at these alignments
  EXPECT_EQ(p.size(), e1 + rest);
  std::vector<std::pair<int64_t, int64_t>> spans;  // [offset, end) of each parameter: disjoint, in its region
  for (const auto& q : table) {
    const int64_t o = p.offset(q.name);
    spans.push_back({o, o + q.numel()});
    if (!q.trainable) EXPECT_GE(o, e1) << q.name;
    else if (q.expert_stack) EXPECT_TRUE(o >= e0 && o + q.numel() <= e0 + experts) << q.name;
    else EXPECT_TRUE(o >= d0 && o + q.numel() <= dense) << q.name;
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) EXPECT_LE(spans[i - 1].second, spans[i].first);
  for (int64_t i = dense; i < d1; ++i) EXPECT_EQ(p.data()[i], 0.0f);  // the padding is zero
}

TEST(Yarn, TinyFrequenciesAndScaleAsTheGoldenReadme) {
  const ModelConfig c = tiny();
  const auto f = yarn_inv_freq(c);
  ASSERT_EQ(f.size(), 4u);
  const double want[] = {1.0, 0.025, 0.0025, 0.00025};  // golden README "Derived numbers"
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(f[i], want[i], 1e-15 * want[i] + 1e-18);
  EXPECT_NEAR(attention_softmax_scale(c), 0.264642258, 1e-9);
}
// Fuzz notes: a huge max_position_embeddings passed validate() and make_rope_table tried to allocate the table.
// Now the table is bounded (kMaxRopeTableBytes, 1 GiB): a clear error naming the key, no allocation.
TEST(ModelConfig, HugeMaxPositionEmbeddingsIsAnErrorNotAGiantAllocation) {
  auto with_positions = [](int64_t n) {
    auto j = tiny_json();
    j["max_position_embeddings"] = n;
    return model_config_from_json(j, "cfg.json");
  };
  const int64_t d = with_positions(1).qk_rope_head_dim;
  const int64_t max_ok = kMaxRopeTableBytes / (d * 4);
  with_positions(max_ok).validate();
  EXPECT_ERROR(with_positions(max_ok + 1).validate(), "cfg.json: model key 'max_position_embeddings' = " +
                                                          std::to_string(max_ok + 1) + " needs a RoPE table of");
  EXPECT_ERROR(with_positions(1000000000000).validate(), "more than dsv3's bound of 1 GiB");
  EXPECT_ERROR(with_positions(1000000000000).validate(), "1000000000000 positions x qk_rope_head_dim");
  // the table of the real model is far below the bound; make_rope_table refuses a caller's own huge size too
  model_config_from_file(std::string(DSV3_SOURCE_DIR) + "/input/models/deepseek-v3.json").validate();
  EXPECT_ERROR(make_rope_table(with_positions(8), 1000000000000), "RoPE table of 1000000000000 positions");
  EXPECT_EQ(make_rope_table(with_positions(8), 8).cos.size(), size_t(8 * d / 2));
}

TEST(Yarn, RampBetweenCorrectionDims) {
  ModelConfig c = model_config_from_file(std::string(DSV3_SOURCE_DIR) + "/input/models/deepseek-v3.json");
  const auto f = yarn_inv_freq(c);
  // high-frequency dims (i below the beta_fast correction dim) are untouched, low-frequency ones divided by 40,
  // and the ramp between is monotone
  EXPECT_DOUBLE_EQ(f[0], 1.0);
  EXPECT_NEAR(f[31], std::pow(10000.0, -62.0 / 64) / 40, 1e-20);
  for (size_t i = 1; i < f.size(); ++i) EXPECT_LT(f[i], f[i - 1]);
  c.rope_scaling.type = "";
  const auto plain = yarn_inv_freq(c);
  EXPECT_NEAR(plain[31], std::pow(10000.0, -62.0 / 64), 1e-20);
  EXPECT_NEAR(attention_softmax_scale(c), 1 / std::sqrt(192.0), 1e-12);
}

TEST(Rope, InterleavedPairsRotateByPositionTimesFrequency) {
  const ModelConfig c = tiny();
  const RopeTable t = make_rope_table(c, 64);
  const auto f = yarn_inv_freq(c);
  CpuBackend be(1);
  std::vector<float> x(8);
  for (int i = 0; i < 8; ++i) x[i] = 0.5f + i;
  const auto x0 = x;
  const int64_t pos = 37;
  be.rope_forward(x.data(), 1, 8, 1, 0, 8, &pos, t.cos.data(), t.sin.data());
  for (int i = 0; i < 4; ++i) {
    const double a = pos * f[i];
    EXPECT_NEAR(x[2 * i], x0[2 * i] * std::cos(a) - x0[2 * i + 1] * std::sin(a), 1e-5);
    EXPECT_NEAR(x[2 * i + 1], x0[2 * i] * std::sin(a) + x0[2 * i + 1] * std::cos(a), 1e-5);
  }
  const int64_t zero = 0;
  auto y = x0;
  be.rope_forward(y.data(), 1, 8, 1, 0, 8, &zero, t.cos.data(), t.sin.data());
  EXPECT_EQ(y, x0);  // position 0 is the identity
}

// The tables and the positions live in the run's memory (the rope ops read them in place, on a GPU without staging);
// positions are 0..S-1 per sequence, made once per shape
TEST(Rope, TablesAndPositionsInTheRunsMemory) {
  const RopeTable t = make_rope_table(tiny(), 16);
  EXPECT_EQ(t.cos.resource(), &default_memory());
  EXPECT_EQ(t.sin.resource(), &default_memory());
  const int64_t* p = t.positions(2, 3);
  EXPECT_EQ(std::vector<int64_t>(p, p + 6), (std::vector<int64_t>{0, 1, 2, 0, 1, 2}));
  const int64_t* q = t.positions(3, 2);  // the same count of rows, another shape
  EXPECT_EQ(std::vector<int64_t>(q, q + 6), (std::vector<int64_t>{0, 1, 0, 1, 0, 1}));
  EXPECT_EQ(t.positions(2, 3), p);  // kept: no copy into the run's memory per call
  EXPECT_EQ(std::vector<int64_t>(p, p + 6), (std::vector<int64_t>{0, 1, 2, 0, 1, 2}));
}

// Router: 8 experts in 4 groups of 2, keep 2 groups, top-2 (the tiny shape), on hand-made scores.
TEST(Router, GroupLimitedTopKWithBiasForSelectionOnly) {
  CpuBackend be(1);
  auto logit = [](double s) { return (float)std::log(s / (1 - s)); };  // sigmoid^-1
  // scores per expert; groups {0,1} {2,3} {4,5} {6,7}
  const double s[8] = {0.90, 0.10, 0.60, 0.55, 0.70, 0.65, 0.20, 0.15};
  std::vector<float> logits(8), bias(8, 0.0f), scores(8), w(2);
  std::vector<int32_t> idx(2);
  for (int e = 0; e < 8; ++e) logits[e] = logit(s[e]);
  RouterSpec spec{.E = 8, .k = 2, .n_group = 4, .topk_group = 2, .norm = true, .scale = 2.5f};
  RouterSpec raw = spec;
  raw.norm = false;
  // group scores (top-2 sums): 1.00, 1.15, 1.35, 0.35 -> keep groups 2 and 1 -> experts 4 (0.70), 5 (0.65)
  // expert 0 has the best single score but its group is dropped
  be.router_forward(logits.data(), bias.data(), 1, spec, scores.data(), idx.data(), w.data());
  EXPECT_EQ(idx, (std::vector<int32_t>{4, 5}));
  EXPECT_NEAR(w[0], 0.70 / 1.35 * 2.5, 1e-5);
  EXPECT_NEAR(w[1], 0.65 / 1.35 * 2.5, 1e-5);
  for (int e = 0; e < 8; ++e) EXPECT_NEAR(scores[e], s[e], 1e-6);
  // a bias lifts group 0 and expert 1 into the selection; the weights stay the unbiased scores
  bias[1] = 0.8f;  // group 0 -> 0.9 + 0.9 = 1.8
  be.router_forward(logits.data(), bias.data(), 1, spec, scores.data(), idx.data(), w.data());
  EXPECT_EQ(idx, (std::vector<int32_t>{0, 1}));
  EXPECT_NEAR(w[0], 0.90 / 1.00 * 2.5, 1e-5);
  EXPECT_NEAR(w[1], 0.10 / 1.00 * 2.5, 1e-5);
  // without normalisation the weights are the raw scores times the scale
  be.router_forward(logits.data(), bias.data(), 1, raw, scores.data(), idx.data(), w.data());
  EXPECT_NEAR(w[0], 0.90 * 2.5, 1e-5);
}

// Node-limited routing (RouterSpec): 8 experts on 4 nodes of 2, one group, top-2, on the hand-made scores above.
TEST(Router, NodeLimitedKeepsTheBestNodes) {
  CpuBackend be(1);
  auto logit = [](double s) { return (float)std::log(s / (1 - s)); };
  const double s[8] = {0.90, 0.10, 0.60, 0.55, 0.70, 0.65, 0.20, 0.15};  // nodes {0,1} {2,3} {4,5} {6,7}
  std::vector<float> logits(8), bias(8, 0.0f), scores(8), w(2);
  std::vector<int32_t> idx(2);
  for (int e = 0; e < 8; ++e) logits[e] = logit(s[e]);
  RouterSpec spec{.E = 8, .k = 2, .n_nodes = 4, .max_nodes = 0, .scale = 1.0f};
  be.router_forward(logits.data(), bias.data(), 1, spec, scores.data(), idx.data(), w.data());
  EXPECT_EQ(idx, (std::vector<int32_t>{0, 4}));  // no limit: the two best scores, on nodes 0 and 2
  // one node: node score = sum of the k/1 = 2 best (1.00, 1.15, 1.35, 0.35) -> node 2 -> experts 4, 5
  spec.max_nodes = 1;
  be.router_forward(logits.data(), bias.data(), 1, spec, scores.data(), idx.data(), w.data());
  EXPECT_EQ(idx, (std::vector<int32_t>{4, 5}));
  EXPECT_NEAR(w[0], 0.70 / 1.35, 1e-6);
  // two nodes: node score = the k/2 = 1 best (0.90, 0.60, 0.70, 0.20) -> nodes 0 and 2 -> experts 0, 4
  spec.max_nodes = 2;
  be.router_forward(logits.data(), bias.data(), 1, spec, scores.data(), idx.data(), w.data());
  EXPECT_EQ(idx, (std::vector<int32_t>{0, 4}));
  // the bias steers the node choice as it steers the experts': node 3 lifted above all
  bias[6] = bias[7] = 1.0f;
  spec.max_nodes = 1;
  be.router_forward(logits.data(), bias.data(), 1, spec, scores.data(), idx.data(), w.data());
  EXPECT_EQ(idx, (std::vector<int32_t>{6, 7}));
  EXPECT_NEAR(w[0], 0.20 / 0.35, 1e-6);  // weights: the unbiased scores
}

// DeepSeek-V3's router (256 experts, 8 groups keep 4, top-8) limited to M of N nodes, on random tokens: every token's
// experts lie on at most M nodes, and those are among the M best nodes by the sum of their k/M best biased scores;
// without groups the choice is exactly the top-k of the experts of those nodes; M = N changes nothing.
TEST(Router, NodeLimitedInvariants) {
  CpuBackend be(1);
  const int64_t T = 300, E = 256, K = 8;
  std::mt19937_64 g(77);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> logits(T * E), bias(E);
  for (auto& v : logits) v = nd(g);
  for (auto& v : bias) v = 0.1f * nd(g);
  for (const int64_t groups : {int64_t(1), int64_t(8)})
    for (const auto& [N, M] : {std::pair<int64_t, int64_t>{8, 4}, {4, 2}, {8, 1}, {2, 1}}) {
      const RouterSpec free{.E = E, .k = K, .n_group = groups, .topk_group = groups == 1 ? 1 : 4, .scale = 2.5f};
      RouterSpec lim = free;
      lim.n_nodes = N;
      lim.max_nodes = M;
      std::vector<float> scores(T * E), w(T * K), w_free(T * K);
      std::vector<int32_t> idx(T * K), idx_free(T * K);
      be.router_forward(logits.data(), bias.data(), T, lim, scores.data(), idx.data(), w.data());
      be.router_forward(logits.data(), bias.data(), T, free, scores.data(), idx_free.data(), w_free.data());
      const int64_t per = E / N, m = std::max<int64_t>(1, K / M);
      int64_t changed = 0;
      for (int64_t t = 0; t < T; ++t) {
        std::vector<float> sel(E);
        for (int64_t e = 0; e < E; ++e) sel[e] = scores[t * E + e] + bias[e];
        std::vector<std::pair<float, int64_t>> node_score(N);
        for (int64_t n = 0; n < N; ++n) {
          std::vector<float> v(sel.begin() + n * per, sel.begin() + (n + 1) * per);
          std::sort(v.rbegin(), v.rend());
          float sum = v[0];
          for (int64_t j = 1; j < m; ++j) sum += v[j];
          node_score[n] = {-sum, n};  // ascending = best first, ties: lower node
        }
        std::sort(node_score.begin(), node_score.end());
        std::set<int64_t> best_nodes, used;
        for (int64_t j = 0; j < M; ++j) best_nodes.insert(node_score[j].second);
        for (int64_t j = 0; j < K; ++j) used.insert(idx[t * K + j] / per);
        ASSERT_LE((int64_t)used.size(), M) << "token " << t;
        for (int64_t n : used) ASSERT_TRUE(best_nodes.count(n)) << "token " << t << " node " << n;
        if (groups == 1) {  // the top-k of the kept nodes' experts
          std::vector<int32_t> cand;
          for (int64_t n : best_nodes)
            for (int64_t e = n * per; e < (n + 1) * per; ++e) cand.push_back((int32_t)e);
          std::stable_sort(cand.begin(), cand.end(), [&](int32_t a, int32_t b) { return sel[a] > sel[b]; });
          std::vector<int32_t> want(cand.begin(), cand.begin() + K);
          std::sort(want.begin(), want.end());
          ASSERT_EQ(std::vector<int32_t>(idx.begin() + t * K, idx.begin() + (t + 1) * K), want) << "token " << t;
        }
        changed += !std::equal(idx.begin() + t * K, idx.begin() + (t + 1) * K, idx_free.begin() + t * K);
      }
      if (!(groups == N && M == 4))  // 8 nodes = V3's 8 groups keeping 4: the same rule, nothing may change
        EXPECT_GT(changed, 0) << "the limit never bound: N " << N << " M " << M << " groups " << groups;
      else
        EXPECT_EQ(changed, 0) << "node limit = group limit";
      lim.max_nodes = N;  // every node allowed: the unlimited routing
      be.router_forward(logits.data(), bias.data(), T, lim, scores.data(), idx.data(), w.data());
      EXPECT_EQ(idx, idx_free);
      EXPECT_EQ(w, w_free);
    }
}

TEST(Moe, BalanceLossOfUniformRoutingIsOne) {
  // every expert gets the same share and the same mean score: f_i = 1, P_i = 1/E -> L = 1
  Routing r;
  r.T = 8;
  r.E = 4;
  r.K = 2;
  r.scores.assign(8 * 4, 0.5f);
  for (int t = 0; t < 8; ++t) {
    r.idx.push_back((2 * t) % 4);
    r.idx.push_back((2 * t + 1) % 4);
  }
  EXPECT_NEAR(seq_balance_loss(r, 2), 1.0, 1e-12);
}

// The MLA latent-cache path (absorbed weights, incremental) and the full path (expanded K/V) are independent
// implementations: on random weights their logits must agree at every position.
TEST(Mla, LatentCacheEqualsFullAttention) {
  ModelConfig c = tiny();
  CpuBackend be(2);
  Model m(c, be);
  m.init_random(7);
  std::vector<int64_t> toks = {5, 17, 300, 2, 99, 410, 8, 8, 63, 1};
  const int64_t S = (int64_t)toks.size(), V = c.vocab_size;
  const auto full = m.logits(toks.data(), 1, S);
  KvCache cache = m.make_cache(S);
  auto first = m.forward_cached(toks.data(), 4, cache);  // a 4-token prefill, then one token at a time
  double err = 0;
  for (int64_t v = 0; v < V; ++v) err = std::max(err, (double)std::fabs(first[v] - full[3 * V + v]));
  for (int64_t t = 4; t < S; ++t) {
    const auto lg = m.forward_cached(&toks[t], 1, cache);
    for (int64_t v = 0; v < V; ++v) err = std::max(err, (double)std::fabs(lg[v] - full[t * V + v]));
  }
  EXPECT_LT(err, 1e-4);
  double mx = 0;
  for (float v : full) mx = std::max(mx, (double)std::fabs(v));
  EXPECT_GT(mx, 1e-3);  // not trivially zero
}

TEST(Model, RandomInitIsDeterministicWithTheRequestedSpread) {
  ModelConfig c = tiny();
  CpuBackend be(1);
  Model a(c, be), b(c, be);
  a.init_random(42);
  b.init_random(42);
  ASSERT_EQ(0, std::memcmp(a.params().data(), b.params().data(), a.params().size() * 4));
  const float* w = a.params().get("model.layers.1.mlp.experts.up_proj.weight");
  const int64_t n = a.params().spec("model.layers.1.mlp.experts.up_proj.weight").numel();
  double s = 0, s2 = 0;
  for (int64_t i = 0; i < n; ++i) s += w[i], s2 += (double)w[i] * w[i];
  EXPECT_NEAR(s / n, 0.0, 0.002);
  EXPECT_NEAR(std::sqrt(s2 / n), c.initializer_range, 0.002);
  EXPECT_EQ(a.params().get("model.norm.weight")[0], 1.0f);
  b.init_random(43);
  EXPECT_NE(0, std::memcmp(a.params().data(), b.params().data(), a.params().size() * 4));
}

// Node-limited routing in the model (moe.max_nodes = 1 over moe.nodes = 2 on the tiny model: 8 experts, 4 per node,
// 2 groups per node): every token of every MoE layer (the MTP layer too) routes inside one node, and the losses
// differ from the unlimited model's (the limit binds).
TEST(Model, NodeLimitedRoutingKeepsEachTokenOnOneNode) {
  ModelConfig c = tiny();
  CpuBackend be(1);
  Model free(c, be);
  c.route_nodes = 2;
  c.route_max_nodes = 1;
  c.validate();
  Model lim(c, be);
  free.init_random(5);
  lim.init_random(5);
  std::vector<int64_t> toks(2 * 24);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = (int64_t)((i * 7919 + 13) % c.vocab_size);
  ForwardTrace tf, tl;
  const Losses lf = free.forward(toks.data(), 2, 24, 0.3, 1e-4, &tf);
  const Losses ll = lim.forward(toks.data(), 2, 24, 0.3, 1e-4, &tl);
  ASSERT_EQ(tl.moe.size(), 4u);  // layers 1-3 and the MTP layer
  int64_t crossing_free = 0;
  for (const auto& [layer, mt] : tl.moe) {
    const int64_t K = c.num_experts_per_tok, T = (int64_t)mt.idx.size() / K;
    for (int64_t t = 0; t < T; ++t) {
      EXPECT_EQ(mt.idx[t * K] / 4, mt.idx[t * K + K - 1] / 4) << "layer " << layer << " token " << t;
      const auto& f = tf.moe.at(layer).idx;
      crossing_free += f[t * K] / 4 != f[t * K + K - 1] / 4;
    }
  }
  EXPECT_GT(crossing_free, 0);  // unlimited, tokens do use both nodes
  EXPECT_NE(lf.lm, ll.lm);
  EXPECT_TRUE(std::isfinite(ll.total));
  // the config refuses limits that cannot hold a token's experts or groups that straddle nodes
  ModelConfig bad = c;
  bad.route_nodes = 3;  // 8 experts over 3 nodes
  EXPECT_THAT(error_of([&] { bad.validate(); }), HasSubstr("moe.nodes"));
  bad.route_nodes = 8;  // 4 groups do not nest in 8 nodes
  EXPECT_THAT(error_of([&] { bad.validate(); }), HasSubstr("nest"));
  bad.n_group = 1;
  bad.topk_group = 1;
  bad.route_max_nodes = 1;  // 1 expert per node, 2 per token
  EXPECT_THAT(error_of([&] { bad.validate(); }), HasSubstr("num_experts_per_tok"));
}

TEST(Sampling, GreedyTopPAndTemperature) {
  std::mt19937_64 rng(1);
  const std::vector<float> lg = {0.0f, 2.0f, 1.0f, -1.0f};
  EXPECT_EQ(sample_token(lg.data(), 4, {0.0, 1.0}, rng), 1);
  EXPECT_EQ(sample_token(lg.data(), 4, {1.0, 0.01}, rng), 1);  // the nucleus is the argmax alone
  // temperature 1, full nucleus: frequencies follow softmax(lg)
  std::vector<int> n(4, 0);
  const int N = 20000;
  for (int i = 0; i < N; ++i) ++n[sample_token(lg.data(), 4, {1.0, 1.0}, rng)];
  double z = 0;
  for (float v : lg) z += std::exp(v);
  for (int v = 0; v < 4; ++v) EXPECT_NEAR(n[v] / (double)N, std::exp(lg[v]) / z, 0.015) << v;
  EXPECT_THROW(sample_token(lg.data(), 4, {1.0, 0.0}, rng), Error);
}
