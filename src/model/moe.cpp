#include "model/moe.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace hm {

void moe_route(const ModelConfig& c, const float* logits, const float* corr, int T, MoeRouting& r,
               const int32_t* forced) {
  const int X = c.moe_experts, k = c.moe_top_k, NG = c.moe_groups, per = X / NG;
  const bool sigmoid = c.moe_router == "sigmoid";
  HM_CHECK(!sigmoid || corr, "moe_route: a sigmoid router needs its correction bias");
  r.T = T, r.X = X, r.k = k;
  r.probs.assign(logits, logits + size_t(T) * X);
  r.chosen.resize(size_t(T) * k);
  r.gate.resize(size_t(T) * k);
  r.top.resize(size_t(T));
  r.rows.assign(size_t(X), {});
  r.gates.assign(size_t(X), {});
  std::vector<int> order(static_cast<size_t>(X)), gorder(static_cast<size_t>(NG));
  std::vector<float> choice(static_cast<size_t>(X)), gscore(static_cast<size_t>(NG));
  for (int t = 0; t < T; ++t) {
    float* p = r.probs.data() + size_t(t) * X;
    if (sigmoid) {
      for (int e = 0; e < X; ++e) p[e] = float(1.0 / (1.0 + std::exp(-double(p[e]))));
      for (int e = 0; e < X; ++e) choice[size_t(e)] = p[e] + corr[e];  // float32, as transformers adds them
    } else {
      const float mx = *std::max_element(p, p + X);
      double sum = 0;
      for (int e = 0; e < X; ++e) sum += std::exp(double(p[e]) - mx);
      for (int e = 0; e < X; ++e) p[e] = float(std::exp(double(p[e]) - mx) / sum);
      std::copy(p, p + X, choice.begin());
    }
    if (NG > 1) {  // only the experts of the topk_groups best groups stay eligible
      for (int g = 0; g < NG; ++g) {
        const float* cg = choice.data() + size_t(g) * per;
        const int best = int(std::max_element(cg, cg + per) - cg);
        float second = -INFINITY;
        for (int j = 0; j < per; ++j)
          if (j != best) second = std::max(second, cg[j]);
        gscore[size_t(g)] = cg[best] + second;
        gorder[size_t(g)] = g;
      }
      std::partial_sort(gorder.begin(), gorder.begin() + c.moe_topk_groups, gorder.end(), [&](int a, int b) {
        return gscore[size_t(a)] > gscore[size_t(b)] || (gscore[size_t(a)] == gscore[size_t(b)] && a < b);
      });
      std::vector<bool> kept(static_cast<size_t>(NG), false);
      for (int j = 0; j < c.moe_topk_groups; ++j) kept[size_t(gorder[size_t(j)])] = true;
      for (int e = 0; e < X; ++e)
        if (!kept[size_t(e / per)]) choice[size_t(e)] = -INFINITY;
    }
    for (int e = 0; e < X; ++e) order[size_t(e)] = e;
    const float* ch = choice.data();  // best first; ties to the lower index
    if (forced)
      std::copy(forced + size_t(t) * k, forced + size_t(t + 1) * k, order.begin());
    else
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [ch](int a, int b) { return ch[a] > ch[b] || (ch[a] == ch[b] && a < b); });
    double top = 0;
    for (int j = 0; j < k; ++j) top += p[order[size_t(j)]];
    r.top[size_t(t)] = top;
    for (int j = 0; j < k; ++j) {
      const int e = order[size_t(j)];
      const double pe = c.moe_renormalize ? p[e] / (top + 1e-20) : p[e];
      const float g = float(pe * c.moe_scaling);
      r.chosen[size_t(t) * k + j] = e;
      r.gate[size_t(t) * k + j] = g;
      r.rows[size_t(e)].push_back(t);
      r.gates[size_t(e)].push_back(g);
    }
  }
}

void moe_route_backward(const ModelConfig& c, const MoeRouting& r, const double* dgate, double* dlogits) {
  const int X = r.X, k = r.k;
  const double scale = double(c.moe_scaling);
  std::vector<double> ds(static_cast<size_t>(X));
  for (int t = 0; t < r.T; ++t) {
    const float* p = r.probs.data() + size_t(t) * X;
    const int32_t* ch = r.chosen.data() + size_t(t) * k;
    const double* dg = dgate + size_t(t) * k;
    std::fill(ds.begin(), ds.end(), 0.0);
    if (c.moe_renormalize) {  // g_e = scale s_e / S, S = sum of the chosen s (+1e-20, as the forward)
      const double S = r.top[size_t(t)] + 1e-20;
      double dot = 0;  // sum_j dg_j s_j
      for (int j = 0; j < k; ++j) dot += dg[j] * p[ch[j]];
      for (int j = 0; j < k; ++j) ds[size_t(ch[j])] = scale * (dg[j] / S - dot / (S * S));
    } else {
      for (int j = 0; j < k; ++j) ds[size_t(ch[j])] = scale * dg[j];
    }
    double* dl = dlogits + size_t(t) * X;
    if (c.moe_router == "sigmoid") {
      for (int e = 0; e < X; ++e) dl[e] = ds[size_t(e)] * p[e] * (1.0 - p[e]);
    } else {  // softmax: dl_i = s_i (ds_i - sum_j s_j ds_j)
      double sd = 0;
      for (int e = 0; e < X; ++e) sd += double(p[e]) * ds[size_t(e)];
      for (int e = 0; e < X; ++e) dl[e] = p[e] * (ds[size_t(e)] - sd);
    }
  }
}

}  // namespace hm
