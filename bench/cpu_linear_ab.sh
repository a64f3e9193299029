#!/usr/bin/env bash
# A/B of how the CPU's linear layers run more than linear_rows_max rows (kernels/cpu/dispatch.h,
# LinearLarge): OpenBLAS sgemm (HM_LINEAR=blas) against the per-row kernel in blocks
# (HM_LINEAR=blocks), alternating in one run. Per preset: prefill ms/token at 512 and 4096 tokens
# (hm bench, chunks of 512), the 2x32 prefill, batch-1 decode and the 1024^3 GEMM rate, the
# median over rounds, and the speedup of the blocks (> 1: blocks faster; times blas / blocks,
# rates blocks / blas).
# Usage: bash bench/cpu_linear_ab.sh [HM] [ROUNDS] [PRESET...]   (default build/hm 3 seed demo)
# Env: THREADS (hm bench -t; default 0 = all cores).
set -eu
HM=${1:-build/hm}; ROUNDS=${2:-3}; shift $(( $# > 2 ? 2 : $# )) || true
PRESETS=${*:-seed demo}
grep -m1 "model name" /proc/cpuinfo
"$HM" info --system | grep -E "CPU kernels|CPU linear"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
for p in $PRESETS; do
  for r in $(seq "$ROUNDS"); do
    for m in blas blocks; do
      HM_LINEAR=$m "$HM" bench --device cpu -t "${THREADS:-0}" --preset "$p" --no-peer --reps 3 --json 2>/dev/null > "$TMP/$p.$m.$r.json"
    done
  done
done
python3 - "$TMP" $PRESETS <<'PY'
import glob, json, statistics, sys
tmp, presets = sys.argv[1], sys.argv[2:]
def get(r, k):
    return {"prefill 512 (ms/token)": r["prefill_ms_per_token"]["512"],
            "prefill 4096 (ms/token)": r["prefill_ms_per_token"]["4096"],
            "prefill 2x32 (ms)": r["prefill_ms"], "decode batch 1 (tok/s)": r["decode_tok_s"],
            "GEMM 1024^3 (GFLOP/s)": r["gemm_gflops"]}[k]
keys = ["prefill 512 (ms/token)", "prefill 4096 (ms/token)", "prefill 2x32 (ms)", "decode batch 1 (tok/s)",
        "GEMM 1024^3 (GFLOP/s)"]
print("| preset | measure | sgemm (blas) | blocks | speedup of blocks |")
print("| --- | --- | ---: | ---: | ---: |")
for p in presets:
    runs = {m: [json.load(open(f)) for f in sorted(glob.glob(f"{tmp}/{p}.{m}.*.json"))] for m in ("blas", "blocks")}
    for k in keys:
        a = statistics.median(get(r, k) for r in runs["blas"])
        b = statistics.median(get(r, k) for r in runs["blocks"])
        speedup = b / a if "/s)" in k else a / b
        print(f"| {p} | {k} | {a:.4g} | {b:.4g} | {speedup:.2f} |")
PY
