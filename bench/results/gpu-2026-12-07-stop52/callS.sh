#!/usr/bin/env bash
# Stop 52, carry .devbundle20 (main at the stop's start + stop 51's ssd_tensor_cores_chunked_forward.patch
# + this stop's Mamba-2 decode step in the GEMVs) and .peerdev. Stop 51's callS plus:
# the decode suite (mamba_in at a conv offset, gated_norm_linear) and the Mamba-2 130M decode
# with HM_CUDA_MAMBA2_STEP=0 (the plain ops) against 1 (the fused step), then the peer.
BUNDLE=.devbundle20 . bench/device_env.sh
timeout 200 $H/bin/hm_cuda_tests --gtest_filter='*CudaGradOps*:*CudaTrain*:*SsdScan*:*CudaDecode*' > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"
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
for f in serial:0:1 chunked:0:1 serial:0:1 chunked:0:1; do  # NB: $((++i)) in the redirect below runs in the child: every round wrote _6 (callT redoes it)
  env $(env_of $f) timeout 60 $HM bench --device cuda --config bench/cuda_peer_configs/mamba2-130m.json \
    --prefill-cases 1x2048,8x2048 --no-peer --reps 5 --json > $R/prefill_${f//:/_}_$((++i)).json 2> /dev/null
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.2f ms'%(p['batch'],p['seq_len'],p['ms']) for p in d['prefill']))" \
    $R/prefill_${f//:/_}_$i.json "prefill $f" || echo "prefill $f failed"
done
echo "t=$(( $(date +%s) - T00 ))"
SWEEP_TAG=_1 env_sweep mamba2-130m 1x16,4x16,16x16,64x16 HM_CUDA_MAMBA2_STEP=0 HM_CUDA_MAMBA2_STEP=1
SWEEP_TAG=_2 env_sweep mamba2-130m 1x16,4x16,16x16,64x16 HM_CUDA_MAMBA2_STEP=0 HM_CUDA_MAMBA2_STEP=1
echo "t=$(( $(date +%s) - T00 ))"
timeout 100 $HM bench --train --device cuda --config bench/cuda_peer_configs/mamba2-130m.json --batch 8 --seq-len 2048 \
  --steps 3 --profile --no-peer > $R/profile_m2_130m.txt 2>&1; echo "profile rc $?"; python3 -c "
import json;t=open('$R/profile_m2_130m.txt').read();j=json.loads(t[t.index('{'):]);p=j['profile']
print('step ms',j['train_step_ms']);[print('%-26s %.3f ms'%(k,v['ms_per_step'])) for k,v in sorted(p.items(),key=lambda kv:-kv[1]['ms_per_step'])[:8]]"
train_peer mamba2-130m; echo "t=$(( $(date +%s) - T00 ))"
peer mamba2-130m; grep -E "logits|agree|error|Error" $R/peer_mamba2-130m.log | head -6
# Per-kernel times of the Mamba-2 decode step at 64 sequences (ncu), where time is left.
[ $(( $(date +%s) - T00 )) -lt 420 ] && ncu_step mamba2-130m 64x16 m2_b64 2000 150
echo "callS done at $(( $(date +%s) - T00 )) s"
