#!/usr/bin/env bash
# Stop 49, callM (carry .devbundle9: callK's build with the gated RMSNorm's backward rewritten,
# one warp a row, and the chunked kernel's float parameter sums held to 1e-4). The SSD test runs
# both backward kernels against the cpu backend; then a Mamba-2
# MQAR training step (512 x 64, bench/train_configs/) with the chunked backward against the
# token-serial one (HM_CUDA_SSD_BACKWARD=reference), the per-op profile of the d 64 step, then
# stop 48's Mamba-2 MQAR sweep (callH's command, 72 runs) in the time left.
BUNDLE=.devbundle9 . bench/device_env.sh
suites '*CudaGradOps*:*CudaTrain*'
step() {  # step CONFIG TAG [ENV...]
  local c=$1 tag=$2; shift 2
  env "$@" timeout 150 $HM bench --train --device cuda --config bench/train_configs/$c.json --batch 512 --seq-len 64 \
    --steps 3 --json --no-peer > $R/train_${c}_$tag.json 2> $R/train_${c}_$tag.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],'step ms %.2f'%d['train_step_ms'],'peak GB %.2f'%(d.get('peak_mem_bytes',0)/1e9))" \
    $R/train_${c}_$tag.json "$c $tag" || tail -3 $R/train_${c}_$tag.log
}
for c in mqar-d64-mamba2 mqar-d512-mamba2; do
  step $c chunked
  step $c reference HM_CUDA_SSD_BACKWARD=reference
done
echo "t=$(( $(date +%s) - T00 ))"
timeout 150 $HM bench --train --device cuda --config bench/train_configs/mqar-d64-mamba2.json --batch 512 --seq-len 64 \
  --steps 3 --profile --no-peer > $R/profile_d64.txt 2>&1; echo "profile rc $?"; head -40 $R/profile_d64.txt
echo "t=$(( $(date +%s) - T00 ))"
LIMIT=${LIMIT:-570}
if grep -q "^\[  FAILED" $R/cuda_tests.log || ! grep -q "^\[  PASSED" $R/cuda_tests.log; then
  echo "a test failed: no sweep"; exit 0
fi
W=/tmp/mqar; rm -rf $W; M=$R/mqar_mamba2; mkdir -p $M
CMD="hm compare --device cuda --task mqar --task-vocab 8192 --seq-lens 64,128,256 --batch 512,512,256 --sizes 64,128,256,512 --archs mamba2,hybrid-mamba2 --lrs 4.6e-4,2.2e-3,1e-2 --examples 51525 --test-examples 1000 --jobs 12 --out $W"
echo "HM_CUDA_HEAD_LOGITS=f32 $CMD" > $M/command.txt
T0=$(date +%s.%N)
TL=$(( LIMIT - ($(date +%s) - T00) - 15 ))
HM_CUDA_HEAD_LOGITS=f32 timeout $TL $HM ${CMD#hm } > $M/table.txt 2> $M/progress.log; rc=$?
T1=$(date +%s.%N)
echo "rc $rc (timeout $TL s), wall $(python3 -c "print(round($T1-$T0,1))") s" | tee -a $M/command.txt
cp $W/results.csv $W/results.json $W/results.svg $M/ 2>/dev/null
(cd $W && tar cJf $M/runs.tar.xz --exclude=checkpoint --exclude='*.safetensors' runs 2>/dev/null)
cat $M/table.txt; tail -2 $M/progress.log
echo "callM done at $(( $(date +%s) - T00 )) s"
