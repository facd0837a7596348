#!/usr/bin/env bash
# The programs' error paths: a deck typo, a bad value, an inconsistent model config, a truncated safetensors file,
# a missing file. Each must exit non-zero with ONE line on stderr naming what is wrong.
set -u
BIN=$1 TESTS=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
expect_error() {  # expect_error "what" "needle" cmd...
  local what=$1 needle=$2; shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"; local rc=$?
  local lines; lines=$(grep -c . "$tmp/err")
  if [ $rc -eq 0 ] || ! grep -qF -- "$needle" "$tmp/err" || [ "$lines" -ne 1 ]; then
    echo "FAIL: $what (rc=$rc, $lines stderr lines, wanted '$needle'):"; cat "$tmp/err"; fail=1
  else
    echo "ok: $what: $(cat "$tmp/err")"
  fi
}
# under mpirun: exactly one line from dsv3 (mpirun adds its own banner about the exit code)
expect_mpi_error() {
  local what=$1 needle=$2; shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"; local rc=$?
  local lines; lines=$(grep -c "^dsv3" "$tmp/err")
  if [ $rc -eq 0 ] || ! grep -qF -- "$needle" "$tmp/err" || [ "$lines" -ne 1 ]; then
    echo "FAIL: $what (rc=$rc, $lines dsv3 lines, wanted '$needle'):"; cat "$tmp/err"; fail=1
  else
    echo "ok: $what: $(grep "^dsv3" "$tmp/err")"
  fi
}
cp "$TESTS/golden/tiny/config.json" "$tmp/config.json"
cat > "$tmp/good.deck" <<DECK
[model]
hf_config = config.json
[train]
iters = 1
seq_length = 16
global_batch = 1
DECK
printf '[model]\nhf_config = config.json\n[train]\niter = 1\nseq_length = 16\nglobal_batch = 1\n' > "$tmp/typo.deck"
expect_error "deck typo" "train.iter" "$BIN/dsv3" "$tmp/typo.deck"
expect_error "deck typo suggests" "train.iters" "$BIN/dsv3" "$tmp/typo.deck"
expect_error "deck typo names file:line" "typo.deck:4" "$BIN/dsv3" "$tmp/typo.deck"
expect_error "bad value" "train.iters" "$BIN/dsv3" "$tmp/good.deck" train.iters=ten
expect_error "missing deck" "nope.deck" "$BIN/dsv3" "$tmp/nope.deck"
expect_error "inconsistent config" "n_group" "$BIN/dsv3" "$tmp/good.deck" model.n_group=3
printf '[model]\nhf_config = config.json\n[train]\niters = 1\nglobal_batch = 1\n' > "$tmp/noseq.deck"
expect_error "missing required key" "train.seq_length" "$BIN/dsv3" "$tmp/noseq.deck"
expect_error "unknown override" "parallel.tpp" "$BIN/dsv3" "$tmp/good.deck" parallel.tpp=2
expect_error "bf16 attention needs the flash form" "run.attention = flash" "$BIN/dsv3" "$tmp/good.deck" run.attention_dtype=bf16
# run.device = cuda on a node without a usable GPU (CI, this machine) or from a build without CUDA: the backend is made
# right after the deck and topology, before the model, so the run stops there, naming the reason
if nvidia-smi -L >/dev/null 2>&1; then
  echo "skip: run.device=cuda without a GPU (this node has one: nvidia-smi -L)"
else
  expect_error "run.device=cuda without a GPU" "run.device = cuda, but" "$BIN/dsv3" "$tmp/good.deck" run.device=cuda
fi
mkdir -p "$tmp/trunc"
cp "$TESTS/golden/tiny/config.json" "$tmp/trunc/"
head -c 100000 "$TESTS/golden/tiny/model.safetensors" > "$tmp/trunc/model.safetensors"
expect_error "truncated safetensors" "model.safetensors" "$BIN/dsv3-generate" --hf "$tmp/trunc" --prompt-ids 1,2
expect_error "bad prompt ids" "prompt-ids" "$BIN/dsv3-generate" --hf "$TESTS/golden/tiny" --prompt-ids 1,x
expect_error "golden dir missing" "config.json" "$BIN/dsv3-golden" "$tmp/none"
expect_error "golden with node-limited routing" "moe.max_nodes" "$BIN/dsv3-golden" "$TESTS/golden/tiny" moe.max_nodes=2
"$BIN/dsv3" --help | grep -q "train.iters" || { echo "FAIL: dsv3 --help lacks train.iters"; fail=1; }
"$BIN/dsv3-generate" --help | grep -q -- "--max-new-tokens" || { echo "FAIL: dsv3-generate --help"; fail=1; }
# NaN/Inf: train.on_nan = skip skips the step and goes on; stop saves the last good state and exits non-zero
nan_run() { "$BIN/dsv3" "$tmp/good.deck" train.iters=5 data.paths=synthetic train.global_batch=2 \
  debug.inject_nan_at=3 log.metrics="$tmp/nan.jsonl" "$@"; }
if nan_run train.on_nan=skip > "$tmp/out" 2>&1 && grep -q "iteration 3: NaN/Inf" "$tmp/out" \
   && grep -q '"skipped":true' "$tmp/nan.jsonl" && grep -q '"iteration":5' "$tmp/nan.jsonl"; then
  echo "ok: on_nan=skip skips iteration 3 and finishes"
else echo "FAIL: on_nan=skip"; cat "$tmp/out"; fail=1; fi
expect_error "on_nan=stop" "stopped at iteration 3" nan_run train.on_nan=stop checkpoint.dir="$tmp/ck" log.level=error
[ -f "$tmp/ck/iter_0000002.h5" ] && echo "ok: on_nan=stop saved iteration 2" \
  || { echo "FAIL: on_nan=stop left no checkpoint of iteration 2"; ls "$tmp/ck" 2>&1; fail=1; }
# layouts that do not fit stop at start, naming the constraint
expect_mpi_error "ep not dividing the experts" "n_routed_experts" mpirun --oversubscribe -np 3 "$BIN/dsv3" "$tmp/good.deck" \
  parallel.ep=3
expect_error "node-limited routing over a bad node count" "moe.nodes" "$BIN/dsv3" "$tmp/good.deck" moe.max_nodes=1 \
  moe.nodes=3
expect_error "node limit too tight for top-k" "num_experts_per_tok" "$BIN/dsv3" "$tmp/good.deck" moe.max_nodes=1 \
  moe.nodes=8 model.n_group=1 model.topk_group=1
expect_mpi_error "etp other than 1 or tp" "parallel.etp" mpirun --oversubscribe -np 2 "$BIN/dsv3" "$tmp/good.deck" \
  parallel.etp=2
expect_mpi_error "pp larger than the layers" "parallel.pp" mpirun --oversubscribe -np 8 "$BIN/dsv3" "$tmp/good.deck" parallel.pp=8
expect_mpi_error "dp disagreeing with the world" "parallel.dp" mpirun --oversubscribe -np 2 "$BIN/dsv3" "$tmp/good.deck" \
  parallel.dp=4

# inference on a converted checkpoint (dsv3-hftoh5) gives the same tokens as on the HF directory
"$BIN/dsv3-hftoh5" "$TESTS/golden/tiny" "$tmp/conv" --no-progress > /dev/null 2>&1
a=$("$BIN/dsv3-generate" --hf "$TESTS/golden/tiny" --prompt-ids 1,2,3,4,5 --max-new-tokens 8 2>/dev/null | grep generated)
b=$("$BIN/dsv3-generate" --ckpt "$tmp/conv" --prompt-ids 1,2,3,4,5 --max-new-tokens 8 2>/dev/null | grep generated)
[ -n "$a" ] && [ "$a" = "$b" ] && echo "ok: generate --ckpt = --hf ($b)" || { echo "FAIL: --ckpt '$b' vs --hf '$a'"; fail=1; }

# the planner reports the real model's exact size (the public count, tests/data/deepseek-v3-counts.json)
want=$(/usr/bin/python3 -c "import json; print(json.load(open('$TESTS/data/deepseek-v3-counts.json'))['main'])")
"$BIN/dsv3" --plan "$TESTS/../input/pretrain.deck" | grep -q "main model *$want" \
  || { echo "FAIL: dsv3 --plan input/pretrain.deck does not report $want main-model parameters"; fail=1; }
exit $fail
