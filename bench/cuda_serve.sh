#!/usr/bin/env bash
# hm serve on the device machine (issue 16's load test, docs/SERVING.md, "On the H200"): the
# streaming load test at 1, 8 and 64 clients and the 2,000-token shared-prefix test, per prefix-
# cache block size, bf16 on CUDA. One JSON and one log per block size into OUT_DIR.
# Usage: bash bench/cuda_serve.sh HM_BINARY OUT_DIR [BLOCK...]   (default blocks: 64 256)
# Env: PRESET (default seed), CONFIG (a config.json, random bf16 weights) or MODEL (a model folder),
# CAP (seconds per block size, default 80), SERVE_ARGS (more hm serve options, e.g. --batch-invariant).
set -u
HM=$1 OUT=$2
shift 2
mkdir -p "$OUT"
rc=0
for blk in ${*:-64 256}; do
  timeout -k 5 "${CAP:-80}" python3 "$(dirname "$0")/serve_load_test.py" --hm "$HM" --preset "${PRESET:-seed}" ${CONFIG:+--config "$CONFIG"} ${MODEL:+--model "$MODEL"} \
    --levels 1,8,64 --requests 20,80,300 --distinct 20 --prefixes 3 \
    --serve-args "--slots 64 --max-queue 1024 --ctx 2304 --cache-block $blk --device cuda ${SERVE_ARGS:-}" \
    --json "$OUT/serve_block$blk.json" --markdown > "$OUT/serve_block$blk.log" 2>&1
  r=$?
  echo "exit $r" >> "$OUT/serve_block$blk.log"
  [ "$r" -ne 0 ] && rc=1
done
exit $rc
