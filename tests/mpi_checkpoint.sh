#!/usr/bin/env bash
# HDF5 checkpoints across layouts: 20 iterations of input/tiny.deck (its 600-iteration schedule) on the shipped
# corpus, checkpointed at iteration 10 (and 20), then resumed from iteration 10
#   - 1 rank -> 4 ranks (parallel.ep=2, dp 4), 4 ranks (ep=2) -> 1 rank and 1 rank -> 2 pipeline stages
#     (parallel.pp=2): the losses of iterations 11..20 agree
#     with the uninterrupted 1-rank run within 1e-5 relative (the file is global: each layout reads its hyperslabs,
#     the ZeRO-1 optimizer shards included)
#   - the same layout (1 -> 1, 4 ep2 -> 4 ep2): bit-identical losses, and a final checkpoint whose every dataset
#     (model, master weights, moments) has the same checksum as the uninterrupted run's
#   - checkpoint.load = auto resumes from `latest`; with `latest` corrupt (a flipped byte) it falls back to the
#     previous checkpoint with a warning naming the file and the dataset
#   tests/mpi_checkpoint.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BIN=$1 SRC=$2
source "$(dirname "$0")/lib_tiny_mpi.sh"  # $tmp, the corpus, tiny_mpirun
run() {  # run NAME NP [overrides...]
  local name=$1 np=$2; shift 2
  tiny_mpirun "$np" train.iters=20 log.metrics="$tmp/$name.jsonl" "$@" 2> "$tmp/$name.err" ||
    { cat "$tmp/$name.err"; exit 1; }
}
# uninterrupted runs that also checkpoint at 10 and 20
run one 1 checkpoint.dir="$tmp/ck_one" checkpoint.interval=10
run four 4 parallel.ep=2 checkpoint.dir="$tmp/ck_four" checkpoint.interval=10
# resumes from iteration 10
run one_to_four 4 parallel.ep=2 checkpoint.dir="$tmp/ck_1to4" checkpoint.load="$tmp/ck_one/iter_0000010.h5"
run four_to_one 1 checkpoint.dir="$tmp/ck_4to1" checkpoint.load="$tmp/ck_four/iter_0000010.h5"
run one_to_one 1 checkpoint.dir="$tmp/ck_1to1" checkpoint.load="$tmp/ck_one/iter_0000010.h5"
run four_to_four 4 parallel.ep=2 checkpoint.dir="$tmp/ck_4to4" checkpoint.load="$tmp/ck_four/iter_0000010.h5"
run one_to_pp2 2 parallel.pp=2 checkpoint.dir="$tmp/ck_1topp" checkpoint.load="$tmp/ck_one/iter_0000010.h5"
# 1 rank -> 8 ranks (pp2 x dp4 x ep4) and the reverse
run one_to_eight 8 parallel.pp=2 parallel.ep=4 checkpoint.dir="$tmp/ck_1to8" checkpoint.load="$tmp/ck_one/iter_0000010.h5"
run eight 8 parallel.pp=2 parallel.ep=4 checkpoint.dir="$tmp/ck_eight" checkpoint.interval=10 train.iters=10
run eight_to_one 1 checkpoint.dir="$tmp/ck_8to1" checkpoint.load="$tmp/ck_eight/iter_0000010.h5"
# auto: a copy of ck_one with its newest checkpoint corrupted -> falls back to iteration 10
mkdir -p "$tmp/ck_auto" && cp "$tmp/ck_one/"* "$tmp/ck_auto/"
/usr/bin/python3 - "$tmp/ck_auto/iter_0000020.h5" <<'PY'
import h5py, sys
f = h5py.File(sys.argv[1], "r"); off = f["/model/model.layers.1.mlp.experts.down_proj.weight"].id.get_offset(); f.close()
with open(sys.argv[1], "r+b") as g:
    g.seek(off + 40); b = g.read(1); g.seek(off + 40); g.write(bytes([b[0] ^ 0x01]))
PY
# iters=20 again: resuming from 10 must reproduce 11..20 (and the auto run must warn about iter_0000020.h5)
run auto_fallback 2 checkpoint.dir="$tmp/ck_auto" checkpoint.load=auto
grep -q "iter_0000020.h5.*model.layers.1.mlp.experts.down_proj.weight" "$tmp/auto_fallback.err" \
  || { echo "auto_fallback: no warning naming the corrupt file and dataset"; cat "$tmp/auto_fallback.err"; exit 1; }
/usr/bin/python3 - "$tmp" <<'PY'
import json, sys, h5py
d = sys.argv[1]
def losses(name):
    return {r["iteration"]: (r["lm_loss"], r["mtp_loss"], r["aux_loss"]) for r in map(json.loads, open(f"{d}/{name}.jsonl")) if "lm_loss" in r}
ref, four = losses("one"), losses("four")
assert sorted(ref) == list(range(1, 21)), sorted(ref)
ok = True
def rel(got, want):
    return max(abs(a - b) / abs(b) for it in want for a, b in zip(got[it], want[it]))
for name, base, exact in [("one_to_four", ref, False), ("four_to_one", ref, False), ("auto_fallback", ref, False),
                          ("one_to_pp2", ref, False), ("one_to_eight", ref, False), ("eight_to_one", ref, False),
                          ("one_to_one", ref, True), ("four_to_four", four, True)]:
    got = losses(name)
    want = {it: base[it] for it in range(11, 21)}
    good = sorted(got) == list(range(11, 21))
    worst = rel(got, want) if good else float("inf")
    good &= (worst == 0.0) if exact else (worst < 1e-5)
    print(f"{name}: iterations {min(got)}..{max(got)}, worst relative difference to the uninterrupted run "
          f"{worst:.2e} ({'bit-identical required' if exact else '< 1e-5 required'}) {'ok' if good else 'FAIL'}")
    ok &= good
def sums(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, int(o.attrs["checksum"])) if isinstance(o, h5py.Dataset) else None)
    return out
for a, b in [("ck_one", "ck_1to1"), ("ck_four", "ck_4to4")]:
    sa, sb = sums(f"{d}/{a}/iter_0000020.h5"), sums(f"{d}/{b}/iter_0000020.h5")
    same = sa == sb and len(sa) > 0
    print(f"{b}/iter_0000020.h5 vs {a}: {len(sa)} datasets, checksums {'identical' if same else 'DIFFER'}")
    ok &= same
# the file does not depend on the layout that wrote it: the same datasets and global shapes from every layout
def walk(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o.shape) if isinstance(o, h5py.Dataset) else None)
    return out
one = walk(f"{d}/ck_one/iter_0000020.h5")
for other in ("ck_four", "ck_1topp"):
    same = walk(f"{d}/{other}/iter_0000020.h5") == one
    print(f"{other}/iter_0000020.h5 and ck_one's: same datasets and global shapes: {same}")
    ok &= same
sys.exit(0 if ok else 1)
PY
