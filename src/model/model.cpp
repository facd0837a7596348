#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

#include "core/error.h"
#include "io/hf_checkpoint.h"

namespace dsv3 {

Model::Model(const ModelConfig& cfg, Backend& be)
    : cfg_(cfg), be_(be), params_(build_param_table(cfg)), rope_(make_rope_table(cfg, cfg.max_position_embeddings)) {}

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
    for (int64_t e = 0; e < p.n_experts(); ++e) {
      const std::string hf = p.hf_name_of(e);
      DSV3_CHECK(ck.has(hf), "HF checkpoint has no tensor '" << hf << "' (the model config expects it)");
      const auto shape = ck.shape(hf);
      DSV3_CHECK(shape == p.hf_shape(), "HF tensor '" << hf << "' has shape " << shape_str(shape)
                                                      << ", the model config implies " << shape_str(p.hf_shape()));
      ck.load_f32_into(hf, params_.get(p.name) + e * per, per);
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
    float* w = params_.get(p.name);
    const int64_t n = p.numel();
    if (!p.trainable) {
      std::fill(w, w + n, 0.0f);
    } else if (p.shape.size() == 1) {
      std::fill(w, w + n, 1.0f);
    } else {
      const uint64_t key = splitmix64(seed ^ std::hash<std::string>{}(p.name));
      const double sd = cfg_.initializer_range;
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {  // Box-Muller on two counter-based uniforms in (0, 1]
        const uint64_t a = splitmix64(key + 2 * (uint64_t)i), b = splitmix64(key + 2 * (uint64_t)i + 1);
        const double u1 = ((a >> 11) + 1.0) * 0x1.0p-53, u2 = (b >> 11) * 0x1.0p-53;
        w[i] = (float)(sd * std::sqrt(-2.0 * std::log(u1)) * std::cos(2 * M_PI * u2));
      }
    }
  }
}

void Model::layer_forward(int64_t layer, float* x, int64_t B, int64_t S, MlaCache* cache, MoeTrace* mt) {
  const int64_t T = B * S, D = cfg_.hidden_size;
  const std::string pre = "model.layers." + std::to_string(layer) + ".";
  const float eps = (float)cfg_.rms_norm_eps;
  std::vector<float> xn(T * D), y(T * D);

  // attention block: x += MLA(rmsnorm(x))
  be_.rmsnorm_forward(x, D, params_.get(pre + "input_layernorm.weight"), eps, T, D, xn.data(), nullptr);
  const MlaWeights aw = MlaWeights::from(params_, cfg_, layer);
  if (cache)
    mla_forward_cached(be_, cfg_, aw, rope_, xn.data(), T, *cache, y.data());
  else
    mla_forward(be_, cfg_, aw, rope_, xn.data(), B, S, y.data());
  for (int64_t i = 0; i < T * D; ++i) x[i] += y[i];

  // MLP block: x += MLP(rmsnorm(x)), dense SwiGLU or DeepSeekMoE
  be_.rmsnorm_forward(x, D, params_.get(pre + "post_attention_layernorm.weight"), eps, T, D, xn.data(), nullptr);
  if (!cfg_.is_moe_layer(layer)) {
    swiglu_mlp_forward(be_, xn.data(), T, D, cfg_.intermediate_size, params_.get(pre + "mlp.gate_proj.weight"),
                       params_.get(pre + "mlp.up_proj.weight"), params_.get(pre + "mlp.down_proj.weight"), y.data(),
                       false);
  } else {
    const MoeWeights mw = MoeWeights::from(params_, cfg_, layer);
    Routing r = moe_route(be_, cfg_, mw, xn.data(), T);
    Dispatch d = moe_dispatch(r, xn.data(), D);
    moe_experts(be_, cfg_, mw, d);
    if (mw.sh_gate)
      swiglu_mlp_forward(be_, xn.data(), T, D, cfg_.moe_intermediate_size * cfg_.n_shared_experts, mw.sh_gate,
                         mw.sh_up, mw.sh_down, y.data(), false);
    else
      std::fill(y.begin(), y.end(), 0.0f);
    moe_combine(r, d, D, y.data());
    if (mt) {
      mt->balance_loss = seq_balance_loss(r, B);
      mt->idx = std::move(r.idx);
      mt->weight = std::move(r.weight);
      mt->counts = std::move(r.counts);
    }
  }
  for (int64_t i = 0; i < T * D; ++i) x[i] += y[i];
}

void Model::main_forward(const int64_t* tokens, int64_t B, int64_t S, std::vector<float>& h, ForwardTrace* tr) {
  const int64_t T = B * S, D = cfg_.hidden_size;
  for (int64_t i = 0; i < T; ++i)
    DSV3_CHECK(tokens[i] >= 0 && tokens[i] < cfg_.vocab_size,
               "token id " << tokens[i] << " at position " << i << " is outside the vocabulary [0, " << cfg_.vocab_size << ")");
  std::vector<float> x(T * D);
  be_.embedding_forward(tokens, T, params_.get("model.embed_tokens.weight"), D, x.data());
  const bool keep = tr && tr->keep_hidden;
  if (keep) tr->embed = x, tr->layer_out.clear();
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    layer_forward(l, x.data(), B, S, nullptr, tr && cfg_.is_moe_layer(l) ? &tr->moe[l] : nullptr);
    if (keep) tr->layer_out.push_back(x);
  }
  h.resize(T * D);
  be_.rmsnorm_forward(x.data(), D, params_.get("model.norm.weight"), (float)cfg_.rms_norm_eps, T, D, h.data(), nullptr);
  if (keep) tr->final_norm = h;
}

Losses Model::forward(const int64_t* tokens, int64_t B, int64_t S, double mtp_lambda, double aux_alpha,
                      ForwardTrace* tr) {
  DSV3_CHECK(S >= 2, "a training sequence needs at least 2 tokens, got " << S);
  const int64_t T = B * S, D = cfg_.hidden_size, V = cfg_.vocab_size;
  const float eps = (float)cfg_.rms_norm_eps;
  ForwardTrace local;
  if (!tr) tr = &local;  // the balance loss comes through the trace
  tr->moe.clear();
  Losses L;

  std::vector<float> h;
  main_forward(tokens, B, S, h, tr);
  std::vector<float> logits(T * V);
  be_.gemm_nt(T, V, D, 1.0f, h.data(), D, params_.get("lm_head.weight"), D, 0.0f, logits.data(), V);
  std::vector<int64_t> tgt(T, -1);  // position s predicts token s+1
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s + 1 < S; ++s) tgt[b * S + s] = tokens[b * S + s + 1];
  int64_t n = 0;
  L.lm = be_.cross_entropy_forward(logits.data(), T, V, tgt.data(), &n) / n;
  if (tr->keep_hidden) tr->logits = std::move(logits);

  // MTP depth 1 (HF layer num_hidden_layers): position i combines the embedding of token i+1 (first) with the
  // main model's final-norm hidden state h_i (second) and predicts token i+2.
  if (cfg_.num_nextn_predict_layers > 0) {
    const int64_t Sm = S - 1, Tm = B * Sm, layer = cfg_.num_hidden_layers;
    const std::string pre = "model.layers." + std::to_string(layer) + ".";
    std::vector<int64_t> next(Tm);
    std::vector<float> e(Tm * D), hm(Tm * D), cat(Tm * 2 * D), x(Tm * D);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Sm; ++i) {
        next[b * Sm + i] = tokens[b * S + i + 1];
        std::copy_n(h.data() + (b * S + i) * D, D, hm.data() + (b * Sm + i) * D);
      }
    be_.embedding_forward(next.data(), Tm, params_.get("model.embed_tokens.weight"), D, e.data());
    // cat (Tm, 2D) = [enorm(e) | hnorm(h)]: two normalisations written into the halves of each row
    std::vector<float> en(Tm * D), hn(Tm * D);
    be_.rmsnorm_forward(e.data(), D, params_.get(pre + "enorm.weight"), eps, Tm, D, en.data(), nullptr);
    be_.rmsnorm_forward(hm.data(), D, params_.get(pre + "hnorm.weight"), eps, Tm, D, hn.data(), nullptr);
    for (int64_t t = 0; t < Tm; ++t) {
      std::copy_n(en.data() + t * D, D, cat.data() + t * 2 * D);
      std::copy_n(hn.data() + t * D, D, cat.data() + t * 2 * D + D);
    }
    be_.gemm_nt(Tm, D, 2 * D, 1.0f, cat.data(), 2 * D, params_.get(pre + "eh_proj.weight"), 2 * D, 0.0f, x.data(), D);
    if (tr->keep_hidden) tr->mtp_eh_proj = x;
    layer_forward(layer, x.data(), B, Sm, nullptr, cfg_.is_moe_layer(layer) ? &tr->moe[layer] : nullptr);
    if (tr->keep_hidden) tr->mtp_block = x;
    be_.rmsnorm_forward(x.data(), D, params_.get(pre + "shared_head.norm.weight"), eps, Tm, D, hm.data(), nullptr);
    std::vector<float> ml(Tm * V);
    be_.gemm_nt(Tm, V, D, 1.0f, hm.data(), D, params_.get("lm_head.weight"), D, 0.0f, ml.data(), V);
    std::vector<int64_t> mt(Tm, -1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i + 2 < S; ++i) mt[b * Sm + i] = tokens[b * S + i + 2];
    int64_t nm = 0;
    const double sum = be_.cross_entropy_forward(ml.data(), Tm, V, mt.data(), &nm);
    L.mtp = nm > 0 ? sum / nm : 0.0;
    if (tr->keep_hidden) tr->mtp_logits = std::move(ml);
  }
  for (const auto& [layer, m] : tr->moe) L.aux += m.balance_loss;
  L.total = L.lm + mtp_lambda * L.mtp + aux_alpha * L.aux;
  return L;
}

std::vector<float> Model::logits(const int64_t* tokens, int64_t B, int64_t S) {
  const int64_t T = B * S, D = cfg_.hidden_size, V = cfg_.vocab_size;
  std::vector<float> h, out(T * V);
  main_forward(tokens, B, S, h, nullptr);
  be_.gemm_nt(T, V, D, 1.0f, h.data(), D, params_.get("lm_head.weight"), D, 0.0f, out.data(), V);
  return out;
}

KvCache Model::make_cache(int64_t capacity) const {
  KvCache kc;
  kc.layers.resize(cfg_.num_hidden_layers);
  for (auto& l : kc.layers) l.reserve(cfg_, capacity);
  return kc;
}

std::vector<float> Model::forward_cached(const int64_t* tokens, int64_t n, KvCache& cache) {
  const int64_t D = cfg_.hidden_size, V = cfg_.vocab_size;
  for (int64_t i = 0; i < n; ++i)
    DSV3_CHECK(tokens[i] >= 0 && tokens[i] < V, "token id " << tokens[i] << " is outside the vocabulary [0, " << V << ")");
  std::vector<float> x(n * D), h(D), out(V);
  be_.embedding_forward(tokens, n, params_.get("model.embed_tokens.weight"), D, x.data());
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) layer_forward(l, x.data(), 1, n, &cache.layers[l], nullptr);
  be_.rmsnorm_forward(x.data() + (n - 1) * D, D, params_.get("model.norm.weight"), (float)cfg_.rms_norm_eps, 1, D,
                      h.data(), nullptr);
  be_.gemm_nt(1, V, D, 1.0f, h.data(), D, params_.get("lm_head.weight"), D, 0.0f, out.data(), V);
  return out;
}

}  // namespace dsv3
