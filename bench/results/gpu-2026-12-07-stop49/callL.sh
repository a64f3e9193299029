#!/usr/bin/env bash
# Stop 49, callL (carry .devbundle8, as callK; callK's only failures were the chunked backward's
# float parameter sums at 2-6.6e-5 against a 1e-5 bound): the Mamba-2 MQAR sweep (callH's command).
BUNDLE=.devbundle8 . bench/device_env.sh
LIMIT=${LIMIT:-570}
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
echo "callK done at $(( $(date +%s) - T00 )) s"
