#!/usr/bin/env bash
# Stop 46, call N (carry .devbundle4: main plus conv_xproj.patch, the conv step and x_proj in one
# launch at decode steps the GEMV does not take; HM_CUDA_CONV_XPROJ=0 turns it off). 1. both CUDA suites;
# 2. the fused conv + x_proj on and off, and dt_proj inside the scan step at more than one
# sequence (HM_CUDA_DT_SCAN_SEQS, today 1), seed / 130M / 1.4B, two rounds; 3. the peer.
BUNDLE=.devbundle4 . bench/device_env.sh
LIMIT=${LIMIT:-330}
left() { [ $(( $(date +%s) - T00 )) -lt $(( LIMIT - $1 )) ]; }
suites "*CudaDecode*"
for rep in 1 2; do
  SWEEP_TAG=_r$rep env_sweep seed-norope 16x16,64x16 - HM_CUDA_CONV_XPROJ=0 HM_CUDA_DT_SCAN_SEQS=64
  SWEEP_TAG=_r$rep env_sweep mamba-130m 8x16,16x16,64x16 - HM_CUDA_CONV_XPROJ=0 HM_CUDA_DT_SCAN_SEQS=64
  [ $rep = 1 ] && left 120 && SWEEP_TAG=_r$rep env_sweep mamba-1.4b 16x16,64x16 - HM_CUDA_CONV_XPROJ=0 HM_CUDA_CONV_XPROJ_MB=256
  echo "t=$(( $(date +%s) - T00 ))"
done
left 60 && peer seed-norope 16x16,64x16
echo "all done at $(( $(date +%s) - T00 )) s"
