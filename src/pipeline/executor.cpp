#include "pipeline/executor.h"

#include "core/error.h"
#include "parallel/comm.h"
#include "pipeline/schedule.h"

namespace dsv3 {

namespace {
constexpr int kTagActivation = 1, kTagGradient = 2;
}

PipelineResult run_pipeline(Model& m, const Comm* comm, const std::vector<MicroBatch>& mbs, int64_t S,
                            double mtp_lambda, double aux_alpha, Params* grads, bool keep_hidden) {
  const PipelineStage& st = m.stage();
  const int stages = st.count, stage = st.index, M = (int)mbs.size();
  const int64_t D = m.config().hidden_size;
  DSV3_CHECK(stages == 1 || comm, "a pipeline of " << stages << " stages needs the communicator");
  PipelineResult out;
  out.traces.resize(keep_hidden ? M : 0);
  // A micro-batch's activations live from its forward to its backward only (1F1B keeps at most stages - stage of them
  // in flight); the buffers sent to the neighbours go to the comm module, which frees them once each send completed.
  std::vector<Activations> acts(M);

  auto forward = [&](int i, bool recv) {
    const MicroBatch& mb = mbs[i];
    std::vector<float> x_in;
    if (recv) {
      x_in.resize(m.stage_rows(mb.n, S) * D);  // sp: this rank's rows
      comm->pp_recv(x_in.data(), (int64_t)x_in.size(), stage - 1, kTagActivation);
    }
    ForwardTrace local;
    ForwardTrace& tr = keep_hidden ? out.traces[i] : local;
    tr.keep_hidden = keep_hidden;
    const Losses l =
        m.forward_stage(mb.tokens, mb.labels, mb.n, S, mtp_lambda, aux_alpha, &tr, acts[i], recv ? x_in.data() : nullptr);
    out.loss.lm += l.lm * mb.weight;
    out.loss.mtp += l.mtp * mb.weight;
    out.loss.aux += l.aux * mb.weight;
    out.loss.total += l.total * mb.weight;
    const ModelConfig& c = m.config();
    for (const auto& [layer, mt] : tr.moe) {
      auto& load = out.expert_load[layer];
      load.resize(mt.counts.size(), 0);
      for (size_t e = 0; e < mt.counts.size(); ++e) load[e] += mt.counts[e];
      if (c.route_nodes > 1) {
        out.node_spans += routed_node_spans(c, mt.idx);
        out.routed_tokens += (int64_t)mt.idx.size() / c.num_experts_per_tok;
      }
    }
  };
  auto send_forward = [&](int i) {  // a non-last stage's output: the next stage's input, not needed here again
    comm->pp_send_owned(acts[i].x_final.to_host(), stage + 1, kTagActivation);  // MPI sends host memory
    acts[i].x_final.clear();
  };

  if (!grads) {  // forward only: the micro-batches in order through the stages
    for (int i = 0; i < M; ++i) {
      forward(i, stage > 0);
      if (stage + 1 < stages) send_forward(i);
      acts[i] = Activations{};  // forward only: nothing of it is needed again (the traces hold their copies)
      if (comm && stages > 1) comm->pp_reap_sends();
    }
    if (comm) comm->pp_wait_sends();
    return out;
  }
  for (const Action& a : one_f_one_b(stages, stage, M)) {
    const int i = a.microbatch;
    if (a.op == Op::Forward) {
      forward(i, a.recv_fwd);
      if (a.send_fwd) send_forward(i);
    } else {
      std::vector<float> dx_out;
      if (a.recv_bwd) {
        dx_out.resize(m.stage_rows(mbs[i].n, S) * D);
        comm->pp_recv(dx_out.data(), (int64_t)dx_out.size(), stage + 1, kTagGradient);
      }
      std::vector<float> sent;
      m.backward_stage(acts[i], mtp_lambda, aux_alpha, mbs[i].weight, *grads, a.recv_bwd ? dx_out.data() : nullptr,
                       a.send_bwd ? &sent : nullptr);
      acts[i] = Activations{};  // this micro-batch is done: its activations go now, not at the end of the step
      if (a.send_bwd) comm->pp_send_owned(std::move(sent), stage - 1, kTagGradient);
    }
    if (comm && stages > 1) comm->pp_reap_sends();
  }
  if (comm) comm->pp_wait_sends();  // every send completed before the step ends
  return out;
}

}  // namespace dsv3
