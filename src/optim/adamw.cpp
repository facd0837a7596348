#include "optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "ops/backend.h"
#include "ops/cpu/cpu_backend.h"
#include "parallel/comm.h"

namespace dsv3 {

double global_grad_norm(const Params& grads, Backend* be) {
  CpuBackend cpu;
  if (!be) be = &cpu;
  double ss = 0;
  for (const ParamSpec& p : grads.table())
    if (p.trainable && grads.held(p) && !grads.is_copy(p))
      ss += be->sum_squares(grads.get(p.name), grads.local_numel(p));
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

void round_to_bf16(Backend& be, float* x, int64_t n) {
  if (n <= 0) return;
  Buffer<uint16_t> h(n);
  be.to_bf16(x, n, h.data());
  be.from_bf16(h.data(), n, x);
}

AdamW::~AdamW() = default;
AdamW::AdamW(AdamW&&) noexcept = default;

AdamW::AdamW(const Params& params, const AdamWConfig& cfg, const Comm* comm, Backend* be)
    : cfg_(cfg), comm_(comm), own_be_(be ? nullptr : std::make_unique<CpuBackend>()), be_(be ? be : own_be_.get()) {
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
    Floats flat;
    pack(params, b, flat);
    b.master.assign(flat.data() + b.begin, flat.data() + b.begin + b.shard);
    // per-element decay flags of my shard (padding: no decay, it never leaves the optimizer), made on the host
    std::vector<uint8_t> decay(b.shard, 0);
    const bool tp_copy = params.plan().tp_size > 1 && params.plan().tp_rank > 0;  // replicated params: not counted
    b.norm_partial = false;
    int64_t off = 0;
    for (int i : b.params) {
      const ParamSpec& p = table[i];
      const int64_t n_el = params.local_numel(p);
      const int64_t lo = std::max(off, b.begin), hi = std::min(off + n_el, b.begin + b.shard);
      for (int64_t k = lo; k < hi; ++k) decay[k - b.begin] = p.decay;
      const bool counted = !tp_copy || p.expert_stack || params.tp_sharded(p);
      if (!counted) b.norm_partial = true;
      if (counted && lo < hi) {
        if (!b.norm_ranges.empty() && b.norm_ranges.back().second == lo - b.begin) b.norm_ranges.back().second = hi - b.begin;
        else b.norm_ranges.push_back({lo - b.begin, hi - b.begin});
      }
      off += n_el;
    }
    b.decay.assign(decay.data(), decay.data() + decay.size());
    if (cfg_.bf16_moments) {  // zeroed
      b.m16 = Buffer<uint16_t>(b.shard);
      b.v16 = Buffer<uint16_t>(b.shard);
    } else {
      b.m = Floats(b.shard);
      b.v = Floats(b.shard);
    }
  }
}

// flat (padded) = the bucket's parameters of src, in table order (copies in the run's memory: device to device on
// the GPU); the padding zero
void AdamW::pack(const Params& src, const Bucket& b, Floats& flat) const {
  if ((int64_t)flat.size() != b.padded) flat = Floats(b.padded);
  else if (b.padded > b.size) default_memory().zero(flat.data() + b.size, sizeof(float) * (b.padded - b.size));
  int64_t off = 0;
  for (int i : b.params) {
    const ParamSpec& p = src.table()[i];
    const int64_t n = src.local_numel(p);
    default_memory().copy(flat.data() + off, src.get(p.name), n * sizeof(float));
    off += n;
  }
}

void AdamW::unpack(const Floats& flat, const Bucket& b, Params& dst) const {
  int64_t off = 0;
  for (int i : b.params) {
    const ParamSpec& p = dst.table()[i];
    const int64_t n = dst.local_numel(p);
    default_memory().copy(dst.get(p.name), flat.data() + off, n * sizeof(float));
    off += n;
  }
}

bool AdamW::gathered(const Bucket& b) const { return comm_ && comm_->group_size((GroupKind)b.group) > 1; }

// Where the bucket's padded elements begin in `p` when they lie there as the bucket's flat form: its parameters
// contiguous in the bucket's order, then zero padding up to b.padded (model/params.h stores by bucket, padded to the
// ZeRO-1 group); else -1
int64_t AdamW::contiguous_offset(const Params& p, size_t k) const {
  const Bucket& b = buckets_[k];
  if (b.params.empty()) return -1;
  const auto& table = p.table();
  const int64_t first = p.offset(table[b.params.front()].name);
  int64_t next = first;
  for (int i : b.params) {
    if (p.offset(table[i].name) != next) return -1;
    next += p.local_numel(table[i]);
  }
  const auto [begin, end] = p.bucket_region((int)k);
  return first == begin && end - begin >= b.padded ? first : -1;
}

double AdamW::reduce_grads(const Params& grads) {
  double ss = 0;
  Floats flat;
  for (size_t k = 0; k < buckets_.size(); ++k) {
    Bucket& b = buckets_[k];
    const int64_t off = contiguous_offset(grads, k);  // >= 0: the flat bucket is the gradients' own storage
    if (gathered(b)) {
      const float* in = nullptr;
      if (off >= 0) {
        in = grads.data() + off;
      } else {  // not laid out as the bucket (a Params without the plan's alignment): a packed copy
        pack(grads, b, flat);
        in = flat.data();
      }
      if ((int64_t)b.g.size() != b.shard) b.g = Floats(b.shard);
      comm_->reduce_scatter((GroupKind)b.group, in, b.g.data(), b.shard);
      b.grad = b.g.data();
    } else if (off >= 0) {
      b.grad = grads.data() + off;  // a group of one: the shard is the whole bucket (padded == size), read in place
    } else {
      pack(grads, b, b.g);
      b.grad = b.g.data();
    }
    if (!b.norm_partial)
      ss += be_->sum_squares(b.grad, b.shard);
    else
      for (const auto& [lo, hi] : b.norm_ranges) ss += be_->sum_squares(b.grad + lo, hi - lo);
  }
  // every unique element is counted in exactly one shard of one rank (pipeline copies excluded; a tp-replicated
  // parameter on tp rank 0 only): the world sum is the global norm
  if (comm_) comm_->allreduce_sum(GroupKind::world, &ss, 1);
  return std::sqrt(ss);
}

void AdamW::step(Params& params, double lr, double grad_scale) {
  ++t_;
  Backend::AdamWHyper h;
  h.lr = lr;
  h.beta1 = cfg_.beta1;
  h.beta2 = cfg_.beta2;
  h.eps = cfg_.eps;
  h.weight_decay = cfg_.weight_decay;
  h.grad_scale = grad_scale;
  h.t = t_;
  // both buckets' shards in one multi-tensor update; a group of one's bucket also writes the model's weights (the
  // shard is the whole bucket, contiguous in `params`), the others are gathered below
  std::vector<Backend::AdamWShard> shards;
  std::vector<int64_t> at(buckets_.size());  // where each bucket's flat form lies in `params` (-1: elsewhere)
  for (size_t k = 0; k < buckets_.size(); ++k) {
    Bucket& b = buckets_[k];
    at[k] = contiguous_offset(params, k);
    DSV3_CHECK(b.grad || b.shard == 0, "AdamW::step before reduce_grads");
    Backend::AdamWShard s;
    s.master = b.master.data();
    s.grad = b.grad;
    s.decay = b.decay.data();
    if (cfg_.bf16_moments) {
      s.m16 = b.m16.data();
      s.v16 = b.v16.data();
    } else {
      s.m = b.m.data();
      s.v = b.v.data();
    }
    s.n = b.shard;
    if (!gathered(b) && at[k] >= 0) {
      s.weights = params.data() + at[k];
      s.bf16_weights = cfg_.bf16_params;
    }
    shards.push_back(s);
  }
  be_->adamw_update(shards.data(), (int)shards.size(), h);
  Buffer<uint16_t> bf16;
  for (size_t k = 0; k < buckets_.size(); ++k) {
    Bucket& b = buckets_[k];
    if (!gathered(b) && at[k] >= 0) continue;  // written by the update
    // the updated shards of every rank back into the (replicated) model weights
    const Floats* mine = &b.master;
    Floats rounded;
    if (cfg_.bf16_params) {  // the BF16 weights: the master rounded (nearest even)
      rounded = Floats(b.shard);
      bf16 = Buffer<uint16_t>(b.shard);
      be_->to_bf16(b.master.data(), b.shard, bf16.data());
      be_->from_bf16(bf16.data(), b.shard, rounded.data());
      mine = &rounded;
    }
    if (gathered(b)) {
      if (at[k] >= 0) {  // straight into the weights (and padding)
        comm_->allgather((GroupKind)b.group, mine->data(), params.data() + at[k], b.shard);
        continue;
      }
      Floats flat(b.padded);
      comm_->allgather((GroupKind)b.group, mine->data(), flat.data(), b.shard);
      unpack(flat, b, params);
    } else {
      unpack(*mine, b, params);  // a group of one: the shard is the whole bucket
    }
  }
}

void AdamW::step(Params& params, const Params& grads, double lr) {
  reduce_grads(grads);
  step(params, lr, 1.0);
}

}  // namespace dsv3
