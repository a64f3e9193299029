#!/usr/bin/env bash
# Prepared in stop 42, NOT RUN. The three prepared patches at once (each also has its own test):
#   git apply bench/results/gpu-2026-12-06-stop42/{greedy_sampler,linear_bridge_cuda,kv_attention_cuda}.patch
# then build hm, hm_cuda_tests and hm_cuda_model_tests into .devbundle, main's hm alone into
# .devbundle2 (bin/hm + a lib link to /tmp/hm_bundle/lib), carry .devbundle, .devbundle2, .peerdev.
# Predicted for the seed at batch 1: ~200 -> ~175 us a step (4 sampler launches, 6 bridges and
# 3 kv_writes fewer at ~2 us each), ~5,700 tok/s, ~1.95-2.0x the peer.
. bench/device_env.sh
suites
decode_ab 2 seed-norope:1x16,16x16,64x16 mamba-130m:1x16
peer_b1 seed-norope
echo "all done at $(( $(date +%s) - T00 )) s"
