#!/usr/bin/env bash
# Stop 51, carry .devbundle17 and .peerdev. .devbundle17: callQ's build with the tensor-core
# products' float operands split into two tf32 parts (callQ's single tf32 pass put up to 14% into
# dA_log), the chunked parameter-sum bound 5e-4, and bench/cuda_peer.py writing dt_limit's inf as
# a string. The suites; the 130M step at 8 x 2048 in each form (HM_CUDA_SSD_THREADS,
# HM_CUDA_SSD_TENSOR_CORES; 256 + 0 is main's kernel), two rounds; the d 64 MQAR step; a profile
# and an ncu pass of the default form; then the 130M against mamba_ssm's Mamba2: inference
# (logits check, prefill, decode 1/16/64) and training at 8 x 2048.
BUNDLE=.devbundle17 . bench/device_env.sh
timeout 200 $H/bin/hm_cuda_tests --gtest_filter='*CudaGradOps*:*CudaTrain*' > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"
grep -E "^\[  (PASSED|FAILED)|Failure|error [0-9]|tests ran" $R/cuda_tests.log | head -16
echo "t=$(( $(date +%s) - T00 ))"
for rep in 1 2; do
  for f in 256:0 512:0 256:1 512:1; do
    train_step mamba2-130m 8 2048 t${f/:/_}_$rep HM_CUDA_SSD_THREADS=${f%:*} HM_CUDA_SSD_TENSOR_CORES=${f#*:}
  done
  echo "t=$(( $(date +%s) - T00 ))"
done
for f in 256:0 256:1; do
  mqar_step mqar-d64-mamba2 t${f/:/_} HM_CUDA_SSD_THREADS=${f%:*} HM_CUDA_SSD_TENSOR_CORES=${f#*:}
done
timeout 100 $HM bench --train --device cuda --config bench/cuda_peer_configs/mamba2-130m.json --batch 8 --seq-len 2048 \
  --steps 3 --profile --no-peer > $R/profile_m2_130m.txt 2>&1; echo "profile rc $?"; python3 -c "
import json;t=open('$R/profile_m2_130m.txt').read();j=json.loads(t[t.index('{'):]);p=j['profile']
print('step ms',j['train_step_ms']);[print('%-26s %.3f ms'%(k,v['ms_per_step'])) for k,v in sorted(p.items(),key=lambda kv:-kv[1]['ms_per_step'])[:8]]"
ncu_kernel ssd_backward_chunked m2_130m $HM bench --train --device cuda --config bench/cuda_peer_configs/mamba2-130m.json --batch 8 --seq-len 2048 --steps 1 --no-peer
echo "t=$(( $(date +%s) - T00 ))"
peer mamba2-130m; grep -E "logits|agree|error|Error" $R/peer_mamba2-130m.log | head -6
echo "t=$(( $(date +%s) - T00 ))"
train_peer mamba2-130m
echo "callR done at $(( $(date +%s) - T00 )) s"
