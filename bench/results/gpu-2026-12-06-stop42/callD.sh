#!/usr/bin/env bash
# Prepared in stop 42, NOT RUN (the device would not start again and then had too little time
# left). To run it: `git apply bench/results/gpu-2026-12-06-stop42/greedy_sampler.patch`, build
# hm, hm_cuda_tests and hm_cuda_model_tests into .devbundle (../shared/device/bundle.sh), main's
# hm alone into .devbundle2 (bin/hm and a lib link to /tmp/hm_bundle/lib, to fit the 64 MiB
# carry), carry .devbundle, .devbundle2 and .peerdev.
# Stop 42, callD: the all-greedy sampler launch (prep + prep_finish write the tokens; the four
# sampling kernels are skipped when every row's slot has temperature 0). callC's ncu showed the
# greedy decode step running the whole chain: 7 launches a step. Sampling and attention tests,
# the whole model suite (generation goes through the device sampler), then decode, main's
# build (.devbundle2) against the new one, alternating, seed and 130M; the
# seed at b1 against the peer.
. bench/device_env.sh
suites '*Sampling*:*Attention*'
decode_ab 2 seed-norope:1x16,16x16,64x16 mamba-130m:1x16
peer_b1 seed-norope
echo "all done at $(( $(date +%s) - T00 )) s"
