#!/usr/bin/env bash
# The main job on its defaults: set up, build, fetch the Brown corpus, train a small Simple
# Hybrid on it for a few minutes on 2 cores, evaluate it against a unigram baseline, generate
# from it, then benchmark inference on the seed model against the PyTorch peer.
set -euo pipefail
cd "$(dirname "$0")/.."
./setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target hm
bash scripts/fetch_brown.sh

echo "--- training the demo preset (Simple Hybrid: attention at layers 2 and 5 of 6, state bridges) ---"
rm -rf runs/demo   # the demo's own run folder; hm train refuses to overwrite a run
./build/hm train --preset demo --data data/brown --tokenizer bpe --vocab 4096 --out runs/demo \
  --steps 800 --batch 8 --seq-len 128 --lr 3e-3 --eval-every 200 --save-every 400
./build/hm eval --model runs/demo --data data/brown
echo "--- generating from the trained model (loss curve: runs/demo/loss.svg) ---"
for p in "The jury said" "In the morning" "He was"; do
  ./build/hm generate --model runs/demo/checkpoint --prompt "$p" -n 40 --temperature 0.8 --top-p 0.95 --seed 1
done

echo "--- inference benchmark, seed preset (docs/PERFORMANCE.md explains each figure) ---"
./build/hm bench --preset seed
