#include "model/moe.h"

#include <algorithm>

#include "core/error.h"
#include "parallel/comm.h"

namespace dsv3 {

MoeWeights MoeWeights::from(Params& p, const ModelConfig& c, int64_t layer) {
  const std::string m = "model.layers." + std::to_string(layer) + ".mlp.";
  MoeWeights w;
  w.gate = p.get(m + "gate.weight");
  w.bias = p.get(m + "gate.e_score_correction_bias");
  w.w_gate = p.get(m + "experts.gate_proj.weight");
  w.w_up = p.get(m + "experts.up_proj.weight");
  w.w_down = p.get(m + "experts.down_proj.weight");
  if (c.n_shared_experts > 0) {
    w.sh_gate = p.get(m + "shared_experts.gate_proj.weight");
    w.sh_up = p.get(m + "shared_experts.up_proj.weight");
    w.sh_down = p.get(m + "shared_experts.down_proj.weight");
  }
  return w;
}

RouterSpec router_spec(const ModelConfig& c) {
  RouterSpec s;
  s.E = c.n_routed_experts;
  s.k = c.num_experts_per_tok;
  s.n_group = c.n_group;
  s.topk_group = c.topk_group;
  s.n_nodes = c.route_nodes;
  s.max_nodes = c.route_max_nodes;
  s.norm = c.norm_topk_prob;
  s.scale = (float)c.routed_scaling_factor;
  return s;
}

Routing moe_route(Backend& be, const ModelConfig& c, const MoeWeights& w, const float* xn, int64_t T) {
  Routing r;
  r.T = T;
  r.E = c.n_routed_experts;
  r.K = c.num_experts_per_tok;
  std::vector<float> logits(T * r.E);
  be.gemm_nt(T, r.E, c.hidden_size, 1.0f, xn, c.hidden_size, w.gate, c.hidden_size, 0.0f, logits.data(), r.E);
  r.scores.resize(T * r.E);
  r.idx.resize(T * r.K);
  r.weight.resize(T * r.K);
  be.router_forward(logits.data(), w.bias, T, router_spec(c), r.scores.data(), r.idx.data(), r.weight.data());
  r.counts.assign(r.E, 0);
  for (int32_t e : r.idx) ++r.counts[e];
  return r;
}

Dispatch moe_dispatch(Backend& be, const Routing& r, const float* xn, int64_t D) {
  Dispatch d;
  d.offset.assign(r.E + 1, 0);
  for (int64_t e = 0; e < r.E; ++e) d.offset[e + 1] = d.offset[e] + r.counts[e];
  const int64_t rows = r.T * r.K;
  // counting sort, stable (token order kept within an expert): (token, slot) tk goes to grouped row pos[tk]
  std::vector<int64_t> fill(d.offset.begin(), d.offset.end() - 1);
  std::vector<int32_t> token(rows);  // the token each grouped row copies
  d.pos.resize(rows);
  for (int64_t tk = 0; tk < rows; ++tk) {
    const int64_t i = fill[r.idx[tk]]++;
    d.pos[tk] = (int32_t)i;
    token[i] = (int32_t)(tk / r.K);
  }
  d.x.resize(rows * D);
  d.y.resize(rows * D);
  be.gather_rows(xn, D, token.data(), rows, D, d.x.data());
  return d;
}

namespace {

// The SwiGLU product a = silu(g) * u of m (rows, I): m.a when kept, else rebuilt into tmp from g and u (selective
// recompute dropped it after the forward).
const float* swiglu_product(Backend& be, const MlpActs& m, int64_t rows, int64_t I, Floats& tmp) {
  if ((int64_t)m.a.size() == rows * I) return m.a.data();
  tmp.resize(rows * I);
  be.swiglu_forward(m.g.data(), m.u.data(), rows, I, I, tmp.data());
  return tmp.data();
}

// The SwiGLU MLP of G row blocks [row0[g], row0[g+1]) of x, block g through weights g (gate/up (I, D) I*D apart,
// down (D, I) D*I apart): out = down(silu(gate x) * up x) + beta out. The local experts' grouped pass, and with one
// block a dense MLP: the same GEMMs either way. m gets g, u, a (rows, I).
void swiglu_blocks_forward(Backend& be, int64_t G, const int64_t* row0, int64_t D, int64_t I, const float* x,
                           const float* w_gate, const float* w_up, const float* w_down, float beta, float* out,
                           MlpActs& m) {
  const int64_t rows = row0[G];
  m.g.resize(rows * I);
  m.u.resize(rows * I);
  m.a.resize(rows * I);
  be.gemm_grouped(true, G, row0, I, D, 1.0f, x, D, w_gate, I * D, D, 0.0f, m.g.data(), I);
  be.gemm_grouped(true, G, row0, I, D, 1.0f, x, D, w_up, I * D, D, 0.0f, m.u.data(), I);
  be.swiglu_forward(m.g.data(), m.u.data(), rows, I, I, m.a.data());
  be.gemm_grouped(true, G, row0, D, I, 1.0f, m.a.data(), I, w_down, D * I, I, beta, out, D);
}

// Its gradients given dy (rows, D): the weight gradients accumulate (blocks as the weights), dx (rows, D) too.
void swiglu_blocks_backward(Backend& be, int64_t G, const int64_t* row0, int64_t D, int64_t I, const float* x,
                            const float* w_gate, const float* w_up, const float* w_down, const MlpActs& m,
                            const float* dy, float* gw_gate, float* gw_up, float* gw_down, float* dx) {
  const int64_t rows = row0[G];
  if (rows == 0) return;
  Floats act_tmp, da(rows * I), dg(rows * I), du(rows * I);
  const float* act = swiglu_product(be, m, rows, I, act_tmp);
  be.gemm_grouped_tn(G, row0, D, I, 1.0f, dy, D, act, I, 1.0f, gw_down, D * I, I);           // dWd += dy^T a
  be.gemm_grouped(false, G, row0, I, D, 1.0f, dy, D, w_down, D * I, I, 0.0f, da.data(), I);  // da = dy Wd
  be.swiglu_backward(m.g.data(), m.u.data(), da.data(), rows, I, dg.data(), du.data());
  be.gemm_grouped_tn(G, row0, I, D, 1.0f, dg.data(), I, x, D, 1.0f, gw_gate, I * D, D);
  be.gemm_grouped_tn(G, row0, I, D, 1.0f, du.data(), I, x, D, 1.0f, gw_up, I * D, D);
  be.gemm_grouped(false, G, row0, D, I, 1.0f, dg.data(), I, w_gate, I * D, D, 1.0f, dx, D);  // dx += dg Wg
  be.gemm_grouped(false, G, row0, D, I, 1.0f, du.data(), I, w_up, I * D, D, 1.0f, dx, D);
}

}  // namespace

void swiglu_mlp_forward(Backend& be, const float* x, int64_t T, int64_t D, int64_t I, const float* w_gate,
                        const float* w_up, const float* w_down, float* out, bool accumulate, MlpActs* acts) {
  if (T == 0) return;
  MlpActs local;
  const int64_t row0[2] = {0, T};
  swiglu_blocks_forward(be, 1, row0, D, I, x, w_gate, w_up, w_down, accumulate ? 1.0f : 0.0f, out,
                        acts ? *acts : local);
}

void swiglu_mlp_backward(Backend& be, const float* x, int64_t T, int64_t D, int64_t I, const float* w_gate,
                         const float* w_up, const float* w_down, const MlpActs& m, const float* dy, float* gw_gate,
                         float* gw_up, float* gw_down, float* dx) {
  const int64_t row0[2] = {0, T};
  swiglu_blocks_backward(be, 1, row0, D, I, x, w_gate, w_up, w_down, m, dy, gw_gate, gw_up, gw_down, dx);
}

void moe_experts(Backend& be, const ModelConfig& c, const MoeWeights& w, const std::vector<int64_t>& offset,
                 const float* x, float* y, int64_t I, MlpActs* acts) {
  MlpActs local;
  swiglu_blocks_forward(be, (int64_t)offset.size() - 1, offset.data(), c.hidden_size, I, x, w.w_gate, w.w_up,
                        w.w_down, 0.0f, y, acts ? *acts : local);
}

void moe_experts_backward(Backend& be, const ModelConfig& c, const MoeWeights& w, MoeWeights& g,
                          const std::vector<int64_t>& offset, const float* x, const MlpActs& m, const float* dy,
                          int64_t I, float* dx) {
  swiglu_blocks_backward(be, (int64_t)offset.size() - 1, offset.data(), c.hidden_size, I, x, w.w_gate, w.w_up,
                         w.w_down, m, dy, g.w_gate, g.w_up, g.w_down, dx);
}

void moe_combine(Backend& be, const Routing& r, const Dispatch& d, int64_t D, float* out) {
  // a token's slots in ascending expert order: a fixed summation order
  be.combine_rows(d.y.data(), d.pos.data(), r.weight.data(), r.T, r.K, D, out);
}

int64_t routed_node_spans(const ModelConfig& c, const std::vector<int32_t>& idx) {
  const int64_t K = c.num_experts_per_tok, per = c.n_routed_experts / c.route_nodes;
  int64_t spans = 0;
  for (size_t t = 0; t + K <= idx.size(); t += K) {  // a token's ids are ascending: count where the node changes
    spans += 1;
    for (int64_t k = 1; k < K; ++k) spans += idx[t + k] / per != idx[t + k - 1] / per;
  }
  return spans;
}

double seq_balance_loss(const Routing& r, int64_t B) {
  if (B == 0) return 0.0;
  DSV3_CHECK(r.T % B == 0, "balance loss: " << r.T << " tokens do not split into " << B << " sequences");
  const int64_t Ts = r.T / B;
  double total = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> f(r.E, 0.0), P(r.E, 0.0);
    for (int64_t t = b * Ts; t < (b + 1) * Ts; ++t) {
      for (int64_t k = 0; k < r.K; ++k) f[r.idx[t * r.K + k]] += 1.0;
      double sum = 0;
      for (int64_t e = 0; e < r.E; ++e) sum += r.scores[t * r.E + e];
      for (int64_t e = 0; e < r.E; ++e) P[e] += r.scores[t * r.E + e] / sum;
    }
    double L = 0;
    for (int64_t e = 0; e < r.E; ++e) L += (double)r.E / (r.K * Ts) * f[e] * (P[e] / Ts);
    total += L;
  }
  return total / B;
}

}  // namespace dsv3

namespace dsv3 {

namespace {

// Moves rows between the ranks of the expert group: `send` in dispatch order (grouped by global expert, so by
// destination rank) -> this rank's received rows in expert-major order (to the experts), or the reverse. Started and
// finished apart, so that independent work (the shared experts) overlaps the transfer; the staging buffer and the
// request live in the RowExchange until finish.
struct RowExchange {
  bool to_experts = true;
  Floats buf;
  CommRequest req;
};

RowExchange start_rows(Backend& be, const ExpertGroup& ep, const ExpertExchange& ex, int64_t D, const float* in,
                       float* out, bool to_experts) {
  std::vector<int64_t> sc(ep.size), rc(ep.size);
  for (int p = 0; p < ep.size; ++p) {
    sc[p] = (to_experts ? ex.send_rows[p] : ex.recv_rows[p]) * D;
    rc[p] = (to_experts ? ex.recv_rows[p] : ex.send_rows[p]) * D;
  }
  const int64_t n = (int64_t)ex.perm.size();
  RowExchange x{to_experts, Floats(n * D), {}};
  if (to_experts) {
    x.req = ep.comm->ep_alltoallv_start(in, sc, x.buf.data(), rc);
  } else {
    be.gather_rows(in, D, ex.perm.data(), n, D, x.buf.data());
    x.req = ep.comm->ep_alltoallv_start(x.buf.data(), sc, out, rc);
  }
  return x;
}

// `out` as given to start_rows
void finish_rows(Backend& be, const ExpertGroup& ep, const ExpertExchange& ex, int64_t D, RowExchange& x, float* out) {
  ep.comm->wait(x.req);
  if (x.to_experts) be.gather_rows(x.buf.data(), D, ex.inv.data(), (int64_t)ex.perm.size(), D, out);  // out[perm[i]] = buf[i]
}

void exchange_rows(Backend& be, const ExpertGroup& ep, const ExpertExchange& ex, int64_t D, const float* in,
                   float* out, bool to_experts) {
  RowExchange x = start_rows(be, ep, ex, D, in, out, to_experts);
  finish_rows(be, ep, ex, D, x, out);
}

// Counts exchanged first: how many rows go to each rank and, per local expert, how many arrive from each rank.
ExpertExchange plan_exchange(const ExpertGroup& ep, const Routing& r) {
  ExpertExchange ex;
  const int64_t El = r.E / ep.size;
  std::vector<int64_t> recv_counts(ep.size * El);  // (source rank, local expert)
  ep.comm->alltoall(GroupKind::ep, r.counts.data(), recv_counts.data(), El);  // counts are grouped by owner rank
  ex.send_rows.assign(ep.size, 0);
  ex.recv_rows.assign(ep.size, 0);
  ex.offset.assign(El + 1, 0);
  for (int p = 0; p < ep.size; ++p)
    for (int64_t e = 0; e < El; ++e) {
      ex.send_rows[p] += r.counts[p * El + e];
      ex.recv_rows[p] += recv_counts[p * El + e];
      ex.offset[e + 1] += recv_counts[p * El + e];
    }
  for (int64_t e = 0; e < El; ++e) ex.offset[e + 1] += ex.offset[e];
  // received rows arrive source-major, each source's rows grouped by expert: place them expert-major
  std::vector<int64_t> fill(ex.offset.begin(), ex.offset.end() - 1);
  for (int p = 0; p < ep.size; ++p)
    for (int64_t e = 0; e < El; ++e)
      for (int64_t j = 0; j < recv_counts[p * El + e]; ++j) ex.perm.push_back((int32_t)fill[e]++);
  ex.inv.resize(ex.perm.size());
  for (size_t i = 0; i < ex.perm.size(); ++i) ex.inv[ex.perm[i]] = (int32_t)i;
  return ex;
}

// tokens [t0, t1) of a routing (counts of those tokens only; no scores: the balance loss uses the whole routing)
Routing slice_routing(const Routing& r, int64_t t0, int64_t t1) {
  Routing s;
  s.T = t1 - t0;
  s.E = r.E;
  s.K = r.K;
  s.idx.assign(r.idx.begin() + t0 * r.K, r.idx.begin() + t1 * r.K);
  s.weight.assign(r.weight.begin() + t0 * r.K, r.weight.begin() + t1 * r.K);
  s.counts.assign(r.E, 0);
  for (int32_t e : s.idx) ++s.counts[e];
  return s;
}

const Routing& routed(const MoeActs& a) { return a.sliced ? a.rs : a.r; }

}  // namespace

void moe_forward(Backend& be, const ModelConfig& c, const MoeWeights& w, const ExpertGroup& ep, const float* xn_all,
                 int64_t B, int64_t S, float* out, MoeActs& a, const TensorGroup& tp) {
  const int64_t T = B * S, D = c.hidden_size;
  a.B = B;
  a.r = moe_route(be, c, w, xn_all, T);  // route: every rank routes its own tokens over all experts
  a.sliced = tp.size > 1 && ep.etp_size == 1;
  a.t0 = a.sliced ? tp.rank * T / tp.size : 0;
  if (a.sliced) a.rs = slice_routing(a.r, a.t0, (tp.rank + 1) * T / tp.size);
  const Routing& rs = routed(a);
  const int64_t I = c.moe_intermediate_size / ep.etp_size;
  const float* xn = xn_all + a.t0 * D;
  a.d = moe_dispatch(be, rs, xn, D);     // dispatch: grouped by global expert = by the rank that holds it
  Floats part(tp.sp ? T * D : 0);  // sp: the partial sums of all rows before the reduce-scatter
  float* o = tp.sp ? part.data() : out;
  auto shared_experts = [&] {  // on every token, this rank's columns of them (independent of the routed part)
    if (w.sh_gate)
      swiglu_mlp_forward(be, xn_all, T, D, c.moe_intermediate_size * c.n_shared_experts / tp.size, w.sh_gate,
                         w.sh_up, w.sh_down, o, false, &a.shared);
    else
      be.fill(o, T * D, 0.0f);
  };
  if (ep.size > 1) {  // experts: on the rank that holds them; the shared experts overlap the tokens' way there
    a.ex = plan_exchange(ep, rs);
    a.ex.x.resize(a.ex.perm.size() * D);
    RowExchange there = start_rows(be, ep, a.ex, D, a.d.x.data(), a.ex.x.data(), true);
    shared_experts();
    finish_rows(be, ep, a.ex, D, there, a.ex.x.data());
    Floats y(a.ex.x.size());
    moe_experts(be, c, w, a.ex.offset, a.ex.x.data(), y.data(), I, &a.experts);
    exchange_rows(be, ep, a.ex, D, y.data(), a.d.y.data(), false);
  } else {
    moe_experts(be, c, w, a.d.offset, a.d.x.data(), a.d.y.data(), I, &a.experts);
    shared_experts();
  }
  moe_combine(be, rs, a.d, D, o + a.t0 * D);  // combine (this rank's token slice)
  // shared partial sums + each slice from the rank that computed it, or (etp) every token's partial sums over the
  // expert slices (sp: this rank's rows of the sum; a routed slice is exactly its sequence-parallel rows)
  tp.sum_partial_rows(o, T, D, out);
}

void moe_backward(Backend& be, const ModelConfig& c, const MoeWeights& w, MoeWeights& g, const ExpertGroup& ep,
                  const float* xn, const MoeActs& a, const float* dout, double aux_coef, float* dxn,
                  const TensorGroup& tp) {
  const Routing& r = a.r;
  const Routing& rsl = routed(a);  // the tokens the routed part ran on: [t0, t0 + rsl.T)
  const Dispatch& d = a.d;
  const int64_t T = r.T, K = r.K, E = r.E, D = c.hidden_size, rows = rsl.T * K;
  const int64_t I = c.moe_intermediate_size / ep.etp_size;  // this rank's slice of each expert
  const int64_t t0 = a.t0;
  // the shared experts' gradients come first into dxn (the routed part and the router add to it); with ep they
  // overlap the row gradients' way to the experts
  auto shared_experts = [&] {
    if (!w.sh_gate) return;
    const int64_t Is = c.moe_intermediate_size * c.n_shared_experts / tp.size;
    swiglu_mlp_backward(be, xn, T, D, Is, w.sh_gate, w.sh_up, w.sh_down, a.shared, dout, g.sh_gate, g.sh_up, g.sh_down,
                        dxn);
  };
  if (ep.size == 1) shared_experts();
  // combine: out_t += w_tk y_row  ->  dy_row = w_tk dout_t,  dw_tk = dout_t . y_row (dweight: every token's slots,
  // 0 outside this rank's slice)
  Floats dy(rows * D), dx(rows * D);
  std::vector<float> dweight(T * K, 0.0f);  // (T, K): small, on the host with the routing
  be.combine_rows_backward(dout + t0 * D, d.y.data(), d.pos.data(), rsl.weight.data(), rsl.T, K, D, dy.data(),
                           dweight.data() + t0 * K);
  // etp: y held this rank's partial outputs, so dout . y is a partial dot product: the sum over the slices is dweight
  if (ep.etp_size > 1) tp.allreduce(dweight.data(), T * K);
  // experts, each on its contiguous rows (on the rank that holds it: the row gradients travel there and back)
  auto experts_backward = [&](const std::vector<int64_t>& offset, const float* x, const float* gy, float* gx) {
    moe_experts_backward(be, c, w, g, offset, x, a.experts, gy, I, gx);
  };
  if (ep.size > 1) {
    const int64_t n = (int64_t)a.ex.perm.size();
    Floats gy(n * D), gx(n * D);
    RowExchange there = start_rows(be, ep, a.ex, D, dy.data(), gy.data(), true);
    shared_experts();
    finish_rows(be, ep, a.ex, D, there, gy.data());
    experts_backward(a.ex.offset, a.ex.x.data(), gy.data(), gx.data());
    exchange_rows(be, ep, a.ex, D, gx.data(), dx.data(), false);
  } else {
    experts_backward(d.offset, d.x.data(), dy.data(), dx.data());
  }
  // dispatch: rows were copies of their token's input -> summed back per token (slot order = grouped row order)
  be.combine_rows(dx.data(), d.pos.data(), nullptr, rsl.T, K, D, dxn + t0 * D);
  // route: gradient into the router logits from the combine weights and from the balance loss's P_i
  if (T == 0) return;  // a data-parallel rank without sequences: it only took part in the exchanges
  const int64_t B = a.B, Ts = T / B;
  std::vector<int64_t> cnt(B * E, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) ++cnt[(t / Ts) * E + r.idx[t * K + k]];
  std::vector<float> f(B * E);  // E/(K*Ts) * tokens of sequence b dispatched to e
  for (int64_t i = 0; i < B * E; ++i) f[i] = (float)((double)E / (K * Ts) * cnt[i]);
  std::vector<float> dlogits(T * E);
  // L_aux(layer) = (1/B) sum_b sum_i f_bi (1/Ts) sum_t s_ti / Z_t
  be.router_backward(r.scores.data(), r.idx.data(), dweight.data(), T, E, K, c.norm_topk_prob,
                     (float)c.routed_scaling_factor, Ts, f.data(), (float)(aux_coef / (B * Ts)), dlogits.data());
  if (tp.size == 1) {
    be.gemm_tn(E, D, T, 1.0f, dlogits.data(), E, xn, D, 1.0f, g.gate, D);
  } else {  // each token's router gradient from the rank whose slice holds it (etp: the same slices), summed over tp
    const int64_t r0 = tp.rank * T / tp.size, r1 = (tp.rank + 1) * T / tp.size;
    std::fill(dlogits.begin(), dlogits.begin() + r0 * E, 0.0f);
    std::fill(dlogits.begin() + r1 * E, dlogits.end(), 0.0f);
    Floats gg(E * D);
    be.gemm_tn(E, D, T, 1.0f, dlogits.data(), E, xn, D, 0.0f, gg.data(), D);
    tp.allreduce(gg.data(), E * D);
    be.add(gg.data(), E * D, g.gate);
  }
  be.gemm_nn(T, D, E, 1.0f, dlogits.data(), E, w.gate, D, 1.0f, dxn, D);
}

}  // namespace dsv3
