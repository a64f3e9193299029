#!/usr/bin/env bash
# Stop 43, callD: callC cut to what the last ~300 s of device time can hold: the multi-row row
# GEMV build (.devbundle3; see callC.sh for what it is and the prediction): both whole suites,
# then one alternating round of the old policy (HM_CUDA_GEMV_ROWS=1) against the new default.
BUNDLE=.devbundle3 . bench/device_env.sh  # this build is carried as .devbundle3
suites
env_sweep seed-norope 1x16,4x16,8x16,16x16,64x16 HM_CUDA_GEMV_ROWS=1 -
env_sweep mamba-130m 4x16,16x16 HM_CUDA_GEMV_ROWS=1 -
echo "all done at $(( $(date +%s) - T00 )) s"
