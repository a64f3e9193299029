#!/usr/bin/env bash
# Every benchmark once, tiny: `hm bench` (inference --quick, --train, --routing-sweep, and the
# table without --json) on the tiny presets with the PyTorch peer, the peer's bench modes on
# their own, and each hm_bench_* binary for one short repetition. The JSON keys that the docs,
# bench/perf_table.py and bench/train_small.sh read are checked, so a renamed key or a crash in
# a benchmark fails CTest. The figures themselves mean nothing at this size.
# Usage: bench_smoke.sh BUILD_DIR SOURCE_DIR
set -u
B="$1"
S="$2"
W="$B/bench_smoke"
PY=/usr/bin/python3
rm -rf "$W" && mkdir -p "$W"
export OMP_NUM_THREADS=2
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }

# run NAME OUT CMD...: CMD must exit 0; its stdout goes to OUT.
run() {
  local name="$1" out="$2"; shift 2
  if "$@" > "$out" 2> "$out.err"; then ok; else bad "$name: exit $? ($(tail -3 "$out.err"))"; fi
}

# keys NAME FILE KEY...: FILE holds one JSON object with every KEY (a.b.c for nested ones).
keys() {
  local name="$1" file="$2"; shift 2
  if "$PY" - "$file" "$@" <<'EOF'; then ok; else bad "$name: keys"; fi
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"not JSON: {e}")
missing = []
for k in sys.argv[2:]:
    v = d
    for part in k.split("."):
        if not isinstance(v, dict) or part not in v:
            missing.append(k)
            break
        v = v[part]
if missing:
    sys.exit(f"missing {missing} in {sys.argv[1]}")
EOF
}

# gbench NAME FILE NAME_PREFIX:COUNTER,COUNTER ...: a Google Benchmark JSON report with a run of
# each named benchmark (name starting with NAME_PREFIX), each with the listed counters.
gbench() {
  local name="$1" file="$2"; shift 2
  if "$PY" - "$file" "$@" <<'EOF'; then ok; else bad "$name: benchmarks"; fi
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"not JSON: {e}")
runs = d.get("benchmarks", [])
assert "caches" in d.get("context", {}), "no caches in the context"
for spec in sys.argv[2:]:
    prefix, _, counters = spec.partition(":")
    found = [b for b in runs if b["name"].startswith(prefix)]
    if not found:
        sys.exit(f"no run of {prefix}")
    for b in found:
        for k in ["real_time", "iterations"] + [c for c in counters.split(",") if c]:
            if k not in b:
                sys.exit(f"{b['name']}: no {k}")
EOF
}

# hm bench, inference: every figure of docs/PERFORMANCE.md's table and the machine it ran on.
run "hm bench --quick" "$W/bench.json" "$B/hm" bench --preset tiny --quick --reps 2 -t 2 --json
keys "hm bench --quick" "$W/bench.json" preset threads kv_type params weight_mb cpu_model l3_mb reps warmup \
  read_bw_gbs read_bw_probe_mb read_bw_exceeds_l3 decode_roofline_tok_s gemm_gflops \
  prefill_ms prefill_ms_floor prefill_ms_floor_fraction \
  forward_all_logits_ms forward_all_logits_ms_floor forward_all_logits_ms_floor_fraction \
  decode_tok_s decode_roofline_fraction decode_ms_per_token.128 decode_ms_per_token.1024 \
  prefill_ms_per_token.512 peak_rss_mb torch_version peer_prefill_ms peer_prefill_last_ms \
  peer_decode_tok_s decode_vs_peer prefill_vs_peer

# hm bench --train (and the peer's train-bench through it).
run "hm bench --train" "$W/train.json" "$B/hm" bench --preset tiny --train --batch 2 --seq-len 16 --steps 2 -t 2 --json
keys "hm bench --train" "$W/train.json" batch seq_len steps reps gemm_gflops train_step_ms train_grad_ms \
  train_tok_s train_flops_per_token train_flop_fraction torch_version peer_train_step_ms \
  peer_train_tok_s peer_train_loss train_vs_peer

# hm bench --routing-sweep (docs/TRUE_HYBRID.md).
run "hm bench --routing-sweep" "$W/sweep.json" "$B/hm" bench --preset true-tiny --routing-sweep --seq-len 32 --reps 2 -t 2 --json
keys "hm bench --routing-sweep" "$W/sweep.json" gemm_gflops routing_sweep.seq_len routing_sweep.reps \
  routing_sweep.both.time_ms routing_sweep.both.flops routing_sweep.both.ms_by_op routing_sweep.fractions \
  routing_sweep.saving_realized routing_sweep.saving_realized_cpu
"$PY" -c "import json, sys; f = json.load(open(sys.argv[1]))['routing_sweep']['fractions']
assert [r['f'] for r in f] == [0, 0.25, 0.5, 0.75, 1], f
for r in f: assert {'time_ms', 'cpu_ms', 'flops', 'saving_realized_f', 'ms_by_op'} <= r.keys(), r" "$W/sweep.json" \
  && ok || bad "routing sweep rows"

# Without --json: the table, one row per measurement.
run "hm bench table" "$W/table.txt" "$B/hm" bench --preset tiny --quick --reps 1 -t 2 --no-peer
for row in "| test " "| prefill 2x32, all logits " "| decode 50 after 32, batch 1 " "| decode at context 1024 " \
  "| read bandwidth, "; do
  grep -qF -- "$row" "$W/table.txt" && ok || bad "table lacks '$row': $(cat "$W/table.txt")"
done
run "hm bench --train table" "$W/train_table.txt" "$B/hm" bench --preset tiny --train --batch 2 --seq-len 16 --steps 1 -t 2 --no-peer
grep -qF "| train 2x16 " "$W/train_table.txt" && ok || bad "train table: $(cat "$W/train_table.txt")"

# The peer's own bench modes, directly.
run "hm init" "$W/init.txt" "$B/hm" init --preset tiny --out "$W/tiny"
run "peer bench" "$W/peer.json" "$PY" "$S/bench/torch_peer.py" bench --model "$W/tiny" --threads 2 \
  --prefill-len 8 --decode-prompt 8 --decode-new 4 --reps 2 --warmup 1 --json
keys "peer bench" "$W/peer.json" torch_version threads peer_prefill_ms peer_prefill_last_ms peer_decode_tok_s \
  prefill_batch prefill_len decode_prompt decode_new warmup reps
run "peer train-bench" "$W/peer_train.json" "$PY" "$S/bench/torch_peer.py" train-bench --model "$W/tiny" \
  --threads 2 --batch 2 --seq-len 8 --steps 2 --warmup 1 --json
keys "peer train-bench" "$W/peer_train.json" torch_version threads peer_train_step_ms peer_train_tok_s \
  peer_train_loss batch seq_len steps warmup

# The hm_bench_* binaries, one short repetition each.
run "hm_bench_kernels" "$W/kernels.json" "$B/hm_bench_kernels" --benchmark_min_time=0.001 --benchmark_format=json
gbench "hm_bench_kernels" "$W/kernels.json" "BM_Scan/cpu/:bytes,ns/tok/ch" "BM_Scan/ref/:bytes" "BM_Conv/cpu/:bytes" \
  "BM_Conv/ref/:bytes" "BM_AttentionDecodeCold/:bytes,flops,layers" "BM_AttentionPrefill/:bytes,flops" \
  "BM_AttentionDecode/:bytes,flops" "BM_Rmsnorm/:bytes" "BM_FloorReadBandwidth:bytes,probe_MiB"
run "hm_bench_train" "$W/train_gb.json" "$B/hm_bench_train" --benchmark_min_time=0.001 --benchmark_format=json
gbench "hm_bench_train" "$W/train_gb.json" "BM_TrainTiny:tok/s,GFLOP/s,threads" "BM_TrainDemo:tok/s,GFLOP/s,threads"
run "hm_bench_grad_ckpt" "$W/ckpt.txt" "$B/hm_bench_grad_ckpt" ab 1 32 0 1
for want in "grad_ckpt=off B=1 L=32" "grad_ckpt=on B=1 L=32" "step median" "activations peak" "max RSS" "on/off: median"; do
  grep -qF "$want" "$W/ckpt.txt" && ok || bad "hm_bench_grad_ckpt output lacks '$want': $(cat "$W/ckpt.txt")"
done

run "hm_bench_quant" "$W/quant.json" "$B/hm_bench_quant" --quick --json
keys "hm_bench_quant" "$W/quant.json" cpu_model l3_mb pool_mb best_isa read_bw_gbs decode prefill_m prefill

echo "bench_smoke: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
