#!/usr/bin/env bash
# Stop 37, third call: the tree after callM plus column sums in 8 phases (RMSNorm dw, conv dw/db,
# scale_cols) and bf16 logits by default. Both suites whole; training steps of the stop-36 build
# (.devbundle2) against this one (bf16 logits, and float logits by HM_CUDA_HEAD_LOGITS=f32) and the
# peer; the True Hybrid and Simple Hybrid presets; per-op profiles; inference (prefill, decode) of
# the stop-36 build against this one.
. bench/device_env.sh
mkdir -p /tmp/base && tar xJf .devbundle2/base.tar.xz -C /tmp/base; BASE=/tmp/base/bin/hm
timeout 170 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head
timeout 170 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|bf16:" $R/cuda_model_tests.log | head -30
echo "--- t $(( $(date +%s) - T00 )) s"
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
show() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));p=d.get('peer');print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2),'tok/s',round(d['train_tok_s']),'mfu',round(d['mfu'],3),'mem',round(d['peak_mem_bytes']/2**30,2),('peer ms %.2f ratio %.3f mem %.3f'%(p['ms_per_step'],d['vs_peer_tok_s'],d['vs_peer_memory'])) if p else '')" $1; }
for s in seed-norope mamba-130m; do
  A="bench --train --device cuda --config bench/cuda_peer_configs/$s.json --batch 8 --seq-len 2048 --steps 5 --json"
  timeout 100 $BASE $A > $R/${s}_base.json 2> $R/${s}_base.log; show $R/${s}_base.json
  HM_CUDA_HEAD_LOGITS=f32 timeout 100 $HM $A > $R/${s}_f32.json 2> $R/${s}_f32.log; show $R/${s}_f32.json
  timeout 100 $HM $A > $R/${s}_new.json 2> $R/${s}_new.log; show $R/${s}_new.json
  PYTHONPATH=$P timeout 150 $HM $A --peer bench/cuda_peer.py > $R/${s}_peer.json 2> $R/${s}_peer.log; show $R/${s}_peer.json
  timeout 90 $HM $A --steps 3 --profile > $R/${s}_profile.json 2> $R/${s}_profile.log
done
for p in seed true-hybrid; do
  timeout 100 $HM bench --train --device cuda --preset $p --batch 8 --seq-len 2048 --steps 5 --json > $R/preset_$p.json 2> $R/preset_$p.log; show $R/preset_$p.json
done
python3 - <<PY
import json
for s in ['seed-norope','mamba-130m']:
  p=json.load(open('$R/%s_profile.json'%s))['profile']; print('==', s)
  for k,v in sorted(p.items(), key=lambda kv: -kv[1]['ms_per_step'])[:14]: print('%-28s %7.3f ms %5.1f calls' % (k, v['ms_per_step'], v['calls_per_step']))
PY
echo "--- t $(( $(date +%s) - T00 )) s"
for b in base new; do X=$HM; [ $b = base ] && X=$BASE
  timeout 120 $X bench --device cuda --config bench/cuda_peer_configs/seed-norope.json --quick --no-peer --reps 2 --json > $R/infer_$b.json 2> $R/infer_$b.log; echo "infer $b rc $?"; tail -12 $R/infer_$b.log
done
echo "done at $(( $(date +%s) - T00 )) s"
