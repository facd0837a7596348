// defines: make_cuda_backend — entry point of the CUDA backend.
// The op kernels (cuBLAS GEMMs, RMSNorm, RoPE, attention, router, ...) are the CUDA-backend issue's work; until
// they exist this file checks that a device is usable so that `run.device = cuda` fails at once, with the reason,
// instead of later inside an op.
#include <cuda_runtime.h>

#include <memory>
#include <sstream>

#include "core/error.h"
#include "ops/backend.h"

namespace dsv3 {

std::unique_ptr<Backend> make_cuda_backend(int device_hint) {
  int count = 0;  // left untouched by cudaGetDeviceCount when no driver is present
  const cudaError_t err = cudaGetDeviceCount(&count);
  DSV3_CHECK(err == cudaSuccess && count > 0,
             "run.device = cuda, but no CUDA device is usable on this node (cudaGetDeviceCount: "
                 << (err == cudaSuccess ? "0 devices" : cudaGetErrorString(err)) << ")");
  DSV3_FAIL("run.device = cuda: " << count << " device(s) found (hint " << device_hint
                                  << "), but the CUDA op kernels are not implemented yet; use run.device = cpu");
}

}  // namespace dsv3
