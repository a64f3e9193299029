// The hybrid model: a stack of Mamba, attention and true-hybrid blocks (docs/MODEL.md,
// docs/TRUE_HYBRID.md) run over a ragged batch. One forward path serves prefill and decoding: a decode step is a batch of
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
#include "model/true_hybrid.h"
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
  Buffer gath, ym, ya;  // true-hybrid layers: gathered path inputs, compact path outputs
};

// What the routers of the true-hybrid layers decided in the last forward (set_route_trace).
struct RouteTrace {
  std::vector<int> layers;  // the true-hybrid layers, in order
  // [index into layers][token of the batch, in packed order]
  std::vector<std::vector<float>> p;                 // the router's attention probability
  std::vector<std::vector<th::Route>> route;
  std::vector<std::vector<double>> attention_share;  // th::attention_share; Mamba's is 1 - it
};

// Rows [row0, row0 + n) of a path's compact input belong to the sequence in `slot` and continue
// it at position pos0 (the attention path's own position: its K/V row count).
struct PathSeg {
  int slot = 0, row0 = 0, n = 0, pos0 = 0;
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

  // Benchmarks and tests: send a fraction f of every sequence's tokens to attention in each
  // true-hybrid layer (th::forced_to_attention), whatever the router says; f < 0 lets the router
  // decide again. Only hard routing skips a path, so forcing in soft or both mode (or on a model
  // without true-hybrid layers) is an hm::Error.
  void set_forced_attention_fraction(double f);
  double forced_attention_fraction() const { return force_f_; }
  // Records the routes of every later forward into *t (null: stop recording).
  void set_route_trace(RouteTrace* t) { trace_ = t; }

 private:
  void bridge(int layer, int T);
  void mamba_layer(int layer, const Batch& b, const std::vector<int>& start, HybridMemory& mem);
  void attention_layer(int layer, const Batch& b, const std::vector<int>& start, HybridMemory& mem);
  void true_layer(int layer, const Batch& b, const std::vector<int>& start, HybridMemory& mem);
  // The two paths over n compact rows x [n, D], segment by segment: out [n, D] (=|+=).
  void mamba_path(int layer, const float* x, int n, const std::vector<PathSeg>& segs, float* out,
                  bool accumulate, HybridMemory& mem);
  void attention_path(int layer, const float* x, int n, const std::vector<PathSeg>& segs, float* out,
                      bool accumulate, HybridMemory& mem);
  void mlp(int layer, int T);

  ModelConfig cfg_;
  Backend& be_;
  Params params_;
  std::vector<std::vector<float>> A_;  // per layer: -exp(A_log) [E, N] (empty for attention)
  Workspace ws_;
  double force_f_ = -1.0;
  RouteTrace* trace_ = nullptr;
  // true_layer's host scratch, reused across calls
  std::vector<th::Routing<float>> routing_;  // per chunk of the batch
  std::vector<float> logit_, feats_;         // [T], [T, kRouterFeatures]
  std::vector<int> midx_, aidx_;             // [T]: row in ym / ya, -1 when the path did not run
  std::vector<float> gm_, ga_;               // [T]: the gates, batch order
};

// Loads config.json and model.safetensors from a checkpoint directory.
std::unique_ptr<HybridModel> load_model(const std::string& dir, Backend& be);
// Writes config.json and model.safetensors into dir (created if needed), each atomically.
void save_model(const HybridModel& m, const std::string& dir, const std::string& stored_dtype = "F32");

}  // namespace hm
