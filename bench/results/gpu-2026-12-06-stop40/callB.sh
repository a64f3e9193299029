#!/usr/bin/env bash
# NOT YET RUN (stop 40's device time went to failed starts). First `git apply
# bench/results/gpu-2026-12-06-stop40/decode_latency.patch` (kept out of src/ until it has run),
# rebuild, bundle the new build into .devbundle and main's into .devbundle2.
# Stop 40, callB: the decode step's latency chains. scan_step_kernel issues every load before
# using any (its dt_proj quarter of a row as 16-byte vectors, before pdl_wait; B, C, state, x, z
# together after it); gemv_row_kernel stages x with 16-byte loads and applies the norm's 1 / rms
# to the finished sums (one barrier instead of two). Both CUDA suites whole on the new build;
# then the old build (.devbundle2, main without the patch) against the new, alternating, twice: the
# decode-GEMV bench (skinny) and decode tok/s on the 1.4B, 130M and seed shapes; a seed training
# step (fwd_carry_kernel now issues 8 groups' loads at once).
# Shorter cuts for little device time: FILTER=1 runs only the tests of the changed kernels,
# REPLIST=1 one round of the A/B, NOTESTS=1 no tests.
. bench/device_env.sh
O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundle2/hm.tar.xz -C $O
F1=; F2=; [ -n "${FILTER:-}" ] && F1='--gtest_filter=CudaDecode*:*Scan*:*Gemv*:*Grad*' && F2='--gtest_filter=CudaModel*:CudaTrain*'
[ -n "${NOTESTS:-}" ] || timeout 300 $H/bin/hm_cuda_tests ${F1:+"$F1"} > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head
[ -n "${NOTESTS:-}" ] || timeout 200 $H/bin/hm_cuda_model_tests ${F2:+"$F2"} > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_model_tests.log | head
echo "t=$(( $(date +%s) - T00 ))"
dc() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f tok/s'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" $1 "$2"; }
for rep in ${REPLIST:-1 2}; do
  for v in old new; do
    if [ $v = old ]; then B=$O; else B=$H; fi
    LD_LIBRARY_PATH=$B/lib timeout 60 $B/bin/hm_bench_cuda_kernels skinny > $R/skinny_${v}_$rep.log 2>&1
    grep -E "m 1 " $R/skinny_${v}_$rep.log | sed -E 's/.*skinny +([a-z_]+) +m 1 .*floor +([0-9.]+) us.*gemv +([0-9.]+) us.*/'"$v"' \1 floor \2 gemv \3 us/'
    for s in mamba-1.4b mamba-130m seed-norope; do
      cases=1x16; [ $s = mamba-1.4b ] && cases=1x16,16x16,64x16
      LD_LIBRARY_PATH=$B/lib timeout 60 $B/bin/hm bench --device cuda --config bench/cuda_peer_configs/$s.json --decode-cases $cases --no-peer --reps 5 --json > $R/dec_${s}_${v}_$rep.json 2> $R/dec_${s}_${v}_$rep.log
      dc $R/dec_${s}_${v}_$rep.json "$v $s:"
    done
    LD_LIBRARY_PATH=$B/lib timeout 60 $B/bin/hm bench --train --device cuda --config bench/cuda_peer_configs/seed-norope.json --batch 8 --seq-len 2048 --steps 5 --json > $R/train_seed_${v}_$rep.json 2> $R/train_seed_${v}_$rep.log
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],'ms',round(d['train_step_ms'],2))" $R/train_seed_${v}_$rep.json "$v train seed"
  done
  echo "t=$(( $(date +%s) - T00 ))"
done
# The fused dt scan beyond 1-sequence steps, now that its dt_proj rows load as 16-byte vectors.
for n in 16 64; do
  HM_CUDA_DT_SCAN_SEQS=$n timeout 60 $HM bench --device cuda --config bench/cuda_peer_configs/mamba-1.4b.json --decode-cases 16x16,64x16 --no-peer --reps 5 --json > $R/dec_dtscan$n.json 2> $R/dec_dtscan$n.log
  dc $R/dec_dtscan$n.json "new, dt scan up to $n sequences:"
done
echo "done at $(( $(date +%s) - T00 )) s"
