// dsv3: pretrain DeepSeek-V3 from an input deck.
//   dsv3 DECK [section.key=value ...]        e.g.  dsv3 input/tiny.deck train.iters=20 parallel.pp=2
// The run reads top to bottom: init -> deck -> topology -> model -> loop.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>

#include <boost/program_options.hpp>

#include "core/deck.h"
#include "core/error.h"
#include "core/log.h"
#include "io/hf_checkpoint.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "ops/backend.h"
#include "parallel/comm.h"

using namespace dsv3;
namespace po = boost::program_options;

namespace {

std::string human(double n) {
  char buf[32];
  if (n >= 1e9) std::snprintf(buf, sizeof buf, "%.2fB", n / 1e9);
  else if (n >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", n / 1e6);
  else std::snprintf(buf, sizeof buf, "%.0f", n);
  return buf;
}

// Rank 0 reads the deck (and its includes) and broadcasts it; a deck error stops every rank with rank 0's message.
Deck read_deck(const Comm& comm, const std::string& path, const std::vector<std::string>& overrides) {
  std::string text, error;
  if (comm.rank() == 0) {
    try {
      Deck d = Deck::parse_file(path, overrides);
      d.require_keys();
      text = d.serialize();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  const bool failed = comm.any(!error.empty());
  if (failed) {
    if (comm.rank() == 0) throw Error(error);
    throw Error("");  // rank 0 reports
  }
  comm.bcast_string(text);
  return Deck::deserialize(text);
}

}  // namespace

int main(int argc, char** argv) {
  // ---- init ----------------------------------------------------------------------------------------
  Comm comm(&argc, &argv);
  try {
    po::options_description opts("usage: dsv3 DECK [section.key=value ...]\n\noptions");
    opts.add_options()("help,h", "print this help and every deck key")("version", "print the version");
    po::options_description hidden;
    hidden.add_options()("args", po::value<std::vector<std::string>>()->default_value({}, ""), "");
    po::options_description all;
    all.add(opts).add(hidden);
    po::positional_options_description pos;
    pos.add("args", -1);
    po::variables_map vm;
    po::store(po::command_line_parser(argc, argv).options(all).positional(pos).run(), vm);
    po::notify(vm);
    if (vm.count("version")) {
      std::printf("dsv3 %s\n", DSV3_VERSION);
      return 0;
    }
    const auto args = vm["args"].as<std::vector<std::string>>();
    if (vm.count("help") || args.empty()) {
      if (comm.rank() == 0)
        std::cout << opts << "\nA deck is [section] headers, key = value lines, # comments and include = FILE;\n"
                  << "trailing section.key=value arguments override it. Paths are relative to the deck file.\n\n"
                  << "deck keys:\n" << Deck::help();
      return vm.count("help") ? 0 : 2;
    }
    log::init(comm.rank());

    // ---- deck --------------------------------------------------------------------------------------
    const Deck deck = read_deck(comm, args[0], std::vector<std::string>(args.begin() + 1, args.end()));
    log::init(comm.rank(), log::parse_level(deck.get<std::string>("log.level")), deck.get<bool>("log.all_ranks"));
    DSV3_LOG(info) << "dsv3 " << DSV3_VERSION << ", " << comm.size() << " rank(s), deck " << args[0];
    DSV3_LOG(info) << "resolved deck:\n" << deck.resolved_text();

    // ---- topology ----------------------------------------------------------------------------------
    const int64_t tp = deck.get<int64_t>("parallel.tp"), pp = deck.get<int64_t>("parallel.pp"),
                  ep = deck.get<int64_t>("parallel.ep");
    DSV3_CHECK(comm.size() == 1 && tp == 1 && pp == 1 && ep == 1,
               "parallel layouts (here " << comm.size() << " ranks, tp=" << tp << " pp=" << pp << " ep=" << ep
                                         << ") are not implemented yet: run one rank with parallel.tp=pp=ep=1");

    // ---- model -------------------------------------------------------------------------------------
    const ModelConfig cfg = model_config_from_deck(deck);
    const ParamCounts pc = count_params(cfg);
    DSV3_LOG(info) << "model " << cfg.source << ": " << cfg.num_hidden_layers << " layers ("
                   << cfg.first_k_dense_replace << " dense), hidden " << cfg.hidden_size << ", " << cfg.n_routed_experts
                   << " routed experts top-" << cfg.num_experts_per_tok << "; parameters: main " << pc.main << " ("
                   << human(pc.main) << "), MTP " << pc.mtp << ", activated/token " << human(pc.activated);
    auto be = make_backend(deck.get<std::string>("run.device"), deck.get<int>("run.threads"));
    Model model(cfg, *be);
    if (deck.given("model.hf_weights")) {
      DSV3_LOG(info) << "loading weights from " << deck.path("model.hf_weights");
      model.load_hf(HfCheckpoint(deck.path("model.hf_weights"), cfg.fp8_block));
    } else {
      model.init_random((uint64_t)deck.get<int64_t>("train.seed"));
    }

    // ---- loop --------------------------------------------------------------------------------------
    // The training loop (backward, optimizer, data) is the next issue; until then dsv3 evaluates the losses of
    // the model on a seeded random batch so that the deck, the model and the backend are exercised end to end.
    const int64_t B = deck.get<int64_t>("train.micro_batch"), S = deck.get<int64_t>("train.seq_length");
    DSV3_CHECK(S <= cfg.max_position_embeddings, "train.seq_length (" << S << ") exceeds max_position_embeddings ("
                                                                      << cfg.max_position_embeddings << ")");
    std::mt19937_64 rng((uint64_t)deck.get<int64_t>("train.seed"));
    std::vector<int64_t> tokens(B * S);
    for (auto& t : tokens) t = (int64_t)(rng() % (uint64_t)cfg.vocab_size);
    const auto t0 = std::chrono::steady_clock::now();
    const Losses L = model.forward(tokens.data(), B, S, deck.get<double>("train.mtp_lambda"),
                                   deck.get<double>("train.aux_alpha"));
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    DSV3_LOG(info) << "forward on a random batch " << B << "x" << S << ": lm_loss " << L.lm << " mtp_loss " << L.mtp
                   << " aux_loss " << L.aux << " total " << L.total << " (" << (B * S) / sec << " tokens/s)";
    DSV3_LOG(warning) << "training (backward, optimizer, data) is not implemented yet: forward evaluation only";
    return 0;
  } catch (const std::exception& e) {
    if (e.what()[0]) std::fprintf(stderr, "dsv3: error: %s\n", e.what());
    return 1;
  }
}
