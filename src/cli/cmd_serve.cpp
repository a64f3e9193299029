// hm serve: the OpenAI-compatible server (docs/SERVER.md).
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <thread>

#include "cli/commands.h"
#include "cli/device.h"
#include "cli/memory_guard.h"
#include "core/error.h"
#include "core/interrupt.h"
#include "core/threads.h"
#include "runtime/chat_template.h"
#include "runtime/tokenizer.h"
#include "server/api.h"
#include "server/engine.h"

namespace hm::cli {

Run add_serve(CLI::App& app) {
  struct Opts {
    std::string model, host = "127.0.0.1", api_key, model_name;
    int port = 8080, threads = 0, http_threads = 0;
    int64_t cache_mb = 256, max_body_kb = 1024;
    double timeout_s = 600, drain_s = 30;
    bool batch_invariant = false;
    DeviceOptions dev;
    server::EngineOptions eng;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model,-m", o->model, "Checkpoint directory, a training run's folder, or a Hugging Face folder")
      ->required();
  app.add_option("--host", o->host, "Address to listen on")->capture_default_str();
  app.add_option("--port", o->port, "Port (0 = any free port, printed at start)")->capture_default_str()
      ->check(CLI::Range(0, 65535));
  app.add_option("--slots", o->eng.slots, "Requests decoded together in one batch")->capture_default_str()
      ->check(CLI::Range(1, 1024));
  app.add_option("--ctx", o->eng.ctx, "Tokens per request (prompt + output)")->capture_default_str()
      ->check(CLI::Range(2, 1 << 20));
  app.add_option("--cache-mb", o->cache_mb, "Prefix cache size in MiB (0 = off)")->capture_default_str()
      ->check(non_negative());
  app.add_option("--cache-block", o->eng.block, "Prefix cache block in tokens: K/V kept per block, state checkpoints at block ends where a "
                 "forward stops (docs/SERVER.md)")
      ->capture_default_str()->check(CLI::Range(1, 1 << 16));
  app.add_option("--step-tokens", o->eng.step_tokens,
                 "Prompt tokens computed per batched step (bounds how long decoding waits for a prompt)")
      ->capture_default_str()->check(CLI::Range(1, 1 << 20));
  app.add_option("--idle-step-tokens", o->eng.idle_step_tokens,
                 "Prompt tokens per step while no request is decoding (at least --step-tokens is used)")
      ->capture_default_str()->check(CLI::Range(1, 1 << 20));
  app.add_option("--max-queue", o->eng.max_queue, "Requests waiting for a slot before 503")->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--api-key", o->api_key, "Require Authorization: Bearer KEY on every endpoint but /health");
  app.add_option("--model-name", o->model_name, "The model's id in the API (default: the folder's name)");
  app.add_option("--timeout", o->timeout_s, "Seconds a request may run (0 = no limit)")->capture_default_str()
      ->check(non_negative());
  app.add_option("--drain", o->drain_s, "On SIGTERM/SIGINT: seconds in-flight requests get to finish")
      ->capture_default_str()->check(non_negative());
  app.add_option("--max-body-kb", o->max_body_kb, "Largest request body (413 above)")->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--threads,-t", o->threads, "Compute threads (0 = all cores)")->capture_default_str()
      ->check(non_negative());
  app.add_option("--http-threads", o->http_threads, "HTTP worker threads (0 = slots + max-queue + 8)")
      ->capture_default_str()->check(non_negative());
  app.add_flag("--batch-invariant", o->batch_invariant,
               "A request's output does not depend on what runs beside it (greedy: the same tokens as alone). "
               "It costs speed (docs/SERVING.md)");
  add_device_options(app, o->dev, true);
  add_max_memory(app);
  return [o]() -> int {
    DeviceSetup dev = open_device(o->dev);
    if (o->threads > 0) set_num_threads(o->threads);
    o->eng.cache_bytes = size_t(o->cache_mb) << 20;
    check_model_memory(o->model, inference_shape(o->eng.slots, o->eng.ctx, dev.kv_name()), "hm serve");
    auto model = load_model_on(o->model, *dev.be, dev.dtype);
    if (o->batch_invariant) dev.be->set_batch_invariant(true);
    auto tok = load_tokenizer(o->model);
    server::ServerOptions so;
    so.model_id = !o->model_name.empty()
                      ? o->model_name
                      : std::filesystem::path(o->model).lexically_normal().filename().string();
    if (so.model_id.empty() || so.model_id == "checkpoint")
      so.model_id = std::filesystem::path(o->model).lexically_normal().parent_path().filename().string();
    if (so.model_id.empty()) so.model_id = "model";
    so.api_key = o->api_key;
    so.max_body = size_t(o->max_body_kb) * 1024;
    so.timeout_s = o->timeout_s;
    so.http_threads = o->http_threads;
    // The folder's own chat template when it has one (a Hugging Face folder), else our default.
    HfChatTemplate chat = read_chat_template(o->model);
    if (!chat.empty()) so.chat = std::make_shared<const ChatFormat>(chat);
    InterruptScope interrupts;
    server::Engine engine(*model, *tok, o->eng, dev.kv);
    server::HttpServer http(engine, so);
    const int port = http.bind(o->host, o->port);
    std::thread listener([&] { http.listen(); });
    std::fprintf(stderr,
                 "hm serve: model '%s' on %s, listening on http://%s:%d (slots %d, ctx %d, cache %lld MiB%s)\n",
                 so.model_id.c_str(), dev.be->name().c_str(), o->host.c_str(), port, o->eng.slots, o->eng.ctx,
                 static_cast<long long>(o->cache_mb), o->batch_invariant ? ", batch-invariant" : "");
    std::fprintf(stderr, "hm serve: chat template: %s\n",
                 so.chat ? so.chat->info().origin.c_str() : "none in the folder, the default <|role|> format");
    std::printf("listening on http://%s:%d\n", o->host.c_str(), port);
    std::fflush(stdout);
    while (interrupt_signal() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const int sig = interrupt_signal();
    std::fprintf(stderr, "hm serve: %s: finishing in-flight requests (at most %.0f s)\n", signal_name(sig).c_str(),
                 o->drain_s);
    http.set_draining();
    engine.drain(o->drain_s);  // returns when every request has ended
    http.stop(5);
    listener.join();
    throw Interrupted(sig, detail::cat("stopped by ", signal_name(sig), "; every request finished or was cancelled"));
  };
}

}  // namespace hm::cli
