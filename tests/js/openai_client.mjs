// The official OpenAI client (npm "openai", pinned in package-lock.json) against hm serve:
// chat and completions, streamed and not, usage, finish reasons, logprobs, and errors as the
// client's typed exceptions. Run by server_js_test.sh: node openai_client.mjs URL MODEL KEY
import assert from 'node:assert/strict';
import OpenAI from 'openai';

const [url, model, key] = process.argv.slice(2);
const client = new OpenAI({baseURL: `${url}/v1`, apiKey: key, maxRetries: 0, timeout: 60_000});
const N = 12;  // tokens per greedy request; ignore_eos so every request runs to N

// Prompt token counts from the server's own /tokenize (BOS included, as a request's prompt).
async function count(text) {
  const r = await fetch(`${url}/tokenize`, {
    method: 'POST',
    headers: {'Content-Type': 'application/json', Authorization: `Bearer ${key}`},
    body: JSON.stringify({content: text, add_special: true}),
  });
  assert.equal(r.status, 200);
  return (await r.json()).count;
}

// Every chunk of a stream: the text they assemble to, the finish reason, the usage chunk.
async function collect(stream, object, piece) {
  const out = {text: '', finish: null, usage: null, chunks: 0};
  for await (const c of stream) {
    assert.equal(c.object, object);
    assert.equal(c.model, model);
    ++out.chunks;
    if (c.usage) out.usage = c.usage;
    for (const ch of c.choices) {
      out.text += piece(ch) ?? '';
      if (ch.finish_reason) out.finish = ch.finish_reason;
    }
  }
  return out;
}

function checkUsage(u, prompt, completion) {
  assert.equal(u.prompt_tokens, prompt);
  assert.equal(u.completion_tokens, completion);
  assert.equal(u.total_tokens, prompt + completion);
}

// ---- models
const ids = [];
for await (const m of client.models.list()) ids.push(m.id);
assert.deepEqual(ids, [model]);

// ---- chat: greedy, not streamed, then streamed: the same text, chunk by chunk
const messages = [{role: 'system', content: 'You are terse.'}, {role: 'user', content: 'Say something.'}];
const chatPrompt = await count('<|system|>\nYou are terse.\n<|user|>\nSay something.\n<|assistant|>\n');
const greedyChat = {model, messages, max_tokens: N, temperature: 0, ignore_eos: true};
const chat = await client.chat.completions.create(greedyChat);
assert.equal(chat.object, 'chat.completion');
assert.equal(chat.model, model);
assert.equal(chat.choices.length, 1);
assert.equal(chat.choices[0].message.role, 'assistant');
const chatText = chat.choices[0].message.content;
assert.ok(chatText.length > 0, 'empty chat reply');
assert.equal(chat.choices[0].finish_reason, 'length');
checkUsage(chat.usage, chatPrompt, N);

const chatStream = await collect(
    await client.chat.completions.create({...greedyChat, stream: true, stream_options: {include_usage: true}}),
    'chat.completion.chunk', ch => ch.delta.content);
assert.equal(chatStream.text, chatText, 'streamed chat differs from the non-streamed greedy reply');
assert.equal(chatStream.finish, 'length');
assert.ok(chatStream.chunks >= 4, `only ${chatStream.chunks} chunks`);
checkUsage(chatStream.usage, chatPrompt, N);
// The same prompt again resumes from the prefix cache (16-token blocks), and says so.
assert.ok(chatStream.usage.prompt_tokens_details.cached_tokens >= 16,
          `cached_tokens ${JSON.stringify(chatStream.usage.prompt_tokens_details)}`);

// The client's own stream helper assembles the same message.
const helper = client.chat.completions.stream(greedyChat);
const final = await helper.finalChatCompletion();
assert.equal(final.choices[0].message.content, chatText);
assert.equal(final.choices[0].finish_reason, 'length');

// Logprobs: one entry per token; greedy picks the most likely token.
const lp = await client.chat.completions.create({...greedyChat, logprobs: true, top_logprobs: 3});
assert.equal(lp.choices[0].message.content, chatText);
assert.equal(lp.choices[0].logprobs.content.length, N);
for (const t of lp.choices[0].logprobs.content) {
  assert.equal(t.top_logprobs.length, 3);
  assert.ok(t.logprob <= 0);
  assert.ok(Math.abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6, 'greedy did not take the top token');
}

// ---- completions: greedy, not streamed, then streamed
const prompt = 'The quick brown fox';
const greedyComp = {model, prompt, max_tokens: N, temperature: 0, ignore_eos: true};
const comp = await client.completions.create(greedyComp);
assert.equal(comp.object, 'text_completion');
const compText = comp.choices[0].text;
assert.ok(compText.length > 0, 'empty completion');
assert.equal(comp.choices[0].finish_reason, 'length');
checkUsage(comp.usage, await count(prompt), N);

const compStream = await collect(
    await client.completions.create({...greedyComp, stream: true, stream_options: {include_usage: true}}),
    'text_completion', ch => ch.text);
assert.equal(compStream.text, compText, 'streamed completion differs from the non-streamed greedy one');
assert.equal(compStream.finish, 'length');
checkUsage(compStream.usage, await count(prompt), N);

// A stop string taken from the greedy text: the reply ends before it, finish_reason "stop",
// streamed or not. (The first printable ASCII character after the first whose first
// occurrence is there: random weights also give bytes that are not UTF-8.)
let at = -1;
for (let i = 1; i < compText.length && at < 0; ++i) {
  const c = compText.charCodeAt(i);
  if (c >= 0x20 && c < 0x7f && compText.indexOf(compText[i]) === i) at = i;
}
assert.ok(at > 0, `no usable stop character in ${JSON.stringify(compText)}`);
const stop = compText[at];
const stopped = await client.completions.create({...greedyComp, stop: [stop]});
assert.equal(stopped.choices[0].text, compText.slice(0, at));
assert.equal(stopped.choices[0].finish_reason, 'stop');
const stoppedStream = await collect(await client.completions.create({...greedyComp, stop: [stop], stream: true}),
                                    'text_completion', ch => ch.text);
assert.equal(stoppedStream.text, compText.slice(0, at));
assert.equal(stoppedStream.finish, 'stop');

// Sampling with a seed repeats itself.
const seeded = {model, prompt, max_tokens: N, temperature: 1, seed: 1234};
const s1 = await client.completions.create(seeded);
const s2 = await client.completions.create(seeded);
assert.equal(s1.choices[0].text, s2.choices[0].text);

// ---- errors: OpenAI error objects, thrown as the client's typed errors
const isError = (cls, status, param, code) => e => {
  assert.ok(e instanceof cls, `expected ${cls.name}, got ${e?.constructor?.name}: ${e?.message}`);
  assert.equal(e.status, status);
  if (param !== undefined) assert.equal(e.param, param);
  if (code !== undefined) assert.equal(e.code, code);
  assert.ok(typeof e.error?.message === 'string' && e.error.message.length > 0);
  return true;
};
await assert.rejects(client.completions.create({model, prompt, max_tokens: 999999}),
                     isError(OpenAI.BadRequestError, 400, 'max_tokens'));
await assert.rejects(client.chat.completions.create({...greedyChat, stream: true, temperature: 5}),
                     isError(OpenAI.BadRequestError, 400, 'temperature'));
await assert.rejects(client.chat.completions.create({...greedyChat, n: 2}), isError(OpenAI.BadRequestError, 400, 'n'));
await assert.rejects(client.chat.completions.create({...greedyChat, messages: [{role: 'wizard', content: 'x'}]}),
                     isError(OpenAI.BadRequestError, 400, 'messages[0].role'));
await assert.rejects(client.completions.create({...greedyComp, model: 'gpt-4o'}),
                     isError(OpenAI.NotFoundError, 404, 'model', 'model_not_found'));
const wrongKey = new OpenAI({baseURL: `${url}/v1`, apiKey: 'sk-wrong', maxRetries: 0});
await assert.rejects(wrongKey.completions.create(greedyComp),
                     isError(OpenAI.AuthenticationError, 401, undefined, 'invalid_api_key'));

console.log(`openai_client: ok (chat ${JSON.stringify(chatText)}, ${chatStream.chunks} chunks; ` +
            `completion ${JSON.stringify(compText)})`);
