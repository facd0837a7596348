#!/usr/bin/env bash
# The planner against reality: `dsv3 --plan` on every shipped deck (the 671B recipe on 1024 ranks prints its exact
# counts and 16 stage rows; --json has params.* and stages[].memory_bytes), then short runs of input/tiny.deck under
# several layouts whose rank-0 peak memory (VmHWM minus the process before the model, from the metrics file) must
# be within 10% of the planned total of stage 0; the iteration log carries TFLOP/s and MFU.
#   tests/plan_memory.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BIN=$1 SRC=$2
tmp=${KEEP:-$(mktemp -d)}; [ -n "${KEEP:-}" ] || trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fail=0

# ---- the shipped decks plan ------------------------------------------------------------------------------------
want=$(/usr/bin/python3 -c "import json; print(json.load(open('$SRC/tests/data/deepseek-v3-counts.json'))['main'])")
"$BIN/dsv3" --plan "$SRC/input/pretrain.deck" --ranks 1024 > "$tmp/pretrain.txt"
grep -q "main model *$want" "$tmp/pretrain.txt" || { echo "FAIL: pretrain.deck: main-model count is not $want"; fail=1; }
rows=$(grep -cE '^ +[0-9]+  [Etm].* (yes|NO)$' "$tmp/pretrain.txt" || true)
[ "$rows" = 16 ] && echo "ok: pretrain.deck --ranks 1024: $want main parameters, 16 stage rows" \
  || { echo "FAIL: pretrain.deck: $rows stage rows, expected 16"; cat "$tmp/pretrain.txt"; fail=1; }
for deck in deepseek-paper single-node tiny bench-small; do
  if "$BIN/dsv3" --plan "$SRC/input/$deck.deck" --json > "$tmp/$deck.json"; then
    /usr/bin/python3 - "$tmp/$deck.json" "$deck" <<'PY' || fail=1
import json, sys
j = json.load(open(sys.argv[1]))
for k in ("main", "mtp", "activated"):
    assert j["params"][k] > 0, k
assert j["stages"] and all(s["memory_bytes"]["total"] > 0 for s in j["stages"])
print(f"ok: {sys.argv[2]}.deck plans: {len(j['stages'])} stage(s) on {j['parallel']['world']} rank(s), "
      f"main {j['params']['main']}, stage 0 {j['stages'][0]['memory_bytes']['total'] / 2**30:.2f} GiB, "
      f"{j['flops_per_token']['model'] / 1e9:.3f} GFLOP/token")
PY
  else
    echo "FAIL: dsv3 --plan input/$deck.deck"; fail=1
  fi
done

# ---- planned vs measured memory of the tiny deck ------------------------------------------------------------------
common=(train.iters=4 optim.decay_iters=600 data.paths=synthetic train.eval_interval=0 checkpoint.dir=
        checkpoint.load= checkpoint.export_hf= run.threads=1 log.level=info)
measure() {  # measure NAME NP STRICT [overrides...]
  local name=$1 np=$2 strict=$3; shift 3
  "$BIN/dsv3" --plan "$SRC/input/tiny.deck" --ranks "$np" --json "${common[@]}" "$@" > "$tmp/$name.plan.json"
  mpirun -np "$np" --oversubscribe "$BIN/dsv3" "$SRC/input/tiny.deck" "${common[@]}" log.metrics="$tmp/$name.jsonl" \
    "$@" > "$tmp/$name.log" 2>&1 || { echo "FAIL: $name: the run failed"; tail -5 "$tmp/$name.log"; fail=1; return; }
  grep -q "TFLOP/s/rank MFU" "$tmp/$name.log" || { echo "FAIL: $name: no TFLOP/s/MFU in the iteration log"; fail=1; }
  /usr/bin/python3 - "$tmp/$name" "$name" "$strict" <<'PY' || fail=1
import json, sys
base, name, strict = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
plan = json.load(open(base + ".plan.json"))["stages"][0]["memory_bytes"]["total"]
rec = [json.loads(l) for l in open(base + ".jsonl")][-1]
measured = rec["memory_peak_bytes"] - rec["memory_base_bytes"]
err = measured / plan - 1
ok = abs(err) <= 0.10
assert rec["mfu"] > 0 and rec["tflops_per_rank"] > 0
print(f"{'ok' if ok else ('FAIL' if strict else 'note')}: {name}: rank 0 planned {plan / 2**20:.1f} MiB, measured "
      f"{measured / 2**20:.1f} MiB ({err:+.1%}; peak RSS {rec['memory_peak_bytes'] / 2**20:.1f} MiB of which "
      f"{rec['memory_base_bytes'] / 2**20:.1f} MiB before the model), {rec['tflops_per_rank'] * 1e3:.1f} GFLOP/s, "
      f"MFU {rec['mfu']:.1%}")
sys.exit(0 if ok or not strict else 1)
PY
}
measure one_rank 1 1 train.global_batch=8     # 1 micro-batch of 8 x 128
measure one_rank_flash 1 1 train.global_batch=8 run.attention=flash  # the (B,H,S) log-sum-exp, no (B,H,S,S) probs
measure one_rank_selective 1 1 train.global_batch=8 train.recompute=selective   # norms, MLA up-projections, SwiGLU products rebuilt
measure one_rank_sel_flash 1 1 train.global_batch=8 train.recompute=selective run.attention=flash
measure dp2 2 1                               # the deck as `make run` runs it: 1 micro-batch per rank
measure ep2 2 1 parallel.ep=2                 # experts split: the all-to-all buffers
measure pp2 2 1 parallel.pp=2                 # stage 0 of 2 keeps both of its micro-batches (1F1B warmup)
measure tp2 2 1 parallel.tp=2                 # heads, columns, the vocabulary split; routed experts on 1/2 of the tokens
measure tp2_etp2 2 1 parallel.tp=2 parallel.etp=2   # every token through half of each expert
measure tp2_selective 2 1 parallel.tp=2 train.recompute=selective   # the dropped products are the 1/2 token slice's
# more micro-batches than pipeline stages: a micro-batch's activations are freed after its backward, so at most
# min(pp - stage, m) are alive (the 1F1B bound the planner uses), not m
measure one_rank_2mb 1 1                      # 2 micro-batches of 8 on 1 rank
measure pp2_4mb 2 1 parallel.pp=2 train.micro_batch=4   # stage 0 of 2, 4 micro-batches of 4: 2 in flight
exit $fail
