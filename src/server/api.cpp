#include "server/api.h"

#include <cmath>
#include <ctime>
#include <map>
#include <mutex>
#include <thread>
#include <random>
#include <sys/socket.h>
#include <sstream>

#include <httplib.h>

#include "core/error.h"
#include "server/page.h"

namespace hm::server {

using nlohmann::json;

json ApiError::body() const {
  json e = {{"message", message}, {"type", type}, {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", code.empty() ? json(nullptr) : json(code)}};
  return {{"error", e}};
}

static ApiError bad(const std::string& param, const std::string& msg) { return {400, msg, param}; }

static std::string type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    default: return "a number";
  }
}

// Field readers: absent or null keeps the default; a wrong type or a value out of range is a 400
// naming the field and what it got.
static bool has(const json& j, const char* k) { return j.contains(k) && !j[k].is_null(); }

static double number(const json& j, const char* k, double def, double lo, double hi, bool lo_open = false) {
  if (!has(j, k)) return def;
  const json& v = j[k];
  if (!v.is_number()) throw bad(k, detail::cat(k, " must be a number, got ", type_name(v)));
  const double x = v.get<double>();
  // Every caller stores the value as a float: an open bound holds after that rounding too
  // (1e-300 is above 0 but becomes 0.0f).
  if (!std::isfinite(x) || x < lo || x > hi || (lo_open && (x == lo || float(x) == float(lo))))
    throw bad(k, detail::cat(k, " must be in ", lo_open ? "(" : "[", lo, ", ", hi, "], got ", v.dump()));
  return x;
}

static int64_t integer(const json& j, const char* k, int64_t def, int64_t lo, int64_t hi) {
  if (!has(j, k)) return def;
  const json& v = j[k];
  if (!v.is_number_integer()) throw bad(k, detail::cat(k, " must be an integer, got ", v.is_number() ? v.dump() : type_name(v)));
  // nlohmann stores a non-negative literal as unsigned: both bounds apply to it too (max_tokens: 0 is a 400).
  const bool out = v.is_number_unsigned()
                       ? (v.get<uint64_t>() > uint64_t(hi) || (lo > 0 && v.get<uint64_t>() < uint64_t(lo)))
                       : (v.get<int64_t>() < lo || v.get<int64_t>() > hi);
  if (out)
    throw bad(k, detail::cat(k, " must be between ", lo, " and ", hi, ", got ", v.dump()));
  return v.get<int64_t>();
}

static bool boolean(const json& j, const char* k, bool def) {
  if (!has(j, k)) return def;
  if (!j[k].is_boolean()) throw bad(k, detail::cat(k, " must be true or false, got ", type_name(j[k])));
  return j[k].get<bool>();
}

static std::string message_text(const json& content, size_t i) {
  const std::string p = detail::cat("messages[", i, "].content");
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) throw bad(p, p + " must be a string or an array of text parts, got " + type_name(content));
  std::string s;
  for (const json& part : content) {
    if (!part.is_object() || !part.contains("type") || part["type"] != "text" || !part.contains("text") ||
        !part["text"].is_string())
      throw bad(p, p + ": only parts {\"type\": \"text\", \"text\": STRING} are supported");
    s += part["text"].get<std::string>();
  }
  return s;
}

std::string apply_chat_template(const json& messages) {
  std::string s;
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    s += "<|" + m["role"].get<std::string>() + "|>\n" + message_text(m["content"], i) + "\n";
  }
  return s + "<|assistant|>\n";
}

// The messages as the client ordered their keys (body re-read as ordered_json: `json` sorts
// them), so a template's tojson prints them as transformers would.
std::string apply_model_chat_template(const ChatFormat& chat, const json& messages, const std::string& body) {
  const nlohmann::ordered_json ordered = nlohmann::ordered_json::parse(body).at("messages");
  nlohmann::ordered_json m = nlohmann::ordered_json::array();
  for (size_t i = 0; i < messages.size(); ++i) {
    m.push_back(ordered[i]);
    m.back()["content"] = message_text(messages[i]["content"], i);
  }
  try {
    return chat.apply(m, true);
  } catch (const Error& e) {
    throw bad("messages", std::string("the model's chat template refused the messages: ") + e.what());
  }
}

ParsedRequest parse_request(const std::string& body, Endpoint ep, const Tokenizer& tok, const std::string& model_id,
                            int ctx, const ChatFormat* chat) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::exception& e) {
    throw bad("", std::string("the body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw bad("", "the body must be a JSON object, got " + type_name(j));
  if (has(j, "model")) {
    if (!j["model"].is_string()) throw bad("model", "model must be a string, got " + type_name(j["model"]));
    if (j["model"] != model_id)
      throw ApiError{404, detail::cat("The model '", j["model"].get<std::string>(), "' does not exist; this server has '",
                                      model_id, "'"),
                     "model", "invalid_request_error", "model_not_found"};
  }
  if (integer(j, "n", 1, INT32_MIN, INT32_MAX) != 1)
    throw bad("n", "n must be 1: this server returns one choice per request (send n requests)");
  if (has(j, "best_of") && integer(j, "best_of", 1, INT32_MIN, INT32_MAX) != 1) throw bad("best_of", "best_of must be 1");
  if (has(j, "logit_bias") && !(j["logit_bias"].is_object() && j["logit_bias"].empty()))
    throw bad("logit_bias", "logit_bias is not supported");
  ParsedRequest r;
  GenParams& g = r.gen;
  const int vocab = tok.vocab_size();
  if (ep == Endpoint::Completions) {
    if (!j.contains("prompt")) throw bad("prompt", "prompt is required");
    json p = j["prompt"];
    if (p.is_array() && p.size() == 1 && p[0].is_string()) p = p[0];
    if (p.is_string()) {
      g.prompt = tok.encode(p.get<std::string>(), true);
    } else if (p.is_array() && !p.empty() && p[0].is_number()) {
      for (size_t i = 0; i < p.size(); ++i) {
        if (!p[i].is_number_integer() || p[i].get<int64_t>() < 0 || p[i].get<int64_t>() >= vocab)
          throw bad("prompt", detail::cat("prompt[", i, "] must be a token id in [0, ", vocab, "), got ", p[i].dump()));
        g.prompt.push_back(int32_t(p[i].get<int64_t>()));
      }
    } else if (p.is_array() && p.size() > 1) {
      throw bad("prompt", "one prompt per request: this server does not batch prompts in one request");
    } else {
      throw bad("prompt", "prompt must be a string or an array of token ids, got " + type_name(p));
    }
  } else {
    if (!j.contains("messages")) throw bad("messages", "messages is required");
    const json& m = j["messages"];
    if (!m.is_array() || m.empty()) throw bad("messages", "messages must be a non-empty array");
    for (size_t i = 0; i < m.size(); ++i) {
      const std::string p = detail::cat("messages[", i, "]");
      if (!m[i].is_object()) throw bad(p, p + " must be an object, got " + type_name(m[i]));
      if (!m[i].contains("role") || !m[i]["role"].is_string()) throw bad(p + ".role", p + ".role must be a string");
      const std::string role = m[i]["role"];
      if (role != "system" && role != "user" && role != "assistant" && role != "developer" && role != "tool")
        throw bad(p + ".role", p + ".role must be system, developer, user, assistant or tool, got '" + role + "'");
      if (!m[i].contains("content") || m[i]["content"].is_null())
        throw bad(p + ".content", p + ".content is required");
    }
    g.prompt = chat ? tok.encode(apply_model_chat_template(*chat, m, body), false) : tok.encode(apply_chat_template(m), true);
  }
  if (g.prompt.empty()) throw bad("prompt", "the prompt is empty");
  const int n = int(g.prompt.size());
  if (n >= ctx)
    throw bad(ep == Endpoint::Chat ? "messages" : "prompt",
              detail::cat("the prompt has ", n, " tokens; the context holds ", ctx, " (and must leave room for one more)"));
  const char* mt = ep == Endpoint::Chat && has(j, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  const int64_t def_max = ep == Endpoint::Completions ? std::min(16, ctx - n) : ctx - n;
  const int64_t max_tokens = integer(j, mt, def_max, 1, INT32_MAX);
  if (max_tokens > ctx - n)
    throw bad(mt, detail::cat(mt, " (", max_tokens, ") plus the prompt's ", n, " tokens exceed the context (", ctx,
                              " tokens): at most ", ctx - n));
  g.max_tokens = int(max_tokens);
  SamplingParams& s = g.sampling;
  s.temperature = float(number(j, "temperature", 1.0, 0.0, 2.0));
  s.top_p = float(number(j, "top_p", 1.0, 0.0, 1.0, true));
  const int64_t top_k = integer(j, "top_k", 0, -1, INT32_MAX);
  s.top_k = top_k < 0 ? 0 : int(top_k);
  s.min_p = float(number(j, "min_p", 0.0, 0.0, 0.999999));
  s.repeat_penalty = float(number(j, "repetition_penalty", 1.0, 0.0, 10.0, true));
  s.repeat_last_n = 64;
  g.presence_penalty = float(number(j, "presence_penalty", 0.0, -2.0, 2.0));
  g.frequency_penalty = float(number(j, "frequency_penalty", 0.0, -2.0, 2.0));
  if (has(j, "seed")) {
    s.seed = uint64_t(integer(j, "seed", 0, INT64_MIN, INT64_MAX));
  } else {
    static std::mt19937_64 rng{std::random_device{}()};
    static std::mutex mu;
    std::lock_guard<std::mutex> lk(mu);
    s.seed = rng();
  }
  if (has(j, "stop")) {
    const json& st = j["stop"];
    if (st.is_string()) {
      g.stop.push_back(st.get<std::string>());
    } else if (st.is_array()) {
      if (st.size() > 16) throw bad("stop", detail::cat("stop holds at most 16 strings, got ", st.size()));
      for (const json& x : st) {
        if (!x.is_string()) throw bad("stop", "stop must be a string or an array of strings");
        g.stop.push_back(x.get<std::string>());
      }
    } else {
      throw bad("stop", "stop must be a string or an array of strings, got " + type_name(st));
    }
    for (const auto& x : g.stop)
      if (x.empty()) throw bad("stop", "stop strings must not be empty");
  }
  r.stream = boolean(j, "stream", false);
  if (has(j, "stream_options")) {
    const json& so = j["stream_options"];
    if (!so.is_object()) throw bad("stream_options", "stream_options must be an object, got " + type_name(so));
    r.include_usage = boolean(so, "include_usage", false);
  }
  if (ep == Endpoint::Completions) {
    if (has(j, "logprobs")) {
      g.top_logprobs = int(integer(j, "logprobs", 0, 0, 20));
      r.logprobs = true;
    }
  } else {
    r.logprobs = boolean(j, "logprobs", false);
    const int64_t top = integer(j, "top_logprobs", 0, 0, 20);
    if (has(j, "top_logprobs") && !r.logprobs) throw bad("top_logprobs", "top_logprobs needs logprobs: true");
    if (r.logprobs) g.top_logprobs = int(top);
  }
  g.ignore_eos = boolean(j, "ignore_eos", false);
  return r;
}

// ---- responses -------------------------------------------------------------------------

static std::string new_id(const char* prefix) {
  static std::mt19937_64 rng{std::random_device{}()};
  static std::mutex mu;
  std::lock_guard<std::mutex> lk(mu);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(rng()));
  return std::string(prefix) + buf;
}

static json token_bytes(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(int(c));
  return b;
}

// Logprobs in the endpoint's shape: completions {tokens, token_logprobs, top_logprobs,
// text_offset}, chat {content: [{token, logprob, bytes, top_logprobs}]}.
static json logprobs_json(const std::vector<TokenLogprob>& lps, Endpoint ep, const Tokenizer& tok, size_t offset0) {
  if (ep == Endpoint::Chat) {
    json content = json::array();
    for (const auto& lp : lps) {
      const std::string piece = tok.decode_piece(lp.token);
      json top = json::array();
      for (const auto& [id, l] : lp.top) {
        const std::string p = tok.decode_piece(id);
        top.push_back({{"token", p}, {"logprob", l}, {"bytes", token_bytes(p)}});
      }
      content.push_back({{"token", piece}, {"logprob", lp.logprob}, {"bytes", token_bytes(piece)}, {"top_logprobs", top}});
    }
    return {{"content", content}};
  }
  json tokens = json::array(), lp_ = json::array(), tops = json::array(), offs = json::array();
  size_t off = offset0;
  for (const auto& lp : lps) {
    const std::string piece = tok.decode_piece(lp.token);
    tokens.push_back(piece);
    lp_.push_back(lp.logprob);
    json top = json::object();
    for (const auto& [id, l] : lp.top) top[tok.decode_piece(id)] = l;
    tops.push_back(top);
    offs.push_back(off);
    off += piece.size();
  }
  return {{"tokens", tokens}, {"token_logprobs", lp_}, {"top_logprobs", tops}, {"text_offset", offs}};
}

// Text for JSON: the engine only sends whole UTF-8 characters, but a token piece shown in
// logprobs may be part of one; nlohmann's dump would throw on it.
static std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// ---- metrics ---------------------------------------------------------------------------

struct Histogram {
  std::vector<double> bounds{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
  std::vector<int64_t> counts = std::vector<int64_t>(bounds.size() + 1, 0);
  double sum = 0;
  int64_t n = 0;
  void add(double x) {
    size_t i = 0;
    while (i < bounds.size() && x > bounds[i]) ++i;
    ++counts[i];
    sum += x;
    ++n;
  }
  void write(std::ostringstream& o, const char* name, const char* help) const {
    o << "# HELP " << name << ' ' << help << "\n# TYPE " << name << " histogram\n";
    int64_t c = 0;
    for (size_t i = 0; i < bounds.size(); ++i) {
      c += counts[i];
      o << name << "_bucket{le=\"" << bounds[i] << "\"} " << c << '\n';
    }
    o << name << "_bucket{le=\"+Inf\"} " << n << '\n' << name << "_sum " << sum << '\n' << name << "_count " << n << '\n';
  }
};

// ---- the server ------------------------------------------------------------------------

struct HttpServer::Impl {
  Engine& eng;
  ServerOptions o;
  httplib::Server svr;
  std::mutex mu;  // guards the histograms and response counts
  Histogram ttft, latency, queue;
  std::map<int, int64_t> responses;  // by status
  std::atomic<int> inflight{0};      // generation handlers (and streams) not yet done
  int listen_fd = -1;                // the listening socket, for its backlog

  Impl(Engine& e, ServerOptions opt) : eng(e), o(std::move(opt)) {}

  static void send_error(httplib::Response& res, const ApiError& e) {
    res.status = e.status;
    res.set_content(dump(e.body()), "application/json");
  }
  void count(int status) {
    std::lock_guard<std::mutex> lk(mu);
    ++responses[status];
  }
  std::string metrics();
  void generate(const httplib::Request& req, httplib::Response& res, Endpoint ep, bool draining);
};

std::string HttpServer::Impl::metrics() {
  EngineStats s = eng.stats(true);
  std::lock_guard<std::mutex> lk(mu);
  for (double x : s.ttft_s) ttft.add(x);
  for (double x : s.latency_s) latency.add(x);
  for (double x : s.queue_s) queue.add(x);
  std::ostringstream out;
  auto metric = [&](const char* name, const char* type, const char* help, double v) {
    out << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n' << name << ' ' << v << '\n';
  };
  metric("hm_requests_total", "counter", "Generation requests accepted", double(s.requests));
  metric("hm_requests_finished_total", "counter", "Generation requests finished (any reason)", double(s.finished));
  metric("hm_requests_cancelled_total", "counter", "Requests cancelled (client gone, timeout, shutdown)", double(s.cancelled));
  metric("hm_requests_rejected_total", "counter", "Requests refused because the queue was full", double(s.rejected));
  metric("hm_prompt_tokens_total", "counter", "Prompt tokens of admitted requests", double(s.prompt_tokens));
  metric("hm_generation_tokens_total", "counter", "Tokens generated", double(s.generated_tokens));
  metric("hm_computed_tokens_total", "counter", "Tokens the model ran forward (prompt chunks and decode steps)",
         double(s.computed_tokens));
  metric("hm_steps_total", "counter", "Batched forward steps", double(s.steps));
  metric("hm_device_sampled_tokens_total", "counter", "Tokens sampled on the device (only their ids came back)",
         double(s.device_sampled));
  metric("hm_step_seconds_total", "counter", "Seconds the engine spent in steps", s.step_s);
  metric("hm_step_forward_seconds_total", "counter", "Of those, in the model's forward (logits on the host)",
         s.forward_s);
  metric("hm_step_cache_seconds_total", "counter", "Of those, recording prefix-cache blocks", s.cache_s);
  metric("hm_step_sample_seconds_total", "counter", "Of those, sampling and sending tokens", s.sample_s);
  metric("hm_step_admit_seconds_total", "counter",
         "Of those, admitting requests (prefix-cache restore, device sampler setup)", s.admit_s);
  metric("hm_queue_depth", "gauge", "Requests waiting for a slot", double(s.queue));
  metric("hm_slots_busy", "gauge", "Slots running a request", double(s.busy));
  metric("hm_slots_total", "gauge", "Slots", double(s.slots));
  metric("hm_prefix_cache_hits_total", "counter", "Requests that resumed from a cached prefix", double(s.cache.hits));
  metric("hm_prefix_cache_misses_total", "counter", "Requests with no cached prefix", double(s.cache.misses));
  metric("hm_prefix_cache_tokens_saved_total", "counter", "Prompt tokens restored from the cache instead of computed",
         double(s.cache.tokens_saved));
  metric("hm_prefix_cache_blocks", "gauge", "Blocks held by the prefix cache", double(s.cache.blocks));
  metric("hm_prefix_cache_bytes", "gauge", "Bytes held by the prefix cache", double(s.cache.bytes));
  metric("hm_prefix_cache_evictions_total", "counter", "Blocks evicted (LRU)", double(s.cache.evicted));
  out << "# HELP hm_http_responses_total HTTP responses by status\n# TYPE hm_http_responses_total counter\n";
  for (const auto& [st, n] : responses) out << "hm_http_responses_total{code=\"" << st << "\"} " << n << '\n';
  ttft.write(out, "hm_time_to_first_token_seconds", "Time from request to its first token");
  latency.write(out, "hm_request_duration_seconds", "Time from request to its end");
  queue.write(out, "hm_request_queue_seconds", "Time from request to its slot");
  return out.str();
}

void HttpServer::Impl::generate(const httplib::Request& req, httplib::Response& res, Endpoint ep, bool draining) {
  // Held by the handler, and by a stream's provider until httplib drops it: stop() waits for it.
  ++inflight;
  std::shared_ptr<void> busy(nullptr, [this](void*) { --inflight; });
  if (draining) {
    res.set_header("Retry-After", "5");
    return send_error(res, {503, "the server is shutting down", "", "server_error", "unavailable"});
  }
  ParsedRequest pr;
  try {
    pr = parse_request(req.body, ep, eng.tokenizer(), o.model_id, eng.options().ctx, o.chat.get());
  } catch (const ApiError& e) {
    return send_error(res, e);
  } catch (const std::exception& e) {  // the tokenizer on odd text
    return send_error(res, {400, e.what(), ""});
  }
  pr.gen.timeout_s = o.timeout_s;
  std::shared_ptr<Request> r;
  try {
    r = eng.submit(pr.gen);
  } catch (const QueueFull& e) {
    res.set_header("Retry-After", "1");
    return send_error(res, {503, e.what(), "", "server_error", "queue_full"});
  } catch (const std::exception& e) {
    res.set_header("Retry-After", "5");
    return send_error(res, {503, e.what(), "", "server_error", "unavailable"});
  }
  const bool chat = ep == Endpoint::Chat;
  const std::string id = new_id(chat ? "chatcmpl-" : "cmpl-");
  const int64_t created = int64_t(std::time(nullptr));
  const std::string model = o.model_id;
  const int prompt_tokens = int(pr.gen.prompt.size());
  auto usage = [prompt_tokens](const Request& rq) {
    const int c = rq.completion_tokens();
    return json{{"prompt_tokens", prompt_tokens},
                {"completion_tokens", c},
                {"total_tokens", prompt_tokens + c},
                {"prompt_tokens_details", {{"cached_tokens", rq.cached_tokens()}}}};
  };
  auto finish_reason = [](Finish f) { return f == Finish::Length ? "length" : "stop"; };
  const Tokenizer& tok = eng.tokenizer();

  if (!pr.stream) {
    std::string text;
    std::vector<TokenLogprob> lps;
    std::vector<Event> ev;
    while (r->next(ev, std::chrono::milliseconds(200))) {
      for (auto& e : ev) {
        text += e.text;
        lps.insert(lps.end(), e.logprobs.begin(), e.logprobs.end());
      }
      ev.clear();
    }
    const Finish f = r->finish();
    if (f == Finish::Error) return send_error(res, {500, r->error(), "", "server_error"});
    if (f == Finish::Timeout)
      return send_error(res, {504, detail::cat("the request ran past the server's timeout (", o.timeout_s, " s)"), "",
                              "server_error", "timeout"});
    if (f == Finish::Cancelled) return send_error(res, {503, "the request was cancelled (the server is shutting down)", "",
                                                        "server_error", "cancelled"});
    json choice = {{"index", 0}, {"finish_reason", finish_reason(f)}};
    json lpj = pr.logprobs ? logprobs_json(lps, ep, tok, 0) : json(nullptr);
    if (chat) {
      choice["message"] = {{"role", "assistant"}, {"content", text}};
      choice["logprobs"] = lpj;
    } else {
      choice["text"] = text;
      choice["logprobs"] = lpj;
    }
    json out = {{"id", id},
                {"object", chat ? "chat.completion" : "text_completion"},
                {"created", created},
                {"model", model},
                {"choices", json::array({choice})},
                {"usage", usage(*r)}};
    res.set_content(dump(out), "application/json");
    return;
  }

  // Server-sent events: "data: {json}\n\n" per chunk, the last "data: [DONE]\n\n".
  struct StreamState {
    bool started = false;
    size_t offset = 0;  // completions' text_offset
  };
  auto st = std::make_shared<StreamState>();
  const bool include_usage = pr.include_usage, want_lp = pr.logprobs;
  auto chunk = [=](json choice, json usage_v) {
    json c = {{"id", id},
              {"object", chat ? "chat.completion.chunk" : "text_completion"},
              {"created", created},
              {"model", model},
              {"choices", choice.is_null() ? json::array() : json::array({choice})}};
    if (include_usage) c["usage"] = usage_v;
    return "data: " + dump(c) + "\n\n";
  };
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider(
      "text/event-stream",
      [=, &tok](size_t, httplib::DataSink& sink) {
        (void)busy;
        auto write = [&](const std::string& s) {
          if (!sink.write(s.data(), s.size())) {
            r->cancel();  // the client is gone: free its slot
            return false;
          }
          return true;
        };
        if (!st->started) {
          st->started = true;
          if (chat && !write(chunk({{"index", 0},
                                    {"delta", {{"role", "assistant"}, {"content", ""}}},
                                    {"logprobs", nullptr},
                                    {"finish_reason", nullptr}},
                                   nullptr)))
            return false;
        }
        std::vector<Event> ev;
        const bool more = r->next(ev, std::chrono::milliseconds(100));
        for (auto& e : ev) {
          json lpj = want_lp ? logprobs_json(e.logprobs, chat ? Endpoint::Chat : Endpoint::Completions, tok, st->offset)
                             : json(nullptr);
          st->offset += e.text.size();
          json choice = {{"index", 0}, {"logprobs", lpj}, {"finish_reason", nullptr}};
          if (chat) choice["delta"] = {{"content", e.text}};
          else choice["text"] = e.text;
          if (!write(chunk(choice, nullptr))) return false;
        }
        if (more) {
          if (ev.empty() && !sink.is_writable()) {
            r->cancel();
            return false;
          }
          return true;
        }
        const Finish f = r->finish();
        if (f == Finish::Stop || f == Finish::Length) {
          json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", finish_reason(f)}};
          if (chat) choice["delta"] = json::object();
          else choice["text"] = "";
          if (!write(chunk(choice, nullptr))) return false;
          if (include_usage && !write(chunk(nullptr, usage(*r)))) return false;
        } else {
          const ApiError e{f == Finish::Error ? 500 : 503,
                           f == Finish::Timeout ? "the request ran past the server's timeout"
                                                : f == Finish::Error ? r->error() : "the request was cancelled",
                           "", "server_error", finish_name(f)};
          if (!write("data: " + dump(e.body()) + "\n\n")) return false;
        }
        if (!write("data: [DONE]\n\n")) return false;
        sink.done();
        return true;
      },
      [r](bool) { r->cancel(); });  // a no-op once finished; frees the slot of a dropped stream
}

HttpServer::HttpServer(Engine& engine, ServerOptions o) : impl_(std::make_unique<Impl>(engine, std::move(o))) {
  Impl& m = *impl_;
  httplib::Server& svr = m.svr;
  const int threads = m.o.http_threads > 0 ? m.o.http_threads : engine.options().slots + engine.options().max_queue + 8;
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  svr.set_payload_max_length(m.o.max_body);
  // Keep the listening socket: bind() deepens its backlog (the library listens with 5).
  svr.set_socket_options([&m](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    m.listen_fd = int(sock);
  });
  svr.set_keep_alive_max_count(1000);
  svr.set_keep_alive_timeout(2);
  svr.set_pre_routing_handler([&m](const httplib::Request& req, httplib::Response& res) {
    if (m.o.api_key.empty() || req.path == "/health" || req.path == "/")  // the page's own calls carry the key
      return httplib::Server::HandlerResponse::Unhandled;
    if (req.get_header_value("Authorization") == "Bearer " + m.o.api_key)
      return httplib::Server::HandlerResponse::Unhandled;
    Impl::send_error(res, {401, "a valid API key is required: Authorization: Bearer KEY", "",
                           "invalid_request_error", "invalid_api_key"});
    m.count(401);
    return httplib::Server::HandlerResponse::Handled;
  });
  // Errors httplib answers itself (no route, body too large, bad HTTP) get a JSON body too.
  svr.set_error_handler(httplib::Server::HandlerWithResponse([&m](const httplib::Request&, httplib::Response& res) {
    if (res.body.empty()) {
      std::string msg = res.status == 404   ? "no such endpoint"
                        : res.status == 413 ? detail::cat("the body is larger than ", m.o.max_body, " bytes")
                        : res.status == 405 ? "method not allowed"
                                            : "bad request";
      Impl::send_error(res, {res.status, msg, "", "invalid_request_error"});
    }
    m.count(res.status);
    return httplib::Server::HandlerResponse::Handled;
  }));
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string msg = "internal error";
    try {
      if (ep) std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      msg = e.what();
    } catch (...) {
    }
    Impl::send_error(res, {500, msg, "", "server_error"});
  });
  svr.set_post_routing_handler([&m](const httplib::Request&, httplib::Response& res) {
    if (res.status < 400) m.count(res.status);
  });
  svr.Post("/v1/completions", [this, &m](const httplib::Request& req, httplib::Response& res) {
    m.generate(req, res, Endpoint::Completions, draining_);
  });
  svr.Post("/v1/chat/completions", [this, &m](const httplib::Request& req, httplib::Response& res) {
    m.generate(req, res, Endpoint::Chat, draining_);
  });
  svr.Get("/v1/models", [&m](const httplib::Request&, httplib::Response& res) {
    json d = {{"id", m.o.model_id}, {"object", "model"}, {"created", int64_t(std::time(nullptr))},
              {"owned_by", "hybrid-mamba"}, {"max_model_len", m.eng.options().ctx}};
    res.set_content(dump({{"object", "list"}, {"data", json::array({d})}}), "application/json");
  });
  svr.Get("/", [](const httplib::Request&, httplib::Response& res) { res.set_content(kChatPage, "text/html; charset=utf-8"); });
  svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (draining_) {
      res.status = 503;
      res.set_content(R"({"status":"shutting down"})", "application/json");
    } else {
      res.set_content(R"({"status":"ok"})", "application/json");
    }
  });
  svr.Get("/metrics", [&m](const httplib::Request&, httplib::Response& res) {
    res.set_content(m.metrics(), "text/plain; version=0.0.4");
  });
  svr.Post("/tokenize", [&m](const httplib::Request& req, httplib::Response& res) {
    try {
      json j = json::parse(req.body);
      if (!j.is_object()) throw bad("", "the body must be a JSON object");
      const char* k = j.contains("content") ? "content" : "prompt";
      if (!j.contains(k) || !j[k].is_string()) throw bad(k, "content must be a string");
      const auto ids = m.eng.tokenizer().encode(j[k].get<std::string>(), boolean(j, "add_special", false));
      res.set_content(dump({{"tokens", ids}, {"count", ids.size()}, {"max_model_len", m.eng.options().ctx}}),
                      "application/json");
    } catch (const ApiError& e) {
      Impl::send_error(res, e);
    } catch (const json::exception& e) {
      Impl::send_error(res, bad("", std::string("the body is not valid JSON: ") + e.what()));
    } catch (const std::exception& e) {
      Impl::send_error(res, bad("content", e.what()));
    }
  });
  svr.Post("/detokenize", [&m](const httplib::Request& req, httplib::Response& res) {
    try {
      json j = json::parse(req.body);
      if (!j.is_object() || !j.contains("tokens") || !j["tokens"].is_array())
        throw bad("tokens", "tokens must be an array of token ids");
      const int vocab = m.eng.tokenizer().vocab_size();
      std::vector<int32_t> ids;
      for (size_t i = 0; i < j["tokens"].size(); ++i) {
        const json& t = j["tokens"][i];
        if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= vocab)
          throw bad("tokens", detail::cat("tokens[", i, "] must be a token id in [0, ", vocab, "), got ", t.dump()));
        ids.push_back(int32_t(t.get<int64_t>()));
      }
      const std::string text = m.eng.tokenizer().decode(ids);
      res.set_content(dump({{"content", text}, {"prompt", text}}), "application/json");
    } catch (const ApiError& e) {
      Impl::send_error(res, e);
    } catch (const json::exception& e) {
      Impl::send_error(res, bad("", std::string("the body is not valid JSON: ") + e.what()));
    }
  });
}

HttpServer::~HttpServer() = default;

int HttpServer::bind(const std::string& host, int port) {
  int bound = port;
  if (port == 0) {
    bound = impl_->svr.bind_to_any_port(host);
    HM_CHECK(bound > 0, "serve: cannot bind ", host, " on any port");
  } else {
    HM_CHECK(impl_->svr.bind_to_port(host, port), "serve: cannot bind ", host, ":", port,
             " (in use, or not an address of this machine)");
  }
  // With a backlog of 5, many clients connecting at once found the queue full and some got
  // "connection reset" (64-client load test). listen() again only changes the backlog.
  if (impl_->listen_fd >= 0) ::listen(impl_->listen_fd, 1024);
  return bound;
}

void HttpServer::listen() { impl_->svr.listen_after_bind(); }
void HttpServer::stop(double wait_s) {
  // Let finished requests' responses (a stream's last chunks) go out before the sockets close.
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(int64_t(wait_s * 1000));
  while (impl_->inflight > 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  impl_->svr.stop();
}

}  // namespace hm::server
