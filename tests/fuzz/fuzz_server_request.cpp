// Fuzz target: an HTTP body through hm serve's parse_request. The first byte picks the endpoint
// ('c' completions, else chat); the rest is the body. Bad bodies must end in ApiError (a 4xx);
// an accepted one must fit the context and carry sampling settings the sampler chain accepts.
#include <cstdint>
#include <string>

#include "core/error.h"
#include "fuzz_util.h"
#include "runtime/sampling.h"
#include "runtime/tokenizer.h"
#include "server/api.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static const hm::ByteTokenizer tok;
  constexpr int kCtx = 64;
  const auto ep = data[0] == 'c' ? hm::server::Endpoint::Completions : hm::server::Endpoint::Chat;
  const std::string body(reinterpret_cast<const char*>(data) + 1, size - 1);
  hm::server::ParsedRequest r;
  try {
    r = hm::server::parse_request(body, ep, tok, "m", kCtx);
  } catch (const hm::server::ApiError& e) {
    HM_FUZZ_REQUIRE(e.status >= 400 && e.status < 500 && !e.message.empty());
    (void)e.body().dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    return 0;
  }
  HM_FUZZ_REQUIRE(!r.gen.prompt.empty() && r.gen.max_tokens >= 1);
  HM_FUZZ_REQUIRE(int(r.gen.prompt.size()) + r.gen.max_tokens <= kCtx);
  for (int32_t t : r.gen.prompt) HM_FUZZ_REQUIRE(t >= 0 && t < tok.vocab_size());
  for (const auto& s : r.gen.stop) HM_FUZZ_REQUIRE(!s.empty());
  HM_FUZZ_REQUIRE(r.gen.top_logprobs <= 20);
  hm::validate(r.gen.sampling);  // throws (and the fuzzer reports it) if a range check was missed
  (void)hm::make_sampler_chain(r.gen.sampling, tok.vocab_size());
  return 0;
}
