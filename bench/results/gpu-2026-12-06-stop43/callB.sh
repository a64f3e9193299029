#!/usr/bin/env bash
# Stop 43, callB: main's build (.devbundle2) against callA's (.devbundle: the three patches),
# alternating rounds, decode tok/s.
. bench/device_env.sh
decode_ab 2 seed-norope:1x16,16x16,64x16 mamba-130m:1x16 mamba-1.4b:1x16
echo "all done at $(( $(date +%s) - T00 )) s"
