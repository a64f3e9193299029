#!/usr/bin/env bash
# Stop 46, call L2 (same machine and bundle as callL, run at once after it): the folded bridge
# on and off on a hybrid without bridges (bench/serve_configs/hybrid-1.3b.json, the control) and
# the seed shape at 1 / 8 / 32 sequences.
BUNDLE=.devbundle4 . bench/device_env.sh
for rep in 1 2; do for e in - HM_CUDA_FOLD_BRIDGE=0; do
  env ${e/#-/} timeout 100 $HM bench --device cuda --config bench/serve_configs/hybrid-1.3b.json --decode-cases 1x16,16x16,64x16 \
    --no-peer --reps 3 --json > $R/h13_${rep}_${e//=/_}.json 2>$R/h13_${rep}_${e//=/_}.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" \
    $R/h13_${rep}_${e//=/_}.json "h1.3b [$e]"
done; done
SWEEP_TAG=_b1 env_sweep seed-norope 1x16,8x16,32x16 - HM_CUDA_FOLD_BRIDGE=0
