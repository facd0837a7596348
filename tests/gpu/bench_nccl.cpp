// dsv3_nccl_bench: bandwidth of the NCCL transport (dsv3::NcclComm) over the world group, as nccl-tests reports it:
// all-reduce (FP32 and BF16) and all-to-all-v (FP32, equal blocks: the balanced MoE dispatch) at a few sizes. Per size:
// time per operation (wall clock over `reps` operations queued back to back, then NcclComm::synchronize), the
// algorithm bandwidth (bytes / time) and the bus bandwidth (all-reduce: x 2(n-1)/n, all-to-all: x (n-1)/n; comparable
// to the links' peak). Run under mpirun with one rank per GPU:
//   mpirun -np 2 dsv3_nccl_bench [max MiB = 256] [reps = 20]
// Exit 77 (skipped) with fewer than 2 ranks, or when a rank has no usable CUDA device or a node fewer devices than ranks.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda_backend.cuh"
#include "device_buffer.cuh"
#include "gpu_test_util.h"  // one_gpu_per_rank
#include "parallel/comm.h"
#include "parallel/nccl_comm.h"

using namespace dsv3;

namespace {
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// seconds per call: 3 warm-up calls, then `reps` queued back to back, the lanes waited for, the slowest rank's time
double time_op(const Comm& comm, NcclComm& nc, int reps, const std::function<void()>& op) {
  for (int i = 0; i < 3; ++i) op();
  nc.synchronize();
  comm.barrier();
  const double t0 = now();
  for (int i = 0; i < reps; ++i) op();
  nc.synchronize();
  double dt = (now() - t0) / reps;
  std::vector<double> all(comm.size(), 0.0);
  all[comm.rank()] = dt;
  comm.allreduce_sum(GroupKind::world, all.data(), comm.size());
  for (double t : all) dt = std::max(dt, t);
  return dt;
}
}  // namespace

int main(int argc, char** argv) {
  Comm comm(&argc, &argv);
  const int64_t max_mib = argc > 1 ? std::atoll(argv[1]) : 256;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 20;
  const int n = comm.size();
  const std::string gpus = dsv3::test::one_gpu_per_rank(comm);
  const std::string skip = n < 2 ? "1 rank: nothing to measure (mpirun -np N with N GPUs)" : gpus;
  if (comm.any(!skip.empty())) {
    if (comm.rank() == 0) std::printf("SKIPPED: %s\n", skip.empty() ? "another rank has no CUDA device" : skip.c_str());
    return 77;
  }
  try {
    NcclComm nc(comm);  // no set_groups: every group but the world is this rank alone
    if (comm.rank() == 0)
      std::printf("dsv3_nccl_bench: %d ranks (world group), %d reps\n%-14s %10s %12s %10s %10s\n", n, reps, "op",
                  "bytes", "us/op", "algbw GB/s", "busbw GB/s");
    for (int64_t mib = 1; mib <= max_mib; mib *= 16) {
      const int64_t bytes = mib << 20, floats = bytes / 4;
      cuda::DeviceBuffer<float> a(floats), b(floats);
      DSV3_CUDA_CHECK(cudaMemset(a.get(), 0, bytes));
      const double t_ar = time_op(comm, nc, reps, [&] { nc.allreduce_sum(GroupKind::world, a.get(), floats); });
      const double t_bf = time_op(comm, nc, reps, [&] {
        nc.allreduce_sum_bf16(GroupKind::world, reinterpret_cast<uint16_t*>(a.get()), floats * 2);
      });
      const std::vector<int64_t> counts(n, floats / n);
      const double t_a2a = time_op(comm, nc, reps, [&] {
        nc.alltoallv(GroupKind::world, a.get(), counts, b.get(), counts);
      });
      if (comm.rank() == 0) {
        const double ar = 2.0 * (n - 1) / n, a2a = (double)(n - 1) / n;
        std::printf("%-14s %10lld %12.1f %10.1f %10.1f\n", "allreduce f32", (long long)bytes, t_ar * 1e6,
                    bytes / t_ar / 1e9, bytes / t_ar / 1e9 * ar);
        std::printf("%-14s %10lld %12.1f %10.1f %10.1f\n", "allreduce bf16", (long long)bytes, t_bf * 1e6,
                    bytes / t_bf / 1e9, bytes / t_bf / 1e9 * ar);
        std::printf("%-14s %10lld %12.1f %10.1f %10.1f\n", "alltoallv f32", (long long)bytes, t_a2a * 1e6,
                    bytes / t_a2a / 1e9, bytes / t_a2a / 1e9 * a2a);
      }
    }
    const CommTimes t = nc.times();
    if (comm.rank() == 0) std::printf("NcclComm::times: world %.3f s (all of the above, lane time)\n", t.world);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3_nccl_bench: rank %d: %s\n", comm.rank(), e.what());
    comm.abort(1);
  }
  return 0;
}
