// defines: dsv3::Comm — the only code that touches MPI (and later NCCL).
// Group operations are named by intent; every MPI call is checked and reports file:line. A program started
// without mpirun is a world of one rank: every operation has its single-rank meaning.
#pragma once
#include <string>

namespace dsv3 {

class Comm {
 public:
  // MPI_Init_thread (FUNNELED) unless already initialised; safe to construct once per process.
  Comm(int* argc, char*** argv);
  ~Comm();  // MPI_Finalize when this object initialised MPI
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  void barrier() const;
  // world broadcast of a string from `root` (the deck, the config): resized on the receivers
  void bcast_string(std::string& s, int root = 0) const;
  // every rank learns whether any rank failed (an error on rank 0 while reading the deck stops all ranks cleanly)
  bool any(bool flag) const;
  [[noreturn]] void abort(int code) const;

 private:
  int rank_ = 0, size_ = 1;
  bool owns_mpi_ = false;
};

}  // namespace dsv3
