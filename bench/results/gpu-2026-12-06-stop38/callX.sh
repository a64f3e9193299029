#!/usr/bin/env bash
# Stop 38, after callW: the short scan for any batch of <= 256 tokens with every sequence <= 64
# (callV's wide rule gave the 64-client serve 11.9k tok/s against callW's 9.9k with the narrow
# one; uniform 8x52 and 64x16 stay on the chunked passes by the token bound). Scan tests, the
# prefill A/B against callT's build (.devbundle2), the 1.3B serve test.
. bench/device_env.sh
B2=/tmp/hm_base; rm -rf $B2; mkdir -p $B2; tar xJf .devbundle2/hm.tar.xz -C $B2
timeout 100 $H/bin/hm_cuda_tests --gtest_filter='CudaBackendOps*:*Scan*:*Conv*' > $R/ops_tests.log 2>&1; echo "ops tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/ops_tests.log | head
timeout 100 $H/bin/hm_cuda_model_tests --gtest_filter='CudaModel*' > $R/model_tests.log 2>&1; echo "CudaModel rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/model_tests.log | head
C=bench/serve_configs/hybrid-1.3b.json; PC=1x52,8x52,64x16,64x4,1x16
pf() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.3f ms (host %.3f)'%(j['batch'],j['seq_len'],j['ms'],j['enqueue_ms']) for j in d['prefill']))" $1 $2; }
LD_LIBRARY_PATH=$B2/lib timeout 60 $B2/bin/hm bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_base.json 2> $R/pf_base.log; pf $R/pf_base.json base
timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_new.json 2> $R/pf_new.log; pf $R/pf_new.json new
echo "t=$(( $(date +%s) - T00 ))"
M=/tmp/hyb13; timeout 60 $HM init --config $C --dtype BF16 --out $M > /dev/null 2>&1
MODEL=$M CAP=150 timeout 155 bash bench/cuda_serve.sh $HM $R/serve13 64 > $R/serve13.log 2>&1
grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13/serve_block64.log
echo "done at $(( $(date +%s) - T00 )) s"
