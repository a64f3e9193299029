#!/usr/bin/env bash
# Stop 37: where a True Hybrid training step goes (its step measured 78-116 ms against the seed
# preset's 27.7): per-op profiles of both presets, 8 x 2048 (each op synchronized).
. bench/device_env.sh
for p in true-hybrid seed; do
  timeout 80 $HM bench --train --device cuda --preset $p --batch 8 --seq-len 2048 --steps 3 --profile --json > $R/profile_$p.json 2> $R/profile_$p.log
  python3 -c "import json;d=json.load(open('$R/profile_$p.json'));p=d['profile'];print('== $p step', round(d['train_step_ms'],2), 'ops total', round(sum(v['ms_per_step'] for v in p.values()),2));[print('%-26s %7.3f ms %6.1f calls' % (k, v['ms_per_step'], v['calls_per_step'])) for k,v in sorted(p.items(), key=lambda kv: -kv[1]['ms_per_step'])[:14]]"
done
echo "done at $(( $(date +%s) - T00 )) s"
