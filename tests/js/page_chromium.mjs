// The chat page at / in Debian's headless chromium, driven over the DevTools protocol
// (--remote-debugging-pipe: no npm package needed): it types a message, sends it, and waits for
// the streamed reply, which must equal the same greedy request sent directly; then a screenshot.
// Run by server_js_test.sh: node page_chromium.mjs URL MODEL SCREENSHOT.png
import assert from 'node:assert/strict';
import {spawn} from 'node:child_process';
import {mkdtempSync, rmSync, writeFileSync} from 'node:fs';
import {tmpdir} from 'node:os';
import {join} from 'node:path';

const [url, model, shot] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), 'hm-chromium-'));
// fd 3 carries commands to the browser, fd 4 its answers and events, each message ending in \0.
const browser = spawn('chromium', [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
  '--remote-debugging-pipe', `--user-data-dir=${profile}`, '--window-size=820,560', 'about:blank',
], {stdio: ['ignore', 'ignore', 'pipe', 'pipe', 'pipe']});
let stderr = '';
browser.stderr.on('data', d => { stderr += d; });
const exited = new Promise(resolve => browser.on('exit', resolve));

let nextId = 1, buf = '';
const pending = new Map();
browser.stdio[4].on('data', d => {
  buf += d.toString('utf8');
  let i;
  while ((i = buf.indexOf('\0')) >= 0) {
    const msg = JSON.parse(buf.slice(0, i));
    buf = buf.slice(i + 1);
    const p = pending.get(msg.id);
    if (!p) continue;  // an event
    pending.delete(msg.id);
    if (msg.error) p.reject(new Error(`${p.method}: ${JSON.stringify(msg.error)}`));
    else p.resolve(msg.result);
  }
});
function send(method, params = {}, sessionId) {
  const id = nextId++;
  browser.stdio[3].write(JSON.stringify({id, method, params, ...(sessionId ? {sessionId} : {})}) + '\0');
  return new Promise((resolve, reject) => pending.set(id, {resolve, reject, method}));
}
const sleep = ms => new Promise(r => setTimeout(r, ms));

async function main() {
  const {targetId} = await send('Target.createTarget', {url: 'about:blank'});
  const {sessionId} = await send('Target.attachToTarget', {targetId, flatten: true});
  const page = (method, params) => send(method, params, sessionId);
  const evaluate = async expr => {
    const r = await page('Runtime.evaluate', {expression: expr, awaitPromise: true, returnByValue: true});
    if (r.exceptionDetails) throw new Error(`page: ${JSON.stringify(r.exceptionDetails)}`);
    return r.result.value;
  };
  const waitFor = async (expr, what, ms = 30_000) => {
    for (const t0 = Date.now(); Date.now() - t0 < ms; await sleep(50)) {
      const v = await evaluate(expr);
      if (v) return v;
    }
    throw new Error(`timed out waiting for ${what}`);
  };
  await page('Emulation.setDeviceMetricsOverride', {width: 820, height: 560, deviceScaleFactor: 1, mobile: false});
  await page('Page.navigate', {url: `${url}/`});
  // The page asks /v1/models for the model's name when it loads.
  await waitFor(`document.getElementById('model')?.textContent === ${JSON.stringify(model)}`, 'the model name');

  // Greedy settings in the page's fields, then a message typed and sent with Enter.
  const settings = {temperature: 0, top_p: 1, top_k: 0, max_tokens: 24};
  await evaluate(`(() => { const s = ${JSON.stringify(settings)};
    for (const k in s) document.getElementById(k).value = s[k];
    // Each text the reply shows as it streams in.
    window.seen = []; const log = document.getElementById('log');
    new MutationObserver(() => { const a = log.querySelector('.assistant'); if (a) window.seen.push(a.textContent); })
      .observe(log, {subtree: true, childList: true, characterData: true});
    document.getElementById('msg').focus(); })()`);
  const message = 'Hello, model!';
  await page('Input.insertText', {text: message});
  for (const type of ['keyDown', 'keyUp'])
    await page('Input.dispatchKeyEvent', {type, key: 'Enter', code: 'Enter', windowsVirtualKeyCode: 13, text: '\r'});

  // The reply is done when the page has added it to its history (after the stream's [DONE]).
  await waitFor(`history.length === 2`, 'the streamed reply');
  const got = await evaluate(`({reply: history[1].content, shown: document.querySelector('.assistant').textContent,
                                user: document.querySelector('.user').textContent, seen: window.seen,
                                errors: document.querySelectorAll('.err').length})`);
  assert.equal(got.errors, 0, 'the page shows an error');
  assert.equal(got.user, `you: ${message}`);
  assert.equal(got.shown, `model: ${got.reply}`);

  // The same request straight to the API, not streamed: the page's reply must be its text.
  const r = await fetch(`${url}/v1/chat/completions`, {
    method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({messages: [{role: 'user', content: message}], ...settings}),
  });
  assert.equal(r.status, 200);
  const direct = (await r.json()).choices[0].message.content;
  assert.ok(direct.length > 0);
  assert.equal(got.reply, direct, 'the page shows another reply than the API gives');

  const {data} = await page('Page.captureScreenshot', {format: 'png'});
  writeFileSync(shot, Buffer.from(data, 'base64'));
  console.log(`page_chromium: ok (reply ${JSON.stringify(got.reply)}, shown in ${got.seen.length} updates)`);
}

const watchdog = setTimeout(() => { console.error('page_chromium: timed out'); process.exit(1); }, 90_000);
try {
  await main();
} catch (e) {
  console.error(`page_chromium: ${e.stack}\nchromium: ${stderr.slice(-2000)}`);
  process.exitCode = 1;
} finally {
  clearTimeout(watchdog);
  await send('Browser.close').catch(() => {});
  await Promise.race([exited, sleep(5000)]);
  browser.kill();
  rmSync(profile, {recursive: true, force: true});
}
