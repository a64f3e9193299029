#!/usr/bin/env bash
# Prepared in stop 47 for the next session's first call (carry .devbundle4 built from main, and
# .peerdev): both CUDA suites whole, then every target of issues 13 and 15 against the peer in one
# call on main's defaults: decode at 1 / 16 / 64 sequences on the seed, 130M and 1.4B shapes, and
# training on the seed and 130M shapes (8 x 2048). On an H200 these are the issues' own figures.
BUNDLE=.devbundle4 . bench/device_env.sh
LIMIT=${LIMIT:-570}
left() { [ $(( $(date +%s) - T00 )) -lt $(( LIMIT - $1 )) ]; }
suites
for s in seed-norope mamba-130m mamba-1.4b; do left 100 && peer $s 1x16,16x16,64x16; done
echo "t=$(( $(date +%s) - T00 ))"
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; { [ -f .peerdev/src.tar.xz ] && tar xJf .peerdev/src.tar.xz -C $P || cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/; }
for p in seed-norope mamba-130m; do
  left 60 || break
  PYTHONPATH=$P timeout 120 $HM bench --train --device cuda --config bench/cuda_peer_configs/$p.json --batch 8 --seq-len 2048 --steps 5 --json --peer bench/cuda_peer.py > $R/train_peer_$p.json 2> $R/train_peer_$p.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));p=d['peer'];print(sys.argv[2],'ours ms',round(d['train_step_ms'],2),'peer ms %.2f ratio %.3f mem %.3f'%(p['ms_per_step'],d['vs_peer_tok_s'],d['vs_peer_memory']))" $R/train_peer_$p.json $p
done
echo "callE done at $(( $(date +%s) - T00 )) s"
