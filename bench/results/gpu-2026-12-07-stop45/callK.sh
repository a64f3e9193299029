#!/usr/bin/env bash
# Prepared in stop 45 for the next session (carry .devbundle3: the build of
# ../gpu-2026-12-07-stop44/mma16_norm.patch; HM_CUDA_GEMV_TC=1 sends 9..16 rows to the
# tensor-core GEMV, the default is main's policy). Two questions callH and callJ left open:
#  1. Where a seed decode step at 16 sequences spends its ~330 us in the graph: kernel time
#     against the gaps between kernels (nsys, graph nodes traced). ncu serializes kernels with
#     cold caches, so its per-kernel sums (1.8 ms for 3 steps) say nothing about the gaps.
#  2. Why the tensor-core GEMV takes 8.2 us a launch at 16 rows (ncu: warp stall reasons,
#     issue activity, occupancy, memory throughput), beside cuBLASLt's kernel for the same
#     in_proj (2048 x 512) in the default run.
# LIMIT (seconds, default 300) cuts the later parts.
BUNDLE=.devbundle3 . bench/device_env.sh
LIMIT=${LIMIT:-300}
left() { [ $(( $(date +%s) - T00 )) -lt $(( LIMIT - $1 )) ]; }
CFG="--device cuda --config bench/cuda_peer_configs/seed-norope.json --no-peer --reps 1"
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
if [ -n "$NSYS" ]; then
  for e in - HM_CUDA_GEMV_TC=1; do
    tag=${e//[=]/_}
    env ${e/#-/} timeout 120 "$NSYS" profile --cuda-graph-trace=node -t cuda -o /tmp/nsys_$tag -f true \
      $HM bench $CFG --decode-cases 16x16 > $R/nsys_$tag.log 2>&1
    "$NSYS" stats --report cuda_gpu_trace --format csv -o $R/trace_$tag /tmp/nsys_$tag.nsys-rep >> $R/nsys_$tag.log 2>&1
    # The last 400 kernels (steady decode steps): busy time, and the gaps between one kernel's
    # end and the next one's start.
    python3 - $R/trace_${tag}_cuda_gpu_trace.csv "$e" <<'PY'
import csv,sys
rows=list(csv.DictReader(open(sys.argv[1])))
ks=[(int(r['Start (ns)']),int(r['Duration (ns)']),r['Name']) for r in rows if r.get('Duration (ns)','').isdigit()]
ks.sort(); ks=ks[-400:]
busy=sum(d for _,d,_ in ks); span=ks[-1][0]+ks[-1][1]-ks[0][0]
gaps=[ks[i+1][0]-(ks[i][0]+ks[i][1]) for i in range(len(ks)-1)]
print(sys.argv[2],'kernels',len(ks),'span us %.1f busy us %.1f (%.0f%%) mean gap us %.2f'%(span/1e3,busy/1e3,100*busy/span,sum(gaps)/len(gaps)/1e3))
import collections; c=collections.defaultdict(lambda:[0,0])
for _,d,n in ks: c[n[:60]][0]+=1; c[n[:60]][1]+=d
for n,(k,d) in sorted(c.items(),key=lambda x:-x[1][1])[:12]: print('  %4d %8.1f us %6.2f each  %s'%(k,d/1e3,d/1e3/k,n))
PY
  done
else
  echo "nsys: not found"
fi
echo "t=$(( $(date +%s) - T00 ))"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
SECT="--section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis"
left 60 && HM_CUDA_GEMV_TC=1 timeout 120 "$NCU" --clock-control none --kernel-name regex:gemv_mma_kernel --launch-skip 300 \
  --launch-count 3 $SECT $HM bench $CFG --decode-cases 16x16 > $R/ncu_tc16_detail.txt 2>&1
echo "ncu tc16 rc $?"; grep -E "Duration|Registers|Achieved Occupancy|Issue Slots Busy|Stall|Memory Throughput|Block Limit" $R/ncu_tc16_detail.txt | head -40
left 60 && timeout 120 "$NCU" --clock-control none --kernel-name regex:'nvjet|gemm|Kernel' --launch-skip 300 \
  --launch-count 3 $SECT $HM bench $CFG --decode-cases 16x16 > $R/ncu_lt16_detail.txt 2>&1
echo "ncu lt16 rc $?"; grep -E "Duration|Registers|Achieved Occupancy|Issue Slots Busy|Memory Throughput" $R/ncu_lt16_detail.txt | head -20
echo "all done at $(( $(date +%s) - T00 )) s"
