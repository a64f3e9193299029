#!/usr/bin/env bash
# Stop 41, callB (right after callA, same warm machine and bundle): every tiling of the skinny
# GEMM on the 1.4B's decode projections (`hm_bench_cuda_kernels skinny-plans`, new in stop 41):
# do longer runs of each W row per stage (chunks of 64 or 128) or more, smaller blocks stream W
# closer to the copy rate than skinny_plan's one wave of the largest tiles of 32-wide chunks?
# Then whole decode steps with the skinny GEMM switched on.
. bench/device_env.sh
timeout 120 $H/bin/hm_bench_cuda_kernels skinny-plans > $R/skinny_plans.log 2>&1
grep -E "device|skinny-plan" $R/skinny_plans.log
echo "done at $(( $(date +%s) - T00 )) s"
# Decode at 16 and 64 sequences on the 1.4B, same binary: the default (cuBLASLt at 2-64 rows)
# against the skinny GEMM on the small linears (HM_CUDA_SKINNY=1, W <= 4 MB) and on every linear
# (HM_CUDA_SKINNY_MAX_MB=64: all but the 206 MB LM head) at chunk widths 32 and 128 (HM_CUDA_SKINNY_CHUNK).
dec() {
  env "$@" timeout 60 $HM bench --device cuda --config bench/cuda_peer_configs/mamba-1.4b.json --decode-cases 16x16,64x16 --no-peer --reps 5 --json > $R/dec_sk.json 2> $R/dec_sk.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f tok/s'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" $R/dec_sk.json "$*"
}
for rep in 1 2; do
  dec HM_CUDA_SKINNY=0
  dec HM_CUDA_SKINNY=1
  dec HM_CUDA_SKINNY=1 HM_CUDA_SKINNY_CHUNK=128
  dec HM_CUDA_SKINNY=1 HM_CUDA_SKINNY_MAX_MB=64
  dec HM_CUDA_SKINNY=1 HM_CUDA_SKINNY_MAX_MB=64 HM_CUDA_SKINNY_CHUNK=128
done
echo "done at $(( $(date +%s) - T00 )) s"
