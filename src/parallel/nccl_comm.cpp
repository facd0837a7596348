// defines: the pure parts of the NCCL transport (parallel/nccl_comm.h): lane_of, group_name, nccl_count,
// check_distinct_devices, node_local_rank. No CUDA and no NCCL here (compiled into every build and unit-tested on
// machines without a GPU); the NCCL calls are in cuda/nccl_comm.cu.
#include "parallel/nccl_comm.h"

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"

namespace dsv3 {

CommLane lane_of(GroupKind k) {
  switch (k) {
    case GroupKind::pp: return CommLane::pp;
    case GroupKind::ep: return CommLane::ep;
    default: return CommLane::coll;
  }
}

const char* group_name(GroupKind k) {
  static const char* names[] = {"world", "tp", "dp", "pp", "ep", "etp", "edp", "embd"};
  const int i = (int)k;
  return i >= 0 && i <= (int)GroupKind::embd ? names[i] : "?";
}

size_t nccl_count(int64_t n, size_t elem_bytes, const char* op) {
  DSV3_CHECK(n >= 0, "NCCL " << op << ": negative count " << n);
  DSV3_CHECK(elem_bytes > 0 && (uint64_t)n <= std::numeric_limits<size_t>::max() / elem_bytes,
             "NCCL " << op << ": " << n << " elements of " << elem_bytes
                     << " bytes exceed what NCCL's size_t counts address");
  return (size_t)n;
}

void check_distinct_devices(const std::vector<RankDevice>& ranks) {
  // first rank seen per (node, device UUID)
  std::map<std::pair<int, std::string>, const RankDevice*> owner;
  std::map<int, int> ranks_on_node;
  for (const RankDevice& r : ranks) ++ranks_on_node[r.node];
  for (const RankDevice& r : ranks) {
    auto [it, fresh] = owner.emplace(std::make_pair(r.node, r.uuid), &r);
    if (fresh) continue;
    const RankDevice& a = *it->second;
    const int on_node = ranks_on_node[r.node];
    if (r.device_count < on_node)
      DSV3_FAIL("NCCL: ranks " << a.rank << " and " << r.rank << " on node " << r.node
                               << " both use CUDA device " << r.device << " (UUID " << r.uuid << "): the node has "
                               << r.device_count << " device(s) for " << on_node
                               << " ranks, NCCL needs one device per rank (start at most " << r.device_count
                               << " ranks per node)");
    DSV3_FAIL("NCCL: ranks " << a.rank << " (device " << a.device << ") and " << r.rank << " (device " << r.device
                             << ") on node " << r.node << " use the same GPU (UUID " << r.uuid
                             << ") although the node has " << r.device_count << " devices for " << on_node
                             << " ranks: check CUDA_VISIBLE_DEVICES and the launcher's node-local rank"
                                " (OMPI_COMM_WORLD_LOCAL_RANK / SLURM_LOCALID)");
  }
}

int node_local_rank(const std::vector<int>& nodes_by_rank, int rank) {
  DSV3_CHECK(rank >= 0 && rank < (int)nodes_by_rank.size(),
             "node_local_rank: rank " << rank << " of " << nodes_by_rank.size());
  int local = 0;
  for (int r = 0; r < rank; ++r) local += nodes_by_rank[r] == nodes_by_rank[rank];
  return local;
}

}  // namespace dsv3
