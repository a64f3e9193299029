#!/usr/bin/env bash
# Stop 41, callA: stop 40's callB (decode_latency.patch applied and built into .devbundle; main's
# build in .devbundle2), then every tiling of the skinny GEMM on the 1.4B's decode projections
# (`hm_bench_cuda_kernels skinny-plans`, new in stop 41): does a grid of more, smaller blocks
# stream W closer to the copy rate than skinny_plan's one wave of the largest tiles?
bash bench/results/gpu-2026-12-06-stop40/callB.sh
. bench/device_env.sh
timeout 120 $H/bin/hm_bench_cuda_kernels skinny-plans > $R/skinny_plans.log 2>&1
grep -E "device|skinny-plan" $R/skinny_plans.log
echo "done at $(( $(date +%s) - T00 )) s"
# Decode at 16 and 64 sequences with the small linears (W <= 4 MB) on the skinny GEMM, the switch
# as it stands (HM_CUDA_SKINNY=1), against the default, same binary: the 1.4B on this card.
for v in 0 1; do
  HM_CUDA_SKINNY=$v timeout 60 $HM bench --device cuda --config bench/cuda_peer_configs/mamba-1.4b.json --decode-cases 16x16,64x16 --no-peer --reps 5 --json > $R/dec_skinny$v.json 2> $R/dec_skinny$v.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print('HM_CUDA_SKINNY='+sys.argv[2],' '.join('%dx%d %.0f tok/s'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" $R/dec_skinny$v.json $v
done
echo "done at $(( $(date +%s) - T00 )) s"
