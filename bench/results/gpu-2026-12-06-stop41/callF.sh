#!/usr/bin/env bash
# Stop 41, callF: the norm + linear composite (Backend::norm_linear: a state bridge's rmsnorm,
# projection and gated add, and the final norm + LM head, each one GEMV at one row). Tests:
# CudaDecode.* (NormLinearMatchesPlainOps is new) and the whole-model suite; then decode at
# batch 1, main's build (.devbundle2, 1420fc2) against the new one (.devbundle), alternating:
# the seed (6 bridges: 12 launches fewer a step, plus 1 at the head) and the 1.4B (1 fewer).
. bench/device_env.sh
O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundle2/hm.tar.xz -C $O
timeout 90 $H/bin/hm_cuda_tests --gtest_filter='CudaDecode*' > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests CudaDecode* rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head
timeout 120 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_model_tests.log | head
echo "t=$(( $(date +%s) - T00 ))"
dc() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f tok/s'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" $1 "$2"; }
for rep in 1 2; do
  for v in old new; do
    if [ $v = old ]; then B=$O; else B=$H; fi
    for s in seed-norope mamba-1.4b; do
      [ $s = mamba-1.4b ] && [ $rep = 2 ] && continue
      LD_LIBRARY_PATH=$B/lib timeout 60 $B/bin/hm bench --device cuda --config bench/cuda_peer_configs/$s.json --decode-cases 1x16 --no-peer --reps 5 --json > $R/dec_${s}_${v}_$rep.json 2> $R/dec_${s}_${v}_$rep.log
      dc $R/dec_${s}_${v}_$rep.json "$v $s:"
    done
  done
  echo "t=$(( $(date +%s) - T00 ))"
done
echo "done at $(( $(date +%s) - T00 )) s"
