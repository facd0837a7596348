#!/usr/bin/env python3
"""The reference for dsv3_gpu_bench in the same run: torch.matmul at the same DeepSeek-V3 Linear shapes (hidden 7168),
forward y = x W^T, dx = dy W, dW = dy^T x, in FP32 (TF32 off: the same arithmetic as cuBLAS SGEMM) and in BF16.
Timed with CUDA events after warm-up; prints ms and TFLOP/s per call.   usage: bench_gemm_torch.py [tokens=4096]"""
import sys

import torch

M = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
SHAPES = [("q_a_proj 7168->1536", 1536, 7168), ("kv_a_proj 7168->576", 576, 7168),
          ("expert gate 7168->2048", 2048, 7168), ("expert down 2048->7168", 7168, 2048),
          ("dense up 7168->18432", 18432, 7168), ("o_proj 16384->7168", 7168, 16384)]


def time_ms(fn, reps=20):
    fn(), fn()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / reps


def main():
    if not torch.cuda.is_available():
        print("bench_gemm_torch: no CUDA device")
        return 77
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"bench_gemm_torch: torch {torch.__version__}, {torch.cuda.get_device_name()}, tokens M = {M}")
    print(f"{'layer':26s} {'dtype':5s} {'nt ms':>8s} {'nn ms':>8s} {'tn ms':>8s}  {'nt TF/s':>7s} {'nn TF/s':>7s} {'tn TF/s':>7s}")
    best = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for name, n, k in SHAPES:
            x = torch.randn(M, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            dy = torch.randn(M, n, device="cuda", dtype=dtype)
            ms = [time_ms(lambda: x @ w.t()), time_ms(lambda: dy @ w), time_ms(lambda: dy.t() @ x)]
            tf = [2.0 * M * n * k / (m * 1e-3) / 1e12 for m in ms]
            best[tag] = max(best.get(tag, 0.0), *tf)
            print(f"{name:26s} {tag:5s} {ms[0]:8.3f} {ms[1]:8.3f} {ms[2]:8.3f}  {tf[0]:7.2f} {tf[1]:7.2f} {tf[2]:7.2f}")
    print("bench_gemm_torch: best " + ", ".join(f"{t} {v:.2f} TFLOP/s" for t, v in best.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
