// defines: ParallelContext, setup_parallel, gather_experts, reduce_grads_over_replicas
// The run's layout: the sizes from the deck and the world (parallel/topology.h), this rank's coordinates, the
// communicators (Comm::set_groups), and the expert and tensor groups handed to the model (the tensor group carries
// sequence parallelism, parallel.sp). Expert tensor parallelism runs over the tp group: etp must be 1 or tp.
#pragma once
#include <cstdint>
#include <utility>

#include "model/model.h"
#include "model/moe.h"
#include "model/params.h"
#include "parallel/comm.h"
#include "parallel/topology.h"

namespace dsv3 {

class Deck;
struct ModelConfig;

struct ParallelContext {
  ParallelSizes sizes;
  RankCoords coords;
  ExpertGroup ep;
  TensorGroup tp;       // size 1 without tensor parallelism
  PipelineStage stage;  // count 1 without pipeline parallelism
  int dp_rank() const { return coords.dp; }
  int dp() const { return sizes.dp; }
};

// This data-parallel rank's share of a batch of B sequences: [first, last); shares differ by at most one and may
// be empty when B < dp.
inline std::pair<int64_t, int64_t> dp_slice(int64_t B, int dp, int rank) {
  return {rank * B / dp, (rank + 1) * B / dp};
}

// Validates the layout against the world and the model (errors name the key and the constraint) and builds the
// communicators. Collective over the world.
ParallelContext setup_parallel(Comm& comm, const Deck& deck, const ModelConfig& cfg);

// Node-limited routing (moe.max_nodes, moe.nodes): sets cfg.route_nodes / route_max_nodes and re-validates the
// model. Without moe.nodes the node groups are the nodes the expert-parallel group spans (its ranks must then sit on
// the nodes in equal contiguous blocks, as the expert ranges are). Collective over the world; the same error on
// every rank (named by rank 0).
void apply_node_limited_routing(const Comm& comm, const Deck& deck, const ParallelContext& par, ModelConfig& cfg);

// Every parameter in full on every rank: the routed experts all-gathered over the expert-parallel group, the
// tensor-parallel slices over the tp group, and the parameters of the other pipeline stages summed in from their
// owners (collective over the world).
Params gather_experts(const Params& local, const Comm& comm);

// Sums gradients over the data-parallel replicas in place (dense over dp, experts over edp): what every rank's
// ZeRO shard holds, in full (for checks; training reduce-scatters instead).
void reduce_grads_over_replicas(Params& grads, const Comm& comm);

// Pipeline stages that share the word embedding (first stage: the owner; last stage: the MTP's copy): the copy's
// gradient is summed into both (before the optimizer), and the owner's updated weights overwrite the copy (after).
void sync_tied_grads(Params& grads, const Comm& comm);
void sync_tied_weights(Params& params, const Comm& comm);

}  // namespace dsv3
