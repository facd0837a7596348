// dsv3_nccl_tests: the NCCL transport (dsv3::NcclComm, device pointers) against the MPI transport (dsv3::Comm, host
// pointers, the oracle) on the same data, under every layout of the world size it is started with:
//   1 rank  (plain, or DSV3_NO_MPI=1): every operation on every group kind, both without communicators (the
//           single-rank copies) and with 1-rank NCCL communicators (NcclOptions::singleton_comms: every NCCL call
//           made on one GPU);
//   2 ranks (mpirun -np 2): tp2, dp2 with ep2, pp2;
//   4 ranks (mpirun -np 4): tp2 x dp2 with ep2, tp2 x pp2, dp4 with ep4, pp4, dp2 x pp2 with ep2;
//   8 ranks: tp2 x dp2 x pp2 with ep4.
// Comparisons: exact for all-gather, broadcast, all-to-all(v), send/recv, int64 sums and BF16 (integer-valued data,
// so that every BF16 sum is exact); FP32 sums within 1e-6 and FP64 sums within 1e-12 of the sum of the magnitudes
// (NCCL and MPI add in different orders). Also: the compute-stream contract (inputs queued on a non-blocking compute
// stream, results joined back to it), the per-group times, and the errors that name the operation.
// With --expect-no-device: the error path of a rank without a GPU (see expect_no_device).
// Exit 77 (ctest: skipped) with the reason when a rank has no usable CUDA device or a node has fewer devices than
// ranks; every rank then agrees, so none waits in a collective.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../unit/test_util.h"  // error_of
#include "core/error.h"
#include "core/memory.h"
#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "device_buffer.cuh"
#include "gpu_test_util.h"   // randn, random_vector, one_gpu_per_rank
#include "io/safetensors.h"  // float_to_bf16, bf16_to_float
#include "parallel/comm.h"
#include "parallel/nccl_comm.h"
#include "parallel/topology.h"

using namespace dsv3;
using cuda::DeviceBuffer;
using dsv3::test::error_of;
using dsv3::test::random_vector;
using dsv3::test::randn;

namespace {

Comm* g_comm = nullptr;

struct Layout {
  const char* name;
  int tp, dp, pp, ep;
};
// every layout of this world size (the table above)
std::vector<Layout> layouts(int world) {
  const Layout all[] = {{"single", 1, 1, 1, 1},  {"tp2", 2, 1, 1, 1},           {"dp2_ep2", 1, 2, 1, 2},
                        {"pp2", 1, 1, 2, 1},     {"tp2_dp2_ep2", 2, 2, 1, 2},   {"tp2_pp2", 2, 1, 2, 1},
                        {"dp4_ep4", 1, 4, 1, 4}, {"pp4", 1, 1, 4, 1},           {"dp2_pp2_ep2", 1, 2, 2, 2},
                        {"tp2_dp2_pp2_ep4", 2, 2, 2, 4}};
  std::vector<Layout> out;
  for (const Layout& l : all)
    if (l.tp * l.dp * l.pp == world) out.push_back(l);
  return out;
}

void set_layout(Comm& comm, const Layout& l) {
  ParallelSizes s;
  s.world = comm.size();
  s.tp = l.tp;
  s.dp = l.dp;
  s.pp = l.pp;
  s.ep = l.ep;
  comm.set_groups(groups_of(s, comm.rank()));
}

const GroupKind kKinds[] = {GroupKind::world, GroupKind::tp,  GroupKind::dp,  GroupKind::pp,
                            GroupKind::ep,    GroupKind::etp, GroupKind::edp, GroupKind::embd};

uint64_t seed_of(GroupKind k, int op) { return 1000003ull * (g_comm->rank() + 1) + 101 * (int)k + op; }

std::vector<double> randn_d(size_t n, uint64_t seed) {
  return random_vector<double>(n, seed, std::normal_distribution<double>(0.0, 1.0));
}
// integers in [-8, 8] as floats: every sum over <= 16 ranks is exact in BF16 and FP32
std::vector<float> small_ints(size_t n, uint64_t seed) {
  return random_vector<float>(n, seed, std::uniform_int_distribution<int>(-8, 8));
}
std::vector<int64_t> randi(size_t n, uint64_t seed) {
  return random_vector<int64_t>(n, seed, std::uniform_int_distribution<int64_t>(-(int64_t(1) << 40), int64_t(1) << 40));
}
std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = float_to_bf16(v[i]);
  return b;
}
template <class T>
std::vector<T> abs_of(const std::vector<T>& v) {
  std::vector<T> a(v.size());
  for (size_t i = 0; i < v.size(); ++i) a[i] = std::fabs(v[i]);
  return a;
}

// results of the NCCL side: the lanes are waited for first (synchronize: also NCCL's asynchronous errors)
template <class T>
std::vector<T> fetch(NcclComm& nc, const DeviceBuffer<T>& d) {
  nc.synchronize();
  return d.to_host();
}

template <class T>
void expect_exact(const std::string& what, const std::vector<T>& ref, const std::vector<T>& got) {
  ASSERT_EQ(ref.size(), got.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < ref.size(); ++i)
    if (std::memcmp(&ref[i], &got[i], sizeof(T)) != 0 && bad++ == 0) first = i;
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << ref.size() << " elements differ, first at " << first;
}

// |got - ref| <= rel * (sum over ranks of |x|) elementwise
template <class T>
void expect_sum_close(const std::string& what, const std::vector<T>& ref, const std::vector<T>& got,
                      const std::vector<T>& magnitude, double rel) {
  ASSERT_EQ(ref.size(), got.size()) << what;
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = std::fabs((double)got[i] - (double)ref[i]) / std::max((double)magnitude[i], 1e-30);
    if (!(e <= worst)) worst = e, at = i;  // NaN counts as worst
  }
  EXPECT_LE(worst, rel) << what << ": relative error " << worst << " at " << at << " (ref " << ref[at] << ", got "
                        << got[at] << ")";
}

// ---- every collective of one group kind, NCCL against MPI ------------------------------------------------------
void check_collectives(const Comm& comm, NcclComm& nc, GroupKind k, const std::string& tag) {
  const std::string where = tag + " " + group_name(k);
  const int size = comm.group_size(k), me = comm.group_rank(k);
  const int64_t n = 1031;  // odd, not a multiple of anything NCCL chunks by

  {  // allreduce FP32 (and a large one: several NCCL chunks)
    for (int64_t len : {n, (int64_t)(1 << 20) + 3}) {
      auto x = randn(len, seed_of(k, 1) + len);
      DeviceBuffer<float> d(x);
      auto mag = abs_of(x);
      comm.allreduce_sum(k, x.data(), len);
      comm.allreduce_sum(k, mag.data(), len);
      nc.allreduce_sum(k, d.get(), len);
      expect_sum_close(where + " allreduce f32 n=" + std::to_string(len), x, fetch(nc, d), mag, 1e-6);
    }
  }
  {  // allreduce FP64
    auto x = randn_d(n, seed_of(k, 2));
    DeviceBuffer<double> d(x);
    auto mag = abs_of(x);
    comm.allreduce_sum(k, x.data(), n);
    comm.allreduce_sum(k, mag.data(), n);
    nc.allreduce_sum(k, d.get(), n);
    expect_sum_close(where + " allreduce f64", x, fetch(nc, d), mag, 1e-12);
  }
  {  // allreduce int64: exact
    auto x = randi(n, seed_of(k, 3));
    DeviceBuffer<int64_t> d(x);
    comm.allreduce_sum(k, x.data(), n);
    nc.allreduce_sum(k, d.get(), n);
    expect_exact(where + " allreduce i64", x, fetch(nc, d));
  }
  {  // allreduce BF16 on integers: exact
    auto x = small_ints(n, seed_of(k, 4));
    DeviceBuffer<uint16_t> d(to_bf16(x));
    comm.allreduce_sum(k, x.data(), n);
    nc.allreduce_sum_bf16(k, d.get(), n);
    expect_exact(where + " allreduce bf16", to_bf16(x), fetch(nc, d));
  }
  {  // reduce-scatter FP32
    auto in = randn(n * size, seed_of(k, 5));
    auto mag_in = abs_of(in);
    std::vector<float> ref(n), mag(n);
    comm.reduce_scatter(k, in.data(), ref.data(), n);
    comm.reduce_scatter(k, mag_in.data(), mag.data(), n);
    DeviceBuffer<float> din(in), dout(n);
    nc.reduce_scatter(k, din.get(), dout.get(), n);
    expect_sum_close(where + " reduce_scatter f32", ref, fetch(nc, dout), mag, 1e-6);
  }
  {  // reduce-scatter BF16 on integers: exact
    auto in = small_ints(n * size, seed_of(k, 6));
    std::vector<float> ref(n);
    comm.reduce_scatter(k, in.data(), ref.data(), n);
    DeviceBuffer<uint16_t> din(to_bf16(in)), dout(n);
    nc.reduce_scatter_bf16(k, din.get(), dout.get(), n);
    expect_exact(where + " reduce_scatter bf16", to_bf16(ref), fetch(nc, dout));
  }
  {  // all-gather FP32, out of place and in place
    auto in = randn(n, seed_of(k, 7));
    std::vector<float> ref(n * size);
    comm.allgather(k, in.data(), ref.data(), n);
    DeviceBuffer<float> din(in), dout(n * size);
    nc.allgather(k, din.get(), dout.get(), n);
    expect_exact(where + " allgather f32", ref, fetch(nc, dout));
    std::vector<float> seeded(n * size, 0.0f);
    std::copy(in.begin(), in.end(), seeded.begin() + me * n);
    DeviceBuffer<float> dinplace(seeded);
    nc.allgather(k, dinplace.get() + me * n, dinplace.get(), n);
    expect_exact(where + " allgather f32 in place", ref, fetch(nc, dinplace));
  }
  {  // all-gather BF16 (bits: any BF16 value, here rounded normals)
    auto in = to_bf16(randn(n, seed_of(k, 8)));
    std::vector<float> as_f(n), ref_f(n * size);
    for (int64_t i = 0; i < n; ++i) as_f[i] = bf16_to_float(in[i]);  // exact
    comm.allgather(k, as_f.data(), ref_f.data(), n);
    DeviceBuffer<uint16_t> din(in), dout(n * size);
    nc.allgather_bf16(k, din.get(), dout.get(), n);
    expect_exact(where + " allgather bf16", to_bf16(ref_f), fetch(nc, dout));
  }
  {  // broadcast from the last rank of the group (a root other than 0)
    const int root = size - 1;
    auto xf = randn(n, seed_of(k, 9));
    auto xi = randi(n, seed_of(k, 10));
    DeviceBuffer<float> df(xf);
    DeviceBuffer<int64_t> di(xi);
    comm.broadcast(k, xf.data(), n, root);
    comm.broadcast(k, xi.data(), n, root);
    nc.broadcast(k, df.get(), n, root);
    nc.broadcast(k, di.get(), n, root);
    expect_exact(where + " broadcast f32", xf, fetch(nc, df));
    expect_exact(where + " broadcast i64", xi, fetch(nc, di));
  }
  {  // all-to-all of counts
    const int64_t per = 3;
    auto send = randi(per * size, seed_of(k, 11));
    std::vector<int64_t> ref(per * size);
    comm.alltoall(k, send.data(), ref.data(), per);
    DeviceBuffer<int64_t> ds(send), dr(per * size);
    nc.alltoall(k, ds.get(), dr.get(), per);
    expect_exact(where + " alltoall i64", ref, fetch(nc, dr));
  }
  {  // all-to-all-v, uneven counts with zeros: rank i sends (3i + 5j + kind) % 7 * 17 elements to rank j
    auto count = [&](int from, int to) { return (int64_t)((3 * from + 5 * to + (int)k) % 7) * 17; };
    std::vector<int64_t> sc(size), rc(size);
    int64_t ns = 0, nr = 0;
    for (int j = 0; j < size; ++j) {
      sc[j] = count(me, j);
      rc[j] = count(j, me);
      ns += sc[j];
      nr += rc[j];
    }
    auto send = randn(ns, seed_of(k, 12));
    std::vector<float> ref(nr);
    comm.alltoallv(k, send.data(), sc, ref.data(), rc);
    DeviceBuffer<float> ds(send), dr(nr);
    nc.alltoallv(k, ds.get(), sc, dr.get(), rc);
    expect_exact(where + " alltoallv f32", ref, fetch(nc, dr));
    // the same in BF16
    auto send_b = to_bf16(send);
    std::vector<float> send_bf(ns), ref_bf(nr);
    for (int64_t i = 0; i < ns; ++i) send_bf[i] = bf16_to_float(send_b[i]);
    comm.alltoallv(k, send_bf.data(), sc, ref_bf.data(), rc);
    DeviceBuffer<uint16_t> dsb(send_b), drb(nr);
    nc.alltoallv_bf16(k, dsb.get(), sc, drb.get(), rc);
    expect_exact(where + " alltoallv bf16", to_bf16(ref_bf), fetch(nc, drb));
  }
}

// ---- pipeline: a forward chain (recv from s-1, send to s+1), a backward chain, and a ring through pp_sendrecv ----
void check_pipeline(Comm& comm, NcclComm& nc, const std::string& tag) {
  const int P = comm.group_size(GroupKind::pp), s = comm.group_rank(GroupKind::pp);
  const int64_t n = 4099;
  if (P > 1) {
    auto act = randn(n, seed_of(GroupKind::pp, 20)), grad = randn(n, seed_of(GroupKind::pp, 21));
    std::vector<float> ref_act(n, 0.0f), ref_grad(n, 0.0f);
    DeviceBuffer<float> dact(act), dgrad(grad), dact_in(std::vector<float>(n, 0.0f)),
        dgrad_in(std::vector<float>(n, 0.0f));
    // MPI
    if (s > 0) comm.pp_recv(ref_act.data(), n, s - 1, 1);
    if (s < P - 1) comm.pp_send(act.data(), n, s + 1, 1);
    comm.pp_wait_sends();
    if (s < P - 1) comm.pp_recv(ref_grad.data(), n, s + 1, 2);
    if (s > 0) comm.pp_send(grad.data(), n, s - 1, 2);
    comm.pp_wait_sends();
    // NCCL, the same order of calls
    if (s > 0) nc.pp_recv(dact_in.get(), n, s - 1);
    if (s < P - 1) nc.pp_send(dact.get(), n, s + 1);
    if (s < P - 1) nc.pp_recv(dgrad_in.get(), n, s + 1);
    if (s > 0) nc.pp_send(dgrad.get(), n, s - 1);
    expect_exact(tag + " pp forward chain", ref_act, fetch(nc, dact_in));
    expect_exact(tag + " pp backward chain", ref_grad, fetch(nc, dgrad_in));
  }
  // ring: every stage sends to the next and receives from the previous at once (one stage: to itself)
  auto x = randn(n, seed_of(GroupKind::pp, 22));
  std::vector<float> ref = x;  // one stage: its own message (Comm's pp_send needs MPI, absent under DSV3_NO_MPI)
  if (P > 1) {
    comm.pp_send(x.data(), n, (s + 1) % P, 3);
    comm.pp_recv(ref.data(), n, (s + P - 1) % P, 3);
    comm.pp_wait_sends();
  }
  DeviceBuffer<float> dx(x), dy(n);
  nc.pp_sendrecv(dx.get(), n, (s + 1) % P, dy.get(), n, (s + P - 1) % P);
  expect_exact(tag + " pp ring sendrecv", ref, fetch(nc, dy));
}

// single_comms: which settings of NcclOptions::singleton_comms to test for a layout (both on one rank; on more ranks
// the first layout also with 1-rank communicators, so that etp/embd-style groups go through NCCL once)
std::vector<bool> singleton_settings(int world, size_t layout_index) {
  if (world == 1 || layout_index == 0) return {false, true};
  return {false};
}

// f(nc, singleton, tag) for every layout of this world size and each of its singleton_comms settings, each on a new
// NcclComm; tag names the layout (and the 1-rank communicators)
void for_each_setting(Comm& comm, const std::function<void(NcclComm&, bool, const std::string&)>& f) {
  const auto ls = layouts(comm.size());
  for (size_t li = 0; li < ls.size(); ++li) {
    set_layout(comm, ls[li]);
    for (bool singleton : singleton_settings(comm.size(), li)) {
      NcclOptions opt;
      opt.singleton_comms = singleton;
      NcclComm nc(comm, opt);
      f(nc, singleton, std::string(ls[li].name) + (singleton ? " (1-rank comms)" : ""));
    }
  }
}

}  // namespace

TEST(NcclComm, CollectivesMatchMpi) {
  Comm& comm = *g_comm;
  for_each_setting(comm, [&](NcclComm& nc, bool singleton, const std::string& tag) {
    for (GroupKind k : kKinds) {
      EXPECT_EQ(nc.has_nccl(k), singleton || comm.group_size(k) > 1) << tag << " " << group_name(k);
      check_collectives(comm, nc, k, tag);
    }
  });
}

TEST(NcclComm, PipelineMatchesMpi) {
  Comm& comm = *g_comm;
  for_each_setting(comm, [&](NcclComm& nc, bool, const std::string& tag) { check_pipeline(comm, nc, tag); });
}

// What training uses: Comm with the NCCL DeviceTransport (make_nccl_transport) installed routes its float
// collectives through it, on buffers in the CUDA pool (the model's Buffers) and on host vectors (staged through the
// device), with MPI's results; the transport's own calls too (on one rank the only way its NCCL calls run: Comm
// keeps groups of one to itself).
TEST(NcclComm, TrainingTransportMatchesMpi) {
  Comm& comm = *g_comm;
  set_default_memory(&cuda_managed_memory());
  const auto be = make_cuda_backend(-1);  // the compute stream's producer of a started exchange's send buffer
  const auto ls = layouts(comm.size());
  uint64_t seed = 9000 + 100 * comm.rank();
  for (size_t li = 0; li < ls.size(); ++li) {
    set_layout(comm, ls[li]);
    for (bool singleton : singleton_settings(comm.size(), li)) {
      NcclOptions opt;
      opt.singleton_comms = singleton;
      const auto t = make_nccl_transport(comm, opt);
      const std::string tag = std::string(ls[li].name) + (singleton ? " (1-rank comms)" : "");
      for (GroupKind k : kKinds) {
        const int64_t n = comm.group_size(k), chunk = 37;
        const std::string what = tag + " " + group_name(k);
        const auto x = randn(n * chunk, ++seed);
        // the references: MPI on host vectors
        comm.set_device_transport(nullptr);
        std::vector<float> ar(x), rs(chunk), ag(n * chunk), mag = abs_of(x);
        comm.allreduce_sum(k, ar.data(), n * chunk);
        comm.allreduce_sum(k, mag.data(), n * chunk);
        comm.reduce_scatter(k, x.data(), rs.data(), chunk);
        comm.allgather(k, x.data(), ag.data(), chunk);
        const std::vector<float> rs_mag(mag.begin() + comm.group_rank(k) * chunk,
                                        mag.begin() + (comm.group_rank(k) + 1) * chunk);
        // through Comm with the transport: pool Buffers, then host vectors
        comm.set_device_transport(t.get());
        Floats d(x), d_rs(chunk), d_ag(n * chunk);
        comm.allreduce_sum(k, d.data(), n * chunk);
        expect_sum_close(what + " Comm allreduce (pool)", ar, d.to_host(), mag, 1e-6);
        comm.reduce_scatter(k, Floats(x).data(), d_rs.data(), chunk);
        expect_sum_close(what + " Comm reduce_scatter (pool)", rs, d_rs.to_host(), rs_mag, 1e-6);
        comm.allgather(k, Floats(x).data(), d_ag.data(), chunk);
        expect_exact(what + " Comm allgather (pool)", ag, d_ag.to_host());
        std::vector<float> h(x), h_ag(n * chunk);
        comm.allreduce_sum(k, h.data(), n * chunk);
        expect_sum_close(what + " Comm allreduce (host, staged)", ar, h, mag, 1e-6);
        comm.allgather(k, x.data(), h_ag.data(), chunk);
        expect_exact(what + " Comm allgather (host, staged)", ag, h_ag);
        // the started all-to-all (the MoE's token exchange): in flight on the lane until wait() joins it into the
        // compute stream, which the pool's copy back to the host then follows; host vectors take the blocking path
        const std::vector<int64_t> sc(n, chunk);
        std::vector<float> a2a(n * chunk), h_a2a(n * chunk);
        comm.set_device_transport(nullptr);
        comm.alltoallv(k, x.data(), sc, a2a.data(), sc);
        comm.set_device_transport(t.get());
        Floats d_send(x), d_a2a(n * chunk);
        CommRequest req = comm.alltoallv_start(k, d_send.data(), sc, d_a2a.data(), sc);
        comm.wait(req);
        expect_exact(what + " Comm alltoallv_start (pool)", a2a, d_a2a.to_host());
        CommRequest hreq = comm.alltoallv_start(k, x.data(), sc, h_a2a.data(), sc);
        EXPECT_FALSE(hreq.pending()) << what << ": host buffers take the blocking path";
        comm.wait(hreq);
        expect_exact(what + " Comm alltoallv_start (host, staged)", a2a, h_a2a);
        // the transport itself (every group size, 1-rank NCCL communicators included; on one rank the only way its
        // started all-to-all runs, Comm copying groups of one itself). The send buffer is written by a kernel queued
        // just before the start (x doubled on the device), so the exchange must be ordered behind the compute stream.
        {
          Floats t_x(x), t_send(x), t_recv(n * chunk);
          std::vector<float> a2a2(a2a);
          for (float& v : a2a2) v *= 2;
          be->add(t_x.data(), n * chunk, t_send.data());  // queued on the backend's stream, not waited for
          EXPECT_TRUE(t->alltoallv_start(k, t_send.data(), sc, t_recv.data(), sc)) << what << ": in flight";
          t->alltoallv_wait(k);
          expect_exact(what + " transport alltoallv_start (pool, after a kernel)", a2a2, t_recv.to_host());
          std::vector<float> th(n * chunk);
          EXPECT_FALSE(t->alltoallv_start(k, x.data(), sc, th.data(), sc)) << what << ": host buffers: blocking";
          expect_exact(what + " transport alltoallv_start (host)", a2a, th);
        }
        Floats e(x), e_rs(chunk);
        t->allreduce_sum(k, e.data(), n * chunk);
        expect_sum_close(what + " transport allreduce", ar, e.to_host(), mag, 1e-6);
        std::vector<float> hr(chunk);
        t->reduce_scatter(k, x.data(), hr.data(), chunk);
        expect_sum_close(what + " transport reduce_scatter (host)", rs, hr, rs_mag, 1e-6);
        comm.set_device_transport(nullptr);
      }
    }
  }
  set_default_memory(nullptr);
}

// the named wrappers are the generic operations on their group
TEST(NcclComm, NamedByIntent) {
  Comm& comm = *g_comm;
  set_layout(comm, layouts(comm.size()).front());
  NcclComm nc(comm);
  const int64_t n = 517;
  const int dp = comm.group_size(GroupKind::dp), ep = comm.group_size(GroupKind::ep);
  auto x = randn(n * dp, 71);
  DeviceBuffer<float> a(x), b(x), ra(n), rb(n), ga(n * dp), gb(n * dp);
  nc.tp_allreduce(a.get(), n);
  nc.allreduce_sum(GroupKind::tp, b.get(), n);
  expect_exact("tp_allreduce", fetch(nc, b), fetch(nc, a));
  nc.dp_reduce_scatter(a.get(), ra.get(), n);
  nc.reduce_scatter(GroupKind::dp, b.get(), rb.get(), n);
  expect_exact("dp_reduce_scatter", fetch(nc, rb), fetch(nc, ra));
  nc.dp_allgather(ra.get(), ga.get(), n);
  nc.allgather(GroupKind::dp, rb.get(), gb.get(), n);
  expect_exact("dp_allgather", fetch(nc, gb), fetch(nc, ga));
  auto xb = to_bf16(small_ints(n * dp, 72));
  DeviceBuffer<uint16_t> bb(xb), rbb(n), gbb(n * dp);
  std::vector<float> xf(n * dp), rf(n), gf(n * dp);
  for (int64_t i = 0; i < n * dp; ++i) xf[i] = bf16_to_float(xb[i]);
  comm.dp_reduce_scatter(xf.data(), rf.data(), n);
  comm.dp_allgather(rf.data(), gf.data(), n);
  nc.dp_reduce_scatter_bf16(bb.get(), rbb.get(), n);
  nc.dp_allgather_bf16(rbb.get(), gbb.get(), n);
  expect_exact("dp_reduce_scatter_bf16 + dp_allgather_bf16", to_bf16(gf), fetch(nc, gbb));
  std::vector<int64_t> c(ep, 5);
  auto s = randn(5 * ep, 73);
  std::vector<float> ref(5 * ep);
  comm.ep_alltoallv(s.data(), c, ref.data(), c);
  DeviceBuffer<float> ds(s), dr(5 * ep);
  nc.ep_alltoallv(ds.get(), c, dr.get(), c);
  expect_exact("ep_alltoallv", ref, fetch(nc, dr));
}

// Inputs queued on a non-blocking compute stream are seen by the operation; join() orders the result before the
// compute stream's next work (the copy back), with no host synchronisation in between.
TEST(NcclComm, ComputeStreamContract) {
  Comm& comm = *g_comm;
  set_layout(comm, layouts(comm.size()).front());
  cudaStream_t cs = nullptr;
  DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  {
    NcclOptions opt;
    opt.compute_stream = cs;
    opt.singleton_comms = true;
    NcclComm nc(comm, opt);
    EXPECT_EQ(nc.compute_stream(), (void*)cs);
    const int64_t n = (1 << 22) + 1;  // 16 MiB: a copy that takes long enough to be overtaken without the ordering
    float* host = nullptr;
    DSV3_CUDA_CHECK(cudaMallocHost(&host, n * sizeof(float)));
    auto x = randn(n, 81);
    std::copy(x.begin(), x.end(), host);
    DeviceBuffer<float> d(n);
    DSV3_CUDA_CHECK(cudaMemsetAsync(d.get(), 0, n * sizeof(float), cs));
    DSV3_CUDA_CHECK(cudaMemcpyAsync(d.get(), host, n * sizeof(float), cudaMemcpyHostToDevice, cs));
    nc.allreduce_sum(GroupKind::world, d.get(), n);
    nc.join(lane_of(GroupKind::world));
    DSV3_CUDA_CHECK(cudaMemcpyAsync(host, d.get(), n * sizeof(float), cudaMemcpyDeviceToHost, cs));
    DSV3_CUDA_CHECK(cudaStreamSynchronize(cs));
    auto mag = abs_of(x);
    comm.allreduce_sum(GroupKind::world, x.data(), n);
    comm.allreduce_sum(GroupKind::world, mag.data(), n);
    expect_sum_close("allreduce through a compute stream", x, std::vector<float>(host, host + n), mag, 1e-6);
    DSV3_CUDA_CHECK(cudaFreeHost(host));
    nc.synchronize();
  }
  DSV3_CUDA_CHECK(cudaStreamDestroy(cs));
}

TEST(NcclComm, TimesPerGroup) {
  Comm& comm = *g_comm;
  set_layout(comm, layouts(comm.size()).front());
  NcclComm nc(comm);
  const int64_t n = 1 << 22;  // 16 MiB: a copy of it takes microseconds, well above the events' resolution
  DeviceBuffer<float> d(std::vector<float>(n, 1.0f));
  const CommTimes t0 = nc.times();
  nc.tp_allreduce(d.get(), n);  // one rank without a communicator: nothing enqueued but the timing events
  const CommTimes t1 = nc.times();
  EXPECT_GE(t1.tp, t0.tp);
  EXPECT_EQ(t1.dp, t0.dp);
  EXPECT_EQ(t1.ep, t0.ep);
  DeviceBuffer<float> out(n * comm.group_size(GroupKind::dp));
  nc.dp_allgather(d.get(), out.get(), n);  // a copy at least: a measurable time
  const CommTimes t2 = nc.times();
  EXPECT_GT(t2.dp, t1.dp);
  EXPECT_EQ(t2.tp, t1.tp);
  EXPECT_GT(t2.total(), 0.0);
}

// Bad arguments stop before any NCCL call, with the operation named (the same on every rank: nobody waits).
TEST(NcclComm, ErrorsNameTheOperation) {
  Comm& comm = *g_comm;
  set_layout(comm, layouts(comm.size()).front());
  NcclComm nc(comm);
  DeviceBuffer<float> d(64);
  auto has = [](const std::string& e, const char* what) {
    EXPECT_NE(e.find(what), std::string::npos) << "expected '" << what << "' in: " << e;
  };
  has(error_of([&] { nc.allreduce_sum(GroupKind::tp, d.get(), -1); }), "NCCL allreduce: negative count -1");
  has(error_of([&] { nc.reduce_scatter(GroupKind::dp, d.get(), d.get(), -5); }), "NCCL reduce_scatter: negative");
  has(error_of([&] { nc.allgather_bf16(GroupKind::dp, nullptr, nullptr, -2); }), "NCCL allgather_bf16: negative");
  has(error_of([&] { nc.broadcast(GroupKind::tp, d.get(), 4, comm.group_size(GroupKind::tp)); }),
      "NCCL broadcast: root");
  has(error_of([&] { nc.alltoallv(GroupKind::ep, d.get(), {1, 2, 3, 4, 5}, d.get(), {1}); }),
      "NCCL alltoallv: counts for 5 / 1 ranks");
  has(error_of([&] { nc.pp_send(d.get(), 4, comm.group_rank(GroupKind::pp)); }), "NCCL pp_send: stage");
  has(error_of([&] { nc.pp_recv(d.get(), 4, 99); }), "NCCL pp_recv: stage 99");
  // the transport still works after refused calls
  nc.tp_allreduce(d.get(), 64);
  nc.synchronize();
}

namespace {
// --expect-no-device (ctest runs it with CUDA_VISIBLE_DEVICES hiding every GPU): constructing an NcclComm fails on
// every rank with one clear message and no NCCL call, instead of a rank waiting in a collective. Exit 0 when so.
int expect_no_device(Comm& comm) {
  std::string reason;
  if (cuda_device_usable(&reason)) {
    if (comm.rank() == 0) std::printf("SKIPPED: a CUDA device is usable (hide them: CUDA_VISIBLE_DEVICES=)\n");
    return 77;
  }
  std::string msg;
  try {
    NcclComm nc(comm);
  } catch (const Error& e) {
    msg = e.what();
  }
  const std::string want = "NCCL: no usable CUDA device on rank " + std::to_string(comm.rank());
  const bool ok = msg.find(want) != std::string::npos;
  std::printf("rank %d: %s: %s\n", comm.rank(), ok ? "PASS" : "FAIL", msg.empty() ? "(no error)" : msg.c_str());
  return comm.any(!ok) ? 1 : 0;
}
}  // namespace

int main(int argc, char** argv) {
  Comm comm(&argc, &argv);
  g_comm = &comm;
  ::testing::InitGoogleTest(&argc, argv);
  if (argc > 1 && std::string(argv[1]) == "--expect-no-device") return expect_no_device(comm);
  if (GTEST_FLAG_GET(list_tests)) return RUN_ALL_TESTS();
  if (comm.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  // every rank needs a device, every node one device per rank; all ranks agree before any NCCL call
  int count = 0;
  const std::string skip = dsv3::test::one_gpu_per_rank(comm, &count);
  if (comm.any(!skip.empty())) {
    if (comm.rank() == 0)
      std::printf("SKIPPED: %s\n", skip.empty() ? "another rank cannot use a CUDA device" : skip.c_str());
    return 77;
  }
  if (comm.rank() == 0) {
    std::printf("dsv3_nccl_tests: %d rank(s), %d CUDA device(s) on rank 0's node, layouts:", comm.size(), count);
    for (const Layout& l : layouts(comm.size())) std::printf(" %s", l.name);
    std::printf("\n");
  }
  int rc = 0;
  try {
    rc = RUN_ALL_TESTS();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3_nccl_tests: rank %d: %s\n", comm.rank(), e.what());
    comm.abort(1);
  }
  return comm.any(rc != 0) ? 1 : 0;
}
