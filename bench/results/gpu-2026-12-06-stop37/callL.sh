#!/usr/bin/env bash
# Stop 37, first call (stop 36's prepared callL plus a per-op profile of the seed training step):
# the CudaTrain configs added in stop 36 (Nemotron-H's relu2 MLPs with explicit head_dim, Granite's
# multipliers, Falcon-H1's layer), the copy-spans timing, the training benchmark against the peer,
# the seed step's per-op profile, then both CUDA suites whole. Carry .devbundle and .peerdev.
. bench/device_env.sh
timeout 120 $H/bin/hm_cuda_model_tests --gtest_filter='CudaTrain.BatchGrad*' > $R/train_grad.log 2>&1; echo "CudaTrain.BatchGrad rc $?"; grep -E "f32:|bf16:|PASSED|FAILED|Failure" $R/train_grad.log | head -40
timeout 30 $H/bin/hm_bench_cuda_kernels copy-spans > $R/copy_spans.txt 2>&1; cat $R/copy_spans.txt
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
for s in seed-norope mamba-130m; do
  PYTHONPATH=$P timeout 120 $HM bench --train --device cuda --config bench/cuda_peer_configs/$s.json --batch 8 --seq-len 2048 --steps 5 --peer bench/cuda_peer.py --json > $R/train_$s.json 2> $R/train_$s.log
  echo "$s rc $?"; python3 -c "import json;d=json.load(open('$R/train_$s.json'));p=d['peer'];print('ours',round(d['train_tok_s']),'peer',p['tok_s'],'ratio',round(d['vs_peer_tok_s'],3))"
done
timeout 90 $HM bench --train --device cuda --config bench/cuda_peer_configs/seed-norope.json --batch 8 --seq-len 2048 --steps 3 --profile --json > $R/profile_seed.json 2> $R/profile_seed.log
echo "profile rc $?"; python3 - <<PY
import json; d=json.load(open('$R/profile_seed.json')); p=d.get('profile',{})
items = sorted(p.items(), key=lambda kv: -(kv[1]['ms_per_step']))
for k,v in items[:30]: print(k, v)
PY
echo "--- t $(( $(date +%s) - T00 )) s"
timeout 150 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure" $R/cuda_tests.log | head
timeout 150 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure" $R/cuda_model_tests.log | head
echo "done at $(( $(date +%s) - T00 )) s"
