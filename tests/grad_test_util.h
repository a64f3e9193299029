// Helpers shared by the whole-model gradient tests (test_model_grad, test_true_hybrid_grad).
#pragma once
#include <omp.h>

#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "core/rng.h"
#include "model/params.h"

namespace hm::test {

struct TokenBatch {
  int B, L;
  std::vector<int32_t> tokens, targets;
};

// Next-token targets, the last -1 and one more -1 per sequence at a random place: exercises the
// ignore rule, and sequences then count different numbers of positions.
inline TokenBatch make_batch(int B, int L, int V, uint64_t seed) {
  Rng rng(seed);
  TokenBatch b{B, L, std::vector<int32_t>(size_t(B) * L), std::vector<int32_t>(size_t(B) * L)};
  for (auto& t : b.tokens) t = int32_t(rng.next_u64() % uint64_t(V));
  for (int s = 0; s < B; ++s)
    for (int t = 0; t < L; ++t)
      b.targets[size_t(s) * L + t] = t + 1 < L ? b.tokens[size_t(s) * L + t + 1] : -1;
  for (int s = 0; s < B; ++s) b.targets[size_t(s) * L + size_t(rng.next_u64() % uint64_t(L))] = -1;
  return b;
}

// The parameters as a T array with Params' layout (padding zero).
template <class T> std::vector<T> arena(const Params& p) {
  std::vector<T> a(size_t(p.numel()), T(0));
  for (size_t k = 0; k < p.specs().size(); ++k)
    for (int64_t i = 0; i < p.specs()[k].numel(); ++i)
      a[size_t(p.at(k) - p.data() + i)] = T(p.at(k)[i]);
  return a;
}

// Per tensor: max_i |a_i - b_i| / max_i |b_i|; the worst tensor's value and name.
template <class A, class B>
std::pair<double, std::string> worst_tensor_err(const Params& layout, const A* a, const B* b) {
  std::pair<double, std::string> worst{0.0, ""};
  for (size_t k = 0; k < layout.specs().size(); ++k) {
    const int64_t off = layout.at(k) - layout.data();
    double num = 0, den = 0;
    for (int64_t i = off; i < off + layout.specs()[k].numel(); ++i) {
      num = std::max(num, std::fabs(double(a[i]) - double(b[i])));
      den = std::max(den, std::fabs(double(b[i])));
    }
    const double e = den > 0 ? num / den : (num > 0 ? INFINITY : 0.0);
    if (e >= worst.first) worst = {e, layout.specs()[k].name};
  }
  return worst;
}

// Small enough for fast differences, with every feature of a Simple Hybrid on: M A A M gives a
// Mamba -> attention bridge (1, source width d_inner 32), an attention -> Mamba bridge (3, source
// width 16) and neighbours of one type without one (2); GQA, RoPE, SwiGLU MLP, explicit dt_rank,
// d_conv != 4.
inline ModelConfig small_hybrid_config(bool tied) {
  ModelConfig c;
  c.d_model = 16;
  c.n_layers = 4;
  c.attention_layers = {1, 2};
  c.vocab_size = 23;
  c.d_state = 4;
  c.d_conv = 3;
  c.expand = 2;
  c.dt_rank = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.rope = true;
  c.d_ff = 12;
  c.tie_embeddings = tied;
  c.state_bridges = true;
  validate(c);
  return c;
}

// Falcon-H1's layer: Mamba-2 and attention side by side (true-tiny's true layers in `both` mode,
// Mamba-2 paths in groups, no gated norm, no bridges).
inline ModelConfig falcon_h1_layer_config() {
  ModelConfig c = preset("true-tiny");
  c.routing_mode = "both";
  c.state_bridges = false;
  c.mamba2_layers = {0, 1, 2, 4};
  c.mamba2_head_dim = 16;
  c.mamba2_groups = 2;
  c.mamba2_gated_norm = false;
  validate(c);
  return c;
}

inline bool verbose() { return std::getenv("HM_GRAD_VERBOSE") != nullptr; }

// Restores the OpenMP thread count on scope exit.
struct OmpThreads {
  int saved = omp_get_max_threads();
  explicit OmpThreads(int n) { omp_set_num_threads(n); }
  ~OmpThreads() { omp_set_num_threads(saved); }
};

}  // namespace hm::test
