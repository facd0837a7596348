#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

#include "core/error.h"
#include "io/hf_checkpoint.h"
#include "parallel/comm.h"

namespace dsv3 {

PipelineStage PipelineStage::whole(const ModelConfig& c) {
  PipelineStage s;
  s.count = 1;
  s.layout.embedding = s.layout.mtp = s.layout.loss = true;
  for (int l = 0; l < (int)c.num_hidden_layers; ++l) s.layout.layers.push_back(l);
  return s;
}

namespace {
// What a stage holds: its layers (+ the MTP layer on the last stage), the embedding on the first stage (and a copy
// on the last stage when MTP needs it), the final norm and the head on the last stage.
ShardPlan plan_for(const ModelConfig& c, const std::vector<ParamSpec>& table, const ExpertGroup& ep,
                   const PipelineStage& st, const TensorGroup& tp) {
  ShardPlan plan{ep.size, ep.rank, {}, tp.size, tp.rank, ep.etp_size, ep.etp_rank};
  if (ep.comm) {  // the optimizer's ZeRO-1 groups (optim/adamw.h): its buckets reduce-scatter and gather in place
    plan.dense_align = ep.comm->group_size(GroupKind::dp);
    plan.expert_align = ep.comm->group_size(GroupKind::edp);
  }
  if (st.count == 1) return plan;
  std::vector<bool> has_layer(c.total_layers(), false);
  for (int l : st.layout.layers) has_layer[l] = true;
  if (st.layout.mtp)
    for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) has_layer[c.num_hidden_layers + k] = true;
  for (const ParamSpec& p : table) {
    uint8_t h = ShardPlan::kNotHeld;
    if (p.layer >= 0) h = has_layer[p.layer] ? ShardPlan::kOwner : ShardPlan::kNotHeld;
    else if (p.name == "model.embed_tokens.weight")
      h = st.layout.embedding ? ShardPlan::kOwner
                              : (st.layout.mtp && c.num_nextn_predict_layers > 0 ? ShardPlan::kCopy : ShardPlan::kNotHeld);
    else  // model.norm, lm_head
      h = st.layout.loss ? ShardPlan::kOwner : ShardPlan::kNotHeld;
    plan.held.push_back(h);
  }
  return plan;
}
}  // namespace

Model::Model(const ModelConfig& cfg, Backend& be, const ExpertGroup& ep, const PipelineStage& stage,
             const TensorGroup& tp)
    : cfg_(cfg),
      be_(be),
      ep_(ep),
      stage_(stage.count == 0 ? PipelineStage::whole(cfg) : stage),
      tp_(tp),
      params_(build_param_table(cfg), plan_for(cfg, build_param_table(cfg), ep, stage_, tp)),
      rope_(make_rope_table(cfg, cfg.max_position_embeddings)) {}

namespace {
std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}
}  // namespace

void Model::load_hf(const HfCheckpoint& ck) {
  std::set<std::string> known;
  for (const ParamSpec& p : params_.table()) {
    const int64_t per = p.numel() / p.n_experts();
    const int64_t first = params_.first_expert(p), count = params_.held(p) ? params_.local_experts(p) : 0;
    for (int64_t e = 0; e < p.n_experts(); ++e) {
      const std::string hf = p.hf_name_of(e);
      DSV3_CHECK(ck.has(hf), "HF checkpoint has no tensor '" << hf << "' (the model config expects it)");
      const auto shape = ck.shape(hf);
      DSV3_CHECK(shape == p.hf_shape(), "HF tensor '" << hf << "' has shape " << shape_str(shape)
                                                      << ", the model config implies " << shape_str(p.hf_shape()));
      if (params_.held(p) && params_.tp_sharded(p)) {  // this rank's tensor-parallel slice of the whole tensor
        const std::vector<float> full = ck.load_f32(hf);
        params_.take_slice(p, full.data(), params_.get(p.name));
      } else if (e >= first && e < first + count && params_.etp_sharded(p)) {  // this rank's slice of expert e
        const int64_t mine = params_.local_numel(p) / count;
        const GlobalLayout g = params_.global_layout(p);
        const std::vector<float> full = ck.load_f32(hf);
        float* dst = params_.get(p.name) + (e - first) * mine;
        for (int64_t k = 0; k < mine; k += g.run)  // the layout's runs, relative to expert e's first element
          std::copy_n(full.data() + (k / g.run) * g.stride + (g.offset - first * per), g.run, dst + k);
      } else if (e >= first && e < first + count) {
        ck.load_f32_into(hf, params_.get(p.name) + (e - first) * per, per);
      }
      known.insert(hf);
      known.insert(hf + "_scale_inv");
    }
    for (const auto& a : p.hf_aliases) known.insert(a), known.insert(a + "_scale_inv");
  }
  for (const auto& n : ck.names())
    DSV3_CHECK(known.count(n), "HF checkpoint tensor '" << n << "' is not part of the model the config describes "
                                                        << "(check num_hidden_layers / num_nextn_predict_layers)");
}

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace

void Model::init_random(uint64_t seed) {
  for (const ParamSpec& p : params_.table()) {
    if (!params_.held(p)) continue;
    float* w = params_.get(p.name);
    const int64_t n = params_.local_numel(p);
    // the global index of each element held here (experts sharded over expert-parallel ranks, tp slices)
    const GlobalLayout gl = params_.global_layout(p);
    if (!p.trainable) {
      std::fill(w, w + n, 0.0f);
    } else if (p.shape.size() == 1) {
      std::fill(w, w + n, 1.0f);
    } else {
      const uint64_t key = splitmix64(seed ^ std::hash<std::string>{}(p.name));
      const double sd = cfg_.initializer_range;
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {  // Box-Muller on two counter-based uniforms in (0, 1]
        const uint64_t gi = (uint64_t)gl.global(i);
        const uint64_t a = splitmix64(key + 2 * gi), b = splitmix64(key + 2 * gi + 1);
        const double u1 = ((a >> 11) + 1.0) * 0x1.0p-53, u2 = (b >> 11) * 0x1.0p-53;
        w[i] = (float)(sd * std::sqrt(-2.0 * std::log(u1)) * std::cos(2 * M_PI * u2));
      }
    }
  }
}

void Model::layer_forward(int64_t layer, float* x, int64_t B, int64_t S, MlaCache* cache, MoeTrace* mt,
                          LayerActs* keep, bool sp) {
  // sp: x holds this rank's Tl = T/tp rows of the residual; the norms and the adds run on them, the tp regions on
  // the all-gathered rows, their outputs reduce-scattered back to Tl rows
  const TensorGroup tp = sp ? tp_ : tp_.without_sp();
  const int64_t T = B * S, D = cfg_.hidden_size, Tl = tp.sp_rows(T);
  const std::string pre = "model.layers." + std::to_string(layer) + ".";
  LayerActs local;
  LayerActs& la = keep ? *keep : local;
  la.B = B;
  la.S = S;
  la.sp = tp.sp;
  if (keep) la.x_in.assign(x, x + Tl * D);
  la.rstd1.resize(Tl);
  la.xn1.resize(T * D);  // the tp region's input: all rows (gathered under sp)
  Floats y(Tl * D);

  // attention block: x += MLA(rmsnorm(x))
  norm_gathered(x, pre + "input_layernorm.weight", Tl, tp, la.xn1.data(), la.rstd1.data());
  const MlaWeights aw = MlaWeights::from(params_, cfg_, layer);
  if (cache)
    mla_forward_cached(be_, cfg_, aw, rope_, la.xn1.data(), T, *cache, y.data(), tp);
  else
    mla_forward(be_, cfg_, aw, rope_, la.xn1.data(), B, S, y.data(), la.att, tp);
  // MLP block: x += MLP(rmsnorm(x)), dense SwiGLU or DeepSeekMoE; the attention's residual add fused into that norm
  la.rstd2.resize(Tl);
  la.xn2.resize(T * D);
  add_norm_gathered(y.data(), x, pre + "post_attention_layernorm.weight", Tl, tp, la.xn2.data(), la.rstd2.data());
  if (keep) la.x_mid.assign(x, x + Tl * D);
  if (!cfg_.is_moe_layer(layer)) {
    // column-parallel gate/up, row-parallel down: this rank's intermediate columns, then the sum over tp
    Floats part(tp.sp ? T * D : 0);
    float* o = tp.sp ? part.data() : y.data();
    swiglu_mlp_forward(be_, la.xn2.data(), T, D, cfg_.intermediate_size / tp.size,
                       params_.get(pre + "mlp.gate_proj.weight"), params_.get(pre + "mlp.up_proj.weight"),
                       params_.get(pre + "mlp.down_proj.weight"), o, false, &la.mlp);
    tp.sum_partial_rows(o, T, D, y.data());
  } else {
    const MoeWeights mw = MoeWeights::from(params_, cfg_, layer);
    moe_forward(be_, cfg_, mw, ep_, la.xn2.data(), B, S, y.data(), la.moe, tp);
    if (mt) {
      mt->balance_loss = seq_balance_loss(la.moe.r, B);
      mt->idx = la.moe.r.idx;
      mt->weight = la.moe.r.weight;
      mt->counts = la.moe.r.counts;
    }
  }
  be_.add(y.data(), Tl * D, x);
  if (keep && recompute_ && !cache) {  // selective recompute: keep only what the rebuild needs
    auto drop = [](Floats& v) { v.clear(); };
    drop(la.xn1);
    drop(la.xn2);
    mla_drop_up_projections(la.att);
    drop(la.mlp.a);
    drop(la.moe.experts.a);
    drop(la.moe.shared.a);
  }
}

namespace {
// A norm's output as a tp region's input: `norm` writes this rank's Tl rows, into `out` or (sp) into a slice that is
// then gathered into all rows of `out`
template <class Norm>
void gathered_rows(const TensorGroup& tp, int64_t Tl, int64_t D, float* out, Norm norm) {
  Floats loc(tp.sp ? Tl * D : 0);
  norm(tp.sp ? loc.data() : out);
  if (tp.sp) tp.gather_rows(loc.data(), Tl, D, out);
}
}  // namespace

void Model::norm_gathered(const float* x, const std::string& weight, int64_t Tl, const TensorGroup& tp, float* out,
                          float* rstd) {
  const int64_t D = cfg_.hidden_size;
  gathered_rows(tp, Tl, D, out, [&](float* y) {
    be_.rmsnorm_forward(x, D, params_.get(weight), (float)cfg_.rms_norm_eps, Tl, D, y, rstd);
  });
}

void Model::add_norm_gathered(const float* residual, float* x, const std::string& weight, int64_t Tl,
                              const TensorGroup& tp, float* out, float* rstd) {
  const int64_t D = cfg_.hidden_size;
  gathered_rows(tp, Tl, D, out, [&](float* y) {
    be_.add_rmsnorm_forward(residual, x, params_.get(weight), (float)cfg_.rms_norm_eps, Tl, D, y, rstd);
  });
}

void Model::layer_backward(int64_t layer, const LayerActs& la, float* dx, double aux_coef, Params& grads) {
  const TensorGroup tp = la.sp ? tp_ : tp_.without_sp();
  const int64_t T = la.B * la.S, D = cfg_.hidden_size, Tl = tp.sp_rows(T);
  const std::string pre = "model.layers." + std::to_string(layer) + ".";
  Floats dxn(T * D), dy(tp.sp ? T * D : 0), dxn_loc(tp.sp ? Tl * D : 0);
  // sp: the output gradient of a tp region all-gathered (the transpose of its reduce-scatter)
  const float* dout = dx;
  if (tp.sp) {
    tp.gather_rows(dx, Tl, D, dy.data());
    dout = dy.data();
  }
  // selective recompute: the norm outputs were dropped after the forward (the SwiGLU products and MLA's
  // up-projections are rebuilt where they are used)
  Floats xn_re;
  const float* xn2 = la.xn2.data();
  if (la.xn2.empty() && T > 0) {
    xn_re.resize(T * D);
    norm_gathered(la.x_mid.data(), pre + "post_attention_layernorm.weight", Tl, tp, xn_re.data(), nullptr);
    xn2 = xn_re.data();
  }
  // MLP block: x_out = x_mid + mlp(rmsnorm(x_mid)); dx flows through the residual and through the norm
  if (!cfg_.is_moe_layer(layer)) {
    swiglu_mlp_backward(be_, xn2, T, D, cfg_.intermediate_size / tp.size, params_.get(pre + "mlp.gate_proj.weight"),
                        params_.get(pre + "mlp.up_proj.weight"), params_.get(pre + "mlp.down_proj.weight"), la.mlp,
                        dout, grads.get(pre + "mlp.gate_proj.weight"),
                        grads.get(pre + "mlp.up_proj.weight"), grads.get(pre + "mlp.down_proj.weight"), dxn.data());
  } else {
    const MoeWeights mw = MoeWeights::from(params_, cfg_, layer);
    MoeWeights mg = MoeWeights::from(grads, cfg_, layer);
    moe_backward(be_, cfg_, mw, mg, ep_, xn2, la.moe, dout, aux_coef, dxn.data(), tp);
  }
  // each rank's columns (and, MoE, token slice) gave a partial input gradient: summed over tp (sp: this rank's rows)
  float* dxn2 = tp.sp ? dxn_loc.data() : dxn.data();
  tp.sum_partial_rows(dxn.data(), T, D, dxn2);
  norm_backward(la.x_mid.data(), pre + "post_attention_layernorm.weight", la.rstd2.data(), dxn2, Tl, dx, grads, tp);
  // attention block: x_mid = x_in + mla(rmsnorm(x_in))
  if (tp.sp) {
    tp.gather_rows(dx, Tl, D, dy.data());
    be_.fill(dxn_loc.data(), Tl * D, 0.0f);
  } else {
    be_.fill(dxn.data(), T * D, 0.0f);
  }
  const MlaWeights aw = MlaWeights::from(params_, cfg_, layer);
  MlaWeights ag = MlaWeights::from(grads, cfg_, layer);
  const float* xn1 = la.xn1.data();
  if (la.xn1.empty() && T > 0) {
    xn_re.resize(T * D);
    norm_gathered(la.x_in.data(), pre + "input_layernorm.weight", Tl, tp, xn_re.data(), nullptr);
    xn1 = xn_re.data();
  }
  mla_backward(be_, cfg_, aw, ag, rope_, xn1, la.B, la.S, la.att, dout, dxn2, tp);
  norm_backward(la.x_in.data(), pre + "input_layernorm.weight", la.rstd1.data(), dxn2, Tl, dx, grads, tp);
}

void Model::norm_backward(const float* x, const std::string& weight, const float* rstd, const float* dy, int64_t rows,
                          float* dx, Params& grads, const TensorGroup& tp) {
  const int64_t D = cfg_.hidden_size;
  if (!tp.sp) {
    be_.rmsnorm_backward(x, D, params_.get(weight), rstd, dy, rows, D, dx, D, grads.get(weight));
    return;
  }
  // sp: each rank saw only its rows, so the replicated norm weight's gradient is summed over tp
  Floats gw(D);
  be_.rmsnorm_backward(x, D, params_.get(weight), rstd, dy, rows, D, dx, D, gw.data());
  tp.sum_replicated_grad(gw.data(), D);
  be_.add(gw.data(), D, grads.get(weight));
}

namespace {
void check_tokens(const int64_t* tokens, int64_t n, int64_t V) {
  for (int64_t i = 0; i < n; ++i)
    DSV3_CHECK(tokens[i] >= 0 && tokens[i] < V,
               "token id " << tokens[i] << " at position " << i << " is outside the vocabulary [0, " << V << ")");
}
}  // namespace

Losses Model::forward_into(const int64_t* tokens, const int64_t* labels, int64_t B, int64_t S, double mtp_lambda,
                           double aux_alpha, ForwardTrace* tr, Activations& a, const float* x_in) {
  DSV3_CHECK(S >= 2, "a training sequence needs at least 2 tokens, got " << S);
  DSV3_CHECK(B >= 0, "negative batch");
  const int64_t T = B * S, D = cfg_.hidden_size, V = cfg_.vocab_size, L = cfg_.num_hidden_layers;
  const int64_t Vl = V / tp_.size;  // this rank's vocabulary slice of the LM head's logits
  const float eps = (float)cfg_.rms_norm_eps;
  // sequence parallelism: the residual stream holds this rank's Tl = T/tp contiguous rows of the B*S tokens
  const bool sp = tp_.sp;
  DSV3_CHECK(!sp || T % tp_.size == 0, "parallel.sp=true with parallel.tp=" << tp_.size << ": a micro-batch of " << B
                                           << " x " << S << " = " << T << " tokens does not split into "
                                           << tp_.size << " equal sequence slices (train.seq_length*train.micro_batch "
                                           << "must be divisible by parallel.tp)");
  const int64_t Tl = tp_.sp_rows(T);
  auto gathered = [&](const Floats& loc, int64_t rows_local) {  // the trace's whole tensors, on the host
    if (!sp) return loc.to_host();
    Floats all(rows_local * tp_.size * D);
    tp_.gather_rows(loc.data(), rows_local, D, all.data());
    return all.to_host();
  };
  check_tokens(tokens, T, V);
  if (labels) check_tokens(labels, T, V);
  // next token of (b, s); -1 past the end of the sequence
  auto next = [&](int64_t b, int64_t s) -> int64_t {
    if (s + 1 < S) return tokens[b * S + s + 1];
    return labels ? labels[b * S + s] : -1;
  };
  ForwardTrace local;
  if (!tr) tr = &local;  // the balance losses come through the trace
  tr->moe.clear();
  const bool keep = tr->keep_hidden;
  a.B = B;
  a.S = S;
  a.tokens.assign(tokens, tokens + T);
  a.layers.resize(cfg_.total_layers());
  Losses loss;

  // ---- main model: embedding -> layers -> final norm -> LM head (this pipeline stage's part of it)
  Floats x(Tl * D);
  if (stage_.layout.embedding) {  // sp: reduce-scattered to this rank's rows
    vocab_embedding_forward(be_, tp_, tokens, T, params_.get("model.embed_tokens.weight"), V, D, x.data());
  } else {
    DSV3_CHECK(x_in || T == 0, "pipeline stage " << stage_.index << " needs the previous stage's activations");
    x.assign(x_in, x_in + Tl * D);
  }
  if (keep) {
    if (stage_.layout.embedding) tr->embed = gathered(x, Tl);
    tr->layer_out.resize(L);
  }
  for (int l : stage_.layout.layers) {
    layer_forward(l, x.data(), B, S, nullptr, cfg_.is_moe_layer(l) ? &tr->moe[l] : nullptr, &a.layers[l], sp);
    if (keep) tr->layer_out[l] = gathered(x, Tl);
  }
  if (!stage_.layout.loss) {  // an inner stage: its output goes to the next stage
    a.x_final = std::move(x);
    for (const auto& [layer, m] : tr->moe) loss.aux += m.balance_loss;
    loss.total = aux_alpha * loss.aux;
    return loss;
  }
  a.x_final = std::move(x);
  a.rstd_final.resize(Tl);
  a.h.resize(T * D);  // the heads' input: all rows (sp: the final norm on this rank's rows, then all-gathered)
  norm_gathered(a.x_final.data(), "model.norm.weight", Tl, tp_, a.h.data(), a.rstd_final.data());
  if (keep) tr->final_norm = a.h.to_host();
  a.logits.resize(T * Vl);
  be_.gemm_nt(T, Vl, D, 1.0f, a.h.data(), D, params_.get("lm_head.weight"), D, 0.0f, a.logits.data(), Vl);
  a.targets.resize(T);  // position s predicts token s+1
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) a.targets[b * S + s] = next(b, s);
  int64_t n = 0;
  a.lse.resize(T);
  const double lm_sum =
      vocab_cross_entropy_forward(be_, tp_, a.logits.data(), T, V, a.targets.data(), &n, a.lse.data());
  loss.lm = n > 0 ? lm_sum / n : 0.0;  // an empty micro-batch (a data-parallel rank without sequences) adds nothing
  if (keep) tr->logits = tp_.gather_columns(a.logits.data(), T, Vl);  // validation only: the full logits

  // ---- MTP depth 1 (HF layer num_hidden_layers): position i combines the embedding of token i+1 (first) with
  // the main model's final-norm hidden state h_i (second) and predicts token i+2.
  if (cfg_.num_nextn_predict_layers > 0) {
    const int64_t Sm = S - 1, Tm = B * Sm;
    const std::string pre = "model.layers." + std::to_string(L) + ".";
    a.mtp_next.resize(Tm);
    a.mtp_hin.resize(Tm * D);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < Sm; ++i) a.mtp_next[b * Sm + i] = tokens[b * S + i + 1];
      be_.copy_rows(a.h.data() + b * S * D, D, Sm, D, a.mtp_hin.data() + b * Sm * D, D);  // h rows 0..S-2
    }
    a.mtp_e.resize(Tm * D);
    // the MTP's input side (embedding, enorm/hnorm, eh_proj) runs on all Tm rows, replicated over tp as without sp;
    // its decoder layer is sequence-parallel when tp divides Tm = B*(S-1) (a slice of the replicated rows, no
    // communication), its shared_head.norm too, all-gathered again before the head
    vocab_embedding_forward(be_, tp_.without_sp(), a.mtp_next.data(), Tm, params_.get("model.embed_tokens.weight"), V,
                            D, a.mtp_e.data());
    // cat (Tm, 2D) = [enorm(e) | hnorm(h)]: the two norms write the two halves of each row
    a.mtp_cat.resize(Tm * 2 * D);
    a.mtp_e_rstd.resize(Tm);
    a.mtp_h_rstd.resize(Tm);
    Floats en(Tm * D), hn(Tm * D);
    be_.rmsnorm_forward(a.mtp_e.data(), D, params_.get(pre + "enorm.weight"), eps, Tm, D, en.data(), a.mtp_e_rstd.data());
    be_.rmsnorm_forward(a.mtp_hin.data(), D, params_.get(pre + "hnorm.weight"), eps, Tm, D, hn.data(),
                        a.mtp_h_rstd.data());
    be_.copy_rows(en.data(), D, Tm, D, a.mtp_cat.data(), 2 * D);
    be_.copy_rows(hn.data(), D, Tm, D, a.mtp_cat.data() + D, 2 * D);
    Floats xm(Tm * D);
    be_.gemm_nt(Tm, D, 2 * D, 1.0f, a.mtp_cat.data(), 2 * D, params_.get(pre + "eh_proj.weight"), 2 * D, 0.0f,
                xm.data(), D);
    if (keep) tr->mtp_eh_proj = xm.to_host();
    const bool msp = sp && Tm % tp_.size == 0;
    const int64_t Tml = msp ? Tm / tp_.size : Tm;
    if (msp) {  // this rank's rows
      Floats mine(Tml * D);
      be_.copy_rows(xm.data() + tp_.rank * Tml * D, Tml * D, 1, Tml * D, mine.data(), Tml * D);
      xm = std::move(mine);
    }
    a.mtp_sp = msp;
    layer_forward(L, xm.data(), B, Sm, nullptr, cfg_.is_moe_layer(L) ? &tr->moe[L] : nullptr, &a.layers[L], msp);
    if (keep) tr->mtp_block = msp ? gathered(xm, Tml) : xm.to_host();
    a.mtp_x = std::move(xm);
    a.mtp_rstd_out.resize(Tml);
    a.mtp_hn.resize(Tm * D);
    norm_gathered(a.mtp_x.data(), pre + "shared_head.norm.weight", Tml, msp ? tp_ : tp_.without_sp(),
                  a.mtp_hn.data(), a.mtp_rstd_out.data());
    a.mtp_logits.resize(Tm * Vl);
    be_.gemm_nt(Tm, Vl, D, 1.0f, a.mtp_hn.data(), D, params_.get("lm_head.weight"), D, 0.0f, a.mtp_logits.data(),
                Vl);
    a.mtp_targets.resize(Tm);  // position i predicts token i+2
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Sm; ++i) a.mtp_targets[b * Sm + i] = next(b, i + 1);
    int64_t nm = 0;
    a.mtp_lse.resize(Tm);
    const double sum =
        vocab_cross_entropy_forward(be_, tp_, a.mtp_logits.data(), Tm, V, a.mtp_targets.data(), &nm, a.mtp_lse.data());
    loss.mtp = nm > 0 ? sum / nm : 0.0;
    if (keep) tr->mtp_logits = tp_.gather_columns(a.mtp_logits.data(), Tm, Vl);
  }
  for (const auto& [layer, m] : tr->moe) loss.aux += m.balance_loss;
  loss.total = loss.lm + mtp_lambda * loss.mtp + aux_alpha * loss.aux;
  return loss;
}

Losses Model::forward(const int64_t* tokens, int64_t B, int64_t S, double mtp_lambda, double aux_alpha,
                      ForwardTrace* tr, const int64_t* labels) {
  DSV3_CHECK(stage_.count == 1, "Model::forward runs the whole model; a pipeline stage uses forward_stage");
  Activations a;
  return forward_into(tokens, labels, B, S, mtp_lambda, aux_alpha, tr, a, nullptr);
}

Losses Model::forward_backward(const int64_t* tokens, int64_t B, int64_t S, double mtp_lambda, double aux_alpha,
                               double loss_scale, Params& grads, ForwardTrace* tr, const int64_t* labels) {
  DSV3_CHECK(stage_.count == 1, "Model::forward_backward runs the whole model; a pipeline stage uses the stage calls");
  Activations a;
  const Losses loss = forward_into(tokens, labels, B, S, mtp_lambda, aux_alpha, tr, a, nullptr);
  backward_stage(a, mtp_lambda, aux_alpha, loss_scale, grads, nullptr, nullptr);
  return loss;
}

Losses Model::forward_stage(const int64_t* tokens, const int64_t* labels, int64_t B, int64_t S, double mtp_lambda,
                            double aux_alpha, ForwardTrace* tr, Activations& a, const float* x_in) {
  return forward_into(tokens, labels, B, S, mtp_lambda, aux_alpha, tr, a, x_in);
}

void Model::backward_stage(const Activations& a, double mtp_lambda, double aux_alpha, double loss_scale,
                           Params& grads, const float* dx_out, std::vector<float>* dx_in) {
  DSV3_CHECK(grads.size() == params_.size(), "gradient store does not match the model's parameter table");
  const int64_t B = a.B, S = a.S;
  const int64_t T = B * S, D = cfg_.hidden_size, V = cfg_.vocab_size, L = cfg_.num_hidden_layers;
  const int64_t Vl = V / tp_.size;  // this rank's vocabulary slice
  const double aux_coef = aux_alpha * loss_scale;
  const bool sp = tp_.sp;
  const int64_t Tl = tp_.sp_rows(T), t0 = sp ? tp_.rank * Tl : 0;  // sp: this rank's rows of the residual
  Floats dx(Tl * D);  // gradient w.r.t. the residual stream at this stage's output

  if (stage_.layout.loss) {
    float* g_head = grads.get("lm_head.weight");
    const float* w_head = params_.get("lm_head.weight");
    Floats dh(T * D);  // gradient w.r.t. the final-norm output h (LM head + MTP input)
    // ---- MTP module (reverse order of the forward)
    if (cfg_.num_nextn_predict_layers > 0) {
      float* g_emb = grads.get("model.embed_tokens.weight");  // the tied copy: summed with the first stage's
      const int64_t Sm = S - 1, Tm = B * Sm;
      const std::string pre = "model.layers." + std::to_string(L) + ".";
      int64_t nm = 0;
      for (int64_t t : a.mtp_targets) nm += t >= 0;
      const bool msp = a.mtp_sp;
      const TensorGroup mtp = msp ? tp_ : tp_.without_sp();
      const int64_t Tml = mtp.sp_rows(Tm);
      Floats dlog(Tm * Vl), dhn(Tm * D), dxm(Tml * D);
      vocab_cross_entropy_backward(be_, tp_, a.mtp_logits.data(), a.mtp_lse.data(), Tm, V, a.mtp_targets.data(),
                                   nm ? (float)(loss_scale * mtp_lambda / nm) : 0.0f, dlog.data());
      be_.gemm_tn(Vl, D, Tm, 1.0f, dlog.data(), Vl, a.mtp_hn.data(), D, 1.0f, g_head, D);  // tied head: grads add up
      be_.gemm_nn(Tm, D, Vl, 1.0f, dlog.data(), Vl, w_head, D, 0.0f, dhn.data(), D);
      // each vocabulary slice's part of the gradient, summed over tp (sp: this rank's rows of the sum)
      if (msp) tp_.reduce_scatter_rows(Floats(dhn).data(), Tml, D, dhn.data());
      else tp_.allreduce(dhn.data(), Tm * D);
      norm_backward(a.mtp_x.data(), pre + "shared_head.norm.weight", a.mtp_rstd_out.data(), dhn.data(), Tml,
                    dxm.data(), grads, mtp);
      layer_backward(L, a.layers[L], dxm.data(), aux_coef, grads);
      if (msp) {  // back to all rows for the replicated input side (the transpose of taking this rank's slice:
                  // the other rows' gradients come from their ranks)
        Floats all(Tm * D);
        tp_.gather_rows(dxm.data(), Tml, D, all.data());
        dxm = std::move(all);
      }
      // eh_proj: x = cat Weh^T
      Floats dcat(Tm * 2 * D);
      be_.gemm_tn(D, 2 * D, Tm, 1.0f, dxm.data(), D, a.mtp_cat.data(), 2 * D, 1.0f, grads.get(pre + "eh_proj.weight"),
                  2 * D);
      be_.gemm_nn(Tm, 2 * D, D, 1.0f, dxm.data(), D, params_.get(pre + "eh_proj.weight"), 2 * D, 0.0f, dcat.data(),
                  2 * D);
      Floats den(Tm * D), dhn2(Tm * D), de(Tm * D), dhin(Tm * D);
      be_.copy_rows(dcat.data(), 2 * D, Tm, D, den.data(), D);
      be_.copy_rows(dcat.data() + D, 2 * D, Tm, D, dhn2.data(), D);
      be_.rmsnorm_backward(a.mtp_e.data(), D, params_.get(pre + "enorm.weight"), a.mtp_e_rstd.data(), den.data(), Tm,
                           D, de.data(), D, grads.get(pre + "enorm.weight"));
      vocab_embedding_backward(be_, tp_, a.mtp_next.data(), Tm, de.data(), V, D, g_emb);  // tied embedding
      be_.rmsnorm_backward(a.mtp_hin.data(), D, params_.get(pre + "hnorm.weight"), a.mtp_h_rstd.data(), dhn2.data(),
                           Tm, D, dhin.data(), D, grads.get(pre + "hnorm.weight"));
      for (int64_t b = 0; b < B; ++b) be_.add(dhin.data() + b * Sm * D, Sm * D, dh.data() + b * S * D);
    }
    // ---- LM head and final norm
    int64_t n = 0;
    for (int64_t t : a.targets) n += t >= 0;
    Floats dlog(T * Vl);
    vocab_cross_entropy_backward(be_, tp_, a.logits.data(), a.lse.data(), T, V, a.targets.data(),
                                 n ? (float)(loss_scale / n) : 0.0f, dlog.data());
    be_.gemm_tn(Vl, D, T, 1.0f, dlog.data(), Vl, a.h.data(), D, 1.0f, g_head, D);
    if (tp_.size == 1) {
      be_.gemm_nn(T, D, V, 1.0f, dlog.data(), V, w_head, D, 1.0f, dh.data(), D);
    } else if (sp) {  // the transpose of the head input's all-gather: this rank's rows of the sum over tp
      Floats dhh(T * D), loc(Tl * D);
      be_.gemm_nn(T, D, Vl, 1.0f, dlog.data(), Vl, w_head, D, 0.0f, dhh.data(), D);
      tp_.reduce_scatter_rows(dhh.data(), Tl, D, loc.data());
      be_.add(dh.data() + t0 * D, Tl * D, loc.data());  // + the MTP's part (whole on every rank)
      dh = std::move(loc);
    } else {  // each vocabulary slice's part of dh, summed over tp before it joins the MTP's (already whole) part
      Floats dhh(T * D);
      be_.gemm_nn(T, D, Vl, 1.0f, dlog.data(), Vl, w_head, D, 0.0f, dhh.data(), D);
      tp_.allreduce(dhh.data(), T * D);
      be_.add(dhh.data(), T * D, dh.data());
    }
    norm_backward(a.x_final.data(), "model.norm.weight", a.rstd_final.data(), dh.data(), Tl, dx.data(), grads, tp_);
  } else {
    DSV3_CHECK(dx_out || T == 0, "pipeline stage " << stage_.index << " needs the next stage's gradient");
    dx.assign(dx_out, dx_out + Tl * D);
  }
  // ---- this stage's decoder layers in reverse, then the embedding (or the gradient for the previous stage)
  const auto& layers = stage_.layout.layers;
  for (auto it = layers.rbegin(); it != layers.rend(); ++it) layer_backward(*it, a.layers[*it], dx.data(), aux_coef, grads);
  if (stage_.layout.embedding) {
    if (sp) {  // the transpose of the embedding's reduce-scatter: every row's gradient, all-gathered
      Floats all(T * D);
      tp_.gather_rows(dx.data(), Tl, D, all.data());
      dx = std::move(all);
    }
    vocab_embedding_backward(be_, tp_, a.tokens.data(), T, dx.data(), V, D, grads.get("model.embed_tokens.weight"));
  } else if (dx_in)
    *dx_in = dx.to_host();  // the pipeline's send buffer
}

// Inference through this rank's pipeline stage: the first stage embeds, each stage runs its layers and hands the
// residual (rows, D) to the next; the last stage applies the final norm and the head to the rows `head_rows`
// selects and broadcasts the logits to every stage, so that all ranks choose the same next token.
std::vector<float> Model::infer(const int64_t* tokens, int64_t B, int64_t S, KvCache* cache, bool last_only) {
  const int64_t T = B * S, D = cfg_.hidden_size, V = cfg_.vocab_size, Vl = V / tp_.size;
  check_tokens(tokens, T, V);
  const Comm* comm = ep_.comm;
  const bool staged = stage_.count > 1;
  std::vector<float> x(T * D);  // generation does not shard the sequence (sp is for training's activations)
  if (stage_.layout.embedding)
    vocab_embedding_forward(be_, tp_.without_sp(), tokens, T, params_.get("model.embed_tokens.weight"), V, D, x.data());
  else
    comm->pp_recv(x.data(), T * D, stage_.index - 1, 3);
  for (int l : stage_.layout.layers)
    layer_forward(l, x.data(), B, S, cache ? &cache->layers[l] : nullptr, nullptr, nullptr);
  const int64_t rows = last_only ? B : T;
  std::vector<float> out(rows * V);
  if (stage_.layout.loss) {
    std::vector<float> h(rows * D);
    for (int64_t r = 0; r < rows; ++r)  // last_only: the last position of each sequence
      std::copy_n(x.data() + (last_only ? (r * S + S - 1) : r) * D, D, h.data() + r * D);
    be_.rmsnorm_forward(h.data(), D, params_.get("model.norm.weight"), (float)cfg_.rms_norm_eps, rows, D, h.data(),
                        nullptr);
    std::vector<float> part(rows * Vl);  // this rank's vocabulary slice, then all of it
    be_.gemm_nt(rows, Vl, D, 1.0f, h.data(), D, params_.get("lm_head.weight"), D, 0.0f, part.data(), Vl);
    out = tp_.gather_columns(part.data(), rows, Vl);
  } else {
    comm->pp_send(x.data(), T * D, stage_.index + 1, 3);
  }
  if (staged) {
    comm->pp_wait_sends();
    comm->broadcast(GroupKind::pp, out.data(), rows * V, stage_.count - 1);
  }
  return out;
}

std::vector<float> Model::logits(const int64_t* tokens, int64_t B, int64_t S) {
  return infer(tokens, B, S, nullptr, false);
}

KvCache Model::make_cache(int64_t capacity) const {
  KvCache kc;
  kc.layers.resize(cfg_.num_hidden_layers);
  for (auto& l : kc.layers) l.reserve(cfg_, capacity);
  return kc;
}

std::vector<float> Model::forward_cached(const int64_t* tokens, int64_t n, KvCache& cache) {
  return infer(tokens, 1, n, &cache, true);
}

}  // namespace dsv3
