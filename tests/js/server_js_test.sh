#!/usr/bin/env bash
# hm serve driven by real clients (docs/SERVER.md, "Tested with real clients"):
#   openai: the official OpenAI client library from npm (the version pinned in package-lock.json,
#           installed with npm ci) runs chat and completions, streamed and not (openai_client.mjs);
#   page:   Debian's chromium, headless, loads the chat page at /, types a message and waits for
#           the streamed reply (page_chromium.mjs), and saves a screenshot (SCREENSHOT, if given).
# Usage: server_js_test.sh HM_BINARY WORK_DIR openai|page [SCREENSHOT]
# A missing node, npm or chromium is a failure, not a skip: ./setup.sh installs them.
set -euo pipefail
HM=$(realpath "$1")
WORK=$(realpath -m "$2")
MODE=$3
SHOT=${4:+$(realpath -m "$4")}
HERE=$(cd "$(dirname "$0")" && pwd)
fail() { echo "FAIL: $*" >&2; exit 1; }

command -v node >/dev/null 2>&1 || fail "node not found (./setup.sh installs Debian's nodejs and npm)"
# The pinned openai client documents Node 20 or later (Debian 12's nodejs is 18): said on failure.
NODE_NOTE=""
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] ||
  NODE_NOTE=" (node $(node --version): the pinned openai client supports Node 20 or later)"
case $MODE in
  openai) command -v npm >/dev/null 2>&1 || fail "npm not found (./setup.sh installs Debian's npm)" ;;
  page) command -v chromium >/dev/null 2>&1 || fail "chromium not found (./setup.sh installs Debian's chromium)" ;;
  *) fail "mode must be openai or page, got '$MODE'" ;;
esac

rm -rf "$WORK" && mkdir -p "$WORK"
cp "$HERE"/package.json "$HERE"/package-lock.json "$HERE"/*.mjs "$WORK"/
cd "$WORK"
if [ "$MODE" = openai ]; then
  # The exact version of package-lock.json, checked against its integrity hash.
  npm ci --no-audit --no-fund --loglevel=error >npm.log 2>&1 || fail "npm ci: $(tail -5 npm.log)"
fi
"$HM" init --preset tiny --out tiny >/dev/null

KEY=""
[ "$MODE" = openai ] && KEY=sk-hm-test  # the client sends it as a bearer token; a wrong one is tested
"$HM" serve -m tiny --port 0 --slots 4 --ctx 512 --cache-block 16 -t 1 ${KEY:+--api-key "$KEY"} >out.txt 2>err.txt &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 200); do grep -q listening out.txt 2>/dev/null && break; sleep 0.05; done
PORT=$(sed -n 's/.*:\([0-9]*\)$/\1/p' out.txt)
[ -n "$PORT" ] || fail "hm serve did not start: $(cat err.txt)"
URL=http://127.0.0.1:$PORT

if [ "$MODE" = openai ]; then
  timeout 120 node openai_client.mjs "$URL" tiny "$KEY" || fail "openai_client.mjs$NODE_NOTE (server log: $(tail -5 err.txt))"
else
  timeout 120 node page_chromium.mjs "$URL" tiny "$WORK/page.png" || fail "page_chromium.mjs$NODE_NOTE (server log: $(tail -5 err.txt))"
  [ -z "$SHOT" ] || cp page.png "$SHOT"
fi

kill -TERM $PID
set +e
wait $PID
RC=$?
set -e
trap - EXIT
[ $RC = 143 ] || fail "hm serve exited with $RC after SIGTERM: $(tail -5 err.txt)"
echo "server_js_test $MODE: ok"
