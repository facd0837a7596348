#include "io/checkpoint.h"

#include <fcntl.h>
#include <hdf5.h>
#include <mpi.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include "core/error.h"
#include "core/memory.h"
#include "core/log.h"
#include "io/safetensors.h"  // float_to_bf16 / bf16_to_float
#include "parallel/comm.h"

namespace fs = std::filesystem;

namespace dsv3 {

namespace {

constexpr int64_t kFormatVersion = 1;
const char* const kChecksumAlgorithm =
    "sum over elements i (global row-major index) of fmix64(fmix64(i + 0x9E3779B97F4A7C15) ^ bits32(x_i)) mod 2^64; "
    "fmix64 = MurmurHash3 64-bit finalizer";
const char* const kRngState =
    "the only random state is rng_seed (train.seed): the initialisation and the data order (the dataset's "
    "shuffle, a function of the seed and the run's total samples) are pure functions of it; the data position is "
    "consumed_samples";

int64_t g_io_chunk = int64_t(1) << 28;

// ---- HDF5 error reporting ---------------------------------------------------------------------------------------
herr_t walk_cb(unsigned n, const H5E_error2_t* e, void* data) {
  auto* s = static_cast<std::string*>(data);
  if (n < 3 && e->desc && e->desc[0]) {
    if (!s->empty()) *s += "; ";
    *s += e->desc;
  }
  return 0;
}
// The innermost HDF5 error descriptions (the most specific first), then the stack is cleared.
std::string h5_error() {
  std::string s;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, walk_cb, &s);
  H5Eclear2(H5E_DEFAULT);
  return s.empty() ? std::string("HDF5 error") : s;
}
void quiet_hdf5() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

}  // namespace

// Every HDF5 call goes through this: a negative return throws, naming the checkpoint file, what was being done
// (the dataset) and the call; DSV3_FAIL adds this file:line.
#define H5_CHECK(call, path, what)                                                                   \
  [&]() {                                                                                            \
    const auto h5_rc_ = (call);                                                                      \
    if (h5_rc_ < 0) DSV3_FAIL("checkpoint " << (path) << ": " << what << ": " << #call << " failed: " \
                                            << h5_error());                                          \
    return h5_rc_;                                                                                   \
  }()

namespace {

// An HDF5 identifier closed when it goes out of scope (close errors are ignored there: only on unwinding).
struct H5Id {
  hid_t id = -1;
  herr_t (*closer)(hid_t) = nullptr;
  H5Id() = default;
  H5Id(hid_t i, herr_t (*c)(hid_t)) : id(i), closer(c) {}
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  H5Id(H5Id&& o) noexcept : id(o.release()), closer(o.closer) {}
  H5Id& operator=(H5Id&& o) noexcept {
    if (this != &o) {
      reset();
      id = o.release();
      closer = o.closer;
    }
    return *this;
  }
  ~H5Id() { reset(); }
  void reset() {
    if (id >= 0 && closer) closer(id);
    id = -1;
  }
  hid_t release() {
    hid_t i = id;
    id = -1;
    return i;
  }
  operator hid_t() const { return id; }
};

inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

std::string hex(uint64_t x) {
  char b[24];
  std::snprintf(b, sizeof b, "0x%016llx", (unsigned long long)x);
  return b;
}

// ---- what this rank moves: one contiguous global range of each dataset ------------------------------------------
struct Job {
  std::string name;             // "/model/<param>", "/optim/master/<param>", ...
  std::vector<int64_t> shape;   // global
  int64_t numel = 0;
  int64_t global0 = 0, n = 0;   // this rank's elements [global0, global0 + n) in row-major order (n may be 0)
  float* mem = nullptr;         // n elements here
  bool hash = false;            // this rank's copy counts for the checksum (exactly one rank per element)
  // a tensor-parallel slice (run > 0): mem[k] is local element l0 + k of the slice, whose global index is
  // GlobalLayout{run, stride, global0}.global(l0 + k) (model/params.h): runs of `run` elements `stride` apart
  int64_t run = 0, stride = 0, l0 = 0;
  // calls f(global first, count, job-relative first) for each contiguous global piece of job elements [a, b)
  template <class F>
  void pieces(int64_t a, int64_t b, F&& f) const {
    if (run == 0) {
      if (a < b) f(global0 + a, b - a, a);
      return;
    }
    const GlobalLayout g{run, stride, global0};
    for (int64_t k = a; k < b;) {
      const int64_t m = l0 + k, len = std::min(run - m % run, b - k);
      f(g.global(m), len, k);
      k += len;
    }
  }
};

// the checksum terms of this rank's elements of a job
uint64_t job_checksum(const Job& j) {
  uint64_t s = 0;
  j.pieces(0, j.n, [&](int64_t g, int64_t len, int64_t k) { s += checkpoint_checksum(j.mem + k, len, g); });
  return s;
}

struct Plan {
  std::vector<Job> jobs;
  // BF16 moments go through FP32 buffers (per bucket: m, v), converted before a save / after a load
  std::vector<std::vector<float>> m32, v32;
};

int group_rank(const Comm* comm, GroupKind k) { return comm ? comm->group_rank(k) : 0; }

// The jobs of every dataset in file order (the same on every rank): /model in table order, then master, exp_avg,
// exp_avg_sq of the trainable parameters in table order. writer_only: ranks that are not the designated writer of
// a model tensor move nothing of it (saving); else every rank reads all it holds (loading).
Plan make_plan(const Params& params, const AdamW* opt, const Comm* comm, bool writer_only, bool with_moments) {
  Plan plan;
  const auto& table = params.table();
  // tensor parallelism: a tp slice is written by its own rank, a parameter replicated over tp by tp rank 0 only
  const bool tp_first = params.plan().tp_rank == 0;
  auto tp_writer = [&](const ParamSpec& p) { return p.expert_stack || params.tp_sharded(p) || tp_first; };
  auto set_layout = [&](Job& j, const ParamSpec& p, int64_t l0) {
    const GlobalLayout g = params.global_layout(p);
    if (params.sliced(p)) j.run = g.run, j.stride = g.stride, j.global0 = g.offset, j.l0 = l0;
    else j.global0 = g.offset + l0;
  };
  const bool dense_writer = group_rank(comm, GroupKind::dp) == 0;
  const bool expert_writer = group_rank(comm, GroupKind::edp) == 0;
  for (const ParamSpec& p : table) {
    Job j;
    j.name = "/model/" + p.name;
    j.shape = p.shape;
    j.numel = p.numel();
    // pipeline parallelism: a stage has only its own parameters, and maybe a copy of one another stage owns (the
    // MTP's embedding): the copy is read on loading but neither written nor counted in the checksum
    const bool held = params.held(p), owner = held && !params.is_copy(p);
    j.hash = owner && (p.expert_stack ? expert_writer : dense_writer) && tp_writer(p);
    set_layout(j, p, 0);
    j.n = !held || (writer_only && !j.hash) ? 0 : params.local_numel(p);
    j.mem = held ? const_cast<float*>(params.get(p.name)) : nullptr;
    plan.jobs.push_back(std::move(j));
  }
  if (!opt) return plan;
  auto& bs = const_cast<AdamW*>(opt)->buckets();
  const bool m16 = opt->config().bf16_moments;
  plan.m32.resize(bs.size());
  plan.v32.resize(bs.size());
  if (with_moments && m16) {
    for (size_t bi = 0; bi < bs.size(); ++bi) {
      plan.m32[bi].resize(bs[bi].shard);
      plan.v32[bi].resize(bs[bi].shard);
    }
  }
  // param index -> (bucket, position of its shard intersection)
  struct Slot {
    int bucket = -1;
    int64_t local0 = 0, n = 0, shard_off = 0;  // elements [local0, local0 + n) of the parameter's local tensor
  };
  std::vector<Slot> slot(table.size());
  for (size_t bi = 0; bi < bs.size(); ++bi) {
    const AdamW::Bucket& b = bs[bi];
    int64_t off = 0;
    for (int i : b.params) {
      const ParamSpec& p = table[i];
      const int64_t nl = params.local_numel(p);
      const int64_t lo = std::max(off, b.begin), hi = std::min(off + nl, b.begin + b.shard);
      Slot& s = slot[i];
      s.bucket = (int)bi;
      if (lo < hi) {
        s.local0 = lo - off;
        s.n = hi - lo;
        s.shard_off = lo - b.begin;
      }
      off += nl;
    }
  }
  const char* kinds[] = {"master", "exp_avg", "exp_avg_sq"};
  for (int kind = 0; kind < (with_moments ? 3 : 1); ++kind) {
    for (size_t i = 0; i < table.size(); ++i) {
      const ParamSpec& p = table[i];
      if (!p.trainable) continue;
      const Slot& s = slot[i];
      Job j;
      j.name = std::string("/optim/") + kinds[kind] + "/" + p.name;
      j.shape = p.shape;
      j.numel = p.numel();
      set_layout(j, p, s.local0);
      j.hash = tp_writer(p);  // a tp-replicated parameter's optimizer state: tp rank 0's copy
      j.n = writer_only && !j.hash ? 0 : s.n;
      if (j.n > 0) {  // (a parameter of another pipeline stage, or a copy, is in no bucket here: nothing to move)
        AdamW::Bucket& b = bs[s.bucket];
        if (kind == 0) j.mem = b.master.data() + s.shard_off;
        else if (kind == 1) j.mem = (m16 ? plan.m32[s.bucket].data() : b.m.data()) + s.shard_off;
        else j.mem = (m16 ? plan.v32[s.bucket].data() : b.v.data()) + s.shard_off;
      }
      plan.jobs.push_back(std::move(j));
    }
  }
  return plan;
}

// Selects the row-major element range [a, b) of a dataspace of shape dims as a union of at most 2*rank-1
// hyperslab blocks (a is aligned coarsest-first: partial rows, whole slabs, partial rows); append: added to the
// current selection.
void select_range(hid_t space, const std::vector<int64_t>& dims, int64_t a, int64_t b, const std::string& path,
                  const std::string& ds, bool append = false) {
  const int nd = (int)dims.size();
  std::vector<int64_t> stride(nd, 1);
  for (int k = nd - 2; k >= 0; --k) stride[k] = stride[k + 1] * dims[k + 1];
  std::vector<hsize_t> start(nd), count(nd);
  bool first = !append;
  while (a < b) {
    int k = 0;
    while (k < nd - 1 && !(a % stride[k] == 0 && a + stride[k] <= b)) ++k;
    const int64_t unit = stride[k];
    const int64_t idx = (a / unit) % dims[k];
    const int64_t c = std::min((b - a) / unit, dims[k] - idx);
    for (int j = 0; j < nd; ++j) {
      start[j] = (hsize_t)((a / stride[j]) % dims[j]);
      count[j] = j < k ? 1 : j == k ? (hsize_t)c : (hsize_t)dims[j];
    }
    H5_CHECK(H5Sselect_hyperslab(space, first ? H5S_SELECT_SET : H5S_SELECT_OR, start.data(), nullptr,
                                 count.data(), nullptr),
             path, "dataset " << ds);
    first = false;
    a += c * unit;
  }
  if (first && !append) H5_CHECK(H5Sselect_none(space), path, "dataset " << ds);
}

// Moves this rank's part of one dataset in rounds of at most g_io_chunk elements of the global index space (the
// same number of rounds on every rank: collective transfers need every rank in every call).
void transfer(bool write, hid_t dset, hid_t dxpl, const Job& j, const std::string& path) {
  const std::vector<hsize_t> dims(j.shape.begin(), j.shape.end());
  const int64_t rounds = std::max<int64_t>(1, (j.numel + g_io_chunk - 1) / g_io_chunk);
  float dummy = 0;
  for (int64_t r = 0; r < rounds; ++r) {
    // contiguous jobs: round r moves the global chunk r; tp slices: job elements [r*chunk, (r+1)*chunk)
    const int64_t lo = j.run ? std::min(j.n, r * g_io_chunk) : std::max(j.global0, r * g_io_chunk);
    const int64_t hi = j.run ? std::min(j.n, (r + 1) * g_io_chunk) : std::min(j.global0 + j.n, (r + 1) * g_io_chunk);
    const int64_t n = std::max<int64_t>(0, hi - lo);
    H5Id fspace(H5_CHECK(H5Screate_simple((int)dims.size(), dims.data(), nullptr), path, "dataset " << j.name),
                H5Sclose);
    const hsize_t mdim = (hsize_t)std::max<int64_t>(n, 1);
    H5Id mspace(H5_CHECK(H5Screate_simple(1, &mdim, nullptr), path, "dataset " << j.name), H5Sclose);
    if (n > 0 && j.run) {
      // TODO(perf): one hyperslab union per run (rows of a dim-1 slice); a strided 2-D block would be one call
      bool first = true;
      j.pieces(lo, hi, [&](int64_t g, int64_t len, int64_t) {
        select_range(fspace, j.shape, g, g + len, path, j.name, !first);
        first = false;
      });
    } else if (n > 0) {
      select_range(fspace, j.shape, lo, hi, path, j.name);
    } else {
      H5_CHECK(H5Sselect_none(fspace), path, "dataset " << j.name);
      H5_CHECK(H5Sselect_none(mspace), path, "dataset " << j.name);
    }
    float* buf = n > 0 ? j.mem + (j.run ? lo : lo - j.global0) : &dummy;
    if (write)
      H5_CHECK(H5Dwrite(dset, H5T_NATIVE_FLOAT, mspace, fspace, dxpl, buf), path, "writing dataset " << j.name);
    else
      H5_CHECK(H5Dread(dset, H5T_NATIVE_FLOAT, mspace, fspace, dxpl, buf), path, "reading dataset " << j.name);
  }
}

// ---- attributes -----------------------------------------------------------------------------------------------------
void put_attr_i64(hid_t obj, const char* name, int64_t v, const std::string& path) {
  H5Id sp(H5_CHECK(H5Screate(H5S_SCALAR), path, "attribute " << name), H5Sclose);
  H5Id a(H5_CHECK(H5Acreate2(obj, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT), path, "attribute " << name),
         H5Aclose);
  H5_CHECK(H5Awrite(a, H5T_NATIVE_INT64, &v), path, "attribute " << name);
}
void put_attr_u64(hid_t obj, const char* name, uint64_t v, const std::string& path, const std::string& ds) {
  H5Id sp(H5_CHECK(H5Screate(H5S_SCALAR), path, "dataset " << ds), H5Sclose);
  H5Id a(H5_CHECK(H5Acreate2(obj, name, H5T_STD_U64LE, sp, H5P_DEFAULT, H5P_DEFAULT), path,
                  "dataset " << ds << " attribute " << name),
         H5Aclose);
  H5_CHECK(H5Awrite(a, H5T_NATIVE_UINT64, &v), path, "dataset " << ds << " attribute " << name);
}
// Overwrites an existing attribute in place (no new metadata: it cannot run out of space).
void set_attr_u64(hid_t obj, const char* name, uint64_t v, const std::string& path, const std::string& ds) {
  H5Id a(H5_CHECK(H5Aopen(obj, name, H5P_DEFAULT), path, "dataset " << ds << " attribute " << name), H5Aclose);
  H5_CHECK(H5Awrite(a, H5T_NATIVE_UINT64, &v), path, "dataset " << ds << " attribute " << name);
}
void put_attr_f64(hid_t obj, const char* name, double v, const std::string& path) {
  H5Id sp(H5_CHECK(H5Screate(H5S_SCALAR), path, "attribute " << name), H5Sclose);
  H5Id a(H5_CHECK(H5Acreate2(obj, name, H5T_IEEE_F64LE, sp, H5P_DEFAULT, H5P_DEFAULT), path, "attribute " << name),
         H5Aclose);
  H5_CHECK(H5Awrite(a, H5T_NATIVE_DOUBLE, &v), path, "attribute " << name);
}
void put_attr_str(hid_t obj, const char* name, const std::string& v, const std::string& path) {
  H5Id t(H5_CHECK(H5Tcopy(H5T_C_S1), path, "attribute " << name), H5Tclose);
  H5_CHECK(H5Tset_size(t, v.size() + 1), path, "attribute " << name);
  H5_CHECK(H5Tset_strpad(t, H5T_STR_NULLTERM), path, "attribute " << name);
  H5Id sp(H5_CHECK(H5Screate(H5S_SCALAR), path, "attribute " << name), H5Sclose);
  H5Id a(H5_CHECK(H5Acreate2(obj, name, t, sp, H5P_DEFAULT, H5P_DEFAULT), path, "attribute " << name), H5Aclose);
  H5_CHECK(H5Awrite(a, t, v.c_str()), path, "attribute " << name);
}

bool has_attr(hid_t obj, const char* name, const std::string& path) {
  return H5_CHECK(H5Aexists(obj, name), path, "attribute " << name) > 0;
}
// Opens attribute `name` (of dataset ds, or of the file when ds is empty) and checks that it holds exactly one
// value: an array attribute would make H5Aread write past the one value it is read into, a null one leaves it unset.
// number: it must be an integer (or, float_ok, a floating-point number); else any type (strings are checked after).
H5Id open_one_value_attr(hid_t obj, const char* name, const std::string& path, const std::string& ds, int number,
                         bool float_ok = false) {
  std::ostringstream what_s;
  if (!ds.empty()) what_s << "dataset " << ds << " ";
  what_s << "attribute " << name;
  const std::string what = what_s.str();
  H5Id a(H5_CHECK(H5Aopen(obj, name, H5P_DEFAULT), path, what), H5Aclose);
  H5Id sp(H5_CHECK(H5Aget_space(a), path, what), H5Sclose);
  const H5S_class_t sc = H5Sget_simple_extent_type(sp);
  const hssize_t n = H5_CHECK(H5Sget_simple_extent_npoints(sp), path, what);
  DSV3_CHECK(sc == H5S_SCALAR || (sc == H5S_SIMPLE && n == 1),
             "checkpoint " << path << ": " << what << " must hold one value, it holds "
                           << (sc == H5S_NULL ? std::string("none (a null dataspace)")
                                              : std::to_string(n) + " (an array)"));
  if (number) {
    H5Id t(H5_CHECK(H5Aget_type(a), path, what), H5Tclose);
    const H5T_class_t c = H5_CHECK(H5Tget_class(t), path, what);
    DSV3_CHECK(c == H5T_INTEGER || (float_ok && c == H5T_FLOAT),
               "checkpoint " << path << ": " << what << " is not " << (float_ok ? "a number" : "an integer"));
  }
  return a;
}
int64_t get_attr_i64(hid_t obj, const char* name, const std::string& path) {
  DSV3_CHECK(has_attr(obj, name, path), "checkpoint " << path << ": attribute " << name << " is missing");
  H5Id a = open_one_value_attr(obj, name, path, "", 1);
  int64_t v = 0;
  H5_CHECK(H5Aread(a, H5T_NATIVE_INT64, &v), path, "attribute " << name);
  return v;
}
uint64_t get_attr_u64(hid_t obj, const char* name, const std::string& path, const std::string& ds) {
  DSV3_CHECK(has_attr(obj, name, path),
             "checkpoint " << path << ": dataset " << ds << " has no " << name << " attribute");
  H5Id a = open_one_value_attr(obj, name, path, ds, 1);
  uint64_t v = 0;
  H5_CHECK(H5Aread(a, H5T_NATIVE_UINT64, &v), path, "dataset " << ds << " attribute " << name);
  return v;
}
double get_attr_f64(hid_t obj, const char* name, const std::string& path) {
  DSV3_CHECK(has_attr(obj, name, path), "checkpoint " << path << ": attribute " << name << " is missing");
  H5Id a = open_one_value_attr(obj, name, path, "", 1, /*float_ok=*/true);
  double v = 0;
  H5_CHECK(H5Aread(a, H5T_NATIVE_DOUBLE, &v), path, "attribute " << name);
  return v;
}
std::string get_attr_str(hid_t obj, const char* name, const std::string& path) {
  if (!has_attr(obj, name, path)) return "";
  H5Id a = open_one_value_attr(obj, name, path, "", 0);
  H5Id t(H5_CHECK(H5Aget_type(a), path, "attribute " << name), H5Tclose);
  DSV3_CHECK(H5_CHECK(H5Tget_class(t), path, "attribute " << name) == H5T_STRING &&
                 H5_CHECK(H5Tis_variable_str(t), path, "attribute " << name) == 0,
             "checkpoint " << path << ": attribute " << name << " is not a fixed-length string");
  const size_t n = H5Tget_size(t);
  DSV3_CHECK(n > 0, "checkpoint " << path << ": attribute " << name << ": H5Tget_size failed: " << h5_error());
  std::string s(n, '\0');
  H5_CHECK(H5Aread(a, t, s.data()), path, "attribute " << name);
  s.resize(std::strlen(s.c_str()));
  return s;
}

// ---- files -------------------------------------------------------------------------------------------------------
// A file access property list: MPI-IO over the world of comm (collective metadata), or the default driver.
hid_t make_fapl(const Comm* comm, const std::string& path) {
  H5Id fapl(H5_CHECK(H5Pcreate(H5P_FILE_ACCESS), path, "file access properties"), H5Pclose);
  if (comm && comm->uses_mpi()) {  // DSV3_NO_MPI: one process, HDF5's default driver
    const MPI_Comm world = *static_cast<MPI_Comm*>(comm->native_handle(GroupKind::world));
    H5_CHECK(H5Pset_fapl_mpio(fapl, world, MPI_INFO_NULL), path, "MPI-IO driver");
    H5_CHECK(H5Pset_all_coll_metadata_ops(fapl, true), path, "collective metadata");
    H5_CHECK(H5Pset_coll_metadata_write(fapl, true), path, "collective metadata");
  }
  // the 1.8+ object format: attributes larger than 64 KiB (a long resolved deck) go to dense storage
  H5_CHECK(H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST), path, "format bounds");
  return fapl.release();
}
hid_t make_dxpl(const Comm* comm, const std::string& path) {
  H5Id dxpl(H5_CHECK(H5Pcreate(H5P_DATASET_XFER), path, "transfer properties"), H5Pclose);
  if (comm && comm->uses_mpi())
    H5_CHECK(H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE), path, "collective transfers");
  return dxpl.release();
}

void fsync_path(const std::string& p, bool dir) {
  const int fd = ::open(p.c_str(), dir ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  DSV3_CHECK(fd >= 0, "checkpoint " << p << ": cannot open for fsync: " << std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  DSV3_CHECK(rc == 0, "checkpoint " << p << ": fsync failed: " << std::strerror(err));
}

void rename_durable(const std::string& from, const std::string& to) {
  std::error_code ec;
  fs::rename(from, to, ec);
  DSV3_CHECK(!ec, "checkpoint " << from << ": cannot rename to " << to << ": " << ec.message());
  fsync_path(fs::path(to).parent_path().empty() ? "." : fs::path(to).parent_path().string(), true);
}


// The message of the lowest rank that failed, on every rank ("" when none failed), " (on rank k)" added when that
// is not rank 0. Collective.
std::string first_error(const Comm* comm, const std::string& err) {
  if (!comm) return err;
  std::vector<int64_t> failed(comm->size(), 0);
  failed[comm->rank()] = err.empty() ? 0 : 1;
  comm->allreduce_sum(GroupKind::world, failed.data(), (int64_t)failed.size());
  const int r = (int)(std::find(failed.begin(), failed.end(), 1) - failed.begin());
  if (r == comm->size()) return "";
  std::string e = err;
  comm->bcast_string(e, r);
  return r == 0 ? e : e + " (on rank " + std::to_string(r) + ")";
}

int64_t iteration_of(const std::string& name) {
  static const std::regex re(R"(^iter_(\d+)\.h5$)");
  std::smatch m;
  if (!std::regex_match(name, m, re)) return -1;
  // digits beyond int64 (iter_99999999999999999999.h5) are no checkpoint of ours: std::stoll threw out_of_range
  const std::string d = m[1].str();
  int64_t it = -1;
  const auto r = std::from_chars(d.data(), d.data() + d.size(), it);
  return r.ec == std::errc() ? it : -1;
}

void prune(const std::string& dir, int64_t keep) {
  const auto latest = read_latest(dir);
  if (keep > 0) {
    const auto all = list_checkpoints(dir);
    for (size_t i = (size_t)keep; i < all.size(); ++i) {
      if (latest && fs::equivalent(*latest, all[i])) continue;
      std::error_code ec;
      fs::remove(all[i], ec);
      if (ec) DSV3_LOG(warning) << "checkpoint " << all[i] << ": cannot delete (checkpoint.keep): " << ec.message();
      else DSV3_LOG(info) << "deleted old checkpoint " << all[i] << " (checkpoint.keep = " << keep << ")";
    }
  }
  // leftovers of saves that crashed before their rename
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.size() > 7 && n.rfind(".h5.tmp") == n.size() - 7) {
      std::error_code ec2;
      fs::remove(e.path(), ec2);
      if (!ec2) DSV3_LOG(info) << "deleted unfinished checkpoint " << e.path().string();
    }
  }
}

// "13.0 MiB", "48.0 KiB"
std::string size_text(double bytes) {
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(1);
  if (bytes < 1048576.0) o << bytes / 1024.0 << " KiB";
  else o << bytes / 1048576.0 << " MiB";
  return o.str();
}

// Bytes the file system holding dir can still give this process (-1: unknown).
int64_t free_bytes(const std::string& dir) {
  struct statvfs s {};
  if (::statvfs(dir.c_str(), &s) != 0) return -1;
  return (int64_t)s.f_bavail * (int64_t)s.f_frsize;
}

// Rank 0, after every rank wrote and closed tmp_path: fsync, rename onto final_path, then `latest` (written as
// latest.tmp, fsynced, renamed), then prune. On failure latest.tmp is deleted and `latest` still names the previous
// checkpoint (a renamed complete file that `latest` does not name is harmless: auto resume tries `latest` first).
// Returns the final file's size.
int64_t publish(const std::string& dir, const std::string& tmp_path, const std::string& final_path, int64_t iteration,
                int64_t keep) {
  fsync_path(tmp_path, false);
  rename_durable(tmp_path, final_path);
  const std::string lt = (fs::path(dir) / "latest.tmp").string();
  try {
    {
      std::ofstream out(lt, std::ios::trunc);
      out << checkpoint_file_name(iteration) << "\n";
      out.flush();
      const int err = errno;
      DSV3_CHECK(out.good(), "checkpoint " << lt << ": cannot write: " << std::strerror(err));
      out.close();
      const int err2 = errno;
      DSV3_CHECK(!out.fail(), "checkpoint " << lt << ": cannot close: " << std::strerror(err2));
    }
    fsync_path(lt, false);
    rename_durable(lt, (fs::path(dir) / "latest").string());
  } catch (...) {
    std::error_code ec;
    fs::remove(lt, ec);
    throw;
  }
  const int64_t bytes = (int64_t)fs::file_size(final_path);
  if (keep >= 0) prune(dir, keep);
  return bytes;
}

// The one error line of a failed save, from what abandon_file returned and the first failing rank's error.
std::string failed_save_message(const std::string& final_path, const std::string& why, const std::string& err) {
  if (why.rfind("No space", 0) == 0) return "checkpoint " + final_path + ": " + why + " (" + err + ")";
  return err + "; " + why;
}

// After a failed write, with `file` still open on every rank (datasets closed): frees the partial file's space
// (rank 0 truncates it to 0 bytes, so that the metadata HDF5 writes when closing fits even on a full file system),
// closes it, deletes it, and returns what became of it for the error message ("the partial file is deleted and
// `latest` still names iter_0000002.h5"), led by "No space left on device: ..." when the file system lacks the
// checkpoint's size. Collective.
// HDF5 1.10 frees a file whose H5Fclose fails but keeps its identifier, and crashes at exit closing it again
// (H5F__close_cb, seen with a full disk): a file whose metadata cannot be flushed is therefore left open, and HDF5
// closes it at exit, where the failure is harmless.
std::string abandon_file(const Comm* comm, hid_t file, const std::string& tmp_path, const std::string& dir,
                         int64_t need_bytes, int64_t keep) {
  const bool root = !comm || comm->rank() == 0;
  if (root && ::truncate(tmp_path.c_str(), 0) != 0) {
    const int e = errno;
    if (e != ENOENT)
      DSV3_LOG(warning) << "checkpoint " << tmp_path << ": cannot truncate the partial file: " << std::strerror(e);
  }
  if (comm) comm->barrier();
  bool flushed = H5Fflush(file, H5F_SCOPE_GLOBAL) >= 0;
  if (comm) flushed = !comm->any(!flushed);
  if (flushed) H5Fclose(file);
  H5Eclear2(H5E_DEFAULT);
  std::string why;
  if (root) {
    std::error_code ec;
    fs::remove(tmp_path, ec);
    std::ostringstream o;
    const int64_t avail = free_bytes(dir);
    if (avail >= 0 && avail < need_bytes) {
      o << "No space left on device: the checkpoint needs about " << size_text((double)need_bytes)
        << " and the file system of " << dir << " has " << size_text((double)avail) << " free";
      if (keep > 0)
        o << " (checkpoint.keep = " << keep << ": old checkpoints are deleted only after a new one is complete)";
      o << "; ";
    }
    if (ec) o << "the partial file could not be deleted (" << ec.message() << ")";
    else o << "the partial file is deleted";
    const auto latest = read_latest(dir);
    o << " and `latest` " << (latest ? "still names " + fs::path(*latest).filename().string() : "does not exist");
    why = o.str();
  }
  if (comm) comm->bcast_string(why);
  return why;
}

}  // namespace

void agree(const Comm* comm, const std::string& err, const std::string& what) {
  const bool failed = comm ? comm->any(!err.empty()) : !err.empty();
  if (!failed) return;
  if (!comm) throw Error(err);
  std::string root_err = err;
  comm->bcast_string(root_err);
  if (comm->rank() == 0) throw Error(err.empty() ? what + " failed on another rank (see its message)" : err);
  throw Error(root_err.empty() ? err : "");
}

// a partial checksum as two 32-bit halves summed as int64 (no overflow for any number of ranks < 2^31), so that
// the world sum mod 2^64 is exact
void allreduce_checksums(const Comm* comm, std::vector<uint64_t>& h) {
  if (!comm) return;
  std::vector<int64_t> parts(2 * h.size());
  for (size_t i = 0; i < h.size(); ++i) {
    parts[2 * i] = (int64_t)(h[i] & 0xffffffffULL);
    parts[2 * i + 1] = (int64_t)(h[i] >> 32);
  }
  comm->allreduce_sum(GroupKind::world, parts.data(), (int64_t)parts.size());
  for (size_t i = 0; i < h.size(); ++i) h[i] = (uint64_t)parts[2 * i] + ((uint64_t)parts[2 * i + 1] << 32);
}


uint64_t checkpoint_checksum(const float* x, int64_t n, int64_t first) {
  uint64_t s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    s += fmix64(fmix64((uint64_t)(first + i) + 0x9E3779B97F4A7C15ULL) ^ (uint64_t)bits);
  }
  return s;
}

void set_checkpoint_io_chunk(int64_t elements) { g_io_chunk = std::max<int64_t>(1, elements); }

std::string checkpoint_file_name(int64_t iteration) {
  char b[40];
  std::snprintf(b, sizeof b, "iter_%07lld.h5", (long long)iteration);
  return b;
}

std::optional<std::string> read_latest(const std::string& dir) {
  std::ifstream in(fs::path(dir) / "latest");
  if (!in) return std::nullopt;
  std::string name;
  std::getline(in, name);
  while (!name.empty() && (name.back() == '\r' || name.back() == ' ')) name.pop_back();
  if (name.empty()) return std::nullopt;
  return (fs::path(dir) / name).string();
}

std::vector<std::string> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> found;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return {};
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const int64_t it = iteration_of(e.path().filename().string());
    if (it >= 0 && e.is_regular_file(ec)) found.emplace_back(it, e.path().string());
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

std::vector<std::string> checkpoint_candidates(const std::string& dir_or_file, bool auto_mode) {
  std::error_code ec;
  if (!auto_mode) {
    if (fs::is_directory(dir_or_file, ec)) {
      const auto latest = read_latest(dir_or_file);
      DSV3_CHECK(latest, "checkpoint.load: directory " << dir_or_file << " has no 'latest' file");
      return {*latest};
    }
    DSV3_CHECK(fs::exists(dir_or_file, ec), "checkpoint.load: " << dir_or_file << " does not exist");
    return {dir_or_file};
  }
  std::vector<std::string> out;
  const auto latest = read_latest(dir_or_file);
  if (latest) {
    if (fs::exists(*latest, ec)) out.push_back(*latest);
    else DSV3_LOG(warning) << "checkpoint: " << dir_or_file << "/latest names " << *latest
                           << ", which does not exist; trying the other checkpoints";
  }
  for (const std::string& p : list_checkpoints(dir_or_file)) {
    bool dup = false;
    for (const std::string& q : out) dup |= fs::equivalent(p, q, ec);
    if (!dup) out.push_back(p);
  }
  return out;
}

// ---- save --------------------------------------------------------------------------------------------------------
SaveResult save_checkpoint(const std::string& dir, const Comm* comm, const Params& params, const AdamW* opt,
                           const TrainState& state, const std::string& deck_text_in, const std::string& layout_in,
                           int64_t keep) {
  quiet_hdf5();
  const auto t0 = std::chrono::steady_clock::now();
  const bool root = !comm || comm->rank() == 0;
  const std::string final_path = (fs::path(dir) / checkpoint_file_name(state.iteration)).string();
  const std::string tmp_path = final_path + ".tmp";
  // every rank must write identical attributes: take rank 0's
  std::string deck_text = deck_text_in, layout = layout_in;
  if (comm) {
    comm->bcast_string(deck_text);
    comm->bcast_string(layout);
  }
  std::string err;
  if (root) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) err = "checkpoint.dir " + dir + ": cannot create: " + ec.message();
  }
  agree(comm, err, "creating the checkpoint directory");

  // what each rank writes, and the checksums of the global data (one allreduce for all datasets)
  Plan plan = make_plan(params, opt, comm, /*writer_only=*/true, /*with_moments=*/true);
  if (opt && opt->config().bf16_moments) {
    const auto& bs = opt->buckets();
    for (size_t bi = 0; bi < bs.size(); ++bi)
      for (int64_t i = 0; i < bs[bi].shard; ++i) {
        plan.m32[bi][i] = bf16_to_float(bs[bi].m16[i]);
        plan.v32[bi][i] = bf16_to_float(bs[bi].v16[i]);
      }
  }
  std::vector<uint64_t> sums(plan.jobs.size(), 0);
  for (size_t i = 0; i < plan.jobs.size(); ++i)
    sums[i] = job_checksum(plan.jobs[i]);
  allreduce_checksums(comm, sums);

  // The metadata (attributes, groups, every dataset with its checksum) is created and flushed before any data, so
  // that a write failing for lack of space leaves no dirty metadata behind and the file can still be closed.
  int64_t need_bytes = 0;
  for (const Job& j : plan.jobs) need_bytes += j.numel * 4;
  H5Id file;
  try {
    H5Id fapl(make_fapl(comm, tmp_path), H5Pclose);
    file = H5Id(H5_CHECK(H5Fcreate(tmp_path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl), tmp_path, "creating the file"),
                H5Fclose);
  } catch (const std::exception& e) {
    err = e.what();
  }
  agree(comm, err, "creating checkpoint " + tmp_path);
  H5Id dxpl;
  std::deque<H5Id> dsets;  // one per job, open until the end
  try {
    dxpl = H5Id(make_dxpl(comm, tmp_path), H5Pclose);
    put_attr_i64(file, "format_version", kFormatVersion, tmp_path);
    put_attr_str(file, "dsv3_version", DSV3_VERSION, tmp_path);
    put_attr_i64(file, "iteration", state.iteration, tmp_path);
    put_attr_i64(file, "consumed_samples", state.consumed_samples, tmp_path);
    put_attr_f64(file, "consumed_tokens", state.consumed_tokens, tmp_path);
    put_attr_i64(file, "adam_t", opt ? opt->t() : 0, tmp_path);
    put_attr_i64(file, "rng_seed", state.rng_seed, tmp_path);
    put_attr_str(file, "rng_state", kRngState, tmp_path);
    put_attr_str(file, "deck", deck_text, tmp_path);
    put_attr_str(file, "layout", layout, tmp_path);
    put_attr_str(file, "moment_dtype", opt ? (opt->config().bf16_moments ? "bf16" : "fp32") : "none", tmp_path);
    put_attr_str(file, "checksum_algorithm", kChecksumAlgorithm, tmp_path);
    std::vector<std::string> groups = {"/model"};
    if (opt) groups.insert(groups.end(), {"/optim", "/optim/master", "/optim/exp_avg", "/optim/exp_avg_sq"});
    H5Id gcpl(H5_CHECK(H5Pcreate(H5P_GROUP_CREATE), tmp_path, "group properties"), H5Pclose);
    H5_CHECK(H5Pset_obj_track_times(gcpl, false), tmp_path, "group properties");
    for (const std::string& g : groups) {
      H5Id gid(H5_CHECK(H5Gcreate2(file, g.c_str(), H5P_DEFAULT, gcpl, H5P_DEFAULT), tmp_path, "group " << g),
               H5Gclose);
    }
    for (size_t i = 0; i < plan.jobs.size(); ++i) {
      const Job& j = plan.jobs[i];
      const std::vector<hsize_t> dims(j.shape.begin(), j.shape.end());
      H5Id space(H5_CHECK(H5Screate_simple((int)dims.size(), dims.data(), nullptr), tmp_path, "dataset " << j.name),
                 H5Sclose);
      H5Id dcpl(H5_CHECK(H5Pcreate(H5P_DATASET_CREATE), tmp_path, "dataset " << j.name), H5Pclose);
      H5_CHECK(H5Pset_layout(dcpl, H5D_CONTIGUOUS), tmp_path, "dataset " << j.name);
      H5_CHECK(H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER), tmp_path, "dataset " << j.name);
      H5_CHECK(H5Pset_obj_track_times(dcpl, false), tmp_path, "dataset " << j.name);  // same data, same bytes
      dsets.emplace_back(H5_CHECK(H5Dcreate2(file, j.name.c_str(), H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl,
                                             H5P_DEFAULT),
                                  tmp_path, "creating dataset " << j.name),
                         H5Dclose);
      put_attr_u64(dsets.back(), "checksum", sums[i], tmp_path, j.name);
    }
    H5_CHECK(H5Fflush(file, H5F_SCOPE_GLOBAL), tmp_path, "flushing the metadata");
  } catch (const std::exception& e) {
    err = e.what();
  }
  // Every rank leaves the loop at the same dataset: a collective write may fail on one rank only (the MPI-IO
  // aggregator that hit the full disk), and the others must not go on to the next collective call alone.
  bool failed = comm ? comm->any(!err.empty()) : !err.empty();
  for (size_t i = 0; i < plan.jobs.size() && !failed; ++i) {
    try {
      transfer(true, dsets[i], dxpl, plan.jobs[i], tmp_path);
    } catch (const std::exception& e) {
      err = e.what();
    }
    failed = comm ? comm->any(!err.empty()) : !err.empty();
  }
  if (!failed) {
    try {
      dsets.clear();
      H5_CHECK(H5Fflush(file, H5F_SCOPE_GLOBAL), tmp_path, "flushing the file");
    } catch (const std::exception& e) {
      err = e.what();
    }
    failed = comm ? comm->any(!err.empty()) : !err.empty();
  }
  if (failed) {
    dsets.clear();
    const std::string why = abandon_file(comm, file.release(), tmp_path, dir, need_bytes, keep);
    // one line, printed by rank 0, whichever rank failed (main prints no empty message)
    const std::string msg = failed_save_message(final_path, why, first_error(comm, err));
    throw Error(root ? msg : "");
  }
  try {
    H5_CHECK(H5Fclose(file.release()), tmp_path, "closing the file");
  } catch (const std::exception& e) {
    err = e.what();
  }
  agree(comm, err, "writing checkpoint " + tmp_path);

  // rank 0: fsync, rename, then `latest`, then prune
  SaveResult res;
  res.path = final_path;
  if (root) {
    try {
      res.bytes = publish(dir, tmp_path, final_path, state.iteration, keep);
    } catch (const std::exception& e) {
      err = e.what();
    }
  }
  std::string root_err = err;
  if (comm) comm->bcast_string(root_err);
  if (!root_err.empty()) throw Error(root ? root_err : "");  // rank 0 reports
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (root)
    DSV3_LOG(info) << "saved checkpoint " << final_path << " (iteration " << state.iteration << "): "
                   << res.bytes / 1048576.0 << " MiB in " << res.seconds << " s, "
                   << (res.seconds > 0 ? res.bytes / 1048576.0 / res.seconds : 0.0) << " MiB/s";
  return res;
}

// ---- load --------------------------------------------------------------------------------------------------------
namespace {

bool link_exists(hid_t file, const std::string& name, const std::string& path) {
  // every component must exist for H5Lexists on the full path
  size_t pos = 0;
  while ((pos = name.find('/', pos + 1)) != std::string::npos)
    if (H5_CHECK(H5Lexists(file, name.substr(0, pos).c_str(), H5P_DEFAULT), path, "link " << name) <= 0) return false;
  return H5_CHECK(H5Lexists(file, name.c_str(), H5P_DEFAULT), path, "link " << name) > 0;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream o;
  o << "[";
  for (size_t k = 0; k < shape.size(); ++k) o << (k ? "," : "") << shape[k];
  o << "]";
  return o.str();
}

// The global shape of an open dataset, after the checks of what dsv3 writes: fp32 elements, an array (simple)
// dataspace (a scalar or a null dataspace has no shape to select row-major ranges of) and an element count that
// fits in int64 (so that the byte count numel * 4 does too).
std::vector<int64_t> dataset_shape(hid_t d, const std::string& name, const std::string& path) {
  H5Id t(H5_CHECK(H5Dget_type(d), path, "dataset " << name), H5Tclose);
  DSV3_CHECK(H5_CHECK(H5Tget_class(t), path, "dataset " << name) == H5T_FLOAT && H5Tget_size(t) == 4,
             "checkpoint " << path << ": dataset " << name << " is not fp32");
  H5Id s(H5_CHECK(H5Dget_space(d), path, "dataset " << name), H5Sclose);
  const H5S_class_t sc = H5Sget_simple_extent_type(s);
  DSV3_CHECK(sc == H5S_SIMPLE, "checkpoint " << path << ": dataset " << name << " is "
                                             << (sc == H5S_SCALAR ? "a scalar" : "empty (a null dataspace)")
                                             << ", not an array");
  const int nd = H5_CHECK(H5Sget_simple_extent_ndims(s), path, "dataset " << name);
  std::vector<hsize_t> dims(std::max(nd, 0));
  H5_CHECK(H5Sget_simple_extent_dims(s, dims.data(), nullptr), path, "dataset " << name);
  std::vector<int64_t> shape;
  int64_t numel = 1;
  bool overflow = false;
  for (hsize_t x : dims) {
    shape.push_back(x > (hsize_t)INT64_MAX ? INT64_MAX : (int64_t)x);
    overflow |= x > (hsize_t)INT64_MAX || __builtin_mul_overflow(numel, (int64_t)x, &numel) || numel > INT64_MAX / 4;
  }
  DSV3_CHECK(!overflow, "checkpoint " << path << ": dataset " << name << " has shape " << shape_text(shape)
                                      << ": its size overflows int64");
  return shape;
}

// Every element of the dataset's shape must be stored in the file. A dataset that was never written (no storage
// allocated), is compressed, or whose shape promises more than the file holds (2^40 elements in a small file) is
// refused before anything is allocated or read: dsv3 writes contiguous, uncompressed datasets.
void check_stored(hid_t d, const std::string& name, const std::vector<int64_t>& shape, const std::string& path) {
  int64_t bytes = 4;
  for (int64_t x : shape) bytes *= x;  // cannot overflow: dataset_shape checked numel * 4
  const hsize_t stored = H5Dget_storage_size(d);
  DSV3_CHECK(stored >= (hsize_t)bytes, "checkpoint " << path << ": dataset " << name << " has shape "
                                                     << shape_text(shape) << " (" << bytes << " bytes of fp32) but "
                                                     << "the file stores " << stored << " bytes of it (never "
                                                     << "written, or compressed: dsv3 writes contiguous datasets)");
}

// Opens a dataset and checks it is fp32 of the given global shape, all of it stored.
hid_t open_dataset(hid_t file, const std::string& name, const std::vector<int64_t>& shape, const std::string& path) {
  DSV3_CHECK(link_exists(file, name, path), "checkpoint " << path << ": dataset " << name << " is missing");
  H5Id d(H5_CHECK(H5Dopen2(file, name.c_str(), H5P_DEFAULT), path, "opening dataset " << name), H5Dclose);
  const std::vector<int64_t> got = dataset_shape(d, name, path);
  if (got != shape)
    DSV3_FAIL("checkpoint " << path << ": dataset " << name << " has shape " << shape_text(got)
                            << ", the model has " << shape_text(shape));
  check_stored(d, name, shape, path);
  return d.release();
}

TrainState read_state(hid_t file, const std::string& path, int64_t* adam_t) {
  const int64_t fv = get_attr_i64(file, "format_version", path);
  DSV3_CHECK(fv == kFormatVersion, "checkpoint " << path << ": format_version " << fv << " (this dsv3 reads "
                                                 << kFormatVersion << ")");
  TrainState s;
  s.iteration = get_attr_i64(file, "iteration", path);
  s.consumed_samples = get_attr_i64(file, "consumed_samples", path);
  s.consumed_tokens = get_attr_f64(file, "consumed_tokens", path);
  s.rng_seed = get_attr_i64(file, "rng_seed", path);  // any value: converted checkpoints have -1
  // counters the run continues from: a negative one (or a NaN token count) would restart the schedules and the data
  // order somewhere meaningless
  DSV3_CHECK(s.iteration >= 0, "checkpoint " << path << ": attribute iteration is negative (" << s.iteration << ")");
  DSV3_CHECK(s.consumed_samples >= 0, "checkpoint " << path << ": attribute consumed_samples is negative ("
                                                    << s.consumed_samples << ")");
  DSV3_CHECK(std::isfinite(s.consumed_tokens) && s.consumed_tokens >= 0,
             "checkpoint " << path << ": attribute consumed_tokens is " << s.consumed_tokens
                           << " (must be a finite number >= 0)");
  if (adam_t) {
    *adam_t = get_attr_i64(file, "adam_t", path);
    DSV3_CHECK(*adam_t >= 0, "checkpoint " << path << ": attribute adam_t is negative (" << *adam_t << ")");
  }
  return s;
}

}  // namespace

TrainState load_checkpoint(const std::string& path, const Comm* comm, Params& params, AdamW* opt, bool weights_only) {
  quiet_hdf5();
  H5Id fapl(make_fapl(comm, path), H5Pclose);
  H5Id dxpl(make_dxpl(comm, path), H5Pclose);
  H5Id file(H5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl), path, "opening the file"), H5Fclose);
  int64_t adam_t = 0;
  const TrainState state = read_state(file, path, &adam_t);

  const bool with_master = opt && (!weights_only || link_exists(file, "/optim/master", path));
  Plan plan = make_plan(params, with_master ? opt : nullptr, comm, /*writer_only=*/false, !weights_only);
  std::vector<uint64_t> stored(plan.jobs.size()), sums(plan.jobs.size(), 0);
  // without a communicator a process holding part of a tensor (a ShardPlan with ep_size or tp_size > 1) cannot
  // complete its checksum: only whole tensors it hashes are checked then
  std::vector<char> check(plan.jobs.size(), 1);
  for (size_t i = 0; i < plan.jobs.size(); ++i) {
    const Job& j = plan.jobs[i];
    H5Id d(open_dataset(file, j.name, j.shape, path), H5Dclose);
    stored[i] = get_attr_u64(d, "checksum", path, j.name);
    transfer(false, d, dxpl, j, path);
    if (j.hash) sums[i] = job_checksum(j);
    if (!comm && (j.n != j.numel || !j.hash)) check[i] = 0;
  }
  allreduce_checksums(comm, sums);
  for (size_t i = 0; i < plan.jobs.size(); ++i)
    DSV3_CHECK(!check[i] || sums[i] == stored[i], "checkpoint " << path << ": dataset " << plan.jobs[i].name
                                                   << ": checksum mismatch (stored " << hex(stored[i]) << ", data "
                                                   << hex(sums[i]) << "): the file is corrupt");
  H5_CHECK(H5Fclose(file.release()), path, "closing the file");

  if (opt) {
    auto& bs = opt->buckets();
    if (weights_only) {
      if (!with_master) {  // the master weights from the loaded model weights
        const auto& table = params.table();
        for (AdamW::Bucket& b : bs) {
          int64_t off = 0;
          for (int i : b.params) {
            const ParamSpec& p = table[i];
            const int64_t nl = params.local_numel(p);
            const int64_t lo = std::max(off, b.begin), hi = std::min(off + nl, b.begin + b.shard);
            if (lo < hi) default_memory().copy(b.master.data() + (lo - b.begin), params.get(p.name) + (lo - off), sizeof(float) * (size_t)(hi - lo));
            off += nl;
          }
        }
      }
      for (AdamW::Bucket& b : bs) {
        b.m.zero();
        b.v.zero();
        b.m16.zero();
        b.v16.zero();
      }
      opt->set_t(0);
    } else {
      if (opt->config().bf16_moments)
        for (size_t bi = 0; bi < bs.size(); ++bi)
          for (int64_t i = 0; i < bs[bi].shard; ++i) {
            bs[bi].m16[i] = float_to_bf16(plan.m32[bi][i]);
            bs[bi].v16[i] = float_to_bf16(plan.v32[bi][i]);
          }
      opt->set_t(adam_t);
    }
  }
  return state;
}

namespace {
// the file-level attributes of an open checkpoint (read_state checks the counters)
CheckpointInfo read_info(hid_t file, const std::string& path) {
  CheckpointInfo info;
  info.state = read_state(file, path, &info.adam_t);
  info.format_version = kFormatVersion;
  info.dsv3_version = get_attr_str(file, "dsv3_version", path);
  info.deck = get_attr_str(file, "deck", path);
  info.layout = get_attr_str(file, "layout", path);
  info.moment_dtype = get_attr_str(file, "moment_dtype", path);
  return info;
}
}  // namespace

CheckpointInfo read_checkpoint_info(const std::string& path) {
  quiet_hdf5();
  H5Id fapl(make_fapl(nullptr, path), H5Pclose);
  H5Id file(H5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl), path, "opening the file"), H5Fclose);
  return read_info(file, path);
}

// ---- verification without a model (serial) ----------------------------------------------------------------------
namespace {
herr_t collect_datasets(hid_t, const char* name, const H5O_info_t* info, void* data) {
  if (info->type == H5O_TYPE_DATASET) static_cast<std::vector<std::string>*>(data)->push_back(std::string("/") + name);
  return 0;
}
}  // namespace

std::string verify_checkpoint(const std::string& path) {
  quiet_hdf5();
  try {
    H5Id fapl(make_fapl(nullptr, path), H5Pclose);
    H5Id file(H5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl), path, "opening the file"), H5Fclose);
    int64_t adam_t = 0;  // checked too: a file verify accepts is one that load_checkpoint does not refuse for it
    read_state(file, path, &adam_t);
    std::vector<std::string> names;
    H5_CHECK(H5Ovisit(file, H5_INDEX_NAME, H5_ITER_NATIVE, collect_datasets, &names), path, "listing the datasets");
    DSV3_CHECK(link_exists(file, "/model", path), "checkpoint " << path << ": group /model is missing");
    std::vector<float> buf;
    for (const std::string& name : names) {
      H5Id d(H5_CHECK(H5Dopen2(file, name.c_str(), H5P_DEFAULT), path, "opening dataset " << name), H5Dclose);
      Job j;
      j.name = name;
      j.shape = dataset_shape(d, name, path);
      check_stored(d, name, j.shape, path);
      j.numel = 1;
      for (int64_t x : j.shape) j.numel *= x;
      const uint64_t stored = get_attr_u64(d, "checksum", path, name);
      uint64_t sum = 0;
      // in pieces of at most one I/O chunk
      for (int64_t a = 0; a < j.numel; a += g_io_chunk) {
        Job part = j;
        part.global0 = a;
        part.n = std::min(g_io_chunk, j.numel - a);
        buf.resize(part.n);
        part.mem = buf.data();
        transfer(false, d, H5P_DEFAULT, part, path);
        sum += checkpoint_checksum(buf.data(), part.n, a);
      }
      DSV3_CHECK(sum == stored, "checkpoint " << path << ": dataset " << name << ": checksum mismatch (stored "
                                              << hex(stored) << ", data " << hex(sum) << "): the file is corrupt");
    }
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

std::optional<std::string> find_checkpoint(const std::string& dir_or_file, bool auto_mode) {
  for (const std::string& c : checkpoint_candidates(dir_or_file, auto_mode)) {
    const std::string err = verify_checkpoint(c);
    if (err.empty()) return c;
    if (!auto_mode) throw Error(err);
    DSV3_LOG(warning) << "skipping a bad checkpoint: " << err << "; falling back to the previous one";
  }
  return std::nullopt;
}

std::optional<Resumed> resume_checkpoint(const std::string& dir_or_file, bool auto_mode, const Comm* comm,
                                         Params& params, AdamW* opt, bool weights_only) {
  // rank 0 lists the candidates (every rank must try the same files in the same order)
  std::string list, err;
  if (!comm || comm->rank() == 0) {
    try {
      for (const std::string& c : checkpoint_candidates(dir_or_file, auto_mode)) list += c + "\n";
    } catch (const std::exception& e) {
      err = e.what();
    }
  }
  if (comm) {
    comm->bcast_string(err);
    comm->bcast_string(list);
  }
  if (!err.empty()) throw Error(err);
  std::vector<std::string> cands;
  std::istringstream in(list);
  for (std::string l; std::getline(in, l);)
    if (!l.empty()) cands.push_back(l);
  for (size_t k = 0; k < cands.size(); ++k) {
    std::string e;
    TrainState st;
    try {
      st = load_checkpoint(cands[k], comm, params, opt, weights_only);
    } catch (const std::exception& ex) {
      e = ex.what();
    }
    const bool failed = comm ? comm->any(!e.empty()) : !e.empty();
    if (!failed) return Resumed{cands[k], st};
    if (e.empty()) e = "checkpoint " + cands[k] + ": loading failed on another rank (see its message)";
    if (!auto_mode) agree(comm, e, "loading checkpoint " + cands[k]);
    if (k + 1 < cands.size())
      DSV3_LOG(warning) << "cannot resume from " << cands[k] << ": " << e << "; falling back to " << cands[k + 1];
    else {
      std::string msg;
      try {
        DSV3_FAIL("checkpoint.load = auto: no usable checkpoint in " << dir_or_file << " (the oldest, " << cands[k]
                                                                     << ": " << e << ")");
      } catch (const Error& x) {
        msg = x.what();
      }
      agree(comm, msg, "resuming");
    }
  }
  return std::nullopt;
}


// ---- streaming access for the converters ----------------------------------------------------------------------------
static_assert(sizeof(hid_t) == sizeof(int64_t), "CheckpointFileWriter/Reader keep hid_t in int64_t");

namespace {
// Moves elements [first, first + n) of an open dataset of shape `shape` in rounds of at most g_io_chunk (independent).
void transfer_range(bool write, hid_t dset, hid_t dxpl, const std::string& name, const std::vector<int64_t>& shape,
                    int64_t first, int64_t n, float* mem, const std::string& path) {
  const std::vector<hsize_t> dims(shape.begin(), shape.end());
  for (int64_t a = 0; a < n; a += g_io_chunk) {
    const int64_t m = std::min(g_io_chunk, n - a);
    H5Id fspace(H5_CHECK(H5Screate_simple((int)dims.size(), dims.data(), nullptr), path, "dataset " << name),
                H5Sclose);
    const hsize_t mdim = (hsize_t)m;
    H5Id mspace(H5_CHECK(H5Screate_simple(1, &mdim, nullptr), path, "dataset " << name), H5Sclose);
    select_range(fspace, shape, first + a, first + a + m, path, name);
    if (write)
      H5_CHECK(H5Dwrite(dset, H5T_NATIVE_FLOAT, mspace, fspace, dxpl, mem + a), path, "writing dataset " << name);
    else
      H5_CHECK(H5Dread(dset, H5T_NATIVE_FLOAT, mspace, fspace, dxpl, mem + a), path, "reading dataset " << name);
  }
}
}  // namespace

CheckpointFileWriter::CheckpointFileWriter(const std::string& dir, const Comm* comm,
                                           const std::vector<CheckpointDataset>& datasets, const TrainState& state,
                                           const std::string& deck_text_in, const std::string& layout_in,
                                           const std::vector<std::pair<std::string, std::string>>& extra_attrs)
    : comm_(comm), dir_(dir), iteration_(state.iteration), datasets_(datasets) {
  quiet_hdf5();
  t0_ = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  final_path_ = (fs::path(dir) / checkpoint_file_name(state.iteration)).string();
  tmp_path_ = final_path_ + ".tmp";
  std::string deck_text = deck_text_in, layout = layout_in;
  if (comm) {
    comm->bcast_string(deck_text);
    comm->bcast_string(layout);
  }
  std::string err;
  if (!comm || comm->rank() == 0) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) err = "checkpoint directory " + dir + ": cannot create: " + ec.message();
  }
  agree(comm, err, "creating the checkpoint directory");
  sums_.assign(datasets_.size(), 0);
  dsets_.assign(datasets_.size(), -1);
  try {
    H5Id fapl(make_fapl(comm, tmp_path_), H5Pclose);
    file_ = H5_CHECK(H5Fcreate(tmp_path_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl), tmp_path_, "creating the file");
  } catch (const std::exception& e) {
    err = e.what();
  }
  agree(comm, err, "creating checkpoint " + tmp_path_);
  // All metadata, the checksum attributes included (0 until finish() overwrites them in place), is created and
  // flushed before any data, so that a write failing for lack of space leaves no dirty metadata behind.
  try {
    H5Id dxpl(H5_CHECK(H5Pcreate(H5P_DATASET_XFER), tmp_path_, "transfer properties"), H5Pclose);
    if (comm && comm->uses_mpi())
      H5_CHECK(H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_INDEPENDENT), tmp_path_, "independent transfers");
    dxpl_ = dxpl.release();
    const std::string& p = tmp_path_;
    put_attr_i64(file_, "format_version", kFormatVersion, p);
    put_attr_str(file_, "dsv3_version", DSV3_VERSION, p);
    put_attr_i64(file_, "iteration", state.iteration, p);
    put_attr_i64(file_, "consumed_samples", state.consumed_samples, p);
    put_attr_f64(file_, "consumed_tokens", state.consumed_tokens, p);
    put_attr_i64(file_, "adam_t", 0, p);
    put_attr_i64(file_, "rng_seed", state.rng_seed, p);
    put_attr_str(file_, "rng_state", kRngState, p);
    put_attr_str(file_, "deck", deck_text, p);
    put_attr_str(file_, "layout", layout, p);
    put_attr_str(file_, "moment_dtype", "none", p);
    put_attr_str(file_, "checksum_algorithm", kChecksumAlgorithm, p);
    for (const auto& [k, v] : extra_attrs) put_attr_str(file_, k.c_str(), v, p);
    H5Id gcpl(H5_CHECK(H5Pcreate(H5P_GROUP_CREATE), p, "group properties"), H5Pclose);
    H5_CHECK(H5Pset_obj_track_times(gcpl, false), p, "group properties");
    std::vector<std::string> made;
    for (const CheckpointDataset& d : datasets_) {
      DSV3_CHECK(d.name.size() > 1 && d.name[0] == '/', "checkpoint " << p << ": dataset name '" << d.name
                                                                      << "' is not absolute");
      for (size_t pos = d.name.find('/', 1); pos != std::string::npos; pos = d.name.find('/', pos + 1)) {
        const std::string g = d.name.substr(0, pos);
        if (std::find(made.begin(), made.end(), g) != made.end()) continue;
        H5Id gid(H5_CHECK(H5Gcreate2(file_, g.c_str(), H5P_DEFAULT, gcpl, H5P_DEFAULT), p, "group " << g), H5Gclose);
        made.push_back(g);
      }
    }
    for (size_t i = 0; i < datasets_.size(); ++i) {
      const CheckpointDataset& d = datasets_[i];
      const std::vector<hsize_t> dims(d.shape.begin(), d.shape.end());
      H5Id space(H5_CHECK(H5Screate_simple((int)dims.size(), dims.data(), nullptr), p, "dataset " << d.name), H5Sclose);
      H5Id dcpl(H5_CHECK(H5Pcreate(H5P_DATASET_CREATE), p, "dataset " << d.name), H5Pclose);
      H5_CHECK(H5Pset_layout(dcpl, H5D_CONTIGUOUS), p, "dataset " << d.name);
      H5_CHECK(H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY), p, "dataset " << d.name);
      H5_CHECK(H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER), p, "dataset " << d.name);
      H5_CHECK(H5Pset_obj_track_times(dcpl, false), p, "dataset " << d.name);
      dsets_[i] = H5_CHECK(H5Dcreate2(file_, d.name.c_str(), H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT),
                           p, "creating dataset " << d.name);
      put_attr_u64(dsets_[i], "checksum", 0, p, d.name);
    }
    H5_CHECK(H5Fflush(file_, H5F_SCOPE_GLOBAL), p, "flushing the metadata");
  } catch (const std::exception& e) {
    err = e.what();
  }
  if (comm ? comm->any(!err.empty()) : !err.empty()) abandon(err);
}

int64_t CheckpointFileWriter::data_bytes() const {
  int64_t bytes = 0;
  for (const CheckpointDataset& d : datasets_) {
    int64_t n = 4;
    for (int64_t s : d.shape) n *= s;
    bytes += n;
  }
  return bytes;
}

void CheckpointFileWriter::abandon(std::string err) {
  for (int64_t& d : dsets_)
    if (d >= 0) H5Dclose(d), d = -1;
  if (dxpl_ >= 0) H5Pclose(dxpl_), dxpl_ = -1;
  const hid_t f = file_;
  file_ = -1;
  const std::string why = abandon_file(comm_, f, tmp_path_, dir_, data_bytes(), 0);
  const std::string msg = failed_save_message(final_path_, why, first_error(comm_, err));
  throw Error(!comm_ || comm_->rank() == 0 ? msg : "");
}

void CheckpointFileWriter::close_all() noexcept {
  for (int64_t& d : dsets_)
    if (d >= 0) H5Dclose(d), d = -1;
  if (dxpl_ >= 0) H5Pclose(dxpl_), dxpl_ = -1;
  if (file_ >= 0) H5Fclose(file_), file_ = -1;
}

CheckpointFileWriter::~CheckpointFileWriter() { close_all(); }

void CheckpointFileWriter::write(size_t i, int64_t first, int64_t n, const float* x) {
  DSV3_CHECK(i < datasets_.size() && file_ >= 0, "checkpoint " << tmp_path_ << ": write to dataset #" << i
                                                               << " of a closed or unknown dataset");
  const CheckpointDataset& d = datasets_[i];
  int64_t numel = 1;
  for (int64_t s : d.shape) numel *= s;
  DSV3_CHECK(first >= 0 && n >= 0 && first + n <= numel, "checkpoint " << tmp_path_ << ": dataset " << d.name
                                                                       << ": elements [" << first << ", " << first + n
                                                                       << ") are outside its " << numel);
  if (n == 0) return;
  transfer_range(true, dsets_[i], dxpl_, d.name, d.shape, first, n, const_cast<float*>(x), tmp_path_);
  sums_[i] += checkpoint_checksum(x, n, first);
}

SaveResult CheckpointFileWriter::finish(const std::string& local_error) {
  const bool root = !comm_ || comm_->rank() == 0;
  DSV3_CHECK(file_ >= 0, "checkpoint " << tmp_path_ << ": finish() called twice");
  std::string err = local_error;
  bool failed = comm_ ? comm_->any(!err.empty()) : !err.empty();
  if (!failed) {
    allreduce_checksums(comm_, sums_);
    try {
      for (size_t i = 0; i < datasets_.size(); ++i)
        set_attr_u64(dsets_[i], "checksum", sums_[i], tmp_path_, datasets_[i].name);
      for (int64_t& d : dsets_) H5_CHECK(H5Dclose(d), tmp_path_, "closing a dataset"), d = -1;
      H5_CHECK(H5Fflush(file_, H5F_SCOPE_GLOBAL), tmp_path_, "flushing the file");
    } catch (const std::exception& e) {
      err = e.what();
    }
    failed = comm_ ? comm_->any(!err.empty()) : !err.empty();
  }
  if (failed) abandon(err);
  try {
    const hid_t f = file_;
    file_ = -1;
    H5_CHECK(H5Fclose(f), tmp_path_, "closing the file");
  } catch (const std::exception& e) {
    err = e.what();
  }
  close_all();
  agree(comm_, err, "writing checkpoint " + tmp_path_);
  SaveResult res;
  res.path = final_path_;
  if (root) {
    try {
      res.bytes = publish(dir_, tmp_path_, final_path_, iteration_, /*keep: no pruning*/ -1);
    } catch (const std::exception& e) {
      err = e.what();
    }
  }
  std::string root_err = err;
  if (comm_) comm_->bcast_string(root_err);
  if (!root_err.empty()) throw Error(root ? root_err : "");
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count() - t0_;
  return res;
}

CheckpointFileReader::CheckpointFileReader(const std::string& file_or_dir) {
  quiet_hdf5();
  std::error_code ec;
  path_ = file_or_dir;
  if (fs::is_directory(file_or_dir, ec)) {
    const auto latest = read_latest(file_or_dir);
    DSV3_CHECK(latest, "checkpoint directory " << file_or_dir << " has no 'latest' file");
    path_ = *latest;
  }
  DSV3_CHECK(fs::exists(path_, ec), "checkpoint " << path_ << " does not exist");
  H5Id fapl(make_fapl(nullptr, path_), H5Pclose);
  file_ = H5_CHECK(H5Fopen(path_.c_str(), H5F_ACC_RDONLY, fapl), path_, "opening the file");
  try {
    int64_t adam_t = 0;
    read_state(file_, path_, &adam_t);
  } catch (...) {
    H5Fclose(file_);
    throw;
  }
}

CheckpointFileReader::~CheckpointFileReader() {
  if (open_ >= 0) H5Dclose(open_);
  if (file_ >= 0) H5Fclose(file_);
}

CheckpointInfo CheckpointFileReader::info() const { return read_info(file_, path_); }

std::string CheckpointFileReader::attr(const std::string& name) const { return get_attr_str(file_, name.c_str(), path_); }

std::vector<std::string> CheckpointFileReader::datasets() const {
  std::vector<std::string> names;
  H5_CHECK(H5Ovisit(file_, H5_INDEX_NAME, H5_ITER_NATIVE, collect_datasets, &names), path_, "listing the datasets");
  return names;
}

bool CheckpointFileReader::has(const std::string& dataset) const { return link_exists(file_, dataset, path_); }

int64_t CheckpointFileReader::open_dataset(const std::string& dataset) const {
  if (open_ >= 0 && open_name_ == dataset) return open_;
  if (open_ >= 0) H5Dclose(open_), open_ = -1;
  DSV3_CHECK(link_exists(file_, dataset, path_), "checkpoint " << path_ << ": dataset " << dataset << " is missing");
  open_ = H5_CHECK(H5Dopen2(file_, dataset.c_str(), H5P_DEFAULT), path_, "opening dataset " << dataset);
  open_name_ = dataset;
  return open_;
}

std::vector<int64_t> CheckpointFileReader::shape(const std::string& dataset) const {
  const hid_t d = open_dataset(dataset);
  std::vector<int64_t> sh = dataset_shape(d, dataset, path_);
  check_stored(d, dataset, sh, path_);
  return sh;
}

uint64_t CheckpointFileReader::stored_checksum(const std::string& dataset) const {
  return get_attr_u64(open_dataset(dataset), "checksum", path_, dataset);
}

void CheckpointFileReader::read(const std::string& dataset, int64_t first, int64_t n, float* out) const {
  if (n <= 0) return;
  const std::vector<int64_t> sh = shape(dataset);
  int64_t numel = 1;
  for (int64_t s : sh) numel *= s;
  DSV3_CHECK(first >= 0 && first <= numel && n <= numel - first,  // (first + n could overflow)
             "checkpoint " << path_ << ": dataset " << dataset << ": " << n << " elements from element " << first
                           << " are outside its " << numel);
  transfer_range(false, open_dataset(dataset), H5P_DEFAULT, dataset, sh, first, n, out, path_);
}

}  // namespace dsv3
