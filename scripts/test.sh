#!/usr/bin/env bash
# Sets up (apt-get), builds with warnings as errors, and runs the whole test suite; then builds
# the suite again with clang's AddressSanitizer + UndefinedBehaviorSanitizer (build-asan), runs
# it, and runs each fuzzer for a short time (docs/RELIABILITY.md, "Fuzzing and sanitizers").
# HM_TEST_SANITIZE=0 skips the sanitizer and fuzzer part.
set -euo pipefail
cd "$(dirname "$0")/.."
./setup.sh
bash scripts/fetch_brown.sh   # the real-corpus tests use it (data/brown, ignored by git)
# ccache keeps compiled objects between runs on one machine (a fresh clone recompiles only what
# changed); without it, or without a writable cache directory, every object is compiled.
LAUNCH=()
CACHE="${CCACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/ccache}"
if command -v ccache >/dev/null 2>&1 && mkdir -p "$CACHE" 2>/dev/null && [ -w "$CACHE" ]; then
  # Paths under the clone hash relative, and the sanitizer build's line tables (-gline-tables-only)
  # do not hash the build directory: any clone hits (a cached object's line tables may name the
  # directory of the clone that compiled it; file names and lines stay right).
  export CCACHE_DIR="$CACHE" CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
  LAUNCH=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DHM_WERROR=ON "${LAUNCH[@]}" >/dev/null
cmake --build build -j "$(nproc)"
(cd build && ctest --output-on-failure -j "$(nproc)")

# The CUDA kernels compile on every run so they cannot rot (docs/CUDA.md); without a GPU their
# tests report each case SKIPPED. nvcc comes with NVIDIA's toolkit, not Debian: skipped, visibly,
# where it is absent.
if [ -x /usr/local/cuda/bin/nvcc ]; then
  cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DHM_WERROR=ON -DHM_CUDA=ON \
    -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc -DHM_PYTHON=OFF "${LAUNCH[@]}" >/dev/null
  cmake --build build-cuda -j "$(nproc)" --target hm hm_cuda_tests hm_cuda_model_tests hm_bench_cuda_kernels
  build-cuda/hm_cuda_tests
  build-cuda/hm_cuda_model_tests
else
  echo "test.sh: no /usr/local/cuda/bin/nvcc: the CUDA backend was not compiled"
fi

if [ "${HM_TEST_SANITIZE:-1}" = 0 ]; then exit 0; fi
# Every test again under ASan + UBSan (every report is fatal, float-to-int conversions
# included), without the benchmarks (the Python module leaves itself out: python/CMakeLists.txt).
# HM_FUZZ implies HM_SANITIZE and adds the fuzz targets, so one clang build serves both.
CC=clang CXX=clang++ cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Release -DHM_FUZZ=ON \
  -DHM_BUILD_TESTS=ON -DHM_BUILD_BENCH=OFF "${LAUNCH[@]}" >/dev/null
cmake --build build-asan -j "$(nproc)"
# ASan fills every new heap allocation with 0xFF bytes (a NaN in every float), so a read of
# memory nothing wrote shows up as a NaN instead of as whatever the allocator left there.
(cd build-asan && ASAN_OPTIONS=malloc_fill_byte=255:max_malloc_fill_size=2147483647 \
  ctest --output-on-failure -j "$(nproc)")
# Each fuzzer for 20 s from its seed corpus (scripts/fuzz.sh: 10 minutes each before a release).
HM_FUZZ_BUILD=build-asan bash scripts/fuzz.sh 20
