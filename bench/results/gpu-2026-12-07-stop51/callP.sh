#!/usr/bin/env bash
# Stop 51, carry .devbundle15 and .peerdev. .devbundle15 (hm, hm_cuda_tests): main at 921c746, with
# the segment choice by resident blocks (one segment a sequence unless sequences x heads leave SMs
# idle). The gradient and training suites; the Mamba-2 130M training step at 8 x 2048; then the
# same model against mamba_ssm's Mamba2 (Triton SSD kernels) on the same weights: training at
# 8 x 2048, and inference (logits check, prefill, decode at 1, 16, 64 sequences).
BUNDLE=.devbundle15 . bench/device_env.sh
timeout 240 $H/bin/hm_cuda_tests --gtest_filter='*CudaGradOps*:*CudaTrain*' > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"
grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head -12
train_step mamba2-130m 8 2048 auto
echo "t=$(( $(date +%s) - T00 ))"
train_peer mamba2-130m; echo "t=$(( $(date +%s) - T00 ))"
peer mamba2-130m; grep -E "logits|agree|error|Error" $R/peer_mamba2-130m.log | head -5
echo "callP done at $(( $(date +%s) - T00 )) s"
