#!/usr/bin/env bash
# Stop 44, callG: callF's build with the race it showed fixed (the multi-row form set every
# row's 1 / rms to 1 from warp 0 while the other warps wrote theirs: the fused-norm variant
# failed at random rows). Both whole suites, then one A/B round; what ~300 s of budget holds.
BUNDLE=.devbundle3 . bench/device_env.sh
suites
env_sweep seed-norope 2x16,4x16,8x16,16x16 HM_CUDA_GEMV_ROWS=1 HM_CUDA_GEMV_ROWS=4 HM_CUDA_GEMV_ROWS=8 -
echo "all done at $(( $(date +%s) - T00 )) s"
