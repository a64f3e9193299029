#!/usr/bin/env bash
# Stop 44, callH (prepared for the next session; needs a build with mma16_norm.patch applied,
# carried as .devbundle3): the tensor-core GEMV at 9..16 rows with the norm and conv inside
# (kGemvMaxNormRows 8 -> 16; its norm a warp a row from 16-byte loads; one copy of its loop body,
# 54 -> 43 KB of code) against cuBLASLt, where the row kernel's float FMAs lost (stop 44: seed
# 16 rows -12%). HM_CUDA_GEMV_TC=1 sends 9..16 rows there; the default (off) is what landed.
# Predicted: seed b16 ~330 -> ~250-270 us a step (19 RMSNorm + 9 conv + 6 add launches fewer,
# the GEMVs at ~4 us against cuBLASLt's ~5), i.e. ~1.3-1.4x the peer; 1.4B b16 even or worse
# (its in_proj streams at 2.8 TB/s on cuBLASLt already).
BUNDLE=.devbundle3 . bench/device_env.sh
suites
for r in 1 2; do
  SWEEP_TAG=_r$r
  env_sweep seed-norope 8x16,12x16,16x16 - HM_CUDA_GEMV_TC=1
  env_sweep mamba-130m 16x16 - HM_CUDA_GEMV_TC=1
done
SWEEP_TAG=
env_sweep mamba-1.4b 16x16 - HM_CUDA_GEMV_TC=1
echo "t=$(( $(date +%s) - T00 ))"
if [ $(( $(date +%s) - T00 )) -lt 330 ]; then HM_CUDA_GEMV_TC=1 ncu_step seed-norope 16x16 seed_b16_tc; fi
echo "all done at $(( $(date +%s) - T00 )) s"
