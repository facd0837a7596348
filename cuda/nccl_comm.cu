// defines: dsv3::NcclComm (parallel/nccl_comm.h) — part of the comm module: every NCCL call of the project is in this
// file (the MPI calls are in parallel/comm.cpp; NCCL's unique ids travel through Comm::broadcast_bytes). The stream,
// event, timing and single-rank contracts are documented in parallel/nccl_comm.h.
// Compiled into the dsv3nccl library (CMake: only with the CUDA backend and when nccl.h / libnccl are found).
// No kernels: the .cu suffix only puts it in the CUDA toolchain's hands (nvcc, CUDA include paths).
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda_backend.cuh"  // cuda_device_usable, cuda_select_device
#include "cuda_check.cuh"
#include "parallel/nccl_comm.h"

// Every NCCL call goes through this: NCCL's error string, its last detailed message and the call site.
#define DSV3_NCCL_CHECK(call)                                                                                  \
  do {                                                                                                         \
    const ncclResult_t dsv3_nccl_rc_ = (call);                                                                 \
    if (dsv3_nccl_rc_ != ncclSuccess) {                                                                        \
      const char* dsv3_nccl_last_ = ncclGetLastError(nullptr);                                                 \
      DSV3_FAIL("NCCL call " #call " failed: " << ncclGetErrorString(dsv3_nccl_rc_)                            \
                                                << (dsv3_nccl_last_ && *dsv3_nccl_last_                        \
                                                        ? std::string(" (") + dsv3_nccl_last_ + ")"            \
                                                        : std::string()));                                     \
    }                                                                                                          \
  } while (0)

namespace dsv3 {

namespace {

constexpr int kKinds = (int)GroupKind::embd + 1;
constexpr int kLanes = 3;

template <class T>
struct NcclType;
template <>
struct NcclType<float> {
  static constexpr ncclDataType_t value = ncclFloat32;
};
template <>
struct NcclType<double> {
  static constexpr ncclDataType_t value = ncclFloat64;
};
template <>
struct NcclType<int64_t> {
  static constexpr ncclDataType_t value = ncclInt64;
};
template <>
struct NcclType<uint16_t> {  // BF16 bit patterns: the only 16-bit type the comm module carries
  static constexpr ncclDataType_t value = ncclBfloat16;
};

// ncclGroupStart .. ncclGroupEnd; the destructor closes a group left open by an error (NCCL's state stays sane)
struct NcclGroup {
  bool open = false;
  NcclGroup() {
    DSV3_NCCL_CHECK(ncclGroupStart());
    open = true;
  }
  void end() {
    open = false;
    DSV3_NCCL_CHECK(ncclGroupEnd());
  }
  ~NcclGroup() {
    if (open) ncclGroupEnd();
  }
};

std::string hex(const unsigned char* b, int n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < n; ++i) {
    s += digits[b[i] >> 4];
    s += digits[b[i] & 15];
  }
  return s;
}

}  // namespace

struct NcclComm::Impl {
  const Comm* comm = nullptr;
  int device = 0;
  cudaStream_t compute = nullptr;     // the caller's; not owned
  cudaStream_t lanes[kLanes] = {};    // owned, non-blocking, highest priority
  ncclComm_t nccl[kKinds] = {};       // null: a group of one rank served by copies
  cudaEvent_t ready = nullptr;        // compute stream -> lane (inputs), no timing
  cudaEvent_t joined = nullptr;       // lane -> compute stream (results), no timing
  struct Timed {
    cudaEvent_t start, stop;
    int kind;
  };
  std::vector<Timed> pending;       // recorded, not yet folded into seconds
  std::vector<cudaEvent_t> pool;    // timing events to reuse
  size_t fold_at = 256;
  double seconds[kKinds] = {};
  bool failed = false;  // an operation threw: the destructor aborts the communicators instead of waiting
  bool device_set = false;  // the constructor got as far as cudaSetDevice (else the destructor calls no CUDA)

  cudaStream_t lane(GroupKind k) const { return lanes[(int)lane_of(k)]; }

  cudaEvent_t take_event() {
    if (!pool.empty()) {
      cudaEvent_t e = pool.back();
      pool.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    DSV3_CUDA_CHECK(cudaEventCreate(&e));
    return e;
  }

  // Adds the elapsed time of the recorded operations to their kinds: all of them (wait), or those complete by now.
  void fold(bool wait) {
    size_t kept = 0;
    for (size_t i = 0; i < pending.size(); ++i) {
      Timed& t = pending[i];
      if (wait) {
        DSV3_CUDA_CHECK(cudaEventSynchronize(t.stop));
      } else {
        const cudaError_t q = cudaEventQuery(t.stop);
        if (q == cudaErrorNotReady) {
          pending[kept++] = t;
          continue;
        }
        DSV3_CUDA_CHECK(q);
      }
      float ms = 0;
      DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, t.start, t.stop));
      seconds[t.kind] += ms * 1e-3;
      pool.push_back(t.start);
      pool.push_back(t.stop);
    }
    pending.resize(kept);
    fold_at = std::max<size_t>(256, 2 * pending.size());
  }

  // One operation on group k's lane: the lane waits for the compute stream's work so far (the inputs), then `f`
  // enqueues the work between two timing events. f(stream, communicator or null).
  template <class F>
  void run(GroupKind k, F&& f) {
    try {
      DSV3_CUDA_CHECK(cudaSetDevice(device));
      cudaStream_t s = lane(k);
      DSV3_CUDA_CHECK(cudaEventRecord(ready, compute));
      DSV3_CUDA_CHECK(cudaStreamWaitEvent(s, ready, 0));
      Timed t{take_event(), take_event(), (int)k};
      pool.push_back(t.start);  // back to the pool unless recorded below
      pool.push_back(t.stop);
      DSV3_CUDA_CHECK(cudaEventRecord(t.start, s));
      f(s, nccl[(int)k]);
      DSV3_CUDA_CHECK(cudaEventRecord(t.stop, s));
      pool.pop_back();
      pool.pop_back();
      pending.push_back(t);
      if (pending.size() >= fold_at) fold(false);
    } catch (...) {
      failed = true;
      throw;
    }
  }

  void copy(void* dst, const void* src, size_t bytes, cudaStream_t s) {
    if (dst != src && bytes) DSV3_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s));
  }

  void check_async(GroupKind k) {
    ncclComm_t nc = nccl[(int)k];
    if (!nc) return;
    ncclResult_t st = ncclSuccess;
    DSV3_NCCL_CHECK(ncclCommGetAsyncError(nc, &st));
    if (st != ncclSuccess && st != ncclInProgress) {
      failed = true;
      DSV3_FAIL("NCCL: asynchronous error on the " << group_name(k) << " communicator of rank " << comm->rank()
                                                     << ": " << ncclGetErrorString(st));
    }
  }

  ~Impl() {
    // no throwing from here (failures are reported on stderr); after an error, waiting for peers that may be gone
    // could hang: abort instead
    if (!device_set) return;  // nothing of CUDA or NCCL was created
    const bool abort = failed || std::uncaught_exceptions() > 0;
    cudaSetDevice(device);
    if (!abort)
      for (cudaStream_t s : lanes)
        if (s) cudaStreamSynchronize(s);
    for (int k = 0; k < kKinds; ++k) {
      ncclComm_t& nc = nccl[k];
      if (!nc) continue;
      ncclResult_t rc = ncclSuccess;
      if (abort) {
        rc = ncclCommAbort(nc);
      } else {  // NCCL's recommended order: flush, then free (every rank destroys in GroupKind order)
        rc = ncclCommFinalize(nc);
        if (rc == ncclSuccess) rc = ncclCommDestroy(nc);
        else ncclCommAbort(nc);
      }
      if (rc != ncclSuccess)
        std::fprintf(stderr, "dsv3: warning: rank %d: freeing the NCCL %s communicator: %s\n", comm->rank(),
                     group_name((GroupKind)k), ncclGetErrorString(rc));
      nc = nullptr;
    }
    for (Timed& t : pending) {
      cudaEventDestroy(t.start);
      cudaEventDestroy(t.stop);
    }
    for (cudaEvent_t e : pool) cudaEventDestroy(e);
    if (ready) cudaEventDestroy(ready);
    if (joined) cudaEventDestroy(joined);
    for (cudaStream_t s : lanes)
      if (s) cudaStreamDestroy(s);
  }
};

// ---- construction ------------------------------------------------------------------------------------------------

NcclComm::NcclComm(const Comm& comm, const NcclOptions& opt) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.comm = &comm;
  m.compute = static_cast<cudaStream_t>(opt.compute_stream);
  const int world = comm.size(), me = comm.rank();
  const std::vector<int> nodes = comm.group_nodes(GroupKind::world);  // collective

  // 1. this rank's device. Local failures are agreed on before anything collective, so that no rank waits for one
  //    that has already given up.
  std::string local_error;
  int device_count = 0;
  unsigned char uuid[16] = {};
  try {
    std::string reason;
    DSV3_CHECK(cuda_device_usable(&reason), "NCCL: no usable CUDA device on rank " << me << " (" << reason << ")");
    DSV3_CUDA_CHECK(cudaGetDeviceCount(&device_count));
    const int hint = opt.device_hint >= 0 ? opt.device_hint : node_local_rank(nodes, me);
    m.device = cuda_select_device(hint, device_count);
    m.device_set = true;
    DSV3_CUDA_CHECK(cudaSetDevice(m.device));
    DSV3_CUDA_CHECK(cudaFree(nullptr));  // the context now: a broken device fails here
    int current = -1;
    DSV3_CUDA_CHECK(cudaGetDevice(&current));
    DSV3_CHECK(current == m.device, "NCCL: rank " << me << " selected CUDA device " << m.device
                                                  << " but the current device is " << current);
    cudaDeviceProp prop{};
    DSV3_CUDA_CHECK(cudaGetDeviceProperties(&prop, m.device));
    std::copy(prop.uuid.bytes, prop.uuid.bytes + 16, uuid);
  } catch (const Error& e) {
    local_error = e.what();
  }
  if (comm.any(!local_error.empty())) {
    if (!local_error.empty()) throw Error(local_error);  // already one line with its file:line
    DSV3_FAIL("NCCL: CUDA device setup failed on another rank");
  }

  // 2. no two ranks of a node on one GPU: (node, device, count, uuid) of every rank, summed into place
  constexpr int kFields = 5;
  std::vector<int64_t> info((size_t)world * kFields, 0);
  int64_t* mine = info.data() + (size_t)me * kFields;
  mine[0] = nodes[me];
  mine[1] = m.device;
  mine[2] = device_count;
  std::copy(uuid, uuid + 16, reinterpret_cast<unsigned char*>(mine + 3));
  comm.allreduce_sum(GroupKind::world, info.data(), (int64_t)info.size());
  std::vector<RankDevice> devices(world);
  for (int r = 0; r < world; ++r) {
    const int64_t* f = info.data() + (size_t)r * kFields;
    devices[r] = {r, (int)f[0], (int)f[1], (int)f[2], hex(reinterpret_cast<const unsigned char*>(f + 3), 16)};
  }
  check_distinct_devices(devices);  // the same verdict on every rank

  // 3. lanes at the highest priority (communication kernels are short and gate compute), events
  int least = 0, greatest = 0;
  DSV3_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  for (cudaStream_t& s : m.lanes) DSV3_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest));
  DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&m.ready, cudaEventDisableTiming));
  DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&m.joined, cudaEventDisableTiming));

  // 4. one communicator per group kind of more than one rank, in GroupKind order on every rank
  for (int k = 0; k < kKinds; ++k) {
    const GroupKind kind = (GroupKind)k;
    const int size = comm.group_size(kind), rank = comm.group_rank(kind);
    if (size == 1 && !opt.singleton_comms) continue;
    ncclUniqueId id{};
    if (rank == 0) DSV3_NCCL_CHECK(ncclGetUniqueId(&id));
    comm.broadcast_bytes(kind, &id, (int64_t)sizeof id, 0);
    try {
      DSV3_NCCL_CHECK(ncclCommInitRank(&m.nccl[k], size, id, rank));
    } catch (const Error& e) {
      m.failed = true;
      DSV3_FAIL("NCCL: the " << group_name(kind) << " communicator (" << size << " ranks) of rank " << me
                             << " on CUDA device " << m.device << ": " << e.what());
    }
  }
}

NcclComm::~NcclComm() = default;

int NcclComm::device() const { return impl_->device; }
const Comm& NcclComm::comm() const { return *impl_->comm; }
bool NcclComm::has_nccl(GroupKind k) const { return impl_->nccl[(int)k] != nullptr; }
void* NcclComm::stream(CommLane l) const { return impl_->lanes[(int)l]; }
void* NcclComm::compute_stream() const { return impl_->compute; }

// ---- streams ---------------------------------------------------------------------------------------------------

void NcclComm::join(CommLane l, void* stream) {
  Impl& m = *impl_;
  cudaStream_t target = stream ? static_cast<cudaStream_t>(stream) : m.compute;
  DSV3_CUDA_CHECK(cudaEventRecord(m.joined, m.lanes[(int)l]));
  DSV3_CUDA_CHECK(cudaStreamWaitEvent(target, m.joined, 0));
}

void NcclComm::join_all(void* stream) {
  for (int l = 0; l < kLanes; ++l) join((CommLane)l, stream);
}

void NcclComm::synchronize(CommLane l) {
  Impl& m = *impl_;
  const cudaError_t err = cudaStreamSynchronize(m.lanes[(int)l]);
  if (err != cudaSuccess) m.failed = true;
  DSV3_CUDA_CHECK(err);
  for (int k = 0; k < kKinds; ++k)
    if (lane_of((GroupKind)k) == l) m.check_async((GroupKind)k);
}

void NcclComm::synchronize() {
  for (int l = 0; l < kLanes; ++l) synchronize((CommLane)l);
}

CommTimes NcclComm::times() {
  Impl& m = *impl_;
  m.fold(true);
  const double* s = m.seconds;
  return {s[(int)GroupKind::world], s[(int)GroupKind::tp], s[(int)GroupKind::dp],
          s[(int)GroupKind::pp],    s[(int)GroupKind::ep], s[(int)GroupKind::edp]};
}

// ---- collectives ------------------------------------------------------------------------------------------------

namespace {

template <class T>
void allreduce_impl(NcclComm::Impl& m, GroupKind k, T* x, int64_t n, const char* op) {
  const size_t c = nccl_count(n, sizeof(T), op);
  if (c == 0) return;
  m.run(k, [&](cudaStream_t s, ncclComm_t nc) {
    if (nc) DSV3_NCCL_CHECK(ncclAllReduce(x, x, c, NcclType<T>::value, ncclSum, nc, s));
    // one rank without a communicator: the sum is x itself
  });
}

template <class T>
void reduce_scatter_impl(NcclComm::Impl& m, GroupKind k, const T* in, T* out, int64_t chunk, const char* op) {
  const int size = m.comm->group_size(k);
  const size_t c = nccl_count(chunk, sizeof(T), op);
  nccl_count(chunk, sizeof(T) * size, op);  // the input (size * chunk) is addressable too
  if (c == 0) return;
  m.run(k, [&](cudaStream_t s, ncclComm_t nc) {
    if (nc) DSV3_NCCL_CHECK(ncclReduceScatter(in, out, c, NcclType<T>::value, ncclSum, nc, s));
    else m.copy(out, in, c * sizeof(T), s);
  });
}

template <class T>
void allgather_impl(NcclComm::Impl& m, GroupKind k, const T* in, T* out, int64_t chunk, const char* op) {
  const int size = m.comm->group_size(k);
  const size_t c = nccl_count(chunk, sizeof(T), op);
  nccl_count(chunk, sizeof(T) * size, op);
  if (c == 0) return;
  m.run(k, [&](cudaStream_t s, ncclComm_t nc) {
    if (nc) DSV3_NCCL_CHECK(ncclAllGather(in, out, c, NcclType<T>::value, nc, s));
    else m.copy(out, in, c * sizeof(T), s);
  });
}

template <class T>
void broadcast_impl(NcclComm::Impl& m, GroupKind k, T* x, int64_t n, int root, const char* op) {
  const int size = m.comm->group_size(k);
  DSV3_CHECK(root >= 0 && root < size, "NCCL " << op << ": root " << root << " in a " << group_name(k)
                                               << " group of " << size);
  const size_t c = nccl_count(n, sizeof(T), op);
  if (c == 0) return;
  m.run(k, [&](cudaStream_t s, ncclComm_t nc) {
    if (nc) DSV3_NCCL_CHECK(ncclBroadcast(x, x, c, NcclType<T>::value, root, nc, s));
  });
}

// displacements (prefix sums) of per-rank counts, each checked
std::vector<size_t> displacements(const std::vector<int64_t>& counts, size_t elem, const char* op) {
  std::vector<size_t> d(counts.size() + 1, 0);
  for (size_t i = 0; i < counts.size(); ++i) {
    const size_t c = nccl_count(counts[i], elem, op);
    d[i + 1] = d[i] + c;
    DSV3_CHECK(d[i + 1] >= d[i] && d[i + 1] <= SIZE_MAX / elem,
               "NCCL " << op << ": displacement beyond what a size_t addresses");
  }
  return d;
}

template <class T>
void alltoallv_impl(NcclComm::Impl& m, GroupKind k, const T* send, const std::vector<int64_t>& sc, T* recv,
                    const std::vector<int64_t>& rc, const char* op) {
  const int size = m.comm->group_size(k);
  DSV3_CHECK((int)sc.size() == size && (int)rc.size() == size,
             "NCCL " << op << ": counts for " << sc.size() << " / " << rc.size() << " ranks in a "
                     << group_name(k) << " group of " << size);
  const std::vector<size_t> sd = displacements(sc, sizeof(T), op), rd = displacements(rc, sizeof(T), op);
  m.run(k, [&](cudaStream_t s, ncclComm_t nc) {
    if (!nc) {
      DSV3_CHECK(sc[0] == rc[0], "NCCL " << op << ": one rank sends " << sc[0] << " elements to itself but expects "
                                         << rc[0]);
      m.copy(recv, send, (size_t)sc[0] * sizeof(T), s);
      return;
    }
    NcclGroup group;
    for (int p = 0; p < size; ++p) {
      if (sc[p]) DSV3_NCCL_CHECK(ncclSend(send + sd[p], (size_t)sc[p], NcclType<T>::value, p, nc, s));
      if (rc[p]) DSV3_NCCL_CHECK(ncclRecv(recv + rd[p], (size_t)rc[p], NcclType<T>::value, p, nc, s));
    }
    group.end();
  });
}

}  // namespace

void NcclComm::allreduce_sum(GroupKind k, float* x, int64_t n) { allreduce_impl(*impl_, k, x, n, "allreduce"); }
void NcclComm::allreduce_sum(GroupKind k, double* x, int64_t n) { allreduce_impl(*impl_, k, x, n, "allreduce"); }
void NcclComm::allreduce_sum(GroupKind k, int64_t* x, int64_t n) { allreduce_impl(*impl_, k, x, n, "allreduce"); }
void NcclComm::allreduce_sum_bf16(GroupKind k, uint16_t* x, int64_t n) {
  allreduce_impl(*impl_, k, x, n, "allreduce_bf16");
}

void NcclComm::reduce_scatter(GroupKind k, const float* in, float* out, int64_t chunk) {
  reduce_scatter_impl(*impl_, k, in, out, chunk, "reduce_scatter");
}
void NcclComm::reduce_scatter_bf16(GroupKind k, const uint16_t* in, uint16_t* out, int64_t chunk) {
  reduce_scatter_impl(*impl_, k, in, out, chunk, "reduce_scatter_bf16");
}

void NcclComm::allgather(GroupKind k, const float* in, float* out, int64_t chunk) {
  allgather_impl(*impl_, k, in, out, chunk, "allgather");
}
void NcclComm::allgather_bf16(GroupKind k, const uint16_t* in, uint16_t* out, int64_t chunk) {
  allgather_impl(*impl_, k, in, out, chunk, "allgather_bf16");
}

void NcclComm::broadcast(GroupKind k, int64_t* x, int64_t n, int root) {
  broadcast_impl(*impl_, k, x, n, root, "broadcast");
}
void NcclComm::broadcast(GroupKind k, float* x, int64_t n, int root) {
  broadcast_impl(*impl_, k, x, n, root, "broadcast");
}

void NcclComm::alltoall(GroupKind k, const int64_t* send, int64_t* recv, int64_t per_rank) {
  Impl& m = *impl_;
  const int size = m.comm->group_size(k);
  const size_t c = nccl_count(per_rank, sizeof(int64_t), "alltoall");
  nccl_count(per_rank, sizeof(int64_t) * size, "alltoall");
  if (c == 0) return;
  m.run(k, [&](cudaStream_t s, ncclComm_t nc) {
    if (!nc) {
      m.copy(recv, send, c * sizeof(int64_t), s);
      return;
    }
    NcclGroup group;
    for (int p = 0; p < size; ++p) {
      DSV3_NCCL_CHECK(ncclSend(send + p * c, c, ncclInt64, p, nc, s));
      DSV3_NCCL_CHECK(ncclRecv(recv + p * c, c, ncclInt64, p, nc, s));
    }
    group.end();
  });
}

void NcclComm::alltoallv(GroupKind k, const float* send, const std::vector<int64_t>& sc, float* recv,
                         const std::vector<int64_t>& rc) {
  alltoallv_impl(*impl_, k, send, sc, recv, rc, "alltoallv");
}
void NcclComm::alltoallv_bf16(GroupKind k, const uint16_t* send, const std::vector<int64_t>& sc, uint16_t* recv,
                              const std::vector<int64_t>& rc) {
  alltoallv_impl(*impl_, k, send, sc, recv, rc, "alltoallv_bf16");
}

// ---- pipeline point-to-point ---------------------------------------------------------------------------------------

namespace {
void check_peer(const NcclComm::Impl& m, int peer, const char* op, bool self_ok) {
  const int size = m.comm->group_size(GroupKind::pp), me = m.comm->group_rank(GroupKind::pp);
  DSV3_CHECK(peer >= 0 && peer < size, "NCCL " << op << ": stage " << peer << " in a pipeline of " << size);
  DSV3_CHECK(self_ok || peer != me, "NCCL " << op << ": stage " << me
                                            << " to itself (a send and its receive on one lane need pp_sendrecv)");
}
}  // namespace

void NcclComm::pp_send(const float* x, int64_t n, int to) {
  Impl& m = *impl_;
  check_peer(m, to, "pp_send", false);
  const size_t c = nccl_count(n, sizeof(float), "pp_send");
  m.run(GroupKind::pp, [&](cudaStream_t s, ncclComm_t nc) {
    if (c) DSV3_NCCL_CHECK(ncclSend(x, c, ncclFloat32, to, nc, s));
  });
}

void NcclComm::pp_recv(float* x, int64_t n, int from) {
  Impl& m = *impl_;
  check_peer(m, from, "pp_recv", false);
  const size_t c = nccl_count(n, sizeof(float), "pp_recv");
  m.run(GroupKind::pp, [&](cudaStream_t s, ncclComm_t nc) {
    if (c) DSV3_NCCL_CHECK(ncclRecv(x, c, ncclFloat32, from, nc, s));
  });
}

void NcclComm::pp_sendrecv(const float* send, int64_t n_send, int to, float* recv, int64_t n_recv, int from) {
  Impl& m = *impl_;
  const size_t cs = nccl_count(n_send, sizeof(float), "pp_sendrecv"),
               cr = nccl_count(n_recv, sizeof(float), "pp_sendrecv");
  if (cs) check_peer(m, to, "pp_sendrecv", true);
  if (cr) check_peer(m, from, "pp_sendrecv", true);
  m.run(GroupKind::pp, [&](cudaStream_t s, ncclComm_t nc) {
    if (!nc) {  // one stage: to == from == 0, the message is a copy
      DSV3_CHECK(cs == cr, "NCCL pp_sendrecv: one stage sends " << cs << " elements to itself but receives " << cr);
      m.copy(recv, send, cs * sizeof(float), s);
      return;
    }
    NcclGroup group;
    if (cs) DSV3_NCCL_CHECK(ncclSend(send, cs, ncclFloat32, to, nc, s));
    if (cr) DSV3_NCCL_CHECK(ncclRecv(recv, cr, ncclFloat32, from, nc, s));
    group.end();
  });
}

}  // namespace dsv3
