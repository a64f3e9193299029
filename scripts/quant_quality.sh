#!/usr/bin/env bash
# Quality of packed weights (issue 17 item 4; docs/QUANTIZATION.md, "Quality"): perplexity on the
# held-out Brown split and KL(f32 || packed) of the next-token distributions, per weight format,
# for two trained models:
#   demo  the README demo's model and schedule (demo preset, BPE 4096, 800 steps of 8 x 128
#         tokens, lr 3e-3), here on 1 thread (about 6 min)
#   seed  the seed preset's shape (d_model 512, 12 layers, attention at 3, 6, 9; BPE 4096 in place
#         of its 32000-token vocabulary), SEED_STEPS steps of 8 x 128 tokens at lr 2e-3 on
#         1 thread: ~2.2 s a step on this 2-core machine, so 800 steps (the default) is a ~30 min
#         budget, a 23M-parameter model on the demo's token count
# Each is trained only when its checkpoint is missing (resumed when it stopped short), so a rerun
# only evaluates. Runs live in OUT (default runs/quant_quality; never committed).
#   bash scripts/quant_quality.sh     (BUILD=build-x: another build folder; BUILD_HM=0: its hm as it is)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
OUT=${OUT:-runs/quant_quality}
WEIGHTS=${WEIGHTS:-f32,bf16,q8_0,q4_0}
SEED_STEPS=${SEED_STEPS:-800}
export OMP_NUM_THREADS=1  # a shared machine: training and evaluation on one thread
[ "${BUILD_HM:-1}" = 0 ] || cmake --build "$BUILD" -j 2 --target hm >/dev/null
bash scripts/fetch_brown.sh >/dev/null
mkdir -p "$OUT"

# train NAME STEPS FLAGS...: trains OUT/NAME to STEPS unless its checkpoint is there already.
train() {
  local name=$1 steps=$2
  shift 2
  local dir=$OUT/$name state=$OUT/$name/checkpoint/trainer_state.json
  local done_steps=0
  [ -f "$state" ] && done_steps=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$state")
  if [ "$done_steps" -ge "$steps" ]; then
    echo "$name: checkpoint at step $done_steps, not retrained"
    return
  fi
  local start=$SECONDS
  if [ "$done_steps" -gt 0 ]; then
    echo "$name: resuming from step $done_steps"
    "$BUILD/hm" train --out "$dir" --resume --steps "$steps"
  else
    rm -rf "${dir:?}"
    "$BUILD/hm" train "$@" --data data/brown --tokenizer bpe --vocab 4096 --out "$dir" --steps "$steps" \
      --batch 8 --seq-len 128 --threads 1 --seed 0
  fi
  echo "$((SECONDS - start))" >> "$OUT/$name.train_seconds"
}

train demo 800 --preset demo --lr 3e-3 --eval-every 200 --save-every 400
train seed "$SEED_STEPS" --preset seed --lr 2e-3 --eval-every 400 --save-every 200

# Every format in one run, on every validation token (--max-tokens 0: 90,202 of them) in windows of
# the training length.
for name in demo seed; do
  start=$SECONDS
  "$BUILD/hm" eval --model "$OUT/$name" --data data/brown --weights "$WEIGHTS" --max-tokens 0 --threads 1 \
    --json > "$OUT/$name.quality.json"
  echo "$((SECONDS - start))" > "$OUT/$name.eval_seconds"
done

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("| model | weights | perplexity | / f32 | mean KL | p99 KL | max KL | top-1 = f32 |")
print("|---|---|---|---|---|---|---|---|")
for name in ["demo", "seed"]:
    q = json.load(open(f"{out}/{name}.quality.json"))
    for w in q["weights"]:
        print(f"| {name} (step {q['step']}) | {w['format']} | {w['ppl']:.3f} | {w['ppl_ratio']:.4f} | "
              f"{w['kl_mean']:.2e} | {w['kl_p99']:.2e} | {w['kl_max']:.2e} | {w['top1_agree']:.4f} |")
for name in ["demo", "seed"]:
    q = json.load(open(f"{out}/{name}.quality.json"))
    train_s = sum(int(x) for x in open(f"{out}/{name}.train_seconds").read().split()) \
        if __import__("os").path.exists(f"{out}/{name}.train_seconds") else None
    eval_s = int(open(f"{out}/{name}.eval_seconds").read())
    print(f"{name}: {q['tokens']} validation tokens in windows of {q['seq_len']}; "
          f"training {train_s if train_s is not None else '?'} s, evaluation {eval_s} s (1 thread)")
PY
