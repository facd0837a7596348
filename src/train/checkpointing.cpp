#include "train/checkpointing.h"

#include "core/deck.h"
#include "core/error.h"
#include "core/log.h"
#include "parallel/comm.h"

namespace dsv3 {

Checkpointing::Checkpointing(const Deck& deck, const Comm& comm, std::string layout)
    : comm_(comm), layout_(std::move(layout)) {
  dir_ = deck.path("checkpoint.dir");
  interval_ = deck.get<int64_t>("checkpoint.interval");
  keep_ = deck.get<int64_t>("checkpoint.keep");
  finetune_ = deck.get<bool>("checkpoint.finetune");
  seed_ = deck.get<int64_t>("train.seed");
  deck_text_ = deck.resolved_text();
  // "auto" is a mode, not a path: read the raw text first (Deck::path would resolve it against the deck's dir)
  const std::string raw = deck.get<std::string>("checkpoint.load");
  load_ = (raw.empty() || raw == "auto") ? raw : deck.path("checkpoint.load");
  DSV3_CHECK(load_ != "auto" || !dir_.empty(), "checkpoint.load = auto needs checkpoint.dir");
  if (interval_ > 0 && dir_.empty())
    DSV3_LOG(warning) << "checkpoint.interval is " << interval_ << " but checkpoint.dir is empty: nothing is saved";
}

TrainState Checkpointing::resume(Params& params, AdamW& opt) {
  if (load_.empty()) return {};
  const bool auto_mode = load_ == "auto";
  const auto r = resume_checkpoint(auto_mode ? dir_ : load_, auto_mode, &comm_, params, &opt, finetune_);
  if (!r) {
    DSV3_LOG(info) << "checkpoint.load = auto: no checkpoint in " << dir_ << ", starting from scratch";
    return {};
  }
  const TrainState& s = r->state;
  // a fine-tune starts its own data order, and converted checkpoints (rng_seed < 0) never had one
  if (s.rng_seed != seed_ && !finetune_ && s.rng_seed >= 0)
    DSV3_LOG(warning) << "checkpoint " << r->path << " was written with train.seed " << s.rng_seed << ", this run has "
                      << seed_ << ": the data order differs from the run that wrote it";
  if (finetune_) {
    DSV3_LOG(info) << "fine-tuning from the weights of " << r->path << " (iteration " << s.iteration
                   << "): fresh optimizer, iteration 0";
    return {};
  }
  DSV3_LOG(info) << "resumed from " << r->path << ": iteration " << s.iteration << ", " << s.consumed_samples
                 << " samples (" << s.consumed_tokens << " tokens) consumed, Adam step " << opt.t();
  last_saved_ = s.iteration;  // that state is on disk already
  return s;
}

void Checkpointing::after_iteration(const TrainState& state, bool last, const Params& params, const AdamW& opt) {
  if (dir_.empty() || state.iteration == last_saved_) return;
  if (!(last || (interval_ > 0 && state.iteration % interval_ == 0))) return;
  TrainState s = state;
  s.rng_seed = seed_;
  save_checkpoint(dir_, &comm_, params, &opt, s, deck_text_, layout_, keep_);
  last_saved_ = state.iteration;
}

}  // namespace dsv3
