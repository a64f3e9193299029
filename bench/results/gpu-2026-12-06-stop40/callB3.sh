#!/usr/bin/env bash
# NOT YET RUN (stop 40's device time went to failed starts). First `git apply
# bench/results/gpu-2026-12-06-stop40/decode_latency.patch` (kept out of src/ until it has run),
# rebuild, bundle the new build into .devbundle and main's into .devbundle2.
# Stop 40, callB3: callB2 cut again (~4 device minutes were left after failed starts): the tests
# of the changed kernels, then old (.devbundle2) against new (.devbundle) decode at batch 1 on the
# 1.4B and 130M shapes, and a seed training step.
. bench/device_env.sh
O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundle2/hm.tar.xz -C $O
timeout 90 $H/bin/hm_cuda_tests --gtest_filter='CudaDecode*:*Scan*:*Gemv*' > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests (filtered) rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head
timeout 60 $H/bin/hm_cuda_model_tests --gtest_filter='CudaModel*:CudaTrain*' > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests (filtered) rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_model_tests.log | head
echo "t=$(( $(date +%s) - T00 ))"
dc() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f tok/s'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" $1 "$2"; }
for v in old new; do
  if [ $v = old ]; then B=$O; else B=$H; fi
  for s in mamba-1.4b mamba-130m; do
    LD_LIBRARY_PATH=$B/lib timeout 30 $B/bin/hm bench --device cuda --config bench/cuda_peer_configs/$s.json --decode-cases 1x16 --no-peer --reps 3 --json > $R/dec_${s}_$v.json 2> $R/dec_${s}_$v.log
    dc $R/dec_${s}_$v.json "$v $s:"
  done
  LD_LIBRARY_PATH=$B/lib timeout 30 $B/bin/hm bench --train --device cuda --config bench/cuda_peer_configs/seed-norope.json --batch 8 --seq-len 2048 --steps 5 --json > $R/train_seed_$v.json 2> $R/train_seed_$v.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],'ms',round(d['train_step_ms'],2))" $R/train_seed_$v.json "$v train seed"
  echo "t=$(( $(date +%s) - T00 ))"
done
echo "done at $(( $(date +%s) - T00 )) s"
