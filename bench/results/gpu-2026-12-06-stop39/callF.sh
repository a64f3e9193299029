#!/usr/bin/env bash
# Stop 39, the last call (276 s of device time left): HM_CUDA_NO_SPLITK_ROWS (a switch made for
# this A/B and removed after it: split-K is worth 2.3x at batch-64 decode; see README.md). Was: (off by
# default): products of at most that many rows without split-K. callE's ncu put cuBLASLt's split-K
# reduce kernels at 96 launches, 375 us, 11% of the 1.4B's batch-64 decode step; are unsplit tiles
# as fast at streaming the weights? The linear/GEMM tests with it set; then the same binary with
# and without it: decode 64 x 16 and 16 x 16 on the 1.4B, prefills 1 x 52, 8 x 52, 64 x 4 on the
# 1.3B hybrid (graphs on, as the decode step's are).
. bench/device_env.sh
HM_CUDA_NO_SPLITK_ROWS=64 timeout 60 $H/bin/hm_cuda_tests --gtest_filter='*Linear*:*Gemm*:*Skinny*' > $R/tests_nosplit.log 2>&1; echo "linear tests (no split-K <= 64 rows) rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/tests_nosplit.log | head
dc() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f tok/s'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" $1 "$2"; }
pf() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.3f ms'%(j['batch'],j['seq_len'],j['ms']) for j in d['prefill']))" $1 "$2"; }
for v in 0 64; do
  HM_CUDA_NO_SPLITK_ROWS=$v timeout 45 $HM bench --device cuda --config bench/cuda_peer_configs/mamba-1.4b.json --decode-cases 64x16,16x16 --no-peer --reps 5 --json > $R/dec_$v.json 2> $R/dec_$v.log; dc $R/dec_$v.json "no-split rows $v:"
  HM_PREFILL_GRAPHS=1 HM_CUDA_NO_SPLITK_ROWS=$v timeout 30 $HM bench --device cuda --config bench/serve_configs/hybrid-1.3b.json --prefill-cases 1x52,8x52,64x4 --reps 9 --json > $R/pf_$v.json 2> $R/pf_$v.log; pf $R/pf_$v.json "no-split rows $v:"
  echo "t=$(( $(date +%s) - T00 ))"
done
echo "done at $(( $(date +%s) - T00 )) s"
