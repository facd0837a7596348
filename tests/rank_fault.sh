#!/usr/bin/env bash
# Rank faults: kill -9 one rank of a 4-rank run mid-training; every rank must be gone within 30 s and the job must
# end with a non-zero status (no rank left blocked in a collective).
#   tests/rank_fault.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
BIN=$1 SRC=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tag="rankfault$$"
mpirun -np 4 --oversubscribe "$BIN/dsv3" "$SRC/input/tiny.deck" train.iters=100000 optim.decay_iters=200000 \
  data.paths=synthetic train.eval_interval=0 checkpoint.dir="" checkpoint.load="" checkpoint.export_hf="" \
  parallel.ep=2 log.level=warning log.metrics="$tmp/m.jsonl" run.name="$tag" > "$tmp/out" 2>&1 &
job=$!
for _ in $(seq 1 600); do
  [ -f "$tmp/m.jsonl" ] && [ "$(grep -c lm_loss "$tmp/m.jsonl")" -ge 3 ] && break
  sleep 0.1
done
victim=$(pgrep -f "run.name=$tag" | while read -r p; do [ "$(cat /proc/$p/comm)" = dsv3 ] && echo "$p"; done | sed -n 3p)
[ -n "$victim" ] || { echo "FAIL: no rank process found"; kill $job; exit 1; }
t0=$(date +%s.%N)
kill -9 "$victim"
rc=0; timeout 60 tail --pid=$job -f /dev/null || true
wait $job; rc=$?
t1=$(date +%s.%N)
left=$(pgrep -f "run.name=$tag" | wc -l)
secs=$(/usr/bin/python3 -c "print(f'{$t1 - $t0:.1f}')")
echo "killed rank pid $victim: job ended in $secs s with status $rc, $left process(es) left"
/usr/bin/python3 -c "import sys; sys.exit(0 if $t1 - $t0 < 30 and $rc != 0 and $left == 0 else 1)"
