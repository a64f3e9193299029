#!/usr/bin/env bash
# A/B of the decode-step kernels (docs/CUDA.md, "Decode step") on the device machine, in one
# call: `hm bench --device cuda --quick --no-peer` per shape with the kernels off
# (HM_CUDA_GEMV=0: cuBLASLt and the unfused ops), on (the default: one-row GEMVs on the row
# kernel), on with the column kernel instead (HM_CUDA_GEMV_ROW=0), on with bf16/f16 allowed
# on the tensor-core GEMV (HM_CUDA_GEMV_TC=1), and on without programmatic dependent launch
# (HM_CUDA_PDL=0); VARIANTS="..." picks some. Each variant is a separate process, run back to back; the JSON
# objects go to OUT_DIR/ab.jsonl after a '== shape variant' line, the progress to ab.log.
# Usage: bash bench/cuda_decode_ab.sh HM_BINARY OUT_DIR [SHAPE...]
set -u
HM=$1 OUT=$2
shift 2
SHAPES=${*:-mamba-130m mamba-1.4b}
for s in $SHAPES; do
  for v in ${VARIANTS:-HM_CUDA_GEMV=0 HM_CUDA_GEMV=1 HM_CUDA_GEMV_ROW=0 HM_CUDA_GEMV_TC=1 HM_CUDA_PDL=0}; do
    echo "== $s $v" | tee -a "$OUT/ab.jsonl" >> "$OUT/ab.log"
    env "$v" timeout -k 5 "${CAP:-90}" "$HM" bench --device cuda --config "bench/cuda_peer_configs/$s.json" --quick \
      --no-peer --reps "${REPS:-2}" --json >> "$OUT/ab.jsonl" 2>> "$OUT/ab.log"
    echo "exit $?" >> "$OUT/ab.log"
  done
done
