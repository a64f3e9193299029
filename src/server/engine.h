// The serving engine: one thread owns the model and runs every active request in one ragged
// batch per step (continuous batching, docs/SERVER.md). HTTP handlers only submit requests and
// wait for their events; requests join and leave between steps.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "model/model.h"
#include "runtime/device_sampler.h"
#include "runtime/memory.h"
#include "runtime/sampling.h"
#include "runtime/tokenizer.h"
#include "server/prefix_cache.h"

namespace hm::server {

struct EngineOptions {
  int slots = 4;              // sequences decoded together
  int ctx = 2048;             // tokens per sequence (prompt + output)
  int block = 64;             // prefix-cache block (tokens)
  size_t cache_bytes = 256u << 20;  // 0 = no prefix cache
  int step_tokens = 512;      // prompt tokens computed per step, over all requests: bounds a
                              // step so decoding never stalls behind a long prompt
  int idle_step_tokens = 2048;  // the same while no request decodes (no one waits on the step);
                                // never below step_tokens
  int max_queue = 64;         // requests waiting for a slot before submit refuses (503)
  bool device_sampling = true;  // CUDA: sample on the device, only ids to the host (false: A/B, tests)
};

struct GenParams {
  std::vector<int32_t> prompt;
  int max_tokens = 16;
  SamplingParams sampling;      // repeat_penalty is the CTRL rule (OpenAI's repetition_penalty)
  float presence_penalty = 0, frequency_penalty = 0;  // OpenAI's, over the generated tokens
  std::vector<std::string> stop;
  int top_logprobs = -1;        // -1: no logprobs; else the chosen token's and this many best
  bool ignore_eos = false;
  double timeout_s = 0;         // 0 = none
};

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;
};

// What a request gets back, appended by the engine thread.
struct Event {
  std::string text;             // new text (never part of a stop string, never a split character)
  std::vector<TokenLogprob> logprobs;  // the tokens this text came from (when asked)
};

enum class Finish { None, Stop, Length, Cancelled, Timeout, Error };
const char* finish_name(Finish f);

class Request {
 public:
  explicit Request(GenParams p) : params(std::move(p)) {}
  const GenParams params;
  // Takes the events so far (waits up to `wait` for one or for the end). Returns false when
  // the request is finished and no events are left.
  bool next(std::vector<Event>& out, std::chrono::milliseconds wait);
  void cancel() { cancelled_ = true; }
  Finish finish() const;
  std::string error() const;
  int completion_tokens() const;
  int cached_tokens() const;    // prompt tokens the prefix cache supplied
  double ttft_s() const;        // submit to first token, seconds (-1 before it)

 private:
  friend class Engine;
  void push(Event e);
  void end(Finish f, std::string err = {});
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
  Finish finish_ = Finish::None;
  std::string error_;
  int completion_ = 0, cached_ = 0;
  double ttft_ = -1;
  std::atomic<bool> cancelled_{false};
  std::chrono::steady_clock::time_point submitted_;
};

// Counters for /metrics and the tests.
struct EngineStats {
  int64_t requests = 0, finished = 0, cancelled = 0, rejected = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;
  int64_t computed_tokens = 0;  // tokens the model ran forward (prompt chunks + decode steps)
  int64_t steps = 0;
  int64_t device_sampled = 0;   // tokens sampled on the device (CUDA; only their ids came back)
  // Seconds of the engine thread inside steps, and of them: the model's forward (logits on the
  // host), the prefix cache's records, sampling and emitting. What the load test reads to tell
  // a busy engine from a slow client.
  double step_s = 0, forward_s = 0, cache_s = 0, sample_s = 0;
  // Of step_s, admitting requests: the prefix cache's restore and the device sampler's setup.
  double admit_s = 0;
  int queue = 0, busy = 0, slots = 0;
  PrefixCacheStats cache;
  // Since the last take (for histograms): time to first token and to the end of finished
  // requests, and the time admitted requests waited for a slot.
  std::vector<double> ttft_s, latency_s, queue_s;
};

class QueueFull : public Error {
 public:
  using Error::Error;
};

class Engine {
 public:
  Engine(HybridModel& model, const Tokenizer& tok, const EngineOptions& o, KvType kv);
  ~Engine();
  const EngineOptions& options() const { return opt_; }
  const Tokenizer& tokenizer() const { return tok_; }
  int vocab() const { return model_.config().vocab_size; }

  // Queues a request (its prompt and max_tokens already checked against the context).
  // QueueFull when max_queue requests are waiting; hm::Error once draining.
  std::shared_ptr<Request> submit(GenParams p);
  // Stops taking requests; running and queued ones finish (cancelled after grace_s), then the
  // engine thread ends.
  void drain(double grace_s);
  bool draining() const { return draining_; }
  // A copy of the counters; take_latencies moves out the latency samples.
  EngineStats stats(bool take_latencies = false);

 private:
  struct Active;
  void loop();
  void admit();
  bool step();
  void emit(Active& a, int32_t token, const float* logits);
  void finish(Active& a, Finish f, const std::string& err = {});

  HybridModel& model_;
  const Tokenizer& tok_;
  EngineOptions opt_;
  HybridMemory mem_;
  PrefixCache cache_;
  std::unique_ptr<DeviceSampler> dev_;  // CUDA: one sampler slot per engine slot; null on the CPU
  std::vector<std::unique_ptr<Active>> active_;  // by slot (null: free)
  std::deque<std::shared_ptr<Request>> queue_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> draining_{false}, stop_{false};
  std::chrono::steady_clock::time_point drain_deadline_;
  EngineStats stats_;
  std::thread thread_;
};

}  // namespace hm::server
