#include "parallel/comm.h"

#include <mpi.h>

#include <cstdint>

#include "core/error.h"

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

Comm::Comm(int* argc, char*** argv) {
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
}

Comm::~Comm() {
  if (owns_mpi_) MPI_Finalize();
}

void Comm::barrier() const { MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD)); }

void Comm::bcast_string(std::string& s, int root) const {
  if (size_ == 1) return;
  uint64_t n = s.size();
  MPI_CHECK(MPI_Bcast(&n, 1, MPI_UINT64_T, root, MPI_COMM_WORLD));
  s.resize(n);
  // large strings in chunks: MPI counts are int
  for (uint64_t off = 0; off < n; off += (1u << 30)) {
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
  MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

}  // namespace dsv3
