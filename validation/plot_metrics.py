#!/usr/bin/env python3
"""Turns a dsv3 metrics file (log.metrics, JSON lines) into one PNG: the losses (lm, mtp, aux; validation lm where
present), the learning rate, the gradient norm (clipped steps marked) and the expert-load imbalance (max/mean load)
of every MoE layer.
  validation/plot_metrics.py runs/tiny/metrics.jsonl [-o runs/tiny/metrics.png]
Needs Debian's python3-matplotlib (/usr/bin/python3)."""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("metrics")
    ap.add_argument("-o", "--output", help="PNG path (default: next to the metrics file)")
    a = ap.parse_args()
    train, valid = [], []
    with open(a.metrics) as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{a.metrics}:{n}: not a JSON record ({e})")
            if "lm_loss" in r:
                train.append(r)
            elif "valid_lm_loss" in r:
                valid.append(r)
    if not train:
        raise SystemExit(f"{a.metrics}: no training records")
    it = [r["iteration"] for r in train]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    ax[0][0].plot(it, [r["lm_loss"] for r in train], label="lm", lw=0.8)
    ax[0][0].plot(it, [r["mtp_loss"] for r in train], label="mtp", lw=0.8)
    if valid:
        ax[0][0].plot([r["iteration"] for r in valid], [r["valid_lm_loss"] for r in valid], "o-", label="valid lm")
    ax[0][0].set_title("losses (nats/token)")
    ax[0][0].legend()
    ax2 = ax[0][0].twinx()
    ax2.plot(it, [r["aux_loss"] for r in train], color="grey", lw=0.5, label="aux (right)")
    ax2.legend(loc="center right")
    ax[0][1].plot(it, [r["lr"] for r in train])
    ax[0][1].set_title("learning rate")
    gn = [r["grad_norm"] for r in train]
    ax[1][0].plot(it, gn, lw=0.8)
    clipped = [(i, g) for i, g, r in zip(it, gn, train) if r.get("clip_coef", 1) < 1]
    if clipped:
        ax[1][0].plot(*zip(*clipped), "r.", ms=3, label="clipped")
        ax[1][0].legend()
    ax[1][0].set_title("gradient norm (before clipping)")
    layers = sorted(train[0].get("expert_load_max_over_mean", {}), key=int)
    for l in layers:
        ax[1][1].plot(it, [r["expert_load_max_over_mean"].get(l, float("nan")) for r in train], lw=0.8,
                      label=f"layer {l}")
    ax[1][1].set_title("expert load max / mean (1 = balanced)")
    if layers:
        ax[1][1].legend()
    for row in ax:
        for x in row:
            x.set_xlabel("iteration")
    fig.tight_layout()
    out = a.output or a.metrics.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=90)
    print(out)


if __name__ == "__main__":
    main()
