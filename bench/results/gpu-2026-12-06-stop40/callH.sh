#!/usr/bin/env bash
# Prepared in stop 39, NOT YET RUN: the prefix hit against the miss at an 8,000-token prefix on
# the 1.3B hybrid. At 2,000 tokens the H100's roofline bounds the ratio at ~8.5x (docs/SERVING.md,
# "What 10x can mean on this GPU"); at 8,000 the floors allow ~35x. One level of clients (the
# reference run) to keep the call short; 3 prefixes; a cache big enough for them (K/V ~8 KB a
# token and an 11.5 MB state checkpoint each); the same at 2,000 tokens for the ratio in one call.
. bench/device_env.sh
C=bench/serve_configs/hybrid-1.3b.json
M=/tmp/hyb13; timeout 60 $HM init --config $C --dtype BF16 --out $M > /dev/null 2>&1
for P in 8000 2000; do
  timeout 200 python3 bench/serve_load_test.py --hm $HM --model $M --levels 1 --requests 10 --distinct 10 \
    --prefixes 3 --prefix-tokens $P \
    --serve-args "--slots 8 --max-queue 64 --ctx 8448 --cache-block 64 --cache-mb 2048 --device cuda" \
    --json $R/prefix$P.json --markdown > $R/prefix$P.log 2>&1
  echo "prefix $P exit $?"; grep -E "^\| (hit|miss|no_cache)" $R/prefix$P.log
done
echo "done at $(( $(date +%s) - T00 )) s"
