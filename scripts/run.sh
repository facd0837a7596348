#!/usr/bin/env bash
# The main job of `make run`: what dsv3 can do today, end to end, on the tiny DeepSeek-V3 model.
set -euo pipefail
BUILD=${1:-build}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
echo "== 1. the tiny model against the golden reference (forward, generation, FP8)"
"$BUILD/dsv3-golden" tests/golden/tiny --checks forward,generate,fp8
echo "== 2. the driver on input/tiny.deck (the full 671B config reports its size the same way)"
"$BUILD/dsv3" input/tiny.deck
echo "== 3. greedy generation with the MLA latent KV cache"
"$BUILD/dsv3-generate" --hf tests/golden/tiny --prompt-ids 1,2,3,4,5 --max-new-tokens 16
