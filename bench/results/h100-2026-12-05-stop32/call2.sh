#!/usr/bin/env bash
# Stop 32, call 2: both CUDA suites with no gate (lifted after call 1 passed them with it open),
# the batch fixtures and jamba_bias (tarred: a call brings back few files), then MQAR call 1
# (bench/results/h200-2026-12-05/mqar/call1.sh, --jobs 1 and 12 only, its grid step only while time is left).
set -u
R=$OUT
T00=$(date +%s)
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib
unset HM_CUDA_TRAIN_UNVERIFIED
timeout 150 $H/bin/hm_cuda_tests --gtest_brief=1 > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests rc $?"; grep -E "^\[  (PASSED|FAILED)|Failure" $R/cuda_tests.log | head -20
timeout 100 $H/bin/hm_cuda_model_tests --gtest_brief=1 > $R/model_tests.log 2>&1; echo "model tests rc $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure" $R/model_tests.log | head -20
echo "tests done at $(( $(date +%s) - T00 )) s"
rm -rf /tmp/fx /tmp/new && cp -r tests/fixtures/hf /tmp/fx
timeout 100 python3 tests/fixtures/hf/make_fixtures.py --add-batch /tmp/fx > $R/add_batch.log 2>&1; echo "add-batch rc $?"
(cd /tmp/fx && tar czf $R/fx_batch.tgz */batch_logits.f32 */expected.json)
timeout 60 python3 tests/fixtures/hf/make_fixtures.py --out /tmp/new --only jamba > $R/jamba.log 2>&1; echo "jamba rc $?"; tail -2 $R/jamba.log
(cd /tmp/new && tar czf $R/jamba_new.tgz jamba_bias jamba_f32/expected.json jamba_bf16/expected.json)
echo "fixtures done at $(( $(date +%s) - T00 )) s"
mkdir -p .devbundle-b && cp .devbundle/hm.tar.xz .devbundle-b/
# jobs 1 and 12 only; the grid's second budget only if this call has time left
python3 - <<'PY'
s=open('bench/results/h200-2026-12-05/mqar/call1.sh').read()
s=s.replace('for j in 1 4 8 16','for j in 1 12').replace('(4,8,16)','(12,)')
s=s.replace('for E in 5120 20480; do','for E in 5120 20480; do\n  [ $E = 20480 ] && [ $(( $(date +%s) - T00 )) -gt 430 ] && { echo "grid $E skipped: no time left"; continue; }')
open('/tmp/call1.sh','w').write(s)
PY
export T00
bash /tmp/call1.sh 2>&1 | tail -60
echo "call done at $(( $(date +%s) - T00 )) s"
