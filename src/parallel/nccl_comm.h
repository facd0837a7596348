// defines: dsv3::NcclComm — the comm module's GPU transport: the group operations of dsv3::Comm (parallel/comm.h) on
// DEVICE pointers over NCCL, one NCCL communicator per GroupKind; CommLane, NcclOptions, and the pure checks it relies
// on (nccl_count, check_distinct_devices, lane_of).
//
// Part of the comm module (with parallel/comm.{h,cpp}): every NCCL call of the project is in cuda/nccl_comm.cu, the
// pure parts (no CUDA, no NCCL, unit-tested on any machine) in parallel/nccl_comm.cpp. Host-only header without CUDA
// or NCCL types (streams are opaque `void*` = cudaStream_t), so that non-CUDA code can include it. NcclComm itself is
// compiled only when the CUDA backend is built and nccl.h is found (CMake: DSV3_HAVE_NCCL, library dsv3nccl; it calls
// libnccl through cuda/nccl_dlopen.cpp, so that no program needs libnccl at startup).
//
// ---- How it connects ----------------------------------------------------------------------------------------------
// The model's tensors live in device memory under run.device = cuda (core/memory.h). With more than one rank the
// driver builds make_nccl_transport(comm) and hands it to Comm (Comm::set_device_transport): the float collectives
// (ZeRO-1 gradient reduce-scatter and weight all-gather, tensor-parallel sums and gathers, the MoE all-to-all) then run
// on NCCL, the rest (counts, losses, the pipeline's point-to-point on host buffers) on MPI. The GPU tests
// (tests/gpu/test_nccl_comm.cpp) and the NCCL benchmark (tests/gpu/bench_nccl.cpp) construct NcclComm directly.
// libnccl is not a load-time dependency: cuda/nccl_dlopen.cpp loads it when the first NCCL function is called.
//
// ---- Construction (collective over the world) --------------------------------------------------------------------
// From a dsv3::Comm after set_groups(): the rank picks its device with cuda_select_device (the node-local rank, from
// the launcher's environment, else from MPI's shared-memory split), checks that it is set, and that no two ranks of
// one node use the same device (NCCL refuses duplicate GPUs in a communicator: the error names both ranks, the node,
// the device and the node's device count instead). Then for each GroupKind of more than one rank: group rank 0 calls
// ncclGetUniqueId, the id goes to the group over MPI (Comm::broadcast_bytes), every member calls ncclCommInitRank.
// A group of one rank gets no NCCL communicator: its operations have Comm's single-rank meaning (a device copy or
// nothing) — unless NcclOptions::singleton_comms asks for 1-rank NCCL communicators (the tests use it so that one GPU
// exercises every NCCL call).
//
// ---- Streams and events (the contract) ---------------------------------------------------------------------------
// NcclComm owns three non-blocking CUDA streams, the lanes: `coll` (tp, dp, edp, world, etp, embd groups: gradient
// and tensor-parallel collectives), `ep` (the ep group: the MoE token all-to-alls) and `pp` (the pp group: activations
// and gradients between stages). A communicator is only ever used on its group's lane (lane_of), so the three kinds
// of traffic overlap each other and the compute stream. Every operation
//   1. makes its lane wait for the work queued on the compute stream (NcclOptions::compute_stream; nullptr = the
//      legacy default stream, which also orders plain cudaMemcpy) up to the call: inputs produced there are ready;
//   2. enqueues the NCCL operation (or the single-rank copy) on the lane and returns without waiting (the host is
//      not blocked; no operation synchronizes except synchronize(), times() and the destructor);
//   3. leaves its result ready on the lane: before the compute stream reads it, call join(lane) (the compute stream
//      then waits for the lane's work so far, on the GPU), or synchronize() to wait on the host. Send buffers must
//      stay untouched until then too.
// Operations of one lane run in call order; NCCL matches operations of a communicator by call order across ranks,
// so every member must issue a group's operations in the same order (as with MPI). Operations of different lanes may
// run at the same time; CUDA does not promise that two NCCL kernels make progress side by side, so every rank must
// also issue the operations of different lanes in one common order (ranks running the same schedule do).
//
// ---- Times ---------------------------------------------------------------------------------------------------
// Every operation records two CUDA events around its work on the lane; times() waits for those still pending and
// returns the seconds per group kind accumulated so far (CommTimes: what the log prints for Comm). Elapsed time on
// the lane: it includes waiting for the peers, not the wait for the compute stream's inputs. Nothing synchronizes
// for timing before times() is called (completed events are folded in every 256 operations).
//
// ---- Counts -------------------------------------------------------------------------------------------------------
// NCCL takes size_t element counts (no 2^31 limit as MPI's int counts have); a negative count or one whose byte size
// (or alltoallv's displacement) does not fit a size_t is a dsv3::Error naming the operation. BF16 buffers are
// uint16_t bit patterns (the project's BF16 storage, io/safetensors.h's float_to_bf16); NCCL sums them in FP32 and
// rounds to BF16.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallel/comm.h"

namespace dsv3 {

// The stream an operation runs on (see above).
enum class CommLane { coll = 0, ep = 1, pp = 2 };
CommLane lane_of(GroupKind k);  // pp -> pp, ep -> ep, every other kind -> coll
const char* group_name(GroupKind k);  // "world", "tp", ...

struct NcclOptions {
  int device_hint = -1;           // used when the launcher sets no node-local rank; < 0: the MPI node-local rank
  void* compute_stream = nullptr;  // cudaStream_t whose queued work every operation's inputs come from
  bool singleton_comms = false;   // also build NCCL communicators for groups of one rank (tests)
};

// ---- pure checks (parallel/nccl_comm.cpp; no CUDA) ----------------------------------------------------------------
// `n` elements of `elem_bytes` each as NCCL's size_t count; dsv3::Error naming `op` when negative or when the byte
// size overflows a size_t.
size_t nccl_count(int64_t n, size_t elem_bytes, const char* op);
// One rank's device, as every rank reports it at construction.
struct RankDevice {
  int rank = 0;          // world rank
  int node = 0;          // Comm::group_nodes(world) numbering
  int device = 0;        // CUDA device index (in this rank's CUDA_VISIBLE_DEVICES view)
  int device_count = 0;  // devices this rank sees
  std::string uuid;      // the device's UUID (hex): the identity NCCL compares, whatever CUDA_VISIBLE_DEVICES says
};
// dsv3::Error when two ranks of one node use the same physical device (equal UUIDs), naming both ranks, the node, the
// device and whether the node has fewer devices than ranks.
void check_distinct_devices(const std::vector<RankDevice>& ranks);
// A rank's node-local rank: how many ranks before it are on its node (nodes as Comm::group_nodes numbers them).
int node_local_rank(const std::vector<int>& nodes_by_rank, int rank);

class NcclComm {
 public:
  // Collective over the world; `comm` must outlive this object and keep its groups (set_groups before, not after).
  explicit NcclComm(const Comm& comm, const NcclOptions& opt = {});
  ~NcclComm();  // waits for the lanes, destroys the communicators (aborts them while an exception unwinds)
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int device() const;
  const Comm& comm() const;
  int group_rank(GroupKind k) const { return comm().group_rank(k); }
  int group_size(GroupKind k) const { return comm().group_size(k); }
  bool has_nccl(GroupKind k) const;  // an NCCL communicator exists for this group kind

  // ---- streams ---------------------------------------------------------------------------------------------------
  void* stream(CommLane l) const;  // cudaStream_t of a lane
  void* compute_stream() const;    // NcclOptions::compute_stream
  // `stream` (default: the compute stream) waits on the GPU for the lane's work queued so far
  void join(CommLane l, void* stream = nullptr);
  void join_all(void* stream = nullptr);
  // the host waits for the lanes; NCCL's asynchronous errors are reported here
  void synchronize(CommLane l);
  void synchronize();
  CommTimes times();  // waits for the pending timing events (see above)

  // ---- collectives over a group (device pointers; sum reductions; counts in elements) ------------------------
  void allreduce_sum(GroupKind k, float* x, int64_t n);
  void allreduce_sum(GroupKind k, double* x, int64_t n);
  void allreduce_sum(GroupKind k, int64_t* x, int64_t n);
  void allreduce_sum_bf16(GroupKind k, uint16_t* x, int64_t n);
  // in (size * chunk) -> out (chunk): this rank's chunk of the element-wise sum (in and out must not overlap)
  void reduce_scatter(GroupKind k, const float* in, float* out, int64_t chunk);
  void reduce_scatter_bf16(GroupKind k, const uint16_t* in, uint16_t* out, int64_t chunk);
  // in (chunk) -> out (size * chunk), rank order (in may be out + rank*chunk: in place)
  void allgather(GroupKind k, const float* in, float* out, int64_t chunk);
  void allgather_bf16(GroupKind k, const uint16_t* in, uint16_t* out, int64_t chunk);
  // root's values to every rank of the group, in place
  void broadcast(GroupKind k, int64_t* x, int64_t n, int root = 0);
  void broadcast(GroupKind k, float* x, int64_t n, int root = 0);
  // every rank sends `per_rank` int64 to each rank of the group (the counts before an all-to-all)
  void alltoall(GroupKind k, const int64_t* send, int64_t* recv, int64_t per_rank);
  // variable all-to-all; counts (host vectors, one per group rank) in elements, blocks packed in rank order;
  // send_counts[j] on rank i must equal recv_counts[i] on rank j (as for MPI)
  void alltoallv(GroupKind k, const float* send, const std::vector<int64_t>& send_counts, float* recv,
                 const std::vector<int64_t>& recv_counts);
  void alltoallv_bf16(GroupKind k, const uint16_t* send, const std::vector<int64_t>& send_counts, uint16_t* recv,
                      const std::vector<int64_t>& recv_counts);

  // ---- pipeline point-to-point (stage = rank in the pp group; pp lane). NCCL has no tags: the messages of one
  // (sender, receiver) pair arrive in the order they were sent, which is what 1F1B needs (activations go to the next
  // stage, gradients to the previous one). A send blocks its lane until the peer's matching receive runs: a stage
  // that must send and receive at the same time (both neighbours sending first) uses pp_sendrecv, which fuses them.
  void pp_send(const float* x, int64_t n, int to_stage);
  void pp_recv(float* x, int64_t n, int from_stage);
  // sends n_send to `to_stage` and receives n_recv from `from_stage` together (either count may be 0: that side is
  // skipped); to/from may be this stage (a copy through NCCL, or a plain copy without a communicator)
  void pp_sendrecv(const float* send, int64_t n_send, int to_stage, float* recv, int64_t n_recv, int from_stage);

  // ---- named by intent ------------------------------------------------------------------------------------------
  void tp_allreduce(float* x, int64_t n) { allreduce_sum(GroupKind::tp, x, n); }
  void dp_allreduce(float* x, int64_t n) { allreduce_sum(GroupKind::dp, x, n); }
  void dp_reduce_scatter(const float* in, float* out, int64_t chunk) { reduce_scatter(GroupKind::dp, in, out, chunk); }
  void dp_allgather(const float* in, float* out, int64_t chunk) { allgather(GroupKind::dp, in, out, chunk); }
  // BF16 gradients (ZeRO-1 reduce-scatter) and parameters (the all-gather after the update)
  void dp_reduce_scatter_bf16(const uint16_t* in, uint16_t* out, int64_t chunk) {
    reduce_scatter_bf16(GroupKind::dp, in, out, chunk);
  }
  void dp_allgather_bf16(const uint16_t* in, uint16_t* out, int64_t chunk) {
    allgather_bf16(GroupKind::dp, in, out, chunk);
  }
  void ep_alltoallv(const float* send, const std::vector<int64_t>& sc, float* recv, const std::vector<int64_t>& rc) {
    alltoallv(GroupKind::ep, send, sc, recv, rc);
  }
  void ep_alltoallv_bf16(const uint16_t* send, const std::vector<int64_t>& sc, uint16_t* recv,
                         const std::vector<int64_t>& rc) {
    alltoallv_bf16(GroupKind::ep, send, sc, recv, rc);
  }

  struct Impl;  // cuda/nccl_comm.cu

 private:
  std::unique_ptr<Impl> impl_;
};

// Comm's DeviceTransport over an NcclComm built here (collective over the world, as NcclComm's constructor): the
// training loop's float collectives under run.device = cuda with several ranks (cuda/nccl_transport.cu). libnccl is
// loaded on first use (cuda/nccl_dlopen.cpp): dsv3::Error naming it when the node has none.
std::unique_ptr<DeviceTransport> make_nccl_transport(const Comm& comm, const NcclOptions& opt = {});

}  // namespace dsv3
