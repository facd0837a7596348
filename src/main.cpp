// dsv3: pretrain DeepSeek-V3 from an input deck.
//   dsv3 DECK [section.key=value ...]        e.g.  dsv3 input/tiny.deck train.iters=20 parallel.pp=2
// The run reads top to bottom: init -> deck -> topology -> model -> loop.
#include <algorithm>
#include <csignal>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <random>

#include <boost/program_options.hpp>

#include "core/cli.h"
#include "core/deck.h"
#include "core/error.h"
#include "core/log.h"
#include "core/memory.h"
#ifdef DSV3_HAVE_NCCL
#include "parallel/nccl_comm.h"
#endif
#include "io/hf_checkpoint.h"
#include "io/hf_export.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "ops/backend.h"
#include "ops/cpu/blas_preflight.h"
#include "parallel/comm.h"
#include "parallel/context.h"
#include "pipeline/layout.h"
#include "plan/planner.h"
#include "data/gpt_dataset.h"
#include "optim/schedule.h"
#include "train/metrics.h"
#include "train/checkpointing.h"
#include "train/trainer.h"

using namespace dsv3;
namespace po = boost::program_options;

namespace {

// SIGUSR1 (Slurm's --signal=USR1@300 before the time limit) and SIGTERM (preemption) ask the run to stop after the
// current iteration. The handler only sets this flag; every rank learns of a stop through an allreduce.
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

// A deck error: raised on every rank at once (before any collective work), so the ranks simply exit.
struct DeckFailure : Error {
  using Error::Error;
};

std::string human(double n) {
  char buf[32];
  if (n >= 1e9) std::snprintf(buf, sizeof buf, "%.2fB", n / 1e9);
  else if (n >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", n / 1e6);
  else std::snprintf(buf, sizeof buf, "%.0f", n);
  return buf;
}

// "12.3 TFLOP/s/rank MFU 31.2%" (3 significant digits: a CPU rank makes a few GFLOP/s)
std::string format_tflops(double tflops, double mfu) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3g TFLOP/s/rank MFU %.3g%%", tflops, 100 * mfu);
  return buf;
}

// " nodes/token 1.43": how many node groups a token's experts lie on (moe.nodes / moe.max_nodes), else nothing
std::string format_nodes(double nodes_per_token) {
  if (nodes_per_token <= 0) return "";
  char buf[48];
  std::snprintf(buf, sizeof buf, " nodes/token %.3g", nodes_per_token);
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
  if (failed) throw DeckFailure(comm.rank() == 0 ? error : "");  // every rank stops; rank 0 reports
  comm.bcast_string(text);
  return Deck::deserialize(text);
}

}  // namespace

int main(int argc, char** argv) {
  blas_preflight(argv);  // before anything loads work onto OpenBLAS or MPI starts
  const auto t_program = std::chrono::steady_clock::now();  // run.time_limit counts from here
  // ---- init ----------------------------------------------------------------------------------------
  Comm comm(&argc, &argv);
  // from here on, a stop request (Slurm --signal=USR1@..., preemption's SIGTERM) is remembered and honoured after
  // the current iteration instead of killing the process
  std::signal(SIGUSR1, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  try {
    po::options_description opts("usage: dsv3 DECK [section.key=value ...]\n\noptions");
    opts.add_options()("help,h", "print this help and every deck key")("version", "print the version")(
        "plan", "print the plan without running or allocating anything: exact parameter counts, memory per rank of "
                "each pipeline stage, pipeline bubble, FLOPs per token, step-time estimate (src/plan/planner.h)")(
        "ranks", po::value<int>(), "with --plan: the world size to plan for (default: the MPI world if > 1, else the "
                                   "smallest the deck's parallel sizes allow)")(
        "json", "with --plan: print the plan as JSON");
    const CommandLine cl = parse_command_line(argc, argv, opts);
    const po::variables_map& vm = cl.vm;
    if (vm.count("version")) {
      std::printf("dsv3 %s\n", DSV3_VERSION);
      return 0;
    }
    const auto& args = cl.args;
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
    if (vm.count("plan")) {
      Plan plan;
      try {  // model and layout errors are deck errors: one line from rank 0
        const ModelConfig cfg = model_config_from_deck(deck);
        const int world = vm.count("ranks") ? vm["ranks"].as<int>()
                                            : (comm.size() > 1 ? comm.size() : default_plan_world(deck));
        plan = make_plan(cfg, plan_settings_from_deck(deck, cfg, world));
      } catch (const Error& e) {
        throw DeckFailure(comm.rank() == 0 ? e.what() : "");
      }
      if (comm.rank() == 0) std::cout << (vm.count("json") ? plan_to_json(plan).dump(2) + "\n" : format_plan(plan));
      return 0;
    }

    DSV3_LOG(info) << "dsv3 " << DSV3_VERSION << ", " << comm.size() << " rank(s), deck " << args[0];
    DSV3_LOG(info) << "resolved deck:\n" << deck.resolved_text();

    // ---- topology ----------------------------------------------------------------------------------
    // The model and the layout are checked on every rank alike (pure functions of the deck and the world size):
    // their errors stop every rank at once, reported by rank 0.
    ModelConfig cfg;
    ParallelContext par;
    try {
      cfg = model_config_from_deck(deck);
      par = setup_parallel(comm, deck, cfg);  // errors name the key and the constraint
      apply_node_limited_routing(comm, deck, par, cfg);
    } catch (const Error& e) {
      throw DeckFailure(comm.rank() == 0 ? e.what() : "");
    }
    DSV3_LOG(info) << "layout: " << format_sizes(par.sizes);
    if (par.sizes.pp > 1) {
      DSV3_LOG(info) << "pipeline: "
                     << format_layout(parse_pp_layout(deck.get<std::string>("parallel.pp_layout"), par.sizes.pp,
                                                      (int)cfg.num_hidden_layers, (int)cfg.num_nextn_predict_layers));
    }

    // ---- model -------------------------------------------------------------------------------------
    const ParamCounts pc = count_params(cfg);
    DSV3_LOG(info) << "model " << cfg.source << ": " << cfg.num_hidden_layers << " layers ("
                   << cfg.first_k_dense_replace << " dense), hidden " << cfg.hidden_size << ", " << cfg.n_routed_experts
                   << " routed experts top-" << cfg.num_experts_per_tok << "; parameters: main " << pc.main << " ("
                   << human(pc.main) << "), MTP " << pc.mtp << ", activated/token " << human(pc.activated);
    const int64_t memory_base = memory_rss_bytes();  // the process before any model buffer (MPI, libraries)
    auto be = make_backend(deck);
    // run.device = cuda with several ranks: the float collectives (gradients, tensor-parallel sums, the MoE all-to-all)
    // over NCCL on the device buffers, the rest over MPI (parallel/comm.h)
    std::unique_ptr<DeviceTransport> device_comm;
    if (be->name() == "cuda" && comm.size() > 1) {
#ifdef DSV3_HAVE_NCCL
      device_comm = make_nccl_transport(comm);
      comm.set_device_transport(device_comm.get());
      DSV3_LOG(info) << "collectives: NCCL for the float tensors on the GPUs, MPI for the rest";
#else
      DSV3_LOG(warning) << "this dsv3 was built without nccl.h: the collectives of run.device = cuda go over MPI "
                           "through host memory (slow)";
#endif
    }
    // one rank's peak (plan.*) and the model FLOPs of a training sequence (the planner's count): TFLOP/s and MFU
    const double peak_tflops = plan_settings_from_deck(deck, cfg, comm.size()).device_tflops;
    Model model(cfg, *be, par.ep, par.stage, par.tp);  // this rank's pipeline stage and experts only
    model.set_selective_recompute(deck.get<std::string>("train.recompute") == "selective");
    if (deck.given("model.hf_weights")) {
      DSV3_LOG(info) << "loading weights from " << deck.path("model.hf_weights");
      model.load_hf(HfCheckpoint(deck.path("model.hf_weights"), cfg.fp8_block));
    } else {
      model.init_random((uint64_t)deck.get<int64_t>("train.seed"));  // the same numbers under any layout
    }

    // ---- data ---------------------------------------------------------------------------------------
    // A sample is seq_length+1 tokens (Megatron): the model reads the first seq_length and predicts the next token
    // at every position (labels = the sample shifted by one).
    const Schedule sched = Schedule::from_deck(deck);
    const int64_t iters = deck.get<int64_t>("train.iters"), S = deck.get<int64_t>("train.seq_length");
    const double flops_per_sequence = model_flops_per_sequence(cfg, S).total();
    DSV3_CHECK(S <= cfg.max_position_embeddings, "train.seq_length (" << S << ") exceeds max_position_embeddings ("
                                                                      << cfg.max_position_embeddings << ")");
    int64_t total_samples = 0;
    for (int64_t it = 0; it < iters; ++it) total_samples += sched.batch_at((double)total_samples * S);
    auto train_data = make_dataset(deck, "train", total_samples, S, cfg.vocab_size);
    const int64_t eval_interval = deck.get<int64_t>("train.eval_interval"), eval_iters = deck.get<int64_t>("train.eval_iters");
    std::unique_ptr<TokenSource> valid_data;
    if (eval_interval > 0 && eval_iters > 0)
      valid_data = make_dataset(deck, "valid", eval_iters * sched.global_batch, S, cfg.vocab_size);

    // ---- loop --------------------------------------------------------------------------------------
    Trainer trainer(model, TrainerConfig::from_deck(deck), &comm, be.get());  // the optimizer on the run's backend
    MetricsWriter metrics;  // opened once we know whether the run resumes
    const int64_t log_interval = deck.get<int64_t>("log.interval");
    std::vector<int64_t> sample(S + 1), tokens, labels;
    // this data-parallel rank's share of the global batch of samples first..first+B -> tokens, labels (n, S)
    auto fill = [&](const TokenSource& src, int64_t first, int64_t B) {
      const auto [b0, b1] = dp_slice(B, par.dp(), par.dp_rank());
      const int64_t n = b1 - b0;
      tokens.resize(n * S);
      labels.resize(n * S);
      for (int64_t b = 0; b < n; ++b) {
        src.get(first + b0 + b, sample.data());
        std::copy_n(sample.begin(), S, tokens.begin() + b * S);
        std::copy_n(sample.begin() + 1, S, labels.begin() + b * S);
      }
      return n;
    };
    auto evaluate = [&](int64_t it) {
      Losses v;
      for (int64_t k = 0; k < eval_iters; ++k) {
        const int64_t n = fill(*valid_data, k * sched.global_batch, sched.global_batch);
        const Losses l = trainer.evaluate(tokens.data(), n, S, sched.mtp_lambda_at(0), labels.data(), sched.global_batch);
        v.lm += l.lm / eval_iters, v.mtp += l.mtp / eval_iters;
      }
      DSV3_LOG(info) << "validation at iteration " << it << ": lm_loss " << v.lm << " (ppl " << std::exp(v.lm)
                     << ") mtp_loss " << v.mtp;
      metrics.write({{"iteration", it}, {"valid_lm_loss", v.lm}, {"valid_mtp_loss", v.mtp}});
    };
    // ---- checkpoints (train/checkpointing.h): resume per checkpoint.load, save at the hook below --------------
    Checkpointing ckpt(deck, comm, format_sizes(par.sizes));
    const TrainState resumed = ckpt.resume(model.params(), trainer.optimizer());
    // a resumed run continues its metrics file; a fresh one starts it anew
    metrics = MetricsWriter(comm.rank() == 0 ? deck.path("log.metrics") : "", resumed.iteration > 0);
    // ---- end checkpoints ----------------------------------------------------------------------------------------

    int64_t consumed_samples = resumed.consumed_samples, skipped_steps = 0;
    const double time_limit = deck.get<double>("run.time_limit");
    double slowest_step = 0;
    int64_t pool_after_first = -1;  // system allocations of the tensor memory after the first iteration
    const auto t_start = std::chrono::steady_clock::now();
    for (int64_t it = resumed.iteration; it < iters; ++it) {
      const double consumed_tokens = (double)consumed_samples * S;
      const int64_t B = sched.batch_at(consumed_tokens);
      const int64_t n_local = fill(*train_data, consumed_samples, B);
      const auto t0 = std::chrono::steady_clock::now();
      const CommTimes c0 = comm.times();
      const StepStats st = trainer.step(tokens.data(), n_local, S, sched.lr_at(it, consumed_tokens),
                                        sched.mtp_lambda_at(consumed_tokens), sched.gamma_at(consumed_tokens),
                                        labels.data(), B);
      const CommTimes ct = comm.times() - c0;
      if (st.skipped) {  // train.on_nan: skip the step (up to a limit) or stop with the last good state saved
        ++skipped_steps;
        const bool stop = deck.get<std::string>("train.on_nan") == "stop" ||
                          skipped_steps > deck.get<int64_t>("train.max_skipped_steps");
        DSV3_LOG(warning) << "iteration " << it + 1 << ": NaN/Inf in the loss (" << st.loss.total
                          << ") or the gradients (norm " << st.grad_norm << "): step skipped (" << skipped_steps
                          << " so far)" << (stop ? "; stopping" : "");
        metrics.write({{"iteration", it + 1}, {"skipped", true}, {"skipped_steps", skipped_steps}});
        if (stop) {
          ckpt.after_iteration({it, consumed_samples, (double)consumed_samples * S}, true, model.params(),
                               trainer.optimizer());  // the last good state (the update was not made)
          DSV3_FAIL("stopped at iteration " << it + 1 << " after a NaN/Inf (train.on_nan = "
                                            << deck.get<std::string>("train.on_nan") << ", " << skipped_steps
                                            << " step(s) skipped); the last good state is checkpointed if "
                                               "checkpoint.dir is set");
        }
        consumed_samples += B;  // the batch is consumed: a skipped step does not replay it
        continue;
      }
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      consumed_samples += B;
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
      const double tok_s = B * S / dt;
      const double tflops = flops_per_sequence * B / dt / comm.size() / 1e12, mfu = tflops / peak_tflops;
      // expert-load imbalance per MoE layer: max load / mean load (1 = perfectly balanced)
      nlohmann::json imbalance = nlohmann::json::object();
      double worst = 0;
      for (const auto& [layer, load] : st.expert_load) {
        double mx = 0, sum = 0;
        for (int64_t c : load) mx = std::max(mx, (double)c), sum += (double)c;
        const double r = sum > 0 ? mx / (sum / load.size()) : 0;
        imbalance[std::to_string(layer)] = r;
        worst = std::max(worst, r);
      }
      if ((it + 1) % log_interval == 0 || it == 0 || it + 1 == iters)
        DSV3_LOG(info) << "iter " << it + 1 << "/" << iters << " | lm " << st.loss.lm << " mtp " << st.loss.mtp
                       << " aux " << st.loss.aux << " | lr " << st.lr << " | grad norm " << st.grad_norm
                       << (st.clip_coef < 1 ? " (clipped)" : "") << " | " << (int64_t)tok_s << " tok/s "
                       << format_tflops(tflops, mfu) << " | load max/mean " << worst
                       << format_nodes(st.nodes_per_token)
                       << " | time compute " << dt - ct.total() << "s ep a2a " << ct.ep << "s pp wait "
                       << ct.pp << "s dp " << ct.dp + ct.edp << "s | ETA "
                       << format_duration(elapsed / (it + 1 - resumed.iteration) * (iters - it - 1));
      metrics.write({{"iteration", it + 1},
                     {"lm_loss", st.loss.lm},
                     {"mtp_loss", st.loss.mtp},
                     {"aux_loss", st.loss.aux},
                     {"total_loss", st.loss.total},
                     {"grad_norm", st.grad_norm},
                     {"clip_coef", st.clip_coef},
                     {"lr", st.lr},
                     {"mtp_lambda", st.mtp_lambda},
                     {"bias_update_rate", st.gamma},
                     {"batch_size", B},
                     {"tokens_per_s", tok_s},
                     {"tflops_per_rank", tflops},
                     {"mfu", mfu},
                     {"step_s", dt},
                     {"time_ep_alltoall_s", ct.ep},
                     {"time_dp_s", ct.dp + ct.edp},
                     {"time_pp_wait_s", ct.pp},
                     {"time_compute_s", dt - ct.total()},
                     {"consumed_samples", consumed_samples},
                     {"consumed_tokens", (double)consumed_samples * S},
                     {"expert_load_max_over_mean", imbalance},
                     {"expert_nodes_per_token", st.nodes_per_token},
                     {"memory_rss_bytes", memory_rss_bytes()},
                     {"memory_peak_bytes", memory_peak_bytes()},
                     {"memory_base_bytes", memory_base},
                     {"pool_live_bytes", default_memory().stats().live_bytes},
                     {"pool_held_bytes", default_memory().stats().held_bytes},
                     {"pool_system_allocations", default_memory().stats().system_allocations}});
      // the steady-state loop allocates nothing from the system: counted from the end of the first iteration
      if (pool_after_first < 0) {
        pool_after_first = default_memory().stats().system_allocations;
        be->reset_profile();  // DSV3_OP_PROFILE: the steady state only
      }
      if (valid_data && ((it + 1) % eval_interval == 0 || it + 1 == iters)) evaluate(it + 1);
      // checkpoint hook: every checkpoint.interval iterations and at the end (train/checkpointing.h)
      // preemption and time limit: all ranks agree to stop after this iteration, save, and exit 0 (the job requeues
      // and checkpoint.load = auto continues from here)
      slowest_step = std::max(slowest_step, dt);
      const double used = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_program).count();
      const bool out_of_time = time_limit > 0 && used + 2 * slowest_step > time_limit;
      const bool stop_now = it + 1 < iters && comm.any(g_stop_signal != 0 || out_of_time);
      ckpt.after_iteration({it + 1, consumed_samples, (double)consumed_samples * S}, it + 1 == iters || stop_now,
                           model.params(), trainer.optimizer());
      if (stop_now) {
        DSV3_LOG(warning) << "stopping after iteration " << it + 1 << " ("
                          << (g_stop_signal ? (g_stop_signal == SIGUSR1 ? "SIGUSR1" : "SIGTERM") : "run.time_limit")
                          << (deck.get<std::string>("checkpoint.dir").empty()
                                  ? "): no checkpoint.dir, so the state is not saved"
                                  : "): state saved; checkpoint.load = auto resumes from it");
        return 0;
      }
    }
    if (deck.given("checkpoint.export_hf") && !deck.get<std::string>("checkpoint.export_hf").empty()) {
      const Params full = gather_experts(model.params(), comm);  // collective: every rank takes part
      if (comm.rank() == 0) {
        const std::string dir = deck.path("checkpoint.export_hf");
        const int n = write_hf_checkpoint(dir, cfg, full, {deck.get<std::string>("checkpoint.export_dtype")});
        DSV3_LOG(info) << "exported the model to " << dir << " (" << n << " safetensors shard(s), "
                       << deck.get<std::string>("checkpoint.export_dtype") << ")";
      }
    }
    DSV3_LOG(info) << "done: " << iters << " iterations, " << consumed_samples << " samples in "
                   << format_duration(std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count())
                   << "; peak memory " << memory_peak_bytes() / (1 << 20) << " MiB";
    const MemoryResource::Stats pool = default_memory().stats();
    DSV3_LOG(info) << "tensor memory (" << default_memory().name() << "): peak " << (pool.peak_live_bytes >> 20)
                   << " MiB live, " << (pool.held_bytes >> 20) << " MiB held, " << pool.system_allocations
                   << " system allocations (" << (pool_after_first < 0 ? 0 : pool.system_allocations - pool_after_first)
                   << " after the first iteration)";
    return 0;
  } catch (const DeckFailure& e) {
    if (e.what()[0]) std::fprintf(stderr, "dsv3: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    if (e.what()[0]) std::fprintf(stderr, "dsv3: error on rank %d: %s\n", comm.rank(), e.what());
    // Other ranks may be waiting in a collective for this one: take the whole job down instead of leaving them
    // blocked (the deck is checked on every rank before any collective work, so its errors never get here alone).
    if (comm.size() > 1) {
      std::fflush(stderr);
      comm.abort(1);
    }
    return 1;
  }
}
