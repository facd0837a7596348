// Unit tests of the pipeline layout (pipeline/layout.h): Megatron's syntax on the recipe strings, the even
// split, the formatting round trip and every syntax and placement error.
#include "test_util.h"
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "core/error.h"
#include "pipeline/layout.h"

using dsv3::StageLayout;
using Layers = std::vector<int>;

using dsv3::test::error_of;

namespace {

Layers range(int first, int n) {
  Layers l(n);
  for (int i = 0; i < n; ++i) l[i] = first + i;
  return l;
}

// A layout error: names the key, quotes the spec and contains `needle`.
void expect_layout_error(const std::string& spec, int pp, int layers, int mtp, const std::string& needle) {
  SCOPED_TRACE("spec \"" + spec + "\"");
  EXPECT_ERROR(dsv3::parse_pp_layout(spec, pp, layers, mtp), needle);
  EXPECT_ERROR(dsv3::parse_pp_layout(spec, pp, layers, mtp), "parallel.pp_layout \"" + spec + "\"");
}

}  // namespace

// Megatron-Bridge's DeepSeek-V3 recipe: PP16, E + 4 layers, 14 x 4 layers, the last layer + MTP + loss.
TEST(PpLayout, DeepSeekV3RecipePp16) {
  const std::string spec = "Et*4|(t*4|)*14tmL";
  const auto l = dsv3::parse_pp_layout(spec, 16, 61, 1);
  ASSERT_EQ(l.size(), 16u);
  EXPECT_TRUE(l[0].embedding);
  EXPECT_EQ(l[0].layers, range(0, 4));
  for (int s = 1; s < 15; ++s) {
    EXPECT_FALSE(l[s].embedding || l[s].mtp || l[s].loss) << s;
    EXPECT_EQ(l[s].layers, range(4 * s, 4)) << s;
  }
  EXPECT_EQ(l[15].layers, Layers{60});
  EXPECT_TRUE(l[15].mtp);
  EXPECT_TRUE(l[15].loss);
  EXPECT_FALSE(l[15].embedding);
  EXPECT_EQ(dsv3::layout_spec(l, 1), "Et*4|t*4|t*4|t*4|t*4|t*4|t*4|t*4|t*4|t*4|t*4|t*4|t*4|t*4|t*4|tmL");
  const std::string f = dsv3::format_layout(l);
  EXPECT_TRUE(f.starts_with("pp0: E t0-3 | pp1: t4-7 | pp2: t8-11 | ")) << f;
  EXPECT_TRUE(f.ends_with(" | pp14: t56-59 | pp15: t60 m L")) << f;
}

// The virtual-stage form of the docs, read as 32 plain stages: the last stage holds only MTP and the loss.
TEST(PpLayout, DeepSeekV3Pp32) {
  const auto l = dsv3::parse_pp_layout("Et|(tt|)*30mL", 32, 61, 1);
  ASSERT_EQ(l.size(), 32u);
  EXPECT_EQ(l[0].layers, Layers{0});
  for (int s = 1; s <= 30; ++s) EXPECT_EQ(l[s].layers, range(1 + 2 * (s - 1), 2)) << s;
  EXPECT_TRUE(l[31].layers.empty());
  EXPECT_TRUE(l[31].mtp && l[31].loss);
  EXPECT_TRUE(dsv3::format_layout(l).ends_with(" | pp30: t59-60 | pp31: m L")) << dsv3::format_layout(l);
}

TEST(PpLayout, SyntaxVariants) {
  const auto ref = dsv3::parse_pp_layout("Ettt|tt|ttmL", 3, 7, 1);
  // whitespace and commas are cosmetic; the same layout written in other ways
  for (const std::string spec : {" E t*3 | t t | t t m L ", "Et*3,|tt|,tt,m,L", "E(t)*3|(t*2|)t*2mL", "Et*3|t*2|t*2mL",
                                 "E\tttt|\n(t)*2|t*1*2mL"}) {
    EXPECT_EQ(dsv3::parse_pp_layout(spec, 3, 7, 1), ref) << spec;
  }
  // nested groups and repeated stage separators
  auto l = dsv3::parse_pp_layout("E((t|)*2)*2tL", 5, 5, 0);
  for (int s = 0; s < 5; ++s) EXPECT_EQ(l[s].layers, Layers{s}) << s;
  EXPECT_TRUE(l[0].embedding && l[4].loss && !l[4].mtp);
  // chained repeats multiply
  EXPECT_EQ(dsv3::parse_pp_layout("Et*2*3|tmL", 2, 7, 1)[0].layers, range(0, 6));
  // '|*N' gives empty stages, which are legal (they only pass activations on)
  l = dsv3::parse_pp_layout("E|*3t*4mL", 4, 4, 1);
  EXPECT_TRUE(l[1].layers.empty() && l[2].layers.empty());
  EXPECT_FALSE(l[1].embedding || l[1].loss || l[1].mtp);
  EXPECT_EQ(l[3].layers, range(0, 4));
  EXPECT_EQ(dsv3::format_layout(l), "pp0: E | pp1: - | pp2: - | pp3: t0-3 m L");
  // several MTP layers, and none
  l = dsv3::parse_pp_layout("Et*2|t*2m*2L", 2, 4, 2);
  EXPECT_TRUE(l[1].mtp);
  EXPECT_EQ(dsv3::layout_spec(l, 2), "Et*2|t*2m*2L");
  l = dsv3::parse_pp_layout("Et*2|t*2L", 2, 4, 0);
  EXPECT_FALSE(l[1].mtp);
  // one stage holds everything
  l = dsv3::parse_pp_layout("Et*4mL", 1, 4, 1);
  ASSERT_EQ(l.size(), 1u);
  EXPECT_TRUE(l[0].embedding && l[0].mtp && l[0].loss);
  EXPECT_EQ(l[0].layers, range(0, 4));
}

TEST(PpLayout, DefaultSplitsEvenlyFirstStagesTakeTheRemainder) {
  auto l = dsv3::parse_pp_layout("", 3, 10, 1);
  ASSERT_EQ(l.size(), 3u);
  EXPECT_EQ(l[0].layers, range(0, 4));
  EXPECT_EQ(l[1].layers, range(4, 3));
  EXPECT_EQ(l[2].layers, range(7, 3));
  EXPECT_TRUE(l[0].embedding && !l[0].mtp && !l[0].loss);
  EXPECT_TRUE(!l[2].embedding && l[2].mtp && l[2].loss);
  EXPECT_EQ(dsv3::layout_spec(l, 1), "Et*4|t*3|t*3mL");
  EXPECT_EQ(dsv3::format_layout(l), "pp0: E t0-3 | pp1: t4-6 | pp2: t7-9 m L");
  // blank is empty
  EXPECT_EQ(dsv3::parse_pp_layout("  ", 3, 10, 1), l);
  // 61 layers on 16 stages: 13 x 4 + 3 x 3
  l = dsv3::parse_pp_layout("", 16, 61, 1);
  for (int s = 0; s < 16; ++s) EXPECT_EQ(l[s].layers.size(), s < 13 ? 4u : 3u) << s;
  EXPECT_EQ(l[15].layers.back(), 60);
  // one stage; pp == layers; no MTP
  l = dsv3::parse_pp_layout("", 1, 4, 1);
  EXPECT_TRUE(l[0].embedding && l[0].mtp && l[0].loss);
  EXPECT_EQ(l[0].layers, range(0, 4));
  l = dsv3::parse_pp_layout("", 4, 4, 0);
  for (int s = 0; s < 4; ++s) EXPECT_EQ(l[s].layers, Layers{s});
  EXPECT_FALSE(l[3].mtp);
  // every default round-trips through its Megatron spec
  for (int pp = 1; pp <= 8; ++pp)
    for (int layers = pp; layers <= 20; ++layers)
      for (int mtp = 0; mtp <= 2; ++mtp) {
        const auto d = dsv3::parse_pp_layout("", pp, layers, mtp);
        EXPECT_EQ(dsv3::parse_pp_layout(dsv3::layout_spec(d, mtp), pp, layers, mtp), d)
            << dsv3::layout_spec(d, mtp);
      }
}

TEST(PpLayout, DefaultErrors) {
  EXPECT_ERROR(dsv3::parse_pp_layout("", 8, 4, 1), "parallel.pp=8 exceeds the decoder layers (4)");
  EXPECT_ERROR(dsv3::parse_pp_layout("", 0, 4, 1), "parallel.pp=0 must be at least 1");
  EXPECT_ERROR(dsv3::parse_pp_layout("", 1, 0, 1), "num_hidden_layers=0 must be at least 1");
  EXPECT_ERROR(dsv3::parse_pp_layout("", 1, 4, -1), "num_nextn_predict_layers=-1 must be >= 0");
}

TEST(PpLayout, PlacementErrors) {
  // stage count
  expect_layout_error("Et*2|t*2mL", 3, 4, 1, "has 2 stages but parallel.pp=3");
  expect_layout_error("Et*4mL", 2, 4, 1, "has 1 stage but parallel.pp=2");
  expect_layout_error("Et*4|(|)*3mL", 2, 4, 1, "has 5 stages but parallel.pp=2");
  // E
  expect_layout_error("t*2|t*2mL", 2, 4, 1, "no E (embedding)");
  expect_layout_error("EEt*2|t*2mL", 2, 4, 1, "at character 2: E (embedding) appears twice (first at character 1)");
  expect_layout_error("t*2|Et*2mL", 2, 4, 1, "at character 5: E (embedding) must be on the first stage, not stage 1");
  expect_layout_error("tEt|t*2mL", 2, 4, 1, "at character 2: E on stage 0 comes after a later part");
  // L
  expect_layout_error("Et*2|t*2m", 2, 4, 1, "no L (loss)");
  expect_layout_error("Et*2|t*2mLL", 2, 4, 1, "at character 11: L (loss) appears twice (first at character 10)");
  expect_layout_error("Et*2L|t*2m", 2, 4, 1, "at character 5: L (loss) must be on the last stage (1), not stage 0");
  expect_layout_error("Et*2|tmLt", 2, 4, 1, "at character 9: t on stage 1 comes after a later part");
  // m
  expect_layout_error("Et*2m|t*2L", 2, 4, 1, "at character 5: m (MTP) must be on the last stage (1), not stage 0");
  expect_layout_error("Et*2|t*2L", 2, 4, 1, "has 0 MTP layers (m) but num_nextn_predict_layers=1");
  expect_layout_error("Et*2|t*2mmL", 2, 4, 1, "at character 10: more MTP layers (m) than num_nextn_predict_layers=1");
  expect_layout_error("Et*2|t*2Lm", 2, 4, 1, "at character 10: m on stage 1 comes after a later part");
  expect_layout_error("Et*2|mt*2L", 2, 4, 1, "at character 7: t on stage 1 comes after a later part");
  // t
  expect_layout_error("Et*2|tmL", 2, 4, 1, "has 3 decoder layers (t) but num_hidden_layers=4");
  expect_layout_error("Et*3|t*2mL", 2, 4, 1, "at character 6: more decoder layers (t) than num_hidden_layers=4");
  // a repeated symbol is blamed at the position it was written
  expect_layout_error("E(t|)*3mL", 3, 3, 1, "has 4 stages");
  expect_layout_error("E(tm|)tmL", 2, 2, 2, "at character 4: m (MTP) must be on the last stage");
}

// `where` (the deck's where_set) ends every message, syntax, placement and even-split errors alike.
TEST(PpLayout, ErrorsEndWithWhere) {
  const std::string w = "(parallel.pp_layout at run.deck:7, parallel.pp on the command line)";
  EXPECT_ERROR(dsv3::parse_pp_layout("Ex|t*2mL", 2, 4, 1, w), "at character 2: unknown symbol 'x'");
  EXPECT_ERROR(dsv3::parse_pp_layout("Ex|t*2mL", 2, 4, 1, w), ") " + w + " (src/");
  EXPECT_ERROR(dsv3::parse_pp_layout("Et*2|t*2mL", 3, 4, 1, w), "has 2 stages but parallel.pp=3 " + w);
  EXPECT_ERROR(dsv3::parse_pp_layout("Et*2|t*2m", 2, 4, 1, w), "no L (loss): the last stage must end with L " + w);
  EXPECT_ERROR(dsv3::parse_pp_layout("", 8, 4, 1, "(parallel.pp at run.deck:3)"),
               "(or give parallel.pp_layout) (parallel.pp at run.deck:3)");
  EXPECT_ERROR(dsv3::parse_pp_layout("", 0, 4, 1, "(parallel.pp at run.deck:3)"),
               "parallel.pp=0 must be at least 1 (parallel.pp at run.deck:3)");
}

TEST(PpLayout, SyntaxErrors) {
  expect_layout_error("Et*|t*2mL", 2, 4, 1, "at character 3: '*' needs a repeat count");
  expect_layout_error("Et*2|t*", 2, 4, 1, "at character 7: '*' needs a repeat count");
  expect_layout_error("Et*0|t*4mL", 2, 4, 1, "at character 3: repeat count 0");
  expect_layout_error("*Et*2|t*2mL", 2, 4, 1, "at character 1: '*' must follow a symbol or a ')'");
  expect_layout_error("Et**2|t*2mL", 2, 4, 1, "at character 3: '*' needs a repeat count");
  expect_layout_error("Et4|t*2mL", 2, 4, 1, "at character 3: a repeat count without '*' before it");
  expect_layout_error("Ex|t*2mL", 2, 4, 1, "at character 2: unknown symbol 'x'");
  expect_layout_error("Et*2|T*2mL", 2, 4, 1, "at character 6: unknown symbol 'T'");
  expect_layout_error("E(t|t*3mL", 2, 4, 1, "at character 2: '(' is never closed");
  expect_layout_error("Et)|t*3mL", 2, 4, 1, "at character 3: ')' without a matching '('");
  expect_layout_error("E()t*2|t*2mL", 2, 4, 1, "at character 2: empty group '()'");
  expect_layout_error("E( , )t*2|t*2mL", 2, 4, 1, "at character 2: empty group '()'");
  expect_layout_error("E(t*1000)*10000000|mL", 2, 4, 1, "repeat count is too large");
  expect_layout_error("E(t*1000)*2000|mL", 2, 4, 1, "at character 2: expands to more than 1048576 symbols");
  expect_layout_error(std::string(40, '(') + "Et" + std::string(40, ')') + "|t*3mL", 2, 4, 1,
                      "groups nested deeper than 32");
}
