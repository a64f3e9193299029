#!/usr/bin/env bash
# Stop 37, last call: the block reduction shared by both cross-entropy kernels (a refactor) and
# RMSNorm's dw pass in chunks of 32 rows (was 64): both suites whole, the training step of the tree
# before the chunk change (.devbundle2/base.tar.xz, callN's kernels) against this one, a profile,
# and the training benchmark against the peer on whatever card comes (the targets name the H200).
. bench/device_env.sh
timeout 170 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head
timeout 170 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_model_tests.log | head
echo "--- t $(( $(date +%s) - T00 )) s"
mkdir -p /tmp/base && tar xJf .devbundle2/base.tar.xz -C /tmp/base; BASE=/tmp/base/bin/hm
for s in seed-norope mamba-130m; do
  A="bench --train --device cuda --config bench/cuda_peer_configs/$s.json --batch 8 --seq-len 2048 --json"
  for b in base new base new; do X=$HM; [ $b = base ] && X=$BASE
    timeout 100 $X $A --steps 5 > $R/${s}_$b.json 2> $R/${s}_$b.log
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2))" $R/${s}_$b.json
  done
done
timeout 90 $HM bench --train --device cuda --config bench/cuda_peer_configs/seed-norope.json --batch 8 --seq-len 2048 --steps 3 --profile --json > $R/profile_seed.json 2> $R/profile_seed.log
python3 -c "import json;p=json.load(open('$R/profile_seed.json'))['profile'];[print('%-26s %7.3f ms' % (k, v['ms_per_step'])) for k,v in sorted(p.items(), key=lambda kv: -kv[1]['ms_per_step'])[:10]]"
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
show() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));p=d.get('peer');print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2),'tok/s',round(d['train_tok_s']),'mfu',round(d['mfu'],3),'mem',round(d['peak_mem_bytes']/2**30,2),('peer ms %.2f tok/s %d ratio %.3f mem %.3f'%(p['ms_per_step'],p['tok_s'],d['vs_peer_tok_s'],d['vs_peer_memory'])) if p else '')" $1; }
for s in seed-norope mamba-130m; do
  PYTHONPATH=$P timeout 150 $HM bench --train --device cuda --config bench/cuda_peer_configs/$s.json --batch 8 --seq-len 2048 --steps 5 --json --peer bench/cuda_peer.py > $R/${s}_peer.json 2> $R/${s}_peer.log; show $R/${s}_peer.json
done
echo "done at $(( $(date +%s) - T00 )) s"
