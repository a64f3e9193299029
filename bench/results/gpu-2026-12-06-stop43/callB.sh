#!/usr/bin/env bash
# Stop 43, callB: the three stop-42 patches with callA's two test defects mended (the f32 count
# of fused kv_attention runs; sampler logits on which the penalties actually move picks): both
# whole suites; then main's build (.devbundle2, 1fc110a) against this one (.devbundle),
# alternating rounds, decode tok/s. x_dt_scan is out (callA: slower), so the bundle is the
# patches alone.
. bench/device_env.sh
suites
decode_ab 2 seed-norope:1x16,16x16,64x16 mamba-130m:1x16 mamba-1.4b:1x16
echo "all done at $(( $(date +%s) - T00 )) s"
