// defines: dsv3::Checkpointing — the training loop's use of HDF5 checkpoints (io/checkpoint.h) from the deck's
// [checkpoint] keys: resume before the loop, save at the loop's checkpoint hook.
//   checkpoint.dir       where iter_0000123.h5 and `latest` live ("" : no saves)
//   checkpoint.interval  save every n iterations (0: only at the end); with a dir, the last iteration is always saved
//   checkpoint.keep      keep the newest n checkpoints (0: all)
//   checkpoint.load      "" : start fresh | auto : newest good one in checkpoint.dir (falling back to older ones when
//                        the newest is corrupt; fresh when there is none) | a checkpoint file or directory
//   checkpoint.finetune  weights only: fresh optimizer, iteration 0, data from the start
// On resume the data position is consumed_samples (the loop indexes samples by it) and the only random state is
// train.seed (the data order and the initialisation are pure functions of it).
#pragma once
#include <cstdint>
#include <string>

#include "io/checkpoint.h"

namespace dsv3 {

class Comm;
class Deck;

class Checkpointing {
 public:
  // layout: a description of the run's parallel layout (format_sizes), stored for information
  Checkpointing(const Deck& deck, const Comm& comm, std::string layout);
  // Before the loop (collective): loads per checkpoint.load into params and opt; returns where to continue from
  // (all zero: from scratch).
  TrainState resume(Params& params, AdamW& opt);
  // At the loop's checkpoint hook, after iteration state.iteration (collective): saves every interval iterations
  // and at the last one.
  void after_iteration(const TrainState& state, bool last, const Params& params, const AdamW& opt);

 private:
  const Comm& comm_;
  std::string dir_, load_, deck_text_, layout_;
  int64_t interval_ = 0, keep_ = 0, seed_ = 0, last_saved_ = -1;
  bool finetune_ = false;
};

}  // namespace dsv3
