#!/usr/bin/env bash
# Stop 38, after callV: the short scan only where it won (a few short sequences that the chunked
# passes would cut: <= 64 tokens each, <= 128 in all; callV: 1x52 4.4 -> 3.8 ms, but 8x52 and
# 64x16 lost), the conv's short tiles only below one block per SM. Tests, the prefill A/B
# against callT's build (.devbundle2), the 1.3B serve test with the short scan on and off.
. bench/device_env.sh
B2=/tmp/hm_base; rm -rf $B2; mkdir -p $B2; tar xJf .devbundle2/hm.tar.xz -C $B2
timeout 150 $H/bin/hm_cuda_tests --gtest_filter='CudaBackendOps*:CudaDecode*:*Scan*:*Conv*' > $R/ops_tests.log 2>&1; echo "ops tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/ops_tests.log | head
timeout 150 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_model_tests.log | head
echo "t=$(( $(date +%s) - T00 ))"
C=bench/serve_configs/hybrid-1.3b.json; PC=1x52,1x128,1x256,8x52,64x16
pf() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.3f ms (host %.3f)'%(j['batch'],j['seq_len'],j['ms'],j['enqueue_ms']) for j in d['prefill']))" $1 $2; }
for rep in 1 2; do
  LD_LIBRARY_PATH=$B2/lib timeout 60 $B2/bin/hm bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_base$rep.json 2> $R/pf_base$rep.log; pf $R/pf_base$rep.json base
  timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_new$rep.json 2> $R/pf_new$rep.log; pf $R/pf_new$rep.json new
done
echo "t=$(( $(date +%s) - T00 ))"
M=/tmp/hyb13; timeout 60 $HM init --config $C --dtype BF16 --out $M > /dev/null 2>&1
MODEL=$M CAP=150 timeout 155 bash bench/cuda_serve.sh $HM $R/serve13 64 > $R/serve13.log 2>&1
grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13/serve_block64.log
echo "t=$(( $(date +%s) - T00 ))"
HM_CUDA_SCAN_SHORT_TOKENS=0 MODEL=$M CAP=150 timeout 155 bash bench/cuda_serve.sh $HM $R/serve13_noshort 64 > $R/serve13_noshort.log 2>&1
grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13_noshort/serve_block64.log
echo "done at $(( $(date +%s) - T00 )) s"
