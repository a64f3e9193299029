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
for sub in init train eval generate bench info; do "$HM" $sub --help >/dev/null && ok || bad "hm $sub --help"; done

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

cp -r "$W/tiny" "$W/trunc"
truncate -s 1000 "$W/trunc/model.safetensors"
expect_fail "truncated checkpoint" "model.safetensors" "$HM" generate --model "$W/trunc" --prompt hi
cp -r "$W/tiny" "$W/garbage"
head -c 4096 /dev/urandom > "$W/garbage/model.safetensors"
expect_fail "garbage checkpoint" "safetensors" "$HM" generate --model "$W/garbage" --prompt hi

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
"$HM" generate --model "$W/trained/checkpoint" --prompt "the cat" -n 10 >/dev/null && ok || bad "generate from trained"
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

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
