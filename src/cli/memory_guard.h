// --max-memory, and the memory check a command makes before it allocates (docs/RELIABILITY.md,
// "Memory estimate"): the shapes each command runs at, in one place.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "model/memory_estimate.h"

namespace hm::cli {

// Adds --max-memory SIZE (e.g. 2G) to a subcommand; it sets the process's limit (set_memory_limit).
void add_max_memory(CLI::App& app);
// Inference: `slots` sequences of up to `ctx` tokens with the given KV type ("f16" | "f32"),
// prefilled in chunks of up to 512 tokens, logits of each chunk's last token.
RunShape inference_shape(int64_t slots, int64_t ctx, const std::string& kv_type);
// Training at batch x seq_len on `threads` threads.
RunShape train_shape(int64_t batch, int64_t seq_len, int threads);
// The most tokens any of the prompts can encode to (bytes + BOS: no tokenizer makes more).
int64_t max_prompt_tokens(const std::vector<std::string>& texts);
// hm eval at batch windows of seq_len (0: the run's, else 128); task: batch draws, all logits.
RunShape eval_shape(const std::string& model_dir, int seq_len, int batch, bool task);
// check_memory(estimate_memory(model_dir/config.json, shape), what), before the model is loaded.
void check_model_memory(const std::string& model_dir, const RunShape& shape, const std::string& what);

}  // namespace hm::cli
