#!/usr/bin/env bash
# Stop 47, callA: stop 46's callN (conv_xproj.patch applied) and the one-chunk attention decode,
# carried as .devbundle4: the tests, decode A/B sweeps, seed decode against the peer. callB.sh follows
# on the same machine.
BUNDLE=.devbundle4 . bench/device_env.sh
LIMIT=${LIMIT:-570}
left() { [ $(( $(date +%s) - T00 )) -lt $(( LIMIT - $1 )) ]; }
suites "*CudaDecode*:*CudaAttention*:*KvWrite*"
# Stop 46's callN: the conv step + x_proj in one launch (on / HM_CUDA_CONV_XPROJ=0) and dt_proj
# inside the scan step at many sequences; stop 47's one-chunk attention decode (on /
# HM_CUDA_DECODE_COMBINE=1, the combine launch kept).
for rep in 1 2; do
  SWEEP_TAG=_r$rep env_sweep seed-norope 1x16,16x16,64x16 - HM_CUDA_CONV_XPROJ=0 HM_CUDA_DT_SCAN_SEQS=64 HM_CUDA_DECODE_COMBINE=1
  SWEEP_TAG=_r$rep env_sweep mamba-130m 8x16,16x16,64x16 - HM_CUDA_CONV_XPROJ=0 HM_CUDA_DT_SCAN_SEQS=64
  [ $rep = 1 ] && left 200 && SWEEP_TAG=_r$rep env_sweep mamba-1.4b 16x16,64x16 - HM_CUDA_CONV_XPROJ=0 HM_CUDA_CONV_XPROJ_MB=256
  echo "t=$(( $(date +%s) - T00 ))"
done
left 150 && peer seed-norope 1x16,16x16,64x16
echo "callA done at $(( $(date +%s) - T00 )) s"
