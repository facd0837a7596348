// The rank grid: sizes from the deck, coordinates and group member lists (see topology.h for the worked example).
#include "parallel/topology.h"

#include <sstream>

#include "core/deck.h"
#include "core/error.h"
#include "model/config.h"
#include "pipeline/layout.h"

namespace dsv3 {

namespace {

// Which kinds of MLP the model (decoder + MTP layers) has: dense layers are tp-sharded by intermediate_size.
bool has_dense_layer(const ModelConfig& m) {
  for (int64_t i = 0; i < m.total_layers(); ++i)
    if (!m.is_moe_layer(i)) return true;
  return false;
}
bool has_moe_layer(const ModelConfig& m) {
  for (int64_t i = 0; i < m.total_layers(); ++i)
    if (m.is_moe_layer(i)) return true;
  return false;
}

void check_rank(const ParallelSizes& s, int rank) {
  DSV3_CHECK(s.world >= 1 && s.tp >= 1 && s.pp >= 1 && s.dp >= 1 && s.ep >= 1 && s.etp >= 1 &&
                 s.world == s.tp * s.pp * s.dp && (s.tp * s.dp) % (s.ep * s.etp) == 0,
             "inconsistent parallel sizes (" << format_sizes(s) << "): use resolve_sizes");
  DSV3_CHECK(rank >= 0 && rank < s.world, "rank " << rank << " is outside the world of " << s.world << " ranks");
}

// Collects the ranks of the group through `rank` along one axis of a grid given as (size, stride) pairs:
// `axis` varies, every other coordinate stays at rank's. Ascending because the stride is positive.
std::vector<int> line_through(int rank, int size, int stride) {
  const int base = rank - ((rank / stride) % size) * stride;
  std::vector<int> g(size);
  for (int i = 0; i < size; ++i) g[i] = base + i * stride;
  return g;
}

}  // namespace

ParallelSizes resolve_sizes(const Deck& deck, int world, const ModelConfig& m) {
  ParallelSizes s;
  DSV3_CHECK(world >= 1, "world size " << world << " must be at least 1");
  s.world = world;
  s.tp = deck.get<int>("parallel.tp");
  s.pp = deck.get<int>("parallel.pp");
  s.ep = deck.get<int>("parallel.ep");
  s.etp = deck.get<int>("parallel.etp");
  const int dp_given = deck.get<int>("parallel.dp");
  s.sp = deck.get<bool>("parallel.sp");
  // The deck table bounds these at >= 1 (dp >= 0); re-checked so a hand-made Deck cannot divide by zero.
  const std::vector<std::string> all = {"parallel.tp", "parallel.pp", "parallel.dp", "parallel.ep", "parallel.etp"};
  DSV3_CHECK(s.tp >= 1 && s.pp >= 1 && s.ep >= 1 && s.etp >= 1 && dp_given >= 0,
             "parallel.tp/pp/ep/etp must be >= 1 and parallel.dp >= 0 " << deck.where_set(all));

  // ---- world = tp * dp * pp ----
  DSV3_CHECK(world % (s.tp * s.pp) == 0, "world size " << world << " is not a multiple of tp*pp=" << s.tp * s.pp
                                                       << " (parallel.tp=" << s.tp << ", parallel.pp=" << s.pp << ") "
                                                       << deck.where_set({"parallel.tp", "parallel.pp"}));
  s.dp = world / (s.tp * s.pp);
  DSV3_CHECK(dp_given == 0 || dp_given == s.dp,
             "parallel.dp=" << dp_given << " disagrees with world size " << world << " / (tp*pp=" << s.tp * s.pp
                            << ") = " << s.dp << " (set parallel.dp = 0 to derive it) "
                            << deck.where_set({"parallel.dp", "parallel.tp", "parallel.pp"}));

  // ---- tensor parallelism: every tp-sharded dimension divides evenly ----
  auto tp_divides = [&](int64_t n, const char* what) {
    DSV3_CHECK(n % s.tp == 0, "parallel.tp=" << s.tp << " does not divide " << what << "=" << n << " "
                                              << deck.where_set({"parallel.tp"}));
  };
  tp_divides(m.num_attention_heads, "num_attention_heads");
  tp_divides(m.vocab_size, "vocab_size");  // vocab-parallel embedding and head: equal shards, no padding
  if (has_dense_layer(m)) tp_divides(m.intermediate_size, "intermediate_size");
  if (has_moe_layer(m) && m.n_shared_experts > 0)
    tp_divides(m.moe_intermediate_size * m.n_shared_experts, "moe_intermediate_size*n_shared_experts");

  // ---- sequence parallelism: shards the sequence over the tp group between tp regions ----
  if (s.tp == 1) s.sp = false;  // nothing to shard over: a no-op, as in Megatron
  if (s.sp && deck.has("train.seq_length")) {  // each tp rank holds a contiguous 1/tp of a micro-batch's tokens
    const int64_t seq = deck.get<int64_t>("train.seq_length"), mb = deck.get<int64_t>("train.micro_batch");
    DSV3_CHECK((seq * mb) % s.tp == 0, "parallel.sp needs train.seq_length*train.micro_batch=" << seq << "*" << mb
                                           << "=" << seq * mb << " divisible by parallel.tp=" << s.tp
                                           << " (each tp rank holds a contiguous 1/tp of a micro-batch's tokens) "
                                           << deck.where_set({"parallel.sp", "train.seq_length", "train.micro_batch",
                                                              "parallel.tp"}));
  }

  // ---- experts: ep splits the routed experts, etp splits each expert's width ----
  if (m.n_routed_experts == 0 || !has_moe_layer(m)) {
    DSV3_CHECK(s.ep == 1, "parallel.ep=" << s.ep << " needs routed experts, but the model has no MoE layer "
                                         << deck.where_set({"parallel.ep"}));
    DSV3_CHECK(s.etp == 1, "parallel.etp=" << s.etp << " needs routed experts, but the model has no MoE layer "
                                           << deck.where_set({"parallel.etp"}));
  } else {
    DSV3_CHECK(m.n_routed_experts % s.ep == 0, "parallel.ep=" << s.ep << " does not divide n_routed_experts="
                                                               << m.n_routed_experts << " "
                                                               << deck.where_set({"parallel.ep"}));
    DSV3_CHECK(m.moe_intermediate_size % s.etp == 0, "parallel.etp=" << s.etp << " does not divide moe_intermediate_size="
                                                                     << m.moe_intermediate_size << " "
                                                                     << deck.where_set({"parallel.etp"}));
  }
  DSV3_CHECK((s.tp * s.dp) % (s.ep * s.etp) == 0,
             "ep*etp=" << s.ep * s.etp << " must divide tp*dp=" << s.tp * s.dp << " (parallel.ep=" << s.ep
                       << ", parallel.etp=" << s.etp << ", parallel.tp=" << s.tp << ", dp=" << s.dp << ") "
                       << deck.where_set({"parallel.ep", "parallel.etp", "parallel.tp"}));

  // ---- pipeline: the layout (given, or the even split, which needs pp <= num_hidden_layers) must fit ----
  parse_pp_layout(deck.get<std::string>("parallel.pp_layout"), s.pp, static_cast<int>(m.num_hidden_layers),
                  static_cast<int>(m.num_nextn_predict_layers),
                  deck.where_set(deck.given("parallel.pp_layout") ? std::vector<std::string>{"parallel.pp_layout",
                                                                                             "parallel.pp"}
                                                                  : std::vector<std::string>{"parallel.pp"}));
  return s;
}

RankCoords coords_of(const ParallelSizes& s, int rank) {
  check_rank(s, rank);
  RankCoords c;
  const int slab = s.tp * s.dp;  // ranks per pipeline stage
  c.tp = rank % s.tp;
  c.dp = (rank / s.tp) % s.dp;
  c.pp = rank / slab;
  const int local = rank % slab;  // position inside the stage, refolded as (etp, ep, edp)
  c.etp = local % s.etp;
  c.ep = (local / s.etp) % s.ep;
  c.edp = local / (s.etp * s.ep);
  return c;
}

int rank_of(const ParallelSizes& s, int tp_rank, int dp_rank, int pp_rank) {
  DSV3_CHECK(tp_rank >= 0 && tp_rank < s.tp && dp_rank >= 0 && dp_rank < s.dp && pp_rank >= 0 && pp_rank < s.pp,
             "grid position (tp " << tp_rank << ", dp " << dp_rank << ", pp " << pp_rank << ") is outside "
                                  << format_sizes(s));
  return tp_rank + s.tp * (dp_rank + s.dp * pp_rank);
}

Groups groups_of(const ParallelSizes& s, int rank) {
  check_rank(s, rank);
  const RankCoords c = coords_of(s, rank);
  const int slab = s.tp * s.dp;
  Groups g;
  // Each group is a line through `rank` along one axis of the grid (stride = product of the inner sizes).
  g.tp = line_through(rank, s.tp, 1);
  g.dp = line_through(rank, s.dp, s.tp);
  g.pp = line_through(rank, s.pp, slab);
  g.etp = line_through(rank, s.etp, 1);
  g.ep = line_through(rank, s.ep, s.etp);
  g.edp = line_through(rank, s.edp(), s.etp * s.ep);
  // mp: the plane of all tp and pp positions at this dp_rank, ascending (pp outer, tp inner).
  for (int p = 0; p < s.pp; ++p)
    for (int t = 0; t < s.tp; ++t) g.mp.push_back(rank_of(s, t, c.dp, p));
  if (c.pp == 0 || c.pp == s.pp - 1) {  // only the stages that hold the word embedding
    g.embedding.push_back(rank_of(s, c.tp, c.dp, 0));
    if (s.pp > 1) g.embedding.push_back(rank_of(s, c.tp, c.dp, s.pp - 1));
  }
  return g;
}

std::string format_sizes(const ParallelSizes& s) {
  std::ostringstream os;
  os << "world " << s.world << ": tp " << s.tp << " pp " << s.pp << " dp " << s.dp << " ep " << s.ep << " etp "
     << s.etp;
  if (s.ep * s.etp > 0 && (s.tp * s.dp) % (s.ep * s.etp) == 0) os << " edp " << s.edp();
  os << " sp " << (s.sp ? "on" : "off");
  return os.str();
}

}  // namespace dsv3
