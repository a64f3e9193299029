#!/usr/bin/env bash
# Stop 46, call M (carry .devbundle4: callL's build with the corrected next-norm test).
# 1. the linear_bridge test on all three types; 2. dt_proj inside the scan step at more than one
# sequence (HM_CUDA_DT_SCAN_SEQS, today 1): seed, 130M and 1.4B at 2-64 sequences, two rounds.
BUNDLE=.devbundle4 . bench/device_env.sh
timeout 100 $H/bin/hm_cuda_tests --gtest_filter='*LinearBridge*' > $R/bridge_tests.log 2>&1; echo "bridge tests rc $?"
grep -E "^\[  (PASSED|FAILED)|Failure|: next" $R/bridge_tests.log | head
for rep in 1 2; do
  SWEEP_TAG=_r$rep env_sweep seed-norope 8x16,16x16,64x16 - HM_CUDA_DT_SCAN_SEQS=64
  SWEEP_TAG=_r$rep env_sweep mamba-130m 4x16,16x16,64x16 - HM_CUDA_DT_SCAN_SEQS=64
  SWEEP_TAG=_r$rep env_sweep mamba-1.4b 2x16,4x16 - HM_CUDA_DT_SCAN_SEQS=4
  echo "t=$(( $(date +%s) - T00 ))"
done
