#!/usr/bin/env bash
# Stop 37: training GEMMs through cuBLASLt with algorithms per bucketed shape (callR: a True Hybrid
# step spent 164 of 187 ms in linear and linear_backward, whose row counts change every call). The
# GEMM tests, CudaTrain, and the True Hybrid and seed steps (and the seed with cublasGemmEx).
. bench/device_env.sh
timeout 60 $H/bin/hm_cuda_tests --gtest_filter='*Linear*:*CrossEntropyHead*' > $R/ops_tests.log 2>&1; echo "ops rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/ops_tests.log | head
timeout 60 $H/bin/hm_cuda_model_tests --gtest_filter='CudaTrain*' > $R/train_tests.log 2>&1; echo "CudaTrain rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/train_tests.log | head
for v in "true-hybrid" "seed" "seed HM_CUDA_TRAIN_GEMM=blas"; do set -- $v
  env ${2:-X=1} timeout 40 $HM bench --train --device cuda --preset $1 --batch 8 --seq-len 2048 --steps 5 --json > $R/t_$1${2:+_blas}.json 2> $R/t_$1${2:+_blas}.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2),'mfu',round(d['mfu'],3))" $R/t_$1${2:+_blas}.json
done
echo "done at $(( $(date +%s) - T00 )) s"
