// Generation: prefill a batch of prompts of different lengths in one ragged forward (chunked to
// bound activation memory), then decode all live sequences one token per step with the KV cache
// and recurrent state in HybridMemory.
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <utility>
#include <functional>
#include <vector>

#include "model/model.h"
#include "runtime/device_sampler.h"
#include "runtime/memory.h"
#include "runtime/sampling.h"

namespace hm {

struct GenerateOptions {
  int max_new_tokens = 64;
  SamplingParams sampling;
  int n_decodable = 0;        // tokens the tokenizer can decode (0 = the model's vocabulary)
  int eos = -1;               // stop a sequence when it samples this token (-1 = never)
  std::vector<int32_t> more_eos;  // or one of these (Tokenizer::more_eos)
  int prefill_chunk = 512;    // tokens per sequence per prefill forward
};

struct GenerateStats {
  double prefill_ms = 0, decode_ms = 0;
  int64_t prompt_tokens = 0, decoded_tokens = 0;
};

// Called for every generated token; return false to stop that sequence.
using TokenCallback = std::function<bool(int seq, int32_t token)>;

// Step-wise generation, for callers that pull tokens (a stream consumed in the caller's own
// thread, a server's scheduler). The constructor validates and prefills; each next() decodes one
// token for every live sequence and returns them as (sequence, token), in sequence order; empty
// once every sequence has finished. stop(i) ends sequence i before the next step.
// Sequence i uses memory slot i (mem must have at least prompts.size() slots); the slots are
// reset first. Sequence i samples with seed sampling.seed + i.
// On the CUDA backend the logits stay on the device and the device sampler (kernels/cuda/
// sampling.h) runs the same chain with the same RNG, so the tokens equal the CPU chain's for the
// same seed and only token ids cross to the host (repeat_last_n at most 1024 there).
class Generator {
 public:
  Generator(HybridModel& model, HybridMemory& mem, const std::vector<std::vector<int32_t>>& prompts,
            const GenerateOptions& opt, GenerateStats* stats = nullptr);
  ~Generator();
  // True when tokens are sampled on the device (the CUDA backend).
  bool samples_on_device() const { return dev_ != nullptr; }
  const std::vector<std::pair<int, int32_t>>& next();
  void stop(int seq);
  // The tokens generated so far per sequence (prompts excluded).
  const std::vector<std::vector<int32_t>>& tokens() const { return out_; }

 private:
  HybridModel& model_;
  HybridMemory& mem_;
  GenerateOptions opt_;
  GenerateStats* stats_;
  std::vector<std::unique_ptr<SamplerChain>> samplers_;
  std::vector<std::vector<int32_t>> out_;
  std::vector<int32_t> next_;  // sampled, not yet emitted
  std::vector<bool> live_;
  std::vector<float> logits_;
  std::vector<std::pair<int, int32_t>> step_;
  bool started_ = false;
  std::chrono::steady_clock::time_point t_decode_;
  std::unique_ptr<DeviceSampler> dev_;  // the CUDA path; null on host backends
};

// Generator to the end, calling on_token for every token (false stops that sequence). Returns
// the generated tokens per sequence (prompts excluded).
std::vector<std::vector<int32_t>> generate(HybridModel& model, HybridMemory& mem,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& opt, const TokenCallback& on_token = {},
                                           GenerateStats* stats = nullptr);

}  // namespace hm
