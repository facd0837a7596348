// dsv3-generate: text generation from a DeepSeek-V3 model with the MLA latent KV cache.
//   dsv3-generate --hf DIR (--prompt-ids 1,2,3 | --prompt TEXT [--tokenizer tokenizer.json]) [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]
//                 [--no-cache] [section.key=value ...]
// Prints the prompt ids and the generated ids; with --temperature 0 (default) decoding is greedy.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <optional>
#include <random>
#include <sstream>

#include <boost/program_options.hpp>

#include "core/cli.h"
#include "core/deck.h"
#include "core/error.h"
#include "data/tokenizer.h"
#include "io/checkpoint.h"
#include "io/convert.h"
#include "io/hf_checkpoint.h"
#include "model/config.h"
#include "model/model.h"
#include "model/sampling.h"
#include "ops/backend.h"
#include "ops/cpu/blas_preflight.h"
#include "parallel/comm.h"
#include "parallel/context.h"

using namespace dsv3;
namespace po = boost::program_options;

namespace {
std::vector<int64_t> parse_ids(const std::string& s) {
  std::vector<int64_t> ids;
  std::stringstream ss(s);
  for (std::string tok; std::getline(ss, tok, ',');) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(tok, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    DSV3_CHECK(used == tok.size() && !tok.empty() && v >= 0, "--prompt-ids: '" << tok << "' is not a token id");
    ids.push_back(v);
  }
  DSV3_CHECK(!ids.empty(), "--prompt-ids: no token ids given");
  return ids;
}
}  // namespace

int main(int argc, char** argv) {
  blas_preflight(argv);  // before anything loads work onto OpenBLAS or MPI starts
  Comm comm(&argc, &argv);
  try {
    po::options_description opts("dsv3-generate --hf DIR --prompt-ids IDS [options] [section.key=value ...]");
    opts.add_options()("help,h", "print this help")(
        "hf", po::value<std::string>(), "Hugging Face model directory (config.json + model.safetensors or a sharded "
                                        "index; BF16/FP32 or the released FP8 weights)")(
        "ckpt", po::value<std::string>(), "a dsv3 HDF5 checkpoint file or directory (its `latest`) instead of --hf: "
                                          "a training checkpoint or one converted by dsv3-hftoh5")(
        "prompt-ids", po::value<std::string>(), "comma-separated prompt token ids, e.g. 1,2,3")(
        "prompt", po::value<std::string>(), "prompt text (encoded with --tokenizer); the output is decoded to text")(
        "tokenizer", po::value<std::string>(), "a Hugging Face tokenizer.json (default: DIR/tokenizer.json)")(
        "max-new-tokens", po::value<int64_t>()->default_value(32), "tokens to generate")(
        "temperature", po::value<double>()->default_value(0.0), "sampling temperature; 0 = greedy")(
        "top-p", po::value<double>()->default_value(1.0), "nucleus sampling mass in (0, 1]")(
        "seed", po::value<uint64_t>()->default_value(1234), "sampling seed")(
        "stop-at-eos", po::bool_switch(), "stop when the model's eos_token_id is generated")(
        "no-cache", po::bool_switch(), "recompute the whole sequence at every step instead of using the MLA latent "
                                      "KV cache (for checking; quadratic cost)");
    const CommandLine cl = parse_command_line(argc, argv, opts);
    const po::variables_map& vm = cl.vm;
    if (vm.count("help")) {
      std::cout << opts << "\n  section.key=value       deck overrides, e.g. run.threads=2 run.device=cpu\n";
      return 0;
    }
    DSV3_CHECK(vm.count("hf") + vm.count("ckpt") == 1, "give exactly one of --hf DIR and --ckpt CKPT (see --help)");
    DSV3_CHECK(vm.count("prompt-ids") + vm.count("prompt") == 1, "give exactly one of --prompt-ids and --prompt");
    const Deck deck = Deck::defaults_only(cl.args);
    const std::string dir = vm.count("hf") ? vm["hf"].as<std::string>() : "";
    std::string ckpt_file;
    if (vm.count("ckpt")) {
      const auto found = find_checkpoint(vm["ckpt"].as<std::string>(), false);
      DSV3_CHECK(found, "--ckpt: no checkpoint at '" << vm["ckpt"].as<std::string>() << "'");
      ckpt_file = *found;
    }
    std::optional<Tokenizer> tok;
    if (vm.count("prompt") || vm.count("tokenizer")) {
      DSV3_CHECK(vm.count("tokenizer") || !dir.empty(), "--prompt with --ckpt needs --tokenizer");
      const std::string path = vm.count("tokenizer") ? vm["tokenizer"].as<std::string>() : dir + "/tokenizer.json";
      tok = Tokenizer::load(path);
    }
    const auto prompt = vm.count("prompt") ? tok->encode(vm["prompt"].as<std::string>())
                                           : parse_ids(vm["prompt-ids"].as<std::string>());
    DSV3_CHECK(!prompt.empty(), "--prompt: the text encodes to no tokens");
    const int64_t n_new = vm["max-new-tokens"].as<int64_t>();
    DSV3_CHECK(n_new >= 0, "--max-new-tokens must be >= 0");
    SamplerOptions so{vm["temperature"].as<double>(), vm["top-p"].as<double>()};

    ModelConfig cfg =
        ckpt_file.empty() ? model_config_from_file(dir + "/config.json") : checkpoint_model_config(CheckpointFileReader(ckpt_file));
    cfg.validate();
    for (int64_t id : prompt)
      DSV3_CHECK(id < cfg.vocab_size, "--prompt-ids: token " << id << " >= vocab_size " << cfg.vocab_size);
    DSV3_CHECK((int64_t)prompt.size() + n_new <= cfg.max_position_embeddings,
               "prompt + new tokens (" << prompt.size() + n_new << ") exceed max_position_embeddings "
                                       << cfg.max_position_embeddings);
    auto be = make_backend(deck);
    // under mpirun: the experts are spread over the ranks (parallel.ep=N); every rank runs the same sequence and
    // rank 0's choice of each token is broadcast, so the ranks never disagree about what to feed next
    const ParallelContext par = setup_parallel(comm, deck, cfg);
    apply_node_limited_routing(comm, deck, par, cfg);  // moe.max_nodes: the routing rule a run trained with
    Model model(cfg, *be, par.ep, par.stage, par.tp);
    if (ckpt_file.empty())
      model.load_hf(HfCheckpoint(dir, cfg.fp8_block));
    else  // weights only; each rank reads its own experts / pipeline stage (the file is layout-independent)
      load_checkpoint(ckpt_file, &comm, model.params(), nullptr, true);

    std::mt19937_64 rng(vm["seed"].as<uint64_t>());
    std::vector<int64_t> seq = prompt, out;
    const auto t0 = std::chrono::steady_clock::now();
    const bool use_cache = !vm["no-cache"].as<bool>();
    KvCache cache;
    std::vector<float> lg;
    if (use_cache) {
      cache = model.make_cache((int64_t)prompt.size() + n_new);
      lg = model.forward_cached(prompt.data(), (int64_t)prompt.size(), cache);
    }
    for (int64_t s = 0; s < n_new; ++s) {
      if (!use_cache) {
        const auto all_lg = model.logits(seq.data(), 1, (int64_t)seq.size());
        lg.assign(all_lg.end() - cfg.vocab_size, all_lg.end());
      }
      int64_t tok = sample_token(lg.data(), cfg.vocab_size, so, rng);
      comm.broadcast(GroupKind::world, &tok, 1);
      out.push_back(tok);
      seq.push_back(tok);
      if (vm["stop-at-eos"].as<bool>() && tok == cfg.eos_token_id) break;
      if (use_cache && s + 1 < n_new) lg = model.forward_cached(&tok, 1, cache);
    }
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (comm.rank() != 0) return 0;
    std::printf("prompt:");
    for (auto t : prompt) std::printf(" %lld", (long long)t);
    std::printf("\ngenerated:");
    for (auto t : out) std::printf(" %lld", (long long)t);
    std::printf("\n");
    if (tok) std::printf("text: %s%s\n", tok->decode(prompt).c_str(), tok->decode(out).c_str());
    std::fflush(stdout);
    std::fprintf(stderr, "%zu tokens in %.3f s (%.1f tokens/s, %s)\n", out.size(), sec, out.size() / std::max(sec, 1e-9),
                 use_cache ? "MLA latent cache" : "no cache");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3-generate: error: %s\n", e.what());
    return 2;
  }
}
