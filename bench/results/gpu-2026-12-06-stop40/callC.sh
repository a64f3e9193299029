#!/usr/bin/env bash
# Stop 40, callC: decode against mamba_ssm (bf16, CUDA-graph decoding, same weights, same run) on
# the build of callB (.devbundle): batch 1, 16 and 64 after 16 tokens, on the seed (no RoPE),
# 130M and 1.4B shapes, with the bandwidth floor measured in the same run.
. bench/device_env.sh
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
for s in ${SHAPES:-mamba-1.4b seed-norope mamba-130m}; do
  PYTHONPATH=$P timeout 150 $HM bench --device cuda --config bench/cuda_peer_configs/$s.json --decode-cases 1x16,16x16,64x16 \
    --peer bench/cuda_peer.py --reps 3 --json > $R/peer_$s.json 2> $R/peer_$s.log
  python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
pd={(x['batch'],x['context']):x for x in d['peer'].get('model',{}).get('decode',[])}
for o in d['decode']:
  p=pd.get((o['batch'],o['context']),{})
  print(sys.argv[2],'%dx%d ours %.0f tok/s (%.3f of floor) peer %s ratio %s'%(o['batch'],o['context'],o['tok_s'],o.get('floor_fraction',0),
        '%.0f'%p['tok_s'] if 'tok_s' in p else '-', '%.3f'%(o['tok_s']/p['tok_s']) if 'tok_s' in p else '-'))
" $R/peer_$s.json $s
  echo "t=$(( $(date +%s) - T00 ))"
done
echo "done at $(( $(date +%s) - T00 )) s"
