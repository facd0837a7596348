#!/usr/bin/env bash
# Sequence parallelism end to end (parallel.sp=true with tp > 1): the first 8 iterations of input/tiny.deck (its
# 600-iteration schedule; a global batch of 8 sequences to keep the test short) on the shipped corpus
#   - give the same losses on 1 rank, under tp2 sp and under tp2 x pp2 x dp2 (ep2) sp: lm, mtp and aux losses within
#     1e-5 relative per iteration (FP32; the grad norm is printed, not judged, as in mpi_tensor_parallel.sh)
#   - a checkpoint written under tp2 sp (iteration 4) resumes without sp: on 1 rank and under tp2 (sp off), both
#     reproducing iterations 5..8 of the uninterrupted 1-rank run within 1e-5 relative (sp shards no parameter or
#     optimizer state: its checkpoints are those of tp)
#   - tp2 sp with train.seq_length*train.micro_batch = 127 stops with the deck error naming the keys
#   tests/mpi_sequence_parallel.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BIN=$1 SRC=$2
source "$(dirname "$0")/lib_tiny_mpi.sh"  # $tmp, the corpus, tiny_mpirun
N=8
run() {  # run NAME NP [overrides...]
  local name=$1 np=$2; shift 2
  tiny_mpirun "$np" train.iters=$N train.global_batch=8 log.metrics="$tmp/$name.jsonl" checkpoint.load="" "$@" \
    > "$tmp/$name.log" 2> "$tmp/$name.err" || { cat "$tmp/$name.err"; exit 1; }
}
run one 1 checkpoint.dir=""
run tp2_sp 2 parallel.tp=2 parallel.sp=true checkpoint.dir="$tmp/ck_sp" checkpoint.interval=4 log.level=info
run tp2_pp2_dp2_ep2_sp 8 parallel.tp=2 parallel.pp=2 parallel.ep=2 parallel.sp=true checkpoint.dir="" log.level=info
for name in tp2_sp tp2_pp2_dp2_ep2_sp; do  # the layout line says sequence parallelism was on
  grep -q "layout: world .* tp 2 .* sp on" "$tmp/$name.log" || { echo "$name: no 'sp on' layout line"; exit 1; }
done
# a micro-batch whose tokens do not split into tp equal slices stops before any work, naming the keys
if mpirun -np 2 --oversubscribe "$BIN/dsv3" "$SRC/input/tiny.deck" parallel.tp=2 parallel.sp=true train.seq_length=127 \
    train.micro_batch=1 data.paths="$tmp/corpus" data.cache_dir="$tmp" > "$tmp/bad_sp.log" 2> "$tmp/bad_sp.err"; then
  echo "bad_sp: expected a deck error"; exit 1
fi
grep -q "parallel.sp needs train.seq_length\*train.micro_batch=127\*1=127 divisible by parallel.tp=2" "$tmp/bad_sp.err" "$tmp/bad_sp.log" \
  || { echo "bad_sp: unexpected error:"; cat "$tmp/bad_sp.err" "$tmp/bad_sp.log"; exit 1; }
run sp_to_one 1 checkpoint.dir="$tmp/ck_a" checkpoint.load="$tmp/ck_sp/iter_0000004.h5"
run sp_to_tp2 2 parallel.tp=2 checkpoint.dir="$tmp/ck_b" checkpoint.load="$tmp/ck_sp/iter_0000004.h5"
/usr/bin/python3 - "$tmp" $N <<'PY'
import json, sys
d, N = sys.argv[1], int(sys.argv[2])
def rows(name):
    return {r["iteration"]: (r["lm_loss"], r["mtp_loss"], r["aux_loss"], r["grad_norm"])
            for r in map(json.loads, open(f"{d}/{name}.jsonl")) if "lm_loss" in r}
ref = rows("one")
assert sorted(ref) == list(range(1, N + 1)), sorted(ref)
ok = True
for name, first in [("tp2_sp", 1), ("tp2_pp2_dp2_ep2_sp", 1), ("sp_to_one", N // 2 + 1), ("sp_to_tp2", N // 2 + 1)]:
    got = rows(name)
    good = sorted(got) == list(range(first, N + 1))
    its = range(first, N + 1)
    rel = lambda k: max(abs(got[it][k] - ref[it][k]) / abs(ref[it][k]) for it in its) if good else float("inf")
    worst, gn = max(rel(0), rel(1), rel(2)), rel(3)
    good &= worst < 1e-5
    print(f"{name}: iterations {min(got)}..{max(got)}, worst relative difference to 1 rank: losses {worst:.2e} "
          f"(< 1e-5 required), grad norm {gn:.2e}; lm {ref[first][0]:.4f} -> {ref[N][0]:.4f} {'ok' if good else 'FAIL'}")
    ok &= good
sys.exit(0 if ok else 1)
PY
