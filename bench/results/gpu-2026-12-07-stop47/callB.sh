#!/usr/bin/env bash
# Stop 47, callB (same bundle as callA): per-kernel GPU times of decode steps at 64 sequences
# (the 130M and 1.4B, furthest from the 1.5x target), training against mamba_ssm + PyTorch on
# the seed and 130M shapes (issue 15's targets name the H200; no H200 figure yet), and per-kernel
# times of seed training steps with grid sizes (which GEMMs lose).
BUNDLE=.devbundle4 . bench/device_env.sh
LIMIT=${LIMIT:-570}
left() { [ $(( $(date +%s) - T00 )) -lt $(( LIMIT - $1 )) ]; }
ncu_step mamba-130m 64x16 130m_64 3000 260
ncu_step mamba-1.4b 64x16 1.4b_64 3000 500
echo "t=$(( $(date +%s) - T00 ))"
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; { [ -f .peerdev/src.tar.xz ] && tar xJf .peerdev/src.tar.xz -C $P || cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/; }
for p in seed-norope mamba-130m; do
  left 90 || break
  PYTHONPATH=$P timeout 120 $HM bench --train --device cuda --config bench/cuda_peer_configs/$p.json --batch 8 --seq-len 2048 --steps 5 --json --peer bench/cuda_peer.py > $R/train_peer_$p.json 2> $R/train_peer_$p.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));p=d['peer'];print(sys.argv[2],'ours ms',round(d['train_step_ms'],2),'peer ms %.2f ratio %.3f mem %.3f'%(p['ms_per_step'],d['vs_peer_tok_s'],d['vs_peer_memory']))" $R/train_peer_$p.json $p
  echo "t=$(( $(date +%s) - T00 ))"
done
# Per-kernel GPU times of seed training steps under ncu (no clock control), with grid sizes, so
# the GEMMs that lose can be named: launches after the warm-up, summed by kernel and grid.
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ] && left 70; then
  timeout -k 5 $(( LIMIT - $(date +%s) + T00 - 15 )) "$NCU" --clock-control none --launch-skip ${NCU_SKIP:-1200} --launch-count ${NCU_COUNT:-1200} \
    --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size --csv --page raw \
    $HM bench --train --device cuda --config bench/cuda_peer_configs/seed-norope.json --batch 8 --seq-len 2048 --steps 3 --json \
    > $R/ncu_train.csv 2> $R/ncu_train.err
  echo "ncu train rc $?"; python3 - $R/ncu_train.csv <<'PY' | tee $R/ncu_train.txt
import csv,sys,collections
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>5]
if len(rows)<3: print('ncu: no rows'); sys.exit()
i=[k for k,r in enumerate(rows) if 'Kernel Name' in r][0]; rows=rows[i:]  # the --json line comes first
h=rows[0]; ki=h.index('Kernel Name'); ti=h.index('gpu__time_duration.sum'); gi=h.index('launch__grid_size'); bi=h.index('launch__block_size')
unit=rows[1][ti]; f={'nsecond':1e-3,'usecond':1.0,'msecond':1e3}.get(unit,1e-3)
num=lambda s: s.replace(',','').replace('.','',1).isdigit()
ks=[(r[ki][:90],r[gi],r[bi],float(r[ti].replace(',',''))*f) for r in rows[2:] if num(r[ti])]
print('unit',unit,'kernels',len(ks),'sum us %.1f'%sum(k[3] for k in ks))
c=collections.defaultdict(lambda:[0,0.0])
for k,g,b,t in ks: c[(k,g,b)][0]+=1; c[(k,g,b)][1]+=t
for (k,g,b),(n,t) in sorted(c.items(),key=lambda x:-x[1][1])[:60]: print('%5d %9.1f us %8.2f each grid %6s blk %4s  %s'%(n,t,t/n,g,b,k))
PY
fi
echo "callA done at $(( $(date +%s) - T00 )) s"
