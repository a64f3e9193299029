#!/usr/bin/env bash
# Prepared in stop 37, not yet run: training GEMMs through cuBLASLt with algorithms per bucketed
# shape (callR: a True Hybrid step spent 164 of 187 ms in linear and linear_backward, whose row
# counts change every call). The GEMM tests (LinearBackwardBucketedRows turns both switches on),
# CudaTrain with the switches on, then True Hybrid and seed steps with and without them.
. bench/device_env.sh
# First, both suites whole with the defaults: after the last GPU run (callQ, be3428e) Gemm::linear's
# cuBLASLt path and the training products' cublasGemmEx path were moved into Gemm::gemm (0cde2ad,
# ec39d09), the same descriptors and calls by reading, not yet by running.
timeout 170 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head
timeout 170 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_model_tests.log | head
timeout 60 $H/bin/hm_cuda_tests --gtest_filter='*Linear*:*CrossEntropyHead*' > $R/ops_tests.log 2>&1; echo "ops rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/ops_tests.log | head
HM_CUDA_TRAIN_GEMM=lt HM_CUDA_GEMM_BUCKETS=1 timeout 60 $H/bin/hm_cuda_model_tests --gtest_filter='CudaTrain*' > $R/train_tests.log 2>&1; echo "CudaTrain (lt, buckets) rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/train_tests.log | head
for p in true-hybrid seed; do
  for mode in default lt; do
    E="X=1"; [ $mode = lt ] && E="HM_CUDA_TRAIN_GEMM=lt HM_CUDA_GEMM_BUCKETS=1"
    env $E timeout 60 $HM bench --train --device cuda --preset $p --batch 8 --seq-len 2048 --steps 5 --json > $R/t_${p}_$mode.json 2> $R/t_${p}_$mode.log
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2),'mfu',round(d['mfu'],3))" $R/t_${p}_$mode.json
  done
done
# Issue 16: the 1.3B hybrid's load test with the bucketed algorithms (prefill chunks of many lengths).
M=/tmp/hyb13; timeout 60 $HM init --config bench/serve_configs/hybrid-1.3b.json --dtype BF16 --out $M > /dev/null 2>&1
HM_CUDA_GEMM_BUCKETS=1 MODEL=$M CAP=150 timeout 155 bash bench/cuda_serve.sh $HM $R/serve13_buckets 64 > $R/serve13_buckets.log 2>&1
grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13_buckets/serve_block64.log
echo "done at $(( $(date +%s) - T00 )) s"
