// Unit tests of the rank grid (parallel/topology.h): the worked 16-rank example group by group, the group
// invariants over many grids, resolve_sizes against the deck and the model, and every error it reports.
#include "test_util.h"
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "core/deck.h"
#include "core/error.h"
#include "model/config.h"
#include "parallel/topology.h"

using dsv3::Deck;
using dsv3::Groups;
using dsv3::ModelConfig;
using dsv3::ParallelSizes;
using dsv3::RankCoords;
using Ranks = std::vector<int>;

using dsv3::test::error_of;

namespace {

ParallelSizes sizes(int world, int tp, int pp, int ep, int etp) {
  ParallelSizes s;
  s.world = world, s.tp = tp, s.pp = pp, s.ep = ep, s.etp = etp, s.dp = world / (tp * pp);
  return s;
}

// The tiny golden model's shape (tests/golden/tiny/config.json): 4 layers (layer 0 dense), 8 experts, 1 MTP.
ModelConfig tiny_model() {
  ModelConfig m;
  m.vocab_size = 512, m.hidden_size = 64, m.intermediate_size = 128, m.moe_intermediate_size = 32;
  m.num_hidden_layers = 4, m.first_k_dense_replace = 1, m.num_attention_heads = 4, m.num_key_value_heads = 4;
  m.n_routed_experts = 8, m.n_shared_experts = 1, m.num_experts_per_tok = 2, m.n_group = 4, m.topk_group = 2;
  m.num_nextn_predict_layers = 1;
  return m;
}

// A dense model (no routed experts).
ModelConfig dense_model() {
  ModelConfig m = tiny_model();
  m.n_routed_experts = 0, m.n_shared_experts = 0, m.num_experts_per_tok = 0;
  return m;
}

Deck deck(const std::vector<std::string>& overrides) { return Deck::defaults_only(overrides); }

bool is_sorted_unique(const Ranks& g) {
  for (size_t i = 1; i < g.size(); ++i)
    if (g[i] <= g[i - 1]) return false;
  return true;
}

}  // namespace

// ---- the worked example of topology.h, every group listed ------------------------------------------------
TEST(Topology, WorkedExample16Ranks) {
  const ParallelSizes s = sizes(16, 2, 2, 4, 1);
  ASSERT_EQ(s.dp, 4);
  ASSERT_EQ(s.edp(), 2);
  const std::vector<Ranks> tp = {{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}};
  const std::vector<Ranks> dp = {{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}};
  const std::vector<Ranks> pp = {{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13}, {6, 14}, {7, 15}};
  const std::vector<Ranks> mp = {{0, 1, 8, 9}, {2, 3, 10, 11}, {4, 5, 12, 13}, {6, 7, 14, 15}};
  const std::vector<Ranks> ep = {{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11}, {12, 13, 14, 15}};
  const std::vector<Ranks> edp = {{0, 4}, {1, 5}, {2, 6}, {3, 7}, {8, 12}, {9, 13}, {10, 14}, {11, 15}};
  auto group_of = [](const std::vector<Ranks>& all, int r) {
    for (const Ranks& g : all)
      if (std::count(g.begin(), g.end(), r)) return g;
    return Ranks{};
  };
  // The coordinate table of the header comment.
  const int tp_rank[16] = {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1};
  const int dp_rank[16] = {0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 3};
  const int ep_rank[16] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
  const int edp_rank[16] = {0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1};
  for (int r = 0; r < 16; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const Groups g = dsv3::groups_of(s, r);
    EXPECT_EQ(g.tp, group_of(tp, r));
    EXPECT_EQ(g.dp, group_of(dp, r));
    EXPECT_EQ(g.pp, group_of(pp, r));
    EXPECT_EQ(g.mp, group_of(mp, r));
    EXPECT_EQ(g.ep, group_of(ep, r));
    EXPECT_EQ(g.etp, Ranks{r});
    EXPECT_EQ(g.edp, group_of(edp, r));
    EXPECT_EQ(g.embedding, group_of(pp, r));  // pp == 2: first and last stage are the whole pipeline
    const RankCoords c = dsv3::coords_of(s, r);
    EXPECT_EQ(c.tp, tp_rank[r]);
    EXPECT_EQ(c.dp, dp_rank[r]);
    EXPECT_EQ(c.pp, r / 8);
    EXPECT_EQ(c.ep, ep_rank[r]);
    EXPECT_EQ(c.etp, 0);
    EXPECT_EQ(c.edp, edp_rank[r]);
  }
  EXPECT_EQ(dsv3::format_sizes(s), "world 16: tp 2 pp 2 dp 4 ep 4 etp 1 edp 2 sp off");
}

// Expert tensor parallelism: etp innermost of the expert grid. 8 ranks, tp 2 pp 1 dp 4, ep 2 etp 2 -> edp 2.
TEST(Topology, ExpertTensorParallelInnermost) {
  const ParallelSizes s = sizes(8, 2, 1, 2, 2);
  ASSERT_EQ(s.edp(), 2);
  const Groups g5 = dsv3::groups_of(s, 5);  // local 5 = etp 1 + 2*(ep 0 + 2*edp 1)
  EXPECT_EQ(g5.etp, (Ranks{4, 5}));
  EXPECT_EQ(g5.ep, (Ranks{5, 7}));
  EXPECT_EQ(g5.edp, (Ranks{1, 5}));
  EXPECT_EQ(g5.tp, (Ranks{4, 5}));
  EXPECT_EQ(g5.dp, (Ranks{1, 3, 5, 7}));
  EXPECT_EQ(g5.pp, (Ranks{5}));
  EXPECT_EQ(g5.embedding, (Ranks{5}));
}

// Middle stages hold no embedding; the first and last stage share one group per (tp, dp) position.
TEST(Topology, EmbeddingGroupSpansFirstAndLastStage) {
  const ParallelSizes s = sizes(8, 1, 4, 1, 1);  // dp 2
  EXPECT_EQ(dsv3::groups_of(s, 1).embedding, (Ranks{1, 7}));
  EXPECT_EQ(dsv3::groups_of(s, 7).embedding, (Ranks{1, 7}));
  EXPECT_TRUE(dsv3::groups_of(s, 3).embedding.empty());
  EXPECT_TRUE(dsv3::groups_of(s, 4).embedding.empty());
}

// ---- invariants over many grids -------------------------------------------------------------------------
TEST(Topology, GroupsPartitionTheWorldForManyGrids) {
  int grids = 0;
  for (int world : {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64}) {
    for (int tp = 1; tp <= world; ++tp) {
      if (world % tp) continue;
      for (int pp = 1; pp <= world / tp; ++pp) {
        if ((world / tp) % pp) continue;
        const int dp = world / (tp * pp);
        for (int ep = 1; ep <= tp * dp; ++ep) {
          for (int etp = 1; etp <= tp * dp / ep; ++etp) {
            if ((tp * dp) % (ep * etp)) continue;
            const ParallelSizes s = sizes(world, tp, pp, ep, etp);
            SCOPED_TRACE(dsv3::format_sizes(s));
            ++grids;
            std::vector<Groups> all(world);
            for (int r = 0; r < world; ++r) all[r] = dsv3::groups_of(s, r);
            using Pick = std::function<const Ranks&(const Groups&)>;
            const std::vector<std::pair<std::string, std::pair<Pick, int>>> kinds = {
                {"tp", {[](const Groups& g) -> const Ranks& { return g.tp; }, tp}},
                {"dp", {[](const Groups& g) -> const Ranks& { return g.dp; }, dp}},
                {"pp", {[](const Groups& g) -> const Ranks& { return g.pp; }, pp}},
                {"ep", {[](const Groups& g) -> const Ranks& { return g.ep; }, ep}},
                {"etp", {[](const Groups& g) -> const Ranks& { return g.etp; }, etp}},
                {"edp", {[](const Groups& g) -> const Ranks& { return g.edp; }, s.edp()}},
                {"mp", {[](const Groups& g) -> const Ranks& { return g.mp; }, tp * pp}},
            };
            for (const auto& [name, kind] : kinds) {
              const auto& [pick, size] = kind;
              std::vector<int> membership(world, 0);
              std::set<Ranks> distinct;
              for (int r = 0; r < world; ++r) {
                const Ranks& g = pick(all[r]);
                ASSERT_EQ(static_cast<int>(g.size()), size) << name << " group of rank " << r;
                ASSERT_TRUE(is_sorted_unique(g)) << name << " group of rank " << r;
                ASSERT_TRUE(std::count(g.begin(), g.end(), r)) << name << " group of rank " << r << " lacks it";
                for (int q : g) {
                  ASSERT_TRUE(q >= 0 && q < world);
                  ASSERT_EQ(pick(all[q]), g) << name << " group of rank " << r << " differs from member " << q;
                }
                if (distinct.insert(g).second)
                  for (int q : g) ++membership[q];
              }
              for (int r = 0; r < world; ++r) ASSERT_EQ(membership[r], 1) << name << ": rank " << r;
              ASSERT_EQ(static_cast<int>(distinct.size()) * size, world) << name;
            }
            // Coordinates: round trip, and each group varies exactly its own coordinate.
            for (int r = 0; r < world; ++r) {
              const RankCoords c = dsv3::coords_of(s, r);
              ASSERT_EQ(dsv3::rank_of(s, c.tp, c.dp, c.pp), r);
              ASSERT_EQ(c.etp + etp * (c.ep + ep * c.edp) + tp * dp * c.pp, r);
              const Groups& g = all[r];
              for (int i = 0; i < tp; ++i) {
                const RankCoords o = dsv3::coords_of(s, g.tp[i]);
                ASSERT_TRUE(o.tp == i && o.dp == c.dp && o.pp == c.pp);
              }
              for (int i = 0; i < dp; ++i) {
                const RankCoords o = dsv3::coords_of(s, g.dp[i]);
                ASSERT_TRUE(o.dp == i && o.tp == c.tp && o.pp == c.pp);
              }
              for (int i = 0; i < pp; ++i) {
                const RankCoords o = dsv3::coords_of(s, g.pp[i]);
                ASSERT_TRUE(o.pp == i && o.tp == c.tp && o.dp == c.dp);
              }
              for (int i = 0; i < ep; ++i) {
                const RankCoords o = dsv3::coords_of(s, g.ep[i]);
                ASSERT_TRUE(o.ep == i && o.etp == c.etp && o.edp == c.edp && o.pp == c.pp);
              }
              for (int i = 0; i < etp; ++i) {
                const RankCoords o = dsv3::coords_of(s, g.etp[i]);
                ASSERT_TRUE(o.etp == i && o.ep == c.ep && o.edp == c.edp && o.pp == c.pp);
              }
              for (int i = 0; i < s.edp(); ++i) {
                const RankCoords o = dsv3::coords_of(s, g.edp[i]);
                ASSERT_TRUE(o.edp == i && o.ep == c.ep && o.etp == c.etp && o.pp == c.pp);
              }
              for (int q : g.mp) ASSERT_EQ(dsv3::coords_of(s, q).dp, c.dp);
              const bool holds_embedding = c.pp == 0 || c.pp == pp - 1;
              ASSERT_EQ(static_cast<int>(g.embedding.size()), holds_embedding ? std::min(pp, 2) : 0);
              for (int q : g.embedding) {
                const RankCoords o = dsv3::coords_of(s, q);
                ASSERT_TRUE(o.tp == c.tp && o.dp == c.dp && (o.pp == 0 || o.pp == pp - 1));
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(grids, 500);
}

TEST(Topology, RankOutsideTheWorldOrBadSizes) {
  const ParallelSizes s = sizes(16, 2, 2, 4, 1);
  EXPECT_ERROR(dsv3::coords_of(s, 16), "rank 16 is outside the world of 16 ranks");
  EXPECT_ERROR(dsv3::groups_of(s, -1), "rank -1 is outside");
  EXPECT_ERROR(dsv3::rank_of(s, 2, 0, 0), "grid position (tp 2, dp 0, pp 0) is outside");
  ParallelSizes bad = s;
  bad.dp = 3;  // 2*2*3 != 16
  EXPECT_ERROR(dsv3::groups_of(bad, 0), "inconsistent parallel sizes");
  bad = s;
  bad.ep = 3;  // does not divide tp*dp = 8
  EXPECT_ERROR(dsv3::coords_of(bad, 0), "inconsistent parallel sizes");
}

// ---- resolve_sizes: the deck and the model ---------------------------------------------------------------
TEST(Topology, ResolveDerivesDataParallel) {
  const ModelConfig m = tiny_model();
  ParallelSizes s = dsv3::resolve_sizes(deck({"parallel.tp=2", "parallel.pp=2", "parallel.ep=4"}), 16, m);
  EXPECT_EQ(s.world, 16);
  EXPECT_EQ(s.tp, 2);
  EXPECT_EQ(s.pp, 2);
  EXPECT_EQ(s.dp, 4);
  EXPECT_EQ(s.ep, 4);
  EXPECT_EQ(s.etp, 1);
  EXPECT_EQ(s.edp(), 2);
  EXPECT_FALSE(s.sp);
  // a given dp that agrees
  s = dsv3::resolve_sizes(deck({"parallel.tp=2", "parallel.pp=2", "parallel.dp=4"}), 16, m);
  EXPECT_EQ(s.dp, 4);
  // one rank: everything 1
  s = dsv3::resolve_sizes(deck({}), 1, m);
  EXPECT_EQ(s.tp * s.pp * s.dp * s.ep * s.etp, 1);
}

TEST(Topology, SequenceParallelIsANoOpWithoutTensorParallel) {
  const ModelConfig m = tiny_model();
  EXPECT_FALSE(dsv3::resolve_sizes(deck({"parallel.sp=true"}), 4, m).sp);
  EXPECT_TRUE(dsv3::resolve_sizes(deck({"parallel.sp=true", "parallel.tp=2"}), 4, m).sp);
  EXPECT_TRUE(dsv3::resolve_sizes(deck({"parallel.sp=true", "parallel.tp=2", "train.seq_length=64"}), 4, m).sp);
}

// The Megatron-Bridge recipe on the released model: 1024 ranks, TP2 PP16 EP64 ETP1, SP, its layout.
TEST(Topology, ResolveTheDeepSeekV3Recipe) {
  const ModelConfig m = dsv3::model_config_from_file(std::string(DSV3_SOURCE_DIR) + "/input/models/deepseek-v3.json");
  const ParallelSizes s = dsv3::resolve_sizes(
      deck({"parallel.tp=2", "parallel.pp=16", "parallel.ep=64", "parallel.sp=true", "train.seq_length=4096",
            "parallel.pp_layout=Et*4|(t*4|)*14tmL"}),
      1024, m);
  EXPECT_EQ(s.dp, 32);
  EXPECT_EQ(s.edp(), 1);
  EXPECT_TRUE(s.sp);
  // rank 100: stage 1 (100 / 64), tp 0, dp 18; expert rank 36 of its stage's 64-rank ep group
  const RankCoords c = dsv3::coords_of(s, 100);
  EXPECT_EQ(c.pp, 1);
  EXPECT_EQ(c.tp, 0);
  EXPECT_EQ(c.dp, 18);
  EXPECT_EQ(c.ep, 36);
  const Groups g = dsv3::groups_of(s, 100);
  EXPECT_EQ(g.ep.front(), 64);
  EXPECT_EQ(g.ep.back(), 127);
  EXPECT_EQ(g.edp, Ranks{100});
  EXPECT_EQ(g.pp.size(), 16u);
  EXPECT_EQ(g.pp.front(), 36);
  EXPECT_EQ(g.pp.back(), 36 + 15 * 64);
  EXPECT_TRUE(g.embedding.empty());
}

// Every deck check ends with where the keys it names were set: file:line, the command line or the default.
TEST(Topology, ResolveErrorsSayWhereTheKeysWereSet) {
  const ModelConfig m = tiny_model();
  auto resolve = [&](const std::string& text, std::vector<std::string> ov, int world, const ModelConfig& model) {
    dsv3::resolve_sizes(Deck::parse_text(text, "run.deck", ov), world, model);
  };
  EXPECT_ERROR(resolve("[parallel]\ntp = 2\n", {"parallel.pp=2"}, 6, m),
               "world size 6 is not a multiple of tp*pp=4 (parallel.tp=2, parallel.pp=2) "
               "(parallel.tp at run.deck:2, parallel.pp on the command line)");
  EXPECT_ERROR(resolve("[parallel]\ndp = 3\n", {"parallel.tp=2"}, 4, m),
               "(parallel.dp at run.deck:2, parallel.tp on the command line, parallel.pp by default)");
  EXPECT_ERROR(resolve("[parallel]\n\ntp = 3\n", {}, 3, m),
               "parallel.tp=3 does not divide num_attention_heads=4 (parallel.tp at run.deck:3)");
  EXPECT_ERROR(resolve("[parallel]\ntp = 2\nsp = on\n[train]\nseq_length = 7\n", {}, 2, m),
               "(parallel.sp at run.deck:3, train.seq_length at run.deck:5, train.micro_batch by default, "
               "parallel.tp at run.deck:2)");
  EXPECT_ERROR(resolve("[parallel]\nep = 2\n", {}, 2, dense_model()), "no MoE layer (parallel.ep at run.deck:2)");
  EXPECT_ERROR(resolve("[parallel]\netp = 2\n", {}, 2, dense_model()), "no MoE layer (parallel.etp at run.deck:2)");
  EXPECT_ERROR(resolve("[parallel]\nep = 3\n", {}, 3, m),
               "parallel.ep=3 does not divide n_routed_experts=8 (parallel.ep at run.deck:2)");
  EXPECT_ERROR(resolve("[parallel]\netp = 3\n", {}, 3, m),
               "parallel.etp=3 does not divide moe_intermediate_size=32 (parallel.etp at run.deck:2)");
  EXPECT_ERROR(resolve("[parallel]\nep = 2\netp = 2\n", {}, 2, m),
               "(parallel.ep at run.deck:2, parallel.etp at run.deck:3, parallel.tp by default)");
  // the pipeline layout: the even split names parallel.pp, a given layout both keys
  EXPECT_ERROR(resolve("[parallel]\npp = 8\n", {}, 8, m),
               "parallel.pp=8 exceeds the decoder layers (4)");
  EXPECT_ERROR(resolve("[parallel]\npp = 8\n", {}, 8, m), "(parallel.pp at run.deck:2)");
  EXPECT_ERROR(resolve("[parallel]\npp = 2\npp_layout = Et|tmL\n", {}, 2, m),
               "has 2 decoder layers (t) but num_hidden_layers=4 "
               "(parallel.pp_layout at run.deck:3, parallel.pp at run.deck:2)");
  EXPECT_ERROR(resolve("[parallel]\npp = 2\n", {"parallel.pp_layout=Et*2|Xt*2mL"}, 2, m),
               "at character 6: unknown symbol 'X' (expected E, t, m, L, |, (, ), *N) "
               "(parallel.pp_layout on the command line, parallel.pp at run.deck:2)");
}

TEST(Topology, ResolveErrorsNameTheKeyAndTheConstraint) {
  const ModelConfig m = tiny_model();
  auto resolve = [&](std::vector<std::string> ov, int world, const ModelConfig& model) {
    dsv3::resolve_sizes(deck(ov), world, model);
  };
  EXPECT_ERROR(resolve({}, 0, m), "world size 0 must be at least 1");
  EXPECT_ERROR(resolve({"parallel.tp=2", "parallel.pp=2"}, 6, m), "world size 6 is not a multiple of tp*pp=4");
  EXPECT_ERROR(resolve({"parallel.tp=2", "parallel.dp=3"}, 4, m), "parallel.dp=3 disagrees with world size 4");
  EXPECT_ERROR(resolve({"parallel.tp=3"}, 3, m), "parallel.tp=3 does not divide num_attention_heads=4");
  {
    ModelConfig v = m;
    v.vocab_size = 510;
    EXPECT_ERROR(resolve({"parallel.tp=4"}, 4, v), "parallel.tp=4 does not divide vocab_size=510");
  }
  {
    ModelConfig d = m;
    d.intermediate_size = 130;  // layer 0 is dense
    EXPECT_ERROR(resolve({"parallel.tp=4"}, 4, d), "parallel.tp=4 does not divide intermediate_size=130");
    d.first_k_dense_replace = 0;  // every layer (and the MTP layer) is MoE: intermediate_size unused
    EXPECT_NO_THROW(resolve({"parallel.tp=4"}, 4, d));
  }
  {
    ModelConfig sh = m;
    sh.moe_intermediate_size = 30;
    EXPECT_ERROR(resolve({"parallel.tp=4"}, 4, sh),
                 "parallel.tp=4 does not divide moe_intermediate_size*n_shared_experts=30");
    sh.n_shared_experts = 2;  // 60: divisible by 4
    EXPECT_NO_THROW(resolve({"parallel.tp=4"}, 4, sh));
    EXPECT_ERROR(resolve({"parallel.tp=4", "parallel.etp=4"}, 4, sh),
                 "parallel.etp=4 does not divide moe_intermediate_size=30");
  }
  EXPECT_ERROR(resolve({"parallel.tp=2", "parallel.sp=true", "train.seq_length=7"}, 2, m),
               "parallel.sp needs train.seq_length*train.micro_batch=7*1=7 divisible by parallel.tp=2");
  EXPECT_ERROR(resolve({"parallel.tp=4", "parallel.sp=true", "train.seq_length=6", "train.micro_batch=3"}, 4, m),
               "parallel.sp needs train.seq_length*train.micro_batch=6*3=18 divisible by parallel.tp=4");
  EXPECT_TRUE(dsv3::resolve_sizes(deck({"parallel.tp=2", "parallel.sp=true", "train.seq_length=7", "train.micro_batch=2"}),
                            2, m).sp);  // 14 tokens: 7 per tp rank
  EXPECT_ERROR(resolve({"parallel.ep=3"}, 3, m), "parallel.ep=3 does not divide n_routed_experts=8");
  EXPECT_ERROR(resolve({"parallel.etp=3"}, 3, m), "parallel.etp=3 does not divide moe_intermediate_size=32");
  EXPECT_ERROR(resolve({"parallel.pp=2", "parallel.ep=4"}, 4, m), "ep*etp=4 must divide tp*dp=2");
  EXPECT_ERROR(resolve({"parallel.ep=2", "parallel.etp=2"}, 2, m), "ep*etp=4 must divide tp*dp=2");
  EXPECT_ERROR(resolve({"parallel.ep=2"}, 2, dense_model()), "parallel.ep=2 needs routed experts");
  EXPECT_ERROR(resolve({"parallel.etp=2"}, 2, dense_model()), "parallel.etp=2 needs routed experts");
  EXPECT_ERROR(resolve({"parallel.pp=8"}, 8, m), "parallel.pp=8 exceeds the decoder layers (4)");
  // a layout given in the deck is checked here too
  EXPECT_ERROR(resolve({"parallel.pp=2", "parallel.pp_layout=Et|tmL"}, 2, m),
               "parallel.pp_layout \"Et|tmL\": has 2 decoder layers (t) but num_hidden_layers=4");
  // with a layout, pp may exceed the layers (stages of their own for E and L, as Megatron allows)
  EXPECT_NO_THROW(resolve({"parallel.pp=6", "parallel.pp_layout=E|t|t|t|t|mL"}, 6, m));
}
