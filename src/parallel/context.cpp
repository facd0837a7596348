#include "parallel/context.h"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <vector>

#include "core/deck.h"
#include "core/error.h"
#include "core/log.h"
#include "model/config.h"

namespace dsv3 {

ParallelContext setup_parallel(Comm& comm, const Deck& deck, const ModelConfig& cfg) {
  ParallelContext ctx;
  ctx.sizes = resolve_sizes(deck, comm.size(), cfg);
  // Expert tensor parallelism runs over the tensor-parallel group (its ranks hold the same tokens): etp = tp.
  DSV3_CHECK(ctx.sizes.etp == 1 || ctx.sizes.etp == ctx.sizes.tp,
             "parallel.etp=" << ctx.sizes.etp << " " << deck.where_set({"parallel.etp"})
                             << ": expert tensor parallelism runs over the tensor-parallel group; etp must be 1 or "
                                "parallel.tp (" << ctx.sizes.tp << ")");
  ctx.coords = coords_of(ctx.sizes, comm.rank());
  comm.set_groups(groups_of(ctx.sizes, comm.rank()));
  ctx.ep = ExpertGroup{&comm, ctx.sizes.ep, ctx.coords.ep, ctx.sizes.etp, ctx.coords.etp};
  ctx.tp = TensorGroup{&comm, ctx.sizes.tp, ctx.coords.tp, ctx.sizes.sp && ctx.sizes.tp > 1};
  const auto layout = parse_pp_layout(deck.get<std::string>("parallel.pp_layout"), ctx.sizes.pp,
                                      (int)cfg.num_hidden_layers, (int)cfg.num_nextn_predict_layers);
  ctx.stage.index = ctx.coords.pp;
  ctx.stage.count = ctx.sizes.pp;
  ctx.stage.layout = layout[ctx.coords.pp];
  DSV3_CHECK(comm.group_size(GroupKind::ep) == ctx.sizes.ep && comm.group_rank(GroupKind::ep) == ctx.coords.ep,
             "the expert-parallel communicator disagrees with the topology (rank " << comm.rank() << ")");
  DSV3_CHECK(comm.group_size(GroupKind::tp) == ctx.sizes.tp && comm.group_rank(GroupKind::tp) == ctx.coords.tp,
             "the tensor-parallel communicator disagrees with the topology (rank " << comm.rank() << ")");
  // etp = tp: the expert grid's etp group must be the tp group itself (etp innermost of the expert grid, tp
  // innermost of the dense one), so that the tp sum of the MoE output adds the expert slices
  DSV3_CHECK(ctx.sizes.etp == 1 || ctx.coords.etp == ctx.coords.tp,
             "the expert-tensor-parallel rank disagrees with the tensor-parallel rank (rank " << comm.rank() << ")");
  return ctx;
}

void apply_node_limited_routing(const Comm& comm, const Deck& deck, const ParallelContext& par, ModelConfig& cfg) {
  const int64_t M = deck.get<int64_t>("moe.max_nodes");
  const std::vector<int> node = comm.group_nodes(GroupKind::ep);  // collective: before any early return
  const int64_t spans = node.empty() ? 1 : *std::max_element(node.begin(), node.end()) + 1;
  int64_t N = deck.get<int64_t>("moe.nodes");
  // without a limit, moe.nodes alone names node groups: for the log's nodes/token (the all-to-all fan-out)
  if ((M == 0 && N == 0) || cfg.n_routed_experts == 0) return;
  std::string error;
  if (N == 0) {
    N = spans;
    // expert range r lives on ep rank r: a node holds a contiguous block of experts iff its ep ranks are contiguous
    bool blocks = par.sizes.ep % spans == 0;
    for (size_t r = 0; blocks && r < node.size(); ++r) blocks = node[r] == (int)(r / (par.sizes.ep / spans));
    if (!blocks) {
      std::ostringstream s;
      s << "moe.max_nodes = " << M << " " << deck.where_set({"moe.max_nodes"}) << ": the " << par.sizes.ep
        << " expert-parallel ranks do not sit on nodes in equal contiguous blocks (node of each ep rank:";
      for (int n : node) s << " " << n;
      s << "); set moe.nodes to name the node groups of the routing";
      error = s.str();
    }
  }
  if (error.empty()) {
    try {
      ModelConfig c = cfg;
      c.route_nodes = N;
      c.route_max_nodes = M;
      c.validate();
      cfg = c;
    } catch (const Error& e) {
      error = std::string(e.what()) + " " + deck.where_set({"moe.max_nodes", "moe.nodes"});
    }
  }
  if (comm.any(!error.empty())) throw Error(error.empty() ? "node-limited routing: invalid on another rank" : error);
  if (M == 0) return;
  DSV3_LOG(info) << "node-limited routing: " << cfg.n_routed_experts << " experts in " << N << " node group(s) of "
                 << cfg.n_routed_experts / N << ", a token's " << cfg.num_experts_per_tok << " on at most " << M
                 << " (node score: the best " << router_spec(cfg).node_topk() << " biased scores)";
  if (N != spans)
    DSV3_LOG(warning) << "moe.nodes = " << N << " but the expert-parallel group spans " << spans
                      << " node(s): the routing limit does not follow the placement";
}

Params gather_experts(const Params& local, const Comm& comm) {
  Params full(local.table());
  const int ep = local.plan().ep_size, tp = local.plan().tp_size;
  const bool staged = !local.plan().held.empty();
  for (const ParamSpec& p : local.table()) {
    float* dst = full.get(p.name);
    const int64_t n = local.local_numel(p);
    // the slices of p over a group (slice r on group rank r: runs of the layout, r * run into each `stride` block)
    // put together into block, which starts where slice 0's first run goes
    auto join_slices = [&](GroupKind kind, int size, float* block) {
      const GlobalLayout g = local.global_layout(p);
      std::vector<float> all(n * size);
      comm.allgather(kind, local.get(p.name), all.data(), n);
      for (int r = 0; r < size; ++r)
        for (int64_t k = 0; k < n; k += g.run)
          std::copy_n(all.data() + r * n + k, g.run, block + (k / g.run) * g.stride + r * g.run);
    };
    if (local.held(p) && !local.is_copy(p)) {
      if (local.etp_sharded(p)) {  // the etp slices of the local experts, then the experts over ep
        const int etp = local.plan().etp_size;
        std::vector<float> block(n * etp);
        join_slices(GroupKind::etp, etp, block.data());
        if (ep > 1) comm.allgather(GroupKind::ep, block.data(), dst, n * etp);  // rank order = expert order
        else std::copy(block.begin(), block.end(), dst);
      } else if (p.expert_stack && ep > 1) {
        comm.allgather(GroupKind::ep, local.get(p.name), dst, n);  // rank order = expert order
      } else if (local.tp_sharded(p)) {  // slice r of tp rank r: runs of the global tensor (params.h)
        join_slices(GroupKind::tp, tp, dst);
      } else
        std::memcpy(dst, local.get(p.name), n * sizeof(float));
    }
    // pipeline stages: the owner stage has it, the others contribute zeros
    if (staged) comm.allreduce_sum(GroupKind::pp, dst, p.numel());
  }
  return full;
}

void reduce_grads_over_replicas(Params& grads, const Comm& comm) {
  for (const ParamSpec& p : grads.table()) {
    if (!grads.held(p)) continue;
    comm.allreduce_sum(p.expert_stack ? GroupKind::edp : GroupKind::dp, grads.get(p.name), grads.local_numel(p));
  }
  sync_tied_grads(grads, comm);
}

void sync_tied_grads(Params& grads, const Comm& comm) {
  for (const ParamSpec& p : grads.table())
    if (grads.held(p) && !grads.plan().held.empty() && p.name == "model.embed_tokens.weight")
      comm.allreduce_sum(GroupKind::embd, grads.get(p.name), grads.local_numel(p));
}

void sync_tied_weights(Params& params, const Comm& comm) {
  for (const ParamSpec& p : params.table())
    if (params.held(p) && !params.plan().held.empty() && p.name == "model.embed_tokens.weight")
      comm.broadcast(GroupKind::embd, params.get(p.name), params.local_numel(p), 0);  // from the first stage
}

}  // namespace dsv3
