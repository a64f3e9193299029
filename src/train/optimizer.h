// AdamW with global-norm clipping and the warmup + cosine learning-rate schedule. Moments live in
// two Params arenas with the model's layout, so they save, load and step tensor by tensor by name.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/params.h"

namespace hm {

struct AdamWConfig {
  float lr = 3e-4f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
  float clip_norm = 1.0f;  // <= 0: off
};

// Which tensors get weight decay (Mamba's and GPT's recipe): only the matrices of linear maps and
// the conv filter, i.e. names ending in ".weight" whose module is neither a norm (norm, mlp_norm,
// norm_f, a bridge's norm) nor the embedding table. Everything else keeps its value free: biases,
// A_log and D (decaying them pulls the SSM toward A = -1, D = 0), bridge gates (decay would pull
// a bridge toward off) and the embeddings (decay shrinks rare tokens' rows). An untied lm_head
// decays like any other projection; a tied one is the embedding table and does not.
bool decays(const std::string& param_name);

// Decoupled weight decay (Loshchilov & Hutter):
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  m_hat = m / (1-b1^t);  v_hat = v / (1-b2^t)
//   p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)          (wd = 0 where !decays(name))
// Math and moments in float32; the lr passed to step() is the scheduled one, config().lr unused there.
class AdamW {
 public:
  AdamW(const Params& p, AdamWConfig c);  // m, v zeroed, same layout as p
  ~AdamW();
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  // Clips grads by their global L2 norm over all tensors when clip_norm > 0 (grads are scaled in
  // place, so afterwards they hold what was applied), then takes one step at learning rate lr.
  // Returns the pre-clip norm. A non-finite norm is returned without touching params, grads,
  // moments or the step count: the caller stops the run.
  double step(Params& p, Params& grads, float lr);
  int64_t steps() const { return t_; }
  const AdamWConfig& config() const { return cfg_; }
  const Params& m() const { return *m_; }
  const Params& v() const { return *v_; }
  // For a step taken elsewhere (Backend::adamw_step on a device, whose moments are copied in
  // here to save and out after a load): counts one step and returns its bias corrections
  // 1 / (1 - beta1^t) and 1 / (1 - beta2^t), computed as step() computes them.
  std::pair<float, float> count_step();
  Params& m() { return *m_; }
  Params& v() { return *v_; }

  // safetensors with m.<name> and v.<name> (F32, the parameter's shape) and the step count in the
  // metadata ("step"); atomic. load() checks the layout (every tensor present with the same shape
  // and dtype F32, none extra, finite, v >= 0) and throws hm::Error naming the tensor otherwise;
  // on error the optimizer is left unchanged.
  void save(const std::string& path) const;
  void load(const std::string& path);

 private:
  AdamWConfig cfg_;
  std::unique_ptr<Params> m_, v_;
  std::vector<char> decay_;  // per spec index
  int64_t t_ = 0;
};

// Linear warmup from 0 (step 0) to max_lr (step warmup), then cosine decay to min_lr at step total,
// and min_lr after. Throws hm::Error unless 0 <= warmup <= total and step >= 0.
float lr_at(int64_t step, int64_t warmup, int64_t total, float max_lr, float min_lr);

// Global L2 norm over every tensor (padding excluded), accumulated in double. The summation order
// is fixed (fixed-size chunks, partials added in order), so it does not depend on the thread count.
double grad_norm(const Params& grads);

void zero(Params& p);  // zero the whole arena, padding included

}  // namespace hm
