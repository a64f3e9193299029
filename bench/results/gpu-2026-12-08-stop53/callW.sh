#!/usr/bin/env bash
# Stop 53, the same bundle on the same machine as callV, .peerdev carried: same-call ratios to
# mamba_ssm (Mamba-1 130M and the seed at 16 and 64 sequences, Mamba-2 130M at 1, 16, 64), and
# ncu's per-kernel times of the Mamba-1 130M decode step at 64 sequences.
BUNDLE=.devbundle22 . bench/device_env.sh
peer mamba-130m 16x16,64x16; echo "t=$(( $(date +%s) - T00 ))"
peer seed-norope 16x16,64x16; echo "t=$(( $(date +%s) - T00 ))"
peer mamba2-130m 1x16,16x16,64x16; echo "t=$(( $(date +%s) - T00 ))"
[ $(( $(date +%s) - T00 )) -lt 400 ] && ncu_step mamba-130m 64x16 m1_64 1000 120
echo "callW done at $(( $(date +%s) - T00 )) s"
