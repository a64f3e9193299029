#!/usr/bin/env bash
# Training speed of the evaluation sweep's models (hm compare's matched architectures, MQAR
# L = 128, batch 32, 2 threads), against the PyTorch peer and optionally an older build, each
# model's three measurements taken back to back. docs/PERFORMANCE.md, "Training at small widths".
#   bash bench/train_small.sh                  # build/hm against the peer
#   BASE=/path/to/old/hm bash bench/train_small.sh   # also against another build of hm
set -euo pipefail
cd "$(dirname "$0")/.."
HM=${HM:-build/hm}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
ARCHS=${ARCHS:-mamba,transformer,hybrid,true-soft}
SIZES=${SIZES:-64,128}
# One optimizer step per architecture: only to get each matched model as a checkpoint.
"$HM" compare --task mqar --seq-lens 128 --sizes "$SIZES" --archs "$ARCHS" --lrs 3e-3 --budget 1 \
  --batch 2 --test-examples 8 --out "$W/c" -t 2 > /dev/null 2>&1
printf '%-12s %5s %10s %10s %8s %10s %10s %9s\n' arch d_model "ours tok/s" "peer tok/s" "ours/peer" "base tok/s" "ours/base" "flop_frac"
for d in ${SIZES//,/ }; do
  for a in ${ARCHS//,/ }; do
    ck="$W/c/runs/mqar_L128_d${d}_${a}_lr0.003/train/checkpoint"
    "$HM" bench --train --model "$ck" --batch 32 --seq-len 128 --steps 5 -t 2 --json > "$W/ours.json"
    if [ -n "${BASE:-}" ]; then
      "$BASE" bench --train --model "$ck" --batch 32 --seq-len 128 --steps 5 -t 2 --json --no-peer > "$W/base.json"
    else
      echo '{}' > "$W/base.json"
    fi
    /usr/bin/python3 - "$a" "$d" "$W/ours.json" "$W/base.json" <<'PY'
import json, sys
a, d, o, b = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), json.load(open(sys.argv[4]))
ours, peer = o["train_tok_s"], o.get("peer_train_tok_s")
base = b.get("train_tok_s")
f = lambda x, fmt: fmt % x if x else "-"
print("%-12s %5s %10.0f %10s %8s %10s %10s %9.3f" % (a, d, ours, f(peer, "%.0f"), f(peer and ours / peer, "%.2fx"),
      f(base, "%.0f"), f(base and ours / base, "%.2fx"), o["train_flop_fraction"]))
PY
  done
done
