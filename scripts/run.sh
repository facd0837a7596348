#!/usr/bin/env bash
# The main job of `make run`, end to end on the shipped corpus:
#   golden check -> tokenize the corpus -> train the tiny DeepSeek-V3 (input/tiny.deck) -> validation loss vs the
#   corpus' unigram entropy -> HF export -> text generation from the trained model.
set -euo pipefail
BUILD=${1:-build}
cd "$(dirname "$0")/.."
# one MPI rank per core, one thread per rank (on a shared 2-core machine this is also the fastest: no OpenMP
# barrier spinning against other processes); NP ranks train data parallel with the experts split NP ways
NP=${NP:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PY=/usr/bin/python3

echo "== 1/6 the tiny model against the golden reference (forward, gradients, 3 AdamW steps, generation, FP8)"
"$BUILD/dsv3-golden" tests/golden/tiny | tail -1

echo "== 2/6 tokenize data/corpus.jsonl (Shakespeare, public domain) with data/tokenizer.json"
mkdir -p runs/data
"$BUILD/dsv3-preprocess" --input data/corpus.jsonl --tokenizer data/tokenizer.json --output-prefix runs/data/corpus \
  --append-eod | tail -1
unigram=$($PY validation/unigram_entropy.py runs/data/corpus)
echo "unigram entropy of the corpus: $unigram nats/token"

echo "== 3/6 train the tiny DeepSeek-V3 on it (input/tiny.deck) on $NP MPI ranks: data parallel, experts split $NP ways"
rm -rf runs/tiny
mpirun --oversubscribe -np "$NP" "$BUILD/dsv3" input/tiny.deck parallel.ep="$NP" 2>&1 | grep -v "# from" \
  | grep -E "info: (iter|valid|data|model|layout|done|export)|warn|error"

echo "== 4/6 validation loss against the unigram entropy"
$PY - "$unigram" <<'PY'
import json, sys
unigram = float(sys.argv[1])
valid = [json.loads(l) for l in open("runs/tiny/metrics.jsonl") if "valid_lm_loss" in l]
first, last = valid[0]["valid_lm_loss"], valid[-1]["valid_lm_loss"]
print(f"validation lm loss: {first:.3f} (iteration {valid[0]['iteration']}) -> {last:.3f} (iteration "
      f"{valid[-1]['iteration']}); unigram entropy {unigram:.3f}; margin {unigram - last:.3f} nats")
sys.exit(0 if last < unigram - 0.5 else "the validation loss did not drop clearly below the unigram entropy")
PY

echo "== 5/6 generate from the trained model (exported to runs/tiny/hf)"
"$BUILD/dsv3-generate" --hf runs/tiny/hf --tokenizer data/tokenizer.json --prompt "HAMLET. To be, or not to be" \
  --max-new-tokens 60 --temperature 0.8 --top-p 0.9 --seed 1 2>/dev/null | sed -n "/^text:/,\$p"

echo "== 6/6 the loss curves, learning rate, gradient norm and expert-load imbalance as a picture"
$PY validation/plot_metrics.py runs/tiny/metrics.jsonl
