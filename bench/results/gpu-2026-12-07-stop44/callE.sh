#!/usr/bin/env bash
# Stop 44, callE: the multi-row row GEMV rewritten compact (rolled staging, one copy of the
# inner product, FMA chains: 140 -> 43 KB of code at 16 rows; callC's form spent ~21-24 us a
# launch at every size under ncu, instruction fetch). Both whole suites; then the one-row policy
# (HM_CUDA_GEMV_ROWS=1), the rows form up to 4 rows (=4) and the default (16), same build,
# alternating; 1.4B; the peer on the seed; ncu of a seed step at 16 sequences.
# Predicted: seed b16 ~339 -> ~260-280 us a step (the fused launches, each ~3-5 us at 16 rows).
BUNDLE=.devbundle3 . bench/device_env.sh
suites
for r in 1 2; do
  SWEEP_TAG=_r$r
  env_sweep seed-norope 1x16,2x16,4x16,8x16,16x16,64x16 HM_CUDA_GEMV_ROWS=1 HM_CUDA_GEMV_ROWS=4 -
  env_sweep mamba-130m 4x16,8x16,16x16 HM_CUDA_GEMV_ROWS=1 HM_CUDA_GEMV_ROWS=4 -
done
SWEEP_TAG=
echo "t=$(( $(date +%s) - T00 ))"
env_sweep mamba-1.4b 4x16,16x16 HM_CUDA_GEMV_ROWS=1 HM_CUDA_GEMV_ROWS=4 -
echo "t=$(( $(date +%s) - T00 ))"
peer seed-norope
echo "t=$(( $(date +%s) - T00 ))"
ncu_step seed-norope 16x16 seed_b16
echo "all done at $(( $(date +%s) - T00 )) s"
