// defines: dsv3::ParallelSizes, resolve_sizes, RankCoords, coords_of, Groups, groups_of, rank_of
// The rank grid as pure functions (no MPI): which sizes a deck asks for, where a rank sits in the grid and
// which ranks share each of its process groups. dsv3::Comm builds its communicators from these lists.
//
// ---- The grid (Megatron-Core's RankGenerator order, without context parallelism) --------------------------
// Dense part (attention, dense MLP, shared experts, embedding, head): tp innermost, then dp, then pp:
//     rank = tp_rank + tp * (dp_rank + dp * pp_rank)
// so the ranks of one tensor-parallel group are consecutive (one NVLink island), and a pipeline stage is one
// contiguous slab of tp*dp ranks. The expert part (routed experts) refolds the SAME slab of each stage:
// etp innermost, then ep, then expert-dp (edp), with ep*etp*edp == tp*dp:
//     rank = etp_rank + etp * (ep_rank + ep * edp_rank) + (tp*dp) * pp_rank
// A rank therefore has a dense position (tp, dp, pp) and an expert position (etp, ep, edp) in the same stage.
//
// ---- Worked example: 16 ranks, tp=2 pp=2 dp=4, ep=4 etp=1 -> edp = tp*dp/(ep*etp) = 2 ----------------------
//   rank:      0  1  2  3  4  5  6  7 |  8  9 10 11 12 13 14 15
//   pp_rank:   0  0  0  0  0  0  0  0 |  1  1  1  1  1  1  1  1
//   dp_rank:   0  0  1  1  2  2  3  3 |  0  0  1  1  2  2  3  3
//   tp_rank:   0  1  0  1  0  1  0  1 |  0  1  0  1  0  1  0  1
//   ep_rank:   0  1  2  3  0  1  2  3 |  0  1  2  3  0  1  2  3
//   edp_rank:  0  0  0  0  1  1  1  1 |  0  0  0  0  1  1  1  1
//   etp_rank:  0 for every rank
// Groups (each rank is in exactly one group of each kind):
//   tp  (8 groups of 2):  [0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]
//   dp  (4 groups of 4):  [0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]
//   pp  (8 groups of 2):  [0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]
//   mp  (tp x pp, 4 of 4): [0,1,8,9] [2,3,10,11] [4,5,12,13] [6,7,14,15]
//   ep  (4 groups of 4):  [0,1,2,3] [4,5,6,7] [8,9,10,11] [12,13,14,15]
//   etp (16 groups of 1): [0] [1] ... [15]
//   edp (8 groups of 2):  [0,4] [1,5] [2,6] [3,7] [8,12] [9,13] [10,14] [11,15]
//   embedding (first and last stage, 8 of 2): [0,8] [1,9] ... [7,15] (here equal to pp, as pp == 2;
//             with pp > 2 the ranks of the middle stages are in no embedding group)
// What each group carries: tp: the all-reduce / reduce-scatter of tensor-parallel layers; dp: the gradient
// reduction of dense parameters; pp: activations between stages; ep: the token all-to-all of the MoE
// dispatch/combine; etp: tensor parallelism inside an expert; edp: the gradient reduction of expert
// parameters (the same expert lives on the ranks of one edp group); mp: the ranks that together hold one
// full copy of the model (gradient-norm and loss reductions); embedding: the word embedding used on the
// first stage and again by the MTP module on the last stage (DeepSeek-V3 shares it), whose gradients are
// summed over this group.
#pragma once
#include <string>
#include <vector>

namespace dsv3 {

class Deck;
struct ModelConfig;

struct ParallelSizes {
  int world = 1;   // ranks, e.g. 1024
  int tp = 1;      // tensor parallel, e.g. 2
  int pp = 1;      // pipeline stages, e.g. 16
  int ep = 1;      // expert parallel, e.g. 64
  int etp = 1;     // tensor parallel inside an expert, e.g. 1
  int dp = 1;      // data parallel = world / (tp*pp), e.g. 32
  bool sp = false; // sequence parallel (true only with tp > 1)
  int edp() const { return tp * dp / (ep * etp); }  // expert data parallel, e.g. 1
};

// Reads [parallel] tp, pp, ep, etp, dp (0: derived), sp and checks them against the world size and the model.
// dp = world / (tp*pp); a given parallel.dp must agree. Every error is one line naming the key and the
// constraint ("parallel.tp=3 does not divide num_attention_heads=4"). Decisions:
//  - tp must divide vocab_size (the vocab-parallel embedding and head take equal shards; no padding),
//    num_attention_heads, intermediate_size when a dense layer exists (MTP layers included), and
//    moe_intermediate_size*n_shared_experts when MoE layers have shared experts (they are tp-sharded like a
//    dense MLP). Routed experts are sharded by etp instead: etp must divide moe_intermediate_size.
//  - ep must divide n_routed_experts; ep, etp > 1 need routed experts; ep*etp must divide tp*dp.
//  - sp with tp == 1 is a no-op and is resolved to false (as Megatron does); with tp > 1 it needs
//    train.seq_length divisible by tp (when the deck has a sequence length).
//  - Without parallel.pp_layout every stage needs a decoder layer (pp <= num_hidden_layers); a given
//    pp_layout is parsed here (parse_pp_layout) so that its errors stop the run before anything is allocated.
ParallelSizes resolve_sizes(const Deck& deck, int world, const ModelConfig& model);

// Where one rank sits: dense (tp, dp, pp) and expert (etp, ep, edp) coordinates; pp is shared by both.
struct RankCoords {
  int tp = 0, dp = 0, pp = 0;
  int ep = 0, etp = 0, edp = 0;
};
RankCoords coords_of(const ParallelSizes& s, int rank);
// The inverse on the dense grid: tp_rank + tp*(dp_rank + dp*pp_rank).
int rank_of(const ParallelSizes& s, int tp_rank, int dp_rank, int pp_rank);

// The world ranks of the groups THIS rank belongs to, ascending (a group's position = index in the list).
struct Groups {
  std::vector<int> tp, dp, pp;          // dense: sizes tp, dp, pp
  std::vector<int> ep, etp, edp;        // expert: sizes ep, etp, edp
  std::vector<int> mp;                  // model parallel (same dp_rank, all tp x pp): size tp*pp
  std::vector<int> embedding;           // same tp/dp rank on the first and the last stage: size min(pp, 2);
                                        // empty on the stages in between (they hold no embedding)
};
Groups groups_of(const ParallelSizes& s, int rank);

std::string format_sizes(const ParallelSizes& s);  // "world 16: tp 2 pp 2 dp 4 ep 4 etp 1 edp 2 sp off"

}  // namespace dsv3
