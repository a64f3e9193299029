#!/usr/bin/env bash
# Stop 47, callD (.devbundle4 rebuilt: main, the fused conv + x_proj dropped, dt_proj inside the
# scan step while sequences x its bytes <= 1.25 MB): the decode tests and the model tests; then,
# alternating, the new default against the old rule (HM_CUDA_DT_SCAN_SEQS=1) and the skinny GEMM
# at 16-64 sequences for weights up to 1 / 4 / 64 MB.
BUNDLE=.devbundle4 . bench/device_env.sh
LIMIT=${LIMIT:-380}
left() { [ $(( $(date +%s) - T00 )) -lt $(( LIMIT - $1 )) ]; }
suites "*CudaDecode*"
S=(- HM_CUDA_DT_SCAN_SEQS=1 "HM_CUDA_SKINNY=1 HM_CUDA_SKINNY_MAX_MB=1" HM_CUDA_SKINNY=1 "HM_CUDA_SKINNY=1 HM_CUDA_SKINNY_MAX_MB=64")
for rep in 1 2; do
  SWEEP_TAG=_r$rep env_sweep seed-norope 8x16,16x16,32x16,64x16 "${S[@]}"
  SWEEP_TAG=_r$rep env_sweep mamba-130m 8x16,16x16,64x16 "${S[@]}"
  echo "t=$(( $(date +%s) - T00 ))"
  left 130 || break
done
left 50 && SWEEP_TAG=_r1 env_sweep mamba-1.4b 16x16,64x16 - HM_CUDA_SKINNY=1 "HM_CUDA_SKINNY=1 HM_CUDA_SKINNY_MAX_MB=64"
echo "callD done at $(( $(date +%s) - T00 )) s"
