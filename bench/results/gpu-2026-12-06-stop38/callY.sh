#!/usr/bin/env bash
# Stop 38, the last call (run as one command line): both CUDA suites whole on the final build
# (callX's: the short scan's wide rule).
. bench/device_env.sh; timeout 170 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head; timeout 120 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_model_tests.log | head; echo "done at $(( $(date +%s) - T00 )) s"
