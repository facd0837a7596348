// The planner (see planner.h for what is counted and why). Everything here is arithmetic on the ParamSpec table,
// the stage layouts and the deck's settings: nothing is allocated, no collective is called.
#include "plan/planner.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/deck.h"
#include "core/error.h"
#include "pipeline/schedule.h"

namespace dsv3 {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- what one stage holds (the rule of Model's shard plan, model/model.cpp plan_for) ---------------------------
enum Holding { kNotHeld, kOwner, kCopy };

Holding holding(const ModelConfig& c, const StageLayout& st, int pp, const ParamSpec& p) {
  if (pp == 1) return kOwner;
  if (p.layer >= 0) {
    if (p.layer >= c.num_hidden_layers) return st.mtp ? kOwner : kNotHeld;
    return std::find(st.layers.begin(), st.layers.end(), p.layer) != st.layers.end() ? kOwner : kNotHeld;
  }
  if (p.name == "model.embed_tokens.weight")
    return st.embedding ? kOwner : (st.mtp && c.num_nextn_predict_layers > 0 ? kCopy : kNotHeld);
  return st.loss ? kOwner : kNotHeld;  // model.norm, lm_head
}

// Elements of p one rank holds: routed experts split over ep (and etp inside an expert), tp-sharded tensors over tp.
int64_t rank_numel(const ParamSpec& p, const ParallelSizes& s) {
  if (p.expert_stack) return p.numel() / (s.ep * s.etp);
  if (p.shard_dim >= 0) return p.numel() / s.tp;
  return p.numel();
}

// ---- FLOPs ------------------------------------------------------------------------------------------------------
// Weight elements a token's matmuls touch in decoder layer i (forward FLOPs = 2 x this per token).
double layer_matmul_elems(const ModelConfig& c, int64_t i) {
  const double D = c.hidden_size, H = c.num_attention_heads, dqk = c.qk_head_dim();
  const double dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, kvr = c.kv_lora_rank;
  double n = c.q_lora_rank > 0 ? c.q_lora_rank * D + H * dqk * c.q_lora_rank : H * dqk * D;
  n += (kvr + dr) * D + H * (dn + dv) * kvr + D * H * dv;
  if (!c.is_moe_layer(i)) return n + 3.0 * c.intermediate_size * D;
  const double Im = c.moe_intermediate_size;
  return n + c.n_routed_experts * D + c.num_experts_per_tok * 3.0 * Im * D + c.n_shared_experts * 3.0 * Im * D;
}
// Forward attention-core FLOPs of one sequence of n tokens in one layer: QK^T and PV over the causal pairs.
double attention_fwd_flops(const ModelConfig& c, int64_t n) {
  const double pairs = (double)n * (n + 1) / 2;
  return 2.0 * pairs * c.num_attention_heads * (c.qk_head_dim() + c.v_head_dim);
}
// Training FLOPs (x3) of one sequence through decoder layer i with n tokens.
ModelFlops layer_flops(const ModelConfig& c, int64_t i, int64_t n) {
  return {3 * 2 * layer_matmul_elems(c, i) * n, 3 * attention_fwd_flops(c, n)};
}
// The loss stage's own matmuls: the LM head on S positions, and per MTP module eh_proj + the shared head.
ModelFlops head_flops(const ModelConfig& c, int64_t S, bool with_mtp) {
  const double D = c.hidden_size, V = c.vocab_size;
  ModelFlops f{3 * 2 * V * D * S, 0};
  if (with_mtp)
    for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) f.matmul += 3 * 2 * (2 * D * D + V * D) * (S - 1 - k);
  return f;
}
void add(ModelFlops& a, const ModelFlops& b) { a.matmul += b.matmul, a.attention += b.attention; }

// ---- activations ------------------------------------------------------------------------------------------------
struct Bytes {
  double stored = 0;  // kept for the backward pass
  double kv = 0;      // the attention K/V part of stored
  double work = 0;    // temporaries of the layer's backward pass
  double ep = 0;      // expert all-to-all staging during the backward pass (ep > 1)
};

// One decoder layer i on b sequences of n tokens on one rank (model/model.h LayerActs, mla.h MlaActs, moe.h MoeActs,
// and the buffers of layer_backward / mla_backward / moe_backward).
Bytes layer_bytes(const ModelConfig& c, const PlanSettings& s, int64_t i, int64_t b, int64_t n) {
  const double f = s.act_bytes, st = 4;  // activation element; FP32 statistics, router scores and int32 indices
  const ParallelSizes& z = s.sizes;
  const double T = (double)b * n, Tr = z.sp ? T / z.tp : T;  // tokens; tokens of a token-sharded (sp) tensor
  const double D = c.hidden_size, H = (double)c.num_attention_heads / z.tp;
  const double dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, kvr = c.kv_lora_rank;
  const double qr = c.q_lora_rank, dqk = dn + dr;
  Bytes r;
  // residual stream in/after attention and the two norms' outputs and rstd
  const double norms = 4 * Tr * D * f + 2 * Tr * st;
  // MLA
  const double qlora = qr > 0 ? 2 * T * qr * f + T * st : 0;
  const double kv = T * (kvr + dr) * f + T * kvr * f + T * H * (dn + dv) * f;
  const double probs = s.flash_attention ? b * H * n * st : b * H * n * (double)n * f;
  const double mla = qlora + T * H * dqk * f + kv + T * st + probs + T * H * dv * f;
  // MLP
  double mlp = 0, mlp_work = 0, products = 0;  // products: the SwiGLU products a (selective recompute drops them)
  if (!c.is_moe_layer(i)) {
    const double I = (double)c.intermediate_size / z.tp;
    mlp = 3 * T * I * f;
    mlp_work = 3 * T * I * f;
    products = T * I * f;
  } else {
    const double E = c.n_routed_experts, K = c.num_experts_per_tok, El = E / z.ep;
    const double Im = (double)c.moe_intermediate_size / z.etp, Is = (double)c.moe_intermediate_size * c.n_shared_experts / z.tp;
    // (token, expert) pairs routed from this rank (on average as many arrive here): under tp each rank routes its
    // 1/tp token slice, with expert tensor parallelism (etp = tp) every token through its expert slices
    const double rows = T * K / (z.etp > 1 ? 1 : z.tp);
    const double routing = T * E * st + 2 * T * K * st + E * 8 + (E + 1) * 8 + T * K * st;  // scores idx weight counts offset pos
    const double dispatch = 2 * rows * D * f;                                                 // d.x, d.y
    const double exchange = z.ep > 1 ? rows * D * f + rows * 8 + 2 * z.ep * 8 + (El + 1) * 8 : 0;  // ex.x, perm, counts
    mlp = routing + dispatch + exchange + 3 * rows * Im * f + 3 * T * Is * f;
    products = rows * Im * f + T * Is * f;
    // backward: shared experts' da/dg/du first (freed); then dy, dx, dweight for all rows, with the local experts'
    // da/dg/du of all their rows (grouped GEMMs), and at the end the router's dlogits
    const double experts = 3 * rows * Im * f;
    mlp_work = std::max(3 * T * Is * f, 2 * rows * D * f + rows * st + std::max(experts, T * E * st + b * E * 12));
    if (z.ep > 1) r.ep = 3 * rows * D * f;  // gy, gx and the exchange buffer
  }
  const double mla_work = T * H * (dv + dqk + dn + dv) * f + T * (kvr + dr) * f + T * kvr * f + (qr > 0 ? 2 * T * qr * f : 0);
  r.stored = norms + mla + mlp;
  r.kv = kv;
  r.work = Tr * D * f + std::max(mlp_work, mla_work);  // dxn + the larger half
  if (s.recompute == Recompute::Selective) {
    // dropped after the forward (model.cpp layer_forward): the two norm outputs (T rows: the tp regions' inputs),
    // MLA's up-projections (qan, q, cn, kv), the SwiGLU products (dense, routed rows, shared); rebuilt one layer
    // at a time in backward: the norm output and the larger of the two rebuilt halves join the work buffer
    const double xn = 2 * T * D * f, up = (qr > 0 ? T * qr * f : 0) + T * H * dqk * f + T * kvr * f + T * H * (dn + dv) * f;
    r.stored -= xn + up + products;
    r.kv -= T * kvr * f + T * H * (dn + dv) * f;
    r.work += T * D * f + std::max(up, products);
  }
  if (s.recompute == Recompute::Full) {  // only the layer input stays; the rest is rebuilt one layer at a time
    r.work += r.stored - Tr * D * f;
    r.stored = Tr * D * f;
    r.kv = 0;
  }
  return r;
}

struct StageActs {
  double stored = 0, kv = 0, work = 0, comm = 0;
};

// One micro-batch of b sequences on stage `si` (model.cpp forward_into / backward_stage, pipeline/executor.cpp).
StageActs stage_acts(const ModelConfig& c, const PlanSettings& s, int si, int64_t b) {
  const StageLayout& st = s.layout[si];
  const ParallelSizes& z = s.sizes;
  const double f = s.act_bytes, sf = 4, S = (double)s.seq_length, T = b * S, Tr = z.sp ? T / z.tp : T;
  const double D = c.hidden_size, V = (double)c.vocab_size / z.tp;
  StageActs a;
  a.stored = T * 8;  // the micro-batch's tokens
  double layers_work = 0, ep = 0;
  for (int l : st.layers) {
    const Bytes lb = layer_bytes(c, s, l, b, s.seq_length);
    a.stored += lb.stored, a.kv += lb.kv;
    layers_work = std::max(layers_work, lb.work);
    ep = std::max(ep, lb.ep);
  }
  const double dx = Tr * D * f;  // gradient of the residual stream at the stage's output
  a.work = dx + layers_work;
  a.stored += Tr * D * f;  // x_final: the stage's output (sent on, or the final norm's input)
  if (st.loss) {
    a.stored += T * sf + T * D * f + T * V * f + T * sf + T * 8;  // rstd, h, logits, lse, targets
    const double dh = T * D * f;
    a.work = std::max(a.work, dx + dh + T * V * f);  // the head's dlogits
    if (st.mtp && c.num_nextn_predict_layers > 0) {
      const int64_t Sm = s.seq_length - 1;
      const double Tm = (double)b * Sm;
      // next tokens, h slice, embedding, cat (2D), three rstd, block output, norm output, logits, lse, targets
      a.stored += Tm * 8 + Tm * D * f * 6 + 3 * Tm * sf + Tm * V * f + Tm * sf + Tm * 8;
      for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
        const Bytes lb = layer_bytes(c, s, c.num_hidden_layers + k, b, Sm);
        a.stored += lb.stored, a.kv += lb.kv;
        ep = std::max(ep, lb.ep);
        // dlogits, dhn, dxm, then the layer's backward or the eh_proj/norm gradients (dcat 2D + 4 x D)
        a.work = std::max(a.work, dx + dh + Tm * V * f + 2 * Tm * D * f + std::max(lb.work, 6 * Tm * D * f));
      }
    }
  }
  // pipeline buffers at the backward peak: the received output gradient and the gradient sent back
  const int pp = z.pp;
  a.comm = (si + 1 < pp ? Tr * D * f : 0) + (si > 0 ? Tr * D * f : 0) + ep;
  return a;
}

std::string gib(double bytes) {
  char buf[32];
  const double g = bytes / (1024.0 * 1024 * 1024);
  if (g >= 100) std::snprintf(buf, sizeof buf, "%.1f", g);
  else if (g >= 0.1) std::snprintf(buf, sizeof buf, "%.2f", g);
  else std::snprintf(buf, sizeof buf, "%.4f", g);
  return buf;
}
std::string mib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", bytes / (1024.0 * 1024));
  return buf;
}
std::string human(double n) {
  char buf[32];
  if (n >= 1e12) std::snprintf(buf, sizeof buf, "%.2fT", n / 1e12);
  else if (n >= 1e9) std::snprintf(buf, sizeof buf, "%.2fB", n / 1e9);
  else if (n >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", n / 1e6);
  else if (n >= 1e3) std::snprintf(buf, sizeof buf, "%.2fK", n / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", n);
  return buf;
}
std::string flops_str(double n) {
  char buf[32];
  if (n >= 1e12) std::snprintf(buf, sizeof buf, "%.2f TFLOP", n / 1e12);
  else if (n >= 1e9) std::snprintf(buf, sizeof buf, "%.2f GFLOP", n / 1e9);
  else std::snprintf(buf, sizeof buf, "%.2f MFLOP", n / 1e6);
  return buf;
}
std::string seconds(double s) {
  char buf[32];
  if (s >= 1) std::snprintf(buf, sizeof buf, "%.2f s", s);
  else if (s >= 1e-3) std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  else std::snprintf(buf, sizeof buf, "%.1f us", s * 1e6);
  return buf;
}
const char* dtype_name(int bytes) { return bytes == 2 ? "BF16" : "FP32"; }
const char* recompute_name(Recompute r) {
  return r == Recompute::None ? "none" : r == Recompute::Selective ? "selective" : "full";
}

// bytes/s of a group: intra-node NVLink when its ranks lie on one node, else the network
double group_bandwidth(const PlanSettings& s, const std::vector<int>& ranks) {
  const bool one_node = ranks.empty() || ranks.front() / s.gpus_per_node == ranks.back() / s.gpus_per_node;
  return (one_node ? s.nvlink_gbps : s.net_gbps) * 1e9 / 8;
}

}  // namespace

int default_plan_world(const Deck& deck) {
  const int tp = deck.get<int>("parallel.tp"), pp = deck.get<int>("parallel.pp");
  const int ep = deck.get<int>("parallel.ep"), etp = deck.get<int>("parallel.etp");
  int dp = deck.get<int>("parallel.dp");
  if (dp == 0) {
    const int g = ep * etp;
    dp = g / std::gcd(g, tp);  // smallest dp with tp*dp divisible by ep*etp
  }
  return tp * pp * dp;
}

PlanSettings plan_settings_from_deck(const Deck& d, const ModelConfig& cfg, int world) {
  PlanSettings s;
  s.sizes = resolve_sizes(d, world, cfg);  // errors name the key and the constraint
  s.layout = parse_pp_layout(d.get<std::string>("parallel.pp_layout"), s.sizes.pp, (int)cfg.num_hidden_layers,
                             (int)cfg.num_nextn_predict_layers);
  s.seq_length = d.get<int64_t>("train.seq_length");
  s.micro_batch = d.get<int64_t>("train.micro_batch");
  s.global_batch = d.get<int64_t>("train.global_batch");
  s.device = d.get<std::string>("run.device");
  const bool gpu = s.device != "cpu";
  auto bytes = [&](const char* key) { return d.get<std::string>(key) == "bf16" ? 2 : 4; };
  // the CPU backend keeps FP32 storage and emulates BF16 weights/gradients by rounding; moments are real BF16
  s.weight_bytes = gpu ? bytes("optim.param_dtype") : 4;
  s.grad_bytes = gpu ? bytes("optim.grad_dtype") : 4;
  s.moment_bytes = bytes("optim.moment_dtype");
  s.bf16_params = d.get<std::string>("optim.param_dtype") == "bf16";
  s.act_bytes = gpu ? bytes("optim.param_dtype") : 4;
  const std::string rc =
      d.get<std::string>("plan.recompute").empty() ? d.get<std::string>("train.recompute") : d.get<std::string>("plan.recompute");
  s.recompute = rc == "none" ? Recompute::None : rc == "selective" ? Recompute::Selective : Recompute::Full;
  s.flash_attention = d.get<std::string>("run.attention") == "flash";
  if (gpu) {
    s.device_tflops = d.get<double>("plan.device_tflops");
  } else {  // one rank's cores: run.threads, or what OpenMP will use (run.threads = 0: all cores)
    const int threads = d.get<int>("run.threads") > 0 ? d.get<int>("run.threads") : omp_get_max_threads();
    s.device_tflops = d.get<double>("plan.cpu_core_tflops") * threads;
  }
  s.compute_efficiency = d.get<double>("plan.compute_efficiency");
  s.device_mem_gib = d.get<double>("plan.device_mem_gib");
  s.net_gbps = d.get<double>("plan.net_gbps");
  s.nvlink_gbps = d.get<double>("plan.nvlink_gbps");
  s.gpus_per_node = d.get<int>("plan.gpus_per_node");
  return s;
}

ModelFlops model_flops_per_sequence(const ModelConfig& c, int64_t S) {
  ModelFlops f;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) add(f, layer_flops(c, i, S));
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) add(f, layer_flops(c, c.num_hidden_layers + k, S - 1 - k));
  add(f, head_flops(c, S, true));
  return f;
}

Plan make_plan(const ModelConfig& c, const PlanSettings& s) {
  const ParallelSizes& z = s.sizes;
  DSV3_CHECK((int)s.layout.size() == z.pp, "the plan has " << s.layout.size() << " stage layouts for pp=" << z.pp);
  DSV3_CHECK(s.seq_length >= 2 && s.micro_batch >= 1 && s.global_batch >= 1,
             "train.seq_length, train.micro_batch and train.global_batch must be positive (seq_length >= 2)");
  Plan p;
  p.params = count_params(c);
  p.settings = s;
  p.model_source = c.source;
  const int64_t per_rank = ceil_div(s.global_batch, z.dp);           // sequences of the largest dp share
  const int64_t b = std::min(s.micro_batch, per_rank);                // sequences of a full micro-batch
  p.microbatches = ceil_div(per_rank, s.micro_batch);
  const int64_t m = p.microbatches;
  p.bubble_fraction = (double)(z.pp - 1) / (m + z.pp - 1);
  p.bubble_fraction_simulated = simulate_1f1b(z.pp, (int)m).bubble_fraction;
  const ModelFlops mf = model_flops_per_sequence(c, s.seq_length);
  p.flops_per_token = mf.total() / s.seq_length;
  p.matmul_flops_per_token = mf.matmul / s.seq_length;
  p.attention_flops_per_token = mf.attention / s.seq_length;

  const auto table = build_param_table(c);
  const Groups g = groups_of(z, 0);
  const double peak = s.device_tflops * 1e12 * s.compute_efficiency;
  for (int si = 0; si < z.pp; ++si) {
    const StageLayout& L = s.layout[si];
    StagePlan sp;
    sp.stage = si;
    sp.layout = format_layout({L});
    sp.layout = sp.layout.substr(sp.layout.find(':') + 2);  // "pp0: E t0-3" -> "E t0-3"
    int64_t dense = 0, expert = 0;
    for (const ParamSpec& q : table) {
      const Holding h = holding(c, L, z.pp, q);
      if (h == kNotHeld) continue;
      const int64_t n = rank_numel(q, z);
      sp.params_held += n;
      if (q.trainable && h == kOwner) (q.expert_stack ? expert : dense) += n;
    }
    sp.dense_shard = ceil_div(dense, z.dp);
    sp.expert_shard = ceil_div(expert, z.edp());
    StageMemory& mem = sp.memory;
    mem.weights = sp.params_held * s.weight_bytes;
    mem.grads = sp.params_held * s.grad_bytes;
    const int64_t per_elem = 4 + 2 * s.moment_bytes + 1;  // master, m, v, decay flag
    // + the reduced gradient of a shard of a group of more than one (a group of one reads the gradients in place)
    mem.optimizer = (sp.dense_shard + sp.expert_shard) * per_elem + (z.dp > 1 ? sp.dense_shard * 4 : 0) +
                    (z.edp() > 1 ? sp.expert_shard * 4 : 0);
    // ZeRO staging: with BF16 weights the updated shard of a bucket over more than one rank, rounded (FP32 and BF16
    // copies) before its all-gather. The reduce-scatter reads the gradients' own storage and the all-gather writes the
    // weights' (model/params.h pads the buckets to the group); a group of one's update writes the weights itself
    mem.comm_zero = s.bf16_params ? std::max(z.dp > 1 ? sp.dense_shard : 0, z.edp() > 1 ? sp.expert_shard : 0) * 6 : 0;
    sp.inflight = (int)std::min<int64_t>(z.pp - si, m);
    const StageActs a = stage_acts(c, s, si, b);
    sp.act_per_microbatch = (int64_t)a.stored;
    mem.activations = (int64_t)(a.stored * sp.inflight);
    mem.kv = (int64_t)(a.kv * sp.inflight);
    mem.workspace = (int64_t)a.work;
    mem.comm_pipeline = (int64_t)a.comm;
    // RoPE cos/sin (max_pos, dr/2) each; the rank's tokens and labels (int64) and one sample
    mem.other = c.max_position_embeddings * c.qk_rope_head_dim * 4 + 2 * per_rank * s.seq_length * 8 +
                (s.seq_length + 1) * 8;
    mem.total = mem.weights + mem.grads + mem.optimizer + mem.other +
                std::max(mem.activations + mem.workspace + mem.comm_pipeline, mem.comm_zero);
    sp.fits = s.device == "cpu" || (double)mem.total <= s.device_mem_gib * 1024.0 * 1024 * 1024;

    // FLOPs and times of one micro-batch on one rank of this stage
    ModelFlops f;
    int moe_layers = 0;
    for (int l : L.layers) add(f, layer_flops(c, l, s.seq_length)), moe_layers += c.is_moe_layer(l);
    double moe_rows = moe_layers * (double)s.seq_length;
    if (L.loss) add(f, head_flops(c, s.seq_length, L.mtp));
    if (L.mtp)
      for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
        add(f, layer_flops(c, c.num_hidden_layers + k, s.seq_length - 1 - k));
        if (c.is_moe_layer(c.num_hidden_layers + k)) moe_rows += s.seq_length - 1 - k;
      }
    sp.flops_per_microbatch = f.total() * b / z.tp;
    sp.t_compute = sp.flops_per_microbatch / peak;
    const double tok_bytes = (double)b * s.seq_length * c.hidden_size * s.act_bytes / (z.sp ? z.tp : 1);
    if (z.ep > 1)
      sp.t_ep = 4 * moe_rows * b * c.num_experts_per_tok * c.hidden_size * s.act_bytes * (z.ep - 1) / z.ep /
                (z.sp ? z.tp : 1) / group_bandwidth(s, g.ep);
    if (z.pp > 1) sp.t_pp = ((si > 0) + (si + 1 < z.pp)) * tok_bytes / group_bandwidth(s, g.pp);
    if (z.tp > 1) {
      const double layers = L.layers.size() + (L.mtp ? c.num_nextn_predict_layers : 0);
      sp.t_tp = layers * 8 * (z.tp - 1.0) / z.tp * tok_bytes * (z.sp ? z.tp : 1) / group_bandwidth(s, g.tp);
    }
    p.stages.push_back(sp);
  }

  // ---- the step: 1F1B on the slowest stage, then the ZeRO-1 reductions ----------------------------------------
  const auto slow = std::max_element(p.stages.begin(), p.stages.end(), [](const StagePlan& a, const StagePlan& b) {
    return a.t_microbatch() < b.t_microbatch();
  });
  StepEstimate& e = p.step;
  e.compute = m * slow->t_compute;
  e.ep = m * slow->t_ep;
  e.pp = m * slow->t_pp;
  e.tp = m * slow->t_tp;
  e.bubble = (z.pp - 1) * slow->t_microbatch();
  const int gb = s.device == "cpu" ? 4 : s.grad_bytes, wb = s.device == "cpu" ? 4 : s.weight_bytes;
  for (const StagePlan& sp : p.stages) {
    auto ring = [&](int64_t shard, int n, const std::vector<int>& ranks) {
      return n > 1 ? (n - 1.0) * shard * (gb + wb) / group_bandwidth(s, ranks) : 0.0;  // reduce-scatter + all-gather
    };
    e.dp = std::max(e.dp, ring(sp.dense_shard, z.dp, g.dp) + ring(sp.expert_shard, z.edp(), g.edp));
  }
  e.total = e.compute + e.bubble + e.ep + e.pp + e.tp + e.dp;
  e.tokens_per_s_per_rank = (double)s.global_batch * s.seq_length / e.total / z.world;
  e.tflops_per_rank = p.flops_per_token * e.tokens_per_s_per_rank / 1e12;
  e.mfu = e.tflops_per_rank / s.device_tflops;
  return p;
}

std::string format_plan(const Plan& p) {
  const PlanSettings& s = p.settings;
  const ParallelSizes& z = s.sizes;
  std::ostringstream o;
  char line[512];
  auto count = [&](const char* what, int64_t n) {
    std::snprintf(line, sizeof line, "  %-34s %18lld  (%s)\n", what, (long long)n, human((double)n).c_str());
    o << line;
  };
  o << "model " << p.model_source << "\n";
  count("parameters, main model", p.params.main);
  count("parameters, MTP module (own)", p.params.mtp);
  count("parameters, total unique", p.params.main + p.params.mtp);
  count("tensor elements in HF files", p.params.hf_total);
  count("activated per token (main)", p.params.activated);
  std::snprintf(line, sizeof line, "  %-34s %18lld\n", "expert-bias elements (not trained)", (long long)p.params.biases);
  o << line;

  o << "\nlayout " << format_sizes(z) << "\n";
  const int64_t b = std::min(s.micro_batch, ceil_div(s.global_batch, z.dp));
  o << "  " << p.microbatches << " micro-batch(es) of " << b << " x " << s.seq_length << " tokens per rank per step (global batch "
    << s.global_batch << "); run.device " << s.device << ": weights " << dtype_name(s.weight_bytes) << ", gradients "
    << dtype_name(s.grad_bytes) << ", FP32 master, moments " << dtype_name(s.moment_bytes) << ", activations "
    << dtype_name(s.act_bytes) << "; plan.recompute " << recompute_name(s.recompute) << "\n";

  const bool small = std::all_of(p.stages.begin(), p.stages.end(), [](const StagePlan& sp) {
    return sp.memory.total < (int64_t)4 << 30;
  });
  auto unit = [&](double v) { return small ? mib(v) : gib(v); };
  o << "\nmemory per rank of each pipeline stage (" << (small ? "MiB" : "GiB")
    << "; mb: micro-batches in flight, whose activations are kept, the attention K/V part in brackets; "
       "total = peak)\n";
  std::snprintf(line, sizeof line, "  %5s  %-16s %14s %9s %9s %9s %4s %10s %9s %9s %9s %8s %9s %5s\n", "stage", "layout",
                "params/rank", "weights", "grads", "optim", "mb", "activ.", "(KV)", "work", "comm", "other", "total",
                s.device == "cpu" ? "" : "fits");
  o << line;
  for (const StagePlan& sp : p.stages) {
    const StageMemory& m = sp.memory;
    std::string lay = sp.layout.size() > 16 ? sp.layout.substr(0, 13) + "..." : sp.layout;
    std::snprintf(line, sizeof line, "  %5d  %-16s %14lld %9s %9s %9s %4d %10s %9s %9s %9s %8s %9s %5s\n", sp.stage,
                  lay.c_str(), (long long)sp.params_held, unit(m.weights).c_str(), unit(m.grads).c_str(),
                  unit(m.optimizer).c_str(), sp.inflight, unit(m.activations).c_str(),
                  ("(" + unit(m.kv) + ")").c_str(), unit(m.workspace).c_str(), unit(m.comm()).c_str(),
                  unit(m.other).c_str(), unit(m.total).c_str(), s.device == "cpu" ? "" : (sp.fits ? "yes" : "NO"));
    o << line;
  }
  if (s.device != "cpu") o << "  (fits: total <= plan.device_mem_gib = " << s.device_mem_gib << " GiB)\n";

  std::snprintf(line, sizeof line,
                "\npipeline bubble: %.2f%% of the step ((pp-1)/(m+pp-1) = %d/%lld; 1F1B simulation: %.2f%%)\n",
                100 * p.bubble_fraction, z.pp - 1, (long long)(p.microbatches + z.pp - 1),
                100 * p.bubble_fraction_simulated);
  o << line;
  o << "model FLOPs per token (forward + backward, causal attention, MTP included): " << flops_str(p.flops_per_token)
    << " = matmuls " << flops_str(p.matmul_flops_per_token) << " + attention " << flops_str(p.attention_flops_per_token)
    << " (6 x activated parameters: " << flops_str(6.0 * p.params.activated) << ")\n";
  const StepEstimate& e = p.step;
  o << "step time estimate: " << seconds(e.total) << " = compute " << seconds(e.compute) << " + bubble "
    << seconds(e.bubble) << " + expert all-to-all " << seconds(e.ep) << " + pipeline p2p " << seconds(e.pp)
    << " + tensor parallel " << seconds(e.tp) << " + ZeRO-1 dp " << seconds(e.dp) << "\n";
  std::snprintf(line, sizeof line,
                "  %.0f tokens/s per rank, %.3g TFLOP/s per rank, MFU %.1f%% (peak %.4g TFLOP/s per rank, "
                "plan.compute_efficiency %.2f, network %g / NVLink %g Gbit/s)\n",
                e.tokens_per_s_per_rank, e.tflops_per_rank, 100 * e.mfu, s.device_tflops, s.compute_efficiency,
                s.net_gbps, s.nvlink_gbps);
  o << line;
  return o.str();
}

nlohmann::json plan_to_json(const Plan& p) {
  using nlohmann::json;
  const PlanSettings& s = p.settings;
  const ParallelSizes& z = s.sizes;
  json j;
  j["model"] = p.model_source;
  j["params"] = {{"main", p.params.main},         {"mtp", p.params.mtp},         {"activated", p.params.activated},
                 {"hf_total", p.params.hf_total}, {"biases", p.params.biases}};
  j["parallel"] = {{"world", z.world}, {"tp", z.tp}, {"pp", z.pp},     {"dp", z.dp},
                   {"ep", z.ep},       {"etp", z.etp}, {"edp", z.edp()}, {"sp", z.sp}};
  j["settings"] = {{"device", s.device},
                   {"seq_length", s.seq_length},
                   {"micro_batch", s.micro_batch},
                   {"global_batch", s.global_batch},
                   {"weight_bytes", s.weight_bytes},
                   {"grad_bytes", s.grad_bytes},
                   {"moment_bytes", s.moment_bytes},
                   {"activation_bytes", s.act_bytes},
                   {"recompute", recompute_name(s.recompute)},
                   {"device_tflops", s.device_tflops},
                   {"compute_efficiency", s.compute_efficiency},
                   {"device_mem_gib", s.device_mem_gib},
                   {"net_gbps", s.net_gbps},
                   {"nvlink_gbps", s.nvlink_gbps},
                   {"gpus_per_node", s.gpus_per_node}};
  j["microbatches"] = p.microbatches;
  j["bubble_fraction"] = p.bubble_fraction;
  j["bubble_fraction_simulated"] = p.bubble_fraction_simulated;
  j["flops_per_token"] = {{"model", p.flops_per_token},
                          {"matmul", p.matmul_flops_per_token},
                          {"attention", p.attention_flops_per_token},
                          {"six_times_activated", 6.0 * p.params.activated}};
  json stages = json::array();
  for (const StagePlan& sp : p.stages) {
    const StageMemory& m = sp.memory;
    stages.push_back({{"stage", sp.stage},
                      {"layout", sp.layout},
                      {"params_held", sp.params_held},
                      {"dense_shard", sp.dense_shard},
                      {"expert_shard", sp.expert_shard},
                      {"inflight_microbatches", sp.inflight},
                      {"activation_bytes_per_microbatch", sp.act_per_microbatch},
                      {"fits", sp.fits},
                      {"flops_per_microbatch", sp.flops_per_microbatch},
                      {"seconds_per_microbatch",
                       {{"compute", sp.t_compute}, {"ep", sp.t_ep}, {"pp", sp.t_pp}, {"tp", sp.t_tp}}},
                      {"memory_bytes",
                       {{"weights", m.weights},
                        {"grads", m.grads},
                        {"optimizer", m.optimizer},
                        {"activations", m.activations},
                        {"kv", m.kv},
                        {"workspace", m.workspace},
                        {"comm_pipeline", m.comm_pipeline},
                        {"comm_zero", m.comm_zero},
                        {"other", m.other},
                        {"total", m.total}}}});
  }
  j["stages"] = stages;
  const StepEstimate& e = p.step;
  j["step_seconds"] = {{"total", e.total}, {"compute", e.compute}, {"bubble", e.bubble}, {"ep", e.ep},
                       {"pp", e.pp},       {"tp", e.tp},           {"dp", e.dp}};
  j["tokens_per_s_per_rank"] = e.tokens_per_s_per_rank;
  j["tflops_per_rank"] = e.tflops_per_rank;
  j["mfu"] = e.mfu;
  return j;
}

}  // namespace dsv3
