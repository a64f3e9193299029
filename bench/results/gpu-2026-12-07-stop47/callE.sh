#!/usr/bin/env bash
# Prepared in stop 47 for the next session's first call (carry .devbundle4 built from main, and
# .peerdev): both CUDA suites whole, then every target of issues 13 and 15 against the peer in one
# call on main's defaults: decode at 1 / 16 / 64 sequences on the seed, 130M and 1.4B shapes, and
# training on the seed and 130M shapes (8 x 2048). On an H200 these are the issues' own figures.
BUNDLE=.devbundle4 . bench/device_env.sh
LIMIT=${LIMIT:-570}
left() { [ $(( $(date +%s) - T00 )) -lt $(( LIMIT - $1 )) ]; }
suites
for s in seed-norope mamba-130m mamba-1.4b; do left 100 && peer $s 1x16,16x16,64x16; done
echo "t=$(( $(date +%s) - T00 ))"
for p in seed-norope mamba-130m; do left 60 && train_peer $p; done
echo "callE done at $(( $(date +%s) - T00 )) s"
