// The True Hybrid router (docs/TRUE_HYBRID.md): the complexity analyzer's features and the
// routing logits, and their gradient. The reference of every backend's router op (which
// inference and BatchGrad call), and what the double training reference (train/model_grad.cpp) runs.
// Plain loops: this is O(L * D) next to the paths' O(L * D * E) and O(L^2 * D).
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

namespace hm {

// Causal features the complexity analyzer hands the router besides u itself (novelty, position).
constexpr int kRouterFeatures = 2;

namespace th {

// EMA decay of the analyzer's running summary of u: a window of about 8 tokens.
constexpr double kEmaDecay = 0.875;

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

}  // namespace th
}  // namespace hm
