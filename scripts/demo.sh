#!/usr/bin/env bash
# The main job on its defaults: set up, build, create the seed model, generate from it, and
# benchmark it against the PyTorch peer.
set -euo pipefail
cd "$(dirname "$0")/.."
./setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target hm
./build/hm init --preset seed --out runs/seed
./build/hm info --model runs/seed | tail -n 13
echo "--- generating (random weights: expect noise until the training issue lands) ---"
./build/hm generate --model runs/seed --prompt "The state space model" -n 64 --temperature 0.8 --top-p 0.95 --seed 1 --stats
echo "--- benchmark (docs/PERFORMANCE.md explains each figure) ---"
./build/hm bench --preset seed
