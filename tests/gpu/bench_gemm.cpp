// dsv3_gpu_bench: GEMM throughput of the CUDA backend's op layer at DeepSeek-V3 shapes (hidden 7168), for
// scripts/gpu-check.sh: FP32 (cuBLAS SGEMM behind gemm_nt / gemm_nn / gemm_tn) and BF16 operands with FP32
// accumulation (CudaBackend::gemm_bf16, tensor cores). Per shape: the forward y = x W^T (nt), the input gradient
// dx = dy W (nn) and the weight gradient dW = dy^T x (tn); time per call and TFLOP/s (2 M N K / t). Then MLA attention
// at the real head dims: the probs form, the FP32 and the BF16 (tensor-core) flash kernels.
// Usage: dsv3_gpu_bench [tokens=4096] [seconds per measurement=0.25]. Exit 77 when no CUDA device is usable.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
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
// MLA causal attention at DeepSeek-V3's head dims (qk 128 + 64, v 128; k_pe inside kv_a's 576-wide output row) over
// 2 sequences and 32 heads (the proxy deck's attention): the probs form (FP32 cuBLAS + softmax kernels), the FP32
// flash kernels and the BF16 tensor-core flash kernels (run.attention_dtype=bf16), forward and backward. TFLOP/s count
// the useful products of causal attention, 2 (dqk + dv) per visible (query, key) pair forward and twice that backward
// (what the training log's MFU counts), so the recomputation in backward is not credited.
void bench_attention(CudaBackend& be, double seconds) {
  const int64_t B = 2, H = 32, dn = 128, dr = 64, dv = 128, ldkpe = 576;
  std::printf("\n%-34s %6s %9s %9s   %7s %7s\n", "attention (B 2, H 32, d 192/128)", "S", "fwd ms", "bwd ms", "fwd TF/s",
              "bwd TF/s");
  for (const int64_t S : {int64_t(2048), int64_t(4096)}) {
    const int64_t T = B * S;
    cuda::DeviceBuffer<float> q(T * H * (dn + dr)), kv(T * H * (dn + dv)), kpe(T * ldkpe), o(T * H * dv),
        dout(T * H * dv), lse(B * H * S), dq(q.size()), dkv(kv.size()), dkpe(kpe.size());
    fill(q);
    fill(kv);
    fill(kpe);
    fill(dout);
    const float scale = 1.0f / std::sqrt((float)(dn + dr));
    const double pairs = (double)B * H * S * (S + 1) / 2, fwd_flop = 2.0 * pairs * (dn + dr + dv);
    auto row = [&](const char* name, double f_ms, double b_ms) {
      std::printf("%-34s %6lld %9.3f %9.3f   %7.1f %7.1f\n", name, (long long)S, f_ms, b_ms,
                  fwd_flop / (f_ms * 1e-3) / 1e12, 2 * fwd_flop / (b_ms * 1e-3) / 1e12);
    };
    if (S <= 2048) {  // the probs form keeps (B, H, S, S) floats: 1 GiB here, 4 GiB at S = 4096
      cuda::DeviceBuffer<float> probs(B * H * S * S);
      const double f = time_call(be, seconds, [&] {
        be.mla_attention_forward(q.get(), kv.get(), kpe.get(), ldkpe, B, S, H, dn, dr, dv, scale, o.get(), probs.get());
      });
      const double b = time_call(be, seconds, [&] {
        be.mla_attention_backward(q.get(), kv.get(), kpe.get(), ldkpe, probs.get(), dout.get(), B, S, H, dn, dr, dv,
                                  scale, dq.get(), dkv.get(), dkpe.get());
      });
      row("probs form, FP32 cuBLAS", f, b);
    }
    for (const bool bf16 : {false, true}) {
      be.set_bf16_attention(bf16);
      const double f = time_call(be, seconds, [&] {
        be.mla_flash_attention_forward(q.get(), kv.get(), kpe.get(), ldkpe, B, S, H, dn, dr, dv, scale, o.get(),
                                       lse.get());
      });
      const double b = time_call(be, seconds, [&] {
        be.mla_flash_attention_backward(q.get(), kv.get(), kpe.get(), ldkpe, o.get(), lse.get(), dout.get(), B, S, H,
                                        dn, dr, dv, scale, dq.get(), dkv.get(), dkpe.get());
      });
      row(bf16 ? "flash, BF16 tensor cores" : "flash, FP32 CUDA cores", f, b);
    }
    be.set_bf16_attention(false);
  }
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
    bench_attention(be, seconds);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3_gpu_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
