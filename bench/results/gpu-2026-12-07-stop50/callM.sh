#!/usr/bin/env bash
# Stop 50, carry .devbundle11 and .devbundle10. .devbundle11: main + stop 49's
# gated_norm_backward.patch + the register-tiled chunked SSD backward; .devbundle10: main + the
# gated-norm patch only (the A/B's old side). The gradient and training suites on the new bundle
# (and on the old one if the new fails), the Mamba-2 MQAR step old/new alternating, the d 64
# profile, then stop 48's Mamba-2 MQAR sweep until LIMIT.
BUNDLE=.devbundle11 . bench/device_env.sh
O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundle10/hm.tar.xz -C $O
suites '*CudaGradOps*:*CudaTrain*'
NEWFAIL=0
if grep -q "^\[  FAILED" $R/cuda_tests.log || ! grep -q "^\[  PASSED" $R/cuda_tests.log; then
  NEWFAIL=1; cp $R/cuda_tests.log $R/cuda_tests_new.log
  timeout 150 $O/bin/hm_cuda_tests --gtest_filter='*CudaGradOps*:*CudaTrain*' > $R/cuda_tests_old.log 2>&1; echo "old hm_cuda_tests rc $?"
  grep -E "^\[  (PASSED|FAILED)|tests ran" $R/cuda_tests_old.log | head
fi
for rep in 1 2; do
  for c in mqar-d64-mamba2 mqar-d512-mamba2; do
    HM=$O/bin/hm mqar_step $c old$rep
    mqar_step $c new$rep
  done
done
echo "t=$(( $(date +%s) - T00 ))"
timeout 150 $HM bench --train --device cuda --config bench/train_configs/mqar-d64-mamba2.json --batch 512 --seq-len 64 \
  --steps 3 --profile --no-peer > $R/profile_d64.txt 2>&1; echo "profile rc $?"; python3 -c "
import json;t=open('$R/profile_d64.txt').read();j=json.loads(t[t.index('{'):]);p=j['profile']
print('step ms',j['train_step_ms']);[print('%-26s %.3f ms'%(k,v['ms_per_step'])) for k,v in sorted(p.items(),key=lambda kv:-kv[1]['ms_per_step'])[:6]]"
echo "t=$(( $(date +%s) - T00 ))"
[ $NEWFAIL = 1 ] && { echo "a test failed: no sweep"; exit 0; }
mqar_sweep mamba2,hybrid-mamba2 ${LIMIT:-570}
echo "callM done at $(( $(date +%s) - T00 )) s"
