#!/usr/bin/env bash
# Stop 37, second call: the head's shared-memory cross-entropy rows, the fused RMSNorm backward, the
# warp-a-row RMSNorm, vectorized row adds and copies, the conv's grouped loads. Their tests, then
# training steps of the stop-36 build (.devbundle2/base.tar.xz: its hm alone) against this one and
# the peer in one call, with logits in float (default) and in bf16 (HM_CUDA_HEAD_LOGITS=type).
. bench/device_env.sh
mkdir -p /tmp/base && tar xJf .devbundle2/base.tar.xz -C /tmp/base; BASE=/tmp/base/bin/hm
timeout 200 $H/bin/hm_cuda_tests --gtest_filter='*CrossEntropyHead*:*RmsNorm*:*CopyAndAddRows*:*Conv*:*Rerun*' > $R/ops_tests.log 2>&1; echo "ops tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|error " $R/ops_tests.log | head -20
timeout 200 $H/bin/hm_cuda_model_tests --gtest_filter='CudaTrain*:CudaGradMamba*' > $R/train_tests.log 2>&1; echo "train tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/train_tests.log | head
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
show() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));p=d.get('peer');print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2),'tok/s',round(d['train_tok_s']),'mem',round(d['peak_mem_bytes']/2**30,2),('peer ms %.2f ratio %.3f'%(p['ms_per_step'],d['vs_peer_tok_s'])) if p else '')" $1; }
for s in seed-norope mamba-130m; do
  A="bench --train --device cuda --config bench/cuda_peer_configs/$s.json --batch 8 --seq-len 2048 --steps 5 --json"
  for rep in 1 2; do
    timeout 100 $BASE $A > $R/${s}_base$rep.json 2> $R/${s}_base$rep.log; show $R/${s}_base$rep.json
    timeout 100 $HM $A > $R/${s}_new$rep.json 2> $R/${s}_new$rep.log; show $R/${s}_new$rep.json
    HM_CUDA_HEAD_LOGITS=type timeout 100 $HM $A > $R/${s}_type$rep.json 2> $R/${s}_type$rep.log; show $R/${s}_type$rep.json
  done
  PYTHONPATH=$P timeout 150 $HM $A --peer bench/cuda_peer.py > $R/${s}_peer.json 2> $R/${s}_peer.log; show $R/${s}_peer.json
done
echo "--- t $(( $(date +%s) - T00 )) s"
timeout 90 $HM bench --train --device cuda --config bench/cuda_peer_configs/seed-norope.json --batch 8 --seq-len 2048 --steps 3 --profile --json > $R/profile_seed.json 2> $R/profile_seed.log
python3 - <<PY
import json; p=json.load(open('$R/profile_seed.json'))['profile']
for k,v in sorted(p.items(), key=lambda kv: -kv[1]['ms_per_step'])[:20]: print('%-28s %7.3f ms %5.1f calls' % (k, v['ms_per_step'], v['calls_per_step']))
PY
timeout 150 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head
echo "done at $(( $(date +%s) - T00 )) s"
