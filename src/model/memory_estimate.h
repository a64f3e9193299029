// What a command is about to allocate, estimated from the config before anything is, so that a
// config or a --ctx too large for the machine is refused with a message instead of ending in
// bad_alloc or swapping (docs/RELIABILITY.md, "Memory estimate"). Every size is overflow-checked.
#pragma once
#include <cstdint>
#include <string>

#include "core/dtype.h"
#include "model/config.h"

namespace hm {

// The shape of the work. Inference: `slots` sequences of up to `ctx` tokens each (KV cache and
// recurrent state), forwards of at most `forward_tokens` tokens (the workspace) producing
// `logit_rows` rows of logits. Training (train_batch > 0): batches of train_batch x seq_len on
// `threads` threads.
struct RunShape {
  int64_t slots = 0, ctx = 0, forward_tokens = 0, logit_rows = 0;
  int kv_bytes = 2;  // bytes per KV cache element: 2 (f16) or 4 (f32)
  int64_t train_batch = 0, seq_len = 0;
  int threads = 1;
  int scan_chunk = 0;
  bool grad_ckpt = false;
  bool forward_only = false;  // evaluation: activations, but no gradients or optimizer state
  // Packed linear weights (HybridModel::set_weight_format): their packed copies on top of the
  // arena, minus the arena rows of packed weights when an inference load never holds them
  // (load_packed_for_inference; a tied head's source, the embedding, is kept).
  DType weight_format = DType::F32;
  bool floats_released = false;
};

struct MemoryEstimate {
  int64_t weights = 0;      // the parameter arena and what prepare() derives from it
  int64_t gradients = 0;    // training: gradient arenas (one per thread)
  int64_t optimizer = 0;    // training: AdamW's m and v
  int64_t kv_cache = 0;     // every slot's K and V at the full context
  int64_t state = 0;        // recurrent (conv + SSM) and route state of every slot
  int64_t workspace = 0;    // inference activations of the largest forward, and its logits
  int64_t activations = 0;  // training: saved activations and logits of one sequence per thread
  int64_t total() const;
  // "weights 142.3 MiB + KV cache 12.0 MiB + ... = 155.0 MiB", the nonzero parts only.
  std::string describe() const;
};

MemoryEstimate estimate_memory(const ModelConfig& c, const RunShape& s);

// "1.50 GiB", "83.9 MiB" (powers of 1024, as --max-memory's units).
std::string format_bytes(int64_t bytes);
// "2G", "512M", "1.5G", "64k", "1000000" (powers of 1024; an optional trailing B or iB) -> bytes.
// hm::Error naming the text otherwise.
int64_t parse_memory_size(const std::string& text);

// --max-memory for this process (0: no limit of its own). Commands check against the smaller of
// it and available_memory_bytes().
void set_memory_limit(int64_t bytes);
// MemAvailable from /proc/meminfo, lowered to a cgroup v2 memory.max when one is set; -1 when
// neither can be read.
int64_t available_memory_bytes();
// hm::Error naming `what` (the command and its shape), the estimate's parts and the limit when
// e.total() exceeds the --max-memory limit or the available memory.
void check_memory(const MemoryEstimate& e, const std::string& what);

}  // namespace hm
