#!/usr/bin/env bash
# Stop 43, callC: the row GEMV for 2..16 rows (gemv_rows_kernel: x rows staged as floats, 4
# columns a warp, the sums reduced by halving exchanges), so the fused norm, conv step and a
# bridge's scale run in it at 2-16 sequences as at one (gemv_takes: above 4 rows only for
# weights of <= 8M elements). On top of callB's build. Both whole suites; then the old policy
# (HM_CUDA_GEMV_ROWS=1, the GEMV at one row only) against the new default, same build,
# alternating; the peer at b1/b16/b64; ncu of a seed step at 16 sequences.
# Predicted: seed b16 ~339 -> ~260 us a step (19 RMSNorm, 9 conv and 6 add launches fewer,
# ~2.5 us each in the graph), ~1.4-1.5x the peer; b64 unchanged (cuBLASLt).
BUNDLE=.devbundle3 . bench/device_env.sh  # this build is carried as .devbundle3
suites
for r in 1 2; do
  SWEEP_TAG=_r$r
  env_sweep seed-norope 1x16,4x16,8x16,16x16,64x16 HM_CUDA_GEMV_ROWS=1 -
  env_sweep mamba-130m 1x16,4x16,16x16 HM_CUDA_GEMV_ROWS=1 -
done
SWEEP_TAG=
echo "t=$(( $(date +%s) - T00 ))"
env_sweep mamba-1.4b 1x16,4x16,16x16 HM_CUDA_GEMV_ROWS=1 -
echo "t=$(( $(date +%s) - T00 ))"
peer seed-norope
echo "t=$(( $(date +%s) - T00 ))"
ncu_step seed-norope 16x16 seed_b16
echo "all done at $(( $(date +%s) - T00 )) s"
