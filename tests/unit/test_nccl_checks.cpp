// The pure parts of the NCCL transport (parallel/nccl_comm.h) that need no GPU: the count checks, the duplicate-GPU
// check with its messages, the node-local rank and the lane of each group kind. The NCCL operations themselves are
// tested on a GPU (tests/gpu/test_nccl_comm.cpp).
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "parallel/nccl_comm.h"
#include "test_util.h"

using namespace dsv3;
using dsv3::test::error_of;

TEST(NcclChecks, CountsNameTheOperation) {
  EXPECT_EQ(nccl_count(0, 4, "allreduce"), 0u);
  EXPECT_EQ(nccl_count((int64_t)1 << 33, 4, "allreduce"), (size_t)1 << 33);  // beyond MPI's int counts: fine
  const std::string neg = error_of([] { nccl_count(-3, 4, "alltoallv"); });
  EXPECT_NE(neg.find("NCCL alltoallv: negative count -3"), std::string::npos) << neg;
  const std::string big = error_of([] { nccl_count(std::numeric_limits<int64_t>::max(), 8, "reduce_scatter_bf16"); });
  EXPECT_NE(big.find("NCCL reduce_scatter_bf16"), std::string::npos) << big;
  EXPECT_NE(big.find("exceed"), std::string::npos) << big;
}

TEST(NcclChecks, DistinctDevicesPass) {
  // 2 nodes x 2 ranks, the same device indices on both nodes (different GPUs), and two ranks whose
  // CUDA_VISIBLE_DEVICES views both call their GPU device 0
  check_distinct_devices({{0, 0, 0, 2, "aa"}, {1, 0, 1, 2, "bb"}, {2, 1, 0, 2, "aa"}, {3, 1, 1, 2, "bb"}});
  check_distinct_devices({{0, 0, 0, 1, "aa"}, {1, 0, 0, 1, "bb"}});
}

TEST(NcclChecks, SharedDeviceOnSmallNodeNamesRanksAndCount) {
  // 4 ranks on a node with 2 GPUs: rank 2 wraps around to device 0, as cuda_select_device does
  const std::string e = error_of([] {
    check_distinct_devices({{0, 0, 0, 2, "aa"}, {1, 0, 1, 2, "bb"}, {2, 0, 0, 2, "aa"}, {3, 0, 1, 2, "bb"}});
  });
  EXPECT_NE(e.find("ranks 0 and 2 on node 0 both use CUDA device 0"), std::string::npos) << e;
  EXPECT_NE(e.find("2 device(s) for 4 ranks"), std::string::npos) << e;
}

TEST(NcclChecks, SharedDeviceOnLargeNodeBlamesTheEnvironment) {
  // enough devices, but two ranks see the same GPU (a wrong CUDA_VISIBLE_DEVICES or node-local rank)
  const std::string e = error_of([] { check_distinct_devices({{0, 0, 0, 8, "aa"}, {1, 0, 0, 8, "aa"}}); });
  EXPECT_NE(e.find("ranks 0 (device 0) and 1 (device 0) on node 0 use the same GPU"), std::string::npos) << e;
  EXPECT_NE(e.find("CUDA_VISIBLE_DEVICES"), std::string::npos) << e;
}

TEST(NcclChecks, NodeLocalRank) {
  const std::vector<int> nodes = {0, 0, 1, 0, 1, 2};
  const int expected[] = {0, 1, 0, 2, 1, 0};
  for (int r = 0; r < (int)nodes.size(); ++r) EXPECT_EQ(node_local_rank(nodes, r), expected[r]) << r;
  EXPECT_THROW(node_local_rank(nodes, 6), Error);
}

TEST(NcclChecks, LanesAndNames) {
  EXPECT_EQ(lane_of(GroupKind::pp), CommLane::pp);
  EXPECT_EQ(lane_of(GroupKind::ep), CommLane::ep);
  for (GroupKind k : {GroupKind::world, GroupKind::tp, GroupKind::dp, GroupKind::etp, GroupKind::edp, GroupKind::embd})
    EXPECT_EQ(lane_of(k), CommLane::coll) << group_name(k);
  EXPECT_STREQ(group_name(GroupKind::edp), "edp");
  EXPECT_STREQ(group_name(GroupKind::embd), "embd");
}

#ifdef DSV3_HAVE_NCCL
#include <nccl.h>

#include <cstdlib>

// libnccl is loaded on the first NCCL call (cuda/nccl_dlopen.cpp): a missing library is an error naming it and the
// variable that points elsewhere, not a failure of the program to start
TEST(NcclLoading, AMissingLibraryIsNamed) {
  setenv("DSV3_NCCL_LIBRARY", "/nonexistent/libnccl.so.2", 1);
  const std::string e = error_of([] {
    ncclUniqueId id;
    (void)ncclGetUniqueId(&id);
  });
  unsetenv("DSV3_NCCL_LIBRARY");
  EXPECT_NE(e.find("/nonexistent/libnccl.so.2"), std::string::npos) << e;
  EXPECT_NE(e.find("DSV3_NCCL_LIBRARY"), std::string::npos) << e;
}
#endif
