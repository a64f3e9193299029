#!/usr/bin/env bash
# Stop 34, call B: seed served with and without --batch-invariant (same card, same call), and
# true-hybrid with it; the prefix test now splits the hit's TTFT (server side, queue, admit).
set -u
R=$OUT; T00=$(date +%s)
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib; HM=$H/bin/hm
nvidia-smi --query-gpu=name --format=csv,noheader
for mode in default inv; do
  mkdir -p $R/seed_$mode
  SA=""; [ $mode = inv ] && SA="--batch-invariant"
  SERVE_ARGS="$SA" PRESET=seed CAP=95 bash bench/cuda_serve.sh $HM $R/seed_$mode 64
  echo "seed $mode:"; grep -E "^\| (1|8|64) \||hit|miss|no.cache" $R/seed_$mode/serve_block64.log
  echo "--- t $(( $(date +%s) - T00 )) s"
done
mkdir -p $R/th_inv
SERVE_ARGS="--batch-invariant" PRESET=true-hybrid CAP=100 bash bench/cuda_serve.sh $HM $R/th_inv 64
echo "true-hybrid inv:"; grep -E "^\| (1|8|64) \||hit|miss|no.cache" $R/th_inv/serve_block64.log
echo "done at $(( $(date +%s) - T00 )) s"
cd $R && tar czf /tmp/all.tgz . && rm -rf $R/* && mv /tmp/all.tgz $R/all.tgz
