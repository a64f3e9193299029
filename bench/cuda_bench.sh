#!/usr/bin/env bash
# The CUDA run of issue 13 on the lent H200, in one call of under 7 minutes: the CUDA test
# binaries, then `hm bench --device cuda --peer` (ours and mamba_ssm on the same weights, logits
# check included) on the seed shape without RoPE, the Mamba-1 130M shape and the 1.4B shape.
# Runs from the repository root there; needs:
#   - a bundle made here by /work/shared/device/bundle.sh with bin/hm, bin/hm_cuda_tests and, if
#     built, bin/hm_cuda_model_tests (default .devbundle/hm.tar.xz; BUNDLE=... to override);
#   - .peerdev/ (docs/PEER_GPU.md): peers.tar.xz (the prebuilt extensions) and the mamba_ssm and
#     causal_conv1d packages.
# Writes into $OUT (at most 8 files come back): tests.log, bench.log (progress and the tables),
# bench_<shape>.json per shape, summary.txt, hf_fixtures.tar.gz (FIXTURES=0 skips it). Every step's failure is reported and the script
# goes on; it exits 0 only when every step succeeded.
# Usage (device machine):  bash bench/cuda_bench.sh    [REPS=3] [SHAPES="seed-norope mamba-130m mamba-1.4b"]
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/cuda_bench_out}
mkdir -p "$OUT"
BUNDLE=${BUNDLE:-.devbundle/hm.tar.xz}
REPS=${REPS:-3}
SHAPES=${SHAPES:-seed-norope mamba-1.4b mamba-130m}  # the 1.4B (the decode target) before the 130M
QUICK=${QUICK:-0}  # 1: hm bench --quick (three small decode cases, prefill 1 and 2 x 2048)
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-400}))  # leave the 7-minute call room for the transfers
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME CAP_S LOG CMD...: runs CMD with stdout+stderr appended to LOG, killed after CAP_S
# seconds or at the deadline, whichever comes first; reports its status and time.
step() {
  local name="$1" cap="$2" log="$3"; shift 3
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then note "SKIPPED $name: the time budget is spent"; failed=1; return 1; fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (limit ${cap}s): $*" >> "$log"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$cap" "$@" >> "$log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    note "ok     $name ($(( $(date +%s) - t0 )) s)"
  else
    [ "$rc" -eq 124 ] && why="timed out after ${cap}s" || why="exit $rc"
    note "FAILED $name: $why ($(( $(date +%s) - t0 )) s); see $(basename "$log")"
    failed=1
  fi
  return "$rc"
}

note "cuda_bench.sh $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"

# Our programs.
HM_DIR=/tmp/hm_bundle
rm -rf "$HM_DIR" && mkdir -p "$HM_DIR"
if ! tar xJf "$BUNDLE" -C "$HM_DIR" 2>>"$SUMMARY"; then
  note "FAILED unpacking $BUNDLE: nothing of ours can run"
  exit 1
fi
export LD_LIBRARY_PATH="$HM_DIR/lib:${LD_LIBRARY_PATH:-}"
HM="$HM_DIR/bin/hm"

# The peer: prebuilt extensions + the Python packages (docs/PEER_GPU.md).
PEERS=/tmp/peers
rm -rf "$PEERS" && mkdir -p "$PEERS"
if tar xJf .peerdev/peers.tar.xz -C "$PEERS" && cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d "$PEERS"/; then
  export PYTHONPATH="$PEERS:${PYTHONPATH:-}"
  python3 -c 'import torch, mamba_ssm; print("peer: torch", torch.__version__, "mamba_ssm", mamba_ssm.__version__)' \
    >>"$SUMMARY" 2>&1 || note "WARNING: python3 cannot import torch and mamba_ssm: the bench runs without the peer"
else
  note "WARNING: .peerdev/ is missing or incomplete: the bench runs without the peer"
fi

# The CUDA tests (kernels, backend, sampling; the whole-model tests if built).
T="$OUT/tests.log"
: > "$T"
for bin in hm_cuda_tests hm_cuda_model_tests; do
  if [ -x "$HM_DIR/bin/$bin" ]; then
    step "$bin" 150 "$T" "$HM_DIR/bin/$bin" --gtest_brief=1
  else
    note "absent  $bin (not in $BUNDLE)"
  fi
done
grep -E "^(== |\[==========\]|\[  PASSED  \]|\[  FAILED  \]|\[  SKIPPED \])" "$T" >> "$SUMMARY"

# Hugging Face fixtures that need transformers (issue 14: the families whose parity tests in
# tests/test_hf.cpp skip without them; FIXTURE_FAMILIES, default jamba): one tarball back in $OUT, to unpack into tests/fixtures/hf/.
if [ "${FIXTURES:-1}" = 1 ] && [ -f tests/fixtures/hf/make_fixtures.py ]; then
  FX=/tmp/hf_fixtures && rm -rf "$FX" && mkdir -p "$FX"
  # Without the peer on PYTHONPATH: transformers would call causal_conv1d's CUDA kernels on the
  # fixtures' CPU tensors; the plain PyTorch path is the reference wanted here.
  step "hf fixtures (${FIXTURE_FAMILIES:-jamba})" 90 "$T" env PYTHONPATH= python3 tests/fixtures/hf/make_fixtures.py "$FX" ${FIXTURE_FAMILIES:-jamba} &&
    tar czf "$OUT/hf_fixtures.tar.gz" -C "$FX" .
fi

# hm bench --device cuda --peer per shape. Each measurement's figures also go to bench.log as it
# ends, so a shape cut off by its limit still leaves what it measured.
B="$OUT/bench.log"
: > "$B"
for shape in $SHAPES; do
  cfg="bench/cuda_peer_configs/$shape.json"
  if [ ! -f "$cfg" ]; then note "FAILED bench $shape: no $cfg"; failed=1; continue; fi
  cap=120
  [ "$shape" = mamba-1.4b ] && cap=200
  quick=()
  [ "$QUICK" = 1 ] && quick=(--quick)
  # JSON on stdout; progress and the table on stderr (bench.log).
  step "bench $shape" "$cap" "$B" bash -c 'out=$1; shift; "$@" > "$out"' _ "$OUT/bench_$shape.json" \
    "$HM" bench --device cuda --config "$cfg" --reps "$REPS" --peer "$ROOT/bench/cuda_peer.py" --json "${quick[@]}"
  [ -s "$OUT/bench_$shape.json" ] || rm -f "$OUT/bench_$shape.json"
done

note "total $(( $(date +%s) - START )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$failed"
