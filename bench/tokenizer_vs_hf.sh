#!/usr/bin/env bash
# Tokenizer encoding speed: ours (hm_bench_tokenizer) against Hugging Face's tokenizers (0.23.2,
# the Rust core through its Node binding, which also builds the Encoding's offsets and strings:
# part of what a user of the library pays) on the same ~1 MB text, in one run, for each tokenizer
# folder given (default: the GPT-NeoX-style model fixture and the six tokenizer fixtures). Both
# must give the same number of tokens. Needs node and npm (tests/fixtures/tokenizers: npm ci).
#   bench/tokenizer_vs_hf.sh [BUILD_DIR] [TOKENIZER_DIR...]
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}
shift || true
dirs=("$@")
if [ ${#dirs[@]} -eq 0 ]; then
  dirs=(tests/fixtures/hf/mamba_f32)
  for f in llama3_bpe o200k_bpe falcon_bpe spm_legacy metaspace_first metaspace_split; do dirs+=("tests/fixtures/tokenizers/$f"); done
fi
[ -d tests/fixtures/tokenizers/node_modules/tokenizers ] || (cd tests/fixtures/tokenizers && npm ci --silent)
cmake --build "$B" --target hm_bench_tokenizer >/dev/null
text=$(mktemp)
trap 'rm -f "$text"' EXIT
# About 1 MB: the docs (English prose, code, tables) and the fixtures' multilingual texts.
python3 - "$text" <<'PY'
import json, sys, glob
parts = [open(p, encoding="utf-8").read() for p in sorted(glob.glob("docs/*.md"))]
parts.append("\n".join(json.load(open("tests/fixtures/tokenizers/pre_tokenizers.json"))["texts"]))
t = "\n".join(parts)
while len(t.encode()) < 1_000_000:
    t += "\n" + "\n".join(parts)
open(sys.argv[1], "w", encoding="utf-8").write(t)
PY
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), one thread"
printf '%-40s %10s %10s %8s\n' tokenizer "hm MB/s" "HF MB/s" ratio
for d in "${dirs[@]}"; do
  ours=$("$B/hm_bench_tokenizer" "$d" "$text")
  theirs=$(node bench/tokenizer_vs_hf.mjs "$d" "$text")
  python3 - "$d" "$ours" "$theirs" <<'PY'
import json, sys
d, a, b = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
if a["tokens"] != b["tokens"]:
    sys.exit(f"{d}: token counts differ: hm {a['tokens']}, tokenizers {b['tokens']}")
print(f"{d:40s} {a['mb_per_s']:10.2f} {b['mb_per_s']:10.2f} {a['mb_per_s'] / b['mb_per_s']:7.2f}x")
PY
done
