#!/usr/bin/env bash
# Stop 51: never found a machine (the budget went to failed starts); for the next session, with
# .devbundle18 = main + ssd_tensor_cores_chunked_forward.patch (hm, hm_cuda_tests). That is callQ's
# build with (1) the tensor-core products' float operands split into two
# tf32 parts (callQ's single tf32 pass put up to 14% into dA_log), (2) a chunked forward for
# training (ssd_forward_chunked_kernel) in place of the token-serial scan, (3) the chunked
# parameter-sum bound 5e-4. Forms by environment: HM_CUDA_SSD_FORWARD=serial (the old forward),
# HM_CUDA_SSD_THREADS, HM_CUDA_SSD_TENSOR_CORES; "serial 256 0" is main's code, "chunked 0 1" the
# new default. The suites; the 130M step at 8 x 2048 in three forms; the d 64 MQAR step; a
# profile of the default.
BUNDLE=.devbundle18 . bench/device_env.sh
timeout 120 $H/bin/hm_cuda_tests --gtest_filter='*CudaGradOps*:*CudaTrain*' > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"
grep -E "^\[  (PASSED|FAILED)|Failure|error [0-9]|tests ran" $R/cuda_tests.log | head -16
echo "t=$(( $(date +%s) - T00 ))"
env_of() { local a=${1%%:*} r=${1#*:}; echo "HM_CUDA_SSD_FORWARD=$a HM_CUDA_SSD_THREADS=${r%:*} HM_CUDA_SSD_TENSOR_CORES=${r#*:}"; }
i=0
for f in serial:256:0 serial:512:1 chunked:0:1; do
  train_step mamba2-130m 8 2048 ${f//:/_}_$((++i)) $(env_of $f)
done
echo "t=$(( $(date +%s) - T00 ))"
for f in serial:256:0 chunked:0:1; do mqar_step mqar-d64-mamba2 ${f//:/_} $(env_of $f); done
echo "t=$(( $(date +%s) - T00 ))"
timeout 60 $HM bench --train --device cuda --config bench/cuda_peer_configs/mamba2-130m.json --batch 8 --seq-len 2048 \
  --steps 3 --profile --no-peer > $R/profile_m2_130m.txt 2>&1; echo "profile rc $?"; python3 -c "
import json;t=open('$R/profile_m2_130m.txt').read();j=json.loads(t[t.index('{'):]);p=j['profile']
print('step ms',j['train_step_ms']);[print('%-26s %.3f ms'%(k,v['ms_per_step'])) for k,v in sorted(p.items(),key=lambda kv:-kv[1]['ms_per_step'])[:8]]"
echo "callS done at $(( $(date +%s) - T00 )) s"
