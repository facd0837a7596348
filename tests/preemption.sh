#!/usr/bin/env bash
# Preemption: SIGUSR1 (Slurm's --signal) during a run makes every rank stop after the current iteration, save a
# checkpoint and exit 0; the next start (checkpoint.load = auto) continues with the identical loss sequence. The same
# for run.time_limit. (SIGTERM: tests/slurm_test.sh, under a real Slurm.)
#   tests/preemption.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BIN=$1 SRC=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cfg() { echo "$SRC/input/tiny.deck" train.iters=24 optim.decay_iters=600 data.paths=synthetic train.eval_interval=0 \
  checkpoint.export_hf="" checkpoint.interval=0 log.level=warning parallel.ep=2 "$@"; }
mpirun -np 2 --oversubscribe "$BIN/dsv3" $(cfg checkpoint.dir="$tmp/a" log.metrics="$tmp/a.jsonl") > /dev/null
mpirun -np 2 --oversubscribe "$BIN/dsv3" $(cfg checkpoint.dir="$tmp/b" log.metrics="$tmp/b.jsonl") > "$tmp/b1.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do  # wait for 6 iterations, then signal mpirun (it forwards SIGUSR1 to the ranks)
  [ -f "$tmp/b.jsonl" ] && [ "$(grep -c lm_loss "$tmp/b.jsonl")" -ge 6 ] && break
  sleep 0.1
done
kill -USR1 $pid
rc=0; wait $pid || rc=$?
[ $rc -eq 0 ] || { echo "FAIL: the signalled run exited $rc"; cat "$tmp/b1.log"; exit 1; }
grep -q "stopping after iteration" "$tmp/b1.log" || { echo "FAIL: no stop message"; cat "$tmp/b1.log"; exit 1; }
stopped=$(grep -c lm_loss "$tmp/b.jsonl")
echo "signalled run stopped after iteration $stopped of 24 with exit 0; latest = $(cat "$tmp/b/latest")"
mpirun -np 2 --oversubscribe "$BIN/dsv3" $(cfg checkpoint.dir="$tmp/b" log.metrics="$tmp/b.jsonl") > /dev/null
# run.time_limit (seconds from the program's start): the run stops once the next iteration would not fit (here half a
# second: after one of the first iterations, before the 24th on any machine), saves and exits 0; the resumed run
# without a limit continues the same sequence
rc=0
mpirun -np 2 --oversubscribe "$BIN/dsv3" $(cfg checkpoint.dir="$tmp/c" log.metrics="$tmp/c.jsonl" run.time_limit=0.5) \
  > "$tmp/c1.log" 2>&1 || rc=$?
[ $rc -eq 0 ] || { echo "FAIL: the time-limited run exited $rc"; cat "$tmp/c1.log"; exit 1; }
grep -q "stopping after iteration .* (run.time_limit)" "$tmp/c1.log" || {
  echo "FAIL: no time-limit stop message"; cat "$tmp/c1.log"; exit 1; }
echo "time-limited run stopped after iteration $(grep -c lm_loss "$tmp/c.jsonl") of 24 with exit 0"
mpirun -np 2 --oversubscribe "$BIN/dsv3" $(cfg checkpoint.dir="$tmp/c" log.metrics="$tmp/c.jsonl") > /dev/null
/usr/bin/python3 - "$tmp" <<'PY'
import json, sys
d = sys.argv[1]
def seq(n): return [(r["iteration"], r["lm_loss"], r["mtp_loss"], r["aux_loss"]) for r in map(json.loads, open(f"{d}/{n}.jsonl")) if "lm_loss" in r]
a, b, c = seq("a"), seq("b"), seq("c")
print(f"uninterrupted {len(a)} iterations, interrupted + resumed {len(b)}; identical: {a == b}")
print(f"time-limited + resumed {len(c)}; identical: {a == c}")
sys.exit(0 if a == b and a == c and len(a) == 24 else 1)
PY
