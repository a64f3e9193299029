#include "train/model_grad.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "kernels/ref/attention_grad_ref.h"
#include "kernels/ref/mamba_grad_ref.h"
#include "kernels/ref/ssd_grad_ref.h"
#include "model/true_hybrid.h"
#include "train/batch_grad.h"
#include "train/layout.h"

namespace hm {
namespace {

namespace G = ref::grad;

// float trains through BatchGrad (batch_grad.h): the one layer code of every backend (on the CPU
// backend, kernels/cpu/grad_cpu's blocks: sgemm, vectorised scan); double and long double are
// the plain reference loops below, the oracle the float path is checked against.
template <class T> constexpr bool kFast = std::is_same_v<T, float>;

constexpr int64_t kNone = kNoTensor;

std::atomic<Backend*> g_train_backend{nullptr};  // set_train_backend's; null: the CPU's
Backend& cpu_train_backend() {
  static const std::unique_ptr<Backend> be = make_cpu_backend();
  return *be;
}

template <class P> P* at(P* base, int64_t off) { return off == kNone ? nullptr : base + off; }

template <class T> G::MambaWeights<T> mamba_weights(const T* P, const LayerOffsets& o) {
  return {at(P, o.in_proj), at(P, o.conv_w), at(P, o.conv_b), at(P, o.x_proj), at(P, o.dt_w),
          at(P, o.dt_b),    at(P, o.A_log),  at(P, o.Dskip),  at(P, o.out_proj)};
}
template <class T> G::MambaGrads<T> mamba_grads(T* g, const LayerOffsets& o) {
  return {at(g, o.in_proj), at(g, o.conv_w), at(g, o.conv_b), at(g, o.x_proj), at(g, o.dt_w),
          at(g, o.dt_b),    at(g, o.A_log),  at(g, o.Dskip),  at(g, o.out_proj)};
}
template <class T> G::Mamba2Weights<T> mamba2_weights(const T* P, const LayerOffsets& o) {
  return {at(P, o.in_proj), at(P, o.conv_w), at(P, o.conv_b), at(P, o.dt_b),
          at(P, o.A_log),   at(P, o.Dskip),  at(P, o.ssm_norm), at(P, o.out_proj)};
}
template <class T> G::Mamba2Grads<T> mamba2_grads(T* g, const LayerOffsets& o) {
  return {at(g, o.in_proj), at(g, o.conv_w), at(g, o.conv_b), at(g, o.dt_b),
          at(g, o.A_log),   at(g, o.Dskip),  at(g, o.ssm_norm), at(g, o.out_proj)};
}
G::Mamba2Dims mamba2_dims(const ModelConfig& c) {
  return {c.d_model,
          c.d_inner(),
          c.d_state,
          c.d_conv,
          c.mamba2_heads(),
          c.mamba2_groups,
          c.mamba2_norm_group(),
          double(c.mamba2_dt_min),
          double(c.mamba2_dt_max),
          double(c.norm_eps),
          c.mamba2_gated_norm,
          c.mamba2_norm_before_gate};
}
G::MambaDims mamba_dims(const ModelConfig& c) {
  return {c.d_model, c.d_inner(), c.d_state, c.d_conv, c.resolved_dt_rank()};
}
G::AttnShape attn_shape(const ModelConfig& c, int L) {
  return {L, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim(), c.rope, double(c.rope_theta), c.resolved_rope_dim()};
}

// ---------------------------------------------------------------- the reference model
// double and long double: the plain forward/backward pairs of kernels/ref/*_grad_ref.h, the
// oracle for the checks (float trains through BatchGrad: batched_loss_and_grad below).

// out = rmsnorm(x) * w over n rows of d, keeping rstd [n] for the backward.
template <class T>
void norm_forward(T* out, std::vector<T>& rstd, const T* x, const T* w, int n, int d, double eps) {
  rstd.resize(size_t(n));
  G::rmsnorm_forward(out, rstd.data(), x, w, n, d, eps);
}
// dx (= or, with accumulate, +=) the norm's input gradient, dw accumulated. tmp: n x d of
// scratch for the +=.
template <class T>
void norm_backward(T* dx, T* tmp, T* dw, const T* dout, const T* x, const T* w, const std::vector<T>& rstd, int n,
                   int d, double /*eps*/, bool accumulate) {
  if (accumulate) {
    G::rmsnorm_backward(tmp, dw, dout, x, w, rstd.data(), n, d);
    for (size_t i = 0; i < size_t(n) * size_t(d); ++i) dx[i] += tmp[i];
  } else {
    G::rmsnorm_backward(dx, dw, dout, x, w, rstd.data(), n, d);
  }
}

// Bridge of layer i: rmsnorm(inner output of layer i-1) [L,S] and its rstd [L].
template <class T> struct BridgeActs {
  std::vector<T> bn, brstd;
};

// A true-hybrid layer's router and paths (docs/TRUE_HYBRID.md). The paths run on compacted
// sequences: row j of um/ym is token rt.mamba_idx[j], row k of va/ya token rt.attn_idx[k]; the
// blocks' own activations (LayerActs::mamba, ::attn) have those lengths too.
template <class T> struct TrueActs {
  std::vector<T> feats, r;  // analyzer features [L, kRouterFeatures], routing logits [L]
  th::Routing<T> rt;
  std::vector<T> um, ym;    // Mamba path input rows (empty when M is every token: u) and output
  std::vector<T> va, ya;    // attention path input u + exchange * x and output [|A|, D]
  G::acc_t<T> pmean = 0;    // mean_t p_t, the budget loss's share of attention

  const T* mamba_in(const std::vector<T>& u) const { return um.empty() ? u.data() : um.data(); }
};

// What one sequence's forward keeps for its backward, per layer.
template <class T> struct LayerActs {
  BridgeActs<T> br;
  std::vector<T> h, u, rstd;  // stream entering the pre-norm [L,D], the norm's output, rstd [L]
  G::MambaActs<T> mamba;
  G::Mamba2Acts<T> mamba2;  // Mamba-2 layers only
  G::AttnSaved<T> attn;
  TrueActs<T> tr;  // true-hybrid layers only
  std::vector<T> h2, m, mrstd;  // MLP: stream entering mlp_norm [L,D], its output, rstd [L]
  G::MlpSaved<T> mlp;
};

template <class V> int64_t vec_bytes(const V& v) {
  return int64_t(v.capacity() * sizeof(typename V::value_type));
}
template <class T> int64_t mamba2_bytes(const G::Mamba2Acts<T>& M) {
  return vec_bytes(M.zxd) + vec_bytes(M.xr) + vec_bytes(M.xbc) + vec_bytes(M.ys) + vec_bytes(M.yn);
}
template <class T> int64_t mamba_bytes(const G::MambaActs<T>& M) {
  return vec_bytes(M.x) + vec_bytes(M.z) + vec_bytes(M.xc) + vec_bytes(M.dt_r) + vec_bytes(M.B) +
         vec_bytes(M.C) + vec_bytes(M.dt) + vec_bytes(M.A) + vec_bytes(M.yg) + vec_bytes(M.scan_states);
}

// With gradient checkpointing (ckpt) the forward keeps, per layer, only the stream entering its
// pre-norm (after the bridge: so the recompute needs no bridge source), in ckpt_h[i]; keeping
// the previous layer's inner output for the bridge instead would cost 2x more per Mamba layer.
// One layer's activations live in layers[0] and one bridge's in br: the backward re-runs layer
// i-1's forward into them once layer i's mixer is done, which also rebuilds the inner output
// layer i's bridge needs. Every buffer is reused, never shrunk, so bytes() after a step is the peak it held.
template <class T> struct SeqActs {
  bool ckpt = false;
  std::vector<LayerActs<T>> layers;
  BridgeActs<T> br;                      // ckpt only
  std::vector<std::vector<T>> ckpt_h;    // ckpt only: [n_layers][L*D]
  std::vector<T> rh, rout;               // ckpt only: the recompute's stream and mixer output
  std::vector<T> hf, hn, rstd_f;  // final stream [L,D], rmsnorm(hf, norm_f), rstd [L]
  G::acc_t<T> budget = 0;         // this sequence's budget loss, summed over true layers

  LayerActs<T>& layer(int i) { return layers[ckpt ? 0 : size_t(i)]; }
  const LayerActs<T>& layer(int i) const { return layers[ckpt ? 0 : size_t(i)]; }
  BridgeActs<T>& bridge(int i) { return ckpt ? br : layers[size_t(i)].br; }
  // Layer i's inner representation (y * silu(z) or the head contexts): the next bridge's source.
  // With ckpt, valid only while layer i is the one held.
  const T* inner(const ModelConfig& c, int i) const {
    return c.is_attention(i) ? layer(i).attn.inner.data()
           : c.is_mamba2(i)  ? layer(i).mamba2.yn.data()
                             : layer(i).mamba.yg.data();
  }

  int64_t bytes() const {
    int64_t n = vec_bytes(br.bn) + vec_bytes(br.brstd) + vec_bytes(rh) + vec_bytes(rout) +
                vec_bytes(hf) + vec_bytes(hn) + vec_bytes(rstd_f);
    for (const auto& v : ckpt_h) n += vec_bytes(v);
    for (const LayerActs<T>& la : layers) {
      const auto& A = la.attn;
      n += vec_bytes(la.br.bn) + vec_bytes(la.br.brstd) + vec_bytes(la.h) + vec_bytes(la.u) +
           vec_bytes(la.rstd) + vec_bytes(la.h2) + vec_bytes(la.m) + vec_bytes(la.mrstd) +
           vec_bytes(la.mlp.g) + vec_bytes(la.mlp.u) + vec_bytes(la.mlp.a) + mamba_bytes(la.mamba) +
           mamba2_bytes(la.mamba2) + vec_bytes(A.q) + vec_bytes(A.k) + vec_bytes(A.v) + vec_bytes(A.lse) + vec_bytes(A.inner);
      const TrueActs<T>& tr = la.tr;
      n += vec_bytes(tr.feats) + vec_bytes(tr.r) + vec_bytes(tr.rt.p) + vec_bytes(tr.rt.route) +
           vec_bytes(tr.rt.gm) + vec_bytes(tr.rt.ga) + vec_bytes(tr.rt.mamba_idx) +
           vec_bytes(tr.rt.attn_idx) + vec_bytes(tr.rt.carry) + vec_bytes(tr.um) +
           vec_bytes(tr.ym) + vec_bytes(tr.va) + vec_bytes(tr.ya);
    }
    return n;
  }
};

std::atomic<int64_t> g_act_peak{0};

template <class T> void add_into(std::vector<T>& h, const std::vector<T>& x) {
  for (size_t i = 0; i < h.size(); ++i) h[i] += x[i];
}

// br = rmsnorm(src, bridge_norm): the bridge's saved input (also its recompute, with ckpt).
template <class T>
void bridge_norm_forward(BridgeActs<T>& br, const T* src, const Layout& lo, const T* P, int i,
                         int L) {
  const int S = lo.c.inner_dim(i - 1);
  br.bn.resize(size_t(L) * S);
  norm_forward(br.bn.data(), br.brstd, src, at(P, lo.layers[size_t(i)].bridge_norm), L, S, lo.c.norm_eps);
}

// Mixer of true-hybrid layer i on la.u (docs/TRUE_HYBRID.md, one sequence from position 0):
// router, routes, the Mamba path over M's tokens, the attention path over A's tokens reading the
// Mamba output carried forward (exchange), fused into out [L, D]. A path without tokens does not
// run, and in hard mode neither path touches the tokens it was not chosen for.
template <class T>
void true_mixer_forward(LayerActs<T>& la, T* out, const Layout& lo, const T* P, int i, int L,
                        int scan_chunk) {
  const ModelConfig& c = lo.c;
  const int D = c.d_model;
  const LayerOffsets& o = lo.layers[size_t(i)];
  TrueActs<T>& tr = la.tr;
  tr.feats.resize(size_t(L) * kRouterFeatures);
  tr.r.resize(size_t(L));
  std::vector<T> ema(size_t(D), T(0));  // whole sequences: the analyzer starts empty
  T chunk_logit = 0;
  th::router_forward(tr.r.data(), tr.feats.data(), ema.data(), chunk_logit, la.u.data(), L, D,
                     int64_t(0), at(P, o.router_w), at(P, o.router_feat), at(P, o.router_b),
                     c.routing_granularity == "chunk", c.routing_chunk);
  th::decide_routes(tr.rt, tr.r.data(), L, 0, th::mode_from_config(c), -1.0);
  const std::vector<int>& M = tr.rt.mamba_idx;
  const std::vector<int>& A = tr.rt.attn_idx;
  const int nm = int(M.size()), na = int(A.size());
  auto row = [D](auto* base, int t) { return base + int64_t(t) * D; };

  tr.um.resize(nm < L ? size_t(nm) * D : 0);  // soft and both: the path reads u itself
  tr.ym.resize(size_t(nm) * D);
  if (nm < L)
    for (int j = 0; j < nm; ++j) std::copy_n(row(la.u.data(), M[size_t(j)]), D, row(tr.um.data(), j));
  if (nm > 0 && c.is_mamba2(i))  // Falcon-H1's layer: a Mamba-2 path
    G::mamba2_block_forward(tr.ym.data(), la.mamba2, tr.mamba_in(la.u), mamba2_weights(P, o), mamba2_dims(c), nm);
  else if (nm > 0)
    G::mamba_block_forward(tr.ym.data(), la.mamba, tr.mamba_in(la.u), mamba_weights(P, o), mamba_dims(c), nm,
                        scan_chunk);
  // v = u + exchange * x, x the latest Mamba output at or before the token (none yet: 0, as the
  // sequence starts from zero state).
  const T* ex = at(P, o.exchange);
  tr.va.resize(size_t(na) * D);
  tr.ya.resize(size_t(na) * D);
  for (int k = 0; k < na; ++k) {
    const T* ut = row(la.u.data(), A[size_t(k)]);
    T* v = row(tr.va.data(), k);
    const int src = tr.rt.carry[size_t(k)];
    if (src < 0) {
      std::copy_n(ut, D, v);
    } else {
      const T* x = row(tr.ym.data(), src);
      for (int d = 0; d < D; ++d) v[d] = ut[d] + ex[d] * x[d];
    }
  }
  if (na > 0) {  // RoPE positions are ranks within A: the block sees A as its whole sequence
    const G::AttnWeights<T> aw{at(P, o.wq), at(P, o.wk), at(P, o.wv), at(P, o.wo)};
    G::attention_block_forward(tr.ya.data(), la.attn, tr.va.data(), aw, attn_shape(c, na));
  }
  // out_t = gm_t fuse_mamba * ym_t + ga_t fuse_attn * ya_t; a path that did not run adds nothing.
  const T *fm = at(P, o.fuse_mamba), *fa = at(P, o.fuse_attn);
  std::fill_n(out, size_t(L) * D, T(0));
  for (int j = 0; j < nm; ++j) {
    const T gm = tr.rt.gm[size_t(M[size_t(j)])];
    const T* y = row(tr.ym.data(), j);
    T* ot = row(out, M[size_t(j)]);
    for (int d = 0; d < D; ++d) ot[d] += gm * fm[d] * y[d];
  }
  for (int k = 0; k < na; ++k) {
    const T ga = tr.rt.ga[size_t(A[size_t(k)])];
    const T* y = row(tr.ya.data(), k);
    T* ot = row(out, A[size_t(k)]);
    for (int d = 0; d < D; ++d) ot[d] += ga * fa[d] * y[d];
  }
  G::acc_t<T> ps = 0;
  for (int t = 0; t < L; ++t) ps += tr.rt.p[size_t(t)];
  tr.pmean = ps / G::acc_t<T>(L);
}

// Gradient of true_mixer_forward: du [L, D] assigned, parameter gradients added into g. dout is
// dL/d out. budget_scale weighs this sequence's budget loss in the objective (cnt_b / total).
// Hard mode: the gates are the exact gradient of the hard forward wherever no r_t is 0; the path
// a token did not run gets nothing from it (docs/TRUE_HYBRID.md, "Training the router").
template <class T>
void true_mixer_backward(T* du, T* g, const T* dout, const LayerActs<T>& la, const Layout& lo,
                         const T* P, int i, int L, G::acc_t<T> budget_scale) {
  using Ac = G::acc_t<T>;
  const ModelConfig& c = lo.c;
  const int D = c.d_model;
  const LayerOffsets& o = lo.layers[size_t(i)];
  const TrueActs<T>& tr = la.tr;
  const th::Routing<T>& rt = tr.rt;
  const std::vector<int>& M = rt.mamba_idx;
  const std::vector<int>& A = rt.attn_idx;
  const int nm = int(M.size()), na = int(A.size());
  auto row = [D](auto* base, int t) { return base + int64_t(t) * D; };
  const T* none = nullptr;  // no bridge reads a true layer's inner outputs
  const T *fm = at(P, o.fuse_mamba), *fa = at(P, o.fuse_attn), *ex = at(P, o.exchange);
  std::vector<Ac> dfm(size_t(D), Ac(0)), dfa(size_t(D), Ac(0)), dex(size_t(D), Ac(0));
  std::vector<Ac> dp(size_t(L), Ac(0));  // dL/dp_t through the gates
  std::vector<T> dym(size_t(nm) * D), dya(size_t(na) * D), dv(size_t(na) * D),
      dum(size_t(nm) * D);
  std::fill_n(du, size_t(L) * D, T(0));

  // Fusion: the gates' gradients are dot products; gm = 1 - p, ga = p (soft; hard on the
  // tokens that ran the path; in "both" they are constants and dp is not used).
  for (int j = 0; j < nm; ++j) {
    const int t = M[size_t(j)];
    const T gm = rt.gm[size_t(t)];
    const T *y = row(tr.ym.data(), j), *go = row(dout, t);
    T* dy = row(dym.data(), j);
    Ac dg = 0;
    for (int d = 0; d < D; ++d) {
      dfm[size_t(d)] += Ac(gm) * y[d] * go[d];
      dg += Ac(fm[d]) * y[d] * go[d];
      dy[d] = gm * fm[d] * go[d];
    }
    dp[size_t(t)] -= dg;
  }
  for (int k = 0; k < na; ++k) {
    const int t = A[size_t(k)];
    const T ga = rt.ga[size_t(t)];
    const T *y = row(tr.ya.data(), k), *go = row(dout, t);
    T* dy = row(dya.data(), k);
    Ac dg = 0;
    for (int d = 0; d < D; ++d) {
      dfa[size_t(d)] += Ac(ga) * y[d] * go[d];
      dg += Ac(fa[d]) * y[d] * go[d];
      dy[d] = ga * fa[d] * go[d];
    }
    dp[size_t(t)] += dg;
  }
  // Attention path first: its input v = u + exchange * x sends gradient to the Mamba output x
  // was carried from, which the Mamba backward below then takes in.
  if (na > 0) {
    const G::AttnWeightGrads<T> ag{at(g, o.wq), at(g, o.wk), at(g, o.wv), at(g, o.wo)};
    const G::AttnWeights<T> aw{at(P, o.wq), at(P, o.wk), at(P, o.wv), at(P, o.wo)};
    G::attention_block_backward(dv.data(), ag, dya.data(), none, tr.va.data(), aw, la.attn, attn_shape(c, na));
    for (int k = 0; k < na; ++k) {
      const T* dvk = row(dv.data(), k);
      T* dut = row(du, A[size_t(k)]);
      for (int d = 0; d < D; ++d) dut[d] += dvk[d];
      const int src = rt.carry[size_t(k)];
      if (src < 0) continue;
      const T* x = row(tr.ym.data(), src);
      T* dx = row(dym.data(), src);
      for (int d = 0; d < D; ++d) {
        dex[size_t(d)] += Ac(dvk[d]) * x[d];
        dx[d] += ex[d] * dvk[d];
      }
    }
  }
  if (nm > 0) {
    if (c.is_mamba2(i))
      G::mamba2_block_backward(dum.data(), mamba2_grads(g, o), dym.data(), tr.mamba_in(la.u), mamba2_weights(P, o),
                               la.mamba2, mamba2_dims(c), none);
    else
      G::mamba_block_backward(dum.data(), mamba_grads(g, o), dym.data(), tr.mamba_in(la.u), mamba_weights(P, o),
                              la.mamba, mamba_dims(c), none);
    for (int j = 0; j < nm; ++j) {
      const T* s = row(dum.data(), j);
      T* dut = row(du, M[size_t(j)]);
      for (int d = 0; d < D; ++d) dut[d] += s[d];
    }
  }
  T *gfm = at(g, o.fuse_mamba), *gfa = at(g, o.fuse_attn), *gex = at(g, o.exchange);
  for (int d = 0; d < D; ++d) {
    gfm[d] += T(dfm[size_t(d)]);
    gfa[d] += T(dfa[size_t(d)]);
    gex[d] += T(dex[size_t(d)]);
  }
  if (th::mode_from_config(c) == th::Mode::Both) return;  // constant gates, no budget: no router
  // Budget loss scale * w * (mean_t p_t - budget)^2: d/dp_t = scale * w * 2 (mean - budget) / L.
  const Ac db = budget_scale * Ac(c.budget_loss_weight) * 2 *
                (tr.pmean - Ac(c.attention_budget)) / Ac(L);
  std::vector<T> dr(static_cast<size_t>(L));
  for (int t = 0; t < L; ++t) {
    const Ac p = rt.p[size_t(t)];
    dr[size_t(t)] = T((dp[size_t(t)] + db) * p * (1 - p));  // p = sigmoid(r)
  }
  th::router_backward(du, at(g, o.router_w), at(g, o.router_feat), at(g, o.router_b), dr.data(),
                      tr.feats.data(), la.u.data(), at(P, o.router_w), L, D,
                      c.routing_granularity == "chunk", c.routing_chunk);
}

// Layer i after its bridge: h (the stream entering the pre-norm) becomes the layer's output,
// saving activations into la. The only code that computes a layer, so a recompute is bit-identical.
template <class T>
void layer_forward(LayerActs<T>& la, std::vector<T>& h, std::vector<T>& out, const Layout& lo,
                   const T* P, int i, int L, int scan_chunk) {
  const ModelConfig& c = lo.c;
  const int D = c.d_model, F = c.d_ff;
  const double eps = c.norm_eps;
  const size_t LD = size_t(L) * D;
  const LayerOffsets& o = lo.layers[size_t(i)];
  out.resize(LD);
  la.h = h;
  la.u.resize(LD);
  norm_forward(la.u.data(), la.rstd, h.data(), at(P, o.norm), L, D, eps);
  const G::AttnWeights<T> aw{at(P, o.wq), at(P, o.wk), at(P, o.wv), at(P, o.wo)};
  if (c.is_true(i)) {
    true_mixer_forward(la, out.data(), lo, P, i, L, scan_chunk);
  } else if (c.is_attention(i)) {
    G::attention_block_forward(out.data(), la.attn, la.u.data(), aw, attn_shape(c, L));
  } else if (c.is_mamba2(i)) {
    G::mamba2_block_forward(out.data(), la.mamba2, la.u.data(), mamba2_weights(P, o), mamba2_dims(c), L);
  } else {
    G::mamba_block_forward(out.data(), la.mamba, la.u.data(), mamba_weights(P, o), mamba_dims(c), L, scan_chunk);
  }
  add_into(h, out);
  if (c.has_ffn(i)) {  // h += down(silu(gate(m)) * up(m)), m = rmsnorm(h, mlp_norm)
    la.h2 = h;
    la.m.resize(LD);
    norm_forward(la.m.data(), la.mrstd, h.data(), at(P, o.mlp_norm), L, D, eps);
    const G::MlpWeights<T> mw{at(P, o.w_gate), at(P, o.w_up), at(P, o.w_down)};
    G::mlp_block_forward(out.data(), la.mlp, la.m.data(), mw, L, D, F);
    add_into(h, out);
  }
}

// With ckpt one slot holds whichever layer runs. A Mamba layer's buffers are dead while an
// attention layer is held (and the other way round): release them rather than keep both
// mixers' high-water marks, which would cost the saving a third.
template <class T> void hold_only(LayerActs<T>& la, const ModelConfig& c, int i) {
  if (!c.has_mamba_path(i) || c.is_mamba2(i)) la.mamba = {};
  if (!c.is_mamba2(i)) la.mamba2 = {};
  if (!c.has_ffn(i)) la.mlp = {};
  if (!c.has_attention_path(i)) la.attn = {};
}

// Re-runs layer i's forward from its checkpoint into the held layer (ckpt only).
template <class T>
void recompute_layer(SeqActs<T>& a, const Layout& lo, const T* P, int i, int L, int scan_chunk) {
  a.rh = a.ckpt_h[size_t(i)];
  hold_only(a.layers[0], lo.c, i);
  layer_forward(a.layers[0], a.rh, a.rout, lo, P, i, L, scan_chunk);
}

// docs/MODEL.md's forward for one sequence, saving activations (all of them, or with ckpt each
// layer's input only); ends with a.hn = rmsnorm(h, norm_f).
template <class T>
void forward_seq(SeqActs<T>& a, const Layout& lo, const T* P, const int32_t* tok, int L,
                 int scan_chunk, bool ckpt) {
  const ModelConfig& c = lo.c;
  const int D = c.d_model;
  const size_t LD = size_t(L) * D;
  a.ckpt = ckpt;
  a.budget = 0;
  a.layers.resize(ckpt ? 1 : size_t(c.n_layers));
  if (ckpt) a.ckpt_h.resize(size_t(c.n_layers));
  std::vector<T> h(LD), out(LD);
  for (int t = 0; t < L; ++t) std::copy_n(P + lo.emb + int64_t(tok[t]) * D, D, h.begin() + ptrdiff_t(t) * D);
  for (int i = 0; i < c.n_layers; ++i) {
    const LayerOffsets& o = lo.layers[size_t(i)];
    if (c.has_bridge(i)) {  // h += gate * (rmsnorm(src) @ proj^T)
      const int S = c.inner_dim(i - 1);
      BridgeActs<T>& br = a.bridge(i);
      bridge_norm_forward(br, a.inner(c, i - 1), lo, P, i, L);
      G::bridge_forward(h.data(), h.data(), br.bn.data(), at(P, o.bridge_proj), at(P, o.bridge_gate), L, D, S);
    }
    // The last layer is never recomputed: its activations are still held when the backward starts.
    if (ckpt && i + 1 < c.n_layers) a.ckpt_h[size_t(i)] = h;
    if (ckpt) hold_only(a.layers[0], c, i);
    layer_forward(a.layer(i), h, out, lo, P, i, L, scan_chunk);
    if (c.is_true(i) && th::mode_from_config(c) != th::Mode::Both) {
      const G::acc_t<T> e = a.layer(i).tr.pmean - G::acc_t<T>(c.attention_budget);
      a.budget += G::acc_t<T>(c.budget_loss_weight) * e * e;
    }
  }
  a.hf = std::move(h);
  a.hn.resize(LD);
  norm_forward(a.hn.data(), a.rstd_f, a.hf.data(), P + lo.norm_f, L, D, c.norm_eps);
}

// Reverse of forward_seq from dhn = dloss/d rmsnorm(hf, norm_f); adds every parameter gradient
// except the head's (the cross-entropy adds that) into the arena g. With ckpt it re-runs each
// layer's forward (same code, same inputs: the same activations) just before it is needed.
// budget_scale: the weight of this sequence's budget loss in the objective (true layers).
template <class T>
void backward_seq(T* g, SeqActs<T>& a, const Layout& lo, const T* P, const T* dhn,
                  const int32_t* tok, int L, int scan_chunk, G::acc_t<T> budget_scale) {
  const ModelConfig& c = lo.c;
  const int D = c.d_model, F = c.d_ff;
  const size_t LD = size_t(L) * D;
  const double eps = c.norm_eps;
  std::vector<T> dh(LD), dtmp(LD), dx(LD), dy;  // dx: norm_backward's scratch
  std::vector<T> dinner;  // gradient into this layer's inner output from the next layer's bridge
  norm_backward(dh.data(), dx.data(), g + lo.norm_f, dhn, a.hf.data(), P + lo.norm_f, a.rstd_f, L, D, eps, false);
  // With ckpt the held layer is still the last one, from the forward: no recompute for it.
  for (int i = c.n_layers - 1; i >= 0; --i) {
    const LayerOffsets& o = lo.layers[size_t(i)];
    const LayerActs<T>& la = a.layer(i);
    if (c.has_ffn(i)) {  // h_out = h2 + mlp(rmsnorm(h2)): dh2 = dh + rmsnorm'(mlp'(dh))
      const G::MlpWeightGrads<T> mg{at(g, o.w_gate), at(g, o.w_up), at(g, o.w_down)};
      const G::MlpWeights<T> mw{at(P, o.w_gate), at(P, o.w_up), at(P, o.w_down)};
      G::mlp_block_backward(dtmp.data(), mg, dh.data(), la.m.data(), mw, la.mlp, L, D, F);
      norm_backward(dh.data(), dx.data(), at(g, o.mlp_norm), dtmp.data(), la.h2.data(), at(P, o.mlp_norm),
                    la.mrstd, L, D, eps, true);
    }
    // h2 = h + mixer(rmsnorm(h)); the mixer's inner output also feeds the next bridge (dinner).
    const T* dinn = dinner.empty() ? nullptr : dinner.data();
    if (c.is_true(i)) {  // never a bridge source (no bridge next to a true layer): no dinn
      true_mixer_backward(dtmp.data(), g, dh.data(), la, lo, P, i, L, budget_scale);
    } else if (c.is_attention(i)) {
      const G::AttnWeightGrads<T> ag{at(g, o.wq), at(g, o.wk), at(g, o.wv), at(g, o.wo)};
      const G::AttnWeights<T> aw{at(P, o.wq), at(P, o.wk), at(P, o.wv), at(P, o.wo)};
      G::attention_block_backward(dtmp.data(), ag, dh.data(), dinn, la.u.data(), aw, la.attn, attn_shape(c, L));
    } else if (c.is_mamba2(i)) {
      G::mamba2_block_backward(dtmp.data(), mamba2_grads(g, o), dh.data(), la.u.data(), mamba2_weights(P, o),
                               la.mamba2, mamba2_dims(c), dinn);
    } else {
      G::mamba_block_backward(dtmp.data(), mamba_grads(g, o), dh.data(), la.u.data(), mamba_weights(P, o), la.mamba,
                           mamba_dims(c), dinn);
    }
    norm_backward(dh.data(), dx.data(), at(g, o.norm), dtmp.data(), la.h.data(), at(P, o.norm), la.rstd, L, D,
                  eps, true);
    // Layer i is done with its activations (la is not used below): the held slot can take
    // layer i-1, whose inner output the bridge below needs.
    if (a.ckpt && i > 0) recompute_layer(a, lo, P, i - 1, L, scan_chunk);
    if (c.has_bridge(i)) {  // h = h_in + gate * (rmsnorm(src) proj^T): dh passes through as is
      const int S = c.inner_dim(i - 1);
      BridgeActs<T>& br = a.bridge(i);
      if (a.ckpt) bridge_norm_forward(br, a.inner(c, i - 1), lo, P, i, L);
      dy.resize(size_t(L) * S);
      dinner.resize(size_t(L) * S);
      G::bridge_backward<T>(nullptr, dy.data(), at(g, o.bridge_proj), at(g, o.bridge_gate), dh.data(), br.bn.data(),
                            at(P, o.bridge_proj), at(P, o.bridge_gate), L, D, S);
      norm_backward(dinner.data(), dx.data(), at(g, o.bridge_norm), dy.data(), a.inner(c, i - 1),
                    at(P, o.bridge_norm), br.brstd, L, S, eps, false);
    } else {
      dinner.clear();
    }
  }
  G::embedding_backward(g + lo.emb, dh.data(), tok, L, D);
}

// Sum over the counted positions of -log softmax(hn W^T)[target], in acc_t<T> (long double for
// long double, so finite differences of it are not limited by double rounding).
template <class T>
G::acc_t<T> cross_entropy_sum(const T* hn, const T* W, const int32_t* tgt, int L, int D, int V) {
  using A = G::acc_t<T>;
  std::vector<A> z(static_cast<size_t>(V));
  A sum = 0;
  for (int t = 0; t < L; ++t) {
    if (tgt[t] < 0) continue;
    A mx = -std::numeric_limits<A>::infinity();
    for (int v = 0; v < V; ++v) {
      A acc = 0;
      for (int j = 0; j < D; ++j) acc += A(hn[size_t(t) * D + j]) * W[size_t(v) * D + j];
      z[size_t(v)] = acc;
      mx = std::max(mx, acc);
    }
    A se = 0;
    for (int v = 0; v < V; ++v) se += std::exp(z[size_t(v)] - mx);
    sum += mx + std::log(se) - z[size_t(tgt[t])];
  }
  return sum;
}

int count_targets(const int32_t* tgt, int n) {
  int k = 0;
  for (int i = 0; i < n; ++i) k += tgt[i] >= 0;
  return k;
}

}  // namespace

int64_t check_train_batch(const ModelConfig& c, const int32_t* tokens, const int32_t* targets, int B, int L,
                          int scan_chunk) {
  HM_CHECK(B > 0 && L > 0, "loss: batch must be at least 1 x 1, got ", B, " x ", L);
  HM_CHECK(scan_chunk >= 0, "loss: scan_chunk must be >= 0, got ", scan_chunk);
  const std::string no = training_unsupported(c);
  HM_CHECK(no.empty(), "loss: the model has no backward pass yet: ", no, "; it runs for inference only "
           "(generate, eval --weights, bench)");
  const int V = c.vocab_size;
  int64_t count = 0;
  for (int64_t i = 0; i < int64_t(B) * L; ++i) {
    HM_CHECK(tokens[i] >= 0 && tokens[i] < V, "loss: token id ", tokens[i], " at [", i / L, ", ",
             i % L, "] is outside the vocabulary [0, ", V, ")");
    HM_CHECK(targets[i] >= -1 && targets[i] < V, "loss: target ", targets[i], " at [", i / L,
             ", ", i % L, "] is outside [-1, ", V, ")");
    count += targets[i] >= 0;
  }
  return count;
}

namespace {

int threads_for(int B) { return std::max(1, std::min(omp_get_max_threads(), B)); }

template <class T> std::vector<T> arena_copy(const Params& p, const Layout& lo) {
  std::vector<T> a(size_t(lo.numel), T(0));
  for (const auto& [off, n] : lo.tensors)
    for (int64_t k = 0; k < n; ++k) a[size_t(off + k)] = T(p.data()[off + k]);
  return a;
}

}  // namespace

namespace {

// Inside a parallel region: adds every other thread's private gradient arena into grads, in
// thread order (deterministic for a given thread count), each thread a share of the tensors.
template <class T, class A>
void add_private_arenas(T* grads, const std::vector<std::vector<T>>& priv, const Layout& lo) {
#pragma omp for schedule(static)
  for (size_t k = 0; k < lo.tensors.size(); ++k) {
    const auto [off, n] = lo.tensors[k];
    for (int64_t j = off; j < off + n; ++j) {
      A s = 0;
      for (size_t t = 1; t < priv.size(); ++t) s += priv[t][size_t(j)];
      grads[j] += T(s);
    }
  }
}

// loss_only's result from its per-sequence parts (sequences in order).
long double finish_loss_only(LossAux* aux, const std::vector<long double>& seq_loss,
                             const std::vector<long double>& seq_budget,
                             const std::vector<std::vector<double>>& seq_logits, int64_t total) {
  if (aux) {
    for (long double v : seq_budget) aux->budget_loss += v;
    for (const auto& v : seq_logits) aux->logits.insert(aux->logits.end(), v.begin(), v.end());
  }
  long double sum = 0;
  for (long double l : seq_loss) sum += l;
  return sum / (long double)(total);
}

// float: every sequence of the batch through BatchGrad (batch_grad.h) on train_backend(), one
// sequence at a time per OpenMP thread: the one layer code of every backend. Thread 0 adds
// straight into grads; each other thread into a private arena summed into grads at the end in
// thread order (deterministic for a given thread count).
double batched_loss_and_grad(const Params& layout, const float* params, float* grads, const int32_t* tokens,
                             const int32_t* targets, int B, int L, int scan_chunk, bool grad_ckpt,
                             double* aux_loss, int64_t whole = 0) {
  const Layout lo(layout);
  int64_t total = check_train_batch(lo.c, tokens, targets, B, L, scan_chunk);
  if (aux_loss) *aux_loss = 0;
  if (total == 0) return 0.0;
  if (whole > 0) {  // a part of a larger batch (model_grad.h)
    HM_CHECK(whole >= total, "loss_and_grad: the whole batch's ", whole, " counted positions are fewer than this "
             "part's ", total);
    total = whole;
  }
  const int nt = threads_for(B);
  std::vector<std::vector<float>> priv(static_cast<size_t>(nt));
  std::vector<double> seq_loss(size_t(B), 0.0), seq_budget(size_t(B), 0.0);
  std::atomic<int64_t> act_bytes{0};  // every thread's activations are alive at once
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    if (tid > 0) priv[size_t(tid)].assign(size_t(lo.numel), 0.0f);
    float* const g = tid == 0 ? grads : priv[size_t(tid)].data();
    BatchGrad bg(train_backend(), layout, DType::F32, grad_ckpt, scan_chunk);
    bg.set_weights(params);
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {
      const int32_t* tok = tokens + int64_t(b) * L;
      const int32_t* tgt = targets + int64_t(b) * L;
      const int cnt = count_targets(tgt, L);
      if (cnt == 0) continue;  // contributes neither loss nor gradient
      // This sequence's share of the batch mean: its gradient weighed cnt / total.
      const double share = double(cnt) / double(total);
      seq_loss[size_t(b)] = bg.loss_and_grad(g, tok, tgt, 1, L, share) * cnt;
      seq_budget[size_t(b)] = share * bg.budget_loss();
    }
    act_bytes += int64_t(bg.activation_bytes());
    if (nt > 1) add_private_arenas<float, double>(grads, priv, lo);
  }
  int64_t prev = g_act_peak.load();
  while (prev < act_bytes && !g_act_peak.compare_exchange_weak(prev, act_bytes)) {
  }
  double sum = 0, budget = 0;
  for (size_t b = 0; b < seq_loss.size(); ++b) {
    sum += seq_loss[b];
    budget += seq_budget[b];
  }
  if (aux_loss) *aux_loss = budget;
  return sum / double(total);
}

long double batched_loss_only(const Params& layout, const float* params, const int32_t* tokens,
                              const int32_t* targets, int B, int L, LossAux* aux) {
  const Layout lo(layout);
  const int64_t total = check_train_batch(lo.c, tokens, targets, B, L, 0);
  if (aux) {
    aux->budget_loss = 0;
    aux->logits.clear();
  }
  if (total == 0) return 0.0L;
  std::vector<long double> seq_loss(size_t(B), 0.0L), seq_budget(size_t(B), 0.0L);
  const bool want_logits = aux && aux->want_logits;
  std::vector<std::vector<double>> seq_logits(want_logits ? size_t(B) : 0);
#pragma omp parallel num_threads(threads_for(B))
  {
    BatchGrad bg(train_backend(), layout, DType::F32);
    bg.set_weights(params);
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {
      const int32_t* tgt = targets + int64_t(b) * L;
      int64_t cnt = 0;
      const double s = bg.loss_sum(tokens + int64_t(b) * L, tgt, 1, L, &cnt);
      if (cnt == 0) continue;
      seq_loss[size_t(b)] = s;
      seq_budget[size_t(b)] = (long double)(cnt) / (long double)(total) * bg.budget_loss();
      if (want_logits) seq_logits[size_t(b)] = bg.route_logits();
    }
  }
  return finish_loss_only(aux, seq_loss, seq_budget, seq_logits, total);
}

}  // namespace

Backend& train_backend() {
  Backend* be = g_train_backend.load();
  return be ? *be : cpu_train_backend();
}
void set_train_backend(Backend* be) { g_train_backend = be; }

namespace {

// What the double reference model does not have, each refused by name: those layers train through
// BatchGrad alone (their ops checked one by one: the rmsnorm backward's tests for the dt/B/C norms).
void check_reference_layers(const ModelConfig& c) {
  HM_CHECK(!c.mamba_bcdt_norm, "loss: the double-precision reference model has no dt/B/C norms in its Mamba "
           "mixers (float training runs them: loss_and_grad)");
  HM_CHECK(c.moe_layers.empty(), "loss: the double-precision reference model has no mixture-of-experts layers "
           "(float training runs them: loss_and_grad)");
  HM_CHECK(!c.mamba_proj_bias, "loss: the double-precision reference model has no in_proj / out_proj biases "
           "(float training runs them: loss_and_grad)");
  HM_CHECK(c.mlp_act == "swiglu", "loss: the double-precision reference model has no squared-ReLU MLPs (float "
           "training runs them: loss_and_grad)");
  HM_CHECK(c.embedding_multiplier == 1.0f && c.residual_multiplier == 1.0f && c.attention_scale == 0.0f &&
               c.logits_scaling == 1.0f,
           "loss: the double-precision reference model has no embedding, residual, attention or logits "
           "multipliers (float training runs them: loss_and_grad)");
}

// The reference model's loss and gradients (double, long double): one sequence per OpenMP thread.
template <class T>
double reference_loss_and_grad(const Params& layout, const T* params, T* grads, const int32_t* tokens,
                               const int32_t* targets, int B, int L, int scan_chunk, bool grad_ckpt,
                               double* aux_loss) {
  const Layout lo(layout);
  const ModelConfig& c = lo.c;
  const int64_t total = check_train_batch(c, tokens, targets, B, L, scan_chunk);
  check_reference_layers(c);
  if (total == 0) return 0.0;
  const int D = c.d_model, V = c.vocab_size, nt = threads_for(B);
  // Thread 0 adds straight into grads; each other thread into a private arena summed into
  // grads at the end in thread order (deterministic for a given thread count). One arena fewer
  // than one per thread: with 2 threads that is half the gradient memory a step needs.
  std::vector<std::vector<T>> priv(static_cast<size_t>(nt));
  std::vector<double> seq_loss(size_t(B), 0.0);
  std::vector<G::acc_t<T>> seq_budget(size_t(B), 0);  // cnt_b / total * budget_b
  std::atomic<int64_t> act_bytes{0};  // every thread's activations are alive at once
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    if (tid > 0) priv[size_t(tid)].assign(size_t(lo.numel), T(0));
    T* const g = tid == 0 ? grads : priv[size_t(tid)].data();
    // The reference head needs a whole [V, D] buffer per thread.
    std::vector<T> dhn(size_t(L) * D), dW(size_t(V) * D);
    SeqActs<T> a;
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {
      const int32_t* tok = tokens + int64_t(b) * L;
      const int32_t* tgt = targets + int64_t(b) * L;
      const int cnt = count_targets(tgt, L);
      if (cnt == 0) continue;  // contributes neither loss nor gradient
      forward_seq(a, lo, params, tok, L, scan_chunk, grad_ckpt);
      // The budget loss is weighted like this sequence's cross-entropy (header: cnt / total).
      const G::acc_t<T> share = G::acc_t<T>(cnt) / G::acc_t<T>(total);
      seq_budget[size_t(b)] = share * a.budget;
      // The reference cross-entropy is the mean over this sequence's cnt positions; the batch
      // loss is the mean over all `total`, so this sequence's gradients are scaled by cnt/total.
      std::fill(dW.begin(), dW.end(), T(0));
      const T mean = G::cross_entropy_forward_backward(dhn.data(), dW.data(), a.hn.data(),
                                                       params + lo.head, tgt, L, D, V);
      seq_loss[size_t(b)] = double(mean) * cnt;
      for (T& v : dhn) v = T(v * share);
      T* gh = g + lo.head;  // the embedding's own gradient too when tied
      for (size_t k = 0; k < dW.size(); ++k) gh[k] += T(dW[k] * share);
      backward_seq(g, a, lo, params, dhn.data(), tok, L, scan_chunk, share);
    }
    act_bytes += a.bytes();
    if (nt > 1) add_private_arenas<T, G::acc_t<T>>(grads, priv, lo);
  }
  int64_t prev = g_act_peak.load();
  while (prev < act_bytes && !g_act_peak.compare_exchange_weak(prev, act_bytes)) {
  }
  if (aux_loss) {
    G::acc_t<T> s = 0;
    for (const auto& v : seq_budget) s += v;
    *aux_loss = double(s);
  }
  double sum = 0;
  for (double l : seq_loss) sum += l;
  return sum / double(total);
}

template <class T>
long double reference_loss_only(const Params& layout, const T* params, const int32_t* tokens,
                                const int32_t* targets, int B, int L, LossAux* aux) {
  const Layout lo(layout);
  const ModelConfig& c = lo.c;
  const int64_t total = check_train_batch(c, tokens, targets, B, L, 0);
  check_reference_layers(c);
  if (aux) {
    aux->budget_loss = 0;
    aux->logits.clear();
  }
  if (total == 0) return 0.0L;
  std::vector<long double> seq_loss(size_t(B), 0.0L), seq_budget(size_t(B), 0.0L);
  const bool want_logits = aux && aux->want_logits;
  std::vector<std::vector<double>> seq_logits(want_logits ? size_t(B) : 0);
#pragma omp parallel num_threads(threads_for(B))
  {
    SeqActs<T> a;
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {
      const int32_t* tgt = targets + int64_t(b) * L;
      const int cnt = count_targets(tgt, L);
      if (cnt == 0) continue;
      forward_seq(a, lo, params, tokens + int64_t(b) * L, L, 0, false);
      seq_loss[size_t(b)] =
          cross_entropy_sum(a.hn.data(), params + lo.head, tgt, L, c.d_model, c.vocab_size);
      seq_budget[size_t(b)] = (long double)(cnt) / (long double)(total) * a.budget;
      if (want_logits)
        for (int i = 0; i < c.n_layers; ++i)
          if (c.is_true(i))
            for (T r : a.layer(i).tr.r) seq_logits[size_t(b)].push_back(double(r));
    }
  }
  return finish_loss_only(aux, seq_loss, seq_budget, seq_logits, total);
}

}  // namespace

template <class T>
double loss_and_grad_arena(const Params& layout, const T* params, T* grads, const int32_t* tokens,
                           const int32_t* targets, int B, int L, int scan_chunk, bool grad_ckpt,
                           double* aux_loss) {
  if constexpr (kFast<T>)
    return batched_loss_and_grad(layout, params, grads, tokens, targets, B, L, scan_chunk, grad_ckpt, aux_loss);
  else
    return reference_loss_and_grad<T>(layout, params, grads, tokens, targets, B, L, scan_chunk, grad_ckpt, aux_loss);
}

template <class T>
long double loss_only_arena(const Params& layout, const T* params, const int32_t* tokens,
                            const int32_t* targets, int B, int L, LossAux* aux) {
  if constexpr (kFast<T>)
    return batched_loss_only(layout, params, tokens, targets, B, L, aux);
  else
    return reference_loss_only<T>(layout, params, tokens, targets, B, L, aux);
}

template double loss_and_grad_arena<float>(const Params&, const float*, float*, const int32_t*,
                                           const int32_t*, int, int, int, bool, double*);
template double loss_and_grad_arena<double>(const Params&, const double*, double*, const int32_t*,
                                            const int32_t*, int, int, int, bool, double*);
template long double loss_only_arena<float>(const Params&, const float*, const int32_t*,
                                            const int32_t*, int, int, LossAux*);
template long double loss_only_arena<double>(const Params&, const double*, const int32_t*,
                                             const int32_t*, int, int, LossAux*);
template long double loss_only_arena<long double>(const Params&, const long double*,
                                                  const int32_t*, const int32_t*, int, int,
                                                  LossAux*);

double loss_and_grad(const Params& params, Params& grads, const int32_t* tokens,
                     const int32_t* targets, int B, int L, int scan_chunk, bool grad_ckpt,
                     double* aux_loss, int64_t total) {
  HM_CHECK(grads.numel() == params.numel(), "loss_and_grad: grads has another layout");
  return batched_loss_and_grad(params, params.data(), grads.data(), tokens, targets, B, L, scan_chunk, grad_ckpt,
                               aux_loss, total);
}

double loss_and_grad_f64(const Params& params, Params& grads, const int32_t* tokens,
                         const int32_t* targets, int B, int L, int scan_chunk, bool grad_ckpt,
                         double* aux_loss) {
  HM_CHECK(grads.numel() == params.numel(), "loss_and_grad_f64: grads has another layout");
  const Layout lo(params);
  const std::vector<double> p = arena_copy<double>(params, lo);
  std::vector<double> g(p.size(), 0.0);
  const double loss =
      loss_and_grad_arena<double>(params, p.data(), g.data(), tokens, targets, B, L, scan_chunk,
                                  grad_ckpt, aux_loss);
  for (const auto& [off, n] : lo.tensors)
    for (int64_t k = off; k < off + n; ++k) grads.data()[k] += float(g[size_t(k)]);
  return loss;
}

int64_t grad_activation_peak_bytes() { return g_act_peak.load(); }
void reset_grad_activation_peak_bytes() { g_act_peak = 0; }

double loss_only(const Params& params, const int32_t* tokens, const int32_t* targets, int B, int L,
                 double* aux_loss) {
  LossAux aux;
  const long double ce = loss_only_arena<float>(params, params.data(), tokens, targets, B, L, &aux);
  if (aux_loss) *aux_loss = double(aux.budget_loss);
  return double(ce);
}

}  // namespace hm
