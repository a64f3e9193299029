#!/usr/bin/env bash
# Sets up (apt-get), builds with warnings as errors, and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./setup.sh
bash scripts/fetch_brown.sh   # the real-corpus tests use it (data/brown, ignored by git)
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DHM_WERROR=ON >/dev/null
cmake --build build -j "$(nproc)"
cd build
ctest --output-on-failure -j "$(nproc)"
