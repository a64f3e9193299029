#include "cli/memory_guard.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "io/hf_model.h"
#include "core/threads.h"
#include "model/config.h"
#include "train/trainer.h"

namespace hm::cli {

void add_max_memory(CLI::App& app) {
  app.add_option_function<std::string>(
      "--max-memory",
      [](const std::string& v) {
        try {
          set_memory_limit(parse_memory_size(v));
        } catch (const Error& e) {
          throw CLI::ValidationError("--max-memory", e.what());
        }
      },
      "Refuse to start when the estimated memory exceeds SIZE (e.g. 512M, 2G); default: the memory "
      "available (MemAvailable)");
}

RunShape inference_shape(int64_t slots, int64_t ctx, const std::string& kv_type) {
  RunShape s;
  s.slots = slots;
  s.ctx = ctx;
  s.forward_tokens = slots * std::min<int64_t>(ctx, 512);
  s.logit_rows = slots;
  s.kv_bytes = kv_type == "f32" ? 4 : 2;
  return s;
}

RunShape train_shape(int64_t batch, int64_t seq_len, int threads) {
  RunShape s;
  s.train_batch = batch;
  s.seq_len = seq_len;
  s.threads = std::max(threads, 1);
  return s;
}

int64_t max_prompt_tokens(const std::vector<std::string>& texts) {
  size_t longest = 0;
  for (const auto& t : texts) longest = std::max(longest, t.size());
  return int64_t(longest) + 1;
}

RunShape eval_shape(const std::string& model_dir, int seq_len, int batch, bool task) {
  const int64_t L = seq_len > 0 ? seq_len : std::max<int64_t>(trained_seq_len(model_dir), 0);
  const int64_t B = std::max(batch, 1);
  if (task) {
    RunShape s = inference_shape(B, L, "f32");
    s.forward_tokens = s.logit_rows = B * L;
    return s;
  }
  RunShape s;  // loss_only: the training forward without gradients
  s.train_batch = B;
  s.seq_len = L > 0 ? L : 128;
  s.threads = num_threads();
  s.forward_only = true;
  return s;
}

void check_model_memory(const std::string& model_dir, const RunShape& shape, const std::string& what) {
  const std::string dir = checkpoint_dir(model_dir);
  check_memory(estimate_memory(load_any_config(dir), shape), what);
}

}  // namespace hm::cli
