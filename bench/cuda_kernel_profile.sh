#!/usr/bin/env bash
# Per-kernel GPU times of a decode step under Nsight Compute (device machine): where a step's
# time goes, kernel by kernel, for the shapes of bench/cuda_peer_configs/. It runs
# `hm bench --device cuda --quick --no-peer` under ncu and profiles a window of kernel launches
# inside the first batch-1 decode (graph nodes are profiled one by one); ncu serializes kernels,
# so only each kernel's own duration is meaningful, not the sum of gaps.
# Usage: bash bench/cuda_kernel_profile.sh HM_BINARY OUT_DIR [SHAPE...]   (SKIP=20000 COUNT=400)
set -u
HM=$1 OUT=$2
shift 2
SHAPES=${*:-mamba-130m mamba-1.4b}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
for s in $SHAPES; do
  timeout -k 5 ${CAP:-150} "$NCU" --clock-control none --launch-skip "${SKIP:-20000}" --launch-count "${COUNT:-400}" \
    --metrics gpu__time_duration.sum --csv --page raw \
    "$HM" bench --device cuda --config "bench/cuda_peer_configs/$s.json" --quick --no-peer --reps 1 \
    > "$OUT/ncu_$s.csv" 2> "$OUT/ncu_$s.err"
  echo "ncu $s: exit $?"
done
