#!/usr/bin/env bash
# Prepared in stop 38, not yet run (the session's device time was spent): where the scan
# backward's time goes, kernel by kernel (ncu; callU's filter reached only the forward's kernels,
# its launch count ran out first), at the 130M's width (E 1536, B 8, L 2048, bf16), and whether
# grad_carry_kernel (loads batched 8 groups at a time) is as slow as the forward's carry
# (callU: fwd_carry_kernel 79 us, unbatched). Then the 1.3B hybrid's 52-token prefill per kernel
# again after the short-prefill changes (callU: 4.8 ms of GPU time before them). Then the
# prefill graphs written after the device time ran out (HM_PREFILL_GRAPHS=1, off by default):
# their test, and the same prefills with and without them (the host's ~3.5 ms of launches in a
# 52-token step against its ~3 ms of GPU work).
. bench/device_env.sh
# First, both suites whole: after callY, aef2573 changed the decode graphs' cache key (an int ->
# a vector) and added the prefill graphs (off by default; their test is in hm_cuda_model_tests).
timeout 200 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head
timeout 150 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|graph vs eager" $R/cuda_model_tests.log | head -20
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 150 $NCU --clock-control none --kernel-name regex:'fast_grad|grad_carry|grad_bc|grad_param' --launch-count 20 \
  --metrics gpu__time_duration.sum --csv --page raw $H/bin/hm_bench_cuda_kernels scan-train > $R/ncu_scan_bwd.csv 2> $R/ncu_scan_bwd.err
echo "ncu scan bwd rc $? t=$(( $(date +%s) - T00 ))"
timeout 200 $NCU --clock-control none --launch-count 4000 --metrics gpu__time_duration.sum --csv --page raw \
  $HM bench --device cuda --config bench/serve_configs/hybrid-1.3b.json --prefill-cases 1x52 --reps 1 --json > $R/ncu_prefill52.csv 2> $R/ncu_prefill52.err
echo "ncu prefill rc $? t=$(( $(date +%s) - T00 ))"
A=bench/results/gpu-2026-12-06-stop38/ncu_table.py
python3 $A $R/ncu_scan_bwd.csv list
python3 $A $R/ncu_prefill52.csv forward 416
C=bench/serve_configs/hybrid-1.3b.json; PC=1x52,1x256,8x52,64x4
pf() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.3f ms (host %.3f)'%(j['batch'],j['seq_len'],j['ms'],j['enqueue_ms']) for j in d['prefill']))" $1 "$2"; }
for rep in 1 2; do
  timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_eager$rep.json 2> $R/pf_eager$rep.log; pf $R/pf_eager$rep.json eager
  HM_PREFILL_GRAPHS=1 timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_graph$rep.json 2> $R/pf_graph$rep.log; pf $R/pf_graph$rep.json "prefill graphs"
done
echo "done at $(( $(date +%s) - T00 )) s"
