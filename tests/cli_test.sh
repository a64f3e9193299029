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
for sub in init generate bench info; do "$HM" $sub --help >/dev/null && ok || bad "hm $sub --help"; done

"$HM" init --preset tiny --seed 3 --out "$W/tiny" >/dev/null && ok || bad "init tiny"
[ -f "$W/tiny/config.json" ] && [ -f "$W/tiny/model.safetensors" ] && [ -f "$W/tiny/tokenizer.json" ] && ok || bad "init wrote files"

a=$("$HM" generate --model "$W/tiny" --prompt "hello" -n 20 --temperature 0.9 --seed 5)
b=$("$HM" generate --model "$W/tiny" --prompt "hello" -n 20 --temperature 0.9 --seed 5)
[ "$a" = "$b" ] && ok || bad "same seed gives the same text"
g1=$("$HM" generate --model "$W/tiny" --prompt "hello" -n 20 --temperature 0 --seed 1)
g2=$("$HM" generate --model "$W/tiny" --prompt "hello" -n 20 --temperature 0 --seed 2)
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

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
