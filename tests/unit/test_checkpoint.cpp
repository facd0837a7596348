// HDF5 training checkpoints on one process (io/checkpoint.h): save -> load is bit-identical for the parameters and
// the optimizer state (FP32 and BF16 moments, any I/O chunking) and training continues bit-identically; a flipped
// byte in a dataset is detected and named; a truncated file is rejected with its name; `latest` and keep-N
// pruning; checkpoint.load = auto falls back to the previous good checkpoint; an expert-parallel rank reads its
// slice of the global file (resharding). The multi-rank cases are tests/mpi_checkpoint.sh. At the end: the inputs
// tests/fuzz/fuzz_checkpoint.cpp found (CheckpointFuzzRegressions).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <hdf5.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include "core/error.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "ops/cpu/cpu_backend.h"
#include "train/trainer.h"
#include "test_util.h"

using namespace dsv3;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

namespace {

ModelConfig tiny() { return model_config_from_file(std::string(DSV3_TEST_DIR) + "/golden/tiny/config.json"); }

using dsv3::test::TmpDir;

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
    EXPECT_EQ(ba[i].master.to_host(), bb[i].master.to_host());
    EXPECT_TRUE(same_bits(ba[i].master.data(), bb[i].master.data(), ba[i].master.size()));
    EXPECT_TRUE(same_bits(ba[i].m.data(), bb[i].m.data(), ba[i].m.size()));
    EXPECT_TRUE(same_bits(ba[i].v.data(), bb[i].v.data(), ba[i].v.size()));
    EXPECT_EQ(ba[i].m16.to_host(), bb[i].m16.to_host());
    EXPECT_EQ(ba[i].v16.to_host(), bb[i].v16.to_host());
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
    EXPECT_EQ(bb.master.to_host(), a.trainer.optimizer().buckets()[i].master.to_host());
    for (float m : bb.m.to_host()) ASSERT_EQ(m, 0.0f);
    for (float v : bb.v.to_host()) ASSERT_EQ(v, 0.0f);
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

// ---- inputs found by the libFuzzer target tests/fuzz/fuzz_checkpoint.cpp (metadata of a valid HDF5 file), fixed in
// src/io/checkpoint.cpp. Each used to crash, overflow a buffer, hang or escape as a non-dsv3 exception.
namespace {

// Opens a checkpoint read-write, runs f(file), closes it (the test's own edits through the HDF5 API).
void edit_h5(const std::string& path, const std::function<void(hid_t)>& f) {
  const hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
  H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, fapl);
  H5Pclose(fapl);
  ASSERT_GE(file, 0) << path;
  f(file);
  ASSERT_GE(H5Fclose(file), 0);
}

// Replaces attribute `name` of object `obj` by one of type `type` over `space` holding `values` (converted from int64).
void put_attr(hid_t file, const char* obj, const char* name, hid_t type, hid_t space, std::vector<int64_t> values) {
  if (H5Aexists_by_name(file, obj, name, H5P_DEFAULT) > 0) H5Adelete_by_name(file, obj, name, H5P_DEFAULT);
  const hid_t a = H5Acreate_by_name(file, obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(a, 0);
  if (!values.empty()) {
    EXPECT_GE(H5Awrite(a, H5T_NATIVE_INT64, values.data()), 0);
  }
  H5Aclose(a);
  H5Sclose(space);
}
hid_t array_space(hsize_t n) { return H5Screate_simple(1, &n, nullptr); }

// Replaces dataset `name` by an fp32 one over `space` (no data written: storage allocated late, i.e. never), with a
// checksum attribute.
void put_dataset(hid_t file, const char* name, hid_t space) {
  if (H5Lexists(file, name, H5P_DEFAULT) > 0) H5Ldelete(file, name, H5P_DEFAULT);
  const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_LATE);
  const hid_t d = H5Dcreate2(file, name, H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  ASSERT_GE(d, 0) << name;
  const hid_t sp = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(d, "checksum", H5T_STD_U64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
  const uint64_t zero = 0;
  H5Awrite(a, H5T_NATIVE_UINT64, &zero);
  H5Aclose(a);
  H5Sclose(sp);
  H5Dclose(d);
  H5Pclose(dcpl);
  H5Sclose(space);
}

std::string load_error(const std::string& path) {
  return error_of([&] {
    TinyRun b;
    load_checkpoint(path, nullptr, b.model.params(), &b.trainer.optimizer());
  });
}

}  // namespace

// An attribute read as one value (H5Aread into an int64_t / a std::string of one string's size) that holds an array
// was written past its end (ASan: stack-buffer-overflow in get_attr_i64, heap-buffer-overflow in get_attr_str); a
// null dataspace left the value unset (format_version, iteration silently 0).
TEST(CheckpointFuzzRegressions, AttributeArraysAndNullAttributesAreAnErrorNotAnOverflow) {
  TmpDir dir;
  TinyRun a;
  const auto save = [&](int64_t it) {
    return save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(it), "", "", 0).path;
  };
  const std::string p1 = save(1);
  edit_h5(p1, [](hid_t f) { put_attr(f, "/", "iteration", H5T_STD_I64LE, array_space(3), {5, 5, 5}); });
  const std::string want1 = "checkpoint " + p1 + ": attribute iteration must hold one value, it holds 3 (an array)";
  EXPECT_THAT(error_of([&] { read_checkpoint_info(p1); }), HasSubstr(want1));
  EXPECT_THAT(error_of([&] { CheckpointFileReader rd(p1); }), HasSubstr(want1));
  EXPECT_THAT(load_error(p1), HasSubstr(want1));
  EXPECT_THAT(verify_checkpoint(p1), HasSubstr(want1));

  const std::string p2 = save(2);
  edit_h5(p2, [](hid_t f) {
    const std::string text(40, 'x');
    const hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, text.size() + 1);
    H5Adelete(f, "deck");
    const hid_t sp = array_space(2);
    const hid_t at = H5Acreate2(f, "deck", t, sp, H5P_DEFAULT, H5P_DEFAULT);
    const std::string two = text + '\0' + text + '\0';
    H5Awrite(at, t, two.data());
    H5Aclose(at);
    H5Sclose(sp);
    H5Tclose(t);
  });
  EXPECT_THAT(error_of([&] { read_checkpoint_info(p2); }),
              HasSubstr("checkpoint " + p2 + ": attribute deck must hold one value, it holds 2 (an array)"));
  EXPECT_EQ(load_error(p2), "");  // the deck is not needed to load

  const std::string p3 = save(3);
  edit_h5(p3, [](hid_t f) {
    put_attr(f, "/", "format_version", H5T_STD_I64LE, H5Screate(H5S_NULL), {});
    put_attr(f, kExpert, "checksum", H5T_STD_U64LE, array_space(2), {1, 2});
  });
  EXPECT_THAT(load_error(p3),
              HasSubstr("attribute format_version must hold one value, it holds none (a null dataspace)"));
  const std::string p4 = save(4);
  edit_h5(p4, [](hid_t f) { put_attr(f, kExpert, "checksum", H5T_STD_U64LE, array_space(2), {1, 2}); });
  EXPECT_THAT(load_error(p4), HasSubstr(std::string("dataset ") + kExpert + " attribute checksum must hold one value"));
  EXPECT_THAT(verify_checkpoint(p4), HasSubstr(std::string("dataset ") + kExpert + " attribute checksum must hold"));

  const std::string p5 = save(5);
  edit_h5(p5, [](hid_t f) {
    const hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, 4);
    H5Adelete(f, "adam_t");
    const hid_t sp = H5Screate(H5S_SCALAR);
    const hid_t at = H5Acreate2(f, "adam_t", t, sp, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(at, t, "123");
    H5Aclose(at);
    H5Sclose(sp);
    H5Tclose(t);
  });
  EXPECT_THAT(load_error(p5), HasSubstr("attribute adam_t is not an integer"));
  // verify_checkpoint checks adam_t too: find_checkpoint no longer offers a file that resume_checkpoint refuses
  EXPECT_THAT(verify_checkpoint(p5), HasSubstr("attribute adam_t is not an integer"));
}

// A dataset with a scalar or null dataspace (rank 0) made verify_checkpoint select hyperslabs with stride[0] of an
// empty vector (_GLIBCXX_ASSERTIONS abort; out-of-bounds read in Release).
TEST(CheckpointFuzzRegressions, ScalarOrNullDatasetIsAnErrorNotAnOutOfBoundsRead) {
  TmpDir dir;
  TinyRun a;
  const auto r = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(1), "", "", 0);
  edit_h5(r.path, [](hid_t f) { put_dataset(f, kExpert, H5Screate(H5S_SCALAR)); });
  const std::string want = std::string("dataset ") + kExpert + " is a scalar, not an array";
  EXPECT_THAT(verify_checkpoint(r.path), HasSubstr(want));
  EXPECT_THAT(error_of([&] { CheckpointFileReader(r.path).shape(kExpert); }), HasSubstr(want));
  EXPECT_THAT(load_error(r.path), HasSubstr(want));
  edit_h5(r.path, [](hid_t f) { put_dataset(f, kExpert, H5Screate(H5S_NULL)); });
  EXPECT_THAT(verify_checkpoint(r.path),
              HasSubstr(std::string(kExpert) + " is empty (a null dataspace), not an array"));
}

// A dataset whose shape promises more than the file stores: [2^20, 2^20] with no storage made verify_checkpoint
// allocate a 1 GiB buffer and read 4096 rounds of fill values (a hang); [2^40, 2^40] overflowed the element count
// (signed overflow). Both are refused from the metadata now, before anything is allocated or read.
TEST(CheckpointFuzzRegressions, DatasetShapeBeyondItsStorageIsAnErrorNotAHang) {
  TmpDir dir;
  TinyRun a;
  const auto r = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(1), "", "", 0);
  edit_h5(r.path, [](hid_t f) {
    const hsize_t big[2] = {hsize_t(1) << 20, hsize_t(1) << 20};
    put_dataset(f, "/model/extra", H5Screate_simple(2, big, nullptr));
  });
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THAT(verify_checkpoint(r.path),
              HasSubstr("dataset /model/extra has shape [1048576,1048576] (4398046511104 bytes of fp32) but the file "
                        "stores 0 bytes of it"));
  EXPECT_THAT(error_of([&] { CheckpointFileReader(r.path).shape("/model/extra"); }), HasSubstr("stores 0 bytes"));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  EXPECT_EQ(load_error(r.path), "");  // an extra dataset does not matter to the model
  edit_h5(r.path, [](hid_t f) {
    const hsize_t huge[2] = {hsize_t(1) << 40, hsize_t(1) << 40};
    put_dataset(f, "/model/extra", H5Screate_simple(2, huge, nullptr));
  });
  EXPECT_THAT(verify_checkpoint(r.path),
              HasSubstr("has shape [1099511627776,1099511627776]: its size overflows int64"));
  // a model dataset never written (storage not allocated) is named as such, not read as fill values
  edit_h5(r.path, [](hid_t f) {
    const hsize_t shape[3] = {8, 32, 64};
    put_dataset(f, kExpert, H5Screate_simple(3, shape, nullptr));
  });
  EXPECT_THAT(load_error(r.path), HasSubstr(std::string(kExpert) + " has shape [8,32,64] (65536 bytes of fp32) but "
                                            "the file stores 0 bytes of it"));
}

// Counters a run continues from were taken as they were: iteration -1, adam_t < 0 (bias corrections 1 - beta^t < 0),
// a NaN token count (the schedules).
TEST(CheckpointFuzzRegressions, NegativeOrNonFiniteCountersAreAnError) {
  TmpDir dir;
  TinyRun a;
  const auto save = [&](int64_t it) {
    return save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(it), "", "", 0).path;
  };
  const std::string p1 = save(1), p2 = save(2), p3 = save(3);
  edit_h5(p1, [](hid_t f) { put_attr(f, "/", "iteration", H5T_STD_I64LE, H5Screate(H5S_SCALAR), {-1}); });
  edit_h5(p2, [](hid_t f) { put_attr(f, "/", "adam_t", H5T_STD_I32BE, H5Screate(H5S_SCALAR), {-3}); });
  edit_h5(p3, [](hid_t f) {
    const hid_t sp = H5Screate(H5S_SCALAR);
    H5Adelete(f, "consumed_tokens");
    const hid_t at = H5Acreate2(f, "consumed_tokens", H5T_IEEE_F64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    const double nan = std::nan("");
    H5Awrite(at, H5T_NATIVE_DOUBLE, &nan);
    H5Aclose(at);
    H5Sclose(sp);
  });
  EXPECT_THAT(error_of([&] { read_checkpoint_info(p1); }),
              HasSubstr("checkpoint " + p1 + ": attribute iteration is negative (-1)"));
  EXPECT_THAT(load_error(p2), HasSubstr("checkpoint " + p2 + ": attribute adam_t is negative (-3)"));
  EXPECT_THAT(load_error(p3), HasSubstr("attribute consumed_tokens is nan (must be a finite number >= 0)"));
  // auto resume skips all three (newest first) and says why about the oldest
  EXPECT_THAT(error_of([&] {
                TinyRun b;
                resume_checkpoint(dir.path, true, nullptr, b.model.params(), &b.trainer.optimizer());
              }),
              HasSubstr("iteration is negative"));
}

// A file named iter_<digits beyond int64>.h5 in the checkpoint directory made list_checkpoints (std::stoll) throw
// std::out_of_range out of find_checkpoint / checkpoint_candidates. It is no checkpoint of ours: it is ignored.
TEST(CheckpointFuzzRegressions, CheckpointNameBeyondInt64IsNotACheckpoint) {
  TmpDir dir;
  TinyRun a;
  const auto r = save_checkpoint(dir.path, nullptr, a.model.params(), &a.trainer.optimizer(), state_at(3), "", "", 0);
  fs::copy_file(r.path, dir.path + "/iter_77777777777777777777777.h5");
  EXPECT_EQ(list_checkpoints(dir.path), std::vector<std::string>{r.path});
  EXPECT_EQ(checkpoint_candidates(dir.path, true), std::vector<std::string>{r.path});
  EXPECT_EQ(find_checkpoint(dir.path, true).value(), r.path);
  fs::remove(dir.path + "/latest");
  EXPECT_EQ(find_checkpoint(dir.path, true).value(), r.path);
}
