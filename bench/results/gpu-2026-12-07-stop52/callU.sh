#!/usr/bin/env bash
# Stop 52, carry .devbundle21 = main 9d0db1e + mamba2_norm_fold.patch (hm and both test binaries):
# the decode suite (mamba_in's Mamba-2 layout now takes the norm-after path at 9-70 sequences)
# and the model tests (ManySequenceDecodeEqualsCpu with both Mamba-2 models), then decode at 16
# and 64 sequences with the fold's RMSNorm launch back on (HM_CUDA_NORM_AFTER=0) against off (1),
# Mamba-2 130M and Mamba-1 130M (whose conv step kernel changed too), two rounds.
BUNDLE=.devbundle21 . bench/device_env.sh
suites '*CudaDecode*:*CudaBackendOps*Conv*'
grep -E "Mamba2|config [34]," $R/cuda_model_tests.log | grep -i "rel err" | head -12
for round in 1 2; do
  SWEEP_TAG=_$round env_sweep mamba2-130m 16x16,64x16 HM_CUDA_NORM_AFTER=0 HM_CUDA_NORM_AFTER=1
  SWEEP_TAG=_$round env_sweep mamba-130m 16x16,64x16 HM_CUDA_NORM_AFTER=0 HM_CUDA_NORM_AFTER=1
done
echo "callU done at $(( $(date +%s) - T00 )) s"
