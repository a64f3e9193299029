# Sourced by the device call scripts (bench/results/*/call*.sh), run from the repository root on
# the device machine with .devbundle/ carried: unpacks the bundle that ../shared/device/bundle.sh
# wrote and sets R (the call's $OUT), T00 (its start), H (the bundle), HM (our hm). On exit it packs
# everything under $R into $R/all.tgz: a call brings back only 8 files (stop 36 lost the rest).
set -u
R=$OUT; T00=$(date +%s)
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
H=/tmp/hm_bundle; rm -rf "$H"; mkdir -p "$H"; tar xJf "${BUNDLE:-.devbundle}"/hm.tar.xz -C "$H"  # BUNDLE: another carried bundle folder
export LD_LIBRARY_PATH=$H/lib; HM=$H/bin/hm
nvidia-smi --query-gpu=name --format=csv,noheader
trap 'cd "$R" && tar czf /tmp/all.tgz . && rm -rf "${R:?}"/* && mv /tmp/all.tgz "$R"/all.tgz' EXIT

# Helpers for the A/B calls (stop 42 on). suites [FILTER]: both CUDA suites of the bundle
# (hm_cuda_tests under FILTER if given), summaries printed. decode_ab ROUNDS SHAPE:CASES...:
# the old build (.devbundle2: bin/hm and a lib link) against the new one, alternating, decode
# tok/s per case. peer_b1 SHAPE: ours against mamba_ssm at batch 1 (.peerdev carried).
# peer SHAPE [CASES] and ncu_step: below.
suites() {
  timeout 200 $H/bin/hm_cuda_tests ${1:+--gtest_filter="$1"} > $R/cuda_tests.log 2>&1; echo "hm_cuda_tests ${1:-} rc $?"
  grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_tests.log | head
  timeout 150 $H/bin/hm_cuda_model_tests > $R/cuda_model_tests.log 2>&1; echo "hm_cuda_model_tests rc $?"
  grep -E "^\[  (PASSED|FAILED)|Failure|tests ran" $R/cuda_model_tests.log | head
  echo "t=$(( $(date +%s) - T00 ))"
}
decode_ab() {
  local rounds=$1; shift
  local O=/tmp/hm_old; rm -rf $O; mkdir -p $O; tar xJf .devbundle2/hm.tar.xz -C $O
  for rep in $(seq "$rounds"); do
    for v in old new; do
      local B=$H; [ $v = old ] && B=$O
      for sc in "$@"; do
        local s=${sc%%:*} cases=${sc#*:}
        LD_LIBRARY_PATH=$B/lib timeout 60 $B/bin/hm bench --device cuda --config bench/cuda_peer_configs/$s.json \
          --decode-cases $cases --no-peer --reps 5 --json > $R/dec_${s}_${v}_$rep.json 2> $R/dec_${s}_${v}_$rep.log
        python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" \
          $R/dec_${s}_${v}_$rep.json "$v $s tok/s:"
      done
    done
    echo "t=$(( $(date +%s) - T00 ))"
  done
}
peer_b1() { peer "$1" 1x16; }
# peer SHAPE [CASES]: ours against mamba_ssm on decode CASES (default 1x16,16x16,64x16).
peer_unpack() {  # the peer's built extensions and sources (.peerdev carried) into P
  P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; { [ -f .peerdev/src.tar.xz ] && tar xJf .peerdev/src.tar.xz -C $P || cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/; }
}
# train_peer SHAPE: a training step, ours against mamba_ssm + PyTorch, 8 x 2048, bf16.
train_peer() {
  peer_unpack
  PYTHONPATH=$P timeout 240 $HM bench --train --device cuda --config bench/cuda_peer_configs/$1.json --batch 8 --seq-len 2048 --steps 5 --json --peer bench/cuda_peer.py > $R/train_peer_$1.json 2> $R/train_peer_$1.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));p=d['peer'];print(sys.argv[2],'ours ms',round(d['train_step_ms'],2),'peer ms %.2f ratio %.3f mem %.3f'%(p['ms_per_step'],d['vs_peer_tok_s'],d['vs_peer_memory']))" $R/train_peer_$1.json $1
}
peer() {
  peer_unpack
  PYTHONPATH=$P timeout 240 $HM bench --device cuda --config bench/cuda_peer_configs/$1.json --decode-cases ${2:-1x16,16x16,64x16} \
    --peer bench/cuda_peer.py --reps 3 --json > $R/peer_$1.json 2> $R/peer_$1.log
  python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
pd={(x['batch'],x['context']):x for x in d['peer'].get('model',{}).get('decode',[])}
for o in d['decode']:
  p=pd.get((o['batch'],o['context']),{})
  print(sys.argv[2],'%dx%d ours %.0f tok/s (%.3f of floor) peer %s ratio %s'%(o['batch'],o['context'],o['tok_s'],o.get('floor_fraction',0),
        '%.0f'%p['tok_s'] if 'tok_s' in p else '-', '%.3f'%(o['tok_s']/p['tok_s']) if 'tok_s' in p else '-'))
" $R/peer_$1.json $1
}
# ncu_step SHAPE CASE NAME [SKIP] [COUNT]: per-kernel GPU times (ncu, no clock control) of COUNT
# launches after SKIP of our decode, summed by kernel name into $R/ncu_NAME.txt and printed.
ncu_step() {
  local NCU; NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  [ -n "$NCU" ] || { echo "ncu: not found"; return; }
  timeout -k 5 150 "$NCU" --clock-control none --launch-skip ${4:-3000} --launch-count ${5:-240} --metrics gpu__time_duration.sum \
    --csv --page raw $HM bench --device cuda --config bench/cuda_peer_configs/$1.json --decode-cases $2 --no-peer --reps 1 \
    > $R/ncu_$3.csv 2> $R/ncu_$3.err
  echo "ncu $3 rc $?"; python3 - $R/ncu_$3.csv <<'PY' | tee $R/ncu_$3.txt
import csv,sys,collections
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>5]
if len(rows)<3: print('ncu: no rows'); sys.exit()
h=rows[0]; ki=h.index('Kernel Name'); ti=h.index('gpu__time_duration.sum')
unit=rows[1][ti]; f={'nsecond':1e-3,'usecond':1.0,'msecond':1e3}.get(unit,1e-3)*1000
ks=[(r[ki][:70],float(r[ti].replace(',',''))*f) for r in rows[2:] if r[ti].replace(',','').replace('.','',1).isdigit()]
print('unit',unit,'kernels',len(ks),'sum us %.1f'%(sum(t for _,t in ks)/1000))
c=collections.defaultdict(lambda:[0,0.0])
for k,t in ks: c[k][0]+=1; c[k][1]+=t
for k,(n,t) in sorted(c.items(),key=lambda x:-x[1][1])[:24]: print('%5d %9.1f us %6.2f us each  %s'%(n,t/1000,t/1000/n,k))
PY
}
# env_sweep SHAPE CASES SETTING...: the new build's decode tok/s under each SETTING (a quoted
# list of VAR=VALUE, "-" for none), one line each: policy A/B switches without a rebuild.
env_sweep() {
  local s=$1 cases=$2; shift 2
  for e in "$@"; do
    local tag=${e//[ =]/_}${SWEEP_TAG:-}
    env ${e/#-/} LD_LIBRARY_PATH=$H/lib timeout 60 $HM bench --device cuda --config bench/cuda_peer_configs/$s.json \
      --decode-cases $cases --no-peer --reps 5 --json > $R/sweep_${s}_$tag.json 2> $R/sweep_${s}_$tag.log
    python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],' '.join('%dx%d %.0f'%(j['batch'],j['context'],j['tok_s']) for j in d['decode']))" \
      $R/sweep_${s}_$tag.json "$s [$e]:"
  done
}
# mqar_step CONFIG TAG [ENV...]: one MQAR-shaped training step (512 x 64, bench/train_configs/
# CONFIG.json, 3 steps, ENV set for it): step time and peak memory into $R/train_CONFIG_TAG.json.
mqar_step() {
  local c=$1 tag=$2; shift 2
  env "$@" timeout 150 $HM bench --train --device cuda --config bench/train_configs/$c.json --batch 512 --seq-len 64 \
    --steps 3 --json --no-peer > $R/train_${c}_$tag.json 2> $R/train_${c}_$tag.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],'step ms %.2f'%d['train_step_ms'],'peak GB %.2f'%(d.get('peak_mem_bytes',0)/1e9))" \
    $R/train_${c}_$tag.json "$c $tag" || tail -3 $R/train_${c}_$tag.log
}
# mqar_sweep ARCHS LIMIT: stop 32's MQAR protocol (docs/EVALUATION.md, "MQAR on the H200": same
# command, budget, head logits in float) for ARCHS, stopped LIMIT s after the call began; the
# table, results and every run's log into $R/mqar_<ARCHS>/.
mqar_sweep() {
  local W=/tmp/mqar M=$R/mqar_${1//,/_} T0 T1 TL rc; rm -rf $W; mkdir -p $M
  local CMD="hm compare --device cuda --task mqar --task-vocab 8192 --seq-lens 64,128,256 --batch 512,512,256 --sizes 64,128,256,512 --archs $1 --lrs 4.6e-4,2.2e-3,1e-2 --examples 51525 --test-examples 1000 --jobs 12 --out $W"
  echo "HM_CUDA_HEAD_LOGITS=f32 $CMD" > $M/command.txt
  T0=$(date +%s.%N); TL=$(( $2 - ($(date +%s) - T00) - 15 ))
  HM_CUDA_HEAD_LOGITS=f32 timeout $TL $HM ${CMD#hm } > $M/table.txt 2> $M/progress.log; rc=$?
  T1=$(date +%s.%N)
  echo "rc $rc (timeout $TL s), wall $(python3 -c "print(round($T1-$T0,1))") s" | tee -a $M/command.txt
  cp $W/results.csv $W/results.json $W/results.svg $M/ 2>/dev/null
  (cd $W && tar cJf $M/runs.tar.xz --exclude=checkpoint --exclude='*.safetensors' runs 2>/dev/null)
  cat $M/table.txt; tail -2 $M/progress.log
}
# train_step CONFIG B L TAG [ENV...]: ours only, a training step of CONFIG (bench/train_configs/ or
# bench/cuda_peer_configs/) at B x L (bf16), the step time and peak memory printed, the JSON kept.
train_step() {
  local c=$1 b=$2 l=$3 tag=$4 f; shift 4
  f=bench/train_configs/$c.json; [ -f $f ] || f=bench/cuda_peer_configs/$c.json
  env "$@" timeout 200 $HM bench --train --device cuda --config $f --batch $b --seq-len $l \
    --steps 3 --json --no-peer > $R/train_${c}_$tag.json 2> $R/train_${c}_$tag.log
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(sys.argv[2],'step ms %.2f'%d['train_step_ms'],'tok/s %.0f'%d['train_tok_s'],'peak GB %.2f'%(d.get('peak_mem_bytes',0)/1e9))" \
    $R/train_${c}_$tag.json "$c $tag" || tail -3 $R/train_${c}_$tag.log
}
# ncu_kernel REGEX TAG CMD...: ncu's main sections for the 5th launch of the kernels matching REGEX in CMD.
ncu_kernel() {
  local re=$1 tag=$2; shift 2
  local NCU; NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  timeout 200 $NCU --clock-control none -k regex:$re --launch-skip 4 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis "$@" > $R/ncu_$tag.txt 2>&1; echo "ncu $tag rc $?"
  grep -E "^    (Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per)" $R/ncu_$tag.txt | head -8
  grep -E "highest-utilized pipeline" $R/ncu_$tag.txt | head -1
}
