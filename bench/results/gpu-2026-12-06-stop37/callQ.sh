#!/usr/bin/env bash
# Stop 37, callP's fix: the shared-memory cross-entropy kernel's dynamic limit now leaves room for
# the kernel's own static shared memory (callP: cudaFuncSetAttribute refused the old limit once both
# block reductions had their own arrays). The tests callP failed, a profile, the peer.
. bench/device_env.sh
timeout 120 $H/bin/hm_cuda_tests --gtest_filter='*CrossEntropyHead*:*Rerun*:*RmsNorm*' > $R/ops_tests.log 2>&1; echo "ops tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/ops_tests.log | head
timeout 120 $H/bin/hm_cuda_model_tests --gtest_filter='CudaTrain*' > $R/train_tests.log 2>&1; echo "CudaTrain rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/train_tests.log | head
timeout 90 $HM bench --train --device cuda --config bench/cuda_peer_configs/seed-norope.json --batch 8 --seq-len 2048 --steps 3 --profile --json > $R/profile_seed.json 2> $R/profile_seed.log
python3 -c "import json;p=json.load(open('$R/profile_seed.json'))['profile'];[print('%-26s %7.3f ms' % (k, v['ms_per_step'])) for k,v in sorted(p.items(), key=lambda kv: -kv[1]['ms_per_step'])[:10]]"
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
for s in seed-norope mamba-130m; do
  PYTHONPATH=$P timeout 120 $HM bench --train --device cuda --config bench/cuda_peer_configs/$s.json --batch 8 --seq-len 2048 --steps 5 --json --peer bench/cuda_peer.py > $R/${s}_peer.json 2> $R/${s}_peer.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));p=d['peer'];print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2),'peer ms %.2f ratio %.3f mem %.3f'%(p['ms_per_step'],d['vs_peer_tok_s'],d['vs_peer_memory']))" $R/${s}_peer.json
done
echo "done at $(( $(date +%s) - T00 )) s"
