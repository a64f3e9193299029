#!/usr/bin/env bash
# Stop 42, callC: the attention decode kernels (split, combine) and kv_write launched with
# programmatic dependent launch (each may start while the kernel before it finishes; the GEMV
# after the combine may prefetch its weights). Both whole suites; decode of the seed, main's
# build (.devbundle2, cf5238a) against the new one (.devbundle), alternating; per-kernel GPU
# times of a seed decode step under ncu (bench/cuda_kernel_profile.sh's method); the peer at b1.
. bench/device_env.sh
O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundle2/hm.tar.xz -C $O
timeout 200 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head
timeout 150 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_model_tests.log | head
echo "t=$(( $(date +%s) - T00 ))"
dc() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" $1 "$2"; }
for rep in 1 2; do
  for v in old new; do
    if [ $v = old ]; then B=$O; else B=$H; fi
    LD_LIBRARY_PATH=$B/lib timeout 60 $B/bin/hm bench --device cuda --config bench/cuda_peer_configs/seed-norope.json --decode-cases 1x16,16x16,64x16 --no-peer --reps 5 --json > $R/dec_${v}_$rep.json 2> $R/dec_${v}_$rep.log
    dc $R/dec_${v}_$rep.json "$v seed tok/s:"
  done
  echo "t=$(( $(date +%s) - T00 ))"
done
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  timeout -k 5 120 "$NCU" --clock-control none --launch-skip 3000 --launch-count 240 --metrics gpu__time_duration.sum --csv --page raw \
    $HM bench --device cuda --config bench/cuda_peer_configs/seed-norope.json --decode-cases 1x16 --no-peer --reps 1 > $R/ncu_seed.csv 2> $R/ncu_seed.err
  echo "ncu rc $?"; python3 - $R/ncu_seed.csv <<'PY'
import csv,sys,collections
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>5]
if len(rows)<3: print('ncu: no rows'); sys.exit()
h=rows[0]; ki=h.index('Kernel Name'); ti=h.index('gpu__time_duration.sum')
unit=rows[1][ti]; f={'nsecond':1e-3,'usecond':1.0,'msecond':1e3}.get(unit,1e-3)*1000
ks=[(r[ki][:60],float(r[ti].replace(',',''))*f) for r in rows[2:] if r[ti].replace(',','').replace('.','',1).isdigit()]
print('unit',unit,'kernels',len(ks),'sum us %.1f'%(sum(t for _,t in ks)/1000))
c=collections.defaultdict(lambda:[0,0.0])
for k,t in ks: c[k][0]+=1; c[k][1]+=t
for k,(n,t) in sorted(c.items(),key=lambda x:-x[1][1])[:16]: print('%5d %9.1f us %6.2f us each  %s'%(n,t/1000,t/1000/n,k))
PY
fi
echo "t=$(( $(date +%s) - T00 ))"
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
PYTHONPATH=$P timeout 120 $HM bench --device cuda --config bench/cuda_peer_configs/seed-norope.json --decode-cases 1x16 --peer bench/cuda_peer.py --reps 3 --json > $R/peer_seed.json 2> $R/peer_seed.log
python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
pd={(x['batch'],x['context']):x for x in d['peer'].get('model',{}).get('decode',[])}
for o in d['decode']:
  p=pd.get((o['batch'],o['context']),{})
  print('seed %dx%d ours %.0f tok/s (%.3f of floor) peer %s ratio %s'%(o['batch'],o['context'],o['tok_s'],o.get('floor_fraction',0),
        '%.0f'%p['tok_s'] if 'tok_s' in p else '-', '%.3f'%(o['tok_s']/p['tok_s']) if 'tok_s' in p else '-'))
" $R/peer_seed.json
echo "all done at $(( $(date +%s) - T00 )) s"
