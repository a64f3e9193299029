#!/usr/bin/env bash
# Stop 35, call E (~5 min): copy_many + CudaServe tests, the seed's prefix split, the scan-backward
# patch (grad tests, then a timing against the baseline binary, then CudaTrain), and the
# granite_rope_cuda fixture + CudaHf.
. bench/device_env.sh
timeout 60 $H/bin/hm_cuda_tests --gtest_filter='CudaBackend.CopyMany*' > $R/copymany.log 2>&1; echo "copy_many test rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/copymany.log | head
timeout 90 $H/bin/hm_cuda_model_tests --gtest_filter='CudaServe.*' > $R/serve_tests.log 2>&1; echo "CudaServe rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure|Expected|Which is|request" $R/serve_tests.log | head -20
mkdir -p $R/seed_default
PRESET=seed CAP=95 timeout 60 bash bench/cuda_serve.sh $HM $R/seed_default 64 > $R/seed_serve.log 2>&1
echo "seed default:"; grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/seed_default/serve_block64.log
echo "--- t $(( $(date +%s) - T00 )) s"
timeout 90 $H/bin/hm_cuda_tests --gtest_filter='*CudaGradMamba*' > $R/grad_tests.log 2>&1; rc=$?; echo "grad tests rc $rc"; grep -E "^\[  (PASSED|FAILED)|Failure|differs" $R/grad_tests.log | head -20
if [ $rc = 0 ]; then
  for r in 1; do
    timeout 30 $H/bin/hm_bench_cuda_kernels_base scan-train > $R/bench_base_$r.txt 2>&1
    timeout 30 $H/bin/hm_bench_cuda_kernels scan-train > $R/bench_new_$r.txt 2>&1
  done
  echo base; tail -8 $R/bench_base_1.txt; echo new; tail -8 $R/bench_new_1.txt
  timeout 60 $H/bin/hm_cuda_model_tests --gtest_filter='CudaTrain*' > $R/train_tests.log 2>&1; echo "CudaTrain rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/train_tests.log | head -8
fi
echo "--- t $(( $(date +%s) - T00 )) s"
mkdir -p $R/fix
timeout 60 python3 tests/fixtures/hf/make_fixtures.py --out $R/fix --only granite_rope_cuda > $R/fix.log 2>&1; echo "fixture rc $?"; tail -1 $R/fix.log
cp -r $R/fix/granite_rope_cuda tests/fixtures/hf/ 2>/dev/null
timeout 60 $H/bin/hm_cuda_model_tests --gtest_filter="CudaHf*" > $R/hf_tests.log 2>&1; echo "CudaHf rc $?"; grep -E "granite|PASSED|FAILED|Failure" $R/hf_tests.log | head
echo "--- t $(( $(date +%s) - T00 )) s"
echo "done at $(( $(date +%s) - T00 )) s"
cd $R && tar czf /tmp/all.tgz . && rm -rf $R/* && mv /tmp/all.tgz $R/all.tgz
