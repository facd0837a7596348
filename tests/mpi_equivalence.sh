#!/usr/bin/env bash
# The first 20 iterations of input/tiny.deck (its 600-iteration schedule) on the shipped corpus give the same losses on
# 1 rank and under data-, expert-, pipeline-, tensor- and sequence-parallel layouts (relative difference < 1e-5 per
# iteration, FP32), also with node-limited routing (moe.max_nodes).
#   tests/mpi_equivalence.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BIN=$1 SRC=$2
source "$(dirname "$0")/lib_tiny_mpi.sh"  # $tmp, the corpus, tiny_mpirun
run() {  # run NAME NP [overrides...]
  local name=$1 np=$2; shift 2
  tiny_mpirun "$np" train.iters=20 log.metrics="$tmp/$name.jsonl" checkpoint.dir="" checkpoint.load="" "$@"
}
run one 1 moe.nodes=2  # node groups named, no limit: the same losses, the log counts each token's nodes
run dp4_ep2 4 parallel.ep=2
run dp8_ep4 8 parallel.ep=4
run pp2_dp4_ep4 8 parallel.pp=2 parallel.ep=4
run tp2_pp2_dp2_ep2_sp 8 parallel.tp=2 parallel.pp=2 parallel.ep=2 parallel.sp=true
# node-limited routing (each token's experts on 1 of 2 node groups): a rule of the model, the same under a layout
run one_nodes 1 moe.max_nodes=1 moe.nodes=2
run dp4_ep2_nodes 4 parallel.ep=2 moe.max_nodes=1 moe.nodes=2
/usr/bin/python3 - "$tmp" <<'PY'
import json, sys
d = sys.argv[1]
def losses(name):
    return [(r["lm_loss"], r["mtp_loss"], r["aux_loss"]) for r in map(json.loads, open(f"{d}/{name}.jsonl")) if "lm_loss" in r]
ref = losses("one")
assert len(ref) == 20, len(ref)
ok = True
for name in ("dp4_ep2", "dp8_ep4", "pp2_dp4_ep4", "tp2_pp2_dp2_ep2_sp"):
    got = losses(name)
    worst = max(abs(a - b) / abs(b) for g, r in zip(got, ref) for a, b in zip(g, r))
    print(f"{name}: {len(got)} iterations, worst relative difference to 1 rank {worst:.2e} "
          f"(lm {ref[0][0]:.4f} -> {ref[-1][0]:.4f})")
    ok &= len(got) == 20 and worst < 1e-5
ref_n = losses("one_nodes")
got = losses("dp4_ep2_nodes")
worst = max(abs(a - b) / abs(b) for g, r in zip(got, ref_n) for a, b in zip(g, r))
moved = max(abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(ref_n, ref))
print(f"node-limited (moe.max_nodes=1 of 2): dp4_ep2 vs 1 rank {worst:.2e}; vs unlimited routing: lm loss differs "
      f"by up to {moved:.2e}")
ok &= len(got) == 20 and len(ref_n) == 20 and worst < 1e-5 and moved > 1e-4
def nodes(name):
    return [r["expert_nodes_per_token"] for r in map(json.loads, open(f"{d}/{name}.jsonl")) if "lm_loss" in r]
free_n, lim_n = nodes("one"), nodes("one_nodes") + nodes("dp4_ep2_nodes")
print(f"nodes per token (2 node groups): unlimited {min(free_n):.3f}..{max(free_n):.3f}, moe.max_nodes=1: "
      f"{min(lim_n):.3f}..{max(lim_n):.3f}")
ok &= all(1.0 < v <= 2.0 for v in free_n) and all(v == 1.0 for v in lim_n)
sys.exit(0 if ok else 1)
PY
