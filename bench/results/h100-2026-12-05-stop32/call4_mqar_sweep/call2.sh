#!/usr/bin/env bash
# Call 2 (the sweep): Zoology's MQAR grid for every architecture in ONE hm compare command.
# E (examples per run) comes from call 1's fit; JOBS from its scaling test.
set -u
E=${E:?set E, examples per run, from call 1}
JOBS=${JOBS:-12}
R=$OUT
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle-b/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib
HM=$H/bin/hm
W=/tmp/mqar; rm -rf $W
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $R/gpu.txt 2>&1
CMD="hm compare --device cuda --task mqar --task-vocab 8192 --seq-lens 64,128,256 --batch 512,512,256 --sizes 64,128,256,512 --archs mamba,transformer,attention-2l,hybrid,hybrid-nobridge,true-soft,true-hard --lrs 4.6e-4,2.2e-3,1e-2 --examples $E --test-examples 1000 --jobs $JOBS --out $W"
echo "$CMD" > $R/command.txt
T0=$(date +%s.%N)
timeout 520 $H/bin/hm ${CMD#hm } > $R/table.txt 2> $R/progress.log; rc=$?
T1=$(date +%s.%N)
echo "rc $rc, wall $(python3 -c "print(round($T1-$T0,1))") s" | tee -a $R/command.txt
cp $W/results.csv $W/results.json $W/results.svg $R/ 2>/dev/null
cd $W && tar cJf $R/runs.tar.xz --exclude=checkpoint --exclude='*.safetensors' runs 2>/dev/null
cat $R/table.txt; tail -2 $R/progress.log
python3 -c "import json;print(json.load(open('$R/results.json')).get('sweep'))"
