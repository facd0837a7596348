#include "optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"  // float_to_bf16 / bf16_to_float
#include "parallel/comm.h"

namespace dsv3 {

namespace {
// fixed-size chunks summed in order: the same bits on every run and any thread count
double sum_squares(const float* g, int64_t n) {
  constexpr int64_t kChunk = 4096;
  const int64_t nc = (n + kChunk - 1) / kChunk;
  std::vector<double> part(nc, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) part[c] += (double)g[i] * g[i];
  double ss = 0;
  for (double v : part) ss += v;
  return ss;
}
}  // namespace

double global_grad_norm(const Params& grads) {
  double ss = 0;
  for (const ParamSpec& p : grads.table())
    if (p.trainable && grads.held(p) && !grads.is_copy(p)) ss += sum_squares(grads.get(p.name), grads.local_numel(p));
  return std::sqrt(ss);
}

double clip_coefficient(double norm, double max_norm) {
  if (max_norm <= 0) return 1.0;
  const double coef = max_norm / (norm + 1e-6);
  return coef < 1.0 ? coef : 1.0;
}

double clip_grads(Params& grads, double norm, double max_norm) {
  const double coef = clip_coefficient(norm, max_norm);
  if (coef >= 1.0) return 1.0;
  const float c = (float)coef;
  float* g = grads.data();
  const int64_t n = grads.size();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) g[i] *= c;
  return coef;
}

void round_to_bf16(float* x, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] = bf16_to_float(float_to_bf16(x[i]));
}

AdamW::AdamW(const Params& params, const AdamWConfig& cfg, const Comm* comm) : cfg_(cfg), comm_(comm) {
  buckets_.resize(2);
  buckets_[0].group = (int)GroupKind::dp;   // dense parameters: replicated over data parallel
  buckets_[1].group = (int)GroupKind::edp;  // routed experts: replicated over expert data parallel
  const auto& table = params.table();
  for (size_t i = 0; i < table.size(); ++i) {
    // the copy of a parameter another pipeline stage owns (the embedding for MTP) is not optimized here: its
    // gradient goes to the owner and the owner's weights come back after the step
    if (!table[i].trainable || !params.held(table[i]) || params.is_copy(table[i])) continue;
    Bucket& b = buckets_[table[i].expert_stack ? 1 : 0];
    b.params.push_back((int)i);
    b.size += params.local_numel(table[i]);
  }
  for (Bucket& b : buckets_) {
    const int n = comm_ ? comm_->group_size((GroupKind)b.group) : 1;
    const int r = comm_ ? comm_->group_rank((GroupKind)b.group) : 0;
    b.padded = (b.size + n - 1) / n * n;
    b.shard = b.padded / n;
    b.begin = r * b.shard;
    std::vector<float> flat;
    pack(params, b, flat);
    b.master.assign(flat.begin() + b.begin, flat.begin() + b.begin + b.shard);
    // per-element decay flags of my shard (padding: no decay, it never leaves the optimizer)
    b.decay.assign(b.shard, 0);
    const bool tp_copy = params.plan().tp_size > 1 && params.plan().tp_rank > 0;  // replicated params: not counted
    b.norm_partial = false;
    int64_t off = 0;
    for (int i : b.params) {
      const ParamSpec& p = table[i];
      const int64_t n_el = params.local_numel(p);
      const int64_t lo = std::max(off, b.begin), hi = std::min(off + n_el, b.begin + b.shard);
      for (int64_t k = lo; k < hi; ++k) b.decay[k - b.begin] = p.decay;
      const bool counted = !tp_copy || p.expert_stack || params.tp_sharded(p);
      if (!counted) b.norm_partial = true;
      if (counted && lo < hi) {
        if (!b.norm_ranges.empty() && b.norm_ranges.back().second == lo - b.begin) b.norm_ranges.back().second = hi - b.begin;
        else b.norm_ranges.push_back({lo - b.begin, hi - b.begin});
      }
      off += n_el;
    }
    if (cfg_.bf16_moments) {
      b.m16.assign(b.shard, 0);
      b.v16.assign(b.shard, 0);
    } else {
      b.m.assign(b.shard, 0.0f);
      b.v.assign(b.shard, 0.0f);
    }
  }
}

void AdamW::pack(const Params& src, const Bucket& b, std::vector<float>& flat) const {
  flat.assign(b.padded, 0.0f);
  int64_t off = 0;
  for (int i : b.params) {
    const ParamSpec& p = src.table()[i];
    const int64_t n = src.local_numel(p);
    std::memcpy(flat.data() + off, src.get(p.name), n * sizeof(float));
    off += n;
  }
}

void AdamW::unpack(const std::vector<float>& flat, const Bucket& b, Params& dst) const {
  int64_t off = 0;
  for (int i : b.params) {
    const ParamSpec& p = dst.table()[i];
    const int64_t n = dst.local_numel(p);
    std::memcpy(dst.get(p.name), flat.data() + off, n * sizeof(float));
    off += n;
  }
}

double AdamW::reduce_grads(const Params& grads) {
  double ss = 0;
  std::vector<float> flat;
  for (Bucket& b : buckets_) {
    pack(grads, b, flat);
    b.g.resize(b.shard);
    if (comm_)
      comm_->reduce_scatter((GroupKind)b.group, flat.data(), b.g.data(), b.shard);
    else
      std::copy(flat.begin(), flat.end(), b.g.begin());
    if (!b.norm_partial)
      ss += sum_squares(b.g.data(), b.shard);
    else
      for (const auto& [lo, hi] : b.norm_ranges) ss += sum_squares(b.g.data() + lo, hi - lo);
  }
  // every unique element is counted in exactly one shard of one rank (pipeline copies excluded; a tp-replicated
  // parameter on tp rank 0 only): the world sum is the global norm
  if (comm_) comm_->allreduce_sum(GroupKind::world, &ss, 1);
  return std::sqrt(ss);
}

void AdamW::step(Params& params, double lr, double grad_scale) {
  ++t_;
  const float b1 = (float)cfg_.beta1, b2 = (float)cfg_.beta2, eps = (float)cfg_.eps;
  const float bc1 = (float)(1.0 - std::pow(cfg_.beta1, (double)t_));
  const float bc2 = (float)(1.0 - std::pow(cfg_.beta2, (double)t_));
  const float flr = (float)lr, decay = (float)(1.0 - lr * cfg_.weight_decay), gs = (float)grad_scale;
  const bool scale = grad_scale != 1.0;
  const bool m16 = cfg_.bf16_moments;
  std::vector<float> flat;
  for (Bucket& b : buckets_) {
    DSV3_CHECK((int64_t)b.g.size() == b.shard, "AdamW::step before reduce_grads");
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < b.shard; ++i) {
      const float g = scale ? b.g[i] * gs : b.g[i];  // the clipped gradient, as `g *= coef` would give it
      float m = m16 ? bf16_to_float(b.m16[i]) : b.m[i];
      float v = m16 ? bf16_to_float(b.v16[i]) : b.v[i];
      m = b1 * m + (1 - b1) * g;
      v = b2 * v + (1 - b2) * g * g;
      float p = b.master[i];
      if (b.decay[i]) p *= decay;
      p -= flr * (m / bc1) / (std::sqrt(v / bc2) + eps);
      b.master[i] = p;
      if (m16) {
        b.m16[i] = float_to_bf16(m);
        b.v16[i] = float_to_bf16(v);
      } else {
        b.m[i] = m;
        b.v[i] = v;
      }
    }
    // the updated shards of every rank back into the (replicated) model weights
    flat.assign(b.padded, 0.0f);
    std::vector<float> mine(b.master);
    if (cfg_.bf16_params) round_to_bf16(mine.data(), b.shard);
    if (comm_)
      comm_->allgather((GroupKind)b.group, mine.data(), flat.data(), b.shard);
    else
      std::copy(mine.begin(), mine.end(), flat.begin());
    unpack(flat, b, params);
  }
}

void AdamW::step(Params& params, const Params& grads, double lr) {
  reduce_grads(grads);
  step(params, lr, 1.0);
}

}  // namespace dsv3
