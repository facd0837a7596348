// dsv3_gpu_bench: GEMM throughput of the CUDA backend's op layer at DeepSeek-V3 shapes (hidden 7168), for
// scripts/gpu-check.sh: FP32 (cuBLAS SGEMM behind gemm_nt / gemm_nn / gemm_tn) and BF16 operands with FP32
// accumulation (CudaBackend::gemm_bf16, tensor cores). Per shape: the forward y = x W^T (nt), the input gradient
// dx = dy W (nn) and the weight gradient dW = dy^T x (tn); time per call and TFLOP/s (2 M N K / t).
// Usage: dsv3_gpu_bench [tokens=4096] [seconds per measurement=0.25]. Exit 77 when no CUDA device is usable.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_backend.cuh"
#include "device_buffer.cuh"
#include "io/safetensors.h"  // float_to_bf16

using namespace dsv3;

namespace {
struct Shape {
  const char* name;
  int64_t out, in;  // a Linear layer W (out, in)
};

// fills with small values (a cheap kernel-free pattern: the timings do not depend on the values)
float pattern(size_t i) { return (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f; }
void fill(cuda::DeviceBuffer<float>& b) {
  std::vector<float> h(b.size());
  for (size_t i = 0; i < h.size(); ++i) h[i] = pattern(i);
  b.upload(h);
}
void fill(cuda::DeviceBuffer<uint16_t>& b) {
  std::vector<uint16_t> h(b.size());
  for (size_t i = 0; i < h.size(); ++i) h[i] = float_to_bf16(pattern(i));
  b.upload(h);
}

double time_call(CudaBackend& be, double seconds, const std::function<void()>& call) {
  cudaEvent_t t0, t1;
  DSV3_CUDA_CHECK(cudaEventCreate(&t0));
  DSV3_CUDA_CHECK(cudaEventCreate(&t1));
  call();  // warm-up (cuBLAS heuristics, clocks)
  call();
  DSV3_CUDA_CHECK(cudaEventRecord(t0, be.stream()));
  call();
  DSV3_CUDA_CHECK(cudaEventRecord(t1, be.stream()));
  DSV3_CUDA_CHECK(cudaEventSynchronize(t1));
  float ms = 0;
  DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
  const int reps = std::max(3, std::min(200, (int)(seconds * 1e3 / std::max(ms, 1e-3f))));
  DSV3_CUDA_CHECK(cudaEventRecord(t0, be.stream()));
  for (int r = 0; r < reps; ++r) call();
  DSV3_CUDA_CHECK(cudaEventRecord(t1, be.stream()));
  DSV3_CUDA_CHECK(cudaEventSynchronize(t1));
  DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  return ms / reps;
}
// one table row: the three calls' times and TFLOP/s (2 M N K / t); returns the best TFLOP/s of the row
double print_row(const char* name, int64_t M, int64_t N, int64_t K, const double ms[3], const char* tag) {
  const double flop = 2.0 * M * N * K;
  double tf[3], best = 0;
  for (int i = 0; i < 3; ++i) {
    tf[i] = flop / (ms[i] * 1e-3) / 1e12;
    best = std::max(best, tf[i]);
  }
  std::printf("%-26s %6lld %6lld %6lld  %9.3f %9.3f %9.3f   %7.2f %7.2f %7.2f%s\n", name, (long long)M, (long long)N,
              (long long)K, ms[0], ms[1], ms[2], tf[0], tf[1], tf[2], tag);
  return best;
}
}  // namespace

int main(int argc, char** argv) {
  const int64_t M = argc > 1 ? std::atoll(argv[1]) : 4096;
  const double seconds = argc > 2 ? std::atof(argv[2]) : 0.25;
  std::string reason;
  if (!cuda_device_usable(&reason)) {
    std::printf("dsv3_gpu_bench: no CUDA device: %s\n", reason.c_str());
    return 77;
  }
  try {
    auto be_ptr = make_cuda_backend(0);
    auto& be = static_cast<CudaBackend&>(*be_ptr);
    cudaDeviceProp prop{};
    DSV3_CUDA_CHECK(cudaGetDeviceProperties(&prop, be.device()));
    std::printf("dsv3_gpu_bench: %s (sm_%d%d, %d SMs), FP32 cuBLAS SGEMM via the op layer, tokens M = %lld\n",
                prop.name, prop.major, prop.minor, prop.multiProcessorCount, (long long)M);
    const Shape shapes[] = {
        {"q_a_proj 7168->1536", 1536, 7168},   {"kv_a_proj 7168->576", 576, 7168},
        {"expert gate 7168->2048", 2048, 7168}, {"expert down 2048->7168", 7168, 2048},
        {"dense up 7168->18432", 18432, 7168},  {"o_proj 16384->7168", 7168, 16384},
    };
    std::printf("%-26s %6s %6s %6s  %9s %9s %9s   %7s %7s %7s\n", "layer", "M", "N", "K", "nt ms", "nn ms", "tn ms",
                "nt TF/s", "nn TF/s", "tn TF/s");
    double best = 0;
    for (const auto& s : shapes) {
      const int64_t N = s.out, K = s.in;
      cuda::DeviceBuffer<float> x(M * K), w(N * K), y(M * N), dx(M * K), dw(N * K);
      fill(x);
      fill(w);
      fill(y);
      double ms[3];
      ms[0] = time_call(be, seconds, [&] { be.gemm_nt(M, N, K, 1.0f, x.get(), K, w.get(), K, 0.0f, y.get(), N); });
      ms[1] = time_call(be, seconds, [&] { be.gemm_nn(M, K, N, 1.0f, y.get(), N, w.get(), K, 0.0f, dx.get(), K); });
      ms[2] = time_call(be, seconds, [&] { be.gemm_tn(N, K, M, 1.0f, y.get(), N, x.get(), K, 0.0f, dw.get(), K); });
      best = std::max(best, print_row(s.name, M, N, K, ms, ""));
    }
    std::printf("dsv3_gpu_bench: best %.2f TFLOP/s (FP32 SGEMM; H200 FP32 peak ~67 TFLOP/s)\n", best);
    double best16 = 0;
    for (const auto& s : shapes) {
      const int64_t N = s.out, K = s.in;
      cuda::DeviceBuffer<uint16_t> x(M * K), w(N * K), y16(M * N);
      cuda::DeviceBuffer<float> y(M * N), dx(M * K), dw(N * K);
      fill(x);
      fill(w);
      fill(y16);
      double ms[3];
      // the same three products as above, on BF16 copies of x, W and dy
      ms[0] = time_call(be, seconds,
                        [&] { be.gemm_bf16(false, true, M, N, K, 1.0f, x.get(), K, w.get(), K, 0.0f, y.get(), N); });
      ms[1] = time_call(be, seconds,
                        [&] { be.gemm_bf16(false, false, M, K, N, 1.0f, y16.get(), N, w.get(), K, 0.0f, dx.get(), K); });
      ms[2] = time_call(be, seconds,
                        [&] { be.gemm_bf16(true, false, N, K, M, 1.0f, y16.get(), N, x.get(), K, 0.0f, dw.get(), K); });
      best16 = std::max(best16, print_row(s.name, M, N, K, ms, "  bf16"));
    }
    std::printf("dsv3_gpu_bench: best %.2f TFLOP/s (BF16 operands, FP32 accumulate; H200 dense BF16 ~990 datasheet)\n",
                best16);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3_gpu_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
