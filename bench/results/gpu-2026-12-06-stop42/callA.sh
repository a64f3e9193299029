#!/usr/bin/env bash
# Stop 42, callA: stop 41's prepared callF (norm_linear_cuda.patch applied: the CUDA override of
# Backend::norm_linear, one GEMV with the norm fused at one row) -- its tests, then decode at
# batch 1, main's build (.devbundle2, c2160a2) against the new one (.devbundle), alternating.
# Then, in the same call, training against mamba_ssm + PyTorch on the seed and 130M shapes
# (issue 15's 1.5x / 1.2x targets need both sides in one run) and seed decode against the peer.
. bench/results/gpu-2026-12-06-stop41/callF.sh
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
for p in seed-norope mamba-130m; do
  PYTHONPATH=$P timeout 150 $HM bench --train --device cuda --config bench/cuda_peer_configs/$p.json --batch 8 --seq-len 2048 --steps 5 --json --peer bench/cuda_peer.py > $R/train_peer_$p.json 2> $R/train_peer_$p.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));p=d['peer'];print(sys.argv[2],'ours ms',round(d['train_step_ms'],2),'peer ms %.2f ratio %.3f mem %.3f'%(p['ms_per_step'],d['vs_peer_tok_s'],d['vs_peer_memory']))" $R/train_peer_$p.json $p
  echo "t=$(( $(date +%s) - T00 ))"
done
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
