#!/usr/bin/env bash
# Stop 39: the short scan with every load issued into registers
# before any is used (callB's staged version: 23.3 us a layer at 52 tokens, ncu: one warp per
# scheduler, half its stalls on global loads inside the staging loop). Its tests, the prefill
# A/B against callA's build (.devbundle2), ncu of the kernel; the SASS of fast_grad_kernel
# (callB's ncu: 633M instructions, 50 a state and token, 69% of issue slots busy; a plan needs
# the instruction mix, and this machine has no cuobjdump); the 1.3B serve load test with and
# without prefill graphs.
. bench/device_env.sh
B2=/tmp/hm_base; rm -rf $B2; mkdir -p $B2; tar xJf .devbundle2/hm.tar.xz -C $B2
timeout 100 $H/bin/hm_cuda_tests --gtest_filter='*Scan*:*Decode*' > $R/ops_tests.log 2>&1; echo "scan/decode tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/ops_tests.log | head
timeout 100 $H/bin/hm_cuda_model_tests > $R/model_tests.log 2>&1; echo "model tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/model_tests.log | head
C=bench/serve_configs/hybrid-1.3b.json; PC=1x52,1x16,8x52,64x4,4x64
pf() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.3f ms (host %.3f)'%(j['batch'],j['seq_len'],j['ms'],j['enqueue_ms']) for j in d['prefill']))" $1 "$2"; }
LD_LIBRARY_PATH=$B2/lib timeout 60 $B2/bin/hm bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_base.json 2> $R/pf_base.log; pf $R/pf_base.json "base eager"
timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_new.json 2> $R/pf_new.log; pf $R/pf_new.json "new eager"
LD_LIBRARY_PATH=$B2/lib HM_PREFILL_GRAPHS=1 timeout 60 $B2/bin/hm bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pfg_base.json 2> $R/pfg_base.log; pf $R/pfg_base.json "base graphs"
HM_PREFILL_GRAPHS=1 timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pfg_new.json 2> $R/pfg_new.log; pf $R/pfg_new.json "new graphs"
echo "t=$(( $(date +%s) - T00 ))"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 120 $NCU --clock-control none --kernel-name regex:'scan_short' --launch-count 1 --launch-skip 40 --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section LaunchStats --section Occupancy --section InstructionStats \
  $HM bench --device cuda --config $C --prefill-cases 1x52 --reps 3 --json > $R/ncu_short.txt 2> $R/ncu_short.err
echo "ncu short rc $? t=$(( $(date +%s) - T00 ))"
grep -E "Duration|Issue Slots Busy|Achieved Occupancy|Registers Per|No Eligible|Warp Cycles Per Issued|Executed Instructions  " $R/ncu_short.txt
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
timeout 60 $CUOBJ -sass $H/bin/hm_bench_cuda_kernels 2>&1 | awk '/Function : .*fast_grad_kernel.*bfloat/{f=1} /Function : /{if(!/fast_grad_kernel.*bfloat/)f=0} f' > $R/sass_fast_grad.txt
echo "sass lines $(wc -l < $R/sass_fast_grad.txt) ($CUOBJ)"
echo "t=$(( $(date +%s) - T00 ))"
M=/tmp/hyb13; timeout 60 $HM init --config $C --dtype BF16 --out $M > /dev/null 2>&1
MODEL=$M CAP=150 timeout 155 bash bench/cuda_serve.sh $HM $R/serve13 64 > $R/serve13.log 2>&1
grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13/serve_block64.log
HM_PREFILL_GRAPHS=1 MODEL=$M CAP=150 timeout 155 bash bench/cuda_serve.sh $HM $R/serve13g 64 > $R/serve13g.log 2>&1
echo "with prefill graphs:"; grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13g/serve_block64.log
echo "done at $(( $(date +%s) - T00 )) s"
