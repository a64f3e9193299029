#!/usr/bin/env bash
# Stop 37, fourth call (callN's tree): issue 16's load test on a 1.3B hybrid (bench/serve_configs/
# hybrid-1.3b.json: d 2048, 48 layers, GQA attention at 5/17/29/41, random bf16 weights), with and
# without --batch-invariant; per-op training profiles (callN's were lost to a duplicated --steps);
# True Hybrid training of the stop-36 build against this one.
. bench/device_env.sh
mkdir -p /tmp/base && tar xJf .devbundle2/base.tar.xz -C /tmp/base; BASE=/tmp/base/bin/hm
M=/tmp/hyb13; timeout 60 $HM init --config bench/serve_configs/hybrid-1.3b.json --dtype BF16 --out $M > $R/init13.log 2>&1; echo "init rc $?"; tail -1 $R/init13.log
MODEL=$M CAP=170 SERVE_ARGS=--batch-invariant timeout 175 bash bench/cuda_serve.sh $HM $R/serve13_inv 64 > $R/serve13_inv.log 2>&1; echo "serve inv rc $?"
grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13_inv/serve_block64.log
echo "--- t $(( $(date +%s) - T00 )) s"
for s in seed-norope mamba-130m; do
  timeout 90 $HM bench --train --device cuda --config bench/cuda_peer_configs/$s.json --batch 8 --seq-len 2048 --steps 3 --profile --json > $R/${s}_profile.json 2> $R/${s}_profile.log
done
python3 - <<PY
import json
for s in ['seed-norope','mamba-130m']:
  d=json.load(open('$R/%s_profile.json'%s)); p=d['profile']; print('==', s, 'step ms (profiled)', round(d['train_step_ms'],2))
  for k,v in sorted(p.items(), key=lambda kv: -kv[1]['ms_per_step'])[:16]: print('%-28s %7.3f ms %5.1f calls' % (k, v['ms_per_step'], v['calls_per_step']))
PY
show() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2),'tok/s',round(d['train_tok_s']),'mfu',round(d['mfu'],3),'mem',round(d['peak_mem_bytes']/2**30,2))" $1; }
for b in base new base new; do X=$HM; [ $b = base ] && X=$BASE
  timeout 100 $X bench --train --device cuda --preset true-hybrid --batch 8 --seq-len 2048 --steps 5 --json > $R/true_$b.json 2> $R/true_$b.log; show $R/true_$b.json
done
echo "--- t $(( $(date +%s) - T00 )) s"
MODEL=$M CAP=150 timeout 155 bash bench/cuda_serve.sh $HM $R/serve13_default 64 > $R/serve13_default.log 2>&1; echo "serve default rc $?"
grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13_default/serve_block64.log
echo "done at $(( $(date +%s) - T00 )) s"
