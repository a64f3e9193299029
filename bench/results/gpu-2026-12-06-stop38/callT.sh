#!/usr/bin/env bash
# Stop 38, after callS (the GEMM switches held: True Hybrid step 129.6 -> 58.7 ms, the seed's
# unchanged, every test passed): both switches made the default. Both suites whole with the new
# defaults; training steps new defaults against the old route (HM_CUDA_TRAIN_GEMM=ex
# HM_CUDA_GEMM_BUCKETS=0) for seed, 130M and True Hybrid; the peer; per-kernel times of the scan's
# training kernels (ncu); the 1.3B hybrid's 52-token prefill (the serve test's hit step), time
# against the host's time inside the call (bench --prefill-cases).
. bench/device_env.sh
timeout 200 $H/bin/hm_cuda_tests > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head
timeout 150 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_model_tests.log | head
echo "t=$(( $(date +%s) - T00 ))"
for p in true-hybrid seed; do
  for mode in new old; do
    E="X=1"; [ $mode = old ] && E="HM_CUDA_TRAIN_GEMM=ex HM_CUDA_GEMM_BUCKETS=0"
    env $E timeout 60 $HM bench --train --device cuda --preset $p --batch 8 --seq-len 2048 --steps 5 --json > $R/t_${p}_$mode.json 2> $R/t_${p}_$mode.log
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2),'mfu',round(d['mfu'],3))" $R/t_${p}_$mode.json
  done
done
P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
for s in seed-norope mamba-130m; do
  HM_CUDA_TRAIN_GEMM=ex HM_CUDA_GEMM_BUCKETS=0 timeout 60 $HM bench --train --device cuda --config bench/cuda_peer_configs/$s.json --batch 8 --seq-len 2048 --steps 5 --json > $R/${s}_old.json 2> $R/${s}_old.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2))" $R/${s}_old.json
  PYTHONPATH=$P timeout 120 $HM bench --train --device cuda --config bench/cuda_peer_configs/$s.json --batch 8 --seq-len 2048 --steps 5 --json --peer bench/cuda_peer.py > $R/${s}_peer.json 2> $R/${s}_peer.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));p=d['peer'];print(sys.argv[1].split('/')[-1],'ms',round(d['train_step_ms'],2),'peer ms %.2f ratio %.3f mem %.3f'%(p['ms_per_step'],d['vs_peer_tok_s'],d['vs_peer_memory']))" $R/${s}_peer.json
done
echo "t=$(( $(date +%s) - T00 ))"
# The 1.3B hybrid's prefill at the hit's 52 tokens (and 256, 2036 for scale).
timeout 90 $HM bench --device cuda --config bench/serve_configs/hybrid-1.3b.json --prefill-cases 1x52,1x256,1x2036 --reps 9 --json > $R/prefill13.json 2> $R/prefill13.log
python3 -c "import json;d=json.load(open('$R/prefill13.json'));[print('prefill 1.3B %dx%d: %.3f ms, host in call %.3f ms, floor %.3f ms'%(j['batch'],j['seq_len'],j['ms'],j['enqueue_ms'],j['floor_ms'])) for j in d['prefill']]"
# Per-kernel GPU times of the scan's training forward and backward (bf16, B 8, E 1536, L 2048).
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 120 $NCU --clock-control none --kernel-name regex:'grad|fwd|carry|neg_exp|offsets|param' --launch-count 40 \
  --metrics gpu__time_duration.sum --csv --page raw $H/bin/hm_bench_cuda_kernels scan-train > $R/ncu_scan.csv 2> $R/ncu_scan.err
echo "ncu rc $?"
python3 - $R/ncu_scan.csv <<'PY'
import csv,sys,collections
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>5]
h=rows[0]; ki=h.index('Kernel Name'); ti=h.index('gpu__time_duration.sum'); print('unit', rows[1][ti])
d=collections.defaultdict(list)
for r in rows[2:]:
    try: d[r[ki][:60]].append(float(r[ti]))
    except: pass
for k,v in d.items(): v.sort(); print('%-60s n %2d median %9.1f us'%(k,len(v),v[len(v)//2]/1e3 if max(v)>1e5 else v[len(v)//2]))
PY
echo "done at $(( $(date +%s) - T00 )) s"
