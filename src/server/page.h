// The chat page hm serve sends for GET / (docs/SERVER.md): plain HTML and JavaScript, no build
// step. It streams /v1/chat/completions with the page's sampling settings and the API key given.
#pragma once

namespace hm::server {

inline constexpr const char* kChatPage = R"HTML(<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hm serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;max-width:52rem;margin:1rem auto;padding:0 1rem;color:#222}
#log{border:1px solid #ccc;border-radius:6px;padding:.5rem;min-height:18rem;white-space:pre-wrap}
.user{color:#0645ad}.assistant{color:#222}.err{color:#b00}
form{display:flex;gap:.5rem;margin-top:.5rem}#msg{flex:1}
fieldset{margin-top:.5rem;font-size:.9rem}label{margin-right:.8rem}input[type=number]{width:5rem}
</style></head><body>
<h1>hm serve <small id="model"></small></h1>
<div id="log"></div>
<form id="f"><input id="msg" placeholder="Message" autocomplete="off"><button>Send</button></form>
<fieldset><legend>Sampling</legend>
<label>temperature <input id="temperature" type="number" step="0.1" min="0" max="2" value="0.8"></label>
<label>top_p <input id="top_p" type="number" step="0.05" min="0.05" max="1" value="0.95"></label>
<label>top_k <input id="top_k" type="number" min="0" value="40"></label>
<label>max_tokens <input id="max_tokens" type="number" min="1" value="128"></label>
<label>API key <input id="key" type="password"></label></fieldset>
<script>
const log = document.getElementById('log'), history = [];
const val = id => document.getElementById(id).value;
function line(cls, text) { const d = document.createElement('div'); d.className = cls; d.textContent = text; log.appendChild(d); return d; }
function headers() { const h = {'Content-Type': 'application/json'}; if (val('key')) h.Authorization = 'Bearer ' + val('key'); return h; }
fetch('/v1/models', {headers: headers()}).then(r => r.json()).then(j => { document.getElementById('model').textContent = j.data[0].id; }).catch(() => {});
document.getElementById('f').onsubmit = async e => {
  e.preventDefault();
  const text = val('msg'); if (!text) return;
  document.getElementById('msg').value = '';
  history.push({role: 'user', content: text}); line('user', 'you: ' + text);
  const out = line('assistant', ''); let reply = '';
  const body = {messages: history, stream: true, temperature: +val('temperature'), top_p: +val('top_p'),
                top_k: +val('top_k'), max_tokens: +val('max_tokens')};
  const r = await fetch('/v1/chat/completions', {method: 'POST', headers: headers(), body: JSON.stringify(body)});
  if (!r.ok) { out.className = 'err'; out.textContent = (await r.json()).error.message; history.pop(); return; }
  const reader = r.body.getReader(), dec = new TextDecoder(); let buf = '';
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const ev = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!ev.startsWith('data: ') || ev === 'data: [DONE]') continue;
      const c = JSON.parse(ev.slice(6));
      if (c.error) { out.className = 'err'; reply += ' [' + c.error.message + ']'; }
      else if (c.choices.length && c.choices[0].delta.content) reply += c.choices[0].delta.content;
      out.textContent = 'model: ' + reply;
    }
  }
  history.push({role: 'assistant', content: reply});
};
</script></body></html>
)HTML";

}  // namespace hm::server
