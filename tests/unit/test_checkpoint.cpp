// HDF5 training checkpoints on one process (io/checkpoint.h): save -> load is bit-identical for the parameters and
// the optimizer state (FP32 and BF16 moments, any I/O chunking) and training continues bit-identically; a flipped
// byte in a dataset is detected and named; a truncated file is rejected with its name; `latest` and keep-N
// pruning; checkpoint.load = auto falls back to the previous good checkpoint; an expert-parallel rank reads its
// slice of the global file (resharding). The multi-rank cases are tests/mpi_checkpoint.sh.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "ops/cpu/cpu_backend.h"
#include "train/trainer.h"

using namespace dsv3;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

ModelConfig tiny() { return model_config_from_file(std::string(DSV3_TEST_DIR) + "/golden/tiny/config.json"); }

struct TmpDir {
  std::string path;
  TmpDir() {
    char t[] = "/tmp/dsv3_ckpt_test_XXXXXX";
    path = mkdtemp(t);
  }
  ~TmpDir() { fs::remove_all(path); }
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

std::vector<int64_t> tokens() {
  std::vector<int64_t> t(4 * 32);
  for (size_t i = 0; i < t.size(); ++i) t[i] = (int64_t)((i * 7919 + 13) % 512);
  return t;
}

// A tiny model trained a few steps: parameters, optimizer state and expert biases all non-trivial.
struct TinyRun {
  CpuBackend be{1};
  Model model;
  Trainer trainer;
  explicit TinyRun(bool bf16_moments = false, uint64_t seed = 11)
      : model(tiny(), be), trainer((model.init_random(seed), model), config(bf16_moments)) {}
  static TrainerConfig config(bool bf16_moments) {
    TrainerConfig tc;
    tc.micro_batch = 2;
    tc.adamw.bf16_moments = bf16_moments;
    return tc;
  }
  double step() {
    const auto t = tokens();
    return trainer.step(t.data(), 4, 32, 1e-3, 0.3, 1e-3).loss.total;
  }
};

bool same_bits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

void expect_same_state(TinyRun& a, TinyRun& b) {
  ASSERT_EQ(a.model.params().size(), b.model.params().size());
  EXPECT_TRUE(same_bits(a.model.params().data(), b.model.params().data(), a.model.params().size()));
  const auto& ba = a.trainer.optimizer().buckets();
  const auto& bb = b.trainer.optimizer().buckets();
  ASSERT_EQ(ba.size(), bb.size());
  for (size_t i = 0; i < ba.size(); ++i) {
    EXPECT_EQ(ba[i].master, bb[i].master);
    EXPECT_TRUE(same_bits(ba[i].master.data(), bb[i].master.data(), ba[i].master.size()));
    EXPECT_TRUE(same_bits(ba[i].m.data(), bb[i].m.data(), ba[i].m.size()));
    EXPECT_TRUE(same_bits(ba[i].v.data(), bb[i].v.data(), ba[i].v.size()));
    EXPECT_EQ(ba[i].m16, bb[i].m16);
    EXPECT_EQ(ba[i].v16, bb[i].v16);
  }
  EXPECT_EQ(a.trainer.optimizer().t(), b.trainer.optimizer().t());
}

const char* kExpert = "/model/model.layers.1.mlp.experts.gate_proj.weight";

// file offset of a dataset's data (contiguous layout)
int64_t dataset_offset(const std::string& file, const std::string& ds) {
  const hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  EXPECT_GE(f, 0);
  const hid_t d = H5Dopen2(f, ds.c_str(), H5P_DEFAULT);
  EXPECT_GE(d, 0);
  const haddr_t off = H5Dget_offset(d);
  H5Dclose(d);
  H5Fclose(f);
  EXPECT_NE(off, HADDR_UNDEF);
  return (int64_t)off;
}

void flip_byte(const std::string& file, int64_t offset) {
  std::FILE* f = std::fopen(file.c_str(), "r+b");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(std::fseek(f, (long)offset, SEEK_SET), 0);
  const int c = std::fgetc(f);
  ASSERT_NE(c, EOF);
  ASSERT_EQ(std::fseek(f, (long)offset, SEEK_SET), 0);
  std::fputc(c ^ 0x10, f);
  std::fclose(f);
}

TrainState state_at(int64_t it) { return {it, it * 4, it * 4 * 32.0, 11}; }

}  // namespace

TEST(Checkpoint, ChecksumIsLayoutIndependent) {
  std::vector<float> x(1000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.1f * i);
  const uint64_t whole = checkpoint_checksum(x.data(), 1000, 0);
  const uint64_t parts = checkpoint_checksum(x.data(), 333, 0) + checkpoint_checksum(x.data() + 333, 667, 333);
  EXPECT_EQ(whole, parts);
  std::swap(x[3], x[4]);  // the same values in another order: another checksum
  EXPECT_NE(whole, checkpoint_checksum(x.data(), 1000, 0));
}

TEST(Checkpoint, RoundTripIsBitIdenticalAndTrainingContinuesIdentically) {
  for (bool bf16 : {false, true}) {
    for (int64_t chunk : {int64_t(1) << 28, int64_t(4099)}) {  // one transfer per tensor, and odd-sized pieces
      SCOPED_TRACE(std::string(bf16 ? "bf16" : "fp32") + " moments, chunk " + std::to_string(chunk));
      set_checkpoint_io_chunk(chunk);
      TmpDir dir;
      TinyRun a(bf16);
      a.step();
      a.step();
      const SaveResult r = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(2),
                                           "[train]\niters = 5\n", "world 1", 0);
      EXPECT_EQ(r.path, dir.path + "/iter_0000002.h5");
      EXPECT_GT(r.bytes, 4 * a.model.params().size() * 4 - 1);  // model + master + 2 moments
      EXPECT_EQ(verify_checkpoint(r.path), "");

      TinyRun b(bf16, /*seed=*/99);  // other weights, fresh optimizer
      const TrainState s = load_checkpoint(r.path, nullptr, b.model.params(), &b.trainer.optimizer());
      EXPECT_EQ(s.iteration, 2);
      EXPECT_EQ(s.consumed_samples, 8);
      EXPECT_EQ(s.consumed_tokens, 256.0);
      EXPECT_EQ(s.rng_seed, 11);
      expect_same_state(a, b);
      // the resumed run continues bit-identically
      EXPECT_EQ(a.step(), b.step());
      EXPECT_EQ(a.step(), b.step());
      expect_same_state(a, b);

      const CheckpointInfo info = read_checkpoint_info(r.path);
      EXPECT_EQ(info.deck, "[train]\niters = 5\n");
      EXPECT_EQ(info.layout, "world 1");
      EXPECT_EQ(info.dsv3_version, DSV3_VERSION);
      EXPECT_EQ(info.adam_t, 2);
      EXPECT_EQ(info.moment_dtype, bf16 ? "bf16" : "fp32");
    }
  }
  set_checkpoint_io_chunk(int64_t(1) << 28);
}

TEST(Checkpoint, WeightsOnlyGivesAFreshOptimizer) {
  TmpDir dir;
  TinyRun a;
  a.step();
  const auto r = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(1), "", "", 0);
  TinyRun b(false, 99);
  load_checkpoint(r.path, nullptr, b.model.params(), &b.trainer.optimizer(), /*weights_only=*/true);
  EXPECT_TRUE(same_bits(a.model.params().data(), b.model.params().data(), a.model.params().size()));
  EXPECT_EQ(b.trainer.optimizer().t(), 0);
  for (size_t i = 0; i < b.trainer.optimizer().buckets().size(); ++i) {
    const auto& bb = b.trainer.optimizer().buckets()[i];
    EXPECT_EQ(bb.master, a.trainer.optimizer().buckets()[i].master);
    for (float m : bb.m) ASSERT_EQ(m, 0.0f);
    for (float v : bb.v) ASSERT_EQ(v, 0.0f);
  }
}

TEST(Checkpoint, ExpertParallelRankReadsItsSliceOfTheGlobalFile) {
  TmpDir dir;
  TinyRun a;
  a.step();
  const auto r = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(1), "", "", 0);
  const Params& full = a.model.params();
  for (int ep_rank : {0, 1}) {
    ShardPlan plan;
    plan.ep_size = 2;
    plan.ep_rank = ep_rank;
    Params part(full.table(), plan);
    AdamW opt(part, AdamWConfig{});
    load_checkpoint(r.path, nullptr, part, &opt);
    for (const ParamSpec& p : full.table()) {
      const int64_t n = part.local_numel(p), per = p.numel() / p.n_experts();
      const float* want = full.get(p.name) + (p.expert_stack ? ep_rank * (p.shape[0] / 2) * per : 0);
      ASSERT_EQ(n, p.expert_stack ? p.numel() / 2 : p.numel());
      EXPECT_TRUE(same_bits(part.get(p.name), want, n)) << p.name << " on ep rank " << ep_rank;
    }
    // the expert bucket's master weights: this rank's experts, in table order
    const auto& fb = a.trainer.optimizer().buckets()[1];
    const auto& pb = opt.buckets()[1];
    int64_t foff = 0, poff = 0;
    for (int i : fb.params) {
      const ParamSpec& p = full.table()[i];
      const int64_t half = p.numel() / 2;
      EXPECT_TRUE(same_bits(pb.master.data() + poff, fb.master.data() + foff + ep_rank * half, half)) << p.name;
      EXPECT_TRUE(same_bits(pb.m.data() + poff, fb.m.data() + foff + ep_rank * half, half)) << p.name;
      foff += p.numel();
      poff += half;
    }
    EXPECT_EQ(opt.t(), 1);
  }
}

// A tensor-parallel rank (tp 2) reads its slice of every tp-sharded tensor: rows [r*n/2, (r+1)*n/2) of a dim-0
// (column-parallel, vocab-parallel) tensor, columns [r*m/2, (r+1)*m/2) of each row of a dim-1 (row-parallel) one;
// replicated tensors and experts whole. The expected slices are cut here by index, independently of GlobalLayout.
TEST(Checkpoint, TensorParallelRankReadsItsSliceOfTheGlobalFile) {
  TmpDir dir;
  TinyRun a;
  a.step();
  const auto r = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(1), "", "", 0);
  const Params& full = a.model.params();
  int sliced_rows = 0, sliced_cols = 0;
  for (int tp_rank : {0, 1}) {
    ShardPlan plan;
    plan.tp_size = 2;
    plan.tp_rank = tp_rank;
    Params part(full.table(), plan);
    AdamW opt(part, AdamWConfig{});
    load_checkpoint(r.path, nullptr, part, &opt);
    for (const ParamSpec& p : full.table()) {
      const float* g = full.get(p.name);
      std::vector<float> want;
      if (p.shard_dim < 0 || p.expert_stack) {
        want.assign(g, g + p.numel());
      } else if (p.shard_dim == 0) {
        const int64_t half = p.numel() / 2;
        want.assign(g + tp_rank * half, g + (tp_rank + 1) * half);
        sliced_rows += tp_rank == 0;
      } else {
        ASSERT_EQ(p.shard_dim, 1);
        ASSERT_EQ(p.shape.size(), 2u) << p.name;
        const int64_t rows = p.shape[0], cols = p.shape[1], hc = cols / 2;
        for (int64_t i = 0; i < rows; ++i) want.insert(want.end(), g + i * cols + tp_rank * hc, g + i * cols + (tp_rank + 1) * hc);
        sliced_cols += tp_rank == 0;
        auto ls = part.local_shape(p);
        EXPECT_EQ(ls, (std::vector<int64_t>{rows, hc})) << p.name;
      }
      ASSERT_EQ(part.local_numel(p), (int64_t)want.size()) << p.name;
      EXPECT_TRUE(same_bits(part.get(p.name), want.data(), want.size())) << p.name << " on tp rank " << tp_rank;
    }
  }
  // tiny: embedding, head, q_b, kv_b, gate/up and shared gate/up of 3 layers (incl. MTP) by rows; o_proj, down_proj,
  // shared down_proj by columns
  EXPECT_GT(sliced_rows, 10);
  EXPECT_GT(sliced_cols, 5);
}

TEST(Checkpoint, FlippedByteIsNamedByFileAndDataset) {
  TmpDir dir;
  TinyRun a;
  a.step();
  const auto r = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(1), "", "", 0);
  flip_byte(r.path, dataset_offset(r.path, kExpert) + 123);
  const std::string e = error_of([&] {
    TinyRun b;
    load_checkpoint(r.path, nullptr, b.model.params(), &b.trainer.optimizer());
  });
  EXPECT_THAT(e, HasSubstr(r.path));
  EXPECT_THAT(e, HasSubstr(kExpert));
  EXPECT_THAT(e, HasSubstr("checksum mismatch"));
  EXPECT_THAT(e, HasSubstr("checkpoint.cpp:"));
  const std::string v = verify_checkpoint(r.path);
  EXPECT_THAT(v, HasSubstr(r.path));
  EXPECT_THAT(v, HasSubstr(kExpert));
  // an optimizer dataset too
  const std::string opt_ds = "/optim/exp_avg_sq/model.layers.0.self_attn.o_proj.weight";
  const auto r2 = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(2), "", "", 0);
  flip_byte(r2.path, dataset_offset(r2.path, opt_ds) + 8);
  EXPECT_THAT(verify_checkpoint(r2.path), HasSubstr(opt_ds));
}

TEST(Checkpoint, TruncatedFileIsRejectedWithItsName) {
  TmpDir dir;
  TinyRun a;
  a.step();
  const auto r = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(1), "", "", 0);
  fs::resize_file(r.path, fs::file_size(r.path) / 2);
  const std::string e = error_of([&] {
    TinyRun b;
    load_checkpoint(r.path, nullptr, b.model.params(), &b.trainer.optimizer());
  });
  EXPECT_THAT(e, HasSubstr(r.path));
  EXPECT_THAT(e, HasSubstr("truncated"));
  EXPECT_THAT(verify_checkpoint(r.path), HasSubstr(r.path));
  EXPECT_THAT(error_of([&] { find_checkpoint(r.path, false); }), HasSubstr(r.path));
}

TEST(Checkpoint, LatestAndKeepPruning) {
  TmpDir dir;
  TinyRun a;
  EXPECT_FALSE(read_latest(dir.path));
  EXPECT_TRUE(checkpoint_candidates(dir.path, true).empty());
  for (int64_t it = 1; it <= 4; ++it) {
    a.step();
    save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(it), "", "", /*keep=*/2);
  }
  EXPECT_EQ(read_latest(dir.path).value(), dir.path + "/iter_0000004.h5");
  EXPECT_EQ(list_checkpoints(dir.path),
            (std::vector<std::string>{dir.path + "/iter_0000004.h5", dir.path + "/iter_0000003.h5"}));
  std::ifstream in(dir.path + "/latest");
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "iter_0000004.h5");
  EXPECT_FALSE(fs::exists(dir.path + "/latest.tmp"));
  // keep = 0 keeps everything; a crashed save's .tmp is never a candidate
  save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(5), "", "", 0);
  EXPECT_EQ(list_checkpoints(dir.path).size(), 3u);
  std::ofstream(dir.path + "/iter_0000006.h5.tmp") << "half written";
  EXPECT_EQ(checkpoint_candidates(dir.path, true).front(), dir.path + "/iter_0000005.h5");
  EXPECT_EQ(checkpoint_candidates(dir.path, false), (std::vector<std::string>{dir.path + "/iter_0000005.h5"}));
  EXPECT_EQ(checkpoint_candidates(dir.path + "/iter_0000003.h5", false),
            (std::vector<std::string>{dir.path + "/iter_0000003.h5"}));
  EXPECT_THAT(error_of([&] { checkpoint_candidates(dir.path + "/nope.h5", false); }), HasSubstr("nope.h5"));
}

TEST(Checkpoint, AutoFallsBackToThePreviousGoodCheckpoint) {
  TmpDir dir;
  TinyRun a;
  a.step();
  save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(1), "", "", 0);
  TinyRun good;  // the state of iteration 2
  good.step();
  good.step();
  a.step();
  save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(2), "", "", 0);
  a.step();
  const auto r3 = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(3), "", "", 0);
  flip_byte(r3.path, dataset_offset(r3.path, kExpert) + 7);

  EXPECT_EQ(find_checkpoint(dir.path, true).value(), dir.path + "/iter_0000002.h5");
  TinyRun b(false, 99);
  const auto res = resume_checkpoint(dir.path, true, nullptr, b.model.params(), &b.trainer.optimizer());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->path, dir.path + "/iter_0000002.h5");
  EXPECT_EQ(res->state.iteration, 2);
  expect_same_state(good, b);
  // an explicit path does not fall back: the error names the file and the dataset
  const std::string e = error_of([&] {
    TinyRun c;
    resume_checkpoint(r3.path, false, nullptr, c.model.params(), &c.trainer.optimizer());
  });
  EXPECT_THAT(e, HasSubstr(r3.path));
  EXPECT_THAT(e, HasSubstr(kExpert));
  // latest naming a missing file: the others are still found
  fs::remove(r3.path);
  EXPECT_EQ(checkpoint_candidates(dir.path, true).front(), dir.path + "/iter_0000002.h5");
  // nothing usable at all: an error, not a silent fresh start
  for (const auto& p : list_checkpoints(dir.path)) fs::resize_file(p, 100);
  EXPECT_THAT(error_of([&] { resume_checkpoint(dir.path, true, nullptr, b.model.params(), &b.trainer.optimizer()); }),
              HasSubstr("no usable checkpoint"));
  // an empty directory: nothing to resume (a fresh start)
  TmpDir empty;
  EXPECT_FALSE(resume_checkpoint(empty.path, true, nullptr, b.model.params(), &b.trainer.optimizer()));
}

TEST(Checkpoint, WrongModelShapeIsNamed) {
  TmpDir dir;
  TinyRun a;
  const auto r = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(0), "", "", 0);
  ModelConfig c = tiny();
  c.moe_intermediate_size *= 2;
  CpuBackend be(1);
  Model m(c, be);
  const std::string e = error_of([&] { load_checkpoint(r.path, nullptr, m.params(), nullptr); });
  EXPECT_THAT(e, HasSubstr(r.path));
  EXPECT_THAT(e, HasSubstr("has shape"));
}
