#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/CMakeLists.txt) with clang into build-fuzz/ and runs each one for
# FUZZ_SECONDS (default 60), one at a time, starting from the seeds in tests/fuzz/corpus/<target>/. Prints the
# executions per target; exits non-zero when any target finds a crash, hang, leak, sanitizer report or contract
# violation (the input is kept in build-fuzz/artifacts/<target>/ -- make it a regression test, see
# tests/unit/test_fuzz_regressions.cpp).
#   tests/fuzz/run.sh                     # all targets, 60 s each
#   FUZZ_SECONDS=600 tests/fuzz/run.sh config tokenizer
# Environment: FUZZ_SECONDS, FUZZ_BUILD (default build-fuzz), FUZZ_RSS_MB (default 2048), FUZZ_JOBS (build jobs,
# default 2), FUZZ_ARGS (extra libFuzzer flags). New inputs libFuzzer finds go to build-fuzz/corpus/<target>/
# (kept between runs, never into the seed directory).
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
SECONDS_EACH=${FUZZ_SECONDS:-60}
B=${FUZZ_BUILD:-build-fuzz}
RSS=${FUZZ_RSS_MB:-2048}
ALL=(deck safetensors hf_index config tokenizer idx checkpoint)
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL[@]}")

command -v clang++ >/dev/null || { echo "fuzz: clang++ not found (Debian: apt-get install clang libclang-rt-14-dev libomp-dev)" >&2; exit 2; }
if [ ! -f "$B/CMakeCache.txt" ]; then
  CC=clang CXX=clang++ cmake -S tests/fuzz -B "$B" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null || exit 2
fi
cmake --build "$B" -j "${FUZZ_JOBS:-2}" || exit 2

declare -A DICT=([deck]=deck [safetensors]=json [hf_index]=json [config]=json [tokenizer]=json [idx]=idx
                [checkpoint]=checkpoint)
declare -A MAXLEN=([deck]=8192 [safetensors]=16384 [hf_index]=16384 [config]=8192 [tokenizer]=65536 [idx]=4096
                  [checkpoint]=1024)
mkdir -p "$B/tmp"
failed=()
summary=()
for t in "${TARGETS[@]}"; do
  [ -x "$B/fuzz_$t" ] || { echo "fuzz: unknown target '$t' (one of: ${ALL[*]})" >&2; exit 2; }
  mkdir -p "$B/corpus/$t" "$B/artifacts/$t"
  log="$B/fuzz_$t.log"
  echo "fuzz: $t for ${SECONDS_EACH}s (log $log)"
  # One in-process fuzzer at a time (no -jobs/-workers: those fork children that log to fuzz-N.log).
  # -timeout: an input taking longer is a hang; -rss_limit_mb also bounds single allocations (malloc_limit).
  TMPDIR="$ROOT/$B/tmp" DSV3_FUZZ_ONELINE=${DSV3_FUZZ_ONELINE:-0} \
    "$B/fuzz_$t" "$B/corpus/$t" "tests/fuzz/corpus/$t" \
      -max_total_time="$SECONDS_EACH" -rss_limit_mb="$RSS" -timeout=10 -max_len="${MAXLEN[$t]}" \
      -dict="tests/fuzz/dict/${DICT[$t]}.dict" -artifact_prefix="$B/artifacts/$t/" -print_final_stats=1 \
      ${FUZZ_ARGS:-} </dev/null >"$log" 2>&1
  rc=$?
  runs=$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1)
  [ -n "$runs" ] || runs="$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#') runs (stopped early)"
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    summary+=("$(printf '%-12s FAILED (rc %d): %s; %s' "$t" "$rc" "$runs" "$cov")")
    grep -E 'ERROR:|runtime error:|CONTRACT VIOLATION|SUMMARY:|Test unit written' "$log" | head -8 | sed 's/^/    /'
  else
    summary+=("$(printf '%-12s ok: %s; %s' "$t" "$runs" "$cov")")
  fi
done
echo "fuzz summary (${SECONDS_EACH}s per target):"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs in $B/artifacts/)" >&2
  exit 1
fi
