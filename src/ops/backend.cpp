#include "ops/backend.h"

#include "core/error.h"
#include "ops/cpu/cpu_backend.h"

namespace dsv3 {

#ifdef DSV3_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(int device_hint);  // cuda/cuda_backend.cu
#endif

std::unique_ptr<Backend> make_backend(const std::string& device, int threads) {
  if (device == "cpu") return std::make_unique<CpuBackend>(threads);
  if (device == "cuda") {
#ifdef DSV3_HAVE_CUDA
    return make_cuda_backend(0);
#else
    DSV3_FAIL("run.device = cuda, but this dsv3 was built without CUDA (no nvcc at configure time)");
#endif
  }
  DSV3_FAIL("run.device = '" << device << "' is not a device (cpu|cuda)");
}

}  // namespace dsv3
