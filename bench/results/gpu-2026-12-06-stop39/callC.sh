#!/usr/bin/env bash
# Stop 39: the 1.3B serve load test (bench/cuda_serve.sh, block 64) with the staged short scan,
# with and without prefill graphs (HM_PREFILL_GRAPHS=1): does recording each repeated prefill
# shape pay in the server, where most mixed steps' shapes differ?
. bench/device_env.sh
C=bench/serve_configs/hybrid-1.3b.json
M=/tmp/hyb13; timeout 60 $HM init --config $C --dtype BF16 --out $M > /dev/null 2>&1
MODEL=$M CAP=150 timeout 155 bash bench/cuda_serve.sh $HM $R/serve13 64 > $R/serve13.log 2>&1
grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13/serve_block64.log
HM_PREFILL_GRAPHS=1 MODEL=$M CAP=150 timeout 155 bash bench/cuda_serve.sh $HM $R/serve13g 64 > $R/serve13g.log 2>&1
echo "with prefill graphs:"; grep -E "^\| ((1|8|64) \||hit|miss|no_cache)" $R/serve13g/serve_block64.log
echo "done at $(( $(date +%s) - T00 )) s"
