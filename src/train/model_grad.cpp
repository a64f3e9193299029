#include "train/model_grad.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/grad_cpu.h"
#include "kernels/ref/attention_grad_ref.h"
#include "kernels/ref/mamba_grad_ref.h"

namespace hm {
namespace {

namespace G = ref::grad;
namespace C = cpu::grad;

// float takes the fast blocks (sgemm, kernels/cpu/grad_cpu.h); double and long double stay the
// plain reference, the oracle the float path is checked against.
template <class T> constexpr bool kFast = std::is_same_v<T, float>;

constexpr int64_t kNone = -1;

// Where each tensor sits in the arena, as element offsets, so float, double and long double
// copies of the parameters (and gradient buffers) share Params' layout.
struct LayerOffsets {
  int64_t norm, in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A_log, Dskip, out_proj;
  int64_t wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down, bridge_norm, bridge_proj, bridge_gate;
};

struct Layout {
  ModelConfig c;
  int64_t numel = 0, emb = 0, norm_f = 0, head = 0;  // head == emb when tied
  std::vector<LayerOffsets> layers;
  std::vector<std::pair<int64_t, int64_t>> tensors;  // (offset, numel); the padding between is skipped

  explicit Layout(const Params& p) : c(p.config()), numel(p.numel()) {
    const float* base = p.data();
    auto off = [&](const float* q) { return q ? int64_t(q - base) : kNone; };
    emb = off(p.embeddings());
    norm_f = off(p.norm_f());
    head = off(p.lm_head());
    for (int i = 0; i < c.n_layers; ++i) {
      const LayerWeights& w = p.layer(i);
      layers.push_back({off(w.norm), off(w.in_proj), off(w.conv_w), off(w.conv_b), off(w.x_proj),
                        off(w.dt_w), off(w.dt_b), off(w.A_log), off(w.Dskip), off(w.out_proj),
                        off(w.wq), off(w.wk), off(w.wv), off(w.wo), off(w.mlp_norm),
                        off(w.w_gate), off(w.w_up), off(w.w_down), off(w.bridge_norm),
                        off(w.bridge_proj), off(w.bridge_gate)});
    }
    for (size_t k = 0; k < p.specs().size(); ++k)
      tensors.emplace_back(int64_t(p.at(k) - base), p.specs()[k].numel());
  }
};

template <class P> P* at(P* base, int64_t off) { return off == kNone ? nullptr : base + off; }

template <class T> G::MambaWeights<T> mamba_weights(const T* P, const LayerOffsets& o) {
  return {at(P, o.in_proj), at(P, o.conv_w), at(P, o.conv_b), at(P, o.x_proj), at(P, o.dt_w),
          at(P, o.dt_b),    at(P, o.A_log),  at(P, o.Dskip),  at(P, o.out_proj)};
}
template <class T> G::MambaGrads<T> mamba_grads(T* g, const LayerOffsets& o) {
  return {at(g, o.in_proj), at(g, o.conv_w), at(g, o.conv_b), at(g, o.x_proj), at(g, o.dt_w),
          at(g, o.dt_b),    at(g, o.A_log),  at(g, o.Dskip),  at(g, o.out_proj)};
}
G::MambaDims mamba_dims(const ModelConfig& c) {
  return {c.d_model, c.d_inner(), c.d_state, c.d_conv, c.resolved_dt_rank()};
}
G::AttnShape attn_shape(const ModelConfig& c, int L) {
  return {L, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim(), c.rope, double(c.rope_theta)};
}

// Bridge of layer i: rmsnorm(inner output of layer i-1) [L,S] and its rstd [L].
template <class T> struct BridgeActs {
  std::vector<T> bn, brstd;
};

// What one sequence's forward keeps for its backward, per layer.
template <class T> struct LayerActs {
  BridgeActs<T> br;
  std::vector<T> h, u, rstd;  // stream entering the pre-norm [L,D], the norm's output, rstd [L]
  G::MambaActs<T> mamba;
  G::AttnSaved<T> attn;
  std::vector<T> h2, m, mrstd;  // MLP: stream entering mlp_norm [L,D], its output, rstd [L]
  G::MlpSaved<T> mlp;
};

template <class V> int64_t vec_bytes(const V& v) {
  return int64_t(v.capacity() * sizeof(typename V::value_type));
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

  LayerActs<T>& layer(int i) { return layers[ckpt ? 0 : size_t(i)]; }
  const LayerActs<T>& layer(int i) const { return layers[ckpt ? 0 : size_t(i)]; }
  BridgeActs<T>& bridge(int i) { return ckpt ? br : layers[size_t(i)].br; }
  // Layer i's inner representation (y * silu(z) or the head contexts): the next bridge's source.
  // With ckpt, valid only while layer i is the one held.
  const T* inner(const ModelConfig& c, int i) const {
    return c.is_attention(i) ? layer(i).attn.inner.data() : layer(i).mamba.yg.data();
  }

  int64_t bytes() const {
    int64_t n = vec_bytes(br.bn) + vec_bytes(br.brstd) + vec_bytes(rh) + vec_bytes(rout) +
                vec_bytes(hf) + vec_bytes(hn) + vec_bytes(rstd_f);
    for (const auto& v : ckpt_h) n += vec_bytes(v);
    for (const LayerActs<T>& la : layers) {
      const auto& M = la.mamba;
      const auto& A = la.attn;
      n += vec_bytes(la.br.bn) + vec_bytes(la.br.brstd) + vec_bytes(la.h) + vec_bytes(la.u) +
           vec_bytes(la.rstd) + vec_bytes(la.h2) + vec_bytes(la.m) + vec_bytes(la.mrstd) +
           vec_bytes(la.mlp.g) + vec_bytes(la.mlp.u) + vec_bytes(la.mlp.a) + vec_bytes(M.x) +
           vec_bytes(M.z) + vec_bytes(M.xc) + vec_bytes(M.dt_r) + vec_bytes(M.B) +
           vec_bytes(M.C) + vec_bytes(M.dt) + vec_bytes(M.A) + vec_bytes(M.yg) +
           vec_bytes(M.scan_states) + vec_bytes(A.q) + vec_bytes(A.k) + vec_bytes(A.v) +
           vec_bytes(A.lse) + vec_bytes(A.inner);
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
  br.brstd.resize(size_t(L));
  G::rmsnorm_forward(br.bn.data(), br.brstd.data(), src, at(P, lo.layers[size_t(i)].bridge_norm),
                     L, S, lo.c.norm_eps);
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
  la.rstd.resize(size_t(L));
  G::rmsnorm_forward(la.u.data(), la.rstd.data(), h.data(), at(P, o.norm), L, D, eps);
  const G::AttnWeights<T> aw{at(P, o.wq), at(P, o.wk), at(P, o.wv), at(P, o.wo)};
  if (c.is_attention(i)) {
    if constexpr (kFast<T>)
      C::attention_block_forward(out.data(), la.attn, la.u.data(), aw, attn_shape(c, L));
    else
      G::attention_block_forward(out.data(), la.attn, la.u.data(), aw, attn_shape(c, L));
  } else {
    if constexpr (kFast<T>)
      C::mamba_block_forward(out.data(), la.mamba, la.u.data(), mamba_weights(P, o),
                             mamba_dims(c), L, scan_chunk);
    else
      G::mamba_block_forward(out.data(), la.mamba, la.u.data(), mamba_weights(P, o),
                             mamba_dims(c), L, scan_chunk);
  }
  add_into(h, out);
  if (F > 0) {  // h += down(silu(gate(m)) * up(m)), m = rmsnorm(h, mlp_norm)
    la.h2 = h;
    la.m.resize(LD);
    la.mrstd.resize(size_t(L));
    G::rmsnorm_forward(la.m.data(), la.mrstd.data(), h.data(), at(P, o.mlp_norm), L, D, eps);
    const G::MlpWeights<T> mw{at(P, o.w_gate), at(P, o.w_up), at(P, o.w_down)};
    if constexpr (kFast<T>)
      C::mlp_block_forward(out.data(), la.mlp, la.m.data(), mw, L, D, F);
    else
      G::mlp_block_forward(out.data(), la.mlp, la.m.data(), mw, L, D, F);
    add_into(h, out);
  }
}

// With ckpt one slot holds whichever layer runs. A Mamba layer's buffers are dead while an
// attention layer is held (and the other way round): release them rather than keep both
// mixers' high-water marks, which would cost the saving a third.
template <class T> void hold_only(LayerActs<T>& la, const ModelConfig& c, int i) {
  if (!c.has_mamba_path(i)) la.mamba = {};
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
  a.layers.resize(ckpt ? 1 : size_t(c.n_layers));
  if (ckpt) a.ckpt_h.resize(size_t(c.n_layers));
  std::vector<T> h(LD), out(LD);
  for (int t = 0; t < L; ++t)
    std::copy_n(P + lo.emb + int64_t(tok[t]) * D, D, h.begin() + ptrdiff_t(t) * D);
  for (int i = 0; i < c.n_layers; ++i) {
    const LayerOffsets& o = lo.layers[size_t(i)];
    if (c.has_bridge(i)) {  // h += gate * (rmsnorm(src) @ proj^T)
      const int S = c.inner_dim(i - 1);
      BridgeActs<T>& br = a.bridge(i);
      bridge_norm_forward(br, a.inner(c, i - 1), lo, P, i, L);
      if constexpr (kFast<T>)
        C::bridge_forward(h.data(), h.data(), br.bn.data(), at(P, o.bridge_proj),
                          at(P, o.bridge_gate), L, D, S);
      else
        G::bridge_forward(h.data(), h.data(), br.bn.data(), at(P, o.bridge_proj),
                          at(P, o.bridge_gate), L, D, S);
    }
    // The last layer is never recomputed: its activations are still held when the backward starts.
    if (ckpt && i + 1 < c.n_layers) a.ckpt_h[size_t(i)] = h;
    if (ckpt) hold_only(a.layers[0], c, i);
    layer_forward(a.layer(i), h, out, lo, P, i, L, scan_chunk);
  }
  a.hf = std::move(h);
  a.hn.resize(LD);
  a.rstd_f.resize(size_t(L));
  G::rmsnorm_forward(a.hn.data(), a.rstd_f.data(), a.hf.data(), P + lo.norm_f, L, D, c.norm_eps);
}

// Reverse of forward_seq from dhn = dloss/d rmsnorm(hf, norm_f); adds every parameter gradient
// except the head's (the cross-entropy adds that) into the arena g. With ckpt it re-runs each
// layer's forward (same code, same inputs: the same activations) just before it is needed.
template <class T>
void backward_seq(T* g, SeqActs<T>& a, const Layout& lo, const T* P, const T* dhn,
                  const int32_t* tok, int L, int scan_chunk) {
  const ModelConfig& c = lo.c;
  const int D = c.d_model, F = c.d_ff;
  const size_t LD = size_t(L) * D;
  std::vector<T> dh(LD), dtmp(LD), dx(LD), dy;
  std::vector<T> dinner;  // gradient into this layer's inner output from the next layer's bridge
  G::rmsnorm_backward(dh.data(), g + lo.norm_f, dhn, a.hf.data(), P + lo.norm_f, a.rstd_f.data(),
                      L, D);
  // With ckpt the held layer is still the last one, from the forward: no recompute for it.
  for (int i = c.n_layers - 1; i >= 0; --i) {
    const LayerOffsets& o = lo.layers[size_t(i)];
    const LayerActs<T>& la = a.layer(i);
    if (F > 0) {  // h_out = h2 + mlp(rmsnorm(h2)): dh2 = dh + rmsnorm'(mlp'(dh))
      const G::MlpWeightGrads<T> mg{at(g, o.w_gate), at(g, o.w_up), at(g, o.w_down)};
      const G::MlpWeights<T> mw{at(P, o.w_gate), at(P, o.w_up), at(P, o.w_down)};
      if constexpr (kFast<T>)
        C::mlp_block_backward(dtmp.data(), mg, dh.data(), la.m.data(), mw, la.mlp, L, D, F);
      else
        G::mlp_block_backward(dtmp.data(), mg, dh.data(), la.m.data(), mw, la.mlp, L, D, F);
      G::rmsnorm_backward(dx.data(), at(g, o.mlp_norm), dtmp.data(), la.h2.data(),
                          at(P, o.mlp_norm), la.mrstd.data(), L, D);
      add_into(dh, dx);
    }
    // h2 = h + mixer(rmsnorm(h)); the mixer's inner output also feeds the next bridge (dinner).
    const T* dinn = dinner.empty() ? nullptr : dinner.data();
    if (c.is_attention(i)) {
      const G::AttnWeightGrads<T> ag{at(g, o.wq), at(g, o.wk), at(g, o.wv), at(g, o.wo)};
      const G::AttnWeights<T> aw{at(P, o.wq), at(P, o.wk), at(P, o.wv), at(P, o.wo)};
      if constexpr (kFast<T>)
        C::attention_block_backward(dtmp.data(), ag, dh.data(), dinn, la.u.data(), aw, la.attn,
                                    attn_shape(c, L));
      else
        G::attention_block_backward(dtmp.data(), ag, dh.data(), dinn, la.u.data(), aw, la.attn,
                                    attn_shape(c, L));
    } else {
      if constexpr (kFast<T>)
        C::mamba_block_backward(dtmp.data(), mamba_grads(g, o), dh.data(), la.u.data(),
                                mamba_weights(P, o), la.mamba, mamba_dims(c), dinn);
      else
        G::mamba_block_backward(dtmp.data(), mamba_grads(g, o), dh.data(), la.u.data(),
                                mamba_weights(P, o), la.mamba, mamba_dims(c), dinn);
    }
    G::rmsnorm_backward(dx.data(), at(g, o.norm), dtmp.data(), la.h.data(), at(P, o.norm),
                        la.rstd.data(), L, D);
    add_into(dh, dx);
    // Layer i is done with its activations (la is not used below): the held slot can take
    // layer i-1, whose inner output the bridge below needs.
    if (a.ckpt && i > 0) recompute_layer(a, lo, P, i - 1, L, scan_chunk);
    if (c.has_bridge(i)) {  // h = h_in + gate * (rmsnorm(src) proj^T): dh passes through as is
      const int S = c.inner_dim(i - 1);
      BridgeActs<T>& br = a.bridge(i);
      if (a.ckpt) bridge_norm_forward(br, a.inner(c, i - 1), lo, P, i, L);
      dy.resize(size_t(L) * S);
      dinner.resize(size_t(L) * S);
      if constexpr (kFast<T>)
        C::bridge_backward(dy.data(), at(g, o.bridge_proj), at(g, o.bridge_gate), dh.data(),
                           br.bn.data(), at(P, o.bridge_proj), at(P, o.bridge_gate), L, D, S);
      else
        G::bridge_backward<T>(nullptr, dy.data(), at(g, o.bridge_proj), at(g, o.bridge_gate),
                              dh.data(), br.bn.data(), at(P, o.bridge_proj), at(P, o.bridge_gate),
                              L, D, S);
      G::rmsnorm_backward(dinner.data(), at(g, o.bridge_norm), dy.data(), a.inner(c, i - 1),
                          at(P, o.bridge_norm), br.brstd.data(), L, S);
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

// Validates the batch (before any parallel region: exceptions must not leave one); returns the
// number of counted positions.
int64_t check_batch(const ModelConfig& c, const int32_t* tokens, const int32_t* targets, int B,
                    int L, int scan_chunk) {
  HM_CHECK(B > 0 && L > 0, "loss: batch must be at least 1 x 1, got ", B, " x ", L);
  HM_CHECK(scan_chunk >= 0, "loss: scan_chunk must be >= 0, got ", scan_chunk);
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

int threads_for(int B) { return std::max(1, std::min(omp_get_max_threads(), B)); }

template <class T> std::vector<T> arena_copy(const Params& p, const Layout& lo) {
  std::vector<T> a(size_t(lo.numel), T(0));
  for (const auto& [off, n] : lo.tensors)
    for (int64_t k = 0; k < n; ++k) a[size_t(off + k)] = T(p.data()[off + k]);
  return a;
}

}  // namespace

template <class T>
double loss_and_grad_arena(const Params& layout, const T* params, T* grads, const int32_t* tokens,
                           const int32_t* targets, int B, int L, int scan_chunk, bool grad_ckpt) {
  const Layout lo(layout);
  const ModelConfig& c = lo.c;
  const int64_t total = check_batch(c, tokens, targets, B, L, scan_chunk);
  if (total == 0) return 0.0;
  const int D = c.d_model, V = c.vocab_size, nt = threads_for(B);
  // Thread 0 adds straight into grads; each other thread into a private arena summed into
  // grads at the end in thread order (deterministic for a given thread count). One arena fewer
  // than one per thread: with 2 threads that is half the gradient memory a step needs.
  std::vector<std::vector<T>> priv(static_cast<size_t>(nt));
  std::vector<double> seq_loss(size_t(B), 0.0);
  std::atomic<int64_t> act_bytes{0};  // every thread's activations are alive at once
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    if (tid > 0) priv[size_t(tid)].assign(size_t(lo.numel), T(0));
    T* const g = tid == 0 ? grads : priv[size_t(tid)].data();
    // The reference head needs a whole [V, D] buffer per thread; the fast one writes into g.
    std::vector<T> dhn(size_t(L) * D), dW(kFast<T> ? 0 : size_t(V) * D);
    SeqActs<T> a;
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {
      const int32_t* tok = tokens + int64_t(b) * L;
      const int32_t* tgt = targets + int64_t(b) * L;
      const int cnt = count_targets(tgt, L);
      if (cnt == 0) continue;  // contributes neither loss nor gradient
      forward_seq(a, lo, params, tok, L, scan_chunk, grad_ckpt);
      if constexpr (kFast<T>) {  // dlogits scaled by 1/total directly, dW added into g's head
        seq_loss[size_t(b)] =
            C::cross_entropy_forward_backward(dhn.data(), g + lo.head, a.hn.data(),
                                              params + lo.head, tgt, L, D, V, 1.0 / double(total));
        backward_seq(g, a, lo, params, dhn.data(), tok, L, scan_chunk);
        continue;
      }
      // The reference cross-entropy is the mean over this sequence's cnt positions; the batch
      // loss is the mean over all `total`, so this sequence's gradients are scaled by cnt/total.
      std::fill(dW.begin(), dW.end(), T(0));
      const T mean = G::cross_entropy_forward_backward(dhn.data(), dW.data(), a.hn.data(),
                                                       params + lo.head, tgt, L, D, V);
      seq_loss[size_t(b)] = double(mean) * cnt;
      const G::acc_t<T> share = G::acc_t<T>(cnt) / G::acc_t<T>(total);
      for (T& v : dhn) v = T(v * share);
      T* gh = g + lo.head;  // the embedding's own gradient too when tied
      for (size_t k = 0; k < dW.size(); ++k) gh[k] += T(dW[k] * share);
      backward_seq(g, a, lo, params, dhn.data(), tok, L, scan_chunk);
    }
    act_bytes += a.bytes();
    // Sum the other threads' buffers in thread order, each thread a share of the tensors.
    if (nt > 1)
#pragma omp for schedule(static)
    for (size_t k = 0; k < lo.tensors.size(); ++k) {
      const auto [off, n] = lo.tensors[k];
      for (int64_t j = off; j < off + n; ++j) {
        G::acc_t<T> s = 0;
        for (size_t t = 1; t < priv.size(); ++t) s += priv[t][size_t(j)];
        grads[j] += T(s);
      }
    }
  }
  int64_t prev = g_act_peak.load();
  while (prev < act_bytes && !g_act_peak.compare_exchange_weak(prev, act_bytes)) {
  }
  double sum = 0;
  for (double l : seq_loss) sum += l;
  return sum / double(total);
}

template <class T>
long double loss_only_arena(const Params& layout, const T* params, const int32_t* tokens,
                            const int32_t* targets, int B, int L) {
  const Layout lo(layout);
  const ModelConfig& c = lo.c;
  const int64_t total = check_batch(c, tokens, targets, B, L, 0);
  if (total == 0) return 0.0L;
  std::vector<long double> seq_loss(size_t(B), 0.0L);
#pragma omp parallel num_threads(threads_for(B))
  {
    SeqActs<T> a;
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {
      const int32_t* tgt = targets + int64_t(b) * L;
      if (count_targets(tgt, L) == 0) continue;
      forward_seq(a, lo, params, tokens + int64_t(b) * L, L, 0, false);
      seq_loss[size_t(b)] =
          cross_entropy_sum(a.hn.data(), params + lo.head, tgt, L, c.d_model, c.vocab_size);
    }
  }
  long double sum = 0;
  for (long double l : seq_loss) sum += l;
  return sum / (long double)(total);
}

template double loss_and_grad_arena<float>(const Params&, const float*, float*, const int32_t*,
                                           const int32_t*, int, int, int, bool);
template double loss_and_grad_arena<double>(const Params&, const double*, double*, const int32_t*,
                                            const int32_t*, int, int, int, bool);
template long double loss_only_arena<float>(const Params&, const float*, const int32_t*,
                                            const int32_t*, int, int);
template long double loss_only_arena<double>(const Params&, const double*, const int32_t*,
                                             const int32_t*, int, int);
template long double loss_only_arena<long double>(const Params&, const long double*,
                                                  const int32_t*, const int32_t*, int, int);

double loss_and_grad(const Params& params, Params& grads, const int32_t* tokens,
                     const int32_t* targets, int B, int L, int scan_chunk, bool grad_ckpt) {
  HM_CHECK(grads.numel() == params.numel(), "loss_and_grad: grads has another layout");
  return loss_and_grad_arena<float>(params, params.data(), grads.data(), tokens, targets, B, L,
                                    scan_chunk, grad_ckpt);
}

double loss_and_grad_f64(const Params& params, Params& grads, const int32_t* tokens,
                         const int32_t* targets, int B, int L, int scan_chunk, bool grad_ckpt) {
  HM_CHECK(grads.numel() == params.numel(), "loss_and_grad_f64: grads has another layout");
  const Layout lo(params);
  const std::vector<double> p = arena_copy<double>(params, lo);
  std::vector<double> g(p.size(), 0.0);
  const double loss =
      loss_and_grad_arena<double>(params, p.data(), g.data(), tokens, targets, B, L, scan_chunk,
                                  grad_ckpt);
  for (const auto& [off, n] : lo.tensors)
    for (int64_t k = off; k < off + n; ++k) grads.data()[k] += float(g[size_t(k)]);
  return loss;
}

int64_t grad_activation_peak_bytes() { return g_act_peak.load(); }
void reset_grad_activation_peak_bytes() { g_act_peak = 0; }

double loss_only(const Params& params, const int32_t* tokens, const int32_t* targets, int B, int L) {
  return double(loss_only_arena<float>(params, params.data(), tokens, targets, B, L));
}

}  // namespace hm
