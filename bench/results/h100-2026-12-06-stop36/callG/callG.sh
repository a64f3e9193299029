#!/usr/bin/env bash
R=$OUT; T00=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
BUNDLE=.devbundle2/hm.tar.xz SHAPES="seed-norope mamba-130m" STEPS=12 OUT=/tmp/tb timeout 400 bash bench/cuda_train_bench.sh > $R/train_bench.log 2>&1
cat /tmp/tb/train_bench.txt
cp /tmp/tb/*.txt /tmp/tb/*.log /tmp/tb/*.json $R/ 2>/dev/null
echo "done at $(( $(date +%s) - T00 )) s"
