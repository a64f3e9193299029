#!/usr/bin/env bash
# Stop 43, callA: stop 42's three prepared patches together (the all-greedy sampler launch, the
# bridge inside the previous layer's output GEMV, kv_write inside the split-KV decode kernel) =
# stop 42's callF; then, for batch 16/64 (issue 13's 1.5x target), the per-kernel times of a
# seed step at 16 sequences (ncu) and the existing policy switches on the new build.
# The A/B against main's build is callB (two bundles and .peerdev exceed the 64 MiB carry).
# Predicted (callF): seed b1 ~200 -> ~175 us a step, ~1.95-2.0x the peer.
# The bundle also holds x_dt_scan's CUDA kernel (x_proj, dt_proj and the scan step in one launch,
# on by default to 16 sequences; HM_CUDA_XDT_SEQS=0 is the three patches alone): its test runs in
# the suites, and the lines after them time it against the patches alone, alternating. Predicted: one
# launch fewer per Mamba layer, ~1-1.5 us a layer net of its barrier: seed b1 -5 to -8%.
. bench/device_env.sh
suites
for r in 1 2; do
  SWEEP_TAG=_r$r
  env_sweep seed-norope 1x16,4x16,16x16 HM_CUDA_XDT_SEQS=0 -
  env_sweep mamba-130m 1x16,16x16 HM_CUDA_XDT_SEQS=0 -
done
SWEEP_TAG=
echo "t=$(( $(date +%s) - T00 ))"
peer seed-norope
echo "t=$(( $(date +%s) - T00 ))"
ncu_step seed-norope 16x16 seed_b16
echo "t=$(( $(date +%s) - T00 ))"
env_sweep seed-norope 4x16,8x16,16x16,64x16 - HM_CUDA_DT_SCAN_SEQS=64 "HM_CUDA_GEMV_ROWS=8 HM_CUDA_DT_SCAN_SEQS=64" \
  "HM_CUDA_GEMV_TC=1 HM_CUDA_GEMV_ROWS=32 HM_CUDA_DT_SCAN_SEQS=64" \
  "HM_CUDA_SKINNY=1 HM_CUDA_SKINNY_MAX_MB=64 HM_CUDA_DT_SCAN_SEQS=64"
echo "all done at $(( $(date +%s) - T00 )) s"
