// Reference forward + backward passes for the attention path and the model's per-token pieces
// (SwiGLU MLP, state bridges, embedding, tied LM head with cross-entropy), for one sequence.
// Plain loops that read like docs/MODEL.md, forward and backward side by side; they are the
// oracle that fast training kernels are checked against (tests/test_grad_attention.cpp checks
// them against central finite differences in double).
//
// Conventions (as kernels/ops.h): row-major, token-major, contiguous; a Linear weight is
// [out, in]. Templates on T (float or double); long sums accumulate in double.
// Gradient rule: parameter gradients accumulate (+=), activation gradients are assigned (=),
// so one buffer per parameter can sum over sequences and layers while activation gradients
// need no zeroing.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/error.h"

namespace hm::ref::grad {

namespace detail {
// Names carry an attn_ prefix: other grad headers share this namespace.

// y[m,n] = x[m,k] . W[n,k]^T
template <class T>
void attn_xwT(T* y, const T* x, const T* W, int m, int n, int k) {
  for (int i = 0; i < m; ++i) {
    const T* xi = x + std::size_t(i) * k;
    for (int o = 0; o < n; ++o) {
      const T* wo = W + std::size_t(o) * k;
      double acc = 0;
      for (int c = 0; c < k; ++c) acc += double(xi[c]) * wo[c];
      y[std::size_t(i) * n + o] = T(acc);
    }
  }
}

// dx[m,k] (= or +=) dy[m,n] . W[n,k]          (backward of y = x W^T with respect to x)
template <class T>
void attn_dyW(T* dx, const T* dy, const T* W, int m, int n, int k, bool accumulate) {
  for (int i = 0; i < m; ++i) {
    const T* dyi = dy + std::size_t(i) * n;
    T* dxi = dx + std::size_t(i) * k;
    for (int c = 0; c < k; ++c) {
      double acc = accumulate ? double(dxi[c]) : 0.0;
      for (int o = 0; o < n; ++o) acc += double(dyi[o]) * W[std::size_t(o) * k + c];
      dxi[c] = T(acc);
    }
  }
}

// dW[n,k] += dy[m,n]^T . x[m,k]                (backward of y = x W^T with respect to W)
template <class T>
void attn_dyTx(T* dW, const T* dy, const T* x, int m, int n, int k) {
  for (int o = 0; o < n; ++o)
    for (int c = 0; c < k; ++c) {
      double acc = 0;  // the sum over tokens in double, then one add into the accumulator
      for (int i = 0; i < m; ++i)
        acc += double(dy[std::size_t(i) * n + o]) * x[std::size_t(i) * k + c];
      dW[std::size_t(o) * k + c] += T(acc);
    }
}

inline double attn_sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// RoPE, "rotate half": per head, pairs (i, i+half) rotate by angle = pos * theta^(-2i/rd), over
// the first rd channels of each head (rd = hd, or a partial rotary's rope_dim; the rest pass).
// x [L, heads, hd] at positions pos0 .. pos0+L-1.

template <class T>
void rope_forward(T* x, int L, int heads, int hd, int pos0, double theta, int rd = 0) {
  if (rd == 0) rd = hd;
  HM_ASSERT(rd % 2 == 0 && rd <= hd);
  const int half = rd / 2;
  for (int t = 0; t < L; ++t)
    for (int h = 0; h < heads; ++h) {
      T* v = x + (std::size_t(t) * heads + h) * hd;
      for (int i = 0; i < half; ++i) {
        const double ang = double(pos0 + t) * std::pow(theta, -2.0 * i / rd);
        const double c = std::cos(ang), s = std::sin(ang);
        const double a = v[i], b = v[i + half];
        v[i] = T(a * c - b * s);         // out_a = a cos - b sin
        v[i + half] = T(b * c + a * s);  // out_b = b cos + a sin
      }
    }
}

// dx = R^T dout: a rotation's transpose is the rotation by -angle. In place on dx.
template <class T>
void rope_backward(T* dx, int L, int heads, int hd, int pos0, double theta, int rd = 0) {
  if (rd == 0) rd = hd;
  HM_ASSERT(rd % 2 == 0 && rd <= hd);
  const int half = rd / 2;
  for (int t = 0; t < L; ++t)
    for (int h = 0; h < heads; ++h) {
      T* g = dx + (std::size_t(t) * heads + h) * hd;
      for (int i = 0; i < half; ++i) {
        const double ang = double(pos0 + t) * std::pow(theta, -2.0 * i / rd);
        const double c = std::cos(ang), s = std::sin(ang);
        const double ga = g[i], gb = g[i + half];
        g[i] = T(ga * c + gb * s);         // da = dout_a cos + dout_b sin
        g[i + half] = T(gb * c - ga * s);  // db = dout_b cos - dout_a sin
      }
    }
}

// ---------------------------------------------------------------------------------------------
// Causal grouped-query attention over one sequence (keys are the L tokens themselves).
// q, out [L, H*hd]; k, v [L, G*hd]; query head h reads kv head h / (H/G); scale 1/sqrt(hd).
// lse [L, H] = log sum_j exp(S_tj), S = scale * q k^T, saved so the backward can rebuild
// P_tj = exp(S_tj - lse_t) one row at a time (no L x L matrix, as in flash attention).

template <class T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, int L, int H, int G,
                       int hd) {
  HM_ASSERT(G > 0 && H % G == 0);
  const int group = H / G, ldq = H * hd, ldkv = G * hd;
  const double scale = 1.0 / std::sqrt(double(hd));
  std::vector<double> p(L);  // one row of scores, then of probabilities
  for (int t = 0; t < L; ++t)
    for (int h = 0; h < H; ++h) {
      const int g = h / group;
      const T* qt = q + std::size_t(t) * ldq + h * hd;
      double mx = -std::numeric_limits<double>::infinity();
      for (int j = 0; j <= t; ++j) {  // causal: keys 0..t
        double dot = 0;
        for (int i = 0; i < hd; ++i) dot += double(qt[i]) * k[std::size_t(j) * ldkv + g * hd + i];
        p[j] = dot * scale;  // S_tj
        mx = std::max(mx, p[j]);
      }
      double sum = 0;
      for (int j = 0; j <= t; ++j) sum += (p[j] = std::exp(p[j] - mx));  // max-subtracted
      for (int i = 0; i < hd; ++i) {
        double acc = 0;
        for (int j = 0; j <= t; ++j) acc += p[j] * v[std::size_t(j) * ldkv + g * hd + i];
        out[std::size_t(t) * ldq + h * hd + i] = T(acc / sum);  // O_t = sum_j P_tj V_j
      }
      lse[std::size_t(t) * H + h] = T(mx + std::log(sum));
    }
}

// dq assigned; dk, dv assigned as a whole (they sum over the query heads of their group and
// over the query rows, so they are zeroed here first).
template <class T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                        const T* out, const T* lse, int L, int H, int G, int hd) {
  HM_ASSERT(G > 0 && H % G == 0);
  const int group = H / G, ldq = H * hd, ldkv = G * hd;
  const double scale = 1.0 / std::sqrt(double(hd));
  // dk, dv receive L*group contributions per element: sum them in double.
  std::vector<double> dk_acc(std::size_t(L) * ldkv, 0.0), dv_acc(std::size_t(L) * ldkv, 0.0);
  std::vector<double> dq_acc(hd);
  for (int t = 0; t < L; ++t)
    for (int h = 0; h < H; ++h) {
      const int g = h / group;
      const std::size_t qo = std::size_t(t) * ldq + h * hd;
      const T *qt = q + qo, *dot_ = dout + qo, *ot = out + qo;
      double Dt = 0;  // D_t = rowsum(dO_t * O_t) = sum_j P_tj dP_tj
      for (int i = 0; i < hd; ++i) Dt += double(dot_[i]) * ot[i];
      const double lse_t = lse[std::size_t(t) * H + h];
      std::fill(dq_acc.begin(), dq_acc.end(), 0.0);
      for (int j = 0; j <= t; ++j) {
        const std::size_t ko = std::size_t(j) * ldkv + g * hd;
        double s = 0, dp = 0;
        for (int i = 0; i < hd; ++i) {
          s += double(qt[i]) * k[ko + i];
          dp += double(dot_[i]) * v[ko + i];  // dP_tj = dO_t . V_j
        }
        const double p = std::exp(s * scale - lse_t);  // P_tj = exp(S_tj - lse_t)
        const double ds = p * (dp - Dt);                // dS_tj = P_tj (dP_tj - D_t)
        for (int i = 0; i < hd; ++i) {
          dv_acc[ko + i] += p * dot_[i];          // dV_j += P_tj dO_t
          dq_acc[i] += scale * ds * k[ko + i];    // dQ_t += scale dS_tj K_j
          dk_acc[ko + i] += scale * ds * qt[i];   // dK_j += scale dS_tj Q_t
        }
      }
      for (int i = 0; i < hd; ++i) dq[qo + i] = T(dq_acc[i]);
    }
  for (std::size_t i = 0; i < dk_acc.size(); ++i) {
    dk[i] = T(dk_acc[i]);
    dv[i] = T(dv_acc[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// The attention mixer: u [L, D] -> q = u Wq^T [L, H*hd], k = u Wk^T, v = u Wv^T [L, G*hd]
// -> RoPE on q, k at positions 0..L-1 (if rope) -> causal attention -> inner [L, H*hd]
// -> out = inner Wo^T [L, D]. The residual add is the caller's.

struct AttnShape {
  int L, D, H, G, hd;
  bool rope;
  double theta;
  int rope_dim = 0;  // channels rotated per head (0: all hd)
};

template <class T>
struct AttnWeights {
  const T* wq;  // [H*hd, D]
  const T* wk;  // [G*hd, D]
  const T* wv;  // [G*hd, D]
  const T* wo;  // [D, H*hd]
};

template <class T>
struct AttnWeightGrads {  // accumulated (+=); same shapes as AttnWeights
  T* wq;
  T* wk;
  T* wv;
  T* wo;
};

template <class T>
struct AttnSaved {    // written by the forward, read by the backward
  std::vector<T> q;      // [L, H*hd] after RoPE
  std::vector<T> k, v;   // [L, G*hd], k after RoPE
  std::vector<T> lse;    // [L, H]
  std::vector<T> inner;  // [L, H*hd] concatenated head outputs: the bridge source
};

template <class T>
void attention_block_forward(T* out, AttnSaved<T>& s, const T* u, const AttnWeights<T>& w,
                             const AttnShape& c) {
  const int Q = c.H * c.hd, KV = c.G * c.hd;
  s.q.resize(std::size_t(c.L) * Q);
  s.k.resize(std::size_t(c.L) * KV);
  s.v.resize(std::size_t(c.L) * KV);
  s.lse.resize(std::size_t(c.L) * c.H);
  s.inner.resize(std::size_t(c.L) * Q);
  detail::attn_xwT(s.q.data(), u, w.wq, c.L, Q, c.D);
  detail::attn_xwT(s.k.data(), u, w.wk, c.L, KV, c.D);
  detail::attn_xwT(s.v.data(), u, w.wv, c.L, KV, c.D);
  if (c.rope) {
    rope_forward(s.q.data(), c.L, c.H, c.hd, 0, c.theta, c.rope_dim);
    rope_forward(s.k.data(), c.L, c.G, c.hd, 0, c.theta, c.rope_dim);
  }
  attention_forward(s.inner.data(), s.lse.data(), s.q.data(), s.k.data(), s.v.data(), c.L, c.H,
                    c.G, c.hd);
  detail::attn_xwT(out, s.inner.data(), w.wo, c.L, c.D, Q);
}

// du assigned, weight gradients accumulated. dinner (nullable) is extra gradient arriving at
// inner from elsewhere (the next layer's state bridge reads inner).
template <class T>
void attention_block_backward(T* du, const AttnWeightGrads<T>& gw, const T* dout,
                              const T* dinner, const T* u, const AttnWeights<T>& w,
                              const AttnSaved<T>& s, const AttnShape& c) {
  const int Q = c.H * c.hd, KV = c.G * c.hd;
  std::vector<T> dinn(std::size_t(c.L) * Q), dq(std::size_t(c.L) * Q), dk(std::size_t(c.L) * KV),
      dv(std::size_t(c.L) * KV);
  // out = inner Wo^T:  dinner = dout Wo (+ dinner from the bridge);  dWo += dout^T inner
  if (dinner) std::copy(dinner, dinner + dinn.size(), dinn.begin());
  detail::attn_dyW(dinn.data(), dout, w.wo, c.L, c.D, Q, dinner != nullptr);
  detail::attn_dyTx(gw.wo, dout, s.inner.data(), c.L, c.D, Q);
  attention_backward(dq.data(), dk.data(), dv.data(), dinn.data(), s.q.data(), s.k.data(),
                     s.v.data(), s.inner.data(), s.lse.data(), c.L, c.H, c.G, c.hd);
  if (c.rope) {  // gradients with respect to q, k before the rotation
    rope_backward(dq.data(), c.L, c.H, c.hd, 0, c.theta, c.rope_dim);
    rope_backward(dk.data(), c.L, c.G, c.hd, 0, c.theta, c.rope_dim);
  }
  // q = u Wq^T etc.:  du = dq Wq + dk Wk + dv Wv;  dWq += dq^T u etc.
  detail::attn_dyW(du, dq.data(), w.wq, c.L, Q, c.D, false);
  detail::attn_dyW(du, dk.data(), w.wk, c.L, KV, c.D, true);
  detail::attn_dyW(du, dv.data(), w.wv, c.L, KV, c.D, true);
  detail::attn_dyTx(gw.wq, dq.data(), u, c.L, Q, c.D);
  detail::attn_dyTx(gw.wk, dk.data(), u, c.L, KV, c.D);
  detail::attn_dyTx(gw.wv, dv.data(), u, c.L, KV, c.D);
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: out[n,f] = silu(g) * u, silu(g) = g sigmoid(g).

template <class T>
void swiglu_forward(T* out, const T* g, const T* u, int n, int f) {
  for (std::size_t i = 0; i < std::size_t(n) * f; ++i) {
    const double gi = g[i];
    out[i] = T(gi * detail::attn_sigmoid(gi) * u[i]);
  }
}

template <class T>
void swiglu_backward(T* dg, T* du, const T* dout, const T* g, const T* u, int n, int f) {
  for (std::size_t i = 0; i < std::size_t(n) * f; ++i) {
    const double gi = g[i], sg = detail::attn_sigmoid(gi), d = dout[i];
    du[i] = T(d * gi * sg);                             // du = dout silu(g)
    dg[i] = T(d * u[i] * sg * (1.0 + gi * (1.0 - sg)));  // dg = dout u silu'(g),
  }                                                      // silu' = s (1 + g (1 - s))
}

// Squared ReLU, out = max(x, 0)^2, and its backward: dx = dout * 2 max(x, 0).
template <class T>
void relu2_forward(T* out, const T* x, int n, int f) {
  for (std::size_t i = 0; i < std::size_t(n) * f; ++i) {
    const double r = x[i] > 0 ? double(x[i]) : 0.0;
    out[i] = T(r * r);
  }
}
template <class T>
void relu2_backward(T* dx, const T* dout, const T* x, int n, int f) {
  for (std::size_t i = 0; i < std::size_t(n) * f; ++i) dx[i] = T(x[i] > 0 ? 2.0 * double(x[i]) * double(dout[i]) : 0.0);
}

// MLP branch on an already-normalized m [n, D]: out = (silu(m Wg^T) * (m Wu^T)) Wd^T [n, D].
// The residual add is the caller's.
template <class T>
struct MlpWeights {
  const T* gate;  // [F, D]
  const T* up;    // [F, D]
  const T* down;  // [D, F]
};

template <class T>
struct MlpWeightGrads {  // accumulated (+=)
  T* gate;
  T* up;
  T* down;
};

template <class T>
struct MlpSaved {
  std::vector<T> g, u, a;  // [n, F]: m Wg^T, m Wu^T, silu(g) * u
};

template <class T>
void mlp_block_forward(T* out, MlpSaved<T>& s, const T* m, const MlpWeights<T>& w, int n, int D,
                       int F) {
  s.g.resize(std::size_t(n) * F);
  s.u.resize(std::size_t(n) * F);
  s.a.resize(std::size_t(n) * F);
  detail::attn_xwT(s.g.data(), m, w.gate, n, F, D);
  detail::attn_xwT(s.u.data(), m, w.up, n, F, D);
  swiglu_forward(s.a.data(), s.g.data(), s.u.data(), n, F);
  detail::attn_xwT(out, s.a.data(), w.down, n, D, F);
}

// dm assigned, weight gradients accumulated.
template <class T>
void mlp_block_backward(T* dm, const MlpWeightGrads<T>& gw, const T* dout, const T* m,
                        const MlpWeights<T>& w, const MlpSaved<T>& s, int n, int D, int F) {
  std::vector<T> da(std::size_t(n) * F), dg(std::size_t(n) * F), du(std::size_t(n) * F);
  detail::attn_dyW(da.data(), dout, w.down, n, D, F, false);  // da = dout Wd
  detail::attn_dyTx(gw.down, dout, s.a.data(), n, D, F);      // dWd += dout^T a
  swiglu_backward(dg.data(), du.data(), da.data(), s.g.data(), s.u.data(), n, F);
  detail::attn_dyW(dm, dg.data(), w.gate, n, F, D, false);    // dm = dg Wg + du Wu
  detail::attn_dyW(dm, du.data(), w.up, n, F, D, true);
  detail::attn_dyTx(gw.gate, dg.data(), m, n, F, D);          // dWg += dg^T m
  detail::attn_dyTx(gw.up, du.data(), m, n, F, D);            // dWu += du^T m
}

// ---------------------------------------------------------------------------------------------
// State bridge (docs/STATE_BRIDGES.md) after its RMSNorm: h_out = h + gate ⊙ (y W^T),
// y [n, S] the normalized source, W [D, S], gate [D], h and h_out [n, D] (may alias).

template <class T>
void bridge_forward(T* h_out, const T* h, const T* y, const T* W, const T* gate, int n, int D,
                    int S) {
  for (int i = 0; i < n; ++i)
    for (int d = 0; d < D; ++d) {
      const T *yi = y + std::size_t(i) * S, *wd = W + std::size_t(d) * S;
      double p = 0;  // p = y_i . W_d
      for (int c = 0; c < S; ++c) p += double(yi[c]) * wd[c];
      h_out[std::size_t(i) * D + d] = T(h[std::size_t(i) * D + d] + gate[d] * p);
    }
}

// dh (= dh_out, the residual pass-through; nullable, or may alias dh_out) and dy assigned;
// dW and dgate accumulated.
template <class T>
void bridge_backward(T* dh, T* dy, T* dW, T* dgate, const T* dh_out, const T* y, const T* W,
                     const T* gate, int n, int D, int S) {
  std::vector<T> p(std::size_t(n) * D), dp(std::size_t(n) * D);
  detail::attn_xwT(p.data(), y, W, n, D, S);  // recompute p = y W^T
  for (int d = 0; d < D; ++d) {
    double acc = 0;
    for (int i = 0; i < n; ++i) {
      const std::size_t o = std::size_t(i) * D + d;
      acc += double(dh_out[o]) * p[o];           // dgate_d += sum_i dh_out_id p_id
      dp[o] = T(double(dh_out[o]) * gate[d]);    // dp = dh_out ⊙ gate
    }
    dgate[d] += T(acc);
  }
  detail::attn_dyW(dy, dp.data(), W, n, D, S, false);  // dy = dp W
  detail::attn_dyTx(dW, dp.data(), y, n, D, S);        // dW += dp^T y
  if (dh && dh != dh_out) std::copy(dh_out, dh_out + std::size_t(n) * D, dh);  // dh = dh_out
}

// ---------------------------------------------------------------------------------------------
// Embedding lookup h = table[ids]: dtable[ids[i]] += dout[i] (a repeated id sums its rows).
template <class T>
void embedding_backward(T* dtable, const T* dout, const int32_t* ids, int n, int d) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < d; ++j) dtable[std::size_t(ids[i]) * d + j] += dout[std::size_t(i) * d + j];
}

// ---------------------------------------------------------------------------------------------
// LM head and loss: logits = hn W^T (hn [n, D] after norm_f, W [V, D] the tied embedding);
// loss = mean over the positions with target >= 0 of -log softmax(logits_i)[target_i];
// targets of -1 are ignored (their dhn rows are 0). Returns the loss (0 when nothing counts);
// dhn assigned, dW accumulated. One row of V logits at a time.
template <class T>
T cross_entropy_forward_backward(T* dhn, T* dW, const T* hn, const T* W, const int32_t* targets,
                                 int n, int D, int V) {
  int count = 0;
  for (int i = 0; i < n; ++i) {
    HM_ASSERT(targets[i] >= -1 && targets[i] < V);
    count += targets[i] >= 0;
  }
  std::fill(dhn, dhn + std::size_t(n) * D, T(0));
  if (count == 0) return T(0);
  std::vector<double> z(V);  // logits of one row, then dloss/dlogits of that row
  double loss = 0;
  for (int i = 0; i < n; ++i) {
    const int tgt = targets[i];
    if (tgt < 0) continue;
    const T* hi = hn + std::size_t(i) * D;
    double mx = -std::numeric_limits<double>::infinity();
    for (int c = 0; c < V; ++c) {
      double acc = 0;
      for (int j = 0; j < D; ++j) acc += double(hi[j]) * W[std::size_t(c) * D + j];
      z[c] = acc;  // z_c = hn_i . W_c
      mx = std::max(mx, acc);
    }
    double sum = 0;
    for (int c = 0; c < V; ++c) sum += std::exp(z[c] - mx);
    const double lse = mx + std::log(sum);
    loss += lse - z[tgt];  // -log softmax(z)[tgt] = lse - z_tgt
    for (int c = 0; c < V; ++c)  // dz_c = (softmax(z)_c - [c == tgt]) / count
      z[c] = (std::exp(z[c] - lse) - (c == tgt ? 1.0 : 0.0)) / count;
    T* dhi = dhn + std::size_t(i) * D;
    for (int j = 0; j < D; ++j) {  // dhn_i = dz W
      double acc = 0;
      for (int c = 0; c < V; ++c) acc += z[c] * W[std::size_t(c) * D + j];
      dhi[j] = T(acc);
    }
    for (int c = 0; c < V; ++c)  // dW_c += dz_c hn_i
      for (int j = 0; j < D; ++j) dW[std::size_t(c) * D + j] += T(z[c] * hi[j]);
  }
  return T(loss / count);
}

}  // namespace hm::ref::grad
