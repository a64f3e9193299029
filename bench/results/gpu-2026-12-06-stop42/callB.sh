#!/usr/bin/env bash
# Stop 42, callB: callA's fix (the f32 norm_linear kept a bridge's scale) and the attention
# layer's q | k | v as one projection with the pre-norm inside it (one GEMV at batch 1 instead
# of rmsnorm + three linears). Both whole suites; then decode, main's build (.devbundle2,
# c2160a2) against the new one (.devbundle), alternating; then the seed against the peer.
. bench/device_env.sh
O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundle2/hm.tar.xz -C $O
timeout 200 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head
timeout 150 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_model_tests.log | head
echo "t=$(( $(date +%s) - T00 ))"
dc() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" $1 "$2"; }
for rep in 1 2; do
  for v in old new; do
    if [ $v = old ]; then B=$O; else B=$H; fi
    for s in seed-norope mamba-1.4b; do
      cases=1x16,16x16,64x16; [ $s = mamba-1.4b ] && cases=1x16
      LD_LIBRARY_PATH=$B/lib timeout 60 $B/bin/hm bench --device cuda --config bench/cuda_peer_configs/$s.json --decode-cases $cases --no-peer --reps 5 --json > $R/dec_${s}_${v}_$rep.json 2> $R/dec_${s}_${v}_$rep.log
      dc $R/dec_${s}_${v}_$rep.json "$v $s tok/s:"
    done
  done
  echo "t=$(( $(date +%s) - T00 ))"
done
# The GEMV and fused decode stages above one row (HM_CUDA_GEMV_ROWS, new; tensor cores past 8
# rows): do small models gain at batch 16, where every op is a launch-bound cuBLASLt call?
for s in seed-norope mamba-130m mamba-1.4b; do
  for env in "X=0" "HM_CUDA_GEMV_ROWS=16 HM_CUDA_GEMV_TC=1" "HM_CUDA_GEMV_ROWS=16 HM_CUDA_GEMV_TC=1 HM_CUDA_DT_SCAN_SEQS=16" "HM_CUDA_GEMV_ROWS=4 HM_CUDA_DT_SCAN_SEQS=4"; do
    tag=$(echo $env | tr ' =' '_-')
    env $env timeout 60 $HM bench --device cuda --config bench/cuda_peer_configs/$s.json --decode-cases 16x16,4x16 --no-peer --reps 5 --json > $R/rows_${s}_$tag.json 2> $R/rows_${s}_$tag.log
    dc $R/rows_${s}_$tag.json "$s [$env] tok/s:"
  done
done
echo "t=$(( $(date +%s) - T00 ))"
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
PYTHONPATH=$P timeout 150 $HM bench --device cuda --config bench/cuda_peer_configs/seed-norope.json --decode-cases 1x16,16x16,64x16 --peer bench/cuda_peer.py --reps 3 --json > $R/peer_seed.json 2> $R/peer_seed.log
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
