#!/usr/bin/env bash
# hm train --init-from on every Hugging Face family's fixture (tests/fixtures/hf): six steps on
# 30 kB of the tokenizer fixtures' texts (tests/fixtures/tokenizers/pre_tokenizers.json, repeated:
# a committed, stable corpus), validation at steps 3 and 6 (docs/TRAINING.md, "Fine-tuning a
# model folder"). The fixtures are tiny random models: this shows the path works end to end.
#   bench/finetune_fixtures.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
python3 -c 'import json,sys; t="\n".join(json.load(open(sys.argv[1]))["texts"]); print((t*100)[:30000])' \
  tests/fixtures/tokenizers/pre_tokenizers.json > "$W/corpus.txt"
for f in granite_f32 nemotron_h_moe jamba_f32 falcon_h1_f32 bamba_f32 falcon_mamba_f32 mamba2_groups mamba_bias; do
  printf '%-18s' "$f"
  "$B/hm" train --init-from "tests/fixtures/hf/$f" --data "$W/corpus.txt" --out "$W/$f" --steps 6 --batch 2 \
    --seq-len 32 --lr 3e-3 --warmup 0 --eval-every 3 2>&1 | grep -o "val loss [0-9.]*" | tr '\n' ' '
  echo
done
