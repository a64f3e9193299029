#!/usr/bin/env bash
# scan backward (issue 15), call 2 (the tree at 88c2d3f + next-unverified.patch, built into .devbundle-a/hm.tar.xz):
# the CudaGradMamba tests first (under timeout), then timings, both CUDA suites, ncu of the backward kernels, SASS.
set -u
R=$OUT
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle-a/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib
timeout 120 $H/bin/hm_cuda_tests --gtest_brief=1 --gtest_filter='*CudaGradMamba*' > $R/grad_tests.log 2>&1; echo "grad tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|differs" $R/grad_tests.log | head -20
timeout 60 $H/bin/hm_bench_cuda_kernels scan-train 2>&1 | tee $R/bench.txt
timeout 150 $H/bin/hm_cuda_tests --gtest_brief=1 > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head -8
timeout 120 $H/bin/hm_cuda_model_tests --gtest_brief=1 > $R/model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure" $R/model_tests.log | head -8
timeout 90 ncu --clock-control none -k regex:grad -c 5 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats --section SchedulerStats $H/bin/hm_bench_cuda_kernels scan-train > $R/ncu.txt 2>&1; echo "ncu rc $?"
grep -E "^  [a-z_ ]+.*\(|Duration|Registers Per|Achieved Occupancy|Executed Ipc A|Executed Instructions  |Issue Slots Busy|Memory Throughput" $R/ncu.txt | sed -E 's/\(const .*//; s/\(ScanTrain.*//' | head -60
cuobjdump -sass $H/bin/hm_bench_cuda_kernels | awk '/Function : /{f=($0 ~ /fast_grad.*nv_bfloat/)} f' > $R/sass.txt; wc -l $R/sass.txt
