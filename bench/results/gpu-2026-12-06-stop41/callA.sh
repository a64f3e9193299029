#!/usr/bin/env bash
# Stop 41, callA: stop 40's callB as it stands (decode_latency.patch applied and built into
# .devbundle; main's build in .devbundle2). The new build also has stop 41's skinny chunk widths
# (off by default; CudaSkinny.* tests them); callB.sh measures them.
bash bench/results/gpu-2026-12-06-stop40/callB.sh
