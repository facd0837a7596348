// defines: dsv3::make_nccl_transport — Comm's DeviceTransport (parallel/comm.h) over NcclComm: what the training
// loop's float collectives use under run.device = cuda with more than one rank (the driver installs it). Each
// operation runs on its group's NCCL lane after the work queued so far (the backend's stream is ordered with the
// legacy default stream NcclComm waits on) and has finished when it returns, as Comm's MPI operations have.
// Buffers in the CUDA pool (the model's Buffers) go to NCCL as they are; host buffers (a few small tensors the model
// keeps on the host, e.g. the routing's combine-weight gradients) are staged through device memory. The started
// all-to-all (Comm::alltoallv_start, the MoE's token exchange) returns without waiting. Part of the comm module.
#include <cuda_runtime.h>

#include <numeric>
#include <vector>

#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "device_buffer.cuh"
#include "parallel/nccl_comm.h"

namespace dsv3 {

namespace {

class NcclTransport final : public DeviceTransport {
 public:
  NcclTransport(const Comm& comm, const NcclOptions& opt) : nc_(comm, opt) {}
  const char* name() const override { return "nccl"; }

  void allreduce_sum(GroupKind k, float* x, int64_t n) override {
    Staged a(x, n, stage_a_, true);
    nc_.allreduce_sum(k, a.dev, n);
    finish(k);
    a.back();
  }
  void reduce_scatter(GroupKind k, const float* in, float* out, int64_t chunk) override {
    Staged a(const_cast<float*>(in), chunk * nc_.group_size(k), stage_a_, true);
    Staged b(out, chunk, stage_b_, false);
    nc_.reduce_scatter(k, a.dev, b.dev, chunk);
    finish(k);
    b.back();
  }
  void allgather(GroupKind k, const float* in, float* out, int64_t chunk) override {
    Staged a(const_cast<float*>(in), chunk, stage_a_, true);
    Staged b(out, chunk * nc_.group_size(k), stage_b_, false);
    nc_.allgather(k, a.dev, b.dev, chunk);
    finish(k);
    b.back();
  }
  void broadcast(GroupKind k, float* x, int64_t n, int root) override {
    Staged a(x, n, stage_a_, true);
    nc_.broadcast(k, a.dev, n, root);
    finish(k);
    a.back();
  }
  void alltoallv(GroupKind k, const float* send, const std::vector<int64_t>& sc, float* recv,
                 const std::vector<int64_t>& rc) override {
    Staged a(const_cast<float*>(send), std::accumulate(sc.begin(), sc.end(), int64_t(0)), stage_a_, true);
    Staged b(recv, std::accumulate(rc.begin(), rc.end(), int64_t(0)), stage_b_, false);
    nc_.alltoallv(k, a.dev, sc, b.dev, rc);
    finish(k);
    b.back();
  }
  // Started: on the group's lane behind the compute stream's work so far; the wait joins the lane into the compute
  // stream (cudaStreamWaitEvent on the legacy default stream, which the backend's blocking stream then waits on), so
  // neither call blocks the host. Host buffers would need the host to copy the result back: blocking form.
  bool alltoallv_start(GroupKind k, const float* send, const std::vector<int64_t>& sc, float* recv,
                       const std::vector<int64_t>& rc) override {
    auto on_device = [](const float* p, const std::vector<int64_t>& c) {
      return !p || std::accumulate(c.begin(), c.end(), int64_t(0)) == 0 || cuda_managed_owns(p);
    };
    if (!on_device(send, sc) || !on_device(recv, rc)) {
      alltoallv(k, send, sc, recv, rc);
      return false;
    }
    nc_.alltoallv(k, send, sc, recv, rc);
    return true;
  }
  void alltoallv_wait(GroupKind k) override { nc_.join(lane_of(k)); }

 private:
  // a buffer as NCCL gets it: itself when in the CUDA pool (or empty), else a device copy (copied in when `in`);
  // back() copies a staged result to the host buffer
  struct Staged {
    float* host;
    float* dev;
    int64_t n;
    Staged(float* p, int64_t count, cuda::DeviceBuffer<float>& stage, bool in) : host(p), dev(p), n(count) {
      if (!p || n <= 0 || cuda_managed_owns(p)) return;
      if ((int64_t)stage.size() < n) stage.allocate((size_t)n);
      dev = stage.get();
      if (in) DSV3_CUDA_CHECK(cudaMemcpy(dev, host, sizeof(float) * (size_t)n, cudaMemcpyHostToDevice));
    }
    void back() {
      if (dev != host) DSV3_CUDA_CHECK(cudaMemcpy(host, dev, sizeof(float) * (size_t)n, cudaMemcpyDeviceToHost));
    }
  };
  void finish(GroupKind k) { nc_.synchronize(lane_of(k)); }

  NcclComm nc_;
  cuda::DeviceBuffer<float> stage_a_, stage_b_;
};

}  // namespace

std::unique_ptr<DeviceTransport> make_nccl_transport(const Comm& comm, const NcclOptions& opt) {
  return std::make_unique<NcclTransport>(comm, opt);
}

}  // namespace dsv3
