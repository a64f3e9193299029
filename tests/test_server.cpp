// hm serve: the engine's continuous batching and prefix cache (greedy tokens equal to a lone
// run, with work really skipped), and the HTTP API as OpenAI clients see it (docs/SERVER.md).
#include <gtest/gtest.h>
#include <httplib.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "backend/backend.h"
#include "model/config.h"
#include "runtime/tokenizer.h"
#include "server/api.h"
#include "server/engine.h"
#include "test_util.h"

namespace hm::server {
namespace {

using nlohmann::json;

struct Fixture {
  std::unique_ptr<Backend> be = make_cpu_backend();
  std::unique_ptr<HybridModel> model;
  ByteTokenizer tok;
  // preset_name, or "true-tiny-hard": true-tiny with hard routes (K/V rows for some tokens only).
  explicit Fixture(const std::string& preset_name) {
    const bool hard = preset_name == "true-tiny-hard";
    ModelConfig c = preset(hard ? "true-tiny" : preset_name);
    if (hard) c.routing_mode = "hard";
    model = std::make_unique<HybridModel>(c, *be);
    test::randomize_params(*model, 11);
  }
};

GenParams greedy(std::vector<int32_t> prompt, int max_tokens) {
  GenParams g;
  g.prompt = std::move(prompt);
  g.max_tokens = max_tokens;
  g.sampling.temperature = 0;
  g.sampling.repeat_penalty = 1;
  g.ignore_eos = true;
  g.top_logprobs = 0;  // the token ids come back with the logprobs
  return g;
}

std::vector<int32_t> collect(Request& r) {
  std::vector<int32_t> ids;
  std::vector<Event> ev;
  while (r.next(ev, std::chrono::milliseconds(50))) {
    for (const auto& e : ev)
      for (const auto& lp : e.logprobs) ids.push_back(lp.token);
    ev.clear();
  }
  return ids;
}

std::vector<int32_t> prompt_of(Rng& rng, int n, int vocab) { return test::tokens(rng, n, vocab); }

std::vector<int32_t> run_alone(Fixture& f, const GenParams& g, size_t cache_bytes = 0, int block = 8) {
  EngineOptions o;
  o.slots = 1;
  o.ctx = 256;
  o.block = block;
  o.cache_bytes = cache_bytes;
  Engine e(*f.model, f.tok, o, KvType::F32);
  auto r = e.submit(g);
  auto ids = collect(*r);
  EXPECT_EQ(r->finish(), Finish::Length);
  return ids;
}

// Requests decoded beside others (more requests than slots: some wait, join between steps)
// give the tokens each gives alone.
TEST(Server, BatchedGreedyEqualsAlone) {
  for (const char* p : {"tiny", "true-tiny", "true-tiny-hard"}) {
    SCOPED_TRACE(p);
    Fixture f(p);
    Rng rng(3);
    std::vector<GenParams> reqs;
    for (int i = 0; i < 7; ++i) reqs.push_back(greedy(prompt_of(rng, 5 + 9 * i, 256), 6 + 2 * i));
    std::vector<std::vector<int32_t>> alone;
    for (const auto& g : reqs) alone.push_back(run_alone(f, g));
    EngineOptions o;
    o.slots = 3;
    o.ctx = 256;
    o.block = 8;
    o.step_tokens = 16;  // long prompts take several steps beside others' decoding
    Engine e(*f.model, f.tok, o, KvType::F32);
    std::vector<std::shared_ptr<Request>> rs;
    for (const auto& g : reqs) rs.push_back(e.submit(g));
    for (size_t i = 0; i < rs.size(); ++i) {
      EXPECT_EQ(collect(*rs[i]), alone[i]) << "request " << i;
      EXPECT_EQ(int(alone[i].size()), reqs[i].max_tokens);
    }
    const EngineStats s = e.stats();
    // Fewer forward steps than requests run one by one would take: they really shared steps.
    int64_t lone_steps = 0;
    for (const auto& g : reqs) lone_steps += (int64_t(g.prompt.size()) + 15) / 16 + g.max_tokens - 1;
    EXPECT_LT(s.steps, lone_steps);
  }
}

// A prefix-cache hit gives the tokens of a run without the cache, across block sizes and
// prompts that end mid-block, and computes only the uncached part.
TEST(Server, PrefixCacheHitEqualsMissAndSkipsWork) {
  for (const char* p : {"tiny", "true-tiny", "true-tiny-hard"}) {
    Fixture f(p);
    if (std::string(p) == "true-tiny-hard") {  // what this case is for: K/V rows for some tokens only
      HybridMemory mem(*f.be, f.model->config(), 1, 256, KvType::F32);
      Rng rng(5);
      Batch b;
      b.add(0, prompt_of(rng, 48, 256));
      std::vector<float> logits;
      f.model->forward(b, mem, logits);
      for (int layer : f.model->config().true_layers) {
        EXPECT_GT(mem.kv().len(layer, 0), 4) << "layer " << layer;
        EXPECT_LT(mem.kv().len(layer, 0), 44) << "layer " << layer;
      }
    }
    for (int block : {1, 4, 7, 16}) {
      SCOPED_TRACE(std::string(p) + " block " + std::to_string(block));
      Rng rng{uint64_t(block)};
      const std::vector<int32_t> shared = prompt_of(rng, 45, 256);
      EngineOptions o;
      o.slots = 2;
      o.ctx = 256;
      o.block = block;
      o.step_tokens = 32;
      o.idle_step_tokens = 32;  // the chunks below are the bounded ones, requests or not decoding
      o.cache_bytes = 64u << 20;
      Engine e(*f.model, f.tok, o, KvType::F32);
      // A prompt runs in multi-block chunks, checkpointed at chunk ends, at its last boundary and
      // at the branch point (prefix_cache.h).
      int64_t saved = 0;
      // The first request fills the cache; each later one shares 45 tokens, then differs.
      for (int k = 0; k < 4; ++k) {
        std::vector<int32_t> prompt = shared;
        const std::vector<int32_t> tail = prompt_of(rng, 3 + 5 * k, 256);
        prompt.insert(prompt.end(), tail.begin(), tail.end());
        const GenParams g = greedy(prompt, 5);
        const std::vector<int32_t> want = run_alone(f, g);  // no cache
        const int64_t before = e.stats().computed_tokens, steps_before = e.stats().steps;
        auto r = e.submit(g);
        EXPECT_EQ(collect(*r), want) << "request " << k;
        const int cached = r->cached_tokens();
        saved += cached;
        if (k == 0) {
          EXPECT_EQ(cached, 0);
          // 48 prompt tokens in chunks of up to 32 (block 7: 28, 42, 48), not one forward a block.
          EXPECT_LE(e.stats().steps - steps_before, 3 + g.max_tokens - 1);
        } else if (k == 1) {
          // Request 0 left checkpoints at its chunk ends only: the deepest within the shared 45.
          EXPECT_GT(cached, 0);
          EXPECT_LE(cached, 45 / block * block);
          EXPECT_EQ(cached % block, 0);
        } else {  // request 1 stopped at the branch point (45 rounded down) and left one there
          EXPECT_EQ(cached, 45 / block * block) << "request " << k;
        }
        // Computed: the uncached prompt tokens, then one per decoded token but the last.
        EXPECT_EQ(e.stats().computed_tokens - before, int64_t(prompt.size()) - cached + g.max_tokens - 1);
      }
      // The same prompt again: everything but its last token (to the last block boundary) is cached.
      std::vector<int32_t> again = shared;
      const GenParams g = greedy(again, 4);
      const std::vector<int32_t> want = run_alone(f, g);  // before submit: one model, one engine at a time
      auto r = e.submit(g);
      EXPECT_EQ(collect(*r), want);
      // Block 1 (multi-block chunks): the branch checkpoint is at 45, past the 44 this prompt may
      // restore; it resumes from request 0's chunk end.
      if (block == 1) {
        EXPECT_EQ(r->cached_tokens(), 32);
      } else {
        EXPECT_EQ(r->cached_tokens(), 44 / block * block);
      }
      const EngineStats s = e.stats();
      EXPECT_EQ(s.cache.hits, 4);
      EXPECT_EQ(s.cache.tokens_saved, saved + r->cached_tokens());
    }
  }
}

// While no request decodes, a prompt takes up to idle_step_tokens a step (still stopping at
// its checkpoints); the tokens are the same as in bounded chunks.
TEST(Server, IdleStepTakesMoreOfAPrompt) {
  Fixture f("tiny");
  Rng rng(11);
  const GenParams g = greedy(prompt_of(rng, 100, 256), 4);
  const std::vector<int32_t> want = run_alone(f, g);
  for (int idle : {16, 128}) {
    SCOPED_TRACE(idle);
    EngineOptions o;
    o.slots = 2;
    o.ctx = 256;
    o.block = 8;
    o.step_tokens = 16;
    o.idle_step_tokens = idle;
    Engine e(*f.model, f.tok, o, KvType::F32);
    auto r = e.submit(g);
    EXPECT_EQ(collect(*r), want);
    // 100 prompt tokens: chunks of 16 to the last boundary (96), then 4; or, idle, one chunk to
    // that checkpoint and the last 4. Then a step per decoded token but the first.
    EXPECT_EQ(e.stats().steps, (idle == 16 ? 7 : 2) + g.max_tokens - 1);
  }
}

// A budget of a few blocks evicts (LRU) and still gives the uncached tokens.
TEST(Server, PrefixCacheEvictsWithinBudget) {
  Fixture f("tiny");
  Rng rng(9);
  EngineOptions o;
  o.slots = 2;
  o.ctx = 256;
  o.block = 4;
  o.step_tokens = 16;
  o.cache_bytes = 6 * 1400;  // about five blocks of the tiny model
  Engine e(*f.model, f.tok, o, KvType::F32);
  for (int k = 0; k < 6; ++k) {
    const GenParams g = greedy(prompt_of(rng, 30, 256), 6);
    const std::vector<int32_t> want = run_alone(f, g);
    auto r = e.submit(g);
    EXPECT_EQ(collect(*r), want);
    EXPECT_LE(size_t(e.stats().cache.bytes), o.cache_bytes);
  }
  EXPECT_GT(e.stats().cache.evicted, 0);
  EXPECT_GT(e.stats().cache.blocks, 0);
}

// Stop strings end the text before them, never sending part of one.
TEST(Server, StopStringsCutTheText) {
  Fixture f("tiny");
  Rng rng(5);
  GenParams g = greedy(prompt_of(rng, 10, 256), 12);
  const std::vector<int32_t> ids = run_alone(f, g);
  const std::string full = f.tok.decode(ids);
  ASSERT_GE(full.size(), 6u);
  g.stop = {full.substr(3, 2)};
  EngineOptions o;
  o.slots = 1;
  o.ctx = 256;
  o.block = 8;
  o.cache_bytes = 0;
  Engine e(*f.model, f.tok, o, KvType::F32);
  auto r = e.submit(g);
  std::string text;
  std::vector<Event> ev;
  while (r->next(ev, std::chrono::milliseconds(50))) {
    for (const auto& x : ev) text += x.text;
    ev.clear();
  }
  EXPECT_EQ(r->finish(), Finish::Stop);
  EXPECT_EQ(text, full.substr(0, full.find(g.stop[0])));
}

// Logprobs are the model's log-softmax: for a greedy token, the best of its top list, which is
// sorted, and probabilities that sum to at most 1.
TEST(Server, LogprobsOfGreedyTokens) {
  Fixture f("tiny");
  Rng rng(2);
  GenParams g = greedy(prompt_of(rng, 9, 256), 8);
  g.top_logprobs = 5;
  EngineOptions o;
  o.slots = 1;
  o.ctx = 64;
  o.block = 8;
  Engine e(*f.model, f.tok, o, KvType::F32);
  auto r = e.submit(g);
  std::vector<Event> ev;
  std::vector<TokenLogprob> lps;
  while (r->next(ev, std::chrono::milliseconds(50))) {
    for (const auto& x : ev) lps.insert(lps.end(), x.logprobs.begin(), x.logprobs.end());
    ev.clear();
  }
  ASSERT_EQ(lps.size(), 8u);
  for (const auto& lp : lps) {
    ASSERT_EQ(lp.top.size(), 5u);
    EXPECT_EQ(lp.top[0].first, lp.token);
    EXPECT_FLOAT_EQ(lp.top[0].second, lp.logprob);
    double mass = 0;
    for (size_t j = 0; j < lp.top.size(); ++j) {
      EXPECT_LE(lp.top[j].second, 0.0f);
      if (j > 0) {
        EXPECT_LE(lp.top[j].second, lp.top[j - 1].second);
      }
      mass += std::exp(double(lp.top[j].second));
    }
    EXPECT_LE(mass, 1.0 + 1e-6);
    EXPECT_GT(mass, 0.0);
  }
}

// A request past its timeout ends (Timeout), whether it waits for a slot or runs.
TEST(Server, TimeoutEndsRequests) {
  Fixture f("demo");  // 400 decode steps would need 0.125 ms each to fit in 0.05 s
  EngineOptions o;
  o.slots = 1;
  o.ctx = 512;
  o.block = 16;
  o.cache_bytes = 0;
  Engine e(*f.model, f.tok, o, KvType::F32);
  GenParams run = greedy({1, 2, 3}, 400);
  run.timeout_s = 0.05;
  GenParams wait = greedy({4, 5}, 4);
  wait.timeout_s = 1e-6;  // expires in the queue
  auto a = e.submit(run);
  auto b = e.submit(wait);
  const auto t0 = std::chrono::steady_clock::now();
  collect(*a);
  collect(*b);
  EXPECT_EQ(a->finish(), Finish::Timeout);
  EXPECT_LT(a->completion_tokens(), 400);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
  EXPECT_EQ(b->finish(), Finish::Timeout);
  EXPECT_EQ(b->completion_tokens(), 0);
  EXPECT_EQ(e.stats().cancelled, 2);
}

// ---- the HTTP API ----------------------------------------------------------------------

struct Served {
  Fixture f;
  std::unique_ptr<Engine> eng;
  std::unique_ptr<HttpServer> http;
  std::thread th;
  int port = 0;
  explicit Served(const std::string& key = {}, int slots = 4, int max_queue = 64, const char* model = "tiny",
                  std::shared_ptr<const ChatFormat> chat = nullptr)
      : f(model) {
    EngineOptions o;
    o.slots = slots;
    o.max_queue = max_queue;
    o.ctx = 128;
    o.block = 8;
    o.step_tokens = 32;
    eng = std::make_unique<Engine>(*f.model, f.tok, o, KvType::F32);
    ServerOptions so;
    so.model_id = "tiny";
    so.api_key = key;
    so.max_body = 4096;
    so.chat = std::move(chat);
    http = std::make_unique<HttpServer>(*eng, so);
    port = http->bind("127.0.0.1", 0);
    th = std::thread([this] { http->listen(); });
  }
  ~Served() {
    eng->drain(0);
    http->stop();
    th.join();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30, 0);
    return c;
  }
};

json post(const Served& s, const char* path, const json& body, int* status = nullptr) {
  auto c = s.client();
  auto res = c.Post(path, body.dump(), "application/json");
  EXPECT_TRUE(res);
  if (!res) return {};
  if (status) *status = res->status;
  return json::parse(res->body);
}

// A template in the style of the chat-tuned families: bos text, role tags, raise_exception.
std::shared_ptr<const ChatFormat> test_chat_format() {
  HfChatTemplate t;
  t.source =
      "{{ bos_token }}{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
      "{{ raise_exception('role ' + m.role + ' is not supported') }}{% endif %}<{{ m.role }}>{{ m.content }}"
      "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
  t.special_tokens["bos_token"] = "B";
  return std::make_shared<const ChatFormat>(t);
}

// A message's keys reach the template in the client's order (transformers' tojson keeps it): the
// tool call's arguments {"b", "a"} print as written, not sorted.
TEST(ServerApi, ChatTemplateSeesKeysInTheClientsOrder) {
  ByteTokenizer tok;
  HfChatTemplate t;
  t.source = "{% for m in messages %}{{ m | tojson }};{% endfor %}";
  const ChatFormat chat(t);
  const std::string body =
      R"({"messages": [{"role": "assistant", "content": "c", "tool_calls": [{"function": {"name": "f", )"
      R"("arguments": {"b": 1, "a": 2}}}]}]})";
  const std::string want =
      R"({"role": "assistant", "content": "c", "tool_calls": [{"function": {"name": "f", "arguments": {"b": 1, "a": 2}}}]};)";
  EXPECT_EQ(parse_request(body, Endpoint::Chat, tok, "m", 512, &chat).gen.prompt, tok.encode(want, false));
}

TEST(ServerApi, ChatUsesTheModelsTemplateElseTheDefault) {
  ByteTokenizer tok;
  const auto chat = test_chat_format();
  json body = {{"messages",
                {{{"role", "system"}, {"content", "s"}},
                 {{"role", "user"},
                  {"content", json::array({{{"type", "text"}, {"text", "hi"}}, {{"type", "text"}, {"text", " there"}}})}}}}};
  // The template writes its own bos: the prompt is its text, encoded without another.
  EXPECT_EQ(parse_request(body.dump(), Endpoint::Chat, tok, "m", 256, chat.get()).gen.prompt,
            tok.encode("B<system>s<user>hi there<assistant>", false));
  EXPECT_EQ(parse_request(body.dump(), Endpoint::Chat, tok, "m", 256).gen.prompt,
            tok.encode("<|system|>\ns\n<|user|>\nhi there\n<|assistant|>\n", true));
  body["messages"].push_back({{"role", "tool"}, {"content", "x"}});
  try {
    parse_request(body.dump(), Endpoint::Chat, tok, "m", 256, chat.get());
    ADD_FAILURE() << "no error";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status, 400);
    EXPECT_EQ(e.param, "messages");
    EXPECT_NE(e.message.find("role tool is not supported"), std::string::npos) << e.message;
  }
}

TEST(ServerHttp, ChatUsesTheModelsTemplate) {
  Served s({}, 4, 64, "tiny", test_chat_format());
  int st = 0;
  json r = post(s, "/v1/chat/completions",
                {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 2}, {"temperature", 0}}, &st);
  EXPECT_EQ(st, 200) << r.dump();
  EXPECT_EQ(r["usage"]["prompt_tokens"], std::string("B<user>hi<assistant>").size()) << r.dump();
  r = post(s, "/v1/chat/completions", {{"messages", {{{"role", "tool"}, {"content", "x"}}}}, {"max_tokens", 2}}, &st);
  EXPECT_EQ(st, 400) << r.dump();
  EXPECT_NE(r["error"]["message"].get<std::string>().find("role tool is not supported"), std::string::npos) << r.dump();
}

TEST(ServerHttp, CompletionsChatModelsAndErrors) {
  Served s;
  int st = 0;
  json r = post(s, "/v1/completions", {{"model", "tiny"}, {"prompt", "Hello"}, {"max_tokens", 5}, {"temperature", 0}}, &st);
  EXPECT_EQ(st, 200);
  EXPECT_EQ(r["object"], "text_completion");
  EXPECT_EQ(r["choices"][0]["finish_reason"].is_string(), true);
  EXPECT_EQ(r["usage"]["prompt_tokens"], 6);  // BOS + 5 bytes
  EXPECT_EQ(r["usage"]["total_tokens"].get<int>(), 6 + r["usage"]["completion_tokens"].get<int>());
  r = post(s, "/v1/chat/completions", {{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "hi"}}}},
                                       {"max_tokens", 3}, {"temperature", 0}, {"logprobs", true}, {"top_logprobs", 2}},
           &st);
  EXPECT_EQ(st, 200);
  EXPECT_EQ(r["object"], "chat.completion") << r.dump();
  EXPECT_EQ(r["choices"][0]["message"]["role"], "assistant");
  EXPECT_LE(r["choices"][0]["logprobs"]["content"].size(), 3u);
  auto c = s.client();
  auto m = c.Get("/v1/models");
  ASSERT_TRUE(m);
  EXPECT_EQ(json::parse(m->body)["data"][0]["id"], "tiny");
  // Bad requests: a 4xx with an OpenAI error object naming the field.
  struct Bad {
    json body;
    int status;
    const char* param;
  };
  for (const Bad& b : std::vector<Bad>{
           {{{"prompt", "x"}, {"n", 2}}, 400, "n"},
           {{{"model", "gpt-4"}, {"prompt", "x"}}, 404, "model"},
           {{{"prompt", "x"}, {"max_tokens", 1000}}, 400, "max_tokens"},
           {{{"prompt", "x"}, {"max_tokens", 0}}, 400, "max_tokens"},  // fuzzer: an unsigned 0 passed the lower bound
           {{{"prompt", std::string(200, 'a')}}, 400, "prompt"},
           {{{"prompt", "x"}, {"temperature", "hot"}}, 400, "temperature"},
           {{{"prompt", "x"}, {"top_p", 0}}, 400, "top_p"},
           {{{"prompt", "x"}, {"top_p", 1e-300}}, 400, "top_p"},  // above 0, but 0 as a float
           {{{"prompt", "x"}, {"repetition_penalty", 1.11e-300}}, 400, "repetition_penalty"},
           {{{"prompt", {1, 2, 999}}}, 400, "prompt"},
           {{{"prompt", {"a", "b"}}}, 400, "prompt"},
           {{{"prompt", "x"}, {"stop", {1}}}, 400, "stop"},
           {{{"max_tokens", 3}}, 400, "prompt"},
       }) {
    SCOPED_TRACE(b.body.dump());
    r = post(s, "/v1/completions", b.body, &st);
    EXPECT_EQ(st, b.status);
    EXPECT_EQ(r["error"]["param"], b.param);
    EXPECT_FALSE(r["error"]["message"].get<std::string>().empty());
  }
  auto res = c.Post("/v1/completions", "{\"prompt\": ", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_NE(json::parse(res->body)["error"]["message"].get<std::string>().find("not valid JSON"), std::string::npos);
  res = c.Post("/v1/completions", std::string(5000, ' '), "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 413);
  EXPECT_TRUE(json::parse(res->body).contains("error"));
  res = c.Post("/tokenize", R"({"content": "ab"})", "application/json");
  ASSERT_TRUE(res);
  const json toks = json::parse(res->body)["tokens"];
  res = c.Post("/detokenize", json({{"tokens", toks}}).dump(), "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(json::parse(res->body)["content"], "ab");
  res = c.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_NE(res->body.find("hm_requests_total 2"), std::string::npos) << res->body;
  EXPECT_NE(res->body.find("hm_prefix_cache_hits_total"), std::string::npos);
  EXPECT_NE(res->body.find("hm_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"), std::string::npos);
  EXPECT_NE(res->body.find("hm_request_queue_seconds_bucket{le=\"+Inf\"} 2"), std::string::npos) << res->body;
  EXPECT_NE(res->body.find("hm_step_admit_seconds_total"), std::string::npos);
}

// The SSE stream as OpenAI sends it: "data: {json}\n\n" lines, role first, content deltas, a
// finish_reason chunk, a usage chunk with empty choices, then "data: [DONE]\n\n".
TEST(ServerHttp, ChatStreamIsServerSentEventsAsOpenAI) {
  Served s;
  auto c = s.client();
  const json body = {{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "hello"}}}}, {"max_tokens", 6},
                     {"temperature", 0}, {"stream", true}, {"stream_options", {{"include_usage", true}}}};
  auto res = c.Post("/v1/chat/completions", body.dump(), "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/event-stream");
  const std::string& t = res->body;
  ASSERT_GE(t.size(), 16u);
  EXPECT_EQ(t.substr(t.size() - 14), "data: [DONE]\n\n");
  std::vector<json> chunks;
  size_t at = 0;
  while (at < t.size()) {
    ASSERT_EQ(t.compare(at, 6, "data: "), 0) << t.substr(at);
    const size_t end = t.find("\n\n", at);
    ASSERT_NE(end, std::string::npos);
    const std::string payload = t.substr(at + 6, end - at - 6);
    ASSERT_EQ(payload.find('\n'), std::string::npos);
    at = end + 2;
    if (payload == "[DONE]") {
      EXPECT_EQ(at, t.size());
      break;
    }
    chunks.push_back(json::parse(payload));
  }
  ASSERT_GE(chunks.size(), 3u);
  std::string text;
  for (size_t i = 0; i < chunks.size(); ++i) {
    EXPECT_EQ(chunks[i]["object"], "chat.completion.chunk");
    EXPECT_EQ(chunks[i]["id"], chunks[0]["id"]);
    if (i + 1 < chunks.size()) {
      EXPECT_TRUE(chunks[i]["usage"].is_null());
      ASSERT_EQ(chunks[i]["choices"].size(), 1u);
      if (chunks[i]["choices"][0]["delta"].contains("content"))
        text += chunks[i]["choices"][0]["delta"]["content"].get<std::string>();
    }
  }
  EXPECT_EQ(chunks[0]["choices"][0]["delta"]["role"], "assistant");
  const json& fin = chunks[chunks.size() - 2]["choices"][0];
  EXPECT_EQ(fin["finish_reason"], "length");
  EXPECT_EQ(fin["delta"], json::object());
  const json& last = chunks.back();
  EXPECT_TRUE(last["choices"].empty());
  EXPECT_EQ(last["usage"]["completion_tokens"], 6);
  // The same request without streaming gives the same text.
  json plain = body;
  plain["stream"] = false;
  plain.erase("stream_options");
  EXPECT_EQ(post(s, "/v1/chat/completions", plain)["choices"][0]["message"]["content"], text);
}

// Concurrent clients get the greedy text each gets alone.
TEST(ServerHttp, ConcurrentRequestsEqualSequential) {
  Served s({}, 3);
  std::vector<json> bodies;
  for (int i = 0; i < 8; ++i)
    bodies.push_back({{"prompt", std::string(size_t(3 + 7 * i), char('a' + i))}, {"max_tokens", 8 + i},
                      {"temperature", 0}, {"ignore_eos", true}});
  std::vector<std::string> alone;
  for (const auto& b : bodies) alone.push_back(post(s, "/v1/completions", b)["choices"][0]["text"]);
  std::vector<std::string> together(bodies.size());
  std::vector<std::thread> ts;
  for (size_t i = 0; i < bodies.size(); ++i)
    ts.emplace_back([&, i] { together[i] = post(s, "/v1/completions", bodies[i])["choices"][0]["text"]; });
  for (auto& t : ts) t.join();
  for (size_t i = 0; i < bodies.size(); ++i) EXPECT_EQ(together[i], alone[i]) << "request " << i;
}

TEST(ServerHttp, ApiKeyRequired) {
  Served s("sekret");
  auto c = s.client();
  auto res = c.Get("/v1/models");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);
  EXPECT_EQ(json::parse(res->body)["error"]["code"], "invalid_api_key");
  EXPECT_EQ(c.Get("/health")->status, 200);
  auto page = c.Get("/");  // the chat page loads without the key; its API calls send it
  ASSERT_TRUE(page);
  EXPECT_EQ(page->status, 200);
  EXPECT_NE(page->body.find("/v1/chat/completions"), std::string::npos);
  httplib::Headers h = {{"Authorization", "Bearer sekret"}};
  res = c.Get("/v1/models", h);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
}

// A client that drops a stream frees its slot: with one slot, the next request still runs.
TEST(ServerHttp, DroppedStreamFreesItsSlot) {
  Served s({}, 1, 64, "demo");  // slow enough that 100 tokens outlast the hang-up (tiny was not)
  {
    auto c = s.client();
    const json body = {{"prompt", "abc"}, {"max_tokens", 100}, {"stream", true}, {"ignore_eos", true}};
    int seen = 0;
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = body.dump();
    req.set_header("Content-Type", "application/json");
    req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++seen < 2; };  // reads a little, then hangs up
    c.send(req);
  }
  int st = 0;
  json r = post(s, "/v1/completions", {{"prompt", "x"}, {"max_tokens", 2}}, &st);
  EXPECT_EQ(st, 200);
  const EngineStats es = s.eng->stats();
  EXPECT_EQ(es.cancelled, 1);
  EXPECT_LT(es.generated_tokens, 100);
}

// A full queue answers 503 with Retry-After, and the requests already in take their turn.
TEST(ServerHttp, FullQueueIs503) {
  Served s({}, 1, 1);
  auto wait_for = [&](auto pred) {
    for (int i = 0; i < 500 && !pred(s.eng->stats()); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return pred(s.eng->stats());
  };
  int st_a = 0, st_b = 0;
  // Waits for arrival (requests counts them), not for a state that a fast request may pass
  // through between two polls on a loaded machine; whether b really waited is checked below.
  std::thread a([&] { post(s, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 120}, {"ignore_eos", true}}, &st_a); });
  const bool a_arrived = wait_for([](const EngineStats& e) { return e.requests >= 1; });
  std::thread b([&] { post(s, "/v1/completions", {{"prompt", "b"}, {"max_tokens", 2}}, &st_b); });
  const bool b_arrived = wait_for([](const EngineStats& e) { return e.requests >= 2; });
  auto c = s.client();
  auto res = c.Post("/v1/completions", R"({"prompt": "c", "max_tokens": 2})", "application/json");
  const bool b_waiting = s.eng->stats().busy == 1 && s.eng->stats().finished == 0;
  a.join();  // joined before any ASSERT can return from the test
  b.join();
  EXPECT_TRUE(a_arrived);
  EXPECT_TRUE(b_arrived);
  ASSERT_TRUE(res);
  EXPECT_EQ(st_a, 200);
  EXPECT_EQ(st_b, 200);
  if (b_waiting) {  // a was still running, so b sat in the one queue place
    EXPECT_EQ(res->status, 503);
    EXPECT_EQ(res->get_header_value("Retry-After"), "1");
    EXPECT_EQ(json::parse(res->body)["error"]["code"], "queue_full");
  }
}

}  // namespace
}  // namespace hm::server
