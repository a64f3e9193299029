#!/usr/bin/env bash
# Stop 52, same bundle as callS (.devbundle20) and .peerdev: the whole hm_cuda_tests suite (callS
# ran its grad, train, SSD and decode parts), Mamba-2 130M prefill in the token-serial and chunked
# forms (two rounds; callS's loop wrote every round to one file), the Mamba-1 130M decode against
# the peer (the GEMV's conv step now takes a column offset: no loss expected), and ncu's per-kernel
# times of the Mamba-2 decode step at 64 sequences.
BUNDLE=.devbundle20 . bench/device_env.sh
timeout 260 $H/bin/hm_cuda_tests > $R/cuda_tests_all.log 2>&1; echo "hm_cuda_tests (all) rc $?"
grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests_all.log | head -12
echo "t=$(( $(date +%s) - T00 ))"
for round in 1 2; do
  for f in serial chunked; do
    HM_CUDA_SSD_FORWARD=$f timeout 60 $HM bench --device cuda --config bench/cuda_peer_configs/mamba2-130m.json \
      --prefill-cases 1x2048,8x2048 --no-peer --reps 5 --json > $R/prefill_${f}_$round.json 2> /dev/null
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.2f ms'%(p['batch'],p['seq_len'],p['ms']) for p in d['prefill']))" \
      $R/prefill_${f}_$round.json "prefill $f round $round" || echo "prefill $f failed"
  done
done
echo "t=$(( $(date +%s) - T00 ))"
peer mamba-130m; echo "t=$(( $(date +%s) - T00 ))"
[ $(( $(date +%s) - T00 )) -lt 430 ] && ncu_step mamba2-130m 64x16 m2_b64 2000 150
echo "callT done at $(( $(date +%s) - T00 )) s"
