#!/usr/bin/env bash
# Stop 38: where the GPU time goes (ncu, one kernel at a time) in (1) the 1.3B hybrid's 52-token
# prefill, the serve test's hit step (callT: 4.50 ms, of which 3.07 ms host time inside the call,
# so the GPU is behind, not the host), and (2) the scan's training forward and backward (bf16,
# B 8, E 1536, L 2048).
. bench/device_env.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 200 $NCU --clock-control none --launch-count 4000 --metrics gpu__time_duration.sum --csv --page raw \
  $HM bench --device cuda --config bench/serve_configs/hybrid-1.3b.json --prefill-cases 1x52 --reps 1 --json > $R/ncu_prefill52.csv 2> $R/ncu_prefill52.err
echo "ncu prefill rc $? t=$(( $(date +%s) - T00 ))"
timeout 150 $NCU --clock-control none --kernel-name regex:'grad|pf_fwd|fwd_carry|_param|neg_exp' --launch-count 30 \
  --metrics gpu__time_duration.sum --csv --page raw $H/bin/hm_bench_cuda_kernels scan-train > $R/ncu_scan.csv 2> $R/ncu_scan.err
echo "ncu scan rc $? t=$(( $(date +%s) - T00 ))"
cat > /tmp/agg.py <<'PY'
import csv,sys,collections
lines=open(sys.argv[1]).read().splitlines()
i=[k for k,l in enumerate(lines) if l.startswith('"ID"')][0]
rows=list(csv.reader(lines[i:]))
h=rows[0]; ki=h.index('Kernel Name'); ti=h.index('gpu__time_duration.sum'); gi=h.index('launch__grid_size'); bi=h.index('launch__block_size')
seq=[(r[ki].split('(')[0].replace('void ','').replace('hm::cuda::','').replace('(anonymous namespace)::',''), float(r[ti].replace(',',''))/1e3, r[gi], r[bi]) for r in rows[2:]]
if sys.argv[2]=='forward':
    emb=[k for k,s in enumerate(seq) if 'embedding' in s[0]]
    mine=[k for k in emb if int(seq[k][2].replace(',',''))==int(sys.argv[3])]  # the 52-token forwards
    print('kernels', len(seq), 'embedding launches', len(emb), 'of the case', mine)
    nxt=[k for k in emb if k>mine[-1]]
    last=seq[mine[-1]:(nxt[0] if nxt else len(seq))]
    tot=sum(s[1] for s in last); print('last forward: %d kernels, %.1f us of GPU time'%(len(last),tot))
    agg=collections.defaultdict(lambda:[0,0.0])
    for n,t,g,b in last: agg[n[:90]][0]+=1; agg[n[:90]][1]+=t
    for n,(c,t) in sorted(agg.items(), key=lambda kv:-kv[1][1])[:25]: print('%-90s n %3d  %8.1f us  (%.1f each)'%(n,c,t,t/c))
else:
    for n,t,g,b in seq: print('%-70s %9.1f us grid %7s blk %4s'%(n[:70],t,g,b))
PY
python3 /tmp/agg.py $R/ncu_prefill52.csv forward 416
python3 /tmp/agg.py $R/ncu_scan.csv list
echo "done at $(( $(date +%s) - T00 )) s"
