#!/usr/bin/env bash
# Stop 46, call L (carry .devbundle4: main with the folded state bridge, HM_CUDA_FOLD_BRIDGE=0
# turns it off). 1. both CUDA suites; 2. the seed shape at 16 / 64 sequences with the fold on and
# off, alternating, two rounds; 3. nsys (graph nodes traced) of a 16-sequence seed step, fold on
# and off: kernels a step, busy time against the gaps; 4. the peer at 16 / 64 sequences.
# LIMIT (seconds, default 330) cuts the later parts.
BUNDLE=.devbundle4 . bench/device_env.sh
LIMIT=${LIMIT:-330}
left() { [ $(( $(date +%s) - T00 )) -lt $(( LIMIT - $1 )) ]; }
suites
for rep in 1 2; do
  SWEEP_TAG=_r$rep env_sweep seed-norope 16x16,64x16 - HM_CUDA_FOLD_BRIDGE=0
done
echo "t=$(( $(date +%s) - T00 ))"
CFG="--device cuda --config bench/cuda_peer_configs/seed-norope.json --no-peer --reps 1"
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
if [ -n "$NSYS" ]; then
  for e in - HM_CUDA_FOLD_BRIDGE=0; do
    left 90 || break
    tag=${e//[=]/_}
    env ${e/#-/} timeout 100 "$NSYS" profile --cuda-graph-trace=node -t cuda -o /tmp/nsys_$tag -f true \
      $HM bench $CFG --decode-cases 16x16 > $R/nsys_$tag.log 2>&1
    "$NSYS" stats --report cuda_gpu_trace --format csv -o $R/trace_$tag /tmp/nsys_$tag.nsys-rep >> $R/nsys_$tag.log 2>&1
    python3 - $R/trace_${tag}_cuda_gpu_trace.csv "$e" $R/step_$tag.txt <<'PY'
import csv,sys,collections
rows=list(csv.DictReader(open(sys.argv[1])))
ks=[(int(r['Start (ns)']),int(r['Duration (ns)']),r['Name']) for r in rows if r.get('Duration (ns)','').isdigit()]
ks.sort(); ks=ks[-400:]
busy=sum(d for _,d,_ in ks); span=ks[-1][0]+ks[-1][1]-ks[0][0]
gaps=[ks[i+1][0]-(ks[i][0]+ks[i][1]) for i in range(len(ks)-1)]
print(sys.argv[2],'kernels',len(ks),'span us %.1f busy us %.1f (%.0f%%) mean gap us %.2f'%(span/1e3,busy/1e3,100*busy/span,sum(gaps)/len(gaps)/1e3))
c=collections.defaultdict(lambda:[0,0])
for _,d,n in ks: c[n[:60]][0]+=1; c[n[:60]][1]+=d
for n,(k,d) in sorted(c.items(),key=lambda x:-x[1][1])[:16]: print('  %4d %8.1f us %6.2f each  %s'%(k,d/1e3,d/1e3/k,n))
# one step: the kernels between two consecutive sampler launches
idx=[i for i,(_,_,n) in enumerate(ks) if 'argmax' in n.lower() or 'sampl' in n.lower()]
if len(idx)>=3:
  a,b=idx[-3],idx[-2]; st=ks[a+1:b+1]
  print('  one step: %d kernels, %.1f us span, %.1f us busy'%(len(st),(st[-1][0]+st[-1][1]-st[0][0])/1e3,sum(d for _,d,_ in st)/1e3))
  with open(sys.argv[3],'w') as f:
    for s,d,n in st: f.write('%7.2f %6.2f  %s\n'%((s-st[0][0])/1e3,d/1e3,n[:90]))
PY
  done
else
  echo "nsys: not found"
fi
echo "t=$(( $(date +%s) - T00 ))"
left 100 && peer seed-norope 16x16,64x16
echo "all done at $(( $(date +%s) - T00 )) s"
