#!/usr/bin/env bash
# Stop 51, carry .devbundle16 and .peerdev. .devbundle16 (hm, hm_cuda_tests): main 921c746 +
# stop 50's ct512.patch and update_g_lambda.patch + tensor-core (tf32 mma) products in the chunked
# SSD backward for bf16/f16, each form chosen at run time (HM_CUDA_SSD_THREADS=256|512,
# HM_CUDA_SSD_TENSOR_CORES=0|1; 256 + 0 is main's kernel). The gradient and training suites
# (every form against the cpu backend); the Mamba-2 130M step at 8 x 2048 and the d 64 MQAR step
# in each form, two rounds; then the 130M against mamba_ssm's Mamba2 (training at 8 x 2048, and
# inference: logits check, prefill, decode at 1, 16, 64).
BUNDLE=.devbundle16 . bench/device_env.sh
timeout 200 $H/bin/hm_cuda_tests --gtest_filter='*CudaGradOps*:*CudaTrain*' > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"
grep -E "^\[  (PASSED|FAILED)|Failure|error [0-9]|tests ran" $R/cuda_tests.log | head -16
echo "t=$(( $(date +%s) - T00 ))"
for rep in 1 2; do
  for f in 256:0 512:0 256:1 512:1; do
    train_step mamba2-130m 8 2048 t${f/:/_}_$rep HM_CUDA_SSD_THREADS=${f%:*} HM_CUDA_SSD_TENSOR_CORES=${f#*:}
  done
  echo "t=$(( $(date +%s) - T00 ))"
done
for f in 256:0 512:0 256:1 512:1; do
  mqar_step mqar-d64-mamba2 t${f/:/_} HM_CUDA_SSD_THREADS=${f%:*} HM_CUDA_SSD_TENSOR_CORES=${f#*:}
done
echo "t=$(( $(date +%s) - T00 ))"
train_peer mamba2-130m; echo "t=$(( $(date +%s) - T00 ))"
peer mamba2-130m; grep -E "logits|agree|error|Error" $R/peer_mamba2-130m.log | head -5
echo "callQ done at $(( $(date +%s) - T00 )) s"
