#!/usr/bin/env bash
# Stop 30, call 8: batch fixtures and the jamba_bias fixture; both CUDA suites with the unverified
# training ops enabled (Mamba-2, relu2, the new CudaTrain configs).
set -u
R=$OUT
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib
nvidia-smi --query-gpu=name,memory.used --format=csv; lscpu | grep -m1 "Model name"
export HM_CUDA_TRAIN_UNVERIFIED=1
timeout 200 $H/bin/hm_cuda_tests --gtest_brief=1 > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|^\[  FAILED|Failure" $R/cuda_tests.log | head -40
timeout 180 $H/bin/hm_cuda_model_tests --gtest_brief=1 > $R/model_tests.log 2>&1; echo "model tests rc $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|^\[  FAILED|Failure" $R/model_tests.log | head -40
rm -rf /tmp/fx && cp -r tests/fixtures/hf /tmp/fx
timeout 140 python3 tests/fixtures/hf/make_fixtures.py --add-batch /tmp/fx > $R/add_batch.log 2>&1; echo "add-batch rc $?"; tail -4 $R/add_batch.log
for d in /tmp/fx/*/; do n=$(basename $d); [ -f $d/batch_logits.f32 ] || continue; mkdir -p $R/fx/$n; cp $d/batch_logits.f32 $d/expected.json $R/fx/$n/; done
timeout 70 python3 tests/fixtures/hf/make_fixtures.py --out $R/new --only jamba_bias > $R/jamba_bias.log 2>&1; echo "jamba_bias rc $?"; tail -3 $R/jamba_bias.log
du -sh $R
