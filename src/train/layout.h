// Where each parameter tensor sits in a Params arena, as element offsets, so float, double and
// long double copies of the parameters (and gradient arenas, host or device) share Params' layout.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "model/params.h"

namespace hm {

inline constexpr int64_t kNoTensor = -1;

struct LayerOffsets {
  int64_t norm, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A_log, Dskip, out_proj;
  int64_t wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down, bridge_norm, bridge_proj, bridge_gate;
  int64_t fuse_mamba, fuse_attn, exchange, router_w, router_feat, router_b;  // true layers
  int64_t ssm_norm;  // Mamba-2 layers' gated RMSNorm
  int64_t dt_norm, b_norm, c_norm;  // Jamba's learned dt, B and C norms (mamba_bcdt_norm_weight)
  // MoE layers: the router [X, D], its correction bias [X] (sigmoid routers), the experts' stacks
  // [X, Fe, D], [X, Fe, D], [X, D, Fe], the shared expert [S, D], [S, D], [D, S]
  int64_t moe_router, moe_bias, e_gate, e_up, e_down, s_gate, s_up, s_down;
  int64_t in_proj_b, out_proj_b;  // mamba_proj_bias: in_proj's [2E] and out_proj's [D] biases
};

struct Layout {
  ModelConfig c;
  int64_t numel = 0, emb = 0, norm_f = 0, head = 0;  // head == emb when tied
  std::vector<LayerOffsets> layers;
  std::vector<std::pair<int64_t, int64_t>> tensors;  // (offset, numel); the padding between is skipped

  explicit Layout(const Params& p) : c(p.config()), numel(p.numel()) {
    const float* base = p.data();
    auto off = [&](const float* q) { return q ? int64_t(q - base) : kNoTensor; };
    emb = off(p.embeddings());
    norm_f = off(p.norm_f());
    head = off(p.lm_head());
    for (int i = 0; i < c.n_layers; ++i) {
      const LayerWeights& w = p.layer(i);
      layers.push_back({off(w.norm), off(w.in_proj), off(w.conv_w), off(w.conv_b), off(w.x_proj),
                        off(w.dt_w), off(w.dt_b), off(w.A_log), off(w.Dskip), off(w.out_proj),
                        off(w.wq), off(w.wk), off(w.wv), off(w.wo), off(w.mlp_norm),
                        off(w.w_gate), off(w.w_up), off(w.w_down), off(w.bridge_norm),
                        off(w.bridge_proj), off(w.bridge_gate), off(w.fuse_mamba),
                        off(w.fuse_attn), off(w.exchange), off(w.router_w), off(w.router_feat),
                        off(w.router_b), off(w.ssm_norm), off(w.dt_norm), off(w.b_norm), off(w.c_norm),
                        off(w.moe_router), off(w.moe_bias), off(w.e_gate), off(w.e_up), off(w.e_down),
                        off(w.s_gate), off(w.s_up), off(w.s_down), off(w.in_proj_b), off(w.out_proj_b)});
    }
    for (size_t k = 0; k < p.specs().size(); ++k)
      tensors.emplace_back(int64_t(p.at(k) - base), p.specs()[k].numel());
  }
};

}  // namespace hm
