#!/usr/bin/env bash
# Stop 50, carry .devbundle13 and .devbundle11h. .devbundle13 (hm, hm_cuda_tests): main + the
# chunked SSD backward's 16-byte operand reads (vector_tiles.patch) + segments (a sequence's chunks
# split over blocks when sequences x heads are few; HM_CUDA_SSD_SEGMENT_CHUNKS=n sets the segment);
# .devbundle11h: bin/hm of 9ecbbd7 (scalar tiles, one block a sequence and head), the A/B's old side.
BUNDLE=.devbundle13 . bench/device_env.sh
O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundle11h/hm.tar.xz -C $O
timeout 240 $H/bin/hm_cuda_tests --gtest_filter='*CudaGradOps*:*CudaTrain*' > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"
grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head -12
grep -B2 -A6 "Failure" $R/cuda_tests.log | head -40
echo "t=$(( $(date +%s) - T00 ))"
for rep in 1 2; do
  for c in mqar-d64-mamba2 mqar-d512-mamba2; do
    HM=$O/bin/hm mqar_step $c old$rep
    mqar_step $c new$rep
  done
done
HM=$O/bin/hm train_step mamba2-130m 8 2048 old1
train_step mamba2-130m 8 2048 new_oneseg HM_CUDA_SSD_SEGMENT_CHUNKS=100000
train_step mamba2-130m 8 2048 new_auto
echo "t=$(( $(date +%s) - T00 ))"
ncu_kernel ssd_backward_chunked m2_130m $HM bench --train --device cuda --config bench/cuda_peer_configs/mamba2-130m.json --batch 8 --seq-len 2048 --steps 1 --no-peer
echo "t=$(( $(date +%s) - T00 ))"
timeout 200 $HM bench --train --device cuda --config bench/cuda_peer_configs/mamba2-130m.json --batch 8 --seq-len 2048 \
  --steps 3 --profile --no-peer > $R/profile_m2_130m.txt 2>&1; echo "profile rc $?"; python3 -c "
import json;t=open('$R/profile_m2_130m.txt').read();j=json.loads(t[t.index('{'):]);p=j['profile']
print('step ms',j['train_step_ms']);[print('%-26s %.3f ms'%(k,v['ms_per_step'])) for k,v in sorted(p.items(),key=lambda kv:-kv[1]['ms_per_step'])[:8]]"
echo "callN2 done at $(( $(date +%s) - T00 )) s"
