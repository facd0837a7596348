// defines: TrainState, CheckpointInfo, SaveResult, save_checkpoint, load_checkpoint, resume_checkpoint,
//          find_checkpoint, verify_checkpoint, read_checkpoint_info, list_checkpoints, read_latest,
//          checkpoint_file_name, checkpoint_checksum (the per-dataset hash), set_checkpoint_io_chunk,
//          CheckpointDataset, CheckpointFileWriter / CheckpointFileReader (streaming, for the converters)
// The HDF5 training checkpoint: one file per checkpoint, written collectively with MPI-IO (parallel HDF5), every
// tensor in its GLOBAL, unsharded shape, so that the file does not depend on the layout that wrote it and any
// layout (dp, ep) reads it back by selecting its own hyperslabs. This file and checkpoint.cpp are the only code
// that calls HDF5; every HDF5 call is checked and a failure names the file and the dataset.
//
// ---- File layout (format_version 1) ----------------------------------------------------------------------------
//   /model/<param name>                 every parameter of the table (expert biases included), global shape, fp32
//                                       (the storage dtype); routed experts stacked [n_experts, out, in]
//   /optim/master/<param name>          trainable parameters only: FP32 master weights  } global shapes, fp32,
//   /optim/exp_avg/<param name>         Adam first moment (BF16 moments stored exactly) } from the ZeRO-1
//   /optim/exp_avg_sq/<param name>      Adam second moment                              } shards
//   attributes of /: format_version, dsv3_version, iteration, consumed_samples, consumed_tokens, adam_t,
//     rng_seed, rng_state (text: the data order and the initialisation are pure functions of the seed; the
//     data position is consumed_samples), deck (the resolved deck), layout (the writer's, for information only),
//     moment_dtype (of the writer's optimizer), checksum_algorithm (text)
//   attribute of every dataset: checksum (uint64, see checkpoint_checksum)
// Datasets are contiguous (no chunking, no compression). Each element is written by exactly one rank: a dense
// parameter by the rank with dp-group rank 0, a rank's slice of a stacked expert tensor by the rank with
// edp-group rank 0 among those holding it, an optimizer element by the owner of the ZeRO shard holding it (its
// bucket range [begin, begin+shard) mapped back to (parameter, local offset) and, for experts, to the global
// offset via first_expert).
//
// ---- Checksum (layout independent) ------------------------------------------------------------------------------
// checksum = sum over the elements i (global row-major index) of h(i, bits_i) mod 2^64, with bits_i the 32-bit
// pattern of the fp32 value and h(i, x) = fmix64(fmix64(i + 0x9E3779B97F4A7C15) ^ x) (fmix64: MurmurHash3's
// 64-bit finalizer). A sum is order independent, so each rank hashes the elements it writes (or reads) and the
// partial sums are added over the ranks; any layout gives the same number.
//
// ---- Directory ----------------------------------------------------------------------------------------------------
//   DIR/iter_0000123.h5    a complete checkpoint (written as iter_0000123.h5.tmp, flushed, fsynced, renamed)
//   DIR/latest             one line: the file name of the newest complete checkpoint (written as latest.tmp,
//                          fsynced, renamed; the directory is fsynced after each rename)
// A crash at any moment leaves the previous checkpoint intact and `latest` naming a complete file.
//
// comm: every function that takes one is collective over the world of comm (every rank calls it with its own
// Params / AdamW); comm null: this process alone (HDF5's default driver, no MPI).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "model/params.h"
#include "optim/adamw.h"

namespace dsv3 {

class Comm;

struct TrainState {
  int64_t iteration = 0;         // optimizer steps done
  int64_t consumed_samples = 0;  // samples consumed: the data position (sample index of the next batch)
  double consumed_tokens = 0;    // consumed_samples * seq_length (drives the schedules)
  int64_t rng_seed = -1;         // train.seed: the only random state (data order and init are functions of it)
};

struct CheckpointInfo {
  TrainState state;
  int64_t adam_t = 0, format_version = 0;
  std::string dsv3_version, deck, layout, moment_dtype;
};

struct SaveResult {
  std::string path;     // DIR/iter_0000123.h5
  int64_t bytes = 0;    // file size
  double seconds = 0;   // wall time of the whole save (all ranks), bandwidth = bytes / seconds
};

// "iter_0000123.h5"
std::string checkpoint_file_name(int64_t iteration);

// Writes DIR/iter_<iteration>.h5 atomically, then updates DIR/latest, then (keep > 0) deletes all but the newest
// `keep` checkpoints (never the one `latest` names). opt null: no /optim group (a weights-only file). Collective.
// Logs the path, size, time and bandwidth (rank 0). Throws dsv3::Error on every rank on failure; the previous
// checkpoint and `latest` are then untouched and the partial .tmp file is deleted. A full file system (or quota)
// gives one line: "checkpoint DIR/iter_0000123.h5: No space left on device: the checkpoint needs about N MiB and
// the file system of DIR has M MiB free ...; the partial file is deleted and `latest` still names ... (the HDF5
// error)". Space: old checkpoints are pruned only after the new one is complete, so DIR needs room for keep + 1.
SaveResult save_checkpoint(const std::string& dir, const Comm* comm, const Params& params, const AdamW* opt,
                           const TrainState& state, const std::string& deck_text, const std::string& layout,
                           int64_t keep = 0);

// Reads this rank's hyperslabs of every parameter (and, with opt, of its optimizer shards) from a checkpoint
// written under any layout, verifies every dataset read against its checksum (collectively) and returns the
// state. weights_only: with opt, only the master weights are read (from /optim/master when the file has it, else
// the model weights); moments are zeroed and the step count is 0 (fine-tuning). Errors (missing dataset, wrong
// shape or type, checksum mismatch, unreadable/truncated file) name the file and the dataset, and are thrown on
// every rank alike. On error params/opt may be partly overwritten.
TrainState load_checkpoint(const std::string& path, const Comm* comm, Params& params, AdamW* opt,
                           bool weights_only = false);

// The root attributes only (any rank, no communication).
CheckpointInfo read_checkpoint_info(const std::string& path);

// The path `DIR/latest` names (nullopt: no latest file or it is empty).
std::optional<std::string> read_latest(const std::string& dir);
// Complete checkpoints DIR/iter_*.h5 (no .tmp), newest (highest iteration) first.
std::vector<std::string> list_checkpoints(const std::string& dir);
// Where to resume from, best first. auto_mode: DIR's `latest`, then every other complete checkpoint of DIR,
// newest first (empty: nothing to resume). Otherwise: dir_or_file itself if it is a file, or the file its
// `latest` names if it is a directory (one candidate; an error if there is none).
std::vector<std::string> checkpoint_candidates(const std::string& dir_or_file, bool auto_mode);

// Reads a whole checkpoint serially and checks every dataset's checksum: "" when good, else the error (naming the
// file and the dataset).
std::string verify_checkpoint(const std::string& path);
// The newest complete, verified checkpoint among checkpoint_candidates (a warning names each bad file and why);
// nullopt when there is none. Not auto_mode: the one candidate, which must verify (else dsv3::Error).
std::optional<std::string> find_checkpoint(const std::string& dir_or_file, bool auto_mode);

// Collective resume: load_checkpoint on each candidate in turn; in auto_mode a candidate that fails (corrupt,
// truncated, wrong shape) is reported with a warning naming file and dataset and the previous one is tried.
// Returns the path loaded and the state, or nullopt when auto_mode found nothing (start from scratch).
struct Resumed {
  std::string path;
  TrainState state;
};
std::optional<Resumed> resume_checkpoint(const std::string& dir_or_file, bool auto_mode, const Comm* comm,
                                         Params& params, AdamW* opt, bool weights_only = false);

// The checksum of n consecutive elements starting at global index first (add partial sums mod 2^64).
uint64_t checkpoint_checksum(const float* x, int64_t n, int64_t first);

// Largest number of elements one rank moves in one H5Dwrite/H5Dread (default 2^28 = 1 GiB of fp32; big
// tensors take several collective rounds). For tests.
void set_checkpoint_io_chunk(int64_t elements);

// ---- streaming access for the converters (dsv3-hftoh5, dsv3-h5tohf: io/convert.h) -------------------------------
// The same file format as save_checkpoint (dataset names, fp32 contiguous datasets, checksum attributes, the root
// attributes), written and read a piece at a time, so that a converter never holds a whole tensor.
struct CheckpointDataset {
  std::string name;            // e.g. "/model/lm_head.weight" (parent groups are created)
  std::vector<int64_t> shape;  // global
};

// A weights-only checkpoint (no /optim: it loads with weights_only / checkpoint.finetune = true) written piece by
// piece. The constructor is collective over comm (null: this process alone): it creates DIR/iter_<iteration>.h5.tmp,
// the root attributes (those of save_checkpoint: adam_t 0, moment_dtype "none"; then extra_attrs as strings) and
// every dataset, and keeps the datasets open. write() is independent (MPI-IO independent transfers: no other rank
// takes part), so ranks write disjoint pieces at their own pace. finish() is collective.
class CheckpointFileWriter {
 public:
  CheckpointFileWriter(const std::string& dir, const Comm* comm, const std::vector<CheckpointDataset>& datasets,
                       const TrainState& state, const std::string& deck_text, const std::string& layout,
                       const std::vector<std::pair<std::string, std::string>>& extra_attrs = {});
  ~CheckpointFileWriter();  // without finish(): closes and leaves the .tmp (deleted by the next save's pruning)
  CheckpointFileWriter(const CheckpointFileWriter&) = delete;
  CheckpointFileWriter& operator=(const CheckpointFileWriter&) = delete;
  // Elements [first, first + n) (global row-major index) of dataset i. Every element must be written exactly once,
  // by one rank: the dataset's checksum is the sum of what the ranks wrote.
  void write(size_t i, int64_t first, int64_t n, const float* x);
  // Collective. local_error: this rank's failure ("" = none); when any rank failed, every rank throws and the .tmp
  // is deleted (as by save_checkpoint). Otherwise adds the ranks' checksums and stores them, closes, fsyncs and
  // renames the file onto iter_<iteration>.h5, then writes DIR/latest (rank 0).
  SaveResult finish(const std::string& local_error = "");
  const std::string& path() const { return final_path_; }

 private:
  const Comm* comm_;
  std::string dir_, tmp_path_, final_path_;
  int64_t iteration_ = 0;
  std::vector<CheckpointDataset> datasets_;
  std::vector<int64_t> dsets_;  // hid_t
  std::vector<uint64_t> sums_;
  int64_t file_ = -1, dxpl_ = -1;
  double t0_ = 0;
  void close_all() noexcept;
  int64_t data_bytes() const;
  [[noreturn]] void abandon(std::string err);  // collective: delete the partial file, throw err (+ why) everywhere
};

// Serial read-only access to one checkpoint file without a model (any process, no communication).
class CheckpointFileReader {
 public:
  explicit CheckpointFileReader(const std::string& file_or_dir);  // a directory: the file its `latest` names
  ~CheckpointFileReader();
  CheckpointFileReader(const CheckpointFileReader&) = delete;
  CheckpointFileReader& operator=(const CheckpointFileReader&) = delete;
  const std::string& path() const { return path_; }
  CheckpointInfo info() const;
  std::string attr(const std::string& name) const;  // a string root attribute; "" when absent
  std::vector<std::string> datasets() const;        // every dataset, e.g. "/model/lm_head.weight"
  bool has(const std::string& dataset) const;
  std::vector<int64_t> shape(const std::string& dataset) const;  // checks that it is fp32
  uint64_t stored_checksum(const std::string& dataset) const;
  // Elements [first, first + n) in row-major order.
  void read(const std::string& dataset, int64_t first, int64_t n, float* out) const;

 private:
  std::string path_;
  int64_t file_ = -1;
  mutable std::string open_name_;
  mutable int64_t open_ = -1;  // the last dataset read, kept open
  int64_t open_dataset(const std::string& dataset) const;
};

// Throws on every rank when any rank failed (err non-empty on it). One message is printed: rank 0's when it failed
// (the others throw an empty Error, which main() does not print), else each failing rank's own (and rank 0 points to
// them, naming `what`). Without a communicator: throws err if it is non-empty.
void agree(const Comm* comm, const std::string& err, const std::string& what);

// Partial checksums of every rank summed element-wise mod 2^64 (as two 32-bit halves: exact for < 2^31 ranks);
// comm null: nothing to do.
void allreduce_checksums(const Comm* comm, std::vector<uint64_t>& h);

}  // namespace dsv3
