#!/usr/bin/env bash
# Stop 35, call F (callE's first half): copy_many + CudaServe tests, the seed's prefix split, and
# the scan-backward patch's grad tests and one timing against the baseline binary.
. bench/device_env.sh
timeout 60 $H/bin/hm_cuda_tests --gtest_filter='CudaBackend.CopyMany*' > $R/copymany.log 2>&1; echo "copy_many test rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/copymany.log | head
timeout 90 $H/bin/hm_cuda_model_tests --gtest_filter='CudaServe.*' > $R/serve_tests.log 2>&1; echo "CudaServe rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|Expected|Which is|request" $R/serve_tests.log | head -20
mkdir -p $R/seed_default
PRESET=seed CAP=95 timeout 60 bash bench/cuda_serve.sh $HM $R/seed_default 64 > $R/seed_serve.log 2>&1
echo "seed default:"; grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/seed_default/serve_block64.log
echo "--- t $(( $(date +%s) - T00 )) s"
echo "--- t $(( $(date +%s) - T00 )) s"
timeout 40 $H/bin/hm_cuda_tests --gtest_filter='*CudaGradMamba*' > $R/grad_tests.log 2>&1; echo "grad tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/grad_tests.log | head -8
timeout 20 $H/bin/hm_bench_cuda_kernels_base scan-train > $R/bench_base_1.txt 2>&1; timeout 20 $H/bin/hm_bench_cuda_kernels scan-train > $R/bench_new_1.txt 2>&1
echo base; tail -6 $R/bench_base_1.txt; echo new; tail -6 $R/bench_new_1.txt
echo "done at $(( $(date +%s) - T00 )) s"
