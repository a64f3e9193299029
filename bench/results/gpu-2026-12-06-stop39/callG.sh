#!/usr/bin/env bash
# Prepared in stop 39 after its device time ran out, NOT YET RUN. First `git apply
# bench/results/gpu-2026-12-06-stop39/callG.patch` and rebuild (stop 39 kept the unrun kernel
# variant out of src/): the scan backward's big kernel
# with room for 168 registers (HM_CUDA_FAST_GRAD_BLOCKS=3: 3 blocks an SM instead of 4; ptxas
# here: 168 registers used, the same few bytes of stack). callB/callC: fast_grad 878 us at E 1536,
# B 8, L 2048, issue-bound (69% of issue slots), 50 instructions a state and token, ~93 of its
# reverse loop's 251 a token index work that the 128-register cap makes the compiler redo. Its
# tests with the switch; ncu times of both; training steps A/B (seed, 130M, true-hybrid).
. bench/device_env.sh
HM_CUDA_FAST_GRAD_BLOCKS=3 timeout 120 $H/bin/hm_cuda_tests --gtest_filter='*Grad*' > $R/grad_tests3.log 2>&1; echo "grad tests (3 blocks) rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/grad_tests3.log | head
HM_CUDA_FAST_GRAD_BLOCKS=3 timeout 100 $H/bin/hm_cuda_model_tests --gtest_filter='CudaTrain*' > $R/train_tests3.log 2>&1; echo "CudaTrain (3 blocks) rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/train_tests3.log | head
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for b in 4 3; do
  HM_CUDA_FAST_GRAD_BLOCKS=$b timeout 100 $NCU --clock-control none --kernel-name regex:'fast_grad_kernel' --launch-count 2 \
    --section SpeedOfLight --section SchedulerStats --section Occupancy --section InstructionStats \
    $H/bin/hm_bench_cuda_kernels scan-train > $R/ncu_fg$b.txt 2> $R/ncu_fg$b.err
  echo "blocks $b:"; grep -E "Duration|Issue Slots Busy|Registers Per|Executed Instructions  |Achieved Occupancy" $R/ncu_fg$b.txt
done
for rep in 1 2; do
  for p in seed true-hybrid; do for b in 4 3; do
    HM_CUDA_FAST_GRAD_BLOCKS=$b timeout 60 $HM bench --train --device cuda --preset $p --batch 8 --seq-len 2048 --steps 5 --json > $R/t_${p}_${b}_$rep.json 2> $R/t_${p}_${b}_$rep.log
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],'ms',round(d['train_step_ms'],2))" $R/t_${p}_${b}_$rep.json "$p blocks $b"
  done; done
  for b in 4 3; do
    HM_CUDA_FAST_GRAD_BLOCKS=$b timeout 60 $HM bench --train --device cuda --config bench/cuda_peer_configs/mamba-130m.json --batch 8 --seq-len 2048 --steps 5 --json > $R/t_130m_${b}_$rep.json 2> $R/t_130m_${b}_$rep.log
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],'ms',round(d['train_step_ms'],2))" $R/t_130m_${b}_$rep.json "130M blocks $b"
  done
done
echo "done at $(( $(date +%s) - T00 )) s"
