// The OpenAI-compatible HTTP API over the engine (docs/SERVER.md): request parsing and
// checking, response and server-sent-event bodies, and the HTTP server (cpp-httplib).
// Handlers never throw: every bad request is a 4xx with an OpenAI-style error object.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/chat_template.h"
#include "server/engine.h"

namespace hm::server {

// A request the API refuses: HTTP status and an OpenAI error object.
struct ApiError {
  ApiError() = default;
  ApiError(int st, std::string msg, std::string prm = {}, std::string typ = "invalid_request_error",
           std::string cd = {})
      : status(st), message(std::move(msg)), param(std::move(prm)), type(std::move(typ)), code(std::move(cd)) {}
  int status = 400;
  std::string message;
  std::string param;                           // the offending field ("" when none)
  std::string type = "invalid_request_error";  // OpenAI's error types
  std::string code;                            // e.g. "model_not_found"
  nlohmann::json body() const;
};

enum class Endpoint { Completions, Chat };

// A parsed /v1/completions or /v1/chat/completions body.
struct ParsedRequest {
  GenParams gen;
  bool stream = false, include_usage = false;
  bool logprobs = false;  // completions: logprobs given; chat: logprobs true
};

// Our documented chat format for models without a template of their own (docs/SERVER.md):
// each message as "<|role|>\n" content "\n", then "<|assistant|>\n".
std::string apply_chat_template(const nlohmann::json& messages);

// The model's own chat template (runtime/chat_template.h) applied to the checked messages, each
// content given as its text: the prompt text, encoded without an added bos (the template writes
// its own). A message the template refuses (raise_exception) is an ApiError 400 naming it.
std::string apply_model_chat_template(const ChatFormat& chat, const nlohmann::json& messages);

// Checks every field (type and range) and the prompt against the context. Throws ApiError.
// chat: the model's template for chat requests (null: apply_chat_template above).
ParsedRequest parse_request(const std::string& body, Endpoint ep, const Tokenizer& tok,
                            const std::string& model_id, int ctx, const ChatFormat* chat = nullptr);

struct ServerOptions {
  std::string model_id = "model";
  std::string api_key;             // empty: no key needed
  size_t max_body = 1u << 20;      // bytes; larger bodies get 413
  double timeout_s = 600;          // per request; 0 = none
  int http_threads = 0;            // 0: slots + max_queue + 8
  std::shared_ptr<const ChatFormat> chat;  // the model's chat template; null: apply_chat_template
};

class HttpServer {
 public:
  HttpServer(Engine& engine, ServerOptions o);
  ~HttpServer();
  // Binds host:port (port 0: any free port) and returns the port; throws hm::Error on failure.
  int bind(const std::string& host, int port);
  // Serves until stop() (call from another thread).
  void listen();
  // Waits up to wait_s for responses under way to be sent, then stops listening.
  void stop(double wait_s = 0);
  // Refuses new generation requests with 503 (the engine is draining).
  void set_draining() { draining_ = true; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::atomic<bool> draining_{false};
};

}  // namespace hm::server
