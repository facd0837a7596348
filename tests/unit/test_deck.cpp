// Unit tests of dsv3::Deck: syntax, includes, overrides, typing, origins, text forms and every error.
#include "test_util.h"
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include <sys/resource.h>

#include "core/deck.h"
#include "core/error.h"
#include "model/config.h"

namespace fs = std::filesystem;
using dsv3::Deck;

using dsv3::test::error_of;

namespace {

#define EXPECT_CONTAINS(haystack, needle)                                                     \
  do {                                                                                        \
    const std::string h_ = (haystack);                                                        \
    EXPECT_NE(h_.find(needle), std::string::npos) << "'" << needle << "' not in: " << h_;    \
  } while (0)

// An error: one line, containing every needle.
#define EXPECT_DECK_ERROR(stmt, ...)                                          \
  do {                                                                        \
    const std::string msg_ = error_of([&] { stmt; });                         \
    EXPECT_NE(msg_, "<no error>");                                            \
    EXPECT_EQ(msg_.find('\n'), std::string::npos) << "not one line: " << msg_; \
    for (const std::string& n_ : std::initializer_list<std::string>{__VA_ARGS__}) EXPECT_CONTAINS(msg_, n_);           \
  } while (0)

const char* kRequired = "[train]\niters = 10\nglobal_batch = 8\nseq_length = 64\n";

class DeckTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dsv3_deck_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  // Writes dir_/rel and returns its path.
  std::string write(const std::string& rel, const std::string& text) {
    fs::path p = dir_ / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
    return p.string();
  }
  fs::path dir_;
};

TEST_F(DeckTest, SectionsCommentsAndTypedGets) {
  const std::string text =
      "# a whole-line comment\n"
      "\n"
      "[train]   # trailing comment after a header\n"
      "iters = 200  # trailing comment\n"
      "   global_batch=8\n"
      "seq_length = 64\n"
      "mtp_lambda = 0.5\n"
      "\t\n"
      "[run]\n"
      "name = \"my # run\"   # quoted values may hold '#'\n"
      "device = cuda\n"
      "[parallel]\n"
      "sp = yes\n"
      "[model.rope_scaling]\n"
      "factor = 4\n"
      "[log]\n"
      "all_ranks = ON\n";
  Deck d = Deck::parse_text(text, "t.deck");
  EXPECT_EQ(d.get<int64_t>("train.iters"), 200);
  EXPECT_EQ(d.get<int>("train.global_batch"), 8);
  EXPECT_EQ(d.get<double>("train.seq_length"), 64.0);  // ints read as double
  EXPECT_DOUBLE_EQ(d.get<double>("train.mtp_lambda"), 0.5);
  EXPECT_EQ(d.get<std::string>("run.name"), "my # run");
  EXPECT_EQ(d.get<std::string>("run.device"), "cuda");
  EXPECT_TRUE(d.get<bool>("parallel.sp"));
  EXPECT_TRUE(d.get<bool>("log.all_ranks"));
  EXPECT_DOUBLE_EQ(d.get<double>("model.rope_scaling.factor"), 4.0);
  EXPECT_EQ(d.get<std::string>("train.iters"), "200");  // every key reads as its deck text
  d.require_keys();
}

TEST_F(DeckTest, BoolSpellings) {
  for (const char* t : {"true", "1", "yes", "on", "TRUE", "Yes"})
    EXPECT_TRUE(Deck::defaults_only({std::string("parallel.sp=") + t}).get<bool>("parallel.sp")) << t;
  for (const char* f : {"false", "0", "no", "off", "False"})
    EXPECT_FALSE(Deck::defaults_only({std::string("parallel.sp=") + f}).get<bool>("parallel.sp")) << f;
}

TEST_F(DeckTest, DefaultsAndGiven) {
  Deck d = Deck::parse_text(std::string(kRequired) + "[optim]\nlr = 1e-3\n", "t.deck");
  EXPECT_TRUE(d.given("train.iters"));
  EXPECT_TRUE(d.given("optim.lr"));
  EXPECT_FALSE(d.given("train.seed"));
  EXPECT_EQ(d.get<int64_t>("train.seed"), 1234);
  EXPECT_DOUBLE_EQ(d.get<double>("optim.lr"), 1e-3);
  EXPECT_DOUBLE_EQ(d.get<double>("optim.min_lr"), 3e-5);
  EXPECT_DOUBLE_EQ(d.get<double>("train.aux_alpha"), 1e-4);
  EXPECT_EQ(d.get<std::string>("run.device"), "cpu");
  EXPECT_EQ(d.get<int>("run.threads"), 0);
  EXPECT_EQ(d.get<std::string>("run.name"), "dsv3");
  EXPECT_EQ(d.get<std::string>("optim.lr_schedule"), "constant");
  EXPECT_EQ(d.get<std::string>("data.split"), "98,2,0");
  EXPECT_EQ(d.get<std::string>("parallel.pp_layout"), "");
  EXPECT_EQ(d.get<int>("parallel.tp"), 1);
  EXPECT_EQ(d.get<int>("parallel.dp"), 0);
  EXPECT_FALSE(d.get<bool>("parallel.sp"));
  EXPECT_FALSE(d.get<bool>("checkpoint.finetune"));
  EXPECT_EQ(d.get<std::string>("log.level"), "info");
  EXPECT_EQ(d.get<int>("log.interval"), 1);
  EXPECT_DOUBLE_EQ(d.get<double>("moe.bias_update_rate"), 1e-3);
  // optional keys without a default: no value until given
  EXPECT_FALSE(d.has("model.hidden_size"));
  EXPECT_FALSE(d.given("model.hidden_size"));
  EXPECT_TRUE(d.has("train.seed"));
  EXPECT_DECK_ERROR(d.get<int>("model.hidden_size"), "model.hidden_size", "no value");
  EXPECT_EQ(d.get_or("model.hidden_size", "none"), "none");
  EXPECT_EQ(d.get_or("train.iters", "none"), "10");
  EXPECT_EQ(d.get_or("train.seed", "none"), "1234");
  EXPECT_EQ(d.origin("model.hidden_size"), "unset");
  // a default-constructed deck holds the defaults
  EXPECT_EQ(Deck().get<int64_t>("train.seed"), 1234);
}

TEST_F(DeckTest, Origins) {
  std::string inc = write("inc.deck", "[optim]\nlr = 0.1\n");
  std::string main = write("main.deck", std::string("include = inc.deck\n") + kRequired);
  Deck d = Deck::parse_file(main, {"train.seed=7"});
  EXPECT_EQ(d.origin("train.iters"), main + ":3");
  EXPECT_EQ(d.origin("train.seq_length"), main + ":5");
  EXPECT_EQ(d.origin("optim.lr"), inc + ":2");
  EXPECT_EQ(d.origin("train.seed"), "command line");
  EXPECT_EQ(d.origin("optim.beta1"), "default");
  Deck t = Deck::parse_text(kRequired, "inline");
  EXPECT_EQ(t.origin("train.global_batch"), "inline:3");
}

TEST_F(DeckTest, LaterLineWins) {
  std::string inc = write("inc.deck", "[optim]\nlr = 0.2\nbeta1 = 0.5\n");
  std::string main = write("main.deck",
                           std::string(kRequired) +
                               "[optim]\n"
                               "lr = 0.1\n"       // line 6: replaced by the include below
                               "include = inc.deck\n"
                               "[optim]\n"
                               "beta1 = 0.6\n"    // line 9: replaces the include's
                               "[train]\n"
                               "iters = 11\n"     // redefinition in the same file: allowed
                               "iters = 12\n");   // line 12
  Deck d = Deck::parse_file(main);
  EXPECT_DOUBLE_EQ(d.get<double>("optim.lr"), 0.2);
  EXPECT_EQ(d.origin("optim.lr"), inc + ":2");
  EXPECT_DOUBLE_EQ(d.get<double>("optim.beta1"), 0.6);
  EXPECT_EQ(d.origin("optim.beta1"), main + ":9");
  EXPECT_EQ(d.get<int>("train.iters"), 12);
  EXPECT_EQ(d.origin("train.iters"), main + ":12");
}

TEST_F(DeckTest, OverrideWins) {
  std::string main = write("main.deck", std::string(kRequired) + "[parallel]\npp = 2\n");
  Deck d = Deck::parse_file(main, {"train.iters=20", "parallel.pp = 4", "run.name=\"x y\"", "train.iters=21"});
  EXPECT_EQ(d.get<int>("train.iters"), 21);  // the last override wins too
  EXPECT_EQ(d.origin("train.iters"), "command line");
  EXPECT_EQ(d.get<int>("parallel.pp"), 4);
  EXPECT_EQ(d.get<std::string>("run.name"), "x y");
  // an override may fix a bad deck value: only the last value is checked
  std::string bad = write("bad.deck", std::string(kRequired) + "[parallel]\ntp = zero\n");
  EXPECT_EQ(Deck::parse_file(bad, {"parallel.tp=2"}).get<int>("parallel.tp"), 2);
}

TEST_F(DeckTest, IncludesAndRelativePaths) {
  // a/main.deck -> a/sub/inc.deck -> a/common.deck ; paths relative to each file's directory
  write("a/common.deck", "[model]\nhf_weights = weights  # relative to a/\n");
  write("a/sub/inc.deck",
        "include = ../common.deck  # before any section\n"
        "[model]\nhf_config = models/tiny.json\n");
  std::string main = write("a/main.deck",
                           "include = sub/inc.deck\n"
                           "[train]\n"
                           "iters = 3\n"
                           "include = sub/empty.deck\n"  // an include inside a section...
                           "global_batch = 8\n"           // ...and the section continues after it
                           "seq_length = 16\n"
                           "[log]\nmetrics = runs/m.jsonl\n"
                           "[checkpoint]\ndir = /abs/ckpt\n");
  write("a/sub/empty.deck", "# nothing\n");
  Deck d = Deck::parse_file(main, {"data.cache_dir=cache"});
  d.require_keys();
  EXPECT_EQ(d.get<int>("train.global_batch"), 8);
  EXPECT_EQ(d.get<std::string>("model.hf_config"), "models/tiny.json");
  EXPECT_EQ(d.path("model.hf_config"), (dir_ / "a/sub/models/tiny.json").string());
  EXPECT_EQ(d.path("model.hf_weights"), (dir_ / "a/weights").string());
  EXPECT_EQ(d.origin("model.hf_weights"), (dir_ / "a/common.deck").string() + ":2");
  EXPECT_EQ(d.path("log.metrics"), (dir_ / "a/runs/m.jsonl").string());
  EXPECT_EQ(d.path("checkpoint.dir"), "/abs/ckpt");     // absolute: unchanged
  EXPECT_EQ(d.path("data.cache_dir"), "cache");         // command line: relative to the cwd
  EXPECT_EQ(d.path("checkpoint.load"), "");             // empty stays empty
  EXPECT_EQ(d.resolve_path("model.hf_config", "x.bin"), (dir_ / "a/sub/x.bin").string());
  // parse_text resolves includes (and paths) relative to the cwd
  fs::path cwd = fs::current_path();
  fs::current_path(dir_);
  Deck t = Deck::parse_text("include = a/sub/inc.deck\n[log]\nmetrics = m.jsonl\n", "text");
  fs::current_path(cwd);
  EXPECT_EQ(t.get<std::string>("model.hf_config"), "models/tiny.json");
  EXPECT_EQ(t.path("model.hf_config"), "a/sub/models/tiny.json");
  EXPECT_EQ(t.path("log.metrics"), "m.jsonl");
}

TEST_F(DeckTest, IncludeCycle) {
  std::string a = write("a.deck", "[train]\niters = 1\ninclude = b.deck\n");
  std::string b = write("b.deck", "include = a.deck\n");
  EXPECT_DECK_ERROR(Deck::parse_file(a), "include cycle", "a.deck -> ", "b.deck -> ", "b.deck:1");
  std::string self = write("self.deck", "include = ./self.deck\n");
  EXPECT_DECK_ERROR(Deck::parse_file(self), "include cycle", "self.deck:1");
  // including the same file twice (not nested) is fine
  write("c.deck", "[train]\nseed = 5\n");
  std::string twice = write("twice.deck", "include = c.deck\ninclude = c.deck\n");
  EXPECT_EQ(Deck::parse_file(twice).get<int>("train.seed"), 5);
}

TEST_F(DeckTest, ResolvedTextRoundTrip) {
  write("inc.deck", "[model]\nhf_config = m/config.json\nnorm_topk_prob = yes\n");
  std::string main = write("main.deck", std::string(kRequired) +
                                            "include = inc.deck\n"
                                            "[run]\nname = \"a b # c\"\n"
                                            "[optim]\nlr = 1.5e-3\nlr_schedule = cosine\n"
                                            "[model]\nrope_scaling.factor = 40\nrms_norm_eps = 1e-6\n"
                                            "[data]\npaths = \"0.7 a 0.3 b\"\n");
  Deck d = Deck::parse_file(main, {"parallel.pp_layout=Et|t|tL", "train.seed=99"});
  const std::string text = d.resolved_text();
  EXPECT_CONTAINS(text, "[train]\n");
  EXPECT_CONTAINS(text, "[model]\n");
  EXPECT_CONTAINS(text, "iters = 10  # from " + main + ":2");
  EXPECT_CONTAINS(text, "seed = 99  # from command line");
  EXPECT_CONTAINS(text, "beta2 = 0.95  # from default");
  EXPECT_CONTAINS(text, "rope_scaling.factor = 40");
  EXPECT_CONTAINS(text, "(path: " + (dir_ / "m/config.json").string() + ")");
  EXPECT_EQ(text.find("hidden_size"), std::string::npos);  // optional and unset: not listed
  Deck r = Deck::parse_text(text, "resolved");
  r.require_keys();
  for (const dsv3::KeySpec& k : dsv3::deck_keys()) {
    ASSERT_EQ(r.has(k.name), d.has(k.name)) << k.name;
    if (!d.has(k.name)) continue;
    EXPECT_EQ(r.get<std::string>(k.name), d.get<std::string>(k.name)) << k.name;
    if (k.type == dsv3::KeySpec::Type::Int) {
      EXPECT_EQ(r.get<int64_t>(k.name), d.get<int64_t>(k.name)) << k.name;
    }
    if (k.type == dsv3::KeySpec::Type::Float) {
      EXPECT_EQ(r.get<double>(k.name), d.get<double>(k.name)) << k.name;
    }
    if (k.type == dsv3::KeySpec::Type::Bool) {
      EXPECT_EQ(r.get<bool>(k.name), d.get<bool>(k.name)) << k.name;
    }
  }
  EXPECT_EQ(r.get<std::string>("run.name"), "a b # c");
  EXPECT_EQ(r.get<std::string>("parallel.pp_layout"), "Et|t|tL");
}

TEST_F(DeckTest, SerializeRoundTrip) {
  write("sub/inc.deck", "[model]\nhf_config = cfg.json\n");
  std::string main = write("main.deck", std::string(kRequired) + "include = sub/inc.deck\n[parallel]\nsp = on\n");
  Deck d = Deck::parse_file(main, {"run.name=x\ty"});
  Deck r = Deck::deserialize(d.serialize());
  EXPECT_EQ(r.resolved_text(), d.resolved_text());
  EXPECT_EQ(r.origin("train.iters"), main + ":2");
  EXPECT_EQ(r.origin("run.name"), "command line");
  EXPECT_EQ(r.origin("train.seed"), "default");
  EXPECT_EQ(r.get<std::string>("run.name"), "x\ty");
  EXPECT_TRUE(r.get<bool>("parallel.sp"));
  EXPECT_TRUE(r.given("parallel.sp"));
  EXPECT_FALSE(r.given("parallel.tp"));
  EXPECT_EQ(r.path("model.hf_config"), (dir_ / "sub/cfg.json").string());
  const std::string s = d.serialize();
  EXPECT_DECK_ERROR(Deck::deserialize(s.substr(0, s.size() - 3)), "corrupt serialized deck");
  EXPECT_DECK_ERROR(Deck::deserialize("garbage"), "corrupt serialized deck");
}

TEST_F(DeckTest, HelpListsEveryKey) {
  const std::string h = Deck::help();
  for (const dsv3::KeySpec& k : dsv3::deck_keys()) {
    EXPECT_CONTAINS(h, "  " + k.name + " ");
    EXPECT_CONTAINS(h, k.help);
    if (k.def && *k.def) EXPECT_CONTAINS(h, k.def);
  }
  EXPECT_CONTAINS(h, "[train]\n");
  EXPECT_CONTAINS(h, "cpu|cuda");
  EXPECT_CONTAINS(h, "required");
  EXPECT_CONTAINS(h, "optional");
  EXPECT_CONTAINS(h, ">= 1");
}

TEST_F(DeckTest, KeyTable) {
  // every HF DeepSeek-V3 config field: optional, no default (the config module reads config.json)
  for (const char* f :
       {"vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "first_k_dense_replace", "moe_layer_freq", "num_attention_heads", "num_key_value_heads", "q_lora_rank",
        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
        "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
        "norm_topk_prob", "scoring_func", "topk_method", "rms_norm_eps", "rope_theta", "max_position_embeddings",
        "num_nextn_predict_layers", "tie_word_embeddings", "bos_token_id", "eos_token_id", "aux_loss_alpha",
        "initializer_range", "rope_interleave", "rope_scaling.type", "rope_scaling.factor",
        "rope_scaling.original_max_position_embeddings", "rope_scaling.beta_fast", "rope_scaling.beta_slow",
        "rope_scaling.mscale", "rope_scaling.mscale_all_dim", "hf_config", "hf_weights"}) {
    const std::string key = std::string("model.") + f;
    const dsv3::KeySpec* spec = nullptr;
    for (const auto& k : dsv3::deck_keys())
      if (k.name == key) spec = &k;
    ASSERT_NE(spec, nullptr) << key;
    EXPECT_EQ(spec->def, nullptr) << key;
    EXPECT_FALSE(spec->required) << key;
  }
  Deck d = Deck::defaults_only({"model.routed_scaling_factor=2.5", "model.norm_topk_prob=true",
                                "model.topk_method=group_limited_greedy", "model.rope_scaling.type=yarn"});
  EXPECT_DOUBLE_EQ(d.get<double>("model.routed_scaling_factor"), 2.5);
  EXPECT_TRUE(d.get<bool>("model.norm_topk_prob"));
  EXPECT_DECK_ERROR(Deck::defaults_only({"model.scoring_func=softmax"}), "model.scoring_func", "sigmoid");
}

TEST_F(DeckTest, DefaultsOnly) {
  Deck d = Deck::defaults_only({"parallel.tp=2"});
  EXPECT_EQ(d.get<int>("parallel.tp"), 2);
  EXPECT_FALSE(d.given("train.iters"));
  EXPECT_DECK_ERROR(d.get<int>("train.iters"), "train.iters", "no value");
  EXPECT_DECK_ERROR(d.require_keys(), "missing required key 'train.iters' (in section [train])",
                    "'train.global_batch'", "'train.seq_length'");
}

// The shipped decks parse, have every required key, and their paths resolve relative to input/ (the values
// themselves are tuning that changes; the round trip below checks they are read consistently).
TEST_F(DeckTest, ShippedDecks) {
  for (const char* name : {"tiny.deck", "bench-small.deck"}) {
    const std::string path = std::string(DSV3_SOURCE_DIR) + "/input/" + name;
    Deck d = Deck::parse_file(path, {"train.iters=20", "parallel.pp=2"});
    d.require_keys();
    EXPECT_EQ(d.get<int>("train.iters"), 20) << name;
    EXPECT_EQ(d.origin("train.iters"), "command line");
    EXPECT_EQ(d.get<int>("parallel.pp"), 2);
    EXPECT_TRUE(fs::is_regular_file(d.path("model.hf_config"))) << d.path("model.hf_config");
    EXPECT_EQ(fs::path(d.path("model.hf_config")).parent_path().filename(), "models");
    const Deck again = Deck::parse_text(d.resolved_text(), "resolved");
    for (const char* key : {"train.seq_length", "train.global_batch", "train.micro_batch", "optim.lr", "log.metrics"})
      EXPECT_EQ(again.get<std::string>(key), d.get<std::string>(key)) << name << " " << key;
  }
  const std::string tiny = std::string(DSV3_SOURCE_DIR) + "/input/tiny.deck";
  Deck d = Deck::parse_file(tiny);
  EXPECT_EQ(fs::path(d.path("checkpoint.dir")).lexically_relative(fs::path(tiny).parent_path()), "../runs/tiny/ckpt");
  EXPECT_EQ(fs::path(d.path("data.paths")).lexically_relative(fs::path(tiny).parent_path()), "../runs/data/corpus");
}

// ---- errors ----------------------------------------------------------------------------------------

TEST_F(DeckTest, ErrorUnknownKey) {
  std::string f = write("tiny.deck", "[train]\niters = 3\n\n\niter = 5\n");
  EXPECT_DECK_ERROR(Deck::parse_file(f), "unknown key 'train.iter'", "tiny.deck:5", "(did you mean 'train.iters'?)");
  EXPECT_DECK_ERROR(Deck::parse_text("[optim]\nlearning_rate = 1\n", "t.deck"), "unknown key 'optim.learning_rate'",
                    "t.deck:2");
  EXPECT_EQ(error_of([] { Deck::parse_text("[optim]\nlearning_rate = 1\n", "t.deck"); }).find("did you mean"),
            std::string::npos);
  EXPECT_DECK_ERROR(Deck::parse_text("[trian]\niters = 1\n", "t.deck"), "unknown section [trian]", "t.deck:1",
                    "did you mean 'train'");
  Deck d;
  EXPECT_DECK_ERROR(d.get<int>("train.iter"), "unknown deck key 'train.iter'", "did you mean 'train.iters'");
  EXPECT_DECK_ERROR(d.given("nope.x"), "unknown deck key 'nope.x'");
  EXPECT_DECK_ERROR(d.origin("nope.x"), "unknown deck key 'nope.x'");
}

TEST_F(DeckTest, ErrorBadValues) {
  EXPECT_DECK_ERROR(Deck::parse_text("[train]\niters = ten\n", "t.deck"), "bad value 'ten'", "'train.iters'",
                    "t.deck:2", "integer");
  EXPECT_DECK_ERROR(Deck::parse_text("[train]\niters = 3.5\n", "t.deck"), "'train.iters'", "integer");
  EXPECT_DECK_ERROR(Deck::parse_text("[train]\niters =\n", "t.deck"), "'train.iters'", "integer");
  EXPECT_DECK_ERROR(Deck::parse_text("[optim]\nlr = fast\n", "t.deck"), "bad value 'fast'", "'optim.lr'",
                    "t.deck:2", "number");
  EXPECT_DECK_ERROR(Deck::parse_text("[optim]\nlr = nan\n", "t.deck"), "'optim.lr'", "finite");
  EXPECT_DECK_ERROR(Deck::parse_text("[parallel]\nsp = maybe\n", "t.deck"), "bad value 'maybe'", "'parallel.sp'",
                    "t.deck:2", "bool");
  EXPECT_DECK_ERROR(Deck::parse_text("[run]\ndevice = gpu\n", "t.deck"), "bad value 'gpu'", "'run.device'",
                    "t.deck:2", "cpu|cuda");
  EXPECT_DECK_ERROR(Deck::parse_text("[run]\nattention = fast\n", "t.deck"), "bad value 'fast'", "'run.attention'",
                    "t.deck:2", "standard|flash");
  EXPECT_DECK_ERROR(Deck::parse_text("[optim]\nlr_schedule = Cosine\n", "t.deck"), "'optim.lr_schedule'",
                    "constant|cosine|multiphase");
  EXPECT_DECK_ERROR(Deck::parse_text("[log]\nlevel = verbose\n", "t.deck"), "'log.level'", "warning");
}

TEST_F(DeckTest, ErrorOutOfRange) {
  EXPECT_DECK_ERROR(Deck::parse_text("[parallel]\ntp = 0\n", "t.deck"), "bad value '0'", "'parallel.tp'",
                    "t.deck:2", ">= 1");
  EXPECT_DECK_ERROR(Deck::parse_text("[train]\niters = -5\n", "t.deck"), "'train.iters'", ">= 1");
  EXPECT_DECK_ERROR(Deck::parse_text("[train]\nglobal_batch = 0\n", "t.deck"), "'train.global_batch'");
  EXPECT_DECK_ERROR(Deck::parse_text("[parallel]\ndp = -1\n", "t.deck"), "'parallel.dp'", ">= 0");
  EXPECT_DECK_ERROR(Deck::parse_text("[optim]\nbeta1 = 1\n", "t.deck"), "'optim.beta1'", "in [0, 1)");
  EXPECT_DECK_ERROR(Deck::parse_text("[optim]\neps = 0\n", "t.deck"), "'optim.eps'", "> 0");
  EXPECT_DECK_ERROR(Deck::defaults_only({"parallel.ep=-2"}), "'parallel.ep'", "command line");
  EXPECT_DECK_ERROR(Deck::defaults_only({"run.threads=99999999999999999999"}), "'run.threads'", "integer");
  EXPECT_DECK_ERROR(Deck::defaults_only({"run.threads=99999999999"}).get<int>("run.threads"), "run.threads",
                    "int");
  Deck d = Deck::parse_text(kRequired, "t.deck");
  EXPECT_DECK_ERROR(d.get<bool>("train.iters"), "train.iters", "bool");
  EXPECT_DECK_ERROR(d.get<int>("optim.lr"), "optim.lr", "int");
  EXPECT_DECK_ERROR(d.get<double>("parallel.sp"), "parallel.sp", "double");
}

TEST_F(DeckTest, ErrorMissingRequired) {
  Deck d = Deck::parse_text("[train]\niters = 3\n", "t.deck");
  EXPECT_DECK_ERROR(d.require_keys(), "missing required key 'train.global_batch' (in section [train])",
                    "missing required key 'train.seq_length' (in section [train])");
  EXPECT_EQ(error_of([&] { d.require_keys(); }).find("'train.iters'"), std::string::npos);
}

TEST_F(DeckTest, ErrorMalformedLines) {
  std::string f = write("m.deck", "[train]\niters = 3\nthis is not a key value line\n");
  EXPECT_DECK_ERROR(Deck::parse_file(f), "malformed line", "m.deck:3", "'this is not a key value line'");
  EXPECT_DECK_ERROR(Deck::parse_text("[train\n", "t.deck"), "malformed section header", "t.deck:1", "'[train'");
  EXPECT_DECK_ERROR(Deck::parse_text("[]\n", "t.deck"), "malformed section header", "t.deck:1");
  EXPECT_DECK_ERROR(Deck::parse_text("[train] x\n", "t.deck"), "malformed section header", "t.deck:1");
  EXPECT_DECK_ERROR(Deck::parse_text("[train]\n = 3\n", "t.deck"), "malformed line", "t.deck:2");
  EXPECT_DECK_ERROR(Deck::parse_text("[run]\nname = \"abc\n", "t.deck"), "malformed line", "t.deck:2", "quote");
  EXPECT_DECK_ERROR(Deck::parse_text("[run]\nname = \"abc\" def\n", "t.deck"), "malformed line", "t.deck:2");
}

TEST_F(DeckTest, ErrorKeyBeforeSection) {
  EXPECT_DECK_ERROR(Deck::parse_text("# header\niters = 3\n[train]\n", "t.deck"), "key 'iters'", "t.deck:2",
                    "outside any section");
}

TEST_F(DeckTest, ErrorMissingInclude) {
  std::string f = write("main.deck", "[train]\niters = 3\ninclude = nothere.deck\n");
  EXPECT_DECK_ERROR(Deck::parse_file(f), "include file '" + (dir_ / "nothere.deck").string() + "' not found",
                    "main.deck:3");
  EXPECT_DECK_ERROR(Deck::parse_text("include =\n", "t.deck"), "include without a file name", "t.deck:1");
  EXPECT_DECK_ERROR(Deck::parse_file((dir_ / "absent.deck").string()), "deck file", "absent.deck", "not found");
}

TEST_F(DeckTest, ErrorBadOverride) {
  EXPECT_DECK_ERROR(Deck::defaults_only({"train.iters"}), "bad override 'train.iters'", "section.key=value");
  EXPECT_DECK_ERROR(Deck::defaults_only({"iters=3"}), "bad override 'iters=3'", "no section");
  EXPECT_DECK_ERROR(Deck::defaults_only({"=3"}), "bad override '=3'");
  EXPECT_DECK_ERROR(Deck::parse_text(kRequired, "t.deck", {"train.iter=3"}), "unknown key 'train.iter'",
                    "command line", "did you mean 'train.iters'");
  EXPECT_DECK_ERROR(Deck::parse_text(kRequired, "t.deck", {"train.iters=x"}), "bad value 'x'", "'train.iters'",
                    "command line");
}

// ---- every error path of the deck ------------------------------------------------------------------------
// Each DSV3_FAIL / DSV3_CHECK / throw of the deck code and the deck checks of the topology and the pipeline
// layout, and the test that triggers it. Messages name the key, the value and where it was set (file:line,
// "on the command line", "by default") where there is one.
//
// src/core/deck.cpp
//   Flag validate: not a bool (rethrown as 'bad value ... expected a bool')  DeckTest.ErrorBadValues
//   check_key_table: declared twice                              DeckErrorPaths.KeyTableIsChecked
//   check_key_table: no section                                  DeckErrorPaths.KeyTableIsChecked
//   check_key_table: required and has a default                  DeckErrorPaths.KeyTableIsChecked
//   default_value: bad int / float / bool default                DeckErrorPaths.KeyTableIsChecked
//   check_key_table -> check_value: default out of range / not a choice  DeckErrorPaths.KeyTableIsChecked
//   read_file: cannot read deck file (with the reason)           DeckTest.ErrorUnreadableDeckFile
//   get_field: no ':' / bad length / truncated                   DeckTest.ErrorCorruptSerializedDeck,
//                                                                FuzzRegressions.CorruptSerializedDeckIsAnError
//   parse: malformed section header (unclosed, text after it)    DeckTest.ErrorMalformedLines
//   parse: malformed section header (bad name, "[]")             DeckTest.ErrorMalformedLines
//   parse: unknown section                                       DeckTest.ErrorUnknownKey
//   parse: malformed line                                        DeckTest.ErrorMalformedLines
//   parse: unterminated quote / text after it                    DeckTest.ErrorMalformedLines
//   parse: key outside any section                               DeckTest.ErrorKeyBeforeSection
//   include: without a file name / not found                     DeckTest.ErrorMissingInclude
//   include: cycle                                               DeckTest.IncludeCycle
//   overrides: no '=' / key without a section                    DeckTest.ErrorBadOverride
//   overrides: value with a line break / unbalanced quote        FuzzRegressions.OverrideValueThatDeckTextCannotExpressIsAnError
//   set: unknown key (deck file, text, command line, serialized) DeckTest.ErrorUnknownKey, DeckTest.ErrorBadOverride,
//                                                                DeckTest.ErrorCorruptSerializedDeck
//   check_bounds: not finite / below min / above max             DeckTest.ErrorBadValues, DeckTest.ErrorOutOfRange
//   check_value: not one of the choices                          DeckTest.ErrorBadValues
//   finish: value of the wrong type (po error)                   DeckTest.ErrorBadValues, DeckTest.ErrorOutOfRange
//   parse_file: deck file not found                              DeckTest.ErrorMissingInclude
//   require_keys: missing required keys                          DeckTest.ErrorMissingRequired, DeckTest.DefaultsOnly
//   known: unknown deck key (get, given, origin, has, path)      DeckTest.ErrorUnknownKey, DeckTest.ErrorWrongTypeOrNoValue
//   get: no value (optional, not given)                          DeckTest.DefaultsAndGiven, DeckTest.DefaultsOnly
//   get: wrong type (bool, double, int, int64)                   DeckTest.ErrorOutOfRange, DeckTest.ErrorWrongTypeOrNoValue
//   get<int>: does not fit an int                                DeckTest.ErrorOutOfRange
//   deserialize: bad header / bad entry count / trailing bytes   DeckTest.ErrorCorruptSerializedDeck,
//                                                                FuzzRegressions.CorruptSerializedDeckIsAnError
// src/core/deck_keys.cpp: the table only, no error path of its own (the shipped table passes check_key_table:
//   DeckErrorPaths.KeyTableIsChecked)
// src/model/config_deck.cpp
//   model.hf_config cannot be opened (key, path, file:line, why) DeckTest.ModelConfigFromDeckErrorsNameTheDeckKey
//   model.hf_config is not valid JSON (key, path, file:line)     DeckTest.ModelConfigFromDeckErrorsNameTheDeckKey
//   the deck describes no model                                  DeckTest.ModelConfigFromDeckErrorsNameTheDeckKey
//   a model.* value the config rejects: the deck key, its value and file:line are added
//                                                                DeckTest.ModelConfigFromDeckErrorsNameTheDeckKey
// src/parallel/topology.cpp resolve_sizes (every message ends with where the keys were set)
//   tp/pp/ep/etp >= 1, dp >= 0: unreachable through a Deck (the key table's bounds reject them first:
//     DeckTest.ErrorOutOfRange); kept for ParallelSizes built by hand
//   world size < 1                                               Topology.ResolveErrorsNameTheKeyAndTheConstraint
//   world not a multiple of tp*pp / dp disagrees / tp does not divide heads, vocab, intermediate, shared experts /
//   sp needs seq_length*micro_batch % tp / ep or etp without experts / ep does not divide experts / etp does not divide the
//   expert width / ep*etp does not divide tp*dp                  Topology.ResolveErrorsNameTheKeyAndTheConstraint,
//                                                                Topology.ResolveErrorsSayWhereTheKeysWereSet
// src/pipeline/layout.cpp parse_pp_layout (every message ends with `where`, resolve_sizes passes the deck's)
//   pp < 1, num_hidden_layers < 1, num_nextn_predict_layers < 0, pp > layers (even split)  PpLayout.DefaultErrors
//   every syntax error (fail_at)                                 PpLayout.SyntaxErrors
//   stage count, E / t / m / L placement, totals (whole)         PpLayout.PlacementErrors
//   where the keys were set                                      PpLayout.ErrorsEndWithWhere,
//                                                                Topology.ResolveErrorsSayWhereTheKeysWereSet

TEST(DeckErrorPaths, KeyTableIsChecked) {
  using T = dsv3::KeySpec::Type;
  auto key = [](const char* name, T type, const char* def) {
    dsv3::KeySpec k;
    k.name = name, k.type = type, k.def = def, k.help = "h";
    return k;
  };
  EXPECT_NO_THROW(dsv3::check_key_table(dsv3::deck_keys()));
  EXPECT_NO_THROW(dsv3::check_key_table({key("a.x", T::Int, "3"), key("a.y", T::Bool, "on")}));
  EXPECT_DECK_ERROR(dsv3::check_key_table({key("a.x", T::Int, "1"), key("a.x", T::Float, "2")}),
                    "deck key 'a.x' is declared twice");
  EXPECT_DECK_ERROR(dsv3::check_key_table({key("iters", T::Int, "1")}), "deck key 'iters' has no section");
  EXPECT_DECK_ERROR(dsv3::check_key_table({key("a.", T::Int, "1")}), "deck key 'a.' has no section");
  dsv3::KeySpec req = key("a.x", T::Int, "1");
  req.required = true;
  EXPECT_DECK_ERROR(dsv3::check_key_table({req}), "deck key 'a.x' is required and has a default");
  EXPECT_DECK_ERROR(dsv3::check_key_table({key("a.x", T::Int, "ten")}),
                    "deck key 'a.x' has a bad default 'ten' (expected an integer)");
  EXPECT_DECK_ERROR(dsv3::check_key_table({key("a.x", T::Float, "fast")}),
                    "deck key 'a.x' has a bad default 'fast' (expected a number)");
  EXPECT_DECK_ERROR(dsv3::check_key_table({key("a.x", T::Bool, "maybe")}),
                    "deck key 'a.x' has a bad default 'maybe' (expected a bool)");
  dsv3::KeySpec low = key("a.x", T::Int, "0");
  low.min = 1;
  EXPECT_DECK_ERROR(dsv3::check_key_table({low}), "bad value '0' for key 'a.x' in the key table default (must be >= 1)");
  dsv3::KeySpec choice = key("a.x", T::String, "gpu");
  choice.choices = {"cpu", "cuda"};
  EXPECT_DECK_ERROR(dsv3::check_key_table({choice}),
                    "bad value 'gpu' for key 'a.x' in the key table default (expected one of cpu|cuda)");
}

TEST_F(DeckTest, ErrorUnreadableDeckFile) {
  // A deck file that exists but cannot be opened (root reads any mode, so no file descriptor is left instead).
  const std::string f = write("r.deck", kRequired);
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &old), 0);
  rlimit none = old;
  none.rlim_cur = 0;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &none), 0);
  const std::string msg = error_of([&] { Deck::parse_file(f); });
  ::setrlimit(RLIMIT_NOFILE, &old);
  EXPECT_CONTAINS(msg, "cannot read deck file '" + f + "': Too many open files");
  EXPECT_EQ(msg.find('\n'), std::string::npos);
}

TEST_F(DeckTest, ErrorCorruptSerializedDeck) {
  const std::string s = Deck::parse_text(kRequired, "t.deck").serialize();
  EXPECT_DECK_ERROR(Deck::deserialize(s + "xyz"), "corrupt serialized deck (3 trailing bytes)");
  EXPECT_DECK_ERROR(Deck::deserialize("dsv3-deck-v1"), "corrupt serialized deck (field at byte 12)");
  EXPECT_DECK_ERROR(Deck::deserialize("dsv3-deck-v1x:1"), "corrupt serialized deck (field length at byte 12)");
  EXPECT_DECK_ERROR(Deck::deserialize("dsv3-deck-v11:x"), "corrupt serialized deck (bad entry count)");
  // an entry with a key the program does not know (a deck from another version): named with its origin
  const std::string entry = "17:train.no_such_key" "1:5" "8:t.deck:7" "0:";  // key, value, origin, base dir
  EXPECT_DECK_ERROR(Deck::deserialize("dsv3-deck-v1" "1:1" + entry), "unknown key 'train.no_such_key' at t.deck:7");
}

TEST_F(DeckTest, ErrorWrongTypeOrNoValue) {
  Deck d = Deck::parse_text(kRequired, "t.deck");
  EXPECT_DECK_ERROR(d.get<int64_t>("optim.lr"), "deck key 'optim.lr' is of type float, read as int64");
  EXPECT_DECK_ERROR(d.get<bool>("run.name"), "deck key 'run.name' is of type string, read as bool");
  EXPECT_DECK_ERROR(d.has("train.iter"), "unknown deck key 'train.iter'", "did you mean 'train.iters'");
  EXPECT_DECK_ERROR(d.path("log.metric"), "unknown deck key 'log.metric'", "did you mean 'log.metrics'");
  EXPECT_DECK_ERROR(d.where_set({"parallel.tpp"}), "unknown deck key 'parallel.tpp'");
  EXPECT_EQ(Deck::parse_text("[parallel]\ntp = 2\n", "t.deck", {"parallel.pp=2"})
                .where_set({"parallel.tp", "parallel.pp", "parallel.ep", "model.hidden_size"}),
            "(parallel.tp at t.deck:2, parallel.pp on the command line, parallel.ep by default, "
            "model.hidden_size unset)");
}

TEST_F(DeckTest, ModelConfigFromDeckErrorsNameTheDeckKey) {
  const std::string tiny = std::string(DSV3_SOURCE_DIR) + "/input/models/tiny.json";
  // cannot be opened: the key, the path, where it was set and why
  std::string f = write("a.deck", std::string(kRequired) + "[model]\nhf_config = missing.json\n");
  EXPECT_DECK_ERROR(dsv3::model_config_from_deck(Deck::parse_file(f)),
                    "model.hf_config = '" + (dir_ / "missing.json").string() + "' (model.hf_config at " + f + ":6)",
                    "cannot open it: No such file or directory");
  // not valid JSON
  write("bad.json", "{\"vocab_size\": 12,");
  f = write("b.deck", std::string(kRequired) + "[model]\nhf_config = bad.json\n");
  EXPECT_DECK_ERROR(dsv3::model_config_from_deck(Deck::parse_file(f)),
                    "model.hf_config = '" + (dir_ / "bad.json").string() + "' (model.hf_config at " + f + ":6)",
                    "not valid JSON");
  // no model at all
  EXPECT_DECK_ERROR(dsv3::model_config_from_deck(Deck::parse_text(kRequired, "t.deck")),
                    "the deck describes no model", "model.hf_config");
  // a model.* value the config rejects: its deck key, value and file:line
  f = write("c.deck", std::string(kRequired) + "[model]\nhf_config = " + tiny + "\nn_group = 3\n");
  EXPECT_DECK_ERROR(dsv3::model_config_from_deck(Deck::parse_file(f)), "model key 'n_routed_experts' (8)",
                    "[model.n_group = 3 at " + f + ":7]");
  f = write("e.deck", std::string(kRequired) + "[model]\nhf_config = " + tiny + "\n");
  EXPECT_DECK_ERROR(dsv3::model_config_from_deck(Deck::parse_file(f, {"model.n_group=3"})),
                    "[model.n_group = 3 on the command line]");
  EXPECT_DECK_ERROR(dsv3::model_config_from_deck(Deck::parse_file(f, {"model.rope_scaling.factor=0.5"})),
                    "'rope_scaling.factor' must be >= 1", "[model.rope_scaling.factor = 0.5 on the command line]");
  // a value the deck did not set is named by the config file alone
  write("odd.json", "{\"vocab_size\": 512, \"hidden_size\": 0}");
  f = write("d.deck", std::string(kRequired) + "[model]\nhf_config = odd.json\n");
  const std::string msg = error_of([&] { dsv3::model_config_from_deck(Deck::parse_file(f)); });
  EXPECT_CONTAINS(msg, (dir_ / "odd.json").string() + ": model key 'hidden_size' must be > 0");
  EXPECT_EQ(msg.find('['), std::string::npos) << msg;
}

}  // namespace
