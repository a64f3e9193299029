#!/usr/bin/env bash
# Stop 40, callA: stop 39's prepared callG (callG.patch applied: fast_grad_kernel<T, MINB>,
# HM_CUDA_FAST_GRAD_BLOCKS=3 gives it 168 registers and 3 blocks an SM). The gradient tests with
# the switch; ncu of both; training steps alternating 4 / 3 blocks; the peer on the seed shape in
# the same call, for the 1.5x target.
. bench/device_env.sh
for b in 3 4; do
HM_CUDA_FAST_GRAD_BLOCKS=$b timeout 150 $H/bin/hm_cuda_tests --gtest_filter='*Grad*:*Scan*' > $R/grad_tests$b.log 2>&1; echo "grad+scan tests ($b blocks) rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/grad_tests$b.log | head
done
HM_CUDA_FAST_GRAD_BLOCKS=3 timeout 120 $H/bin/hm_cuda_model_tests --gtest_filter='CudaTrain*' > $R/train_tests3.log 2>&1; echo "CudaTrain (3 blocks) rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/train_tests3.log | head
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for b in 4 3; do
  HM_CUDA_FAST_GRAD_BLOCKS=$b timeout 100 $NCU --clock-control none --kernel-name regex:'fast_grad_kernel' --launch-count 2 \
    --section SpeedOfLight --section SchedulerStats --section Occupancy --section InstructionStats \
    $H/bin/hm_bench_cuda_kernels scan-train > $R/ncu_fg$b.txt 2> $R/ncu_fg$b.err
  echo "blocks $b:"; grep -E "Duration|Issue Slots Busy|Registers Per|Executed Instructions  |Achieved Occupancy" $R/ncu_fg$b.txt
done
for rep in 1 2; do
  for p in seed-norope mamba-130m; do for b in 4 3; do
    HM_CUDA_FAST_GRAD_BLOCKS=$b timeout 60 $HM bench --train --device cuda --config bench/cuda_peer_configs/$p.json --batch 8 --seq-len 2048 --steps 5 --json > $R/t_${p}_${b}_$rep.json 2> $R/t_${p}_${b}_$rep.log
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],'ms',round(d['train_step_ms'],2))" $R/t_${p}_${b}_$rep.json "$p blocks $b"
  done; done
done
for b in 4 3; do
  HM_CUDA_FAST_GRAD_BLOCKS=$b timeout 60 $HM bench --train --device cuda --preset true-hybrid --batch 8 --seq-len 2048 --steps 5 --json > $R/t_th_$b.json 2> $R/t_th_$b.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],'ms',round(d['train_step_ms'],2))" $R/t_th_$b.json "true-hybrid blocks $b"
done
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
for b in 3; do
  HM_CUDA_FAST_GRAD_BLOCKS=$b PYTHONPATH=$P timeout 150 $HM bench --train --device cuda --config bench/cuda_peer_configs/seed-norope.json --batch 8 --seq-len 2048 --steps 5 --json --peer bench/cuda_peer.py > $R/seed_peer$b.json 2> $R/seed_peer$b.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));p=d['peer'];print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2),'peer ms %.2f ratio %.3f mem %.3f'%(p['ms_per_step'],d['vs_peer_tok_s'],d['vs_peer_memory']))" $R/seed_peer$b.json
done
echo "done at $(( $(date +%s) - T00 )) s"
