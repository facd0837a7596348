#!/usr/bin/env bash
# The whole model on the CUDA backend (make_backend("cuda"): the CUDA ops on the model's host tensors), checked at
# model level against the golden data and against the CPU backend:
#   1. FP32: tests/golden/tiny and tests/golden/alt, every check (forward, grads, train, generate, fp8), with the
#      golden tolerances (the same as the CPU backend's)
#      and tiny again with run.attention=flash (the flash kernels instead of attention.cu's probs path)
#   2. BF16 matmul mode (run.matmul_dtype=bf16), tiny and alt, against the FP32 golden with the stated BF16 criteria
#      of validation/golden.cpp (per-token median relative error of hidden states and logits <= 5e-2; forward and
#      first-step losses within 1e-3 relative; the rest reported); BF16 flash attention (run.attention_dtype=bf16,
#      the tensor-core kernels) with FP32 GEMMs under the same criteria
#   3. training: 10 iterations of input/tiny.deck on the shipped corpus, cpu and cuda: per-iteration lm/mtp/aux
#      losses within 1e-5 relative (the bound of tests/mpi_equivalence.sh across layouts)
#   tests/gpu/cuda_model.sh BIN_DIR SOURCE_DIR      (exit 77: no usable CUDA device)
set -uo pipefail
BIN=$1 SRC=$2
tmp=${KEEP:-$(mktemp -d)}; [ -n "${KEEP:-}" ] || trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
probe=$("$BIN/dsv3-golden" "$SRC/tests/golden/tiny" --checks fp8 run.device=cuda 2>&1)
if grep -q "no CUDA device is usable" <<<"$probe"; then
  echo "SKIPPED: $(grep -o 'no CUDA device is usable.*' <<<"$probe")"
  exit 77
fi
fail=0
step() {  # step NAME command...: the summary line, or the failures
  local name=$1; shift
  local t0=$(date +%s)
  if "$@" >"$tmp/out" 2>&1; then
    echo "PASS $name: $(tail -1 "$tmp/out") ($(( $(date +%s) - t0 )) s)"
  else
    echo "FAIL $name ($(( $(date +%s) - t0 )) s):"; grep -E "FAIL|error" "$tmp/out" | head -20; tail -2 "$tmp/out"; fail=1
  fi
}
G="$BIN/dsv3-golden"
step "fp32 tiny vs golden" "$G" "$SRC/tests/golden/tiny" run.device=cuda
step "fp32 alt vs golden" "$G" "$SRC/tests/golden/alt" run.device=cuda
# flash-form attention (cuda/flash_attention.cu) at model level: the same golden checks and tolerances
step "fp32 tiny flash attention vs golden" "$G" "$SRC/tests/golden/tiny" run.device=cuda run.attention=flash
# BF16 matmul mode against the FP32 golden: the losses and the per-token median errors (validation/golden.cpp)
step "bf16 tiny vs golden" "$G" "$SRC/tests/golden/tiny" run.device=cuda run.matmul_dtype=bf16
step "bf16 alt vs golden" "$G" "$SRC/tests/golden/alt" run.device=cuda run.matmul_dtype=bf16
# BF16 flash attention (the tensor-core kernels) with FP32 GEMMs: the same BF16 criteria
step "bf16-attention tiny vs golden" "$G" "$SRC/tests/golden/tiny" run.device=cuda run.attention=flash \
  run.attention_dtype=bf16
step "bf16-attention alt vs golden" "$G" "$SRC/tests/golden/alt" run.device=cuda run.attention=flash \
  run.attention_dtype=bf16 train.micro_batch=3

"$BIN/dsv3-preprocess" --input "$SRC/data/corpus.jsonl" --tokenizer "$SRC/data/tokenizer.json" \
  --output-prefix "$tmp/corpus" --append-eod >/dev/null 2>&1 || { echo "FAIL: preprocess"; exit 1; }
train() {  # train NAME overrides...
  local name=$1; shift
  "$BIN/dsv3" "$SRC/input/tiny.deck" train.iters=10 optim.decay_iters=600 data.paths="$tmp/corpus" \
    data.cache_dir="$tmp" log.metrics="$tmp/$name.jsonl" log.level=warning train.eval_interval=0 \
    checkpoint.export_hf="" checkpoint.dir="" checkpoint.load="" "$@" >"$tmp/$name.log" 2>&1
}
t0=$(date +%s)
if train cpu run.device=cpu && train cuda run.device=cuda; then
  python3 - "$tmp" <<'PY' || fail=1
import json, sys
d = sys.argv[1]
def losses(name):
    return [(r["lm_loss"], r["mtp_loss"], r["aux_loss"]) for r in map(json.loads, open(f"{d}/{name}.jsonl")) if "lm_loss" in r]
ref, got = losses("cpu"), losses("cuda")
worst = max(abs(a - b) / abs(b) for g, r in zip(got, ref) for a, b in zip(g, r))
ok = len(ref) == len(got) == 10 and worst < 1e-5
print(f"{'PASS' if ok else 'FAIL'} train tiny.deck 10 iterations cuda vs cpu: worst relative loss difference {worst:.2e} "
      f"(lm {ref[0][0]:.5f} -> {ref[-1][0]:.5f} cpu, {got[-1][0]:.5f} cuda)")
sys.exit(0 if ok else 1)
PY
  echo "     ($(( $(date +%s) - t0 )) s)"
else
  echo "FAIL: training run"; tail -3 "$tmp"/cpu.log "$tmp"/cuda.log; fail=1
fi
exit $fail
