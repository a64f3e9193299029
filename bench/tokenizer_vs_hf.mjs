// Hugging Face tokenizers (its Node binding, tests/fixtures/tokenizers/node_modules) encoding a
// text file: best of 5 runs, the same JSON line as hm_bench_tokenizer.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
const here = path.dirname(new URL(import.meta.url).pathname);
const require = createRequire(path.join(here, '../tests/fixtures/tokenizers/package.json'));
const { Tokenizer } = require('tokenizers');
const [dir, file] = process.argv.slice(2);
const text = fs.readFileSync(file, 'utf8');
const tok = Tokenizer.fromFile(path.join(dir, 'tokenizer.json'));
let best = Infinity, tokens = 0;
for (let r = 0; r < 5; ++r) {
  const t0 = process.hrtime.bigint();
  const e = await tok.encode(text, null, { addSpecialTokens: false });
  tokens = e.getIds().length;
  best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e9);
}
const bytes = Buffer.byteLength(text);
console.log(JSON.stringify({ impl: 'tokenizers', version: require('tokenizers/package.json').version, bytes, tokens,
  seconds: +best.toFixed(4), mb_per_s: +(bytes / best / 1e6).toFixed(2) }));
