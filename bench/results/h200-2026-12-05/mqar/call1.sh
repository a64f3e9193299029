#!/usr/bin/env bash
# Call 1 (measure/check): where a d 64 / L 64 step's time goes, --jobs scaling and determinism,
# and the per-run cost over the whole grid at one lr (two budgets) to size the sweep.
set -u
R=$OUT
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle-b/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib
HM=$H/bin/hm
W=/tmp/w; rm -rf $W; mkdir -p $W
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv > $R/gpu.txt 2>&1
A=mamba,transformer,attention-2l,hybrid,hybrid-nobridge,true-soft,true-hard
C="compare --device cuda --task mqar --task-vocab 8192 --seq-lens 64 --sizes 64 --archs $A --lrs 1e-3,3e-3,1e-2 --batch 512 --budget 40 --test-examples 1000"
T0=$(date +%s)
for j in 1 4 8 16; do
  timeout 90 $HM $C --jobs $j --out $W/j$j > $W/j$j.out 2> $W/j$j.log; echo "jobs $j rc $? $(tail -1 $W/j$j.log)"
done
python3 - <<PY
import csv
def rows(j):
    return [{k:v for k,v in r.items() if k not in ('train_s',)} for r in csv.DictReader(open('$W/j%d/results.csv'%j))]
r1=rows(1)
for j in (4,8,16): print('jobs',j,'same results as jobs 1:', rows(j)==r1)
for r in csv.DictReader(open('$W/j1/results.csv')): print(r['arch'],r['lr'],r['accuracy'],r['loss'],r['train_s'],r['error'][:80])
PY
# step time: a d 64 mamba (the run's config), batch 512 x 64, bf16
CFG=$W/j1/runs/mqar_L64_d64_mamba_lr0.003/model_config.json
timeout 40 $HM bench --train --device cuda --config $CFG --batch 512 --seq-len 64 --steps 30 --reps 3 --json > $W/bench_mamba64.json 2>$W/bench_mamba64.log; echo "bench rc $?"
timeout 40 $HM bench --train --device cuda --config $CFG --batch 512 --seq-len 64 --steps 5 --reps 2 --profile --json > $W/prof_mamba64.json 2>$W/prof_mamba64.log; echo "profile rc $?"
python3 - <<PY
import json
for f in ('bench_mamba64','prof_mamba64'):
    try: d=json.load(open('$W/%s.json'%f))
    except Exception as e: print(f,'unreadable',e); continue
    print(f, {k:d[k] for k in d if k in ('train_step_ms','train_tok_s','mfu')})
    p=d.get('profile')
    if p:
        tot=sum(v['ms_per_step'] for v in p.values()); print('  profile sum %.3f ms/step over %d ops'%(tot,len(p)))
        for k,v in sorted(p.items(), key=lambda kv:-kv[1]['ms_per_step'])[:12]: print('   %-26s %8.3f ms %s'%(k,v['ms_per_step'],{x:v[x] for x in v if x!='ms_per_step'}))
PY
echo "elapsed $(( $(date +%s) - T0 )) s"
# the whole grid at one lr, two budgets, jobs 12: fixed cost per run and cost per token
for E in 5120 20480; do
  timeout 150 $HM compare --device cuda --task mqar --task-vocab 8192 --seq-lens 64,128,256 --batch 512,512,256 --sizes 64,128,256,512 --archs $A --lrs 3e-3 --examples $E --test-examples 1000 --jobs 12 --out $W/g$E > $W/g$E.out 2> $W/g$E.log; echo "grid $E rc $? $(tail -1 $W/g$E.log)"
  echo "elapsed $(( $(date +%s) - T0 )) s"
done
python3 - <<PY
import json,collections
for E in (5120,20480):
    try: d=json.load(open('$W/g%d/results.json'%E))
    except Exception as e: print(E,'unreadable',e); continue
    print(E, d.get('sweep'))
    t=collections.defaultdict(float); s=collections.defaultdict(float)
    for r in d['runs']:
        t[(r['seq_len'],r['d_model'])]+=r['train_s']; s[(r['seq_len'],r['d_model'])]+=r['score_s']
        if r.get('error'): print('  ERROR', r['arch'], r['seq_len'], r['d_model'], r['error'][:100])
    for k in sorted(t): print('  L %d d %d: train_s sum %.1f score_s sum %.1f'%(k[0],k[1],t[k],s[k]))
PY
cat $W/g20480.out
# The sweep's budget: per lr the grid costs W(E) = a + b E seconds (E examples per run); the
# sweep runs 3 lrs in one command that must end inside 480 s.
python3 - <<PY
import json
w={}
for E in (5120,20480):
    try: w[E]=json.load(open('$W/g%d/results.json'%E))['sweep']['wall_s']
    except Exception as e: print('no wall time for',E,e)
if len(w)==2:
    b=(w[20480]-w[5120])/(20480-5120); a=w[5120]-b*5120
    print('per lr: W(E) = %.1f s + %.3g s x E'%(a,b))
    for secs,name in ((480,'sweep call (480 s)'),(1200,'20 minutes')):
        E=(secs/3-a)/b
        print('%s, 3 lrs: E = %d examples per run = %.2f%% of Zoology (6.4M)'%(name,E,100*E/6.4e6))
PY
cd $W && tar czf $R/call1.tgz --exclude=checkpoint --exclude='*.safetensors' . 2>/dev/null
echo "total elapsed $(( $(date +%s) - T0 )) s"
