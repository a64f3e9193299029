#!/usr/bin/env bash
# Stop 53, carry .devbundle22 = main + stop 52's norm-fold patch + the one-launch Mamba-1 mixer
# (kernels/cuda/mamba_step.cu): its test first (a hang would be a barrier bug: short timeout),
# then the decode suite and the model tests, then same-binary A/B decode at 16 and 64 sequences:
# the mixer off (HM_CUDA_MAMBA_STEP=0) against on, Mamba-1 130M and the seed; Mamba-2 130M with
# the fold's RMSNorm launch back on (HM_CUDA_NORM_AFTER=0) against off. Two rounds.
BUNDLE=.devbundle22 . bench/device_env.sh
timeout 90 $H/bin/hm_cuda_tests --gtest_filter='*MambaMixer*' > $R/mixer_test.log 2>&1; rc=$?
echo "mixer test rc $rc"; grep -E "^\[  (PASSED|FAILED)|Failure|Expected|Which is|mamba_mixer" $R/mixer_test.log | head -20
suites '*CudaDecode*:*CudaBackendOps*Conv*'
for round in 1 2; do
  [ $rc = 0 ] && SWEEP_TAG=_$round env_sweep mamba-130m 16x16,64x16 HM_CUDA_MAMBA_STEP=0 -
  [ $rc = 0 ] && SWEEP_TAG=_$round env_sweep seed-norope 16x16,64x16 HM_CUDA_MAMBA_STEP=0 -
  SWEEP_TAG=_$round env_sweep mamba2-130m 16x16,64x16 HM_CUDA_NORM_AFTER=0 -
  echo "t=$(( $(date +%s) - T00 ))"
done
echo "callV done at $(( $(date +%s) - T00 )) s"
