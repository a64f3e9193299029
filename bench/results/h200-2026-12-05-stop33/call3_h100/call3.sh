#!/usr/bin/env bash
# stop 33 call 3: both suites (pool, batch-invariant GEMM/model tests, flash-kernel decode, hd 48);
# seed served with and without --batch-invariant; true-demo served (hd 48); MQAR NaN vs --jobs.
set -u
R=$OUT; T00=$(date +%s)
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib; HM=$H/bin/hm
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 $H/bin/hm_cuda_tests --gtest_brief=0 > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|default mode" $R/cuda_tests.log | head -40
timeout 150 $H/bin/hm_cuda_model_tests --gtest_brief=0 > $R/model_tests.log 2>&1; echo "model tests rc $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|schedules differ|rel err" $R/model_tests.log | head -40
echo "--- t $(( $(date +%s) - T00 )) s"
for mode in default inv; do
  mkdir -p $R/seed_$mode
  SA=""; [ $mode = inv ] && SA="--batch-invariant"
  SERVE_ARGS="$SA" PRESET=seed CAP=90 bash bench/cuda_serve.sh $HM $R/seed_$mode 64
  echo "seed $mode:"; grep -E "^\| (1|8|64) \||hit|miss|no cache" $R/seed_$mode/serve_block64.log
done
echo "--- t $(( $(date +%s) - T00 )) s"
mkdir -p $R/demo_inv
HM_CUDA_UNVERIFIED=1 SERVE_ARGS="--batch-invariant" PRESET=true-demo CAP=90 bash bench/cuda_serve.sh $HM $R/demo_inv 64
echo "true-demo inv:"; grep -E "^\| (1|8|64) \||hit|miss|no cache" $R/demo_inv/serve_block64.log
echo "--- t $(( $(date +%s) - T00 )) s"
for j in 1 4; do
  timeout 60 $HM compare --device cuda --task mqar --task-vocab 8192 --seq-lens 64 --batch 512 --sizes 256,512 --archs true-soft,true-hard \
    --lrs 1e-2 --examples 51525 --test-examples 1000 --jobs $j --out /tmp/nan_j$j > $R/nan_j$j.txt 2> $R/nan_j$j.log
  echo "jobs $j rc $? $(tail -n1 $R/nan_j$j.log | cut -c1-150) NaN lines: $(grep -c NaN $R/nan_j$j.log)"
  cp /tmp/nan_j$j/results.csv $R/nan_j$j.csv 2>/dev/null
done
diff <(cut -d, -f1-8 $R/nan_j1.csv) <(cut -d, -f1-8 $R/nan_j4.csv) > /dev/null && echo "jobs 1 and 4: same rows" || echo "jobs 1 and 4 DIFFER"
echo "done at $(( $(date +%s) - T00 )) s"
cd $R && tar czf /tmp/all.tgz . && rm -rf $R/* && mv /tmp/all.tgz $R/all.tgz
