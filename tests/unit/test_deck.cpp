// Unit tests of dsv3::Deck: syntax, includes, overrides, typing, origins, text forms and every error.
#include "test_util.h"
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include "core/deck.h"
#include "core/error.h"

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

}  // namespace
