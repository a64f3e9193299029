#!/usr/bin/env bash
# Stop 39, after callA (= stop 38's callZ): the short scan with every input staged in shared
# memory before the walk (callA's ncu: scan_short_kernel 28 us a layer at 52 tokens, 1.24 of the
# 4.13 ms of GPU time). Its tests; the prefill A/B against callA's build (.devbundle2), eager and
# with prefill graphs; ncu sections of the scan backward's two big kernels (callA: fast_grad
# 878 us, fast_grad_local 350 us at E 1536, B 8, L 2048) to see what limits them;
# (callC: the 1.3B serve load test with and without prefill graphs.)
. bench/device_env.sh
B2=/tmp/hm_base; rm -rf $B2; mkdir -p $B2; tar xJf .devbundle2/hm.tar.xz -C $B2
timeout 100 $H/bin/hm_cuda_tests --gtest_filter='*Scan*:*Decode*' > $R/ops_tests.log 2>&1; echo "scan/decode tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/ops_tests.log | head
timeout 100 $H/bin/hm_cuda_model_tests > $R/model_tests.log 2>&1; echo "model tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/model_tests.log | head
C=bench/serve_configs/hybrid-1.3b.json; PC=1x52,1x16,8x52,64x4,4x64
pf() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.3f ms (host %.3f)'%(j['batch'],j['seq_len'],j['ms'],j['enqueue_ms']) for j in d['prefill']))" $1 "$2"; }
for rep in 1 2; do
  LD_LIBRARY_PATH=$B2/lib timeout 60 $B2/bin/hm bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_base$rep.json 2> $R/pf_base$rep.log; pf $R/pf_base$rep.json "base eager"
  timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_new$rep.json 2> $R/pf_new$rep.log; pf $R/pf_new$rep.json "new eager"
  LD_LIBRARY_PATH=$B2/lib HM_PREFILL_GRAPHS=1 timeout 60 $B2/bin/hm bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pfg_base$rep.json 2> $R/pfg_base$rep.log; pf $R/pfg_base$rep.json "base graphs"
  HM_PREFILL_GRAPHS=1 timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pfg_new$rep.json 2> $R/pfg_new$rep.log; pf $R/pfg_new$rep.json "new graphs"
done
echo "t=$(( $(date +%s) - T00 ))"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 120 $NCU --clock-control none --kernel-name regex:'scan_short' --launch-count 1 --launch-skip 40 --set full \
  $HM bench --device cuda --config $C --prefill-cases 1x52 --reps 3 --json > $R/ncu_short.txt 2> $R/ncu_short.err
echo "ncu short rc $? t=$(( $(date +%s) - T00 ))"
timeout 150 $NCU --clock-control none --kernel-name regex:'fast_grad' --launch-count 2 --set full \
  $H/bin/hm_bench_cuda_kernels scan-train > $R/ncu_fastgrad.txt 2> $R/ncu_fastgrad.err
echo "ncu fast_grad rc $? t=$(( $(date +%s) - T00 ))"
grep -E "^  [a-z_:<>, ]*kernel|Duration|Issue Slots Busy|Achieved Occupancy|Theoretical Occupancy|Registers Per|Shared Memory Config|Block Limit|No Eligible|Issued Warp Per|Warp Cycles Per Issued|Compute \(SM\) Throughput|Memory Throughput" $R/ncu_short.txt $R/ncu_fastgrad.txt | head -60
echo "done at $(( $(date +%s) - T00 )) s"
