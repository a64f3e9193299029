#!/usr/bin/env bash
# Stop 39: the short scan's loads predicated on the sequence's length (callC loaded all 64 rows:
# 64 x 4 tokens 4.80 -> 5.76 ms with graphs), and the server's idle step budget (while no request
# decodes, a prompt takes up to --idle-step-tokens, default 2048, a step). Both CUDA suites whole;
# the prefill A/B against callA's build (.devbundle2); the 1.3B serve load test with the new
# default and with --idle-step-tokens 512 (the old rule), in one call.
. bench/device_env.sh
B2=/tmp/hm_base; rm -rf $B2; mkdir -p $B2; tar xJf .devbundle2/hm.tar.xz -C $B2
timeout 200 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head
timeout 150 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_model_tests.log | head
echo "t=$(( $(date +%s) - T00 ))"
C=bench/serve_configs/hybrid-1.3b.json; PC=1x52,1x16,8x52,64x4,4x64
pf() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.3f ms (host %.3f)'%(j['batch'],j['seq_len'],j['ms'],j['enqueue_ms']) for j in d['prefill']))" $1 "$2"; }
LD_LIBRARY_PATH=$B2/lib timeout 60 $B2/bin/hm bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_base.json 2> $R/pf_base.log; pf $R/pf_base.json "base eager"
timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_new.json 2> $R/pf_new.log; pf $R/pf_new.json "new eager"
LD_LIBRARY_PATH=$B2/lib HM_PREFILL_GRAPHS=1 timeout 60 $B2/bin/hm bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pfg_base.json 2> $R/pfg_base.log; pf $R/pfg_base.json "base graphs"
HM_PREFILL_GRAPHS=1 timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pfg_new.json 2> $R/pfg_new.log; pf $R/pfg_new.json "new graphs"
echo "t=$(( $(date +%s) - T00 ))"
M=/tmp/hyb13; timeout 60 $HM init --config $C --dtype BF16 --out $M > /dev/null 2>&1
MODEL=$M CAP=150 timeout 155 bash bench/cuda_serve.sh $HM $R/serve13 64 > $R/serve13.log 2>&1
echo "idle budget 2048 (default):"; grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13/serve_block64.log
SERVE_ARGS="--idle-step-tokens 512" MODEL=$M CAP=150 timeout 155 bash bench/cuda_serve.sh $HM $R/serve13old 64 > $R/serve13old.log 2>&1
echo "idle budget 512 (the old rule):"; grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13old/serve_block64.log
echo "done at $(( $(date +%s) - T00 )) s"
