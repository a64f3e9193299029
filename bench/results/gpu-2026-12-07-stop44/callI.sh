#!/usr/bin/env bash
# Stop 44, callI (prepared for the next session; carry .devbundle3 and .peerdev): the mixes the
# landed policy makes that stop 44 did not measure as such (kGemvRowsMaxWork: the LM head at 2-4
# rows on cuBLASLt, the 130M's in_proj at 8 rows on cuBLASLt beside its other projections on the
# row kernel, the 1.4B's x_proj and dt_proj alone on it at 2-8 rows), each against the one-row
# policy (HM_CUDA_GEMV_ROWS=1) in the same build, two rounds; then the peer at 2, 4 and 8
# sequences, where no ratio has been measured. .devbundle3's patch is off unless HM_CUDA_GEMV_TC=1,
# so its default is what landed.
BUNDLE=.devbundle3 . bench/device_env.sh
for r in 1 2; do
  SWEEP_TAG=_r$r
  env_sweep seed-norope 2x16,4x16,8x16 HM_CUDA_GEMV_ROWS=1 -
  env_sweep mamba-130m 2x16,4x16,8x16 HM_CUDA_GEMV_ROWS=1 -
  env_sweep mamba-1.4b 2x16,4x16,8x16 HM_CUDA_GEMV_ROWS=1 -
done
SWEEP_TAG=
echo "t=$(( $(date +%s) - T00 ))"
peer seed-norope 2x16,4x16,8x16
peer mamba-130m 2x16,4x16,8x16
echo "all done at $(( $(date +%s) - T00 )) s"
