#include "ops/backend.h"

#include "core/deck.h"
#include "core/error.h"
#include "core/memory.h"
#include "ops/cpu/cpu_backend.h"

namespace dsv3 {

#ifdef DSV3_HAVE_CUDA
// cuda/host_staged.cu: the CUDA ops on host pointers (staged) or on the CUDA pool's memory (in place)
std::unique_ptr<Backend> make_host_staged_cuda_backend(int device_hint);
// cuda/managed_pool.cu: the CUDA pool (managed memory)
MemoryResource& cuda_managed_memory();
#endif

std::unique_ptr<Backend> make_backend(const std::string& device, int threads) {
  // the Buffers made from now on (parameters, gradients, optimizer state, activations) live where this backend's
  // ops run (core/memory.h): host memory for the CPU, the CUDA pool for the GPU
  if (device == "cpu") {
    set_default_memory(nullptr);
    return std::make_unique<CpuBackend>(threads);
  }
  if (device == "cuda") {
#ifdef DSV3_HAVE_CUDA
    auto be = make_host_staged_cuda_backend(0);
    set_default_memory(&cuda_managed_memory());
    return be;
#else
    DSV3_FAIL("run.device = cuda, but this dsv3 was built without CUDA (no nvcc at configure time)");
#endif
  }
  DSV3_FAIL("run.device = '" << device << "' is not a device (cpu|cuda)");
}

std::unique_ptr<Backend> make_backend(const Deck& deck) {
  auto be = make_backend(deck.get<std::string>("run.device"), deck.get<int>("run.threads"));
  be->set_bf16_matmul(deck.get<std::string>("run.matmul_dtype") == "bf16");
  be->set_flash_attention(deck.get<std::string>("run.attention") == "flash");
  const bool bf16_attention = deck.get<std::string>("run.attention_dtype") == "bf16";
  DSV3_CHECK(!bf16_attention || be->flash_attention(),
             "run.attention_dtype = bf16 is the flash kernels' precision: it needs run.attention = flash (the deck has "
             "run.attention = " << deck.get<std::string>("run.attention") << ")");
  be->set_bf16_attention(bf16_attention);
  return be;
}

}  // namespace dsv3
