#!/usr/bin/env bash
# Stop 50, carry .devbundle12 and .devbundle11h (bin/hm of .devbundle11; the libraries are the same). .devbundle12: main (9ecbbd7) + the chunked SSD
# backward's tiles read as 16-byte vectors (Opd / Tile<TM, TN, kBRows>); .devbundle11: 9ecbbd7's
# scalar tiles (the A/B's old side). The gradient and training suites on the new bundle; Mamba-2
# training steps old/new alternating (MQAR d 64 and d 512 at 512 x 64; the 130M shape, d_state
# 128, at 8 x 2048); ncu of the new kernel at both head shapes; the 130M step's per-op profile.
BUNDLE=.devbundle12 . bench/device_env.sh
O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundle11h/hm.tar.xz -C $O
suites '*CudaGradOps*:*CudaTrain*'
for rep in 1 2; do
  for c in mqar-d64-mamba2 mqar-d512-mamba2; do
    HM=$O/bin/hm mqar_step $c old$rep
    mqar_step $c new$rep
  done
done
HM=$O/bin/hm train_step mamba2-130m 8 2048 old1
train_step mamba2-130m 8 2048 new1
echo "t=$(( $(date +%s) - T00 ))"
ncu_kernel ssd_backward_chunked d64 $HM bench --train --device cuda --config bench/train_configs/mqar-d64-mamba2.json --batch 512 --seq-len 64 --steps 2 --no-peer
ncu_kernel ssd_backward_chunked m2_130m $HM bench --train --device cuda --config bench/cuda_peer_configs/mamba2-130m.json --batch 8 --seq-len 2048 --steps 1 --no-peer
echo "t=$(( $(date +%s) - T00 ))"
timeout 200 $HM bench --train --device cuda --config bench/cuda_peer_configs/mamba2-130m.json --batch 8 --seq-len 2048 \
  --steps 3 --profile --no-peer > $R/profile_m2_130m.txt 2>&1; echo "profile rc $?"; python3 -c "
import json;t=open('$R/profile_m2_130m.txt').read();j=json.loads(t[t.index('{'):]);p=j['profile']
print('step ms',j['train_step_ms']);[print('%-26s %.3f ms'%(k,v['ms_per_step'])) for k,v in sorted(p.items(),key=lambda kv:-kv[1]['ms_per_step'])[:8]]"
echo "callN done at $(( $(date +%s) - T00 )) s"
