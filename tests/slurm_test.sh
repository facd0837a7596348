#!/usr/bin/env bash
# The Slurm scripts on a real (single-node, local) Slurm: scripts/slurm/local-cluster.sh brings one up in a temp
# folder, and
#   1. ci:       `sbatch --wait scripts/slurm/ci.sbatch` (4 ranks, ep2, 10 iterations, synthetic data) exits 0,
#                its output logs iterations 1..10, the metrics file has 10 records (iterations 1..10), and the
#                final checkpoint iter_0000010.h5 is `latest`
#   2. preempt:  a longer ci job gets `scancel --signal=USR1` (then another one SIGTERM) mid-run: dsv3 stops after
#                the current iteration N, saves iter_N.h5, exits 0; the metrics file has N records
#   3. requeue:  scripts/slurm/pretrain.sbatch itself (resized to 1 node x 4 tasks, no GPUs, the tiny deck) gets
#                USR1 mid-run: it requeues itself (`scontrol requeue`), the second attempt resumes from the checkpoint
#                and completes: job COMPLETED with Restarts=1 and metrics for iterations 1..12, each once
#   4. convert:  scripts/slurm/convert.sbatch hftoh5 (tests/golden/tiny) then h5tohf back, 4 ranks, --max-memory 1MiB
#   tests/slurm_test.sh BUILD_DIR SOURCE_DIR        (KEEP=DIR keeps everything there)
# Skips (exit 77) when the Slurm or munge daemons are not installed.
set -euo pipefail
BIN=$(cd "$1" && pwd) SRC=$(cd "$2" && pwd)
for p in munged slurmctld slurmd sbatch; do
  command -v "$p" > /dev/null || [ -x "/usr/sbin/$p" ] || { echo "slurm_test: $p not installed: skipped"; exit 77; }
done
tmp=${KEEP:-$(mktemp -d)}
mkdir -p "$tmp"
CLUSTER=$SRC/scripts/slurm/local-cluster.sh
cleanup() {
  local rc=$?
  "$CLUSTER" down "$tmp/cluster" || rc=1
  [ -n "${KEEP:-}" ] || rm -rf "$tmp"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
T0=$SECONDS
step() { echo "slurm_test: [$((SECONDS - T0)) s] $*"; }
fail() { echo "slurm_test: FAIL: $*" >&2; for f in "$tmp"/*.out; do [ -f "$f" ] && { echo "---- $f"; tail -n 30 "$f"; }; done >&2; exit 1; }

"$CLUSTER" up "$tmp/cluster"
eval "$("$CLUSTER" env "$tmp/cluster")"
step "cluster up"

# the jobs inherit this environment (sbatch --export=ALL, the default)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
export DSV3_BUILD=$BIN DSV3_SRC=$SRC
cd "$tmp"   # sbatch's submit dir: pretrain.sbatch makes logs/ there

records() { grep -c '"lm_loss"' "$1" 2> /dev/null || true; }
iterations() {  # the iteration numbers of the training records, one line
  python3 -c 'import json,sys; print(" ".join(str(r["iteration"]) for r in map(json.loads, open(sys.argv[1])) if "lm_loss" in r))' "$1"
}
job_field() { scontrol show job "$1" 2> /dev/null | grep -o "$2=[^ ]*" | head -n 1 | cut -d= -f2; }
wait_job() {  # wait_job JOBID TIMEOUT: until the job is done; echoes its final state
  local t0=$SECONDS st
  while :; do
    st=$(job_field "$1" JobState)
    case $st in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED)
      echo "$st"; return 0 ;; esac
    (( SECONDS - t0 < $2 )) || { echo "TIMEOUT_WAITING($st)"; return 0; }
    sleep 0.2
  done
}
wait_records() {  # wait_records FILE N TIMEOUT
  local t0=$SECONDS
  until [ "$(records "$1")" -ge "$2" ] 2> /dev/null; do
    (( SECONDS - t0 < $3 )) || fail "no $2 metrics records in $1 after $3 s"
    sleep 0.1
  done
}

# ---- 1. the CI job ------------------------------------------------------------------------------------------------
rc=0
DSV3_CI_DIR=$tmp/ci sbatch --wait --output="$tmp/ci.out" "$SRC/scripts/slurm/ci.sbatch" > /dev/null || rc=$?
[ $rc = 0 ] || fail "ci: sbatch --wait exit code $rc"
for i in $(seq 10); do grep -q "iter $i/10 " "$tmp/ci.out" || fail "ci: no 'iter $i/10' in the job output"; done
grep -q "ci: OK (10 iterations)" "$tmp/ci.out" || fail "ci: no 'ci: OK' in the job output"
[ "$(iterations "$tmp/ci/metrics.jsonl")" = "$(seq -s ' ' 1 10)" ] || fail "ci: metrics iterations: $(iterations "$tmp/ci/metrics.jsonl")"
[ -f "$tmp/ci/ckpt/iter_0000010.h5" ] && [ "$(cat "$tmp/ci/ckpt/latest")" = iter_0000010.h5 ] ||
  fail "ci: no final checkpoint iter_0000010.h5 as latest: $(ls "$tmp/ci/ckpt" 2>&1)"
step "ci job: 10 iterations, 10 metrics records, checkpoint: OK"

# ---- 2. preemption: USR1 (the time-limit warning) and TERM (preemption) --------------------------------------------
for sig in USR1 TERM; do
  dir=$tmp/pre_$sig
  jid=$(DSV3_CI_DIR=$dir DSV3_CI_ITERS=1000 sbatch --parsable --output="$tmp/pre_$sig.out" "$SRC/scripts/slurm/ci.sbatch")
  wait_records "$dir/metrics.jsonl" 3 60   # past start-up: dsv3's handler is installed
  scancel --signal="$sig" "$jid"
  st=$(wait_job "$jid" 60)
  ec=$(job_field "$jid" ExitCode)
  [ "$st" = COMPLETED ] && [ "$ec" = 0:0 ] || fail "$sig: job state $st, exit code $ec (expected COMPLETED, 0:0)"
  n=$(sed -n "s/.*stopping after iteration \([0-9]*\) (SIG$sig).*/\1/p" "$tmp/pre_$sig.out")
  [ -n "$n" ] || fail "$sig: no 'stopping after iteration N (SIG$sig)' in the job output"
  [ "$n" -ge 3 ] && [ "$n" -lt 1000 ] || fail "$sig: stopped at iteration $n"
  ck=$(printf 'iter_%07d.h5' "$n")
  [ -f "$dir/ckpt/$ck" ] && [ "$(cat "$dir/ckpt/latest")" = "$ck" ] || fail "$sig: no checkpoint $ck as latest: $(ls "$dir/ckpt" 2>&1)"
  [ "$(records "$dir/metrics.jsonl")" = "$n" ] || fail "$sig: $(records "$dir/metrics.jsonl") metrics records, expected $n"
  step "scancel --signal=$sig: stopped after iteration $n, $ck saved, exit code 0: OK"
done

# ---- 3. pretrain.sbatch requeues itself after a stop, and the next attempt resumes ------------------------------
jid=$(DSV3=$BIN/dsv3 DSV3_DECK=$SRC/input/tiny.deck OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp \
  sbatch --parsable --nodes=1 --ntasks-per-node=4 --cpus-per-task=1 --gpus-per-node=0 --time=00:10:00 \
  --output="$tmp/pretrain.out" "$SRC/scripts/slurm/pretrain.sbatch" \
  train.iters=12 parallel.ep=2 optim.warmup_iters=2 data.paths=synthetic train.seq_length=32 train.global_batch=8 \
  train.micro_batch=2 train.eval_interval=0 log.metrics="$tmp/pretrain/metrics.jsonl" log.interval=1 \
  checkpoint.dir="$tmp/pretrain/ckpt" checkpoint.export_hf= checkpoint.load=auto)
wait_records "$tmp/pretrain/metrics.jsonl" 3 60
scancel --signal=USR1 "$jid"   # what --signal=USR1@300 does before the time limit
st=$(wait_job "$jid" 90)
[ "$st" = COMPLETED ] || fail "pretrain: job state $st (expected COMPLETED after one requeue)"
[ "$(job_field "$jid" Restarts)" = 1 ] || fail "pretrain: Restarts=$(job_field "$jid" Restarts), expected 1"
n=$(sed -n 's/.*stopped at iteration \([0-9]*\) (checkpoint saved): requeueing.*/\1/p' "$tmp/pretrain.out")
[ -n "$n" ] || fail "pretrain: no 'requeueing' in the job output"
grep -q "pretrain: training complete" "$tmp/pretrain.out" || fail "pretrain: the second attempt did not complete"
[ "$(iterations "$tmp/pretrain/metrics.jsonl")" = "$(seq -s ' ' 1 12)" ] ||
  fail "pretrain: metrics iterations: $(iterations "$tmp/pretrain/metrics.jsonl") (expected 1..12 once each)"
step "pretrain.sbatch: stopped at $n, requeued itself, resumed, completed 12 iterations: OK"
# ---- 4. convert.sbatch: HF -> HDF5 -> HF on 4 ranks (the golden tiny model) ---------------------------------------
for conv in "hftoh5 $SRC/tests/golden/tiny $tmp/conv_ckpt" "h5tohf $tmp/conv_ckpt $tmp/conv_hf --dtype fp32"; do
  name=${conv%% *}
  # shellcheck disable=SC2086
  jid=$(sbatch --parsable --nodes=1 --ntasks-per-node=4 --mem=0 --time=00:05:00 --output="$tmp/$name.out" \
    "$SRC/scripts/slurm/convert.sbatch" $conv --max-memory 1MiB)
  st=$(wait_job "$jid" 60)
  [ "$st" = COMPLETED ] || fail "convert $name: job state $st"
  grep -q "convert: exit code 0" "$tmp/$name.out" || fail "convert $name: no 'exit code 0' in the output"
done
[ -f "$tmp/conv_ckpt/latest" ] && [ -f "$tmp/conv_hf/config.json" ] && ls "$tmp"/conv_hf/*.safetensors > /dev/null ||
  fail "convert: missing outputs: $(ls "$tmp/conv_ckpt" "$tmp/conv_hf" 2>&1)"
step "convert.sbatch: hftoh5 and h5tohf on 4 ranks: OK"
echo "slurm_test: all passed in $((SECONDS - T0)) s"
