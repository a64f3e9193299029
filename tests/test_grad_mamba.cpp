// The reference backward passes of kernels/ref/mamba_grad_ref.h against central finite
// differences, on fresh random inputs at odd sizes and realistic scales.
//
// Loss: l = sum(dout * out) with dout random, so dl/dout = dout and every gradient the backward
// returns can be differenced: fd_i = (l(p_i + h) - l(p_i - h)) / 2h.
// The analytic gradients are the double instantiation. The differences are taken on the long
// double instantiation of the same forward (64-bit mantissa), perturbed in long double, because
// some gradients are tiny: dA and dA_log scale as delta^2 with delta ~ 0.001..0.1 and go down to
// ~1e-9. Differencing in double (h = 1e-6) has rounding noise ~1e-16 * |l| / h ~ 1e-10 absolute,
// which read as relative errors up to 4e-5 on those. In long double the noise is ~1e-13 at
// h = 1e-6 and ~1e-14 at h = 1e-5, where truncation (~h^2 times the third derivative) is still
// ~1e-10 relative; so h = 1e-5. The double analytic gradient carries ~1e-16 absolute rounding
// of its own, so the floor below cannot go much lower.
// Error measure, per element: |a - f| / max(|a|, |f|, 1e-6): relative for gradients above 1e-6,
// 1e-12 absolute below. Required: max <= 1e-6 per tensor. Over 101 seeds the worst was 5e-8
// (with a floor of 1e-8 instead: 1.2e-6, all of it difference noise on ~1e-9 gradients).
//
// The gradient rule is checked too: parameter grads start at random values and must come back
// increased by the gradient (+=); activation grads start as NaN and must be overwritten (=).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/rng.h"
#include "isa_each.h"
#include "kernels/cpu/grad_cpu.h"
#include "kernels/ops.h"
#include "kernels/ref/mamba_grad_ref.h"

namespace {

namespace G = hm::ref::grad;
using Vec = std::vector<double>;
using LD = long double;
using VecL = std::vector<LD>;

static_assert(std::numeric_limits<LD>::digits >= 64, "finite differences need a wide long double");
constexpr LD kStep = 1e-5L;
constexpr double kFloor = 1e-6;
constexpr double kTol = 1e-6;
// Odd sizes, none equal to another.
constexpr int L = 7, E = 5, N = 3, K = 4, R = 2, D = 6;

Vec uniform(hm::Rng& rng, std::size_t n, double lo, double hi) {
  Vec v(n);
  for (auto& x : v) x = lo + rng.uniform() * (hi - lo);
  return v;
}
Vec normal(hm::Rng& rng, std::size_t n, double scale) {
  Vec v(n);
  for (auto& x : v) x = scale * rng.normal();
  return v;
}
Vec nans(std::size_t n) { return Vec(n, std::numeric_limits<double>::quiet_NaN()); }
template <class T> std::vector<T> cast(const Vec& v) { return std::vector<T>(v.begin(), v.end()); }
double inv_softplus(double y) { return y + std::log(-std::expm1(-y)); }
// dt pre-activations: softplus^-1 of a step log-uniform in [0.001, 0.1] (Mamba's dt init).
Vec dt_init(hm::Rng& rng, std::size_t n) {
  Vec v(n);
  for (auto& x : v) x = inv_softplus(std::exp(std::log(1e-3) + rng.uniform() * std::log(100.0)));
  return v;
}
LD dot(const Vec& a, const VecL& b) {
  LD s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
Vec minus(const Vec& a, const Vec& b) {
  Vec r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}

// Central differences of loss() w.r.t. every element of p (restored afterwards).
Vec finite_diff(VecL& p, const std::function<LD()>& loss) {
  Vec fd(p.size());
  for (std::size_t i = 0; i < p.size(); ++i) {
    const LD keep = p[i];
    p[i] = keep + kStep;
    const LD lp = loss();
    p[i] = keep - kStep;
    const LD lm = loss();
    p[i] = keep;
    fd[i] = double((lp - lm) / (2 * kStep));
  }
  return fd;
}

// The measure described at the top of the file (NaN counts as infinitely wrong).
double grad_err(const Vec& got, const Vec& fd) {
  double worst = 0;
  for (std::size_t i = 0; i < fd.size(); ++i) {
    const double scale = std::max({std::fabs(got[i]), std::fabs(fd[i]), kFloor});
    const double d = std::fabs(got[i] - fd[i]) / scale;
    worst = std::max(worst, std::isnan(d) ? INFINITY : d);
  }
  return worst;
}

// Difference the loss in p (a long double input of the loss), compare with the analytic
// gradient, and report.
void expect_grad(const std::string& name, const Vec& analytic, VecL& p,
                 const std::function<LD()>& loss) {
  ASSERT_EQ(analytic.size(), p.size()) << name;
  const double err = grad_err(analytic, finite_diff(p, loss));
  std::printf("  %-20s max rel err %.2e (%zu elements)\n", name.c_str(), err, p.size());
  EXPECT_LE(err, kTol) << name;
}

// ---------------------------------------------------------------- helpers

TEST(GradMamba, ScalarHelpers) {
  for (double x : {-30.0, -5.0, -0.3, 0.0, 0.7, 4.0, 19.5, 20.5, 40.0}) {
    const double h = 1e-5;
    const double fd_sp = (G::softplus(x + h) - G::softplus(x - h)) / (2 * h);
    const double fd_si = (G::silu(x + h) - G::silu(x - h)) / (2 * h);
    // Past the x > 20 switch softplus is x, off by log1p(exp(-x)) < exp(-20) = 2e-9 (below
    // float resolution there), and its slope 1 is sigmoid(x) to the same 2e-9.
    EXPECT_NEAR(fd_sp, G::sigmoid(x), 3e-9) << x;
    EXPECT_NEAR(G::softplus(x), std::log1p(std::exp(x)), 3e-9) << x;
    EXPECT_NEAR(fd_si, G::silu_grad(x), 1e-9) << x;
  }
  EXPECT_EQ(G::softplus(1000.0), 1000.0);  // no overflow on the linear branch
  EXPECT_EQ(G::sigmoid(-1000.0), 0.0);
  EXPECT_EQ(G::softplus(-1000.0), 0.0);
}

// ---------------------------------------------------------------- ops

TEST(GradMamba, RmsNorm) {
  hm::Rng rng(101);
  const int n = L, d = D;
  const Vec x = uniform(rng, n * d, -2, 2), w = uniform(rng, d, 0.5, 1.5);
  const Vec dout = normal(rng, n * d, 1);
  const double eps = 1e-5;
  Vec out(n * d), rstd(n);
  G::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), n, d, eps);
  Vec dx = nans(n * d), dw0 = uniform(rng, d, -1, 1), dw = dw0;
  G::rmsnorm_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), n, d);

  VecL lx = cast<LD>(x), lw = cast<LD>(w), lout(n * d), lrstd(n);
  auto loss = [&] {
    G::rmsnorm_forward(lout.data(), lrstd.data(), lx.data(), lw.data(), n, d, eps);
    return dot(dout, lout);
  };
  expect_grad("rmsnorm dx", dx, lx, loss);
  expect_grad("rmsnorm dw", minus(dw, dw0), lw, loss);
}

TEST(GradMamba, Linear) {
  hm::Rng rng(102);
  const int m = L, n = E, k = D;
  const Vec x = normal(rng, m * k, 1), W = uniform(rng, n * k, -0.5, 0.5);
  const Vec dy = normal(rng, m * n, 1);
  Vec dx = nans(m * k), dW0 = uniform(rng, n * k, -1, 1), dW = dW0, dW_nodx = dW0;
  G::linear_backward(dx.data(), dW.data(), dy.data(), x.data(), W.data(), m, n, k);
  G::linear_backward<double>(nullptr, dW_nodx.data(), dy.data(), x.data(), W.data(), m, n, k);
  // dx = null skips only dx. Equal up to rounding: with FMA (-march=native) the compiler may
  // contract the two call sites differently (it did once this file gained another caller).
  for (std::size_t i = 0; i < dW.size(); ++i)
    EXPECT_NEAR(dW[i], dW_nodx[i], 1e-14 * std::max(1.0, std::fabs(dW[i]))) << i;

  VecL lx = cast<LD>(x), lW = cast<LD>(W), ly(m * n);
  auto loss = [&] {
    G::linear_forward(ly.data(), lx.data(), lW.data(), m, n, k);
    return dot(dy, ly);
  };
  expect_grad("linear dx", dx, lx, loss);
  expect_grad("linear dW", minus(dW, dW0), lW, loss);
}

TEST(GradMamba, Conv1dSilu) {
  hm::Rng rng(103);
  const double s = 1 / std::sqrt(double(K));
  const Vec x = normal(rng, L * E, 1), w = uniform(rng, E * K, -s, s), b = uniform(rng, E, -s, s);
  const Vec dout = normal(rng, L * E, 1);
  Vec dx = nans(L * E), dw0 = uniform(rng, E * K, -1, 1), db0 = uniform(rng, E, -1, 1);
  Vec dw = dw0, db = db0;
  G::conv1d_silu_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(),
                          b.data(), L, E, K);

  VecL lx = cast<LD>(x), lw = cast<LD>(w), lb = cast<LD>(b), lout(L * E);
  auto loss = [&] {
    G::conv1d_silu_forward(lout.data(), lx.data(), lw.data(), lb.data(), L, E, K);
    return dot(dout, lout);
  };
  expect_grad("conv dx", dx, lx, loss);
  expect_grad("conv dw", minus(dw, dw0), lw, loss);
  expect_grad("conv db", minus(db, db0), lb, loss);
}

// The fast float backward (kernels/cpu/grad_cpu.cpp) against this reference in double, on the
// same float inputs: odd channel counts around the 16-lane width, L across the 64-token
// summation blocks, one token, and K = 3 and 4. Per tensor max |f - d| / max |d| <= 1e-5.
HM_ISA_TEST(GradMamba, FastConv1dSiluBackwardMatchesReference) {
  struct Case { int L, E, K; };
  for (const Case c : {Case{1, 5, 4}, Case{7, 16, 4}, Case{70, 33, 4}, Case{130, 17, 3}}) {
    hm::Rng rng(700 + c.L);
    const double s = 1 / std::sqrt(double(c.K));
    const auto x = cast<float>(normal(rng, size_t(c.L) * c.E, 1)),
               w = cast<float>(uniform(rng, size_t(c.E) * c.K, -s, s)),
               b = cast<float>(uniform(rng, size_t(c.E), -s, s)),
               dout = cast<float>(normal(rng, size_t(c.L) * c.E, 1));
    const auto dw0 = cast<float>(uniform(rng, size_t(c.E) * c.K, -1, 1)),
               db0 = cast<float>(uniform(rng, size_t(c.E), -1, 1));
    std::vector<float> dx(x.size(), NAN), dw = dw0, db = db0;
    hm::cpu::grad::conv1d_silu_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(),
                                        w.data(), b.data(), c.L, c.E, c.K);
    const Vec xd(x.begin(), x.end()), wd(w.begin(), w.end()), bd(b.begin(), b.end()),
        doutd(dout.begin(), dout.end());
    Vec dxd(x.size()), dwd(dw0.begin(), dw0.end()), dbd(db0.begin(), db0.end());
    G::conv1d_silu_backward(dxd.data(), dwd.data(), dbd.data(), doutd.data(), xd.data(), wd.data(),
                            bd.data(), c.L, c.E, c.K);
    auto worst = [](const std::vector<float>& f, const Vec& d) {
      double e = 0, m = 0;
      for (size_t i = 0; i < d.size(); ++i) {
        e = std::max(e, std::isnan(f[i]) ? INFINITY : std::fabs(double(f[i]) - d[i]));
        m = std::max(m, std::fabs(d[i]));
      }
      return e / m;
    };
    const std::string at = "L=" + std::to_string(c.L) + " E=" + std::to_string(c.E);
    EXPECT_LE(worst(dx, dxd), 1e-5) << at;
    EXPECT_LE(worst(dw, dwd), 1e-5) << at;
    EXPECT_LE(worst(db, dbd), 1e-5) << at;
  }
}

// Inputs of one selective scan at realistic scales, in scalar type T.
template <class T> struct ScanInputs {
  std::vector<T> x, dt, dt_bias, A, B, C, Dskip, z;
  ScanInputs() = default;
  ScanInputs(hm::Rng& rng, int l) {
    Vec A_(E * N);                          // A = -(1..N), jittered per channel
    for (int e = 0; e < E; ++e)
      for (int n = 0; n < N; ++n) A_[e * N + n] = -(n + 1) * (0.8 + 0.4 * rng.uniform());
    x = cast<T>(normal(rng, l * E, 1));
    dt_bias = cast<T>(dt_init(rng, E));     // delta = softplus(dt + dt_bias) ~ 0.001 .. 0.1
    dt = cast<T>(uniform(rng, l * E, -0.5, 0.5));
    A = cast<T>(A_);
    B = cast<T>(normal(rng, l * N, 1));
    C = cast<T>(normal(rng, l * N, 1));
    Dskip = cast<T>(uniform(rng, E, 0.5, 1.5));
    z = cast<T>(normal(rng, l * E, 1));
  }
  template <class U> ScanInputs<U> as() const {
    auto c = [](const std::vector<T>& v) { return std::vector<U>(v.begin(), v.end()); };
    ScanInputs<U> r;
    r.x = c(x), r.dt = c(dt), r.dt_bias = c(dt_bias), r.A = c(A);
    r.B = c(B), r.C = c(C), r.Dskip = c(Dskip), r.z = c(z);
    return r;
  }
  void forward(T* y, int l, G::acc_t<T>* states = nullptr, int chunk = 0) const {
    G::selective_scan_forward(y, x.data(), dt.data(), dt_bias.data(), A.data(), B.data(), C.data(),
                              Dskip.data(), z.data(), l, E, N, states, chunk);
  }
};

// Scan gradients, in the backward's argument order.
struct ScanGrads {
  Vec dx, ddt, ddt_bias, dA, dB, dC, dD, dz;
  ScanGrads(int l, const Vec& pre_bias, const Vec& pre_A, const Vec& pre_D)
      : dx(nans(l * E)), ddt(nans(l * E)), ddt_bias(pre_bias), dA(pre_A), dB(nans(l * N)),
        dC(nans(l * N)), dD(pre_D), dz(nans(l * E)) {}
};

// chunk = 0: the oracle; chunk > 0: the chunked backward from the forward's boundary states
// (states = null: the convenience form that saves them itself).
void scan_backward(ScanGrads& g, const Vec& dy, const ScanInputs<double>& in, int l, int chunk,
                   const double* states = nullptr) {
  double *dx = g.dx.data(), *ddt = g.ddt.data(), *ddtb = g.ddt_bias.data(), *dA = g.dA.data();
  double *dB = g.dB.data(), *dC = g.dC.data(), *dD = g.dD.data(), *dz = g.dz.data();
  const double *x = in.x.data(), *dt = in.dt.data(), *dtb = in.dt_bias.data(), *A = in.A.data();
  const double *B = in.B.data(), *C = in.C.data(), *Ds = in.Dskip.data(), *z = in.z.data();
  if (chunk == 0)
    G::selective_scan_backward(dx, ddt, ddtb, dA, dB, dC, dD, dz, dy.data(), x, dt, dtb, A, B, C,
                               Ds, z, l, E, N);
  else if (states)
    G::selective_scan_backward_chunked(dx, ddt, ddtb, dA, dB, dC, dD, dz, dy.data(), x, dt, dtb, A,
                                       B, C, Ds, z, l, E, N, states, chunk);
  else
    G::selective_scan_backward_chunked(dx, ddt, ddtb, dA, dB, dC, dD, dz, dy.data(), x, dt, dtb, A,
                                       B, C, Ds, z, l, E, N, chunk);
}

TEST(GradMamba, SelectiveScan) {
  hm::Rng rng(104);
  const ScanInputs<double> in(rng, L);
  const Vec dy = normal(rng, L * E, 1);
  const Vec pb = uniform(rng, E, -1, 1), pA = uniform(rng, E * N, -1, 1);
  const Vec pD = uniform(rng, E, -1, 1);
  ScanGrads g(L, pb, pA, pD);
  scan_backward(g, dy, in, L, 0);

  ScanInputs<LD> li = in.as<LD>();
  VecL ly(L * E);
  auto loss = [&] {
    li.forward(ly.data(), L);
    return dot(dy, ly);
  };
  expect_grad("scan dx", g.dx, li.x, loss);
  expect_grad("scan ddt", g.ddt, li.dt, loss);
  expect_grad("scan ddt_bias", minus(g.ddt_bias, pb), li.dt_bias, loss);
  expect_grad("scan dA", minus(g.dA, pA), li.A, loss);
  expect_grad("scan dB", g.dB, li.B, loss);
  expect_grad("scan dC", g.dC, li.C, loss);
  expect_grad("scan dD", minus(g.dD, pD), li.Dskip, loss);
  expect_grad("scan dz", g.dz, li.z, loss);
}

// Same per-step arithmetic in the same order, so equal up to rounding: bitwise without FMA
// contraction; a few ulps allowed in case the compiler contracts one path differently.
void expect_same(const Vec& got, const Vec& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t i = 0; i < got.size(); ++i)
    EXPECT_NEAR(got[i], want[i], 1e-13 * std::max(1.0, std::fabs(want[i])))
        << what << "[" << i << "]";
}

// The chunked backward (boundary states + recompute) gives the oracle's gradients, for chunks
// of one token, a size that does not divide L, exactly L, and longer than L.
TEST(GradMamba, ChunkedScanMatchesFull) {
  hm::Rng rng(105);
  const ScanInputs<double> in(rng, L);
  const Vec dy = normal(rng, L * E, 1);
  const Vec pb = uniform(rng, E, -1, 1), pA = uniform(rng, E * N, -1, 1);
  const Vec pD = uniform(rng, E, -1, 1);
  ScanGrads full(L, pb, pA, pD);
  scan_backward(full, dy, in, L, 0);
  Vec y0(L * E);
  in.forward(y0.data(), L);
  for (int chunk : {1, 3, L, L + 5}) {
    const std::string tag = " chunk " + std::to_string(chunk);
    // The forward saves only the boundary states (entry 0 the zero state); y is unchanged.
    Vec states(G::scan_num_chunks(L, chunk) * E * N, -1.0), y(L * E);
    in.forward(y.data(), L, states.data(), chunk);
    EXPECT_EQ(y, y0) << tag;
    for (int i = 0; i < E * N; ++i) EXPECT_EQ(states[i], 0.0) << tag;
    ScanGrads c(L, pb, pA, pD), c2(L, pb, pA, pD);
    scan_backward(c, dy, in, L, chunk, states.data());
    scan_backward(c2, dy, in, L, chunk);  // the form that saves the states itself
    for (const auto* g : {&c, &c2}) {
      expect_same(g->dx, full.dx, "dx" + tag);
      expect_same(g->ddt, full.ddt, "ddt" + tag);
      expect_same(g->ddt_bias, full.ddt_bias, "ddt_bias" + tag);
      expect_same(g->dA, full.dA, "dA" + tag);
      expect_same(g->dB, full.dB, "dB" + tag);
      expect_same(g->dC, full.dC, "dC" + tag);
      expect_same(g->dD, full.dD, "dD" + tag);
      expect_same(g->dz, full.dz, "dz" + tag);
    }
  }
}

// ---------------------------------------------------------------- the whole mixer

template <class T> struct BlockParams {
  std::vector<T> in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, A_log, Dskip, out_proj;
  static constexpr const char* kNames[9] = {"in_proj", "conv_w", "conv_b", "x_proj", "dt_w",
                                            "dt_b",    "A_log",  "D",      "out_proj"};
  BlockParams() = default;
  explicit BlockParams(hm::Rng& rng) {  // docs/MODEL.md's init, A_log and D jittered
    const double si = 1 / std::sqrt(double(D)), sk = 1 / std::sqrt(double(K));
    const double se = 1 / std::sqrt(double(E)), sr = 1 / std::sqrt(double(R));
    Vec A_log_(E * N);
    for (int e = 0; e < E; ++e)
      for (int n = 0; n < N; ++n)
        A_log_[e * N + n] = std::log(n + 1.0) + 0.2 * (rng.uniform() - 0.5);
    in_proj = cast<T>(uniform(rng, 2 * E * D, -si, si));
    conv_w = cast<T>(uniform(rng, E * K, -sk, sk));
    conv_b = cast<T>(uniform(rng, E, -sk, sk));
    x_proj = cast<T>(uniform(rng, (R + 2 * N) * E, -se, se));
    dt_w = cast<T>(uniform(rng, E * R, -sr, sr));
    dt_b = cast<T>(dt_init(rng, E));
    A_log = cast<T>(A_log_);
    Dskip = cast<T>(uniform(rng, E, 0.5, 1.5));
    out_proj = cast<T>(uniform(rng, D * E, -se, se));
  }
  std::vector<std::vector<T>*> all() {
    return {&in_proj, &conv_w, &conv_b, &x_proj, &dt_w, &dt_b, &A_log, &Dskip, &out_proj};
  }
  std::vector<const std::vector<T>*> all() const {
    return {&in_proj, &conv_w, &conv_b, &x_proj, &dt_w, &dt_b, &A_log, &Dskip, &out_proj};
  }
  template <class U> BlockParams<U> as() const {
    BlockParams<U> r;
    const auto self = all();
    const auto other = r.all();
    for (int i = 0; i < 9; ++i) *other[i] = std::vector<U>(self[i]->begin(), self[i]->end());
    return r;
  }
  G::MambaWeights<T> weights() const {
    return {in_proj.data(), conv_w.data(), conv_b.data(), x_proj.data(), dt_w.data(),
            dt_b.data(),    A_log.data(),  Dskip.data(),  out_proj.data()};
  }
  G::MambaGrads<T> grads() {
    return {in_proj.data(), conv_w.data(), conv_b.data(), x_proj.data(), dt_w.data(),
            dt_b.data(),    A_log.data(),  Dskip.data(),  out_proj.data()};
  }
};

TEST(GradMamba, MambaBlock) {
  hm::Rng rng(106);
  const G::MambaDims dims{D, E, N, K, R};
  const BlockParams<double> p(rng);
  const Vec u = normal(rng, L * D, 1), dout = normal(rng, L * D, 1);
  const BlockParams<double> pre(rng);  // parameter grads start here: they must accumulate

  // Forward saving activations, then backward; returns du and the parameter gradients.
  auto backward = [&](int chunk, Vec& du) {
    BlockParams<double> g = pre;
    G::MambaActs<double> acts;
    Vec out(L * D);
    G::mamba_block_forward(out.data(), acts, u.data(), p.weights(), dims, L, chunk);
    du = nans(L * D);
    G::mamba_block_backward(du.data(), g.grads(), dout.data(), u.data(), p.weights(), acts, dims);
    const auto gv = g.all();
    const auto pv = pre.all();
    std::vector<Vec> d;
    for (int i = 0; i < 9; ++i) d.push_back(minus(*gv[i], *pv[i]));
    return d;
  };
  Vec du, du_chunked;
  const std::vector<Vec> grads = backward(0, du);

  BlockParams<LD> lp = p.as<LD>();
  VecL lu = cast<LD>(u), lout(L * D);
  auto loss = [&] {
    G::MambaActs<LD> acts;
    G::mamba_block_forward(lout.data(), acts, lu.data(), lp.weights(), dims, L);
    return dot(dout, lout);
  };
  expect_grad("block du", du, lu, loss);
  const auto params = lp.all();
  for (int i = 0; i < 9; ++i)
    expect_grad(std::string("block d") + BlockParams<LD>::kNames[i], grads[i], *params[i], loss);

  // Training keeps only chunk-boundary scan states: same gradients.
  const std::vector<Vec> grads_c = backward(3, du_chunked);
  expect_same(du_chunked, du, "block du chunked");
  for (int i = 0; i < 9; ++i)
    expect_same(grads_c[i], grads[i],
                std::string("block chunked d") + BlockParams<double>::kNames[i]);
}

// Gradient arriving at the gated output yg from outside the block (a state bridge reads it):
// loss = dout . out + dyg . yg; the extra term must reach u and every parameter.
TEST(GradMamba, MambaBlockExtraInnerGradient) {
  hm::Rng rng(108);
  const G::MambaDims dims{D, E, N, K, R};
  const BlockParams<double> p(rng);
  const Vec u = normal(rng, L * D, 1), dout = normal(rng, L * D, 1), dyg = normal(rng, L * E, 1);
  const BlockParams<double> pre(rng);
  BlockParams<double> g = pre;
  G::MambaActs<double> acts;
  Vec out(L * D), du = nans(L * D);
  G::mamba_block_forward(out.data(), acts, u.data(), p.weights(), dims, L);
  G::mamba_block_backward(du.data(), g.grads(), dout.data(), u.data(), p.weights(), acts, dims,
                          dyg.data());

  BlockParams<LD> lp = p.as<LD>();
  VecL lu = cast<LD>(u), lout(L * D);
  auto loss = [&] {
    G::MambaActs<LD> la;
    G::mamba_block_forward(lout.data(), la, lu.data(), lp.weights(), dims, L);
    return dot(dout, lout) + dot(dyg, la.yg);
  };
  expect_grad("block+dyg du", du, lu, loss);
  const auto params = lp.all();
  const auto gv = g.all();
  const auto pv = pre.all();
  for (int i = 0; i < 9; ++i)
    expect_grad(std::string("block+dyg d") + BlockParams<LD>::kNames[i], minus(*gv[i], *pv[i]),
                *params[i], loss);
}

// ---------------------------------------------------------------- float forward = hm::ref

// max_i |a_i - b_i| / (|b_i| + rms(b)), as in tests/test_kernels.cpp.
double float_err(const std::vector<float>& a, const std::vector<float>& b) {
  double ss = 0;
  for (float v : b) ss += double(v) * v;
  const double rms = std::sqrt(ss / b.size());
  double worst = 0;
  for (std::size_t i = 0; i < b.size(); ++i)
    worst = std::max(worst, std::fabs(double(a[i]) - b[i]) / (std::fabs(double(b[i])) + rms));
  return worst;
}

// Both sides widen float inputs to double sums and round once: a few float ulps at most (today
// they agree bit for bit).
constexpr double kFloatTol = 1e-6;

TEST(GradMamba, FloatForwardMatchesRef) {
  hm::Rng rng(107);
  {
    const auto x = cast<float>(uniform(rng, L * D, -2, 2));
    const auto w = cast<float>(uniform(rng, D, 0.5, 1.5));
    std::vector<float> got(L * D), rstd(L), want(L * D);
    G::rmsnorm_forward(got.data(), rstd.data(), x.data(), w.data(), L, D, 1e-5f);
    hm::ref::rmsnorm(want.data(), x.data(), w.data(), L, D, 1e-5f);
    EXPECT_LE(float_err(got, want), kFloatTol) << "rmsnorm";
  }
  {
    const auto x = cast<float>(normal(rng, L * D, 1));
    const auto W = cast<float>(uniform(rng, E * D, -0.5, 0.5));
    std::vector<float> got(L * E), want(L * E);
    G::linear_forward(got.data(), x.data(), W.data(), L, E, D);
    hm::ref::linear(want.data(), E, x.data(), D, W.data(), L, E, D, false);
    EXPECT_LE(float_err(got, want), kFloatTol) << "linear";
  }
  {
    const auto x = cast<float>(normal(rng, L * E, 1));
    const auto w = cast<float>(uniform(rng, E * K, -0.5, 0.5));
    const auto b = cast<float>(uniform(rng, E, -0.5, 0.5));
    std::vector<float> got(L * E), want(L * E), state(E * (K - 1), 0.0f);
    G::conv1d_silu_forward(got.data(), x.data(), w.data(), b.data(), L, E, K);
    hm::ref::conv1d_silu(want.data(), E, state.data(), x.data(), E, w.data(), b.data(), L, E, K);
    EXPECT_LE(float_err(got, want), kFloatTol) << "conv1d_silu";
  }
  {
    const ScanInputs<float> in = ScanInputs<double>(rng, L).as<float>();
    std::vector<float> got(L * E), want(L * E), state(E * N, 0.0f);
    in.forward(got.data(), L);
    hm::ref::selective_scan(want.data(), E, state.data(), in.x.data(), E, in.dt.data(), E,
                            in.dt_bias.data(), in.A.data(), in.B.data(), in.C.data(), N,
                            in.Dskip.data(), in.z.data(), E, L, E, N);
    EXPECT_LE(float_err(got, want), kFloatTol) << "selective_scan";
  }
}

}  // namespace

// The fast float Mamba block (kernels/cpu/grad_cpu.cpp: blocked scan over 8-channel lanes plus
// one-at-a-time channels for E % 8, SIMD conv backward) against the double reference on the
// same float inputs, with the full state and with chunk-boundary states (chunks that do and do
// not divide L). Per tensor max |f - d| / max |d| <= 2e-5.
HM_ISA_TEST(GradMamba, FastBlockMatchesReference) {
  struct Case { int L, D, E, N, R, chunk; };
  for (const Case c : {Case{1, 8, 16, 16, 2, 0}, Case{37, 10, 20, 16, 3, 0}, Case{37, 10, 20, 16, 3, 8},
                       Case{64, 12, 29, 8, 2, 16}, Case{50, 6, 12, 32, 1, 0}}) {
    hm::Rng rng(800 + c.L + c.E);
    const int Kc = 4, P = c.R + 2 * c.N;
    const double si = 1 / std::sqrt(double(c.D)), sk = 0.5, se = 1 / std::sqrt(double(c.E)),
                 sr = 1 / std::sqrt(double(c.R));
    Vec A_log(size_t(c.E) * c.N);
    for (int e = 0; e < c.E; ++e)
      for (int n = 0; n < c.N; ++n) A_log[size_t(e) * c.N + n] = std::log(n + 1.0) + 0.2 * (rng.uniform() - 0.5);
    std::vector<Vec> wd = {uniform(rng, size_t(2) * c.E * c.D, -si, si), uniform(rng, size_t(c.E) * Kc, -sk, sk),
                           uniform(rng, size_t(c.E), -sk, sk),          uniform(rng, size_t(P) * c.E, -se, se),
                           uniform(rng, size_t(c.E) * c.R, -sr, sr),    dt_init(rng, size_t(c.E)),
                           A_log,                                       uniform(rng, size_t(c.E), 0.5, 1.5),
                           uniform(rng, size_t(c.D) * c.E, -se, se)};
    for (auto& v : wd) {  // float-representable, so both paths see the same numbers
      const auto f = cast<float>(v);
      v = Vec(f.begin(), f.end());
    }
    const auto uf = cast<float>(normal(rng, size_t(c.L) * c.D, 1));
    const auto doutf = cast<float>(normal(rng, size_t(c.L) * c.D, 1));
    std::vector<std::vector<float>> wf;
    for (const auto& v : wd) wf.push_back(cast<float>(v));
    const G::MambaDims dims{c.D, c.E, c.N, Kc, c.R};
    // float fast path
    G::MambaActs<float> af;
    std::vector<float> outf(size_t(c.L) * c.D), duf(uf.size(), NAN);
    std::vector<std::vector<float>> gf;
    for (const auto& v : wf) gf.emplace_back(v.size(), 0.0f);
    const G::MambaWeights<float> Wf{wf[0].data(), wf[1].data(), wf[2].data(), wf[3].data(), wf[4].data(),
                                    wf[5].data(), wf[6].data(), wf[7].data(), wf[8].data()};
    hm::cpu::grad::mamba_block_forward(outf.data(), af, uf.data(), Wf, dims, c.L, c.chunk);
    hm::cpu::grad::mamba_block_backward(duf.data(),
                                        {gf[0].data(), gf[1].data(), gf[2].data(), gf[3].data(), gf[4].data(),
                                         gf[5].data(), gf[6].data(), gf[7].data(), gf[8].data()},
                                        doutf.data(), uf.data(), Wf, af, dims, nullptr);
    // double reference
    G::MambaActs<double> ad;
    const Vec ud(uf.begin(), uf.end()), doutd(doutf.begin(), doutf.end());
    Vec outd(outf.size()), dud(ud.size());
    std::vector<Vec> gd;
    for (const auto& v : wd) gd.emplace_back(v.size(), 0.0);
    const G::MambaWeights<double> Wd{wd[0].data(), wd[1].data(), wd[2].data(), wd[3].data(), wd[4].data(),
                                     wd[5].data(), wd[6].data(), wd[7].data(), wd[8].data()};
    G::mamba_block_forward(outd.data(), ad, ud.data(), Wd, dims, c.L);
    G::mamba_block_backward(dud.data(),
                            {gd[0].data(), gd[1].data(), gd[2].data(), gd[3].data(), gd[4].data(),
                             gd[5].data(), gd[6].data(), gd[7].data(), gd[8].data()},
                            doutd.data(), ud.data(), Wd, ad, dims);
    auto worst = [](const std::vector<float>& f, const Vec& d) {
      double e = 0, m = 0;
      for (size_t i = 0; i < d.size(); ++i) {
        e = std::max(e, std::isnan(f[i]) ? INFINITY : std::fabs(double(f[i]) - d[i]));
        m = std::max(m, std::fabs(d[i]));
      }
      return m > 0 ? e / m : e;  // dA is exactly 0 at L = 1 (h[-1] = 0)
    };
    const std::string at = "L=" + std::to_string(c.L) + " E=" + std::to_string(c.E) +
                           " N=" + std::to_string(c.N) + " chunk=" + std::to_string(c.chunk);
    EXPECT_LE(worst(outf, outd), 2e-5) << at << " out";
    EXPECT_LE(worst(duf, dud), 2e-5) << at << " du";
    for (int i = 0; i < 9; ++i)
      EXPECT_LE(worst(gf[size_t(i)], gd[size_t(i)]), 2e-5) << at << " d" << BlockParams<double>::kNames[i];
  }
}
