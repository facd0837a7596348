#include "ops/cpu/blas_preflight.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

extern "C" char* openblas_get_corename(void);

namespace dsv3 {

const char* blas_corename() { return openblas_get_corename(); }

void blas_preflight(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") || std::getenv("DSV3_BLAS_REEXEC")) return;  // chosen, or already tried
  const char* core = openblas_get_corename();
  const bool generic = !std::strcmp(core, "Prescott") || !std::strcmp(core, "Core2") || !std::strcmp(core, "Nehalem") ||
                       !std::strcmp(core, "Katmai") || !std::strcmp(core, "Banias");
  if (!generic) return;
  const char* want = nullptr;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    want = __builtin_cpu_supports("avx512bf16") ? "Cooperlake" : "SkylakeX";
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    want = "Haswell";
  if (!want) return;
  setenv("OPENBLAS_CORETYPE", want, 1);
  setenv("DSV3_BLAS_REEXEC", "1", 1);
  // the real path (not /proc/self/exe, which would rename the process "exe" in ps and top)
  char self[4096];
  const ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
  if (len > 0) {
    self[len] = 0;
    execv(self, argv);
  }
  // exec failed: carry on with the slow kernels, but say so
  std::fprintf(stderr, "dsv3: warning: OpenBLAS uses its generic %s kernels; set OPENBLAS_CORETYPE=%s for speed\n",
               core, want);
}

}  // namespace dsv3
