// defines: CudaBackend::router_forward / router_backward — the MoE router (sigmoid scores, noaux_tc selection).
// One warp per token. Selection follows the CPU op exactly (RouterSpec, ops/backend.h): with a node limit, node score =
// the node_topk best biased scores of the node's experts summed largest first, the max_nodes best nodes stay (ties:
// lower node index); group score = sum of the two best biased scores of the
// group (the best one if the group has one expert); the topk_group best groups stay (ties: lower group index); then
// the k best biased scores of the kept experts (ties: lower expert id), reported in ascending expert id; weights are
// the unbiased scores, normalised over the chosen (sum in double, ascending id) if norm, times scale.
#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "kernel_utils.cuh"

namespace dsv3 {

namespace {
constexpr unsigned kFull = 0xffffffffu;

constexpr int kMaxNodeTopk = 32;  // node_topk = k / max_nodes; checked on the host

// The keep-best rule of groups and nodes: block b (of n, `per` experts each) stays iff fewer than `keep` blocks come
// before it (higher score, or equal score and lower index); the experts of the others are masked.
__device__ void keep_best_blocks(float* sel, const float* score, int64_t n, int64_t per, int64_t keep, int lane) {
  for (int64_t g = lane; g < n; g += 32) {
    int64_t rank = 0;
    for (int64_t o = 0; o < n; ++o) rank += score[o] > score[g] || (score[o] == score[g] && o < g);
    if (rank >= keep)
      for (int64_t e = g * per; e < (g + 1) * per; ++e) sel[e] = -INFINITY;
  }
  __syncwarp();
}

// block = one warp, one token per block. Dynamic shared: s (E) | sel (E) | gscore (max(n_group, n_nodes)) | pick (k)
// | taken (E). max_nodes 0: no node limit.
__global__ void router_fwd_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int64_t E,
                                  int64_t n_group, int64_t topk_group, int64_t n_nodes, int64_t max_nodes,
                                  int64_t node_topk, int64_t k, bool norm, float scale, float* __restrict__ scores,
                                  int32_t* __restrict__ idx, float* __restrict__ weight) {
  extern __shared__ float smem[];
  float* s = smem;
  float* sel = s + E;
  float* gscore = sel + E;
  int* pick = reinterpret_cast<int*>(gscore + (n_group > n_nodes ? n_group : n_nodes));
  unsigned char* taken = reinterpret_cast<unsigned char*>(pick + k);
  const int lane = threadIdx.x;
  const int64_t t = blockIdx.x;
  const float* lg = logits + t * E;
  for (int64_t e = lane; e < E; e += 32) {
    const float v = 1.0f / (1.0f + expf(-lg[e]));
    s[e] = v;
    scores[t * E + e] = v;
    sel[e] = v + bias[e];  // the bias steers selection only; weights use the unbiased s
    taken[e] = 0;
  }
  __syncwarp();
  if (max_nodes > 0) {
    // node score: the node_topk best of the node's biased scores (a descending insertion list), summed largest first
    const int64_t per_node = E / n_nodes;
    for (int64_t nd = lane; nd < n_nodes; nd += 32) {
      float best[kMaxNodeTopk];
      int64_t have = 0;
      for (int64_t e = nd * per_node; e < (nd + 1) * per_node; ++e) {
        const float v = sel[e];
        if (have == node_topk && !(v > best[have - 1])) continue;
        int64_t p = have < node_topk ? have++ : have - 1;
        for (; p > 0 && v > best[p - 1]; --p) best[p] = best[p - 1];
        best[p] = v;
      }
      float sum = best[0];
      for (int64_t j = 1; j < node_topk; ++j) sum += best[j];
      gscore[nd] = sum;
    }
    __syncwarp();
    keep_best_blocks(sel, gscore, n_nodes, per_node, max_nodes, lane);
  }
  const int64_t per_group = E / n_group;
  for (int64_t g = lane; g < n_group; g += 32) {
    float b1 = -INFINITY, b2 = -INFINITY;
    for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
      if (sel[e] > b1) {
        b2 = b1;
        b1 = sel[e];
      } else if (sel[e] > b2) {
        b2 = sel[e];
      }
    }
    gscore[g] = per_group >= 2 ? b1 + b2 : b1;
  }
  __syncwarp();
  keep_best_blocks(sel, gscore, n_group, per_group, topk_group, lane);
  // k rounds of a warp arg-max over the experts not taken yet: (higher value, then lower id)
  for (int64_t j = 0; j < k; ++j) {
    float bv = -INFINITY;
    int be = -1;
    for (int64_t e = lane; e < E; e += 32)  // ascending e per lane: a tie keeps the earlier (lower) id
      if (!taken[e] && (be < 0 || sel[e] > bv)) {
        bv = sel[e];
        be = (int)e;
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFull, bv, o);
      const int oe = __shfl_xor_sync(kFull, be, o);
      if (oe >= 0 && (be < 0 || ov > bv || (ov == bv && oe < be))) {
        bv = ov;
        be = oe;
      }
    }
    if (lane == 0 && be >= 0) taken[be] = 1;
    __syncwarp();
  }
  // the taken experts in ascending id: a warp-wide compaction
  int count = 0;
  for (int64_t base = 0; base < E; base += 32) {
    const int64_t e = base + lane;
    const bool flag = e < E && taken[e];
    const unsigned mask = __ballot_sync(kFull, flag);
    if (flag) pick[count + __popc(mask & ((1u << lane) - 1u))] = (int)e;
    count += __popc(mask);
  }
  __syncwarp();
  if (lane == 0) {
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += s[pick[j]];
    for (int64_t j = 0; j < k; ++j) {
      const float v = s[pick[j]];
      idx[t * k + j] = pick[j];
      weight[t * k + j] = (norm ? (float)(v / sum) : v) * scale;
    }
  }
}

// block = one warp, one token per block. Dynamic shared: ds (E doubles)
__global__ void router_bwd_kernel(const float* __restrict__ scores, const int32_t* __restrict__ idx,
                                  const float* __restrict__ dweight, int64_t E, int64_t K, bool norm, float scale,
                                  int64_t seq_len, const float* __restrict__ f, float aux_coef,
                                  float* __restrict__ dlogits) {
  extern __shared__ double ds[];
  const int lane = threadIdx.x;
  const int64_t t = blockIdx.x;
  const float* s = scores + t * E;
  const int32_t* id = idx + t * K;
  const float* dw = dweight + t * K;
  for (int64_t e = lane; e < E; e += 32) ds[e] = 0.0;
  __syncwarp();
  // combine weights: w_k = scale * s_k / Z_C (Z_C = sum over the chosen) when normalised, else scale * s_k.
  // Serial on lane 0, in the CPU op's order (K is small).
  if (lane == 0) {
    if (norm) {
      double z = 0, dot = 0;
      for (int64_t k = 0; k < K; ++k) {
        z += s[id[k]];
        dot += (double)dw[k] * s[id[k]];
      }
      for (int64_t k = 0; k < K; ++k) ds[id[k]] += scale * (dw[k] / z - dot / (z * z));
    } else {
      for (int64_t k = 0; k < K; ++k) ds[id[k]] += scale * dw[k];
    }
  }
  __syncwarp();
  // balance loss through P: d/ds_e (sum_i f_i s_i / Z) = f_e / Z - sum_i f_i s_i / Z^2
  if (f && aux_coef != 0.0f) {
    const float* fb = f + (t / seq_len) * E;
    double z = 0, fs = 0;
    for (int64_t e = lane; e < E; e += 32) z += s[e], fs += (double)fb[e] * s[e];
    z = cuda::warp_sum(z);
    fs = cuda::warp_sum(fs);
    for (int64_t e = lane; e < E; e += 32) ds[e] += aux_coef * (fb[e] / z - fs / (z * z));
  }
  for (int64_t e = lane; e < E; e += 32) dlogits[t * E + e] = (float)(ds[e] * s[e] * (1.0 - s[e]));  // sigmoid'
}
}  // namespace

void CudaBackend::router_forward(const float* logits, const float* bias, int64_t T, const RouterSpec& r,
                                 float* scores, int32_t* idx, float* weight) {
  if (T == 0) return;
  DSV3_CHECK(T <= INT32_MAX && r.n_group >= 1 && r.n_nodes >= 1 && r.k >= 1 && r.k <= r.E,
             "router_forward: T = " << T << ", E = " << r.E << ", n_group = " << r.n_group << ", n_nodes = "
                                    << r.n_nodes << ", k = " << r.k);
  const bool nodes = r.node_limited();
  DSV3_CHECK(!nodes || r.node_topk() <= kMaxNodeTopk,
             "router_forward: k / max_nodes = " << r.node_topk() << " exceeds " << kMaxNodeTopk);
  const int64_t blocks = r.n_group > r.n_nodes ? r.n_group : r.n_nodes;
  const size_t shmem = sizeof(float) * (2 * r.E + blocks) + sizeof(int) * r.k + r.E;
  DSV3_CHECK(shmem <= 48 * 1024, "router_forward: E = " << r.E << " needs " << shmem << " bytes of shared memory");
  router_fwd_kernel<<<(unsigned)T, 32, shmem, stream_>>>(logits, bias, r.E, r.n_group, r.topk_group, r.n_nodes,
                                                         nodes ? r.max_nodes : 0, nodes ? r.node_topk() : 0, r.k,
                                                         r.norm, r.scale, scores, idx, weight);
  DSV3_CUDA_LAUNCH_CHECK();
}

void CudaBackend::router_backward(const float* scores, const int32_t* idx, const float* dweight, int64_t T, int64_t E,
                                  int64_t K, bool norm, float scale, int64_t seq_len, const float* f, float aux_coef,
                                  float* dlogits) {
  if (T == 0 || E == 0) return;
  DSV3_CHECK(T <= INT32_MAX && (!f || seq_len > 0), "router_backward: T = " << T << ", seq_len = " << seq_len);
  const size_t shmem = sizeof(double) * E;
  DSV3_CHECK(shmem <= 48 * 1024, "router_backward: E = " << E << " needs " << shmem << " bytes of shared memory");
  router_bwd_kernel<<<(unsigned)T, 32, shmem, stream_>>>(scores, idx, dweight, E, K, norm, scale, seq_len, f,
                                                         aux_coef, dlogits);
  DSV3_CUDA_LAUNCH_CHECK();
}

}  // namespace dsv3
