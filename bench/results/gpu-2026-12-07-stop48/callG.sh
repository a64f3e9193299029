#!/usr/bin/env bash
# Stop 48, callG (same bundle as callF): dt_proj inside the scan step at 16 and 64 sequences
# with 1, 4, 8 or 16 sequences a block (HM_CUDA_DT_SCAN_SB; each block reads its dt_proj rows
# once for all of them) against main's rule (unfused there: "-"), one build, env switches.
BUNDLE=.devbundle5 . bench/device_env.sh
LIMIT=${LIMIT:-570}
left() { [ $(( $(date +%s) - T00 )) -lt $(( LIMIT - $1 )) ]; }
F=HM_CUDA_DT_SCAN_SEQS=64
for r in 1 2; do
  left 150 && SWEEP_TAG=_$r env_sweep mamba-130m 16x16,64x16 - $F "$F HM_CUDA_DT_SCAN_SB=4" "$F HM_CUDA_DT_SCAN_SB=8" "$F HM_CUDA_DT_SCAN_SB=16"
  left 100 && SWEEP_TAG=_$r env_sweep seed-norope 16x16,64x16 - $F "$F HM_CUDA_DT_SCAN_SB=4" "$F HM_CUDA_DT_SCAN_SB=8" "$F HM_CUDA_DT_SCAN_SB=16"
done
left 120 && env_sweep mamba-1.4b 16x16,64x16 - "$F HM_CUDA_DT_SCAN_SB=8" "$F HM_CUDA_DT_SCAN_SB=16"
echo "callG done at $(( $(date +%s) - T00 )) s"
