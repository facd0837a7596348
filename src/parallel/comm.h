// defines: dsv3::Comm — the comm module's CPU path, the only code that touches MPI; GroupKind.
// Group operations are named by intent (ep_alltoallv, dp_reduce_scatter, ...) over communicators built once from
// the topology (parallel/topology.h); every MPI call is checked and reports file:line. A program started without
// mpirun is a world of one rank: every operation then has its single-rank meaning (a copy or nothing).
// The same operations on device pointers over NCCL are dsv3::NcclComm (parallel/nccl_comm.h, cuda/nccl_comm.cu: the
// only code that touches NCCL), built from a Comm: MPI carries its NCCL ids. Under run.device = cuda with more than
// one rank the driver gives Comm an NCCL DeviceTransport: the float collectives on device memory (gradients,
// tensor-parallel activations, the MoE all-to-all) then go over NCCL, everything else stays on MPI.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dsv3 {

struct Groups;

// embd: the first and the last pipeline stage of a (tp, dp) position, which both hold the word embedding
enum class GroupKind { world, tp, dp, pp, ep, etp, edp, embd };

// Seconds spent inside the collectives of each kind of group since the start (the per-phase times of the log).
struct CommTimes {
  double world = 0, tp = 0, dp = 0, pp = 0, ep = 0, edp = 0;
  double total() const { return world + tp + dp + pp + ep + edp; }
  CommTimes operator-(const CommTimes& o) const {
    return {world - o.world, tp - o.tp, dp - o.dp, pp - o.pp, ep - o.ep, edp - o.edp};
  }
};

// The float collectives over another transport than MPI: NCCL (parallel/nccl_comm.h: make_nccl_transport) when
// run.device = cuda. Buffers are device memory (the device-resident model's Buffers, core/memory.h) or host memory
// (a few small tensors: the transport stages those through the device). Every operation has finished when it
// returns, as Comm's own do, but the started all-to-all (alltoallv_start / alltoallv_wait).
class DeviceTransport {
 public:
  virtual ~DeviceTransport() = default;
  virtual const char* name() const = 0;
  virtual void allreduce_sum(GroupKind k, float* x, int64_t n) = 0;
  virtual void reduce_scatter(GroupKind k, const float* in, float* out, int64_t chunk) = 0;
  virtual void allgather(GroupKind k, const float* in, float* out, int64_t chunk) = 0;
  virtual void broadcast(GroupKind k, float* x, int64_t n, int root) = 0;
  virtual void alltoallv(GroupKind k, const float* send, const std::vector<int64_t>& send_counts, float* recv,
                         const std::vector<int64_t>& recv_counts) = 0;
  // The started form (Comm::alltoallv_start): the exchange is queued behind the work queued so far and may still be
  // in flight when this returns true; alltoallv_wait(k) then orders the work queued after it behind the exchange (on
  // the device: the host need not wait). The default runs the blocking form and returns false (finished).
  virtual bool alltoallv_start(GroupKind k, const float* send, const std::vector<int64_t>& send_counts, float* recv,
                               const std::vector<int64_t>& recv_counts) {
    alltoallv(k, send, send_counts, recv, recv_counts);
    return false;
  }
  virtual void alltoallv_wait(GroupKind) {}
};

// An exchange started by Comm::alltoallv_start: its send and receive buffers (and counts) belong to it until
// Comm::wait. Destroying one still in flight completes it (an exception unwinding past the overlap leaves no transfer
// writing into freed memory): MPI's on the host (MPI_Wait); a device transport's is joined into the compute stream,
// so that the device's later work (a freed buffer's next use included) is ordered behind it; the host does not wait.
class CommRequest {
 public:
  CommRequest();
  ~CommRequest();
  CommRequest(CommRequest&&) noexcept;
  CommRequest& operator=(CommRequest&&) noexcept;
  CommRequest(const CommRequest&) = delete;
  CommRequest& operator=(const CommRequest&) = delete;
  bool pending() const;

 private:
  friend class Comm;
  struct State;
  std::unique_ptr<State> s_;
};

class Comm {
 public:
  // MPI_Init_thread (FUNNELED) unless already initialised; safe to construct once per process.
  // With DSV3_NO_MPI=1 in the environment: one process that never calls MPI (no mpirun or MPI runtime needed).
  Comm(int* argc, char*** argv);
  bool uses_mpi() const { return mpi_; }
  ~Comm();  // frees the group communicators; MPI_Finalize when this object initialised MPI
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  void barrier() const;
  // world broadcast of a string from `root` (the deck, the config): resized on the receivers
  void bcast_string(std::string& s, int root = 0) const;
  // `bytes` raw bytes from the group's rank `root` to the other members (an NCCL unique id, ...)
  void broadcast_bytes(GroupKind k, void* data, int64_t bytes, int root = 0) const;
  // every rank learns whether any rank failed (an error on rank 0 while reading the deck stops all ranks cleanly)
  bool any(bool flag) const;
  [[noreturn]] void abort(int code) const;

  // Builds one communicator per group kind from this rank's member lists (collective over the world: every rank
  // calls it with its own Groups).
  void set_groups(const Groups& g);
  int group_rank(GroupKind k) const;
  int group_size(GroupKind k) const;
  CommTimes times() const;
  // Float collectives of more than one rank go through the transport (whatever the buffers: the choice must be the
  // same on every rank, and a rank with nothing to send has no buffer to judge by); the integer and double ones,
  // broadcast_bytes and the pipeline's point-to-point stay on MPI. nullptr: MPI only. The transport must outlive its
  // use; the caller keeps ownership.
  void set_device_transport(DeviceTransport* t) { transport_ = t; }
  DeviceTransport* device_transport() const { return transport_; }
  // The node (shared-memory domain) of each rank of a group, in group-rank order, nodes numbered by their first
  // appearance in that order (0, 1, ...). Collective over the world.
  std::vector<int> group_nodes(GroupKind k) const;
  // The MPI communicator of a group as an opaque handle (MPI_Comm), for libraries that take one (parallel HDF5's
  // MPI-IO driver). Only io/ code that must hand a communicator to such a library uses it.
  void* native_handle(GroupKind k) const;

  // ---- collectives over a group (sum reductions; counts in elements) ---------------------------------------
  void allreduce_sum(GroupKind k, float* x, int64_t n) const;
  void allreduce_sum(GroupKind k, double* x, int64_t n) const;
  void allreduce_sum(GroupKind k, int64_t* x, int64_t n) const;
  // in (size * chunk) -> out (chunk): this rank's chunk of the element-wise sum
  void reduce_scatter(GroupKind k, const float* in, float* out, int64_t chunk) const;
  // in (chunk) -> out (size * chunk), rank order
  void allgather(GroupKind k, const float* in, float* out, int64_t chunk) const;
  // root's values to every rank of the group
  void broadcast(GroupKind k, int64_t* x, int64_t n, int root = 0) const;
  void broadcast(GroupKind k, float* x, int64_t n, int root = 0) const;

  // ---- pipeline point-to-point (stage = rank in the pp group). Sends are non-blocking: the buffer must stay
  // untouched until pp_wait_sends(); receives block. Activations and gradients use separate tags, so each link
  // delivers them in the order they were sent (what the 1F1B schedule relies on).
  void pp_send(const float* x, int64_t n, int to_stage, int tag) const;
  void pp_recv(float* x, int64_t n, int from_stage, int tag) const;
  void pp_wait_sends() const;
  // The same send, the buffer handed over: the comm module keeps it until the send completed, then frees it (so the
  // caller need not keep every micro-batch's buffer until the step ends).
  void pp_send_owned(std::vector<float> x, int to_stage, int tag) const;
  // Completes (and frees) the sends that have finished by now, without waiting for the others.
  void pp_reap_sends() const;
  // every rank sends `per_rank` int64 to each rank of the group (the counts before an all-to-all)
  void alltoall(GroupKind k, const int64_t* send, int64_t* recv, int64_t per_rank) const;
  // variable all-to-all of floats; counts and displacements in elements, one per group rank
  void alltoallv(GroupKind k, const float* send, const std::vector<int64_t>& send_counts, float* recv,
                 const std::vector<int64_t>& recv_counts) const;
  // The same, started: returns at once, the buffers belonging to the request until wait(). Work done in between
  // overlaps the transfer where the transport progresses on its own (NCCL: on the group's lane, the compute stream
  // joining it at wait(); MPI: MPI_Ialltoallv, completed in MPI_Wait). Every rank of the group must start and wait in
  // the same order relative to its other operations on the group.
  CommRequest alltoallv_start(GroupKind k, const float* send, const std::vector<int64_t>& send_counts, float* recv,
                              const std::vector<int64_t>& recv_counts) const;
  void wait(CommRequest& r) const;

  // ---- named by intent --------------------------------------------------------------------------------------
  void dp_allreduce(float* x, int64_t n) const { allreduce_sum(GroupKind::dp, x, n); }
  void dp_reduce_scatter(const float* in, float* out, int64_t chunk) const { reduce_scatter(GroupKind::dp, in, out, chunk); }
  void dp_allgather(const float* in, float* out, int64_t chunk) const { allgather(GroupKind::dp, in, out, chunk); }
  void ep_alltoallv(const float* send, const std::vector<int64_t>& sc, float* recv,
                    const std::vector<int64_t>& rc) const {
    alltoallv(GroupKind::ep, send, sc, recv, rc);
  }
  CommRequest ep_alltoallv_start(const float* send, const std::vector<int64_t>& sc, float* recv,
                                 const std::vector<int64_t>& rc) const {
    return alltoallv_start(GroupKind::ep, send, sc, recv, rc);
  }

 private:
  int rank_ = 0, size_ = 1;
  bool owns_mpi_ = false;
  bool mpi_ = true;  // false: DSV3_NO_MPI, one process that never calls MPI
  struct Group;
  std::vector<Group*> groups_;  // by GroupKind; world is groups_[0]
  const Group& group(GroupKind k) const;
  mutable double seconds_[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  struct PendingSend {
    void* request;           // MPI_Request*
    std::vector<float> buf;  // the owned buffer of pp_send_owned (empty for pp_send)
  };
  mutable std::vector<PendingSend> pending_;  // pp sends in flight
  DeviceTransport* transport_ = nullptr;
  friend struct CommTimer;
};

}  // namespace dsv3
