#!/usr/bin/env bash
# Stop 49, callJ, prepared in stop 48 (carry .devbundle7: main with ssd_scratch_cap.patch
# applied). The Mamba-2 backward's scratch cap (its test, the other gradient and training
# suites), then what a Mamba-2 MQAR training step costs on the device: step time and peak
# memory at stop 32's MQAR shapes (512 x 64; bench/train_configs/ holds callH's run configs),
# and the per-op profile of the d 64 one (every op synchronized), to choose what to rewrite.
BUNDLE=.devbundle7 . bench/device_env.sh
suites '*CudaGradOps*:*CudaTrain*'
for c in mqar-d64-mamba2 mqar-d512-mamba2; do
  timeout 150 $HM bench --train --device cuda --config bench/train_configs/$c.json --batch 512 --seq-len 64 \
    --steps 3 --json --no-peer > $R/train_$c.json 2> $R/train_$c.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],'step ms %.2f'%d['train_step_ms'],'peak GB %.2f'%(d.get('peak_mem_bytes',0)/1e9))" \
    $R/train_$c.json $c
done
timeout 150 $HM bench --train --device cuda --config bench/train_configs/mqar-d64-mamba2.json --batch 512 --seq-len 64 \
  --steps 3 --profile --no-peer > $R/profile_d64.txt 2>&1; echo "profile rc $?"; head -40 $R/profile_d64.txt
# Decode after the folded pre-norm: per-kernel times of the 1.4B's batch-1 step (what 2x the peer
# at 0.80 of the floor would have to remove) and of the 130M's 64-sequence step (ncu_step).
ncu_step mamba-1.4b 1x16 b1_14b 3000 220
ncu_step mamba-130m 64x16 b64_130m 3000 200
echo "callJ done at $(( $(date +%s) - T00 )) s"
