#!/usr/bin/env bash
# DSV3_NO_MPI=1: one process that never calls MPI (a workstation or a GPU box without mpirun/orted). With no MPI
# runtime reachable (PATH without orted, so Open MPI's singleton start would fail), the tiny deck trains 4 iterations,
# writes HDF5 checkpoints through HDF5's default driver, resumes from `latest` and continues with the losses of an
# uninterrupted run; the golden forward check passes.
#   tests/no_mpi.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BIN=$1 SRC=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
export DSV3_NO_MPI=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
nompi() { env PATH=/nonexistent "$@"; }  # no orted reachable: any MPI start would fail
"$BIN/dsv3-preprocess" --input "$SRC/data/corpus.jsonl" --tokenizer "$SRC/data/tokenizer.json" \
  --output-prefix "$tmp/corpus" --append-eod > /dev/null 2>&1
run() {  # run NAME ITERS [overrides]
  local name=$1 iters=$2; shift 2
  nompi "$BIN/dsv3" "$SRC/input/tiny.deck" train.iters=$iters optim.decay_iters=600 data.paths="$tmp/corpus" \
    data.cache_dir="$tmp" log.metrics="$tmp/$name.jsonl" log.level=warning train.eval_interval=0 \
    checkpoint.export_hf="" "$@"
}
run full 4 checkpoint.dir="" checkpoint.load="" 2>/dev/null
run part 2 checkpoint.dir="$tmp/ckpt" checkpoint.interval=2 checkpoint.load=""
test -f "$tmp/ckpt/latest" && test -f "$tmp/ckpt/iter_0000002.h5"
run part 4 checkpoint.dir="$tmp/ckpt" checkpoint.interval=2 checkpoint.load=auto
nompi "$BIN/dsv3-golden" "$SRC/tests/golden/tiny" --checks forward | tail -1 | grep -q " 0 failed"
[ "$(grep -c '"lm_loss"' "$tmp/full.jsonl")" = 4 ] && [ "$(grep -c '"lm_loss"' "$tmp/part.jsonl")" = 4 ] ||
  { echo "no_mpi: expected 4 logged iterations in each run"; exit 1; }
while read -r a b; do  # the resumed iterations 3-4 against the uninterrupted run: bit-identical
  echo "  resumed $b, uninterrupted $a"
  [ "$a" = "$b" ] || { echo "no_mpi: resumed losses differ: $a vs $b"; exit 1; }
done < <(paste -d' ' <(grep -o '"lm_loss":[^,]*' "$tmp/full.jsonl" | tail -2) <(grep -o '"lm_loss":[^,]*' "$tmp/part.jsonl" | tail -2))
echo "no_mpi: trained, checkpointed, resumed (identical losses) and passed the golden forward check without MPI"
