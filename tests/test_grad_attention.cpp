// kernels/ref/attention_grad_ref.h: every backward against central finite differences in double,
// and the float forwards against the inference oracle (kernels/ref/ops_ref.cpp).
//
// Finite differences: for each input element x_i, n_i = (f(x_i + h) - f(x_i - h)) / 2h with
// h = 1e-6 and f = sum(dout * out) for a fixed random dout (the loss itself for cross-entropy).
// Error measure (as tests/test_kernels.cpp): max_i |a_i - n_i| / (|n_i| + rms(n)), a the
// analytic gradient; an element much smaller than the typical gradient is judged against the
// typical one, so FD noise near zero does not read as a huge relative error. Required <= 1e-6;
// observed ~1e-9 (truncation ~h^2, rounding ~1e-16/h).
//
// The gradient rule is checked in every FD test: activation gradients are prefilled with NaN
// (an accumulate would leave NaN), parameter gradients with a random prior that is subtracted
// after the backward (an assign would lose it).
//
// Set HM_GRAD_VERBOSE=1 to print each measured error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/rng.h"
#include "isa_each.h"
#include "kernels/ops.h"
#include "kernels/cpu/grad_cpu.h"
#include "kernels/ref/attention_grad_ref.h"

namespace {

namespace g = hm::ref::grad;
using Vec = std::vector<double>;
using VecF = std::vector<float>;

constexpr double kStep = 1e-6;
constexpr double kFdTol = 1e-6;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

Vec randn(hm::Rng& rng, std::size_t n, double scale = 1.0) {
  Vec v(n);
  for (auto& x : v) x = rng.normal() * scale;
  return v;
}

VecF to_float(const Vec& v) { return VecF(v.begin(), v.end()); }

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// max_i |got_i - want_i| / (|want_i| + rms(want))
template <class A, class B>
double rel_err(const A& got, const B& want) {
  EXPECT_EQ(got.size(), want.size());
  double ss = 0;
  for (auto w : want) ss += double(w) * w;
  const double rms = std::sqrt(ss / std::max<std::size_t>(1, want.size())) + 1e-30;
  double worst = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double e = std::abs(double(got[i]) - double(want[i])) / (std::abs(double(want[i])) + rms);
    worst = std::max(worst, std::isnan(e) ? std::numeric_limits<double>::infinity() : e);
  }
  return worst;
}

void report(const std::string& what, double err) {
  if (std::getenv("HM_GRAD_VERBOSE")) std::printf("  [fd] %-34s %.3e\n", what.c_str(), err);
}

// Checks analytic against central differences of f with respect to every element of x.
void expect_fd(const std::string& what, Vec& x, const Vec& analytic,
               const std::function<double()>& f) {
  ASSERT_EQ(x.size(), analytic.size()) << what;
  Vec num(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double save = x[i];
    x[i] = save + kStep;
    const double fp = f();
    x[i] = save - kStep;
    const double fm = f();
    x[i] = save;
    num[i] = (fp - fm) / (2 * kStep);
  }
  const double err = rel_err(analytic, num);
  report(what, err);
  EXPECT_LE(err, kFdTol) << what;
}

// A parameter gradient that started at prior and was accumulated into: what was added.
Vec added(const Vec& grad, const Vec& prior) {
  Vec d(grad.size());
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = grad[i] - prior[i];
  return d;
}

constexpr int L = 7, H = 4, HD = 6, D = 10, F = 9, V = 13;
constexpr double kTheta = 10000.0;

// ------------------------------------------------------------------------------------------
// RoPE

TEST(GradAttention, RopeForwardMatchesOracleFloat) {
  hm::Rng rng(1);
  const int heads = 3, pos0 = 3;
  const VecF x = to_float(randn(rng, std::size_t(L) * heads * HD));
  VecF got = x, want = x;
  g::rope_forward(got.data(), L, heads, HD, pos0, kTheta);
  hm::ref::rope(want.data(), heads * HD, L, heads, HD, pos0, float(kTheta));
  EXPECT_LE(rel_err(got, want), 1e-6);
}

TEST(GradAttention, RopeBackwardMatchesFD) {
  hm::Rng rng(2);
  const int heads = 3, pos0 = 3;
  const std::size_t n = std::size_t(L) * heads * HD;
  Vec x = randn(rng, n);
  const Vec dout = randn(rng, n);
  auto f = [&] {
    Vec y = x;
    g::rope_forward(y.data(), L, heads, HD, pos0, kTheta);
    return dot(dout, y);
  };
  Vec dx = dout;
  g::rope_backward(dx.data(), L, heads, HD, pos0, kTheta);
  expect_fd("rope dx", x, dx, f);
}

// ------------------------------------------------------------------------------------------
// Attention core

TEST(GradAttention, AttentionForwardMatchesOracleFloat) {
  for (int G : {1, 2, 4}) {
    hm::Rng rng(10 + G);
    const VecF q = to_float(randn(rng, std::size_t(L) * H * HD));
    const VecF k = to_float(randn(rng, std::size_t(L) * G * HD));
    const VecF v = to_float(randn(rng, std::size_t(L) * G * HD));
    VecF got(q.size()), lse(std::size_t(L) * H), want(q.size());
    g::attention_forward(got.data(), lse.data(), q.data(), k.data(), v.data(), L, H, G, HD);
    hm::ref::attention(want.data(), H * HD, q.data(), H * HD, k.data(), v.data(), L, 0, H, G, HD);
    EXPECT_LE(rel_err(got, want), 1e-6) << "G=" << G;
  }
}

TEST(GradAttention, AttentionLseIsLogSumExp) {
  hm::Rng rng(15);
  const int G = 2, group = H / G;
  const Vec q = randn(rng, std::size_t(L) * H * HD), k = randn(rng, std::size_t(L) * G * HD),
            v = randn(rng, std::size_t(L) * G * HD);
  Vec out(q.size()), lse(std::size_t(L) * H), want(lse.size());
  g::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), L, H, G, HD);
  for (int t = 0; t < L; ++t)
    for (int h = 0; h < H; ++h) {
      double sum = 0;  // direct log(sum(exp)), no max subtraction: scores are O(1) here
      for (int j = 0; j <= t; ++j) {
        double s = 0;
        for (int i = 0; i < HD; ++i) s += q[(t * H + h) * HD + i] * k[(j * G + h / group) * HD + i];
        sum += std::exp(s / std::sqrt(double(HD)));
      }
      want[t * H + h] = std::log(sum);
    }
  EXPECT_LE(rel_err(lse, want), 1e-12);
}

TEST(GradAttention, AttentionBackwardMatchesFD) {
  for (int G : {1, 2, 4}) {  // multi-query, grouped, one kv head per query head
    hm::Rng rng(20 + G);
    const std::size_t nq = std::size_t(L) * H * HD, nkv = std::size_t(L) * G * HD;
    Vec q = randn(rng, nq), k = randn(rng, nkv), v = randn(rng, nkv);
    const Vec dout = randn(rng, nq);
    Vec out(nq), lse(std::size_t(L) * H);
    auto f = [&] {
      Vec o(nq), l(std::size_t(L) * H);
      g::attention_forward(o.data(), l.data(), q.data(), k.data(), v.data(), L, H, G, HD);
      return dot(dout, o);
    };
    g::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), L, H, G, HD);
    Vec dq(nq, kNaN), dk(nkv, kNaN), dv(nkv, kNaN);
    g::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(),
                          v.data(), out.data(), lse.data(), L, H, G, HD);
    const std::string tag = " G=" + std::to_string(G);
    expect_fd("attention dq" + tag, q, dq, f);
    expect_fd("attention dk" + tag, k, dk, f);
    expect_fd("attention dv" + tag, v, dv, f);
  }
}

// ------------------------------------------------------------------------------------------
// Attention block

struct AttnParams {
  Vec wq, wk, wv, wo;
  AttnParams(hm::Rng& rng, int G)
      : wq(randn(rng, std::size_t(H) * HD * D, 1 / std::sqrt(double(D)))),
        wk(randn(rng, std::size_t(G) * HD * D, 1 / std::sqrt(double(D)))),
        wv(randn(rng, std::size_t(G) * HD * D, 1 / std::sqrt(double(D)))),
        wo(randn(rng, std::size_t(D) * H * HD, 1 / std::sqrt(double(H * HD)))) {}
  g::AttnWeights<double> view() const { return {wq.data(), wk.data(), wv.data(), wo.data()}; }
};

TEST(GradAttention, AttentionBlockMatchesFD) {
  struct Case { bool rope; int G; bool bridge_grad; };
  for (const Case cs : {Case{true, 2, true}, Case{false, 2, true}, Case{true, 1, true},
                        Case{true, 4, true}, Case{true, 2, false}}) {
    hm::Rng rng(30 + cs.G + 8 * cs.rope + 16 * cs.bridge_grad);
    const g::AttnShape sh{L, D, H, cs.G, HD, cs.rope, kTheta};
    AttnParams p(rng, cs.G);
    Vec u = randn(rng, std::size_t(L) * D);
    const Vec dout = randn(rng, std::size_t(L) * D);
    const Vec dinner = randn(rng, std::size_t(L) * H * HD);  // gradient from a bridge
    // f = sum(dout * out) + sum(dinner * inner)
    auto f = [&] {
      g::AttnSaved<double> s;
      Vec out(std::size_t(L) * D);
      g::attention_block_forward(out.data(), s, u.data(), p.view(), sh);
      return dot(dout, out) + (cs.bridge_grad ? dot(dinner, s.inner) : 0.0);
    };
    g::AttnSaved<double> s;
    Vec out(std::size_t(L) * D);
    g::attention_block_forward(out.data(), s, u.data(), p.view(), sh);
    const Vec pq = randn(rng, p.wq.size()), pk = randn(rng, p.wk.size()),
              pv = randn(rng, p.wv.size()), po = randn(rng, p.wo.size());
    Vec gq = pq, gk = pk, gv = pv, go = po, du(u.size(), kNaN);
    g::attention_block_backward(du.data(), g::AttnWeightGrads<double>{gq.data(), gk.data(),
                                                                      gv.data(), go.data()},
                                dout.data(), cs.bridge_grad ? dinner.data() : nullptr, u.data(),
                                p.view(), s, sh);
    const std::string tag = std::string(cs.rope ? " rope" : " norope") + " G=" +
                            std::to_string(cs.G) + (cs.bridge_grad ? " +dinner" : "");
    expect_fd("block du" + tag, u, du, f);
    expect_fd("block dWq" + tag, p.wq, added(gq, pq), f);
    expect_fd("block dWk" + tag, p.wk, added(gk, pk), f);
    expect_fd("block dWv" + tag, p.wv, added(gv, pv), f);
    expect_fd("block dWo" + tag, p.wo, added(go, po), f);
  }
}

// The block in float equals the inference path built from the oracle kernels.
TEST(GradAttention, AttentionBlockForwardMatchesInferencePathFloat) {
  for (bool rope : {true, false}) {
    hm::Rng rng(40 + rope);
    const int G = 2, Q = H * HD, KV = G * HD;
    const VecF wq = to_float(randn(rng, std::size_t(Q) * D, 0.3)),
               wk = to_float(randn(rng, std::size_t(KV) * D, 0.3)),
               wv = to_float(randn(rng, std::size_t(KV) * D, 0.3)),
               wo = to_float(randn(rng, std::size_t(D) * Q, 0.2)),
               u = to_float(randn(rng, std::size_t(L) * D));
    const g::AttnShape sh{L, D, H, G, HD, rope, kTheta};
    g::AttnSaved<float> s;
    VecF got(std::size_t(L) * D);
    g::attention_block_forward(got.data(), s, u.data(),
                               g::AttnWeights<float>{wq.data(), wk.data(), wv.data(), wo.data()},
                               sh);
    VecF q(std::size_t(L) * Q), k(std::size_t(L) * KV), v(std::size_t(L) * KV),
        inner(std::size_t(L) * Q), want(std::size_t(L) * D);
    hm::ref::linear(q.data(), Q, u.data(), D, wq.data(), L, Q, D, false);
    hm::ref::linear(k.data(), KV, u.data(), D, wk.data(), L, KV, D, false);
    hm::ref::linear(v.data(), KV, u.data(), D, wv.data(), L, KV, D, false);
    if (rope) {
      hm::ref::rope(q.data(), Q, L, H, HD, 0, float(kTheta));
      hm::ref::rope(k.data(), KV, L, G, HD, 0, float(kTheta));
    }
    hm::ref::attention(inner.data(), Q, q.data(), Q, k.data(), v.data(), L, 0, H, G, HD);
    hm::ref::linear(want.data(), D, inner.data(), Q, wo.data(), L, D, Q, false);
    EXPECT_LE(rel_err(s.inner, inner), 1e-6) << "rope=" << rope;
    EXPECT_LE(rel_err(got, want), 1e-6) << "rope=" << rope;
  }
}

// ------------------------------------------------------------------------------------------
// SwiGLU and the MLP block

TEST(GradAttention, SwigluForwardMatchesOracleFloat) {
  hm::Rng rng(50);
  const int n = L;
  const VecF gg = to_float(randn(rng, std::size_t(n) * F, 3.0)),
             uu = to_float(randn(rng, std::size_t(n) * F));
  VecF got(gg.size()), want(gg.size());
  g::swiglu_forward(got.data(), gg.data(), uu.data(), n, F);
  hm::ref::swiglu(want.data(), F, gg.data(), uu.data(), F, n, F);
  EXPECT_LE(rel_err(got, want), 1e-6);
}

TEST(GradAttention, SwigluBackwardMatchesFD) {
  hm::Rng rng(51);
  const int n = L;
  const std::size_t sz = std::size_t(n) * F;
  Vec gg = randn(rng, sz, 3.0), uu = randn(rng, sz);  // wide g: both tails of the sigmoid
  const Vec dout = randn(rng, sz);
  auto f = [&] {
    Vec o(sz);
    g::swiglu_forward(o.data(), gg.data(), uu.data(), n, F);
    return dot(dout, o);
  };
  Vec dg(sz, kNaN), du(sz, kNaN);
  g::swiglu_backward(dg.data(), du.data(), dout.data(), gg.data(), uu.data(), n, F);
  expect_fd("swiglu dg", gg, dg, f);
  expect_fd("swiglu du", uu, du, f);
}

TEST(GradAttention, MlpBlockMatchesFD) {
  hm::Rng rng(52);
  const int n = L;
  Vec m = randn(rng, std::size_t(n) * D), wg = randn(rng, std::size_t(F) * D, 0.5),
      wu = randn(rng, std::size_t(F) * D, 0.5), wd = randn(rng, std::size_t(D) * F, 0.4);
  const Vec dout = randn(rng, std::size_t(n) * D);
  auto w = [&] { return g::MlpWeights<double>{wg.data(), wu.data(), wd.data()}; };
  auto f = [&] {
    g::MlpSaved<double> s;
    Vec o(std::size_t(n) * D);
    g::mlp_block_forward(o.data(), s, m.data(), w(), n, D, F);
    return dot(dout, o);
  };
  g::MlpSaved<double> s;
  Vec out(std::size_t(n) * D);
  g::mlp_block_forward(out.data(), s, m.data(), w(), n, D, F);
  const Vec pg = randn(rng, wg.size()), pu = randn(rng, wu.size()), pd = randn(rng, wd.size());
  Vec gg = pg, gu = pu, gd = pd, dm(m.size(), kNaN);
  g::mlp_block_backward(dm.data(), g::MlpWeightGrads<double>{gg.data(), gu.data(), gd.data()},
                        dout.data(), m.data(), w(), s, n, D, F);
  expect_fd("mlp dm", m, dm, f);
  expect_fd("mlp dWgate", wg, added(gg, pg), f);
  expect_fd("mlp dWup", wu, added(gu, pu), f);
  expect_fd("mlp dWdown", wd, added(gd, pd), f);
}

TEST(GradAttention, MlpBlockForwardMatchesInferencePathFloat) {
  hm::Rng rng(53);
  const int n = L;
  const VecF m = to_float(randn(rng, std::size_t(n) * D)),
             wg = to_float(randn(rng, std::size_t(F) * D, 0.5)),
             wu = to_float(randn(rng, std::size_t(F) * D, 0.5)),
             wd = to_float(randn(rng, std::size_t(D) * F, 0.4));
  g::MlpSaved<float> s;
  VecF got(std::size_t(n) * D);
  g::mlp_block_forward(got.data(), s, m.data(),
                       g::MlpWeights<float>{wg.data(), wu.data(), wd.data()}, n, D, F);
  VecF gu(std::size_t(n) * 2 * F), a(std::size_t(n) * F), want(std::size_t(n) * D);
  hm::ref::linear(gu.data(), 2 * F, m.data(), D, wg.data(), n, F, D, false);      // g | u
  hm::ref::linear(gu.data() + F, 2 * F, m.data(), D, wu.data(), n, F, D, false);  // side by side
  hm::ref::swiglu(a.data(), F, gu.data(), gu.data() + F, 2 * F, n, F);
  hm::ref::linear(want.data(), D, a.data(), F, wd.data(), n, D, F, false);
  EXPECT_LE(rel_err(got, want), 1e-6);
}

// ------------------------------------------------------------------------------------------
// State bridge

TEST(GradAttention, BridgeMatchesFD) {
  hm::Rng rng(60);
  const int n = L, S = H * HD;
  Vec h = randn(rng, std::size_t(n) * D), y = randn(rng, std::size_t(n) * S),
      W = randn(rng, std::size_t(D) * S, 1 / std::sqrt(double(S))), gate = randn(rng, D);
  const Vec dout = randn(rng, std::size_t(n) * D);
  auto f = [&] {
    Vec o(std::size_t(n) * D);
    g::bridge_forward(o.data(), h.data(), y.data(), W.data(), gate.data(), n, D, S);
    return dot(dout, o);
  };
  const Vec pW = randn(rng, W.size()), pgate = randn(rng, gate.size());
  Vec dh(h.size(), kNaN), dy(y.size(), kNaN), dW = pW, dgate = pgate;
  g::bridge_backward(dh.data(), dy.data(), dW.data(), dgate.data(), dout.data(), y.data(),
                     W.data(), gate.data(), n, D, S);
  expect_fd("bridge dh", h, dh, f);
  expect_fd("bridge dy", y, dy, f);
  expect_fd("bridge dW", W, added(dW, pW), f);
  expect_fd("bridge dgate", gate, added(dgate, pgate), f);

  // In place (h_out == h), as the model updates its residual stream.
  Vec out(h.size()), inplace = h;
  g::bridge_forward(out.data(), h.data(), y.data(), W.data(), gate.data(), n, D, S);
  g::bridge_forward(inplace.data(), inplace.data(), y.data(), W.data(), gate.data(), n, D, S);
  EXPECT_EQ(out, inplace);
}

// A closed bridge (gate = 0, its initialization) still gets a gradient on its gate.
TEST(GradAttention, ClosedBridgeGateGetsGradient) {
  hm::Rng rng(61);
  const int n = L, S = 5;
  const Vec y = randn(rng, std::size_t(n) * S), W = randn(rng, std::size_t(D) * S),
            dout = randn(rng, std::size_t(n) * D), gate(D, 0.0);
  Vec dh(dout.size()), dy(y.size()), dW(W.size(), 0.0), dgate(D, 0.0);
  g::bridge_backward(dh.data(), dy.data(), dW.data(), dgate.data(), dout.data(), y.data(),
                     W.data(), gate.data(), n, D, S);
  for (double d : dgate) EXPECT_NE(d, 0.0);
  for (double d : dy) EXPECT_EQ(d, 0.0);  // nothing flows back through a closed gate
}

// ------------------------------------------------------------------------------------------
// Embedding and the tied head with cross-entropy

TEST(GradAttention, EmbeddingBackwardMatchesFD) {
  hm::Rng rng(70);
  const int n = L;
  const std::vector<int32_t> ids = {3, 0, 12, 3, 7, 3, 12};  // repeats must sum
  Vec table = randn(rng, std::size_t(V) * D);
  const Vec dout = randn(rng, std::size_t(n) * D);
  auto f = [&] {
    double s = 0;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < D; ++j) s += dout[i * D + j] * table[ids[i] * D + j];
    return s;
  };
  const Vec prior = randn(rng, table.size());
  Vec dtable = prior;
  g::embedding_backward(dtable.data(), dout.data(), ids.data(), n, D);
  expect_fd("embedding dtable", table, added(dtable, prior), f);
}

TEST(GradAttention, CrossEntropyMatchesFD) {
  hm::Rng rng(80);
  const int n = L;
  const std::vector<int32_t> tgt = {4, -1, 0, 12, -1, 7, 4};  // two ignored positions
  Vec hn = randn(rng, std::size_t(n) * D), W = randn(rng, std::size_t(V) * D, 0.5);
  auto loss_of = [&] {
    Vec dhn(hn.size()), dW(W.size(), 0.0);
    return g::cross_entropy_forward_backward(dhn.data(), dW.data(), hn.data(), W.data(),
                                             tgt.data(), n, D, V);
  };
  // The loss against full logits, plainly.
  double want = 0;
  int count = 0;
  for (int i = 0; i < n; ++i) {
    if (tgt[i] < 0) continue;
    Vec z(V);
    for (int c = 0; c < V; ++c)
      for (int j = 0; j < D; ++j) z[c] += hn[i * D + j] * W[c * D + j];
    double sum = 0;
    for (double zc : z) sum += std::exp(zc);
    want += std::log(sum) - z[tgt[i]];
    ++count;
  }
  want /= count;
  const Vec prior = randn(rng, W.size());
  Vec dhn(hn.size(), kNaN), dW = prior;
  const double loss = g::cross_entropy_forward_backward(dhn.data(), dW.data(), hn.data(),
                                                        W.data(), tgt.data(), n, D, V);
  EXPECT_NEAR(loss, want, 1e-12 * std::abs(want));
  for (int i : {1, 4})
    for (int j = 0; j < D; ++j) EXPECT_EQ(dhn[i * D + j], 0.0);
  expect_fd("cross-entropy dhn", hn, dhn, loss_of);
  expect_fd("cross-entropy dW", W, added(dW, prior), loss_of);
}

// Mean over counted rows of logsumexp(hn_i W^T) - (hn_i W^T)[t_i], in long double with the max
// subtracted: the reference for logits too large for a plain softmax.
template <class T>
long double ce_long_double(const std::vector<T>& hn, const std::vector<T>& W, const std::vector<int32_t>& tgt) {
  const int n = int(tgt.size());
  long double total = 0;
  int count = 0;
  for (int i = 0; i < n; ++i) {
    if (tgt[std::size_t(i)] < 0) continue;
    std::vector<long double> z(V, 0.0L);
    for (int c = 0; c < V; ++c)
      for (int j = 0; j < D; ++j) z[std::size_t(c)] += (long double)hn[std::size_t(i) * D + j] * W[std::size_t(c) * D + j];
    const long double m = *std::max_element(z.begin(), z.end());
    long double sum = 0;
    for (long double zc : z) sum += std::exp(zc - m);
    total += m + std::log(sum) - z[std::size_t(tgt[std::size_t(i)])];
    ++count;
  }
  return total / count;
}

HM_ISA_TEST(GradAttention, CrossEntropyLargeLogitsAndAllIgnored) {
  hm::Rng rng(81);
  const int n = 3;
  // Logits in the thousands: a softmax without the max subtraction overflows.
  Vec hn = randn(rng, std::size_t(n) * D, 100.0), W = randn(rng, std::size_t(V) * D, 10.0);
  // Row 1's target is its largest logit (loss near 0); rows 0 and 2 are not (losses in the
  // thousands), so both ends of the softmax are compared.
  std::vector<int32_t> tgt = {1, 5, 9};
  {
    std::vector<double> z(V, 0.0);
    for (int c = 0; c < V; ++c)
      for (int j = 0; j < D; ++j) z[std::size_t(c)] += hn[std::size_t(1) * D + j] * W[std::size_t(c) * D + j];
    tgt[1] = int32_t(std::max_element(z.begin(), z.end()) - z.begin());
    ASSERT_NE(tgt[1], tgt[0]);
  }
  double zmax = 0;
  for (int i = 0; i < n; ++i)
    for (int c = 0; c < V; ++c) {
      double z = 0;
      for (int j = 0; j < D; ++j) z += hn[std::size_t(i) * D + j] * W[std::size_t(c) * D + j];
      zmax = std::max(zmax, std::abs(z));
    }
  ASSERT_GT(zmax, 1000.0);  // exp(1000) overflows double

  // Double reference kernel against long double, to double's rounding of the logits.
  const long double want = ce_long_double(hn, W, tgt);
  ASSERT_GT(want, 1.0L);
  Vec dhn(hn.size(), kNaN), dW(W.size(), 0.0);
  const double loss = g::cross_entropy_forward_backward(dhn.data(), dW.data(), hn.data(),
                                                        W.data(), tgt.data(), n, D, V);
  EXPECT_NEAR(loss, double(want), 1e-12 * double(want));
  // Its gradients by central differences (the softmax is nearly one-hot: dhn ~ W rows).
  auto loss_of = [&] {
    Vec h(hn.size()), w(W.size(), 0.0);
    return g::cross_entropy_forward_backward(h.data(), w.data(), hn.data(), W.data(), tgt.data(), n, D, V);
  };
  expect_fd("large-logit cross-entropy dhn", hn, dhn, loss_of);
  expect_fd("large-logit cross-entropy dW", W, dW, loss_of);

  // Float: the reference kernel and the fast training kernel (which returns the sum over counted
  // rows, gradients scaled by `scale`) against long double on the same float inputs. Logits of
  // ~3000 in float carry ~2e-4 of rounding each, hence the absolute term.
  const VecF hf = to_float(hn), wf = to_float(W);
  const double want_f = double(ce_long_double(hf, wf, tgt));
  VecF dhf(hf.size(), 0.0f), dwf(wf.size(), 0.0f);
  const float lossf = g::cross_entropy_forward_backward(dhf.data(), dwf.data(), hf.data(), wf.data(),
                                                        tgt.data(), n, D, V);
  EXPECT_NEAR(lossf, want_f, 1e-6 * want_f + 1e-2);
  VecF dhc(hf.size(), 0.0f), dwc(wf.size(), 0.0f);
  const double sumc = hm::cpu::grad::cross_entropy_forward_backward(dhc.data(), dwc.data(), hf.data(), wf.data(),
                                                                   tgt.data(), n, D, V, 1.0 / n);
  EXPECT_NEAR(sumc / n, want_f, 1e-6 * want_f + 1e-2);
  for (std::size_t i = 0; i < dhn.size(); ++i) {
    EXPECT_NEAR(dhf[i], dhn[i], 1e-3 * (std::abs(dhn[i]) + 1)) << i;
    EXPECT_NEAR(dhc[i], dhn[i], 1e-3 * (std::abs(dhn[i]) + 1)) << i;
  }
  for (std::size_t i = 0; i < dW.size(); ++i) EXPECT_NEAR(dwc[i], dW[i], 1e-3 * (std::abs(dW[i]) + 1)) << i;

  const std::vector<int32_t> none = {-1, -1, -1};
  const Vec prior = randn(rng, W.size());
  Vec dhn0(hn.size(), kNaN), dW0 = prior;
  EXPECT_EQ(g::cross_entropy_forward_backward(dhn0.data(), dW0.data(), hn.data(), W.data(),
                                              none.data(), n, D, V),
            0.0);
  for (double d : dhn0) EXPECT_EQ(d, 0.0);
  EXPECT_EQ(dW0, prior);
}

}  // namespace

// ------------------------------------------------------------------------------------------
// The fast float training kernels (kernels/cpu/grad_cpu.cpp) against this reference in double,
// on the same float inputs, at sizes around the SIMD width and the sgemm blocking (odd L, one
// token, grouped and multi-query heads, head sizes 8 and 64). Scores up to ~|6| so that the
// softmax is far from uniform.

namespace {
Vec to_double(const VecF& v) { return Vec(v.begin(), v.end()); }
VecF rand_f(hm::Rng& rng, std::size_t n, double scale) { return to_float(randn(rng, n, scale)); }
}  // namespace

HM_ISA_TEST(GradAttention, FastCoreMatchesReference) {
  struct Case { int L, H, G, hd; };
  for (const Case c : {Case{1, 1, 1, 8}, Case{17, 4, 2, 8}, Case{33, 3, 1, 64}, Case{64, 2, 2, 16},
                       Case{131, 2, 1, 64}}) {
    hm::Rng rng(900 + c.L);
    const std::size_t nq = std::size_t(c.L) * c.H * c.hd, nkv = std::size_t(c.L) * c.G * c.hd;
    const double sc = 2.5 / std::pow(double(c.hd), 0.25);  // q.k / sqrt(hd) ~ 6
    const VecF q = rand_f(rng, nq, sc), k = rand_f(rng, nkv, sc), v = rand_f(rng, nkv, 1.0),
               dout = rand_f(rng, nq, 1.0);
    VecF out(nq), lse(std::size_t(c.L) * c.H);
    hm::cpu::grad::attention_core_forward(out.data(), lse.data(), q.data(), k.data(), v.data(),
                                          c.L, c.H, c.G, c.hd);
    const Vec qd = to_double(q), kd = to_double(k), vd = to_double(v), dod = to_double(dout);
    Vec out_w(nq), lse_w(lse.size());
    g::attention_forward(out_w.data(), lse_w.data(), qd.data(), kd.data(), vd.data(), c.L, c.H,
                         c.G, c.hd);
    const std::string at = "L=" + std::to_string(c.L) + " H=" + std::to_string(c.H) +
                           " G=" + std::to_string(c.G) + " hd=" + std::to_string(c.hd);
    EXPECT_LE(rel_err(out, out_w), 2e-6) << at;
    EXPECT_LE(rel_err(lse, lse_w), 2e-6) << at;
    // NaN-prefilled: every output element must be assigned (dk, dv by their group's first head).
    VecF dq(nq, NAN), dk(nkv, NAN), dv(nkv, NAN);
    hm::cpu::grad::attention_core_backward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(),
                                           k.data(), v.data(), out.data(), lse.data(), c.L, c.H,
                                           c.G, c.hd);
    Vec dq_w(nq), dk_w(nkv), dv_w(nkv);
    g::attention_backward(dq_w.data(), dk_w.data(), dv_w.data(), dod.data(), qd.data(), kd.data(),
                          vd.data(), out_w.data(), lse_w.data(), c.L, c.H, c.G, c.hd);
    if (c.L == 1) {  // one key: the softmax is constant, so dq and dk are exactly 0
      for (std::size_t i = 0; i < nq; ++i) EXPECT_LE(std::abs(dq[i]), 1e-5) << at;
      for (std::size_t i = 0; i < nkv; ++i) EXPECT_LE(std::abs(dk[i]), 1e-5) << at;
    } else {
      EXPECT_LE(rel_err(dq, dq_w), 1e-5) << at;
      EXPECT_LE(rel_err(dk, dk_w), 1e-5) << at;
    }
    EXPECT_LE(rel_err(dv, dv_w), 1e-5) << at;
  }
}

TEST(GradAttention, FastRopeBackwardMatchesReference) {
  for (int hd : {2, 8, 64}) {
    hm::Rng rng(950 + hd);
    const int Lr = 37, heads = 3;
    const VecF dx = rand_f(rng, std::size_t(Lr) * heads * hd, 1.0);
    VecF got = dx;
    hm::cpu::grad::rope_backward(got.data(), Lr, heads, hd, float(kTheta));
    Vec want = to_double(dx);
    g::rope_backward(want.data(), Lr, heads, hd, 0, kTheta);
    EXPECT_LE(rel_err(got, want), 1e-6) << "hd=" << hd;
  }
}

// The whole block, rope on, GQA, odd sizes: the float forward and backward against the double.
HM_ISA_TEST(GradAttention, FastBlockMatchesReference) {
  const int Lb = 29, Db = 24, Hb = 4, Gb = 2, hd = 8, Q = Hb * hd, KV = Gb * hd;
  hm::Rng rng(960);
  const VecF wq = rand_f(rng, std::size_t(Q) * Db, 0.4), wk = rand_f(rng, std::size_t(KV) * Db, 0.4),
             wv = rand_f(rng, std::size_t(KV) * Db, 0.3), wo = rand_f(rng, std::size_t(Db) * Q, 0.2),
             u = rand_f(rng, std::size_t(Lb) * Db, 1.0), dout = rand_f(rng, std::size_t(Lb) * Db, 1.0),
             dinner = rand_f(rng, std::size_t(Lb) * Q, 0.5);
  const g::AttnShape sh{Lb, Db, Hb, Gb, hd, true, kTheta};
  g::AttnSaved<float> sf;
  VecF out(std::size_t(Lb) * Db), du(u.size());
  VecF gq(wq.size()), gk(wk.size()), gv(wv.size()), go(wo.size());
  const g::AttnWeights<float> wf{wq.data(), wk.data(), wv.data(), wo.data()};
  hm::cpu::grad::attention_block_forward(out.data(), sf, u.data(), wf, sh);
  hm::cpu::grad::attention_block_backward(du.data(), {gq.data(), gk.data(), gv.data(), go.data()},
                                          dout.data(), dinner.data(), u.data(), wf, sf, sh);
  const Vec wqd = to_double(wq), wkd = to_double(wk), wvd = to_double(wv), wod = to_double(wo),
            ud = to_double(u), doutd = to_double(dout), dinnd = to_double(dinner);
  g::AttnSaved<double> sd;
  Vec out_w(out.size()), du_w(du.size()), gq_w(wq.size()), gk_w(wk.size()), gv_w(wv.size()),
      go_w(wo.size());
  const g::AttnWeights<double> wd{wqd.data(), wkd.data(), wvd.data(), wod.data()};
  g::attention_block_forward(out_w.data(), sd, ud.data(), wd, sh);
  g::attention_block_backward(du_w.data(), {gq_w.data(), gk_w.data(), gv_w.data(), go_w.data()},
                              doutd.data(), dinnd.data(), ud.data(), wd, sd, sh);
  EXPECT_LE(rel_err(out, out_w), 1e-5);
  EXPECT_LE(rel_err(sf.inner, sd.inner), 1e-5);
  EXPECT_LE(rel_err(du, du_w), 1e-5);
  EXPECT_LE(rel_err(gq, gq_w), 1e-5);
  EXPECT_LE(rel_err(gk, gk_w), 1e-5);
  EXPECT_LE(rel_err(gv, gv_w), 1e-5);
  EXPECT_LE(rel_err(go, go_w), 1e-5);
}
