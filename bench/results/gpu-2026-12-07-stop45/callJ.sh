#!/usr/bin/env bash
# Stop 45, callJ (carry .devbundle4 and .peerdev): the row kernel's multi-row form with its rows
# split over blocks (HM_CUDA_GEMV_TILE rows a block, the blocks of one column group adjacent so W
# comes from L2 after the first), against the landed policy (1..8 rows on the row kernel within
# kGemvRowsMaxWork, more on cuBLASLt), same build. Stop 44's 16-row block form lost 12% on the
# seed at 16 sequences: 64 blocks for in_proj, each doing 16 rows' FMAs. Tiles of 8 give 128
# blocks with half the FMAs each; predicted seed b16 ~330 -> ~280 us a step (~1.35x the peer).
# Then the peer at 16 and 64 sequences beside ours under the setting that did best on the seed.
# LIMIT (seconds, default 330): the parts after the first sweep run only while time is left
# (device time was short this stop: several starts found no machine).
BUNDLE=.devbundle4 . bench/device_env.sh
LIMIT=${LIMIT:-330}
left() { [ $(( $(date +%s) - T00 )) -lt $(( LIMIT - $1 )) ]; }
suites '*CudaDecode*'
ALL="HM_CUDA_GEMV_ROWS=64 HM_CUDA_GEMV_ROWS_WORK=1000000000000"
S1="$ALL HM_CUDA_GEMV_TILE=8"; S2="$ALL HM_CUDA_GEMV_TILE=4"; S3="HM_CUDA_GEMV_ROWS=64 HM_CUDA_GEMV_TILE=8"
SWEEP_TAG=_r1
env_sweep seed-norope 8x16,16x16,32x16,64x16 - "$S1" "$S2" "$S3"
SWEEP_TAG=
left 60 && env_sweep mamba-130m 8x16,16x16,64x16 - "$S1" "$S2" "$S3"
echo "t=$(( $(date +%s) - T00 ))"
BEST=$(python3 - "$R" - "$S1" "$S2" "$S3" <<'PY'
import json,sys,glob
R=sys.argv[1]; best=None
for e in sys.argv[2:]:
    tag=e.replace(' ','_').replace('=','_'); tot=0
    for f in glob.glob(f'{R}/sweep_seed-norope_{tag}_r*.json'):
        tot+=sum(j['tok_s'] for j in json.load(open(f))['decode'] if j['batch'] in (16,64))
    if best is None or tot>best[0]: best=(tot,e)
print(best[1])
PY
)
echo "best on the seed at 16 + 64: $BEST"
left 70 && ( [ "$BEST" = - ] || export $BEST; peer seed-norope 16x16,64x16 )
left 40 && env_sweep mamba-1.4b 16x16,64x16 - "$S1" "$S3"
SWEEP_TAG=_r2
left 70 && env_sweep seed-norope 8x16,16x16,32x16,64x16 - "$S1" "$S2" "$S3"
SWEEP_TAG=
left 70 && ( [ "$BEST" = - ] || export $BEST; peer mamba-130m 16x16,64x16 )
echo "all done at $(( $(date +%s) - T00 )) s"
