#include "parallel/context.h"

#include <cstring>

#include "core/deck.h"
#include "core/error.h"
#include "model/config.h"

namespace dsv3 {

ParallelContext setup_parallel(Comm& comm, const Deck& deck, const ModelConfig& cfg) {
  ParallelContext ctx;
  ctx.sizes = resolve_sizes(deck, comm.size(), cfg);
  DSV3_CHECK(ctx.sizes.tp == 1, "parallel.tp=" << ctx.sizes.tp << ": tensor parallelism is not implemented yet "
                                                << "(data and expert parallel layouts are)");
  DSV3_CHECK(ctx.sizes.pp == 1, "parallel.pp=" << ctx.sizes.pp << ": pipeline parallelism is not implemented yet "
                                                << "(data and expert parallel layouts are)");
  DSV3_CHECK(ctx.sizes.etp == 1, "parallel.etp=" << ctx.sizes.etp << ": expert tensor parallelism is not implemented yet");
  ctx.coords = coords_of(ctx.sizes, comm.rank());
  comm.set_groups(groups_of(ctx.sizes, comm.rank()));
  ctx.ep = ExpertGroup{&comm, ctx.sizes.ep, ctx.coords.ep};
  DSV3_CHECK(comm.group_size(GroupKind::ep) == ctx.sizes.ep && comm.group_rank(GroupKind::ep) == ctx.coords.ep,
             "the expert-parallel communicator disagrees with the topology (rank " << comm.rank() << ")");
  return ctx;
}

Params gather_experts(const Params& local, const Comm& comm) {
  Params full(local.table());
  const int ep = local.plan().ep_size;
  for (const ParamSpec& p : local.table()) {
    const int64_t n = local.local_numel(p);
    if (p.expert_stack && ep > 1)
      comm.allgather(GroupKind::ep, local.get(p.name), full.get(p.name), n);  // rank order = expert order
    else
      std::memcpy(full.get(p.name), local.get(p.name), n * sizeof(float));
  }
  return full;
}

void reduce_grads_over_replicas(Params& grads, const Comm& comm) {
  for (const ParamSpec& p : grads.table())
    comm.allreduce_sum(p.expert_stack ? GroupKind::edp : GroupKind::dp, grads.get(p.name), grads.local_numel(p));
}

}  // namespace dsv3
