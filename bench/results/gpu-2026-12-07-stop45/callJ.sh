#!/usr/bin/env bash
# Stop 45, callJ (carry .devbundle4): the row kernel's multi-row form with its rows split over
# blocks (HM_CUDA_GEMV_TILE rows a block, the blocks of one column group adjacent so W comes from
# L2 after the first), against the landed policy (1..8 rows on the row kernel within
# kGemvRowsMaxWork, more on cuBLASLt), same build. Stop 44's 16-row block form lost 12% on the
# seed at 16 sequences: 64 blocks for in_proj, each doing 16 rows' FMAs. Tiles of 8 give 128
# blocks with half the FMAs each; predicted seed b16 ~330 -> ~280 us a step (~1.35x the peer).
BUNDLE=.devbundle4 . bench/device_env.sh
suites '*CudaDecode*'
ALL="HM_CUDA_GEMV_ROWS=64 HM_CUDA_GEMV_ROWS_WORK=1000000000000"
for r in 1 2; do
  SWEEP_TAG=_r$r
  env_sweep seed-norope 8x16,16x16,32x16,64x16 - "$ALL HM_CUDA_GEMV_TILE=8" "$ALL HM_CUDA_GEMV_TILE=4" "HM_CUDA_GEMV_ROWS=64 HM_CUDA_GEMV_TILE=8"
  env_sweep mamba-130m 8x16,16x16,64x16 - "$ALL HM_CUDA_GEMV_TILE=8" "$ALL HM_CUDA_GEMV_TILE=4" "HM_CUDA_GEMV_ROWS=64 HM_CUDA_GEMV_TILE=8"
done
SWEEP_TAG=
env_sweep mamba-1.4b 16x16,64x16 - "$ALL HM_CUDA_GEMV_TILE=8" "HM_CUDA_GEMV_ROWS=64 HM_CUDA_GEMV_TILE=8"
echo "t=$(( $(date +%s) - T00 ))"
if [ $(( $(date +%s) - T00 )) -lt 400 ]; then HM_CUDA_GEMV_ROWS=64 HM_CUDA_GEMV_ROWS_WORK=1000000000000 HM_CUDA_GEMV_TILE=8 ncu_step seed-norope 16x16 seed_b16_tile8; fi
echo "all done at $(( $(date +%s) - T00 )) s"
