#!/usr/bin/env bash
# Stop 51: written for the next session (no machine was left this stop). Carry .devbundle19 =
# main + ssd_tensor_cores_chunked_forward.patch (hm, hm_cuda_tests, hm_cuda_model_tests) and
# .peerdev. The patch: (1) the SSD backward's products on the tensor cores for bf16/f16, float
# operands split into two tf32 parts (callQ's single tf32 pass put up to 14% into dA_log); (2) a
# chunked forward for training and for prefill (ssd_scan_chunked: a sequence of 64+ tokens)
# in place of the token-serial scan. Forms by environment: HM_CUDA_SSD_FORWARD=serial (the old
# forward), HM_CUDA_SSD_THREADS, HM_CUDA_SSD_TENSOR_CORES; "serial 512 0" is main's code.
# 1. the suites: grad + train (every form against the cpu backend), the backend's SsdScan tests,
#    the model tests (Mamba-2 prefill + decode against the CPU); 2. the 130M step at 8 x 2048 in
#    three forms; 3. the d 64 MQAR step; 4. Mamba-2 130M prefill, old forward against new;
#    5. the peer: training at 8 x 2048, then inference.
BUNDLE=.devbundle19 . bench/device_env.sh
timeout 150 $H/bin/hm_cuda_tests --gtest_filter='*CudaGradOps*:*CudaTrain*:*SsdScan*' > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"
grep -E "^\[  (PASSED|FAILED)|Failure|error [0-9]|tests ran" $R/cuda_tests.log | head -16
timeout 150 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"
grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_model_tests.log | head -8
echo "t=$(( $(date +%s) - T00 ))"
env_of() { local a=${1%%:*} r=${1#*:}; echo "HM_CUDA_SSD_FORWARD=$a HM_CUDA_SSD_THREADS=${r%:*} HM_CUDA_SSD_TENSOR_CORES=${r#*:}"; }
i=0
for f in serial:512:0 serial:512:1 chunked:0:1 serial:512:0 chunked:0:1; do
  train_step mamba2-130m 8 2048 ${f//:/_}_$((++i)) $(env_of $f)
done
echo "t=$(( $(date +%s) - T00 ))"
for f in serial:256:0 chunked:0:1; do mqar_step mqar-d64-mamba2 ${f//:/_} $(env_of $f); done
for f in serial:0:1 chunked:0:1 serial:0:1 chunked:0:1; do
  env $(env_of $f) timeout 60 $HM bench --device cuda --config bench/cuda_peer_configs/mamba2-130m.json \
    --prefill-cases 1x2048,8x2048 --no-peer --reps 5 --json > $R/prefill_${f//:/_}_$((++i)).json 2> /dev/null
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.2f ms'%(p['batch'],p['seq_len'],p['ms']) for p in d['prefill']))" \
    $R/prefill_${f//:/_}_$i.json "prefill $f" || echo "prefill $f failed"
done
echo "t=$(( $(date +%s) - T00 ))"
timeout 100 $HM bench --train --device cuda --config bench/cuda_peer_configs/mamba2-130m.json --batch 8 --seq-len 2048 \
  --steps 3 --profile --no-peer > $R/profile_m2_130m.txt 2>&1; echo "profile rc $?"; python3 -c "
import json;t=open('$R/profile_m2_130m.txt').read();j=json.loads(t[t.index('{'):]);p=j['profile']
print('step ms',j['train_step_ms']);[print('%-26s %.3f ms'%(k,v['ms_per_step'])) for k,v in sorted(p.items(),key=lambda kv:-kv[1]['ms_per_step'])[:8]]"
train_peer mamba2-130m; echo "t=$(( $(date +%s) - T00 ))"
peer mamba2-130m; grep -E "logits|agree|error|Error" $R/peer_mamba2-130m.log | head -6
echo "callS done at $(( $(date +%s) - T00 )) s"
