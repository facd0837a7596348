#!/usr/bin/env bash
# A full file system during a checkpoint save: the tiny deck saves at iterations 2 and 4 into a tmpfs that holds one
# checkpoint and a half. The second save must fail with one error line naming the file and "No space left on
# device", exit 1 (the policy for a failed save: the run stops; nothing is lost but the iterations since the last
# checkpoint), delete its partial .tmp file, and leave `latest` naming the complete first checkpoint, which must
# resume (checksums verified) to the same losses as an uninterrupted run. `latest` is watched during the run: it
# never names anything else. Once on 1 rank, once on 2 (a collective write may fail on one rank only).
# Needs root (mount -t tmpfs); exits 77 (skipped) where mounting is not permitted.
#   tests/checkpoint_disk_full.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
BIN=$1 SRC=$2
tmp=$(mktemp -d)
mnt="$tmp/mnt"
watcher=
unmount() {  # processes killed by a timeout may hold the mount a moment longer; lazily detach as a last resort
  for _ in $(seq 1 20); do
    mountpoint -q "$mnt" 2>/dev/null || return 0
    umount "$mnt" 2>/dev/null && return 0
    sleep 0.5
  done
  umount -l "$mnt"
}
cleanup() {
  [ -n "$watcher" ] && kill "$watcher" 2>/dev/null
  unmount
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
args=("$SRC/input/tiny.deck" train.iters=4 optim.decay_iters=600 data.paths=synthetic train.eval_interval=0
      checkpoint.export_hf="" checkpoint.interval=2 checkpoint.keep=2 log.level=warning)
mkdir -p "$mnt"
mount -t tmpfs -o size=1M tmpfs "$mnt" 2>"$tmp/mount.err" || {
  echo "SKIP: cannot mount a tmpfs here ($(head -1 "$tmp/mount.err")); needs root or CAP_SYS_ADMIN"; exit 77; }
unmount


losses() {  # iteration, lm, mtp and aux loss of iterations 3 and 4
  /usr/bin/python3 -c 'import json, sys
for r in map(json.loads, open(sys.argv[1])):
    if "lm_loss" in r and r["iteration"] > 2: print(r["iteration"], r["lm_loss"], r["mtp_loss"], r["aux_loss"])' "$1"
}

fail=0
check() {  # check NAME LAUNCHER...: one disk-full run, then resume a copy of its checkpoint directory
  local name=$1; shift
  local dir="$mnt/ck" out="$tmp/$name.log" seen="$tmp/$name.latest" ref="$tmp/$name.ref"
  # the uninterrupted run on the normal disk: the losses, and the size of one checkpoint
  "$@" "$BIN/dsv3" "${args[@]}" checkpoint.dir="$ref" log.metrics="$ref.jsonl" > /dev/null 2>&1 ||
    { echo "FAIL: $name: the reference run failed"; fail=1; return; }
  local ckpt_bytes size_kb
  ckpt_bytes=$(stat -c %s "$ref/iter_0000002.h5")
  size_kb=$((ckpt_bytes * 3 / 2 / 1024))
  echo "$name: one checkpoint is $ckpt_bytes bytes; tmpfs of ${size_kb} KiB"
  mount -t tmpfs -o size=${size_kb}k tmpfs "$mnt" || { echo "FAIL: $name: mount"; fail=1; return; }
  mkdir -p "$dir"
  (while :; do cat "$dir/latest" 2>/dev/null && echo; sleep 0.01; done) > "$seen" &
  watcher=$!
  timeout -k 5 60 "$@" "$BIN/dsv3" "${args[@]}" checkpoint.dir="$dir" log.metrics="" > "$out" 2>&1
  local rc=$?
  kill $watcher; wait $watcher 2>/dev/null; watcher=
  local errs latest names
  errs=$(grep "dsv3: error" "$out")
  latest=$(cat "$dir/latest" 2>/dev/null)
  names=$(grep -v '^$' "$seen" | sort -u | tr '\n' ' ')
  echo "$name: exit $rc; files: $(ls "$dir" | tr '\n' ' '); latest was only ever: $names"
  echo "$name: $errs"
  [ $rc -eq 1 ] || { echo "FAIL: $name: exit $rc, expected 1"; fail=1; }
  [ "$(echo "$errs" | grep -c .)" -eq 1 ] || { echo "FAIL: $name: not exactly one error line"; cat "$out"; fail=1; }
  echo "$errs" | grep -q "checkpoint $dir/iter_0000004.h5: No space left on device" ||
    { echo "FAIL: $name: the error does not name the file and 'No space left on device'"; fail=1; }
  [ "$latest" = iter_0000002.h5 ] || { echo "FAIL: $name: latest is '$latest'"; fail=1; }
  [ "$names" = "iter_0000002.h5 " ] || { echo "FAIL: $name: latest named '$names' during the run"; fail=1; }
  [ "$(ls "$dir")" = "$(printf 'iter_0000002.h5\nlatest')" ] || { echo "FAIL: $name: leftover files"; fail=1; }
  # resume a copy on the normal disk: loads iteration 2 (every checksum verified) and gives the same losses
  cp -r "$dir" "$tmp/$name.resume"
  unmount
  "$@" "$BIN/dsv3" "${args[@]}" checkpoint.dir="$tmp/$name.resume" checkpoint.load=auto log.level=info \
    log.metrics="$tmp/$name.jsonl" > "$tmp/$name.resume.log" 2>&1 ||
    { echo "FAIL: $name: resume failed"; tail -3 "$tmp/$name.resume.log"; fail=1; return; }
  grep -q "resumed from $tmp/$name.resume/iter_0000002.h5: iteration 2" "$tmp/$name.resume.log" ||
    { echo "FAIL: $name: did not resume from iteration 2"; grep -i "resum\|warn" "$tmp/$name.resume.log"; fail=1; }
  grep -qi "corrupt\|fall back\|falls back" "$tmp/$name.resume.log" && { echo "FAIL: $name: fallback warning"; fail=1; }
  if [ "$(losses "$tmp/$name.jsonl")" = "$(losses "$ref.jsonl")" ]; then
    echo "$name: resumed from iteration 2: losses of iterations 3-4 identical to the uninterrupted run"
  else
    echo "FAIL: $name: losses after resuming differ"; losses "$tmp/$name.jsonl"; losses "$ref.jsonl"; fail=1
  fi
}
check np1
check np2 mpirun -np 2 --oversubscribe
[ $fail -eq 0 ] && echo "PASS"
exit $fail
