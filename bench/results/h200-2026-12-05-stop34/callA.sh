#!/usr/bin/env bash
# Stop 34, call A: the granite_rope fixture from transformers on this machine, then both CUDA
# suites in full (the HF suite reads every fixture folder, granite_rope included).
set -u
R=$OUT; T00=$(date +%s)
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
mkdir -p $R/fix
timeout 120 python3 tests/fixtures/hf/make_fixtures.py --out $R/fix --only granite_rope > $R/fix.log 2>&1; echo "fixture rc $?"; tail -3 $R/fix.log
cp -r $R/fix/granite_rope tests/fixtures/hf/ 2>/dev/null; cat $R/fix/granite_rope/expected.json 2>/dev/null | python3 -c "import json,sys; e=json.load(sys.stdin); print({k:e[k] for k in ('attention_uses_rope','rotary_dim','greedy','transformers') if k in e})"
echo "--- t $(( $(date +%s) - T00 )) s"
timeout 170 $H/bin/hm_cuda_model_tests --gtest_brief=0 > $R/model_tests.log 2>&1; echo "model tests rc $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|schedules differ|tests ran" $R/model_tests.log | head -30
grep -iE "granite_rope" $R/model_tests.log | head -5
echo "--- t $(( $(date +%s) - T00 )) s"
timeout 240 $H/bin/hm_cuda_tests --gtest_brief=0 > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head -20
echo "--- t $(( $(date +%s) - T00 )) s"
echo "--- t $(( $(date +%s) - T00 )) s"
# The CPU's blocked linear on this host's CPU (an Intel AVX-512 host: OpenBLAS may have its
# AVX-512 kernels here), 16 threads: the kernel bench and the whole-model A/B.
$H/bin/hm info --system 2>&1 | tee $R/system.txt
timeout 40 $H/bin/hm_bench_kernels --benchmark_filter='LinearRows/(prefill|rows/(1|16|64|128)/|blas/(1|16|64|128)/)' --benchmark_min_time=0.1 > $R/linear_kernels.txt 2>&1; grep -E "BM_" $R/linear_kernels.txt | awk '{print $1, $2, $NF}'
echo "done at $(( $(date +%s) - T00 )) s"
cd $R && tar czf /tmp/all.tgz . && rm -rf $R/* && mv /tmp/all.tgz $R/all.tgz
