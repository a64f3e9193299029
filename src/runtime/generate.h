// Generation: prefill a batch of prompts of different lengths in one ragged forward (chunked to
// bound activation memory), then decode all live sequences one token per step with the KV cache
// and recurrent state in HybridMemory.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "model/model.h"
#include "runtime/memory.h"
#include "runtime/sampling.h"

namespace hm {

struct GenerateOptions {
  int max_new_tokens = 64;
  SamplingParams sampling;
  int n_decodable = 0;        // tokens the tokenizer can decode (0 = the model's vocabulary)
  int eos = -1;               // stop a sequence when it samples this token (-1 = never)
  int prefill_chunk = 512;    // tokens per sequence per prefill forward
};

struct GenerateStats {
  double prefill_ms = 0, decode_ms = 0;
  int64_t prompt_tokens = 0, decoded_tokens = 0;
};

// Called for every generated token; return false to stop that sequence.
using TokenCallback = std::function<bool(int seq, int32_t token)>;

// Sequence i uses memory slot i (mem must have at least prompts.size() slots); the slots are
// reset first. Returns the generated tokens per sequence (prompts excluded). Sequence i samples
// with seed sampling.seed + i.
std::vector<std::vector<int32_t>> generate(HybridModel& model, HybridMemory& mem,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& opt, const TokenCallback& on_token = {},
                                           GenerateStats* stats = nullptr);

}  // namespace hm
