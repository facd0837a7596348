#!/usr/bin/python3
"""Times one full training step of the PyTorch reference (validation/torch_ref/dsv3_ref.py):
forward (main + MTP, all three losses) + backward + global-norm clip + hand-written AdamW + expert-bias update,
on random weights (the golden test initialisation) and random tokens. The C++ trainer is compared against it.

    /usr/bin/python3 validation/bench_torch.py CONFIG --batch 4 --seq 256 --threads 2 --warmup 2 --steps 5

Prints one JSON line: {"tokens_per_s": median over the timed steps, "step_s": [...], ...}.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_ref"))
import dsv3_ref as R  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    config = json.load(open(a.config))
    cfg = R.Config(config)
    model = R.DeepSeekV3(config, R.init_tensors(cfg, a.seed))
    trainer = R.Trainer(model)  # lr 0.01, AdamW, clip 1.0, bias gamma 1e-3, mtp_lambda 0.3, aux_alpha from config
    rng = np.random.default_rng(a.seed + 1)
    times = []
    for i in range(a.warmup + a.steps):
        ids = rng.integers(0, cfg.V, size=(a.batch, a.seq), dtype=np.int64)
        t0 = time.perf_counter()
        rec = trainer.step(ids)
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
    med = statistics.median(times)
    print(json.dumps({"tokens_per_s": a.batch * a.seq / med, "step_s": [round(t, 4) for t in times],
                      "config": a.config, "batch": a.batch, "seq": a.seq, "threads": a.threads,
                      "params": sum(p.numel() for p in model.params.values()),
                      "last_total_loss": float(rec["out"]["total_loss"]), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
