#!/usr/bin/env bash
# Stop 41, callC: callA + callB cut to fit ~900 device seconds (a machine taken back mid-call
# had spent 325 s). The tests of the changed kernels (decode GEMV and scan step, the skinny GEMM
# with its new chunk widths, the gradient scans for fwd_carry, the CUDA model tests); one round
# of old (.devbundle2: main) against new (.devbundle) on decode and a seed training step; every
# tiling of the skinny GEMM; decode at 16 / 64 with the skinny GEMM on.
. bench/device_env.sh
O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundle2/hm.tar.xz -C $O
timeout 240 $H/bin/hm_cuda_tests --gtest_filter='CudaDecode*:*Scan*:*Gemv*:*Skinny*:*Grad*' > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head
timeout 150 $H/bin/hm_cuda_model_tests --gtest_filter='CudaModel*:CudaTrain*' > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_model_tests.log | head
echo "t=$(( $(date +%s) - T00 ))"
dc() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f tok/s'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" $1 "$2"; }
for v in old new old new; do
  if [ $v = old ]; then B=$O; else B=$H; fi
  for s in mamba-1.4b seed-norope; do
    cases=1x16; [ $s = mamba-1.4b ] && cases=1x16,16x16,64x16
    LD_LIBRARY_PATH=$B/lib timeout 60 $B/bin/hm bench --device cuda --config bench/cuda_peer_configs/$s.json --decode-cases $cases --no-peer --reps 5 --json > $R/dec_${s}_$v.json 2> $R/dec_${s}_$v.log
    dc $R/dec_${s}_$v.json "$v $s:"
  done
done
echo "t=$(( $(date +%s) - T00 ))"
timeout 120 $H/bin/hm_bench_cuda_kernels skinny-plans > $R/skinny_plans.log 2>&1
grep -E "device|skinny-plan" $R/skinny_plans.log
echo "t=$(( $(date +%s) - T00 ))"
for v in old new; do
  if [ $v = old ]; then B=$O; else B=$H; fi
  LD_LIBRARY_PATH=$B/lib timeout 60 $B/bin/hm bench --train --device cuda --config bench/cuda_peer_configs/seed-norope.json --batch 8 --seq-len 2048 --steps 5 --json > $R/train_seed_$v.json 2> $R/train_seed_$v.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],'ms',round(d['train_step_ms'],2))" $R/train_seed_$v.json "$v train seed"
done
dec() {
  env "$@" timeout 60 $HM bench --device cuda --config bench/cuda_peer_configs/mamba-1.4b.json --decode-cases 16x16,64x16 --no-peer --reps 5 --json > $R/dec_sk.json 2> $R/dec_sk.log
  dc $R/dec_sk.json "$*"
}
dec HM_CUDA_SKINNY=1 HM_CUDA_SKINNY_MAX_MB=64
dec HM_CUDA_SKINNY=1 HM_CUDA_SKINNY_MAX_MB=64 HM_CUDA_SKINNY_CHUNK=128
echo "done at $(( $(date +%s) - T00 )) s"
