#!/usr/bin/env bash
# kill -9 at arbitrary moments of a run that checkpoints every iteration: afterwards `latest` always names a complete
# checkpoint (checksums verified by loading it) and no partial file is ever taken for one.
#   tests/checkpoint_kill.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
BIN=$1 SRC=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
args=("$SRC/input/tiny.deck" optim.decay_iters=600 data.paths=synthetic train.eval_interval=0 checkpoint.export_hf=""
      checkpoint.dir="$tmp/ck" checkpoint.interval=1 checkpoint.keep=3 log.level=error log.metrics="")
fail=0
for delay in 0.7 1.1 1.6 2.2 2.9 3.5; do
  "$BIN/dsv3" "${args[@]}" train.iters=100000 checkpoint.load=auto > /dev/null 2>&1 &
  pid=$!
  sleep "$delay"
  kill -9 $pid; wait $pid 2>/dev/null
  latest=$(cat "$tmp/ck/latest" 2>/dev/null || echo none)
  # resuming must find `latest` complete: one more iteration from it, and no fallback warning
  it=$(echo "$latest" | sed -nE 's/^iter_0*([0-9]+)\.h5$/\1/p'); it=${it:-0}
  out=$("$BIN/dsv3" "${args[@]}" train.iters=$((it + 1)) checkpoint.load=auto log.level=warning 2>&1); rc=$?
  if [ $rc -ne 0 ] || echo "$out" | grep -qi "corrupt\|falls back\|fall back"; then
    echo "FAIL: killed after ${delay}s, latest=$latest: resume rc=$rc"; echo "$out" | tail -5; fail=1
  else
    echo "ok: killed after ${delay}s; latest=$latest resumed cleanly ($(ls "$tmp/ck" | tr '\n' ' '))"
  fi
done
exit $fail
