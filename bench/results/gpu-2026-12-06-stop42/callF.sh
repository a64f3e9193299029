#!/usr/bin/env bash
# Prepared in stop 42, NOT RUN. The three prepared patches at once (each also has its own test):
#   git apply bench/results/gpu-2026-12-06-stop42/{greedy_sampler,linear_bridge_cuda,kv_attention_cuda}.patch
# then build hm, hm_cuda_tests and hm_cuda_model_tests into .devbundle, main's hm alone into
# .devbundle2 (bin/hm + a lib link to /tmp/hm_bundle/lib), carry .devbundle, .devbundle2, .peerdev.
# Predicted for the seed at batch 1: ~200 -> ~175 us a step (4 sampler launches, 6 bridges and
# 3 kv_writes fewer at ~2 us each), ~5,700 tok/s, ~1.95-2.0x the peer.
. bench/device_env.sh
O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundle2/hm.tar.xz -C $O
timeout 200 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head
timeout 150 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_model_tests.log | head
echo "t=$(( $(date +%s) - T00 ))"
for rep in 1 2; do
  for v in old new; do
    if [ $v = old ]; then B=$O; else B=$H; fi
    for s in seed-norope mamba-130m; do
      cases=1x16,16x16,64x16; [ $s = mamba-130m ] && cases=1x16
      LD_LIBRARY_PATH=$B/lib timeout 60 $B/bin/hm bench --device cuda --config bench/cuda_peer_configs/$s.json --decode-cases $cases --no-peer --reps 5 --json > $R/dec_${s}_${v}_$rep.json 2> $R/dec_${s}_${v}_$rep.log
      python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" $R/dec_${s}_${v}_$rep.json "$v $s tok/s:"
    done
  done
  echo "t=$(( $(date +%s) - T00 ))"
done
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
PYTHONPATH=$P timeout 90 $HM bench --device cuda --config bench/cuda_peer_configs/seed-norope.json --decode-cases 1x16 --peer bench/cuda_peer.py --reps 3 --json > $R/peer_seed.json 2> $R/peer_seed.log
python3 -c "
import json,sys
d=json.load(open(sys.argv[1])); o=d['decode'][0]; p=d['peer']['model']['decode'][0]
print('seed 1x16 ours %.0f tok/s (%.3f of floor) peer %.0f ratio %.3f'%(o['tok_s'],o.get('floor_fraction',0),p['tok_s'],o['tok_s']/p['tok_s']))
" $R/peer_seed.json
echo "all done at $(( $(date +%s) - T00 )) s"
