#!/usr/bin/env bash
# The CPU training-step benchmark: dsv3 on input/bench-small.deck and the PyTorch reference implementation of the
# same step (validation/bench_torch.py, Debian's python3-torch), both on 2 threads, in the same run. Prints the
# median tokens/s after warm-up of each, the ratio, and dsv3's peak RSS.
#   validation/bench_small.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2
rm -f runs/bench-small/metrics.jsonl
"$BUILD/dsv3" input/bench-small.deck log.level=warning
ours=$(/usr/bin/python3 - <<'PY'
import json, statistics
recs = [json.loads(l) for l in open("runs/bench-small/metrics.jsonl") if '"tokens_per_s"' in l]
timed = [r["tokens_per_s"] for r in recs[2:]]
print(f'{statistics.median(timed):.1f} {recs[-1]["memory_peak_bytes"] / 2**20:.0f}')
PY
)
read -r ours_tps ours_rss <<<"$ours"
if /usr/bin/python3 -c "import torch" 2>/dev/null; then
  torch_json=$(/usr/bin/python3 validation/bench_torch.py input/models/small.json --batch 4 --seq 256 --threads 2 \
               --warmup 2 --steps 5 | tail -1)
  torch_tps=$(/usr/bin/python3 -c "import json,sys; print(f'{json.loads(sys.argv[1])[\"tokens_per_s\"]:.1f}')" "$torch_json")
  ratio=$(/usr/bin/python3 -c "print(f'{$ours_tps/$torch_tps:.2f}')")
else
  torch_tps="n/a (apt-get install python3-torch)"; ratio="n/a"
fi
echo "bench-small: dsv3 ${ours_tps} tokens/s (peak RSS ${ours_rss} MiB) | PyTorch eager ${torch_tps} tokens/s | ratio ${ratio}x"
