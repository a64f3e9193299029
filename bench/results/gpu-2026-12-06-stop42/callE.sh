#!/usr/bin/env bash
# Prepared in stop 42, NOT RUN (the device would not start again and then had too little time
# left). To run it: `git apply bench/results/gpu-2026-12-06-stop42/linear_bridge_cuda.patch`, build
# hm, hm_cuda_tests and hm_cuda_model_tests into .devbundle (../shared/device/bundle.sh), main's
# hm alone into .devbundle2 (bin/hm and a lib link to /tmp/hm_bundle/lib, to fit the 64 MiB
# carry), carry .devbundle, .devbundle2 and .peerdev.
# Stop 42, callE: Backend::linear_bridge on CUDA (one GEMV at one row: a layer's output projection
# and the next layer's state bridge over the same inner vector; the seed's 6 bridges fold into
# the layer before, 6 launches fewer a step, predicted ~12 us of ~200). Its test and the decode
# suite, the whole model suite, then decode, main's build (.devbundle2) against the new one,
# alternating, seed (130M: no bridges, must not move); the seed at b1 against the peer.
. bench/device_env.sh
suites '*CudaDecode*:*Gemv*'
decode_ab 2 seed-norope:1x16,16x16,64x16 mamba-130m:1x16
peer_b1 seed-norope
echo "all done at $(( $(date +%s) - T00 )) s"
