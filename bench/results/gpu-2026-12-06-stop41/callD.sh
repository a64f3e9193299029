#!/usr/bin/env bash
# Stop 41, callD (after callC, same warm H100, the same .devbundle with .peerdev): the CUDA
# suites' tests that callC's filter left out, then decode against mamba_ssm on the 1.4B and seed
# shapes (stop 40's callC.sh, SHAPES cut to two).
. bench/device_env.sh
X='-CudaDecode*:*Scan*:*Gemv*:*Skinny*:*Grad*'
timeout 150 $H/bin/hm_cuda_tests --gtest_filter="$X" > $R/cuda_tests_rest.log 2>&1; echo "hm_cuda_tests (rest) rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran|SKIPPED \]" $R/cuda_tests_rest.log | head
timeout 100 $H/bin/hm_cuda_model_tests --gtest_filter='-CudaModel*:CudaTrain*' > $R/cuda_model_tests_rest.log 2>&1; echo "hm_cuda_model_tests (rest) rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran|SKIPPED \]" $R/cuda_model_tests_rest.log | head
echo "t=$(( $(date +%s) - T00 ))"
SHAPES="mamba-1.4b seed-norope" bash bench/results/gpu-2026-12-06-stop40/callC.sh
