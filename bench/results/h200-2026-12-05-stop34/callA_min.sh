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
timeout 150 $H/bin/hm_cuda_model_tests --gtest_brief=0 --gtest_filter="CudaHf*:CudaModel.BatchInvariant*:CudaServe.*" > $R/model_tests.log 2>&1; echo "model tests rc $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|schedules differ|tests ran" $R/model_tests.log | head -30
grep -iE "granite_rope" $R/model_tests.log | head -5
echo "--- t $(( $(date +%s) - T00 )) s"
echo "done at $(( $(date +%s) - T00 )) s"
cd $R && tar czf /tmp/all.tgz . && rm -rf $R/* && mv /tmp/all.tgz $R/all.tgz
