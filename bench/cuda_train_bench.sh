#!/usr/bin/env bash
# Issue 15's training benchmark on the lent H200, ours and the peer in one run, same shapes and
# batch (8 x 2048 by default): `hm train --device cuda` (bf16 compute, float32 master weights,
# fused AdamW on the device) on MQAR draws with the shape's vocabulary, against mamba_ssm's
# MambaLMHeadModel trained by PyTorch (bf16 autocast, fused AdamW: bench/cuda_peer.py train).
# Ours: the median tokens/s of the logged steps after the first 3 (train_log.csv: whole steps,
# data and loss readback included) and the peak of the backend's allocations; the peer: median
# of CUDA-event-timed steps and torch.cuda.max_memory_allocated. Needs the bundle and .peerdev/
# as bench/cuda_bench.sh. Writes $OUT/train_bench.txt (and each run's log).
# Usage (device machine): bash bench/cuda_train_bench.sh [SHAPES="seed-norope mamba-130m"] [STEPS=12]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cuda_train_out}
mkdir -p "$OUT"
BUNDLE=${BUNDLE:-.devbundle/hm.tar.xz}
SHAPES=${SHAPES:-seed-norope mamba-130m}
STEPS=${STEPS:-12}
B=${BATCH:-8}
L=${SEQ:-2048}
DTYPES=${DTYPES:-bf16}
R="$OUT/train_bench.txt"
: > "$R"
HM_DIR=/tmp/hm_bundle_train
rm -rf "$HM_DIR" && mkdir -p "$HM_DIR" && tar xJf "$BUNDLE" -C "$HM_DIR" || { echo "no bundle" | tee -a "$R"; exit 1; }
export LD_LIBRARY_PATH="$HM_DIR/lib:${LD_LIBRARY_PATH:-}"
PEERS=/tmp/peers
if [ ! -d "$PEERS/mamba_ssm" ]; then
  rm -rf "$PEERS" && mkdir -p "$PEERS" && tar xJf .peerdev/peers.tar.xz -C "$PEERS" &&
    cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d "$PEERS"/
fi
echo "cuda_train_bench.sh $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader), $B x $L" | tee -a "$R"
for shape in $SHAPES; do
  cfg=bench/cuda_peer_configs/$shape.json
  V=$(python3 -c "import json;print(json.load(open('$cfg'))['vocab_size'])")
  for dt in $DTYPES; do
    run="$OUT/ours_${shape}_$dt"
    rm -rf "$run"
    timeout -k 10 300 "$HM_DIR/bin/hm" train --device cuda --dtype "$dt" --config "$cfg" --task mqar --task-vocab "$V" \
      --seq-len "$L" --batch "$B" --steps "$STEPS" --task-eval 0 --eval-every 0 --save-every 0 --warmup 2 \
      --out "$run" > "$run.log" 2>&1
    rc=$?
    tps=$(python3 - "$run/train_log.csv" <<'PY'
import csv, statistics, sys
try:
    rows = list(csv.DictReader(open(sys.argv[1])))
    print(round(statistics.median(float(r["tokens_per_s"]) for r in rows[3:])))
except Exception as e:
    print("?")
PY
)
    peak=$(grep -o "peak [0-9.]* MiB" "$run.log" | head -1)
    echo "ours  $shape $dt: exit $rc, median $tps tok/s (steps 4-$STEPS), $peak" | tee -a "$R"
  done
  PYTHONPATH="$PEERS" timeout -k 10 300 python3 bench/cuda_peer.py train --shape "$shape" --batch "$B" --seq-len "$L" \
    --json "$OUT/peer_train_$shape.json" > "$OUT/peer_train_$shape.log" 2>&1
  echo "peer  $shape: exit $? $(python3 -c "import json;d=json.load(open('$OUT/peer_train_$shape.json'));print(d['tok_s'],'tok/s,',d['ms_per_step'],'ms/step, peak',round(d['peak_mem_bytes']/2**20),'MiB, bf16 GEMM',d['floors']['gemm_bf16_tflops'],'TFLOP/s, MFU',d['mfu'])" 2>&1)" | tee -a "$R"
done
