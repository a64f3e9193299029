// The True Hybrid layer's route decisions (docs/TRUE_HYBRID.md), from the router of
// kernels/ref/router_ref.h: the one implementation shared by inference (model/model.cpp, float)
// and training (train/model_grad.cpp, float/double/long double; BatchGrad, float), so both make
// the same routes by construction.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/ref/router_ref.h"
#include "model/config.h"
#include "model/params.h"

namespace hm::th {

enum class Mode : uint8_t { Both, Soft, Hard };
inline Mode mode_from_config(const ModelConfig& c) {
  return c.routing_mode == "both" ? Mode::Both : c.routing_mode == "hard" ? Mode::Hard : Mode::Soft;
}

enum class Route : uint8_t { Mamba = 0, Attention = 1, Both = 2 };

// Benchmarks and tests may force hard routes: token at absolute position t goes to attention iff
// floor((t + 1) f) > floor(t f), which sends exactly round-down(n f) of any n first tokens there
// and is causal. f < 0: no forcing (the router decides).
inline bool forced_to_attention(int64_t t, double f) {
  return std::floor(double(t + 1) * f) > std::floor(double(t) * f);
}

// Which tokens run which path, and the gates their outputs are fused with.
template <class T> struct Routing {
  std::vector<T> p;              // [L] sigmoid(r): the router's attention probability
  std::vector<Route> route;      // [L]
  std::vector<T> gm, ga;         // [L] gates of the Mamba and attention outputs (0 when not run)
  std::vector<int> mamba_idx;    // tokens that run the Mamba path, in order
  std::vector<int> attn_idx;     // tokens that run the attention path, in order
  // For each attention token k (attn_idx[k]): the index into mamba_idx of the latest Mamba
  // token at or before it, or -1 for "none in this call" (the carried state supplies it).
  std::vector<int> carry;
};

// Route decisions and gates from the logits (docs/TRUE_HYBRID.md):
//   both: every token runs both, gm = ga = 1;
//   soft: every token runs both, gm = 1 - p, ga = p;
//   hard: attention iff r > 0 (or as forced), gate p for attention, 1 - p for Mamba.
template <class T>
void decide_routes(Routing<T>& rt, const T* r, int L, int64_t pos0, Mode mode, double force_f) {
  rt.p.resize(size_t(L));
  rt.route.resize(size_t(L));
  rt.gm.resize(size_t(L));
  rt.ga.resize(size_t(L));
  rt.mamba_idx.clear();
  rt.attn_idx.clear();
  rt.carry.clear();
  for (int t = 0; t < L; ++t) {
    const T p = T(1) / (T(1) + std::exp(-r[t]));
    rt.p[size_t(t)] = p;
    Route ro = Route::Both;
    T gm = 1, ga = 1;
    if (mode == Mode::Soft) {
      gm = T(1) - p;
      ga = p;
    } else if (mode == Mode::Hard) {
      const bool attn = force_f >= 0 ? forced_to_attention(pos0 + t, force_f) : r[t] > T(0);
      ro = attn ? Route::Attention : Route::Mamba;
      gm = attn ? T(0) : T(1) - p;
      ga = attn ? p : T(0);
    }
    rt.route[size_t(t)] = ro;
    rt.gm[size_t(t)] = gm;
    rt.ga[size_t(t)] = ga;
    if (ro != Route::Attention) rt.mamba_idx.push_back(t);
    if (ro != Route::Mamba) {
      rt.attn_idx.push_back(t);
      rt.carry.push_back(int(rt.mamba_idx.size()) - 1);
    }
  }
}

// Share of the routing weight each path gets for one token, for usage reports: hard 1/0, soft
// p / 1 - p, both 1/2 each (both run with equal weight). Sums to 1.
template <class T> double attention_share(const Routing<T>& rt, int t, Mode mode) {
  if (mode == Mode::Both) return 0.5;
  if (mode == Mode::Soft) return double(rt.p[size_t(t)]);
  return rt.route[size_t(t)] == Route::Attention ? 1.0 : 0.0;
}

}  // namespace hm::th
