#!/usr/bin/env bash
# Stop 34, call C: CPU figures on the device host's CPU (an Intel AVX-512 host; issue 17 asks for
# one beside the AVX2 machine), 2 threads as the targets: the blocked-linear A/B, the seed
# bench with the avx512 and avx2 kernels, and the Mamba-1 130M shape per weight format.
set -u
R=$OUT; T00=$(date +%s)
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
H=/tmp/hm_bundle; rm -rf $H; mkdir -p $H; tar xJf .devbundle/hm.tar.xz -C $H
export LD_LIBRARY_PATH=$H/lib; HM=$H/bin/hm
lscpu | grep -E "Model name|^CPU\(s\)|L3" | tee $R/lscpu.txt
$HM info --system | tee $R/system.txt
THREADS=2 timeout 150 bash bench/cpu_linear_ab.sh $HM 2 seed > $R/linear_ab_t2.txt 2>&1; tail -7 $R/linear_ab_t2.txt
echo "--- t $(( $(date +%s) - T00 )) s"
for isa in avx512 avx2; do
  HM_ISA=$isa timeout 90 $HM bench --device cpu --preset seed -t 2 --no-peer > $R/seed_$isa.txt 2>&1
  echo "seed $isa:"; grep -E "decode|prefill of|bandwidth|GEMM" $R/seed_$isa.txt
done
echo "--- t $(( $(date +%s) - T00 )) s"
timeout 150 $HM bench --device cpu --config bench/cuda_peer_configs/mamba-130m.json --weights f32,bf16,f16,q8_0,q4_0 -t 2 > $R/m130_weights.txt 2>&1; tail -9 $R/m130_weights.txt
echo "done at $(( $(date +%s) - T00 )) s"
cd $R && tar czf /tmp/all.tgz . && rm -rf $R/* && mv /tmp/all.tgz $R/all.tgz
