#!/usr/bin/env bash
# For the next session with a device (written at the end of stop 33, not run): checks what stop 33
# changed after its last device call. Bundle build-cuda/{hm,hm_cuda_tests,hm_cuda_model_tests} into
# .devbundle/hm.tar.xz, copy this file into .devbundle/, run `bash .devbundle/next_call.sh`
# with carry [".devbundle"], timeout 600. Outputs come back as one all.tgz (the device returns
# only a few files per call).
#  1. both CUDA suites in full (stop 33's call 3 timed out at 200 s inside hm_cuda_tests on the
#     old LinearBatchInvariant, which computed a 2048-row reference on the host; now 64 rows).
#     CudaModel.BatchInvariantModeGivesEveryRowItsBitsAlone must pass now that graphs are keyed
#     on the mode (it failed on the three graph-captured configs in call 3).
#  2. seed served with and without --batch-invariant (same card, same call), and true-hybrid with it.
set -u
R=$OUT; T00=$(date +%s)
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib; HM=$H/bin/hm
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 $H/bin/hm_cuda_tests --gtest_brief=0 > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head -20
timeout 150 $H/bin/hm_cuda_model_tests --gtest_brief=0 > $R/model_tests.log 2>&1; echo "model tests rc $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|schedules differ" $R/model_tests.log | head -30
echo "--- t $(( $(date +%s) - T00 )) s"
for mode in default inv; do
  mkdir -p $R/seed_$mode
  SA=""; [ $mode = inv ] && SA="--batch-invariant"
  SERVE_ARGS="$SA" PRESET=seed CAP=90 bash bench/cuda_serve.sh $HM $R/seed_$mode 64
  echo "seed $mode:"; grep -E "^\| (1|8|64) \||hit|miss|no cache" $R/seed_$mode/serve_block64.log
done
mkdir -p $R/th_inv
SERVE_ARGS="--batch-invariant" PRESET=true-hybrid CAP=100 bash bench/cuda_serve.sh $HM $R/th_inv 64
echo "true-hybrid inv:"; grep -E "^\| (1|8|64) \||hit|miss|no cache" $R/th_inv/serve_block64.log
echo "done at $(( $(date +%s) - T00 )) s"
cd $R && tar czf /tmp/all.tgz . && rm -rf $R/* && mv /tmp/all.tgz $R/all.tgz
