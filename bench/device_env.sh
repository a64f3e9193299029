# Sourced by the device call scripts (bench/results/*/call*.sh), run from the repository root on
# the device machine with .devbundle/ carried: unpacks the bundle that ../shared/device/bundle.sh
# wrote and sets R (the call's $OUT), T00 (its start), H (the bundle), HM (our hm). On exit it packs
# everything under $R into $R/all.tgz: a call brings back only 8 files (stop 36 lost the rest).
set -u
R=$OUT; T00=$(date +%s)
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
H=/tmp/hm_bundle; rm -rf "$H"; mkdir -p "$H"; tar xJf .devbundle/hm.tar.xz -C "$H"
export LD_LIBRARY_PATH=$H/lib; HM=$H/bin/hm
nvidia-smi --query-gpu=name --format=csv,noheader
trap 'cd "$R" && tar czf /tmp/all.tgz . && rm -rf "${R:?}"/* && mv /tmp/all.tgz "$R"/all.tgz' EXIT

# Helpers for the A/B calls (stop 42 on). suites [FILTER]: both CUDA suites of the bundle
# (hm_cuda_tests under FILTER if given), summaries printed. decode_ab ROUNDS SHAPE:CASES...:
# the old build (.devbundle2: bin/hm and a lib link) against the new one, alternating, decode
# tok/s per case. peer_b1 SHAPE: ours against mamba_ssm at batch 1 (.peerdev carried).
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
peer_b1() {
  local P=/tmp/peers; rm -rf $P; mkdir -p $P; tar xJf .peerdev/peers.tar.xz -C $P; cp -r .peerdev/mamba_ssm .peerdev/causal_conv1d $P/
  PYTHONPATH=$P timeout 90 $HM bench --device cuda --config bench/cuda_peer_configs/$1.json --decode-cases 1x16 \
    --peer bench/cuda_peer.py --reps 3 --json > $R/peer_$1.json 2> $R/peer_$1.log
  python3 -c "
import json,sys
d=json.load(open(sys.argv[1])); o=d['decode'][0]; p=d['peer']['model']['decode'][0]
print(sys.argv[2],'1x16 ours %.0f tok/s (%.3f of floor) peer %.0f ratio %.3f'%(o['tok_s'],o.get('floor_fraction',0),p['tok_s'],o['tok_s']/p['tok_s']))
" $R/peer_$1.json $1
}
