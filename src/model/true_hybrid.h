// The True Hybrid layer's complexity analyzer, router and route decisions (docs/TRUE_HYBRID.md):
// the one implementation shared by inference (model/model.cpp, float) and training
// (train/model_grad.cpp, float/double/long double), so both make the same routes by construction.
// Plain loops: this is O(L * D) next to the paths' O(L * D * E) and O(L^2 * D).
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "model/config.h"
#include "model/params.h"

namespace hm::th {

// EMA decay of the analyzer's running summary of u: a window of about 8 tokens.
constexpr double kEmaDecay = 0.875;

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

// Analyzer features of token t (kRouterFeatures of them), no gradient through them:
//   novelty  = 1 - cos(u_t, m_{t-1}), where m is the EMA of u (m_{-1} = 0, cos := 0 then);
//   position = log2(1 + t) / 16.
// Router logit s_t = w . u_t + fw . features_t + b. With chunk granularity every token of a
// chunk [kC, kC + C) takes the logit of the chunk's first token (causal: it precedes them all).
//
// Runs L tokens continuing a sequence at absolute position pos0. ema [D] holds m_{pos0-1} on
// entry (zeros when pos0 == 0) and m_{pos0+L-1} on exit; chunk_logit holds the logit of the
// chunk that position pos0-1 belongs to (read only when pos0 is not a chunk start) and is
// updated. Writes feats [L, kRouterFeatures] (for the backward) and the routing logits r [L].
template <class T>
void router_forward(T* r, T* feats, T* ema, T& chunk_logit, const T* u, int L, int D, int64_t pos0,
                    const T* w, const T* fw, const T* b, bool chunked, int C) {
  for (int t = 0; t < L; ++t) {
    const T* ut = u + int64_t(t) * D;
    T dot = 0, nu = 0, nm = 0, s = 0;
    for (int j = 0; j < D; ++j) {
      dot += ut[j] * ema[j];
      nu += ut[j] * ut[j];
      nm += ema[j] * ema[j];
      s += w[j] * ut[j];
    }
    const T denom = std::sqrt(nu) * std::sqrt(nm);
    T* f = feats + int64_t(t) * kRouterFeatures;
    f[0] = T(1) - (denom > T(0) ? dot / denom : T(0));
    f[1] = T(std::log2(double(pos0 + t) + 1.0) / 16.0);
    for (int k = 0; k < kRouterFeatures; ++k) s += fw[k] * f[k];
    s += b[0];
    for (int j = 0; j < D; ++j) ema[j] = T(kEmaDecay) * ema[j] + T(1.0 - kEmaDecay) * ut[j];
    if (!chunked || (pos0 + t) % C == 0) chunk_logit = s;
    r[t] = chunked ? chunk_logit : s;
  }
}

// The gradient ds [L] of each token's own logit s_t from dr [L] (dL/dr_t): with chunk routing
// every token of a chunk uses the logit of its first token, where their dr add up.
template <class T>
void router_logit_grad(T* ds, const T* dr, int L, bool chunked, int C) {
  for (int t = 0; t < L; ++t) ds[t] = T(0);
  for (int t = 0; t < L; ++t) ds[chunked ? t / C * C : t] += dr[t];
}

// Gradient of router_forward from dr [L] (dL/dr_t): adds into the router's weight gradients and,
// unless du is null (a caller adding ds_t w on a device), into du [L, D]. pos0 == 0 only
// (training runs whole sequences), so every chunk start is inside.
template <class T>
void router_backward(T* du, T* dw, T* dfw, T* db, const T* dr, const T* feats, const T* u,
                     const T* w, int L, int D, bool chunked, int C) {
  std::vector<T> ds(static_cast<size_t>(L));
  router_logit_grad(ds.data(), dr, L, chunked, C);
  for (int t = 0; t < L; ++t) {
    const T g = ds[size_t(t)];
    if (g == T(0)) continue;
    const T* ut = u + int64_t(t) * D;
    for (int j = 0; j < D; ++j) dw[j] += g * ut[j];
    if (du) {
      T* dut = du + int64_t(t) * D;
      for (int j = 0; j < D; ++j) dut[j] += g * w[j];
    }
    for (int k = 0; k < kRouterFeatures; ++k) dfw[k] += g * feats[int64_t(t) * kRouterFeatures + k];
    db[0] += g;
  }
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
