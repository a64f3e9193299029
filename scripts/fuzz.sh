#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (clang, ASan + UBSan; CMake option HM_FUZZ) in
# build-fuzz and runs each for SECONDS (default 60), starting from its seed corpus
# (tests/fuzz/corpus/TARGET) plus what earlier runs found (build-fuzz/fuzz/corpus/TARGET).
# Prints one line per target and fails if any crashed: the crashing input is then in
# build-fuzz/fuzz/crashes/TARGET/; fix the bug and commit the input under
# tests/fuzz/regressions/TARGET/, where the test suite replays it (docs/RELIABILITY.md).
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (targets: safetensors config tokenizer text_regex trainer_state chat_template server_request)
# Environment: HM_FUZZ_BUILD (build directory, default build-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then targets=(safetensors config tokenizer text_regex trainer_state chat_template server_request); fi
B=${HM_FUZZ_BUILD:-build-fuzz}

# A build directory already configured with HM_FUZZ (scripts/test.sh's build-asan) is only built.
if ! grep -qs '^HM_FUZZ:BOOL=ON' "$B/CMakeCache.txt"; then
  CC=clang CXX=clang++ cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DHM_FUZZ=ON -DHM_BUILD_TESTS=OFF \
    -DHM_BUILD_BENCH=OFF >/dev/null
fi
cmake --build "$B" -j "$(nproc)" --target "${targets[@]/#/fuzz_}" >/dev/null

summary=()
failed=0
for t in "${targets[@]}"; do
  work=$B/fuzz/corpus/$t crashes=$B/fuzz/crashes/$t/ tmp=$B/fuzz/tmp/$t log=$B/fuzz/$t.log
  mkdir -p "$work" "$crashes" "$tmp"
  # One thread: the targets load tiny models, and OpenMP threads under ASan only add overhead.
  # -timeout: an input that takes 30 s is a finding (a hang), as is one that needs 2 GB.
  rc=0
  TMPDIR=$tmp OMP_NUM_THREADS=1 "$B/fuzz_$t" -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 \
    -dict=tests/fuzz/json.dict -print_final_stats=1 -artifact_prefix="$crashes" "$work" "tests/fuzz/corpus/$t" \
    >"$log" 2>&1 || rc=$?
  rm -rf "$tmp"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  if [ "$rc" = 0 ]; then
    summary+=("$(printf '%-14s ok     %6ss %10s execs  %s' "$t" "$secs" "${execs:-?}" "$cov")")
  else
    failed=1
    summary+=("$(printf '%-14s CRASH  (exit %s) see %s and %s' "$t" "$rc" "$log" "$crashes")")
    why=$(grep -m1 -E 'ERROR: |runtime error|hm fuzz:|terminate called' "$log" || true)
    summary+=("               ${why:0:200}")
  fi
done
echo "fuzz summary (${secs}s per target):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
