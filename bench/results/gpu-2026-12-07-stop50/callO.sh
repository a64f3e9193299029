#!/usr/bin/env bash
# Stop 50, carry .devbundle12 and .peerdev (callN's bundle; the two do not fit one call with the
# A/B's old binary).
BUNDLE=.devbundle12 . bench/device_env.sh
# Mamba-2 against mamba_ssm's Mamba2 (Triton SSD kernels) on the same weights: training at
# 8 x 2048, then inference (logits check, prefill, decode at 1, 16, 64 sequences).
train_peer mamba2-130m; echo "t=$(( $(date +%s) - T00 ))"
peer mamba2-130m; grep -E "logits|agree|error|Error" $R/peer_mamba2-130m.log | head -5; echo "t=$(( $(date +%s) - T00 ))"
echo "callO done at $(( $(date +%s) - T00 )) s"
