// defines: blas_preflight — make OpenBLAS use the kernels this CPU can run.
// OpenBLAS 0.3.21 (Debian 12) picks its kernels at load time from the CPU model; a CPU newer than the library
// (e.g. family 6 model 207) falls back to the generic "Prescott" SSE3 kernels, 4-8x slower than the AVX-512 ones
// the CPU supports. The choice can only be overridden through OPENBLAS_CORETYPE before the library loads, so
// when the fallback happened and the user did not choose a core type, the program re-executes itself once with
// OPENBLAS_CORETYPE set (SkylakeX/Cooperlake for AVX-512, Haswell for AVX2). Call it first thing in main(),
// before MPI_Init (the process keeps its pid and environment across the exec).
#pragma once

namespace dsv3 {

void blas_preflight(char** argv);
const char* blas_corename();  // what OpenBLAS uses now, e.g. "Cooperlake"

}  // namespace dsv3
