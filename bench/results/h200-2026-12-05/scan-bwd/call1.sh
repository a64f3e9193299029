#!/usr/bin/env bash
# scan backward (issue 15), call 1: old vs new scan-train timings, CudaGradMamba, ncu of the backward kernels.
set -u
R=$OUT
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle-a/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
echo "== old"; timeout 60 $H/bin/hm_bench_old scan-train 2>&1 | tee $R/bench_old.txt
echo "== new"; timeout 60 $H/bin/hm_bench_cuda_kernels scan-train 2>&1 | tee $R/bench_new.txt
timeout 120 $H/bin/hm_cuda_tests --gtest_brief=1 --gtest_filter='*CudaGradMamba*' > $R/grad_tests.log 2>&1; echo "grad tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|Expected|differs|max" $R/grad_tests.log | head -20
for b in old new; do
  bin=$H/bin/hm_bench_cuda_kernels; [ $b = old ] && bin=$H/bin/hm_bench_old
  timeout 90 ncu --clock-control none -k regex:grad -c 5 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats --section SchedulerStats $bin scan-train > $R/ncu_$b.txt 2>&1; echo "ncu $b rc $?"
  grep -E "^  [a-z_]+.*\(|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Executed Ipc A|Shared Memory Configuration Size|Block Limit" $R/ncu_$b.txt | head -80
done
