#!/usr/bin/env bash
# hm serve as a black box (docs/SERVER.md): the raw protocol with curl, bad requests, and a
# SIGTERM that lets an in-flight stream finish and exits with 143.
# Usage: server_test.sh HM_BINARY WORK_DIR
set -euo pipefail
HM=$1
WORK=$2
rm -rf "$WORK" && mkdir -p "$WORK"
cd "$WORK"
"$HM" init --preset tiny --out tiny >/dev/null

fail() { echo "FAIL: $*" >&2; exit 1; }

"$HM" serve -m tiny --port 0 --slots 2 --ctx 256 --cache-block 16 --max-body-kb 4 -t 1 >out.txt 2>err.txt &
PID=$!
for _ in $(seq 100); do grep -q listening out.txt 2>/dev/null && break; sleep 0.05; done
PORT=$(sed -n 's/.*:\([0-9]*\)$/\1/p' out.txt)
[ -n "$PORT" ] || fail "no port: $(cat err.txt)"
URL=http://127.0.0.1:$PORT

code() { curl -s -o body.txt -w '%{http_code}' "$@"; }

[ "$(code $URL/health)" = 200 ] || fail "/health"
[ "$(code $URL/v1/completions -d '{"model":"tiny","prompt":"Hi","max_tokens":4,"temperature":0}')" = 200 ] ||
  fail "completion: $(cat body.txt)"
grep -q '"object":"text_completion"' body.txt || fail "completion body: $(cat body.txt)"
[ "$(code $URL/v1/completions -d '{"prompt":"Hi","n":3}')" = 400 ] || fail "n=3"
grep -q '"param":"n"' body.txt || fail "n=3 body: $(cat body.txt)"
[ "$(code $URL/v1/completions -d '{"prompt":')" = 400 ] || fail "bad JSON"
[ "$(code $URL/v1/completions -d '{"model":"nope","prompt":"x"}')" = 404 ] || fail "unknown model"
[ "$(code $URL/v1/completions -d '{"prompt":"x","max_tokens":999999}')" = 400 ] || fail "max_tokens over the context"
head -c 10000 /dev/zero | tr '\0' ' ' >big.json
[ "$(code $URL/v1/completions --data-binary @big.json)" = 413 ] || fail "oversized body"
grep -q '"error"' body.txt || fail "413 body: $(cat body.txt)"

# Server-sent events exactly: every event is "data: {json}" and a blank line, the last "data: [DONE]".
curl -sN $URL/v1/chat/completions \
  -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"temperature":0,"stream":true}' >sse.txt
python3 - sse.txt <<'EOF'
import json, sys
t = open(sys.argv[1], encoding="utf-8").read()
events = t.split("\n\n")
assert events[-1] == "" and events[-2] == "data: [DONE]", repr(t[-60:])
chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
assert all(e.startswith("data: ") for e in events[:-1])
assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
assert all(c["object"] == "chat.completion.chunk" for c in chunks)
assert chunks[-1]["choices"][0]["finish_reason"] == "length"
EOF

# SIGTERM while a stream runs: it finishes (drain), then the server exits with 143.
curl -sN $URL/v1/completions -d '{"prompt":"abc","max_tokens":200,"stream":true,"ignore_eos":true}' >long.txt &
CURL=$!
sleep 0.3
kill -TERM $PID
set +e
wait $PID
RC=$?
set -e
wait $CURL || true
[ $RC = 143 ] || fail "exit code $RC after SIGTERM: $(cat err.txt)"
tail -c 16 long.txt | grep -q 'data: \[DONE\]' || fail "the in-flight stream did not finish: $(tail -c 300 long.txt)"
grep -c '"text"' long.txt >/dev/null

# A folder with its own chat template: chat requests are rendered with it (bos text included,
# no bos token added), and a message it refuses is a 400 with its message.
cp -r tiny tiny_chat
cat > tiny_chat/tokenizer_config.json <<'JSON'
{"bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool turns') }}{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"}
JSON
"$HM" serve -m tiny_chat --port 0 --slots 1 --ctx 128 -t 1 >out2.txt 2>err2.txt &
PID=$!
for _ in $(seq 100); do grep -q listening out2.txt 2>/dev/null && break; sleep 0.05; done
PORT=$(sed -n 's/.*:\([0-9]*\)$/\1/p' out2.txt)
[ -n "$PORT" ] || fail "no port: $(cat err2.txt)"
URL=http://127.0.0.1:$PORT
grep -q "chat template: tiny_chat/tokenizer_config.json" err2.txt || fail "the template is not named: $(cat err2.txt)"
[ "$(code $URL/v1/chat/completions -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}')" = 200 ] ||
  fail "chat with the folder's template: $(cat body.txt)"
# "<s>[user]hi[assistant]": 22 bytes, 22 tokens of the byte tokenizer.
grep -q '"prompt_tokens":22' body.txt || fail "chat prompt is not the template's: $(cat body.txt)"
[ "$(code $URL/v1/chat/completions -d '{"messages":[{"role":"tool","content":"x"}],"max_tokens":2}')" = 400 ] ||
  fail "a message the template refuses: $(cat body.txt)"
grep -q 'no tool turns' body.txt || fail "the template's message: $(cat body.txt)"
kill -TERM $PID
wait $PID || true
echo "server_test: ok"
