#!/usr/bin/env bash
# Stop 39: the short scan in two sizes (sequences <= 16 tokens: a quarter of the registers and
# shared memory; callD's one size made 64 x 4 tokens slower than stop 38's kernel, 4.78 -> 5.47 ms
# with graphs). Both CUDA suites whole on this final build; the prefill A/B against callA's build
# (.devbundle2); then ncu kernel tables of the 1.4B's decode step at batch 64 and 1 (issue 13's
# b64 1.5x and b1 0.6-of-floor targets, for the next stop's plan).
. bench/device_env.sh
B2=/tmp/hm_base; rm -rf $B2; mkdir -p $B2; tar xJf .devbundle2/hm.tar.xz -C $B2
timeout 200 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head
timeout 150 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_model_tests.log | head
echo "t=$(( $(date +%s) - T00 ))"
C=bench/serve_configs/hybrid-1.3b.json; PC=1x52,1x16,8x52,64x4,4x64,16x16
pf() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.3f ms (host %.3f)'%(j['batch'],j['seq_len'],j['ms'],j['enqueue_ms']) for j in d['prefill']))" $1 "$2"; }
for rep in 1 2; do
  LD_LIBRARY_PATH=$B2/lib HM_PREFILL_GRAPHS=1 timeout 60 $B2/bin/hm bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pfg_base$rep.json 2> $R/pfg_base$rep.log; pf $R/pfg_base$rep.json "base graphs"
  HM_PREFILL_GRAPHS=1 timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pfg_new$rep.json 2> $R/pfg_new$rep.log; pf $R/pfg_new$rep.json "new graphs"
done
LD_LIBRARY_PATH=$B2/lib timeout 60 $B2/bin/hm bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_base.json 2> $R/pf_base.log; pf $R/pf_base.json "base eager"
timeout 60 $HM bench --device cuda --config $C --prefill-cases $PC --reps 9 --json > $R/pf_new.json 2> $R/pf_new.log; pf $R/pf_new.json "new eager"
echo "t=$(( $(date +%s) - T00 ))"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for case in 64x16 1x16; do
  timeout 100 $NCU --clock-control none --launch-skip 3000 --launch-count 900 --metrics gpu__time_duration.sum --csv --page raw \
    $HM bench --device cuda --config bench/cuda_peer_configs/mamba-1.4b.json --decode-cases $case --no-peer --reps 3 > $R/ncu_dec_$case.csv 2> $R/ncu_dec_$case.err
  echo "ncu decode $case rc $? t=$(( $(date +%s) - T00 ))"
  gzip $R/ncu_dec_$case.csv
done
echo "done at $(( $(date +%s) - T00 )) s"
