// defines: the NCCL functions cuda/nccl_comm.cu calls, as forwarders to libnccl.so.2 loaded with dlopen on first use.
// Why: dsv3 links the NCCL transport (run.device = cuda with several ranks) but must still start on nodes without
// libnccl (CPU runs, one-GPU runs): with these the executable has no load-time dependency on libnccl, and a run that
// needs NCCL and does not find it stops with a message naming the library (and DSV3_NCCL_LIBRARY, a path to use
// instead of the dynamic linker's search, e.g. the libnccl.so.2 of a PyTorch wheel).
// The declarations come from nccl.h, so every forwarder has exactly the library's signature. Part of the comm module.
#include <dlfcn.h>
#include <nccl.h>

#include <cstdlib>
#include <string>

#include "core/error.h"

namespace {

void* nccl_library() {
  static void* handle = [] {
    const char* env = std::getenv("DSV3_NCCL_LIBRARY");
    const std::string name = env && *env ? env : "libnccl.so.2";
    void* h = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    DSV3_CHECK(h, "the NCCL transport (run.device = cuda with more than one rank) needs " << name << ": " << dlerror()
                                                                                        << " (set DSV3_NCCL_LIBRARY to "
                                                                                           "its path, or add its "
                                                                                           "directory to "
                                                                                           "LD_LIBRARY_PATH)");
    return h;
  }();
  return handle;
}

template <class F>
F nccl_symbol(const char* name) {
  void* s = dlsym(nccl_library(), name);
  DSV3_CHECK(s, "the NCCL library has no " << name << " (older than the NCCL 2.x dsv3 was built with?)");
  return reinterpret_cast<F>(s);
}

}  // namespace

// each forwarder resolves its symbol once (a function-local static: thread-safe)
#define DSV3_NCCL_FORWARD(ret, fn, params, args)                     \
  ret fn params {                                                    \
    static const auto f = nccl_symbol<decltype(&fn)>(#fn);          \
    return f args;                                                   \
  }

extern "C" {
DSV3_NCCL_FORWARD(ncclResult_t, ncclGetUniqueId, (ncclUniqueId * id), (id))
DSV3_NCCL_FORWARD(ncclResult_t, ncclCommInitRank, (ncclComm_t * comm, int nranks, ncclUniqueId id, int rank),
                  (comm, nranks, id, rank))
DSV3_NCCL_FORWARD(ncclResult_t, ncclCommFinalize, (ncclComm_t comm), (comm))
DSV3_NCCL_FORWARD(ncclResult_t, ncclCommDestroy, (ncclComm_t comm), (comm))
DSV3_NCCL_FORWARD(ncclResult_t, ncclCommAbort, (ncclComm_t comm), (comm))
DSV3_NCCL_FORWARD(ncclResult_t, ncclCommGetAsyncError, (ncclComm_t comm, ncclResult_t* err), (comm, err))
DSV3_NCCL_FORWARD(const char*, ncclGetErrorString, (ncclResult_t r), (r))
DSV3_NCCL_FORWARD(const char*, ncclGetLastError, (ncclComm_t comm), (comm))
DSV3_NCCL_FORWARD(ncclResult_t, ncclGroupStart, (), ())
DSV3_NCCL_FORWARD(ncclResult_t, ncclGroupEnd, (), ())
DSV3_NCCL_FORWARD(ncclResult_t, ncclAllReduce,
                  (const void* s, void* r, size_t n, ncclDataType_t t, ncclRedOp_t op, ncclComm_t c, cudaStream_t st),
                  (s, r, n, t, op, c, st))
DSV3_NCCL_FORWARD(ncclResult_t, ncclReduceScatter,
                  (const void* s, void* r, size_t n, ncclDataType_t t, ncclRedOp_t op, ncclComm_t c, cudaStream_t st),
                  (s, r, n, t, op, c, st))
DSV3_NCCL_FORWARD(ncclResult_t, ncclAllGather,
                  (const void* s, void* r, size_t n, ncclDataType_t t, ncclComm_t c, cudaStream_t st),
                  (s, r, n, t, c, st))
DSV3_NCCL_FORWARD(ncclResult_t, ncclBroadcast,
                  (const void* s, void* r, size_t n, ncclDataType_t t, int root, ncclComm_t c, cudaStream_t st),
                  (s, r, n, t, root, c, st))
DSV3_NCCL_FORWARD(ncclResult_t, ncclSend,
                  (const void* s, size_t n, ncclDataType_t t, int peer, ncclComm_t c, cudaStream_t st),
                  (s, n, t, peer, c, st))
DSV3_NCCL_FORWARD(ncclResult_t, ncclRecv, (void* r, size_t n, ncclDataType_t t, int peer, ncclComm_t c, cudaStream_t st),
                  (r, n, t, peer, c, st))
}
#undef DSV3_NCCL_FORWARD
