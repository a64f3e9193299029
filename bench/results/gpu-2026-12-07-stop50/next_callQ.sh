#!/usr/bin/env bash
# Prepared in stop 50 for the next session; not run. Build main with ct512.patch applied
# (512 threads a block for the chunked SSD backward where one block fits an SM: N 128), bundle
# hm + hm_cuda_tests into .devbundleQ, main's own bin/hm into .devbundleQh (tar of bin/hm only,
# as .devbundle11h was made), carry both. The suites (the P 33 / N 128 test shape takes the 512
# path, P 64 / N 64 the 256 one), then the Mamba-2 130M step at 8 x 2048 old/new twice.
BUNDLE=.devbundleQ . bench/device_env.sh
O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundleQh/hm.tar.xz -C $O
timeout 240 $H/bin/hm_cuda_tests --gtest_filter='*CudaGradOps*:*CudaTrain*' > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"
grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head -12
for rep in 1 2; do
  HM=$O/bin/hm train_step mamba2-130m 8 2048 old$rep
  train_step mamba2-130m 8 2048 new$rep
done
for rep in 1 2; do
  HM=$O/bin/hm mqar_step mqar-d64-mamba2 old$rep
  mqar_step mqar-d64-mamba2 new$rep
done
echo "callQ done at $(( $(date +%s) - T00 )) s"
