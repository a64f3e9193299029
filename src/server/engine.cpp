#include "server/engine.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "core/error.h"

namespace hm::server {

using Clock = std::chrono::steady_clock;

static double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

const char* finish_name(Finish f) {
  switch (f) {
    case Finish::Stop: return "stop";
    case Finish::Length: return "length";
    case Finish::Cancelled: return "cancelled";
    case Finish::Timeout: return "timeout";
    case Finish::Error: return "error";
    case Finish::None: break;
  }
  return "none";
}

// ---- Request ---------------------------------------------------------------------------

bool Request::next(std::vector<Event>& out, std::chrono::milliseconds wait) {
  std::unique_lock<std::mutex> lk(mu_);
  if (events_.empty() && finish_ == Finish::None)
    cv_.wait_for(lk, wait, [&] { return !events_.empty() || finish_ != Finish::None; });
  const bool got = !events_.empty();
  while (!events_.empty()) {
    out.push_back(std::move(events_.front()));
    events_.pop_front();
  }
  return got || finish_ == Finish::None;
}

Finish Request::finish() const {
  std::lock_guard<std::mutex> lk(mu_);
  return finish_;
}
std::string Request::error() const {
  std::lock_guard<std::mutex> lk(mu_);
  return error_;
}
int Request::completion_tokens() const {
  std::lock_guard<std::mutex> lk(mu_);
  return completion_;
}
int Request::cached_tokens() const {
  std::lock_guard<std::mutex> lk(mu_);
  return cached_;
}
double Request::ttft_s() const {
  std::lock_guard<std::mutex> lk(mu_);
  return ttft_;
}
void Request::push(Event e) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    events_.push_back(std::move(e));
  }
  cv_.notify_all();
}
void Request::end(Finish f, std::string err) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    finish_ = f;
    error_ = std::move(err);
  }
  cv_.notify_all();
}

// ---- Engine ----------------------------------------------------------------------------

// A request holding a slot.
struct Engine::Active {
  std::shared_ptr<Request> req;
  int slot = 0;
  int prompt_len = 0;
  std::vector<int32_t> seq;  // prompt, then every sampled token; the last one is fed next step
  std::unique_ptr<SamplerChain> chain;
  std::unique_ptr<Utf8StreamDecoder> dec;
  std::string text;          // generated text so far
  size_t emitted = 0;        // bytes of text already sent
  std::vector<TokenLogprob> pending;  // logprobs of tokens whose text is not sent yet
  std::map<int32_t, int> counts;      // generated tokens, for presence/frequency penalties
  std::vector<float> row;             // penalised logits
  std::vector<float> back;            // CUDA, host-sampled requests: the row read back from the device
  bool on_device = false;             // sampled by the engine's DeviceSampler (no host chain)
  int generated = 0;
  int branch = 0;  // the prefix cache's branch point: a prompt chunk ends there (0: none)
  Clock::time_point deadline = Clock::time_point::max();
};

Engine::Engine(HybridModel& model, const Tokenizer& tok, const EngineOptions& o, KvType kv)
    : model_(model), tok_(tok), opt_(o), mem_(model.backend(), model.config(), o.slots, o.ctx, kv),
      cache_(mem_, model.config(), o.block, o.cache_bytes) {
  HM_CHECK(o.slots > 0, "--slots must be > 0, got ", o.slots);
  HM_CHECK(o.ctx > 1, "--ctx must be > 1, got ", o.ctx);
  HM_CHECK(o.max_queue >= 1, "--max-queue must be >= 1, got ", o.max_queue);
  // Prompt chunks end on block boundaries (where the cache keeps state): a step must hold one.
  HM_CHECK(o.step_tokens >= o.block, "--step-tokens (", o.step_tokens, ") must be at least the cache block (",
           o.block, ")");
  if (o.device_sampling) {
    const int V = model.config().vocab_size;
    dev_ = DeviceSampler::make(model.backend(), o.slots, V, std::min(tok.vocab_size(), V), DeviceSampler::kMaxWindow);
  }
  active_.resize(size_t(o.slots));
  stats_.slots = o.slots;
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() { drain(0); }

std::shared_ptr<Request> Engine::submit(GenParams p) {
  HM_ASSERT(!p.prompt.empty() && int(p.prompt.size()) + p.max_tokens <= opt_.ctx);
  auto r = std::make_shared<Request>(std::move(p));
  r->submitted_ = Clock::now();
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (draining_) throw Error("the server is shutting down");
    if (int(queue_.size()) >= opt_.max_queue) {
      ++stats_.rejected;
      throw QueueFull(detail::cat("the queue is full (", opt_.max_queue, " requests waiting)"));
    }
    queue_.push_back(r);
    ++stats_.requests;
  }
  cv_.notify_all();
  return r;
}

void Engine::drain(double grace_s) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!draining_) {
      draining_ = true;
      drain_deadline_ = Clock::now() + std::chrono::milliseconds(int64_t(grace_s * 1000));
    }
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

EngineStats Engine::stats(bool take_latencies) {
  std::lock_guard<std::mutex> lk(mu_);
  EngineStats s = stats_;
  if (take_latencies) {
    stats_.ttft_s.clear();
    stats_.latency_s.clear();
    stats_.queue_s.clear();
  } else {
    s.ttft_s.clear();
    s.latency_s.clear();
    s.queue_s.clear();
  }
  return s;
}

void Engine::admit() {
  const Clock::time_point t_admit = Clock::now();
  std::lock_guard<std::mutex> lk(mu_);
  for (int slot = 0; slot < opt_.slots && !queue_.empty(); ++slot) {
    if (active_[size_t(slot)]) continue;
    std::shared_ptr<Request> r = queue_.front();
    queue_.pop_front();
    const bool expired = r->params.timeout_s > 0 && seconds_since(r->submitted_) >= r->params.timeout_s;
    if (r->cancelled_ || expired) {  // gone or out of time while waiting: never takes the slot
      r->end(expired ? Finish::Timeout : Finish::Cancelled, expired ? "the request ran past its timeout" : "");
      ++stats_.cancelled;
      --slot;
      continue;
    }
    stats_.queue_s.push_back(seconds_since(r->submitted_));
    if (stats_.queue_s.size() > 100000) stats_.queue_s.clear();  // nobody scrapes /metrics
    auto a = std::make_unique<Active>();
    a->req = r;
    a->slot = slot;
    a->seq = r->params.prompt;
    a->prompt_len = int(a->seq.size());
    // On the device unless the request needs the logits on the host: the OpenAI penalties over
    // generated tokens and logprobs are host-side (the device sampler's penalties cover a window
    // of accepted tokens, prompt included: another rule).
    const GenParams& gp = r->params;
    a->on_device = dev_ && gp.presence_penalty == 0 && gp.frequency_penalty == 0 && gp.top_logprobs < 0 &&
                   gp.sampling.repeat_last_n <= dev_->max_last_n();
    if (a->on_device) {
      dev_->set({slot}, {gp.sampling}, {a->seq});
    } else {
      a->chain = make_sampler_chain(gp.sampling, tok_.vocab_size());
      for (int32_t t : a->seq) a->chain->accept(t);
    }
    a->dec = std::make_unique<Utf8StreamDecoder>(tok_);
    if (r->params.timeout_s > 0)
      a->deadline = r->submitted_ + std::chrono::milliseconds(int64_t(r->params.timeout_s * 1000));
    const int cached = cache_.restore(slot, a->seq, &a->branch);
    {
      std::lock_guard<std::mutex> rl(r->mu_);
      r->cached_ = cached;
    }
    stats_.prompt_tokens += a->prompt_len;
    active_[size_t(slot)] = std::move(a);
  }
  stats_.queue = int(queue_.size());
  stats_.admit_s += seconds_since(t_admit);
}

void Engine::loop() {
  for (;;) {
    const bool worked = step();
    std::unique_lock<std::mutex> lk(mu_);
    if (draining_) {
      const bool idle = queue_.empty() &&
                        std::none_of(active_.begin(), active_.end(), [](const auto& a) { return bool(a); });
      if (idle) break;
      if (Clock::now() >= drain_deadline_) {  // out of grace: cancel what is left
        for (auto& r : queue_) r->cancel();
        for (auto& a : active_)
          if (a) a->req->cancel();
      }
    }
    if (!worked) cv_.wait_for(lk, std::chrono::milliseconds(20));
  }
}

bool Engine::step() {
  const Clock::time_point t_step = Clock::now();
  admit();
  const auto now = Clock::now();
  for (auto& a : active_) {
    if (!a) continue;
    if (a->req->cancelled_) finish(*a, Finish::Cancelled);
    else if (now >= a->deadline) finish(*a, Finish::Timeout, "the request ran past its timeout");
  }
  Batch b;
  std::vector<Active*> in;
  // While no request decodes, the chunk bound protects no one: a lone 2,036-token miss ran 4-5
  // chunks of 512 (33 ms on an H100) where one forward to its checkpoint takes 19 ms.
  const bool decoding = std::any_of(active_.begin(), active_.end(),
                                    [&](const auto& a) { return a && mem_.pos(a->slot) >= a->prompt_len; });
  int budget = decoding ? opt_.step_tokens : std::max(opt_.step_tokens, opt_.idle_step_tokens);
  for (auto& ap : active_) {
    if (!ap) continue;
    Active& a = *ap;
    const int fed = mem_.pos(a.slot);
    if (fed < a.prompt_len) {
      // Chunks end on block boundaries. With the cache on, the model's state exists only where a
      // forward stops, so a chunk also stops where a checkpoint pays (prefix_cache.h): at the
      // branch point and at the last boundary before the prompt's last token.
      int end = std::min(a.prompt_len, fed + budget);
      if (cache_.enabled()) {
        // (prompt_len - 1) rounded down: the most the same prompt sent again may restore.
        for (int stop : {a.branch, (a.prompt_len - 1) / opt_.block * opt_.block})
          if (stop > fed && stop < end) end = stop;
      }
      if (end < a.prompt_len) end = end / opt_.block * opt_.block;
      if (end <= fed) continue;
      b.add(a.slot, std::vector<int32_t>(a.seq.begin() + fed, a.seq.begin() + end));
      budget -= end - fed;
    } else {
      b.add(a.slot, {a.seq.back()});
    }
    in.push_back(&a);
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    stats_.busy = int(std::count_if(active_.begin(), active_.end(), [](const auto& a) { return bool(a); }));
  }
  if (in.empty()) return false;
  std::vector<float> logits;  // host backends: every row; CUDA: the device's rows stay there
  Tensor dlogits;
  const Clock::time_point t_fwd = Clock::now();
  try {
    if (dev_) dlogits = model_.forward_device(b, mem_);
    else model_.forward(b, mem_, logits);
  } catch (const std::exception& e) {
    for (Active* a : in) finish(*a, Finish::Error, e.what());
    return true;
  }
  const double forward_s = seconds_since(t_fwd);
  {
    std::lock_guard<std::mutex> lk(mu_);
    stats_.computed_tokens += int64_t(b.tokens.size());
    ++stats_.steps;
  }
  const int V = model_.config().vocab_size;
  double cache_s = 0;
  const Clock::time_point t_after = Clock::now();
  std::vector<bool> due(in.size()), on_dev(in.size());  // samples now; and on the device
  for (size_t i = 0; i < in.size(); ++i) {
    Active& a = *in[i];
    const Clock::time_point t_rec = Clock::now();
    cache_.record(a.slot, a.seq);
    cache_s += seconds_since(t_rec);
    due[i] = mem_.pos(a.slot) >= a.prompt_len;  // else more prompt to go
    on_dev[i] = due[i] && a.on_device;
  }
  std::vector<int32_t> dev_ids;
  if (dev_ && std::find(on_dev.begin(), on_dev.end(), true) != on_dev.end()) {
    std::vector<int> slots;
    for (Active* a : in) slots.push_back(a->slot);
    try {
      dev_ids = dev_->sample(dlogits, slots, on_dev);
    } catch (const std::exception& e) {
      for (Active* a : in) finish(*a, Finish::Error, e.what());
      return true;
    }
  }
  for (size_t i = 0; i < in.size(); ++i) {
    if (!due[i]) continue;
    Active& a = *in[i];
    if (on_dev[i]) {
      emit(a, dev_ids[i], nullptr);
      continue;
    }
    if (dev_) {  // CUDA: this request samples on the host, so its row alone comes back
      a.back.resize(size_t(V));
      model_.backend().to_host(a.back.data(), dlogits.row(int(i)), sizeof(float) * size_t(V));
    }
    const float* raw = dev_ ? a.back.data() : logits.data() + i * size_t(V);
    const float* row = raw;
    const GenParams& p = a.req->params;
    if (p.presence_penalty != 0 || p.frequency_penalty != 0) {
      a.row.assign(raw, raw + V);
      for (const auto& [t, n] : a.counts)
        a.row[size_t(t)] -= p.presence_penalty + p.frequency_penalty * float(n);
      row = a.row.data();
    }
    const int32_t t = a.chain->sample(row, V);
    a.chain->accept(t);
    emit(a, t, raw);
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    stats_.cache = cache_.stats();
    stats_.device_sampled += std::count(on_dev.begin(), on_dev.end(), true);
    stats_.forward_s += forward_s;
    stats_.cache_s += cache_s;
    stats_.sample_s += seconds_since(t_after) - cache_s;
    stats_.step_s += seconds_since(t_step);
  }
  return true;
}

// The longest suffix of text that is a proper prefix of one of the stop strings: text that
// may still turn into a stop string, so it is held back.
static size_t stop_holdback(const std::string& text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const auto& s : stops)
    for (size_t n = std::min(s.size() - 1, text.size()); n > hold; --n)
      if (text.compare(text.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  return hold;
}

void Engine::emit(Active& a, int32_t token, const float* logits) {
  const GenParams& p = a.req->params;
  const int V = model_.config().vocab_size;
  if (p.top_logprobs >= 0) {  // log-softmax of the model's logits (before any sampler)
    double mx = -INFINITY, sum = 0;
    for (int v = 0; v < V; ++v) mx = std::max(mx, double(logits[v]));
    for (int v = 0; v < V; ++v) sum += std::exp(double(logits[v]) - mx);
    const double lse = mx + std::log(sum);
    TokenLogprob lp;
    lp.token = token;
    lp.logprob = float(double(logits[token]) - lse);
    const int n = std::min(V, tok_.vocab_size());  // ids the tokenizer can show
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (int v = 0; v < n; ++v) ids[size_t(v)] = v;
    const int k = std::min(p.top_logprobs, n);
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t x, int32_t y) {
      return logits[x] > logits[y] || (logits[x] == logits[y] && x < y);
    });
    for (int j = 0; j < k; ++j) lp.top.emplace_back(ids[size_t(j)], float(double(logits[ids[size_t(j)]]) - lse));
    a.pending.push_back(std::move(lp));
  }
  ++a.generated;
  ++a.counts[token];
  {
    std::lock_guard<std::mutex> lk(a.req->mu_);
    ++a.req->completion_;
    if (a.req->ttft_ < 0) a.req->ttft_ = seconds_since(a.req->submitted_);
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++stats_.generated_tokens;
  }
  if (tok_.is_eos(token) && !p.ignore_eos) {
    a.pending.clear();  // the end-of-sequence token has no text
    finish(a, Finish::Stop);
    return;
  }
  a.seq.push_back(token);
  a.text += a.dec->push(token);
  const bool last = a.generated >= p.max_tokens || int(a.seq.size()) >= opt_.ctx;
  if (last) a.text += a.dec->flush();
  // A stop string ends the text where it starts and is not sent.
  size_t cut = std::string::npos;
  for (const auto& s : p.stop) {
    const size_t from = a.emitted > s.size() ? a.emitted - s.size() : 0;
    const size_t at = a.text.find(s, from);
    if (at != std::string::npos) cut = std::min(cut, at);
  }
  if (cut != std::string::npos) {
    a.text.resize(std::max(cut, a.emitted));
    finish(a, Finish::Stop);
    return;
  }
  if (last) {
    finish(a, Finish::Length);
    return;
  }
  const size_t safe = a.text.size() - stop_holdback(a.text, p.stop);
  if (safe > a.emitted) {
    a.req->push({a.text.substr(a.emitted, safe - a.emitted), std::move(a.pending)});
    a.pending.clear();
    a.emitted = safe;
  }
}

void Engine::finish(Active& a, Finish f, const std::string& err) {
  std::shared_ptr<Request> r = a.req;
  if (f == Finish::Stop || f == Finish::Length) {
    if (a.emitted < a.text.size() || !a.pending.empty())
      r->push({a.text.substr(a.emitted), std::move(a.pending)});
  }
  const int slot = a.slot;
  cache_.release(slot);
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++stats_.finished;
    if (f == Finish::Cancelled || f == Finish::Timeout) ++stats_.cancelled;
    if (r->ttft_ >= 0) stats_.ttft_s.push_back(r->ttft_);
    stats_.latency_s.push_back(seconds_since(r->submitted_));
    if (stats_.latency_s.size() > 100000) stats_.latency_s.clear();  // nobody is reading them
    if (stats_.ttft_s.size() > 100000) stats_.ttft_s.clear();
  }
  r->end(f, err);
  active_[size_t(slot)].reset();  // a is gone from here on
}

}  // namespace hm::server
