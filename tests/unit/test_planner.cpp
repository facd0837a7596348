// The planner (src/plan/planner.h): its parameter counts equal what the model allocates (tiny and alt configs under
// several pipeline and expert layouts), its optimizer shards equal AdamW's buckets, the memory columns add up, the
// bubble matches the 1F1B simulation, the FLOPs tie back to the activated-parameter count, the JSON has its keys,
// and every shipped deck plans. The measured-memory check (a real run of the tiny deck) is ctest plan_memory.
#include "test_util.h"
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/deck.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "ops/backend.h"
#include "optim/adamw.h"
#include "pipeline/schedule.h"
#include "plan/planner.h"

using namespace dsv3;

namespace {
const std::string kTests = DSV3_TEST_DIR, kSource = DSV3_SOURCE_DIR;
ModelConfig golden_config(const std::string& name) { return model_config_from_file(kTests + "/golden/" + name + "/config.json"); }

// Settings for `world` ranks from deck overrides alone (the model comes from cfg, not from the deck).
PlanSettings settings(const ModelConfig& cfg, int world, std::vector<std::string> overrides) {
  // defaults first: a later override wins
  overrides.insert(overrides.begin(), {"train.iters=1", "train.seq_length=16", "train.global_batch=8", "train.micro_batch=2"});
  return plan_settings_from_deck(Deck::defaults_only(overrides), cfg, world);
}

struct Layout {
  int world;
  std::vector<std::string> overrides;
};

// Every stage and expert rank of a layout: the Model built for it holds exactly the planned elements, and AdamW's
// buckets over those parameters have the planned ZeRO-1 shards.
void expect_counts_match_model(const ModelConfig& cfg, const Layout& l) {
  SCOPED_TRACE(::testing::PrintToString(l.overrides));
  const PlanSettings s = settings(cfg, l.world, l.overrides);
  const Plan p = make_plan(cfg, s);
  auto be = make_backend("cpu", 1);
  ASSERT_EQ((int)p.stages.size(), s.sizes.pp);
  for (int st = 0; st < s.sizes.pp; ++st) {
    for (int er = 0; er < s.sizes.ep; ++er) {
      PipelineStage stage;
      stage.index = st;
      stage.count = s.sizes.pp;
      stage.layout = s.layout[st];
      Model m(cfg, *be, ExpertGroup{nullptr, s.sizes.ep, er}, stage);
      EXPECT_EQ(m.params().size(), p.stages[st].params_held) << "stage " << st << " expert rank " << er;
      EXPECT_EQ(p.stages[st].memory.weights, m.params().size() * (int64_t)sizeof(float));
      const AdamW opt(m.params(), AdamWConfig{});  // one rank: each bucket is one unsplit shard
      EXPECT_EQ((opt.buckets()[0].size + s.sizes.dp - 1) / s.sizes.dp, p.stages[st].dense_shard);
      EXPECT_EQ((opt.buckets()[1].size + s.sizes.edp() - 1) / s.sizes.edp(), p.stages[st].expert_shard);
    }
  }
}
}  // namespace

TEST(Planner, CountsEqualWhatTheModelAllocatesTiny) {
  const ModelConfig cfg = golden_config("tiny");  // 4 layers (1 dense), 8 experts, MTP 1
  for (const Layout& l : std::vector<Layout>{{1, {}},
                                            {2, {}},
                                            {2, {"parallel.ep=2"}},
                                            {2, {"parallel.pp=2"}},
                                            {4, {"parallel.pp=4", "parallel.pp_layout=E|t|tt|tmL"}},
                                            {8, {"parallel.pp=2", "parallel.ep=4"}},
                                            {3, {"parallel.pp=3", "parallel.pp_layout=Ett|tt|mL"}}})
    expect_counts_match_model(cfg, l);
}

TEST(Planner, CountsEqualWhatTheModelAllocatesAlt) {
  const ModelConfig cfg = golden_config("alt");  // q_proj without q-LoRA, 3 groups, 2 shared experts
  for (const Layout& l : std::vector<Layout>{{1, {}}, {3, {"parallel.ep=3"}}, {6, {"parallel.pp=3", "parallel.ep=2"}}})
    expect_counts_match_model(cfg, l);
}

TEST(Planner, StagesTogetherHoldTheModelOnceExpertsSplitAndTheMtpEmbeddingCopy) {
  const ModelConfig cfg = model_config_from_file(kSource + "/input/models/deepseek-v3.json");
  const ParamCounts pc = count_params(cfg);
  int64_t routed = 0;
  for (const ParamSpec& q : build_param_table(cfg))
    if (q.expert_stack) routed += q.numel();
  // PP16 EP64 without tp (the paper's layout), on 16 x 64 ranks; stage 15 holds a copy of the embedding for MTP
  const PlanSettings s = settings(cfg, 1024, {"parallel.pp=16", "parallel.ep=64", "parallel.pp_layout=Et*4|(t*4|)*14tmL"});
  const Plan p = make_plan(cfg, s);
  int64_t held = 0;
  for (const StagePlan& sp : p.stages) held += sp.params_held;
  EXPECT_EQ(held, pc.main + pc.mtp - routed + routed / 64 + cfg.vocab_size * cfg.hidden_size);
  std::ifstream f(kTests + "/data/deepseek-v3-counts.json");
  const auto want = nlohmann::json::parse(f);
  EXPECT_EQ(p.params.main, want["main"].get<int64_t>());
  EXPECT_EQ(p.params.mtp, want["mtp_unique"].get<int64_t>());
  EXPECT_EQ(p.params.activated, want["activated"].get<int64_t>());
}

TEST(Planner, MemoryColumnsAddUpAndFollowTheDtypes) {
  const ModelConfig cfg = model_config_from_file(kSource + "/input/models/deepseek-v3.json");
  for (const char* device : {"cpu", "cuda"})
    for (const char* rc : {"none", "selective", "full"}) {
      const PlanSettings s = settings(cfg, 1024, {std::string("run.device=") + device, std::string("plan.recompute=") + rc,
                                                  "parallel.tp=2", "parallel.sp=true", "parallel.pp=16", "parallel.ep=64",
                                                  "parallel.pp_layout=Et*4|(t*4|)*14tmL", "optim.param_dtype=bf16",
                                                  "optim.grad_dtype=bf16", "optim.moment_dtype=bf16"});
      const Plan p = make_plan(cfg, s);
      const bool gpu = std::string(device) == "cuda";
      EXPECT_EQ(s.weight_bytes, gpu ? 2 : 4);  // the CPU backend stores FP32 and rounds
      EXPECT_EQ(s.act_bytes, gpu ? 2 : 4);
      EXPECT_EQ(s.moment_bytes, 2);  // real BF16 moments on both
      for (const StagePlan& sp : p.stages) {
        const StageMemory& m = sp.memory;
        EXPECT_EQ(m.weights, sp.params_held * s.weight_bytes);
        EXPECT_EQ(m.grads, sp.params_held * s.grad_bytes);
        // master + BF16 m and v + decay flag; the reduced FP32 gradient only where the group has more than one rank
        // (here dp 32, edp 1: the experts' gradients are read in place)
        ASSERT_EQ(s.sizes.dp, 32);
        ASSERT_EQ(s.sizes.edp(), 1);
        EXPECT_EQ(m.optimizer, (sp.dense_shard + sp.expert_shard) * (4 + 2 * 2 + 1) + sp.dense_shard * 4);
        EXPECT_EQ(m.total, m.weights + m.grads + m.optimizer + m.other +
                               std::max(m.activations + m.workspace + m.comm_pipeline, m.comm_zero));
        EXPECT_LE(m.kv, m.activations);
        EXPECT_EQ(sp.inflight, std::min<int64_t>(16 - sp.stage, p.microbatches));
        EXPECT_EQ(m.activations, sp.act_per_microbatch * sp.inflight);
      }
    }
  // recomputation only ever lowers what is kept
  auto first_stage_acts = [&](const char* rc) {
    return make_plan(cfg, settings(cfg, 1024, {std::string("plan.recompute=") + rc, "parallel.pp=16", "parallel.ep=64",
                                               "train.seq_length=4096"}))
        .stages[0]
        .memory.activations;
  };
  EXPECT_GT(first_stage_acts("none"), first_stage_acts("selective"));
  EXPECT_GT(first_stage_acts("selective"), first_stage_acts("full"));
}

TEST(Planner, BubbleIsTheOneFOneBFormulaAndTheSimulation) {
  const ModelConfig cfg = golden_config("tiny");
  for (int pp : {1, 2, 4})
    for (int gb : {2, 8, 24}) {
      const Plan p = make_plan(cfg, settings(cfg, pp, {"parallel.pp=" + std::to_string(pp),
                                                       "train.global_batch=" + std::to_string(gb), "train.micro_batch=1"}));
      EXPECT_EQ(p.microbatches, gb);
      EXPECT_DOUBLE_EQ(p.bubble_fraction, (pp - 1.0) / (gb + pp - 1.0));
      EXPECT_NEAR(p.bubble_fraction_simulated, simulate_1f1b(pp, gb).bubble_fraction, 1e-12);
      EXPECT_NEAR(p.bubble_fraction, p.bubble_fraction_simulated, 1e-9) << "pp " << pp << " m " << gb;
    }
}

TEST(Planner, MatmulFlopsAreSixTimesTheActivatedMatmulWeights) {
  // Without MTP, the matmul FLOPs per token are 6 x (activated parameters - the embedding, which is a lookup,
  // - the 1-D norms and expert biases, which are not matmuls); attention adds 6 H (dqk+dv) per causal pair.
  for (const std::string& name : {std::string("tiny"), std::string("alt")}) {
    ModelConfig cfg = golden_config(name);
    cfg.num_nextn_predict_layers = 0;
    const ParamCounts pc = count_params(cfg);
    int64_t vectors = 0;
    for (const ParamSpec& q : build_param_table(cfg))
      if (q.shape.size() == 1) vectors += q.numel();
    for (int64_t S : {1, 16}) {
      const ModelFlops f = model_flops_per_sequence(cfg, S);
      EXPECT_DOUBLE_EQ(f.matmul, 6.0 * S * (pc.activated - cfg.vocab_size * cfg.hidden_size - vectors)) << name;
      EXPECT_DOUBLE_EQ(f.attention, 6.0 * S * (S + 1) / 2 * cfg.num_attention_heads *
                                        (cfg.qk_head_dim() + cfg.v_head_dim) * cfg.num_hidden_layers);
    }
  }
}

TEST(Planner, JsonHasTheDocumentedKeys) {
  const ModelConfig cfg = golden_config("tiny");
  const Plan p = make_plan(cfg, settings(cfg, 2, {"parallel.pp=2"}));
  const nlohmann::json j = plan_to_json(p);
  EXPECT_EQ(j["params"]["main"].get<int64_t>(), count_params(cfg).main);
  EXPECT_EQ(j["params"]["mtp"].get<int64_t>(), count_params(cfg).mtp);
  EXPECT_EQ(j["params"]["activated"].get<int64_t>(), count_params(cfg).activated);
  ASSERT_EQ(j["stages"].size(), 2u);
  for (const auto& st : j["stages"])
    for (const char* k : {"weights", "grads", "optimizer", "activations", "kv", "workspace", "comm_pipeline",
                          "comm_zero", "other", "total"})
      EXPECT_TRUE(st["memory_bytes"].contains(k)) << k;
  EXPECT_EQ(j["stages"][1]["memory_bytes"]["total"].get<int64_t>(), p.stages[1].memory.total);
  EXPECT_TRUE(j.contains("bubble_fraction") && j.contains("flops_per_token") && j.contains("step_seconds"));
}

TEST(Planner, ShippedDecksPlan) {
  for (const char* deck : {"tiny.deck", "pretrain.deck", "deepseek-paper.deck", "single-node.deck", "bench-small.deck"}) {
    SCOPED_TRACE(deck);
    Deck d = Deck::parse_file(kSource + "/input/" + deck);
    d.require_keys();
    const ModelConfig cfg = model_config_from_deck(d);
    const Plan p = make_plan(cfg, plan_settings_from_deck(d, cfg, default_plan_world(d)));
    EXPECT_GT(p.step.total, 0);
    EXPECT_EQ(p.params.main, count_params(cfg).main);
    EXPECT_FALSE(format_plan(p).empty());
  }
  // the recipe needs 1024 ranks; the single-node deck fits on its 8 GPUs
  Deck pre = Deck::parse_file(kSource + "/input/pretrain.deck");
  EXPECT_EQ(default_plan_world(pre), 1024);
  Deck one = Deck::parse_file(kSource + "/input/single-node.deck");
  EXPECT_EQ(default_plan_world(one), 8);
  const ModelConfig cfg = model_config_from_deck(one);
  for (const StagePlan& sp : make_plan(cfg, plan_settings_from_deck(one, cfg, 8)).stages)
    EXPECT_TRUE(sp.fits) << "stage " << sp.stage << " needs " << sp.memory.total / double(1 << 30) << " GiB";
}

TEST(Planner, LayoutErrorsNameTheKey) {
  const ModelConfig cfg = golden_config("tiny");
  EXPECT_ERROR(settings(cfg, 3, {"parallel.pp=2"}), "tp*pp");
  EXPECT_ERROR(settings(cfg, 2, {"parallel.pp=2", "parallel.pp_layout=Et|ttmL|t"}), "parallel.pp_layout");
}
