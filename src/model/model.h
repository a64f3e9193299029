// The Simple Hybrid model: a stack of Mamba and attention blocks (docs/MODEL.md) run over a
// ragged batch. One forward path serves prefill and decoding: a decode step is a batch of
// one-token chunks that continue their sequences from the state in HybridMemory, so prefill and
// decode compute the same function by construction.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "model/params.h"
#include "runtime/memory.h"

namespace hm {

// n_tokens tokens appended to the sequence in `slot` (continuing from its current position).
struct SeqChunk {
  int slot = 0;
  int n_tokens = 0;
};

// Tokens of all chunks packed back to back, chunk after chunk.
struct Batch {
  std::vector<int32_t> tokens;
  std::vector<SeqChunk> seqs;
  bool logits_all = false;  // false: logits of each chunk's last token only
  void add(int slot, const std::vector<int32_t>& toks) {
    tokens.insert(tokens.end(), toks.begin(), toks.end());
    seqs.push_back({slot, int(toks.size())});
  }
};

// Scratch activations, grown to the largest batch seen; reused across calls.
struct Workspace {
  Buffer h, u, inner, inner_prev, xz, xc, dbc, dt, q, k, v, g, up, act, rows, logits_dev;
};

class HybridModel {
 public:
  HybridModel(const ModelConfig& c, Backend& be);
  const ModelConfig& config() const { return cfg_; }
  Params& params() { return params_; }
  const Params& params() const { return params_; }
  Backend& backend() { return be_; }

  // Call after the parameters change (init, load): derives A = -exp(A_log).
  void prepare();

  // Runs the batch and advances each chunk's sequence in mem. logits (host) receives
  // [n_tokens, vocab] when batch.logits_all, else [n_chunks, vocab]. Bad input (token id out
  // of range, slot out of range or repeated, context overflow) throws hm::Error.
  void forward(const Batch& batch, HybridMemory& mem, std::vector<float>& logits);

  int64_t weight_bytes() const { return params_.numel() * int64_t(sizeof(float)); }

 private:
  void bridge(int layer, int T);
  void mamba_layer(int layer, const Batch& b, const std::vector<int>& start, HybridMemory& mem);
  void attention_layer(int layer, const Batch& b, const std::vector<int>& start, HybridMemory& mem);
  void mlp(int layer, int T);

  ModelConfig cfg_;
  Backend& be_;
  Params params_;
  std::vector<std::vector<float>> A_;  // per layer: -exp(A_log) [E, N] (empty for attention)
  Workspace ws_;
};

// Loads config.json and model.safetensors from a checkpoint directory.
std::unique_ptr<HybridModel> load_model(const std::string& dir, Backend& be);
// Writes config.json and model.safetensors into dir (created if needed), each atomically.
void save_model(const HybridModel& m, const std::string& dir, const std::string& stored_dtype = "F32");

}  // namespace hm
