#!/usr/bin/env bash
# Prepared in stop 49 for the next session; no machine started for it (carry .devbundle9: main
# with gated_norm_backward.patch applied: the gated RMSNorm's backward, one warp a row). The
# gradient and training suites, a Mamba-2 MQAR training step (512 x 64, bench/train_configs/),
# the per-op profile of the d 64 step, then stop 48's Mamba-2 MQAR sweep (72 runs) until LIMIT.
BUNDLE=.devbundle9 . bench/device_env.sh
suites '*CudaGradOps*:*CudaTrain*'
for c in mqar-d64-mamba2 mqar-d512-mamba2; do
  mqar_step $c chunked
done
echo "t=$(( $(date +%s) - T00 ))"
timeout 150 $HM bench --train --device cuda --config bench/train_configs/mqar-d64-mamba2.json --batch 512 --seq-len 64 \
  --steps 3 --profile --no-peer > $R/profile_d64.txt 2>&1; echo "profile rc $?"; python3 -c "
import json;t=open('$R/profile_d64.txt').read();j=json.loads(t[t.index('{'):]);p=j['profile']
print('step ms',j['train_step_ms']);[print('%-26s %.3f ms'%(k,v['ms_per_step'])) for k,v in sorted(p.items(),key=lambda kv:-kv[1]['ms_per_step'])[:6]]"
echo "t=$(( $(date +%s) - T00 ))"
if grep -q "^\[  FAILED" $R/cuda_tests.log || ! grep -q "^\[  PASSED" $R/cuda_tests.log; then
  echo "a test failed: no sweep"; exit 0
fi
mqar_sweep mamba2,hybrid-mamba2 ${LIMIT:-570}
echo "callM done at $(( $(date +%s) - T00 )) s"
