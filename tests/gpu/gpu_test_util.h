// defines: one_gpu_per_rank — why a rank cannot run an NCCL program (one CUDA device per rank), for dsv3_nccl_tests
// and dsv3_nccl_bench; the GPU tests' seeded data (random_vector, randn) come with it from ../unit/test_data.h
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "../unit/test_data.h"  // random_vector, randn
#include "cuda_backend.cuh"        // cuda_device_usable
#include "parallel/comm.h"

namespace dsv3::test {

// "" when this rank has a usable CUDA device and its node has at least one device per rank on it; otherwise why not.
// devices (if not null): the devices this rank sees (0 without a usable one). Every rank calls it (comm.group_nodes).
inline std::string one_gpu_per_rank(const Comm& comm, int* devices = nullptr) {
  std::string reason;
  const bool usable = cuda_device_usable(&reason);
  int count = 0;
  if (usable && cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
  if (devices) *devices = count;
  const std::vector<int> nodes = comm.group_nodes(GroupKind::world);
  int on_node = 0;
  for (int node : nodes) on_node += node == nodes[comm.rank()];
  if (!usable) return "no CUDA device: " + reason;
  if (on_node > count)
    return std::to_string(on_node) + " ranks on a node with " + std::to_string(count) +
           " CUDA device(s): NCCL needs one GPU per rank (run with at most " + std::to_string(count) +
           " ranks per node)";
  return "";
}

}  // namespace dsv3::test
