#!/usr/bin/env bash
# Stop 48, callF (carry .devbundle5: the working tree with the pre-norm folded into in_proj and
# the dt scan step's sequences-per-block switch; and .peerdev): the decode suites and the model
# suite, then the new path (1 / rms applied in the conv step after in_proj, decode steps beyond
# the GEMV's rows) against the RMSNorm launch it replaces (HM_CUDA_NORM_AFTER=0: same binary,
# same folded weights), two alternating rounds, then the peer at 16 and 64 sequences.
BUNDLE=.devbundle5 . bench/device_env.sh
LIMIT=${LIMIT:-570}
left() { [ $(( $(date +%s) - T00 )) -lt $(( LIMIT - $1 )) ]; }
suites '*CudaDecode*:*CudaAttention*:*KvWrite*'
for r in 1 2; do
  left 200 && SWEEP_TAG=_$r env_sweep mamba-130m 4x16,8x16,16x16,64x16 - HM_CUDA_NORM_AFTER=0
  left 160 && SWEEP_TAG=_$r env_sweep mamba-1.4b 16x16,64x16 - HM_CUDA_NORM_AFTER=0
  left 140 && SWEEP_TAG=_$r env_sweep seed-norope 16x16,64x16 - HM_CUDA_NORM_AFTER=0
done
echo "t=$(( $(date +%s) - T00 ))"
for s in mamba-130m mamba-1.4b; do left 100 && peer $s 16x16,64x16; done
echo "callF done at $(( $(date +%s) - T00 )) s"
