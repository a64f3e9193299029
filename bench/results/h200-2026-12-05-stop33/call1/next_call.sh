#!/usr/bin/env bash
# For the next session with a device (written in stop 32, not run): checks what stop 32 wrote
# after its device time was spent. Bundle build-cuda/{hm,hm_cuda_tests,hm_cuda_model_tests} into
# .devbundle/hm.tar.xz, copy this file into .devbundle/, run `bash .devbundle/next_call.sh`
# with carry [".devbundle"], timeout 600.
#  1. both CUDA suites: CudaBackendOps.KvWriteAttention's new head sizes (48, 80, 20, 256) run
#     attention_any_hd_kernel; if they pass, drop the HM_CUDA_UNVERIFIED gate in
#     CudaBackend::attention. The embedding backward's counting sort is covered by CudaTrain.
#  2. the MQAR cell that hit NaN in bf16 (true-hard d 256 L 64 lr 1e-2), in f32 and bf16 on CUDA:
#     the CPU in f32 trained it without NaN.
#  3. the d 64 Mamba step profile: embedding_backward was 4.2 of 10.6 ms with the stable sort.
#  4. true-demo (head_dim 48) served on CUDA through the new kernel.
#  5. true-hybrid served again: serve_load_test.py now gives the miss's steps, forward and
#     checkpoint time and evictions. Stop 32's miss cost 59 ms against 23 without the cache; the
#     suspects are a cudaMalloc per cached block and a synchronizing cudaFree per eviction.
set -u
R=$OUT
T00=$(date +%s)
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib
HM=$H/bin/hm
nvidia-smi --query-gpu=name,memory.used --format=csv
timeout 150 $H/bin/hm_cuda_tests --gtest_brief=1 > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head -20
timeout 100 $H/bin/hm_cuda_model_tests --gtest_brief=1 > $R/model_tests.log 2>&1; echo "model tests rc $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure" $R/model_tests.log | head -20
for dt in f32 bf16; do
  timeout 60 $HM compare --device cuda --dtype $dt --task mqar --task-vocab 8192 --seq-lens 64 --sizes 256 --archs true-hard \
    --lrs 1e-2 --batch 512 --examples 51525 --test-examples 1000 --out /tmp/nan_$dt > $R/nan_$dt.txt 2> $R/nan_$dt.log
  echo "true-hard d256 L64 lr 1e-2 $dt rc $?: $(tail -n1 $R/nan_$dt.log | cut -c1-200)"
done
W=/tmp/w; rm -rf $W; mkdir -p $W
timeout 40 $HM compare --device cuda --task mqar --task-vocab 8192 --seq-lens 64 --sizes 64 --archs mamba --lrs 3e-3 \
  --batch 512 --budget 5 --test-examples 100 --out $W/m > /dev/null 2>&1
CFG=$W/m/runs/mqar_L64_d64_mamba_lr0.003/model_config.json
timeout 40 $HM bench --train --device cuda --config $CFG --batch 512 --seq-len 64 --steps 30 --reps 3 --json > $R/bench_mamba64.json 2>/dev/null; echo "bench rc $?"
timeout 40 $HM bench --train --device cuda --config $CFG --batch 512 --seq-len 64 --steps 5 --reps 2 --profile --json > $R/prof_mamba64.json 2>/dev/null; echo "profile rc $?"
python3 - <<PY
import json
for f in ('bench_mamba64','prof_mamba64'):
    try: d=json.load(open('$R/%s.json'%f))
    except Exception as e: print(f,'unreadable',e); continue
    print(f, {k:d[k] for k in d if k in ('train_step_ms','train_tok_s','mfu')})
    for k,v in sorted(d.get('profile',{}).items(), key=lambda kv:-kv[1]['ms_per_step'])[:6]: print('   %-26s %8.3f ms'%(k,v['ms_per_step']))
PY
mkdir -p $R/serve
HM_CUDA_UNVERIFIED=1 PRESET=true-demo CAP=110 bash bench/cuda_serve.sh $HM $R/serve 64; tail -14 $R/serve/serve_block64.log
mkdir -p $R/serve_th
PRESET=true-hybrid CAP=120 bash bench/cuda_serve.sh $HM $R/serve_th 64; grep prefix_tokens $R/serve_th/serve_block64.log
echo "done at $(( $(date +%s) - T00 )) s"
cd $R && tar czf /tmp/all.tgz . && rm -rf $R/* && mv /tmp/all.tgz $R/all.tgz; ls -la $R
