#!/usr/bin/env bash
# Black-box tests of the hm command: exit codes, error messages that name the problem,
# determinism of seeded generation, and that damaged checkpoints are refused cleanly.
# Usage: cli_test.sh PATH_TO_HM WORK_DIR
set -u
HM="$1"
W="$2"
rm -rf "$W" && mkdir -p "$W"
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }

# expect_fail NAME SUBSTRING CMD...: CMD must exit 1 and print SUBSTRING on stderr.
expect_fail() {
  local name="$1" want="$2"; shift 2
  local err rc
  err=$("$@" 2>&1 >/dev/null); rc=$?
  if [ "$rc" -ne 1 ]; then bad "$name: exit $rc (want 1): $err"; return; fi
  case "$err" in *"$want"*) ok ;; *) bad "$name: stderr lacks '$want': $err" ;; esac
}

"$HM" --help >/dev/null && ok || bad "hm --help"
for sub in init train eval generate chat bench info quantize; do "$HM" $sub --help >/dev/null && ok || bad "hm $sub --help"; done

"$HM" init --preset tiny --seed 3 --out "$W/tiny" >/dev/null && ok || bad "init tiny"
[ -f "$W/tiny/config.json" ] && [ -f "$W/tiny/model.safetensors" ] && [ -f "$W/tiny/tokenizer.json" ] && ok || bad "init wrote files"

# Seeded sampling repeats and the seed matters. Every run must exit 0 and print more than the
# prompt: a crash would otherwise pass as two equal empty outputs.
gen() { "$HM" generate --model "$W/tiny" --prompt "hello" -n 20 "$@"; }
a=$(gen --temperature 0.9 --seed 5); ra=$?
b=$(gen --temperature 0.9 --seed 5); rb=$?
c=$(gen --temperature 0.9 --seed 6); rc=$?
g1=$(gen --temperature 0 --seed 1); rg1=$?
g2=$(gen --temperature 0 --seed 2); rg2=$?
for v in "$ra:$a" "$rb:$b" "$rc:$c" "$rg1:$g1" "$rg2:$g2"; do
  case "$v" in 0:hello?*) ok ;; *) bad "generate exits 0 with the prompt and sampled text: got ${v%%:*}: '${v#*:}'" ;; esac
done
[ "$a" = "$b" ] && ok || bad "same seed gives the same text"
[ "$a" != "$c" ] && ok || bad "another seed gives other text: '$a'"
[ "$g1" = "$g2" ] && ok || bad "greedy ignores the seed"
out=$("$HM" generate --model "$W/tiny" --prompt "one" --prompt "a longer second prompt" -n 5 --seed 1)
[ "$(printf '%s\n' "$out" | grep -c '^\[')" -eq 2 ] && ok || bad "batch of two prompts: $out"

expect_fail "unknown preset" "unknown preset 'huge'" "$HM" init --preset huge --out "$W/x"
expect_fail "missing model" "$W/nope" "$HM" generate --model "$W/nope" --prompt hi
expect_fail "bad top-p" "top_p" "$HM" generate --model "$W/tiny" --prompt hi --top-p 1.5
expect_fail "bad temperature" "temperature" "$HM" generate --model "$W/tiny" --prompt hi --temperature -1
expect_fail "invalid utf-8 prompt" "UTF-8" "$HM" generate --model "$W/tiny" --prompt "$(printf 'ab\xff')"

cp -r "$W/tiny" "$W/badcfg"
printf '{"d_model": 32, "n_layers": 4, "vocab_size": 300, "attention_layers": [1, 9]}' > "$W/badcfg/config.json"
expect_fail "attention index out of range" "attention_layers" "$HM" generate --model "$W/badcfg" --prompt hi
printf '{"d_model": 32, "n_layers": 4, "vocab_size": 300, "colour": 1}' > "$W/badcfg/config.json"
expect_fail "unknown config field" "unknown field 'colour'" "$HM" info --model "$W/badcfg"
printf '{"d_model": 1e300, "n_layers": 4, "vocab_size": 300}' > "$W/badcfg/config.json"
expect_fail "huge number in config" "config.json: field 'd_model' must be an integer" "$HM" generate --model "$W/badcfg" --prompt hi
# No silent byte fallback, and memory refused up front with the estimate (docs/RELIABILITY.md).
cp -r "$W/tiny" "$W/notok" && rm "$W/notok/tokenizer.json"
expect_fail "missing tokenizer.json" "tokenizer.json does not exist" "$HM" generate --model "$W/notok" --prompt hi
expect_fail "context beyond memory" "KV cache" "$HM" generate --model "$W/tiny" --prompt hi --ctx 2000000000
expect_fail "--max-memory" "more than --max-memory" "$HM" init --preset seed --out "$W/big" --max-memory 10M
[ ! -e "$W/big" ] && ok || bad "a refused init wrote nothing"

cp -r "$W/tiny" "$W/trunc"
truncate -s 1000 "$W/trunc/model.safetensors"
expect_fail "truncated checkpoint" "model.safetensors" "$HM" generate --model "$W/trunc" --prompt hi
cp -r "$W/tiny" "$W/garbage"
head -c 4096 /dev/urandom > "$W/garbage/model.safetensors"
expect_fail "garbage checkpoint" "safetensors" "$HM" generate --model "$W/garbage" --prompt hi

# Packed weights (docs/QUANTIZATION.md): a stored q8_0 checkpoint and packing at load give the
# same greedy text.
"$HM" quantize "$W/tiny" --out "$W/tiny_q8" --type q8_0 >/dev/null && ok || bad "quantize q8_0"
q1=$("$HM" generate --model "$W/tiny_q8" --prompt hello -n 20 --temperature 0); rq1=$?
q2=$("$HM" generate --model "$W/tiny" --weights q8_0 --prompt hello -n 20 --temperature 0); rq2=$?
case "$rq1:$rq2:$q1" in 0:0:hello?*) [ "$q1" = "$q2" ] && ok || bad "stored q8_0 '$q1' != --weights q8_0 '$q2'" ;;
  *) bad "generate with q8_0 weights: exits $rq1, $rq2: '$q1'" ;; esac
"$HM" quantize "$W/tiny" --out "$W/tiny_f16" --type f16 >/dev/null && ok || bad "quantize f16"
h1=$("$HM" generate --model "$W/tiny_f16" --prompt hello -n 20 --temperature 0); rh1=$?
h2=$("$HM" generate --model "$W/tiny" --weights f16 --prompt hello -n 20 --temperature 0); rh2=$?
case "$rh1:$rh2:$h1" in 0:0:hello?*) [ "$h1" = "$h2" ] && ok || bad "stored f16 '$h1' != --weights f16 '$h2'" ;;
  *) bad "generate with f16 weights: exits $rh1, $rh2: '$h1'" ;; esac
expect_fail "quantize bad type" "--type must be q8_0, q4_0, bf16 or f16" "$HM" quantize "$W/tiny" --out "$W/x" --type q3
expect_fail "quantize over a model" "already holds a model" "$HM" quantize "$W/tiny" --out "$W/tiny_q8" --type q8_0
expect_fail "bad --weights" "--weights must be" "$HM" generate --model "$W/tiny" --weights q5 --prompt hi
expect_fail "bench --weights twice" "given twice" "$HM" bench --preset tiny --weights f32,q8_0,f32
expect_fail "bench --prefill-cases on the cpu" "--device cuda only" "$HM" bench --preset tiny --device cpu --prefill-cases 1x52

"$HM" init --preset tiny --seed 3 --out "$W/half" --dtype BF16 >/dev/null && ok || bad "init BF16"
"$HM" generate --model "$W/half" --prompt hi -n 3 >/dev/null && ok || bad "generate from BF16"

# Training: a few steps on a small text, then eval and generate from the checkpoint
# (DIR/checkpoint is a complete model directory).
for i in $(seq 1 60); do echo "the cat sees the ball number $i and likes it."; done > "$W/corpus.txt"
T=(--preset tiny --data "$W/corpus.txt" --steps 5 --batch 2 --seq-len 32 --eval-tokens 256)
"$HM" train "${T[@]}" --out "$W/trained" --eval-every 5 2>"$W/train.err" && ok || bad "train 5 steps: $(cat "$W/train.err")"
grep -q "val loss" "$W/train.err" && grep -q "tok/s" "$W/train.err" && ok || bad "train progress: $(cat "$W/train.err")"
for f in checkpoint/config.json checkpoint/model.safetensors checkpoint/tokenizer.json \
         checkpoint/optimizer.safetensors checkpoint/trainer_state.json train_log.csv loss.svg; do
  [ -f "$W/trained/$f" ] && ok || bad "train wrote $f"
done
[ "$(wc -l < "$W/trained/train_log.csv")" -eq 6 ] && ok || bad "train_log.csv has a header and 5 rows"
ev=$("$HM" eval --model "$W/trained" --data "$W/corpus.txt" --json)
case "$ev" in *'"ppl":'*'"step":5'*) ok ;; *) bad "eval --json: $ev" ;; esac
"$HM" eval --model "$W/trained/checkpoint" --data "$W/corpus.txt" | grep -q "perplexity" && ok || bad "eval text"
# A Hugging Face folder, and a Falcon-Mamba one (its dt/B/C norms).
FX="$(dirname "$0")/fixtures/hf/mamba_f32"
"$HM" eval --model "$FX" --data "$W/corpus.txt" --seq-len 32 | grep -q "perplexity" && ok || bad "eval on a Hugging Face folder"
cp -r "$FX" "$W/falcon" && sed -i 's/"MambaForCausalLM"/"FalconMambaForCausalLM"/; s/"model_type": "mamba"/"model_type": "falcon_mamba"/' "$W/falcon/config.json"
ef=$("$HM" eval --model "$W/falcon" --data "$W/corpus.txt" --seq-len 32 --json); rc=$?
case "$rc:$ef" in 0:*'"ppl":'*) ok ;; *) bad "eval on a Falcon-Mamba folder: exit $rc: $ef" ;; esac
"$HM" generate --model "$W/trained/checkpoint" --prompt "the cat" -n 10 >/dev/null && ok || bad "generate from trained"
# Fine-tuning a Hugging Face folder (--init-from): one step at lr 1e-12 leaves the weights, so the
# checkpoint scores the data as the folder does; its tokenizer and special ids come along.
cp -r "$FX" "$W/hfchat" && printf '%s' '{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}' \
  > "$W/hfchat/chat_template.jinja"
"$HM" train --init-from "$W/hfchat" --data "$W/corpus.txt" --out "$W/ft" --steps 1 --batch 2 --seq-len 32 --lr 1e-12 \
  --warmup 0 2>"$W/ft.err" && ok || bad "train --init-from: $(cat "$W/ft.err")"
cmp -s "$W/hfchat/chat_template.jinja" "$W/ft/checkpoint/chat_template.jinja" && ok || bad "init-from keeps the chat template"
e_hf=$("$HM" eval --model "$FX" --data "$W/corpus.txt" --seq-len 32 --max-tokens 0 --json)
e_ft=$("$HM" eval --model "$W/ft/checkpoint" --data "$W/corpus.txt" --seq-len 32 --max-tokens 0 --json)
python3 -c 'import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); sys.exit(abs(a["loss"]-b["loss"])>1e-6*a["loss"] or a["tokens"]!=b["tokens"])' \
  "$e_hf" "$e_ft" && ok || bad "init-from checkpoint scores as the folder: $e_hf vs $e_ft"
grep -q '"eos_token_id": 0' "$W/ft/checkpoint/config.json" && ok || bad "init-from keeps eos_token_id"
"$HM" generate --model "$W/ft/checkpoint" --prompt "the cat" -n 5 >/dev/null && ok || bad "generate from a fine-tuned folder"
expect_fail "init-from with --preset" "does not apply" "$HM" train --init-from "$FX" --preset tiny --data "$W/corpus.txt" --out "$W/ft2"
expect_fail "init-from a missing folder" "$W/none" "$HM" train --init-from "$W/none" --data "$W/corpus.txt" --out "$W/ft3"
expect_fail "train over a run" "--resume" "$HM" train "${T[@]}" --out "$W/trained"
expect_fail "train missing data" "$W/none.txt" "$HM" train --data "$W/none.txt" --out "$W/t2"
printf 'caf\xe9 au lait\n' > "$W/latin1.txt"
expect_fail "train non-UTF-8 data" "UTF-8" "$HM" train --data "$W/latin1.txt" --out "$W/t2"
expect_fail "train diverging" "training stopped" "$HM" train "${T[@]}" --out "$W/wild" --lr 1e30 --warmup 0
[ ! -e "$W/t2" ] && ok || bad "failed train runs wrote nothing"

# Tasks (docs/EVALUATION.md): train a tiny model on MQAR draws, score it with hm eval --task
# (settings from the run), and name bad task input.
"$HM" train --preset tiny --task mqar --task-vocab 40 --seq-len 16 --steps 3 --batch 4 --out "$W/mqar" \
  --task-eval 16 --eval-every 3 2>"$W/mqar.err" && ok || bad "train --task mqar: $(cat "$W/mqar.err")"
grep -q "accuracy" "$W/mqar.err" && ok || bad "train --task progress: $(cat "$W/mqar.err")"
ev=$("$HM" eval --model "$W/mqar" --task mqar --examples 20 --json)
case "$ev" in *'"accuracy":'*'"scored":20,'*'"kv":1,'*'"vocab":40'*) ok ;; *) bad "eval --task --json: $ev" ;; esac
"$HM" eval --model "$W/mqar" --task mqar --examples 20 | grep -q "chance accuracy" && ok || bad "eval --task text"
expect_fail "bad task name" "unknown task 'recall'" "$HM" eval --model "$W/mqar" --task recall
expect_fail "train bad task name" "unknown task 'recall'" "$HM" train --task recall --out "$W/t3"
expect_fail "mqar constraint" "must exceed --seq-len" "$HM" train --task mqar --task-vocab 16 --seq-len 32 --out "$W/t3"
expect_fail "eval needs data or task" "exactly one of --data" "$HM" eval --model "$W/mqar"
expect_fail "generate on a task checkpoint" "synthetic task 'mqar'" \
  "$HM" generate --model "$W/mqar/checkpoint" --prompt hi
expect_fail "compare bad arch" "unknown architecture 'rnn'" "$HM" compare --archs rnn --out "$W/cmp"
[ ! -e "$W/t3" ] && ok || bad "failed task runs wrote nothing"

# Routing analysis (hm route) of a true-hybrid model; a model without true-hybrid layers is refused.
"$HM" init --preset true-tiny --seed 4 --out "$W/truetiny" >/dev/null && ok || bad "init true-tiny"
rj=$("$HM" route --model "$W/truetiny" --prompt "The cat sat on the mat." --json --heatmap "$W/route.svg"); rc=$?
[ "$rc" -eq 0 ] && ok || bad "route --json: exit $rc"
for key in '"average_usage":' '"mamba":' '"attention":' '"per_layer":' '"layer":' '"tokens":' '"attention_share":'; do
  case "$rj" in *"$key"*) ok ;; *) bad "route --json lacks $key: $rj" ;; esac
done
grep -q "<svg" "$W/route.svg" && grep -q "layer 1" "$W/route.svg" && ok || bad "route heatmap SVG"
"$HM" route --model "$W/truetiny" --prompt "hello" --heatmap "" | grep -q "^layer 4: Mamba usage: .*%  Attention usage: .*%" && ok || bad "route text"
# Hard routing with packed weights: path_compute_skipped copies the parameters (floats kept).
cp -r "$W/truetiny" "$W/truehard" && sed -i 's/"routing_mode": "soft"/"routing_mode": "hard"/' "$W/truehard/config.json"
rh=$("$HM" route --model "$W/truehard" --weights q4_0 --prompt "The cat sat." --json --heatmap ""); rc=$?
case "$rc:$rh" in 0:*'"hard"'*path_compute_skipped*) ok ;; *) bad "route --weights q4_0 on a hard model: exit $rc: $rh" ;; esac
expect_fail "route on a simple model" "no true-hybrid layers" "$HM" route --model "$W/tiny" --prompt hi --heatmap ""
expect_fail "route empty prompt" "empty" "$HM" route --model "$W/truetiny" --prompt "" --heatmap ""
expect_fail "route missing model" "$W/nope" "$HM" route --model "$W/nope" --prompt hi --heatmap ""
# A true model trained on a task: routes of its test draws by role; its tokens are not text.
"$HM" train --preset true-tiny --task mqar --task-vocab 40 --seq-len 16 --kv 2 --steps 2 --batch 4 \
  --out "$W/truemqar" --task-eval 0 2>/dev/null && ok || bad "train true-tiny on mqar"
tj=$("$HM" route --model "$W/truemqar" --task-examples 5 --json --heatmap "$W/taskroute.svg"); rc=$?
[ "$rc" -eq 0 ] && ok || bad "route --task-examples --json: exit $rc"
for key in '"roles":["key","value","query","filler"]' '"positions":[10,10,10,50]' '"attention_by_role":' '"examples":5'; do
  case "$tj" in *"$key"*) ok ;; *) bad "route --task-examples --json lacks $key: $tj" ;; esac
done
grep -q ">query:[0-9]" "$W/taskroute.svg" && grep -q ">key:[0-9]" "$W/taskroute.svg" && ok || bad "task route heatmap labels roles"
"$HM" route --model "$W/truemqar" --heatmap "" | grep -q "attention share by role over 100 test draws" && ok \
  || bad "route of a task model defaults to 100 draws"
expect_fail "route a task model with a prompt" "route its test draws with --task-examples" \
  "$HM" route --model "$W/truemqar" --prompt hi --heatmap ""
expect_fail "route task draws of a text model" "was not trained on a task" \
  "$HM" route --model "$W/truetiny" --task-examples 3 --heatmap ""

# ---- The first hour (issue 12): usage errors, short flags, prompts from files and stdin, run folders
# as --model, warnings, hm init --force, resume settings, and Ctrl-C keeping work.

# expect_usage NAME SUBSTRING CMD...: a usage error: exit 2, SUBSTRING on stderr, nothing on stdout.
expect_usage() {
  local name="$1" want="$2"; shift 2
  local out err rc
  out=$("$@" 2>"$W/usage.err"); rc=$?; err=$(cat "$W/usage.err")
  if [ "$rc" -ne 2 ]; then bad "$name: exit $rc (want 2): $err"; return; fi
  if [ -n "$out" ]; then bad "$name: printed to stdout: $out"; return; fi
  case "$err" in *"$want"*) ok ;; *) bad "$name: stderr lacks '$want': $err" ;; esac
}
expect_usage "unknown command" "unknown command 'gnerate'" "$HM" gnerate -m "$W/tiny"
expect_usage "unknown command lists the commands" "init, train, eval, generate, bench, route, compare, info" "$HM" gnerate
expect_usage "negative --top-k" "--top-k: must be 0 or more (got -3)" "$HM" generate -m "$W/tiny" -p hi --top-k -3
expect_usage "negative --threads" "--threads: must be 0 or more (got -2)" "$HM" generate -m "$W/tiny" -p hi --threads -2
expect_usage "negative -n" "--max-new-tokens: must be 0 or more (got -5)" "$HM" generate -m "$W/tiny" -p hi -n -5
expect_usage "train negative -t" "--threads: must be 0 or more" "$HM" train --data "$W/corpus.txt" --out "$W/t5" -t -1
expect_usage "missing prompt file" "$W/none.txt" "$HM" generate -m "$W/tiny" -f "$W/none.txt"
out=$("$HM" generate -m "$W/tiny" -p hi --top-p 1.5 2>/dev/null); rc=$?
[ "$rc" -eq 1 ] && [ -z "$out" ] && ok || bad "bad --top-p: exit $rc, stdout '$out' (want 1 and nothing)"
expect_fail "no prompt" "--prompt-file" "$HM" generate -m "$W/tiny"

# Short flags, a prompt file and standard input give what the long flags give.
p1=$("$HM" generate --model "$W/tiny" --prompt "hello" --max-new-tokens 8 --seed 3 --threads 1)
p2=$("$HM" generate -m "$W/tiny" -p "hello" -n 8 -s 3 -t 1)
printf 'hello\n' > "$W/prompt.txt"
p3=$("$HM" generate -m "$W/tiny" -f "$W/prompt.txt" -n 8 -s 3 -t 1)
p4=$(printf 'hello\n' | "$HM" generate -m "$W/tiny" -p - -n 8 -s 3 -t 1)
case "$p1" in hello?*) ok ;; *) bad "generate --prompt hello: '$p1'" ;; esac
[ "$p1" = "$p2" ] && ok || bad "short flags: '$p2' != '$p1'"
[ "$p1" = "$p3" ] && ok || bad "--prompt-file: '$p3' != '$p1'"
[ "$p1" = "$p4" ] && ok || bad "--prompt -: '$p4' != '$p1'"
printf 'The cat sat on the mat.' | "$HM" route -m "$W/truetiny" -p - --heatmap "" | grep -q "^24 tokens" && ok \
  || bad "route -p - (stdin)"

# A training run's folder stands for its checkpoint in every command.
"$HM" generate -m "$W/trained" -p "the cat" -n 5 >/dev/null && ok || bad "generate -m RUN_FOLDER"
"$HM" info -m "$W/trained" | grep -q '"d_model"' && ok || bad "info -m RUN_FOLDER"
"$HM" eval -m "$W/trained" --data "$W/corpus.txt" >/dev/null && ok || bad "eval -m RUN_FOLDER"
"$HM" route -m "$W/truemqar" --task-examples 3 --heatmap "" >/dev/null && ok || bad "route -m RUN_FOLDER"
"$HM" bench --model "$W/trained" --no-peer --quick --reps 1 --json 2>/dev/null | grep -q '"params"' && ok || bad "bench --model RUN_FOLDER"

# --temperature 0 is plain greedy: the repeat penalty is off unless given.
g0=$("$HM" generate -m "$W/tiny" -p "the cat" -n 30 --temperature 0)
g1=$("$HM" generate -m "$W/tiny" -p "the cat" -n 30 --temperature 0 --repeat-penalty 1)
g2=$("$HM" generate -m "$W/tiny" -p "the cat" -n 30 --temperature 0 --repeat-penalty 1.1)
[ "$g0" = "$g1" ] && ok || bad "--temperature 0 kept the default repeat penalty"
[ "$g0" != "$g2" ] && ok || bad "--temperature 0 --repeat-penalty 1.1 ignored the penalty"
help=$("$HM" generate --help)
for d in "--temperature FLOAT=0.8" "--top-k INT:NONNEGATIVE=40" "--top-p FLOAT=0.95" "--min-p FLOAT=0.05" \
         "--repeat-penalty FLOAT=1.1" "--repeat-last-n INT:NONNEGATIVE=64" "--seed UINT=0" \
         "--max-new-tokens INT:NONNEGATIVE=64" "--ctx INT:NONNEGATIVE=0" "--kv-type TEXT=auto" "--device TEXT=auto" \
         "--dtype TEXT=auto"; do
  case "$help" in *"$d"*) ok ;; *) bad "generate --help lacks '$d'" ;; esac
done

# A prompt longer than the run's sequences (--seq-len 32) is warned about; a short one is not.
"$HM" generate -m "$W/trained" -p "the cat sees the ball number 12 and likes it. the cat" -n 2 2>"$W/long.err" >/dev/null
grep -q "warning: the prompt is 54 tokens, longer than the 32-token sequences" "$W/long.err" && ok \
  || bad "long prompt warning: $(cat "$W/long.err")"
"$HM" generate -m "$W/trained" -p "the cat" -n 2 2>"$W/short.err" >/dev/null
[ ! -s "$W/short.err" ] && ok || bad "short prompt warned: $(cat "$W/short.err")"

# hm eval says "higher" with a ratio above 1 for a model worse than the unigram baseline.
ev=$("$HM" eval -m "$W/tiny" --data "$W/corpus.txt" | tail -1)
ratio=$(printf '%s' "$ev" | sed -n 's/.*is \([0-9.]*\)x higher).*/\1/p')
[ -n "$ratio" ] && awk "BEGIN { exit !($ratio > 1) }" && ok || bad "eval of a worse model: $ev"

# --device / --dtype / --kv-type (docs/CUDA.md, "Choosing the device"). This machine has no GPU (or
# the build no CUDA backend), so cuda is refused with that reason on every command, before any work.
if "$HM" info -m "$W/tiny" --device cuda >/dev/null 2>&1; then
  echo "note: a CUDA device is present: the --device cuda refusals are not checked"
else
  for cmd in "generate -m $W/tiny -p hi -n 2" "info -m $W/tiny" "bench --preset tiny --quick --no-peer" \
             "route -m $W/tiny -p hi" "eval -m $W/tiny --data $W/corpus.txt"; do
    # shellcheck disable=SC2086
    expect_fail "$cmd --device cuda" "--device cuda: " "$HM" $cmd --device cuda
  done
  err=$("$HM" generate -m "$W/tiny" -p hi -n 2 --device cuda 2>&1 >/dev/null)
  case "$err" in *"no CUDA backend"*|*"no usable CUDA device"*) ok ;; *) bad "--device cuda names no reason: $err" ;; esac
  i=$("$HM" info -m "$W/tiny")
  case "$i" in *"device: cpu, dtype f32, KV cache f16"*) ok ;; *) bad "info's default device line: $i" ;; esac
fi
expect_fail "unknown device" "--device must be cpu, cuda or auto, got 'gpu'" "$HM" generate -m "$W/tiny" -p hi --device gpu
expect_fail "cpu bf16" "--dtype bf16: the cpu backend does not compute in this type" \
  "$HM" generate -m "$W/tiny" -p hi --device cpu --dtype bf16
expect_fail "cpu bf16 kv" "--kv-type bf16: the cpu backend has no KV cache of this type" \
  "$HM" generate -m "$W/tiny" -p hi --device cpu --kv-type bf16
expect_fail "unknown dtype" "--dtype must be f32, bf16, f16 or auto, got 'f64'" "$HM" info -m "$W/tiny" --dtype f64
expect_fail "info without a model" "--model is required (or --system)" "$HM" info
# hm info --system: the kernel paths this machine runs, each forced by its variable.
s=$("$HM" info --system)
case "$s" in *"CPU: "*"CPU kernels: "*"CPU linear, more than "*"OpenBLAS core "*"CUDA: "*) ok ;; *) bad "info --system: $s" ;; esac
case "$(HM_LINEAR=blas "$HM" info --system)" in *"rows: OpenBLAS sgemm"*) ok ;; *) bad "HM_LINEAR=blas not shown" ;; esac
case "$(HM_LINEAR=blocks HM_ISA=scalar "$HM" info --system)" in
  *"CPU kernels: scalar"*"rows: the per-row kernel in blocks"*) ok ;; *) bad "HM_LINEAR=blocks HM_ISA=scalar not shown" ;; esac
e=$(HM_LINEAR=gpu "$HM" info --system 2>&1); rc=$?  # refused at startup, as a bad HM_ISA (exit 2)
[ "$rc" -eq 2 ] && case "$e" in *"HM_LINEAR=gpu: must be blas or blocks"*) true ;; *) false ;; esac && ok || bad "bad HM_LINEAR: exit $rc: $e"
i=$("$HM" info -m "$W/tiny" --device cpu --kv-type f32)
case "$i" in *"device: cpu, dtype f32, KV cache f32"*"weights in f32: "*"(f32)"*) ok ;; *) bad "info --kv-type f32: $i" ;; esac
# The defaults on the CPU are the old behaviour: the same tokens with and without the options.
d1=$("$HM" generate -m "$W/tiny" -p "the cat" -n 12 --seed 4)
d2=$("$HM" generate -m "$W/tiny" -p "the cat" -n 12 --seed 4 --device cpu --dtype f32 --kv-type f16)
[ -n "$d1" ] && [ "$d1" = "$d2" ] && ok || bad "--device cpu --dtype f32 --kv-type f16 changed the tokens: '$d1' vs '$d2'"

# hm init keeps an existing model (or training run) unless --force.
"$HM" init --preset tiny --out "$W/again" >/dev/null && ok || bad "init again"
expect_fail "init over a model" "--force" "$HM" init --preset tiny --seed 9 --out "$W/again"
expect_fail "init over a training run" "--force" "$HM" init --preset tiny --out "$W/trained"
"$HM" init --preset tiny --seed 9 --out "$W/again" --force >/dev/null && ok || bad "init --force"

# --resume takes the run's settings: each flag it ignores is named; --steps continues the run.
"$HM" train --out "$W/trained" --resume --lr 0.5 --batch 7 -s 4 --steps 8 2>"$W/resume.err" && ok \
  || bad "resume --steps 8: $(cat "$W/resume.err")"
for f in "ignores --lr 0.5 and keeps the run's 0.001" "ignores --batch 7 and keeps the run's 2" \
         "ignores --seed 4 and keeps the run's 0" "continues the run to step 8"; do
  grep -qF -- "$f" "$W/resume.err" && ok || bad "resume notes lack '$f': $(cat "$W/resume.err")"
done
[ "$(wc -l < "$W/trained/train_log.csv")" -eq 9 ] && ok || bad "resume --steps 8 logged $(wc -l < "$W/trained/train_log.csv") lines"
expect_fail "resume --steps behind the checkpoint" "already at step 8" "$HM" train --out "$W/trained" --resume --steps 6

# Ctrl-C during training: the step finishes, a checkpoint is saved, exit 130 with the command that
# resumes; resuming ends with the same weights as an uninterrupted run.
I=(--preset tiny --data "$W/corpus.txt" --steps 1500 --batch 2 --seq-len 32 --eval-tokens 256 --eval-every 0 -t 1)
"$HM" train "${I[@]}" --out "$W/int" 2>"$W/int.err" &
pid=$!
for _ in $(seq 1 400); do grep -q "^step [0-9]*/1500" "$W/int.err" && break; sleep 0.05; done
kill -INT "$pid"; wait "$pid"; rc=$?
[ "$rc" -eq 130 ] && ok || bad "SIGINT: exit $rc (want 130): $(tail -3 "$W/int.err")"
grep -q "interrupted by SIGINT after step [0-9]* of 1500; checkpoint saved in $W/int/checkpoint" "$W/int.err" && ok \
  || bad "SIGINT message: $(tail -3 "$W/int.err")"
grep -qF "resume with: $HM train --out $W/int --resume" "$W/int.err" && ok || bad "resume line: $(tail -2 "$W/int.err")"
step=$(sed -n 's/^ *"step": \([0-9]*\),*$/\1/p' "$W/int/checkpoint/trainer_state.json")
[ -n "$step" ] && [ "$step" -gt 0 ] && [ "$step" -lt 1500 ] && ok || bad "interrupted checkpoint step '$step'"
"$HM" generate -m "$W/int" -p "the" -n 3 >/dev/null && ok || bad "the interrupted checkpoint loads"
"$HM" train --out "$W/int" --resume 2>/dev/null && ok || bad "resume after SIGINT"
"$HM" train "${I[@]}" --out "$W/int_full" 2>/dev/null && ok || bad "uninterrupted run"
cmp -s "$W/int/checkpoint/model.safetensors" "$W/int_full/checkpoint/model.safetensors" && ok \
  || bad "interrupted + resumed weights differ from the uninterrupted run's"

# SIGTERM during hm compare: exit 143; the same command continues the run to the same result.
C=(compare --task mqar --seq-lens 16 --sizes 16 --lrs 3e-3 --archs mamba --budget 1000 --batch 4 --task-vocab 40
   --test-examples 16 -t 1)
"$HM" "${C[@]}" --out "$W/cmpint" 2>"$W/cmpint.err" >/dev/null &
pid=$!
for _ in $(seq 1 400); do grep -q "step [0-9]*/1000" "$W/cmpint.err" && break; sleep 0.05; done
kill -TERM "$pid"; wait "$pid"; rc=$?
[ "$rc" -eq 143 ] && ok || bad "compare SIGTERM: exit $rc (want 143): $(tail -3 "$W/cmpint.err")"
grep -q "interrupted by SIGTERM after step" "$W/cmpint.err" && grep -qF "resume with the same command: $HM compare" "$W/cmpint.err" \
  && ok || bad "compare SIGTERM message: $(tail -3 "$W/cmpint.err")"
[ -f "$W/cmpint/runs/mqar_L16_d16_mamba_lr0.003/pending.json" ] && ok || bad "compare left no pending.json"
"$HM" "${C[@]}" --out "$W/cmpint" >/dev/null 2>&1 && ok || bad "compare resumed"
"$HM" "${C[@]}" --out "$W/cmpfull" >/dev/null 2>&1 && ok || bad "compare uninterrupted"
l1=$(grep '"loss"' "$W/cmpint/results.json"); l2=$(grep '"loss"' "$W/cmpfull/results.json")
[ -n "$l1" ] && [ "$l1" = "$l2" ] && ok || bad "resumed compare loss '$l1' != '$l2'"

# hm chat: lines piped in are user turns rendered with the folder's chat template; the model reads
# only what is new each turn (its state kept), which must reply as re-reading everything would.
cp -r "$W/tiny" "$W/chat"
cat > "$W/chat/tokenizer_config.json" <<'JSON'
{"bos_token": {"content": "<s>"}, "eos_token": "</s>",
 "chat_template": "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns here') }}{% endif %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"}
JSON
chat() { printf 'hello\nhow are you?\n/reset\nbye\n' | "$HM" chat --model "$W/chat" -n 12 --temperature 0 --stats "$@"; }
c1=$(chat 2>"$W/chat1.err"); rc1=$?
c2=$(chat --reread 2>"$W/chat2.err"); rc2=$?
[ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ] && [ -n "$c1" ] && ok || bad "chat exits 0 with replies: $rc1, $rc2: $(cat "$W/chat1.err")"
[ "$c1" = "$c2" ] && ok || bad "chat keeping its state replies as re-reading the conversation does"
grep -q "chat template: $W/chat/tokenizer_config.json" "$W/chat1.err" && ok || bad "chat names its template: $(cat "$W/chat1.err")"
grep -q "turn 2: 33 new prompt tokens (37 already held)" "$W/chat1.err" && ok || bad "chat turn 2 reads only the new tokens: $(cat "$W/chat1.err")"
grep -q "turn 2: 70 new prompt tokens (0 already held)" "$W/chat2.err" && ok || bad "chat --reread reads everything: $(cat "$W/chat2.err")"
grep -q "a new conversation" "$W/chat1.err" && grep -q "turn 1: 23 new prompt tokens (0 already held)" "$W/chat1.err" \
  && ok || bad "chat /reset starts again: $(cat "$W/chat1.err")"
! grep -q "reading the whole conversation again" "$W/chat1.err" && ok || bad "chat re-read a template that extends"
# hm quantize keeps the folder's chat template.
"$HM" quantize "$W/chat" --out "$W/chat_q8" --type q8_0 >/dev/null && ok || bad "quantize a folder with a chat template"
printf 'hi\n' | "$HM" chat --model "$W/chat_q8" -n 2 2>&1 >/dev/null | grep -q "chat template: $W/chat_q8/tokenizer_config.json" \
  && ok || bad "the quantized checkpoint keeps the chat template"
# A template that rewrites earlier turns (the marker moves to the last message): read again, said on stderr.
cp -r "$W/chat" "$W/chat_moving"
cat > "$W/chat_moving/tokenizer_config.json" <<'JSON'
{"chat_template": "{% for m in messages %}{% if loop.last %}[last]{% endif %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"}
JSON
m1=$(printf 'hello\nhow are you?\n' | "$HM" chat --model "$W/chat_moving" -n 8 --temperature 0 2>"$W/chat3.err"); rm1=$?
m2=$(printf 'hello\nhow are you?\n' | "$HM" chat --model "$W/chat_moving" -n 8 --temperature 0 --reread 2>/dev/null)
[ "$rm1" -eq 0 ] && [ "$m1" = "$m2" ] && ok || bad "chat with a rewriting template: exit $rm1, '$m1' vs '$m2'"
grep -q "reading the whole conversation again" "$W/chat3.err" && ok || bad "chat says it re-reads: $(cat "$W/chat3.err")"
# Template errors name the template's message; the folder without a template uses hm serve's format.
expect_fail "chat template raises" "no system turns here" bash -c "printf 'hi\\n' | '$HM' chat --model '$W/chat' --system x -n 1"
printf '{"chat_template": "{%% if %%}"}' > "$W/chat_moving/tokenizer_config.json"
expect_fail "chat template syntax error" "chat template line 1" "$HM" chat --model "$W/chat_moving" < /dev/null
d=$(printf 'hi\n' | "$HM" chat --model "$W/tiny" -n 4 --temperature 0 2>&1 >/dev/null); rd=$?
[ "$rd" -eq 0 ] && case "$d" in *"<|role|> format"*) true ;; *) false ;; esac && ok || bad "chat without a template: $rd: $d"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
