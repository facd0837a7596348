#include "parallel/comm.h"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "core/memory.h"
#include "parallel/topology.h"

// Every MPI call goes through this: the error string and the call site end up in the message.
#define MPI_CHECK(call)                                                                \
  do {                                                                                 \
    const int mpi_rc_ = (call);                                                        \
    if (mpi_rc_ != MPI_SUCCESS) {                                                      \
      char mpi_msg_[MPI_MAX_ERROR_STRING];                                             \
      int mpi_len_ = 0;                                                                \
      MPI_Error_string(mpi_rc_, mpi_msg_, &mpi_len_);                                  \
      DSV3_FAIL("MPI call " #call " failed: " << std::string(mpi_msg_, mpi_len_));     \
    }                                                                                  \
  } while (0)

namespace dsv3 {

struct Comm::Group {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0, size = 1;
  bool owned = false;
};

// Adds the wall time of one collective to its group kind's total.
struct CommTimer {
  double* acc;
  double t0;
  CommTimer(const Comm& c, GroupKind k) : acc(&c.seconds_[(int)k]), t0(now()) {}
  ~CommTimer() { *acc += now() - t0; }
  static double now() {  // not MPI_Wtime: without MPI (DSV3_NO_MPI) nothing of MPI may be called
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
};

void* Comm::native_handle(GroupKind k) const { return (void*)&groups_[(int)k]->comm; }

CommTimes Comm::times() const {
  return {seconds_[0], seconds_[1], seconds_[2], seconds_[3], seconds_[4], seconds_[6]};
}

namespace {
int to_int(int64_t n, const char* what) {
  DSV3_CHECK(n >= 0 && n <= INT_MAX, what << ": " << n << " elements exceed an MPI count (2^31-1)");
  return (int)n;
}
}  // namespace

Comm::Comm(int* argc, char*** argv) {
  const char* no_mpi = std::getenv("DSV3_NO_MPI");
  if (no_mpi && *no_mpi && std::strcmp(no_mpi, "0") != 0) {
    // one process without an MPI runtime (a workstation or a GPU box with no mpirun): every group is this rank
    // alone, no MPI function is ever called, checkpoints use HDF5's default driver
    mpi_ = false;
    for (int k = 0; k <= (int)GroupKind::embd; ++k) groups_.push_back(new Group);
    return;
  }
  int inited = 0;
  MPI_CHECK(MPI_Initialized(&inited));
  if (!inited) {
    int provided = 0;
    MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
    owns_mpi_ = true;
    // errors come back as return codes, so that MPI_CHECK can name the call
    MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  }
  MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
  MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size_));
  // until set_groups(): every group is this rank alone, except the world
  for (int k = 0; k <= (int)GroupKind::embd; ++k) {
    auto* g = new Group;
    if (k == 0) {
      g->comm = MPI_COMM_WORLD;
      g->rank = rank_;
      g->size = size_;
    } else {
      g->comm = MPI_COMM_SELF;
    }
    groups_.push_back(g);
  }
}

Comm::~Comm() {
  for (Group* g : groups_) {
    if (g->owned) MPI_Comm_free(&g->comm);
    delete g;
  }
  if (owns_mpi_ && mpi_) MPI_Finalize();
}

const Comm::Group& Comm::group(GroupKind k) const { return *groups_[(int)k]; }
int Comm::group_rank(GroupKind k) const { return group(k).rank; }
int Comm::group_size(GroupKind k) const { return group(k).size; }

void Comm::set_groups(const Groups& gr) {
  const std::vector<int> self = {rank_};
  const std::vector<int>* lists[] = {nullptr, &gr.tp, &gr.dp, &gr.pp, &gr.ep, &gr.etp, &gr.edp,
                                     gr.embedding.empty() ? &self : &gr.embedding};
  for (int k = 1; k <= (int)GroupKind::embd; ++k) {
    const std::vector<int>& members = *lists[k];
    DSV3_CHECK(!members.empty() && std::find(members.begin(), members.end(), rank_) != members.end(),
               "rank " << rank_ << " is not a member of its own group " << k);
    if (!mpi_) continue;  // one process: every group is already this rank alone
    Group* g = groups_[k];
    if (g->owned) MPI_CHECK(MPI_Comm_free(&g->comm));
    // colour = the group's first (smallest) world rank: identical on every member, distinct between groups
    // (a singleton embedding group of a middle stage gets a colour no real group uses)
    const int colour = (k == (int)GroupKind::embd && gr.embedding.empty())
                           ? size_ + rank_
                           : *std::min_element(members.begin(), members.end());
    MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, colour, rank_, &g->comm));
    MPI_CHECK(MPI_Comm_set_errhandler(g->comm, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(g->comm, &g->rank));
    MPI_CHECK(MPI_Comm_size(g->comm, &g->size));
    g->owned = true;
    DSV3_CHECK(g->size == (int)members.size(), "group " << k << " of rank " << rank_ << " has " << g->size
                                                        << " members, the topology says " << members.size());
  }
}

void Comm::barrier() const {
  if (size_ > 1) MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
}

void Comm::bcast_string(std::string& s, int root) const {
  if (size_ == 1) return;
  uint64_t n = s.size();
  MPI_CHECK(MPI_Bcast(&n, 1, MPI_UINT64_T, root, MPI_COMM_WORLD));
  s.resize(n);
  for (uint64_t off = 0; off < n; off += (1u << 30)) {  // large strings in chunks: MPI counts are int
    const int len = (int)std::min<uint64_t>(n - off, 1u << 30);
    MPI_CHECK(MPI_Bcast(s.data() + off, len, MPI_CHAR, root, MPI_COMM_WORLD));
  }
}

bool Comm::any(bool flag) const {
  int in = flag ? 1 : 0, out = in;
  if (size_ > 1) MPI_CHECK(MPI_Allreduce(&in, &out, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  return out != 0;
}

void Comm::abort(int code) const {
  if (mpi_) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

void Comm::allreduce_sum(GroupKind k, float* x, int64_t n) const {
  CommTimer timer(*this, k);
  const Group& g = group(k);
  if (g.size == 1 || n == 0) return;
  if (transport_) return transport_->allreduce_sum(k, x, n);
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, x, to_int(n, "allreduce"), MPI_FLOAT, MPI_SUM, g.comm));
}

void Comm::allreduce_sum(GroupKind k, double* x, int64_t n) const {
  CommTimer timer(*this, k);
  const Group& g = group(k);
  if (g.size == 1 || n == 0) return;
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, x, to_int(n, "allreduce"), MPI_DOUBLE, MPI_SUM, g.comm));
}

void Comm::allreduce_sum(GroupKind k, int64_t* x, int64_t n) const {
  CommTimer timer(*this, k);
  const Group& g = group(k);
  if (g.size == 1 || n == 0) return;
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, x, to_int(n, "allreduce"), MPI_INT64_T, MPI_SUM, g.comm));
}

void Comm::reduce_scatter(GroupKind k, const float* in, float* out, int64_t chunk) const {
  CommTimer timer(*this, k);
  const Group& g = group(k);
  if (g.size == 1) {  // a copy in the run's memory (device buffers stay on the device: core/memory.h)
    default_memory().copy(out, in, chunk * sizeof(float));
    return;
  }
  if (transport_) return transport_->reduce_scatter(k, in, out, chunk);
  MPI_CHECK(MPI_Reduce_scatter_block(in, out, to_int(chunk, "reduce_scatter"), MPI_FLOAT, MPI_SUM, g.comm));
}

std::vector<int> Comm::group_nodes(GroupKind k) const {
  const Group& g = group(k);
  if (!mpi_) return std::vector<int>(g.size, 0);
  // a node is named by the lowest world rank on it
  MPI_Comm node = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node));
  int leader = rank_;
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &leader, 1, MPI_INT, MPI_MIN, node));
  MPI_CHECK(MPI_Comm_free(&node));
  std::vector<int> leaders(g.size, leader);
  if (g.size > 1) MPI_CHECK(MPI_Allgather(&leader, 1, MPI_INT, leaders.data(), 1, MPI_INT, g.comm));
  std::vector<int> seen, out(g.size);
  for (int r = 0; r < g.size; ++r) {
    auto it = std::find(seen.begin(), seen.end(), leaders[r]);
    out[r] = (int)(it - seen.begin());
    if (it == seen.end()) seen.push_back(leaders[r]);
  }
  return out;
}

void Comm::allgather(GroupKind k, const float* in, float* out, int64_t chunk) const {
  CommTimer timer(*this, k);
  const Group& g = group(k);
  if (g.size == 1) {
    default_memory().copy(out, in, chunk * sizeof(float));
    return;
  }
  if (transport_) return transport_->allgather(k, in, out, chunk);
  MPI_CHECK(MPI_Allgather(in, to_int(chunk, "allgather"), MPI_FLOAT, out, (int)chunk, MPI_FLOAT, g.comm));
}

void Comm::broadcast(GroupKind k, int64_t* x, int64_t n, int root) const {
  const Group& g = group(k);
  if (g.size == 1 || n == 0) return;
  CommTimer timer(*this, k);
  MPI_CHECK(MPI_Bcast(x, to_int(n, "broadcast"), MPI_INT64_T, root, g.comm));
}

void Comm::broadcast(GroupKind k, float* x, int64_t n, int root) const {
  const Group& g = group(k);
  if (g.size == 1 || n == 0) return;
  CommTimer timer(*this, k);
  if (transport_) return transport_->broadcast(k, x, n, root);
  MPI_CHECK(MPI_Bcast(x, to_int(n, "broadcast"), MPI_FLOAT, root, g.comm));
}

void Comm::broadcast_bytes(GroupKind k, void* data, int64_t bytes, int root) const {
  const Group& g = group(k);
  DSV3_CHECK(root >= 0 && root < g.size, "broadcast_bytes: root " << root << " in a group of " << g.size);
  if (g.size == 1 || bytes == 0) return;
  MPI_CHECK(MPI_Bcast(data, to_int(bytes, "broadcast_bytes"), MPI_BYTE, root, g.comm));
}

void Comm::pp_send(const float* x, int64_t n, int to, int tag) const {
  const Group& g = group(GroupKind::pp);
  CommTimer timer(*this, GroupKind::pp);
  auto* req = new MPI_Request;
  MPI_CHECK(MPI_Isend(x, to_int(n, "pp_send"), MPI_FLOAT, to, tag, g.comm, req));
  pending_.push_back({req, {}});
}

void Comm::pp_send_owned(std::vector<float> x, int to, int tag) const {
  pp_send(x.data(), (int64_t)x.size(), to, tag);
  pending_.back().buf = std::move(x);  // the vector's heap block moves, the address MPI holds stays valid
}

void Comm::pp_reap_sends() const {
  CommTimer timer(*this, GroupKind::pp);
  size_t kept = 0;
  for (size_t i = 0; i < pending_.size(); ++i) {
    auto* req = static_cast<MPI_Request*>(pending_[i].request);
    int done = 0;
    MPI_CHECK(MPI_Test(req, &done, MPI_STATUS_IGNORE));
    if (done) {
      delete req;
      continue;  // its buffer goes with the entry
    }
    if (kept != i) pending_[kept] = std::move(pending_[i]);
    ++kept;
  }
  pending_.resize(kept);
}

void Comm::pp_recv(float* x, int64_t n, int from, int tag) const {
  const Group& g = group(GroupKind::pp);
  CommTimer timer(*this, GroupKind::pp);
  MPI_CHECK(MPI_Recv(x, to_int(n, "pp_recv"), MPI_FLOAT, from, tag, g.comm, MPI_STATUS_IGNORE));
}

void Comm::pp_wait_sends() const {
  CommTimer timer(*this, GroupKind::pp);
  for (PendingSend& p : pending_) {
    auto* req = static_cast<MPI_Request*>(p.request);
    MPI_CHECK(MPI_Wait(req, MPI_STATUS_IGNORE));
    delete req;
  }
  pending_.clear();
}

void Comm::alltoall(GroupKind k, const int64_t* send, int64_t* recv, int64_t per_rank) const {
  CommTimer timer(*this, k);
  const Group& g = group(k);
  if (g.size == 1) {
    std::memcpy(recv, send, per_rank * sizeof(int64_t));
    return;
  }
  MPI_CHECK(MPI_Alltoall(send, to_int(per_rank, "alltoall"), MPI_INT64_T, recv, (int)per_rank, MPI_INT64_T, g.comm));
}

namespace {
// MPI's alltoallv arguments from element counts: counts and displacements per group rank
struct MpiCounts {
  std::vector<int> s, sd, r, rd;
  MpiCounts(const std::vector<int64_t>& sc, const std::vector<int64_t>& rc, int n) : s(n), sd(n), r(n), rd(n) {
    int64_t so = 0, ro = 0;
    for (int i = 0; i < n; ++i) {
      s[i] = to_int(sc[i], "alltoallv");
      r[i] = to_int(rc[i], "alltoallv");
      sd[i] = to_int(so, "alltoallv displacement");
      rd[i] = to_int(ro, "alltoallv displacement");
      so += sc[i];
      ro += rc[i];
    }
  }
};
void check_counts(const std::vector<int64_t>& sc, const std::vector<int64_t>& rc, int size) {
  DSV3_CHECK((int)sc.size() == size && (int)rc.size() == size,
             "alltoallv: counts for " << sc.size() << " ranks in a group of " << size);
}
}  // namespace

void Comm::alltoallv(GroupKind k, const float* send, const std::vector<int64_t>& sc, float* recv,
                     const std::vector<int64_t>& rc) const {
  CommTimer timer(*this, k);
  const Group& g = group(k);
  check_counts(sc, rc, g.size);
  if (g.size == 1) {
    default_memory().copy(recv, send, sc[0] * sizeof(float));
    return;
  }
  if (transport_) return transport_->alltoallv(k, send, sc, recv, rc);
  const MpiCounts c(sc, rc, g.size);
  MPI_CHECK(MPI_Alltoallv(send, c.s.data(), c.sd.data(), MPI_FLOAT, recv, c.r.data(), c.rd.data(), MPI_FLOAT,
                          g.comm));
}

// ---- started all-to-all -------------------------------------------------------------------------------------------

struct CommRequest::State {
  GroupKind kind = GroupKind::world;
  enum class Via { done, mpi, transport } via = Via::done;
  MPI_Request req = MPI_REQUEST_NULL;
  std::unique_ptr<MpiCounts> counts;  // MPI reads them until completion
  DeviceTransport* transport = nullptr;
  // A request dropped while in flight (an exception unwinding past the overlap, or one assigned over): the transfer
  // completes before its buffers can be freed; an error here can no longer be reported.
  ~State() {
    if (via == Via::mpi) {
      MPI_Wait(&req, MPI_STATUS_IGNORE);
    } else if (via == Via::transport) {
      try {
        transport->alltoallv_wait(kind);
      } catch (...) {
      }
    }
  }
};

CommRequest::CommRequest() = default;
CommRequest::~CommRequest() = default;
CommRequest::CommRequest(CommRequest&&) noexcept = default;
CommRequest& CommRequest::operator=(CommRequest&&) noexcept = default;
bool CommRequest::pending() const { return s_ && s_->via != State::Via::done; }

CommRequest Comm::alltoallv_start(GroupKind k, const float* send, const std::vector<int64_t>& sc, float* recv,
                                  const std::vector<int64_t>& rc) const {
  CommTimer timer(*this, k);
  const Group& g = group(k);
  check_counts(sc, rc, g.size);
  CommRequest r;
  r.s_ = std::make_unique<CommRequest::State>();
  r.s_->kind = k;
  using Via = CommRequest::State::Via;
  if (g.size == 1) {
    default_memory().copy(recv, send, sc[0] * sizeof(float));
  } else if (transport_) {
    r.s_->transport = transport_;
    if (transport_->alltoallv_start(k, send, sc, recv, rc)) r.s_->via = Via::transport;
  } else {
    r.s_->counts = std::make_unique<MpiCounts>(sc, rc, g.size);
    const MpiCounts& c = *r.s_->counts;
    MPI_CHECK(MPI_Ialltoallv(send, c.s.data(), c.sd.data(), MPI_FLOAT, recv, c.r.data(), c.rd.data(), MPI_FLOAT,
                             g.comm, &r.s_->req));
    r.s_->via = Via::mpi;
  }
  return r;
}

void Comm::wait(CommRequest& r) const {
  if (!r.pending()) return;
  CommRequest::State& st = *r.s_;
  CommTimer timer(*this, st.kind);
  const auto via = st.via;
  st.via = CommRequest::State::Via::done;  // whatever happens below, the destructor must not wait again
  if (via == CommRequest::State::Via::mpi)
    MPI_CHECK(MPI_Wait(&st.req, MPI_STATUS_IGNORE));
  else
    st.transport->alltoallv_wait(st.kind);
}

}  // namespace dsv3
