# Sourced by the MPI test scripts (BIN = build dir, SRC = source dir set first): a scratch folder $tmp (removed at
# exit unless KEEP names one), one OpenMP/BLAS thread per rank, mpirun as root, the shipped corpus tokenized into
# $tmp/corpus, and tiny_mpirun NP [overrides...]: input/tiny.deck (its 600-iteration schedule) on that corpus under
# mpirun with the overrides every such test shares (no validation, no HF export, warnings only).
set -euo pipefail
tmp=${KEEP:-$(mktemp -d)}; [ -n "${KEEP:-}" ] || trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
"$BIN/dsv3-preprocess" --input "$SRC/data/corpus.jsonl" --tokenizer "$SRC/data/tokenizer.json" \
  --output-prefix "$tmp/corpus" --append-eod > /dev/null
tiny_mpirun() {  # tiny_mpirun NP [overrides...]
  local np=$1; shift
  mpirun -np "$np" --oversubscribe "$BIN/dsv3" "$SRC/input/tiny.deck" optim.decay_iters=600 data.paths="$tmp/corpus" \
    data.cache_dir="$tmp" log.level=warning train.eval_interval=0 checkpoint.export_hf="" "$@"
}
