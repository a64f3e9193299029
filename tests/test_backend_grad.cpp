// The training ops of the backend interface (backend.h), as test-backend-ops does for ggml: each
// op runs on the CPU backend and on the ref backend on fresh random inputs at odd sizes (ragged
// batches of sequences 5, 1 and 37 tokens long, activations read and written through strided
// views whose padding is NaN, so a read past a row shows), and
//   forward:  both against the op's reference pair in double (kernels/ref/*_grad_ref.h);
//   backward: cpu against ref, and each input's gradient against a finite difference of the
//             double forward: for a random direction V, sum(dout . f(x + hV)) in a 4-point
//             central stencil against <grad, V>, the error relative to sum |grad V|.
// Parameter gradients start from 0.5 and must accumulate; activation gradients start NaN and
// must be assigned.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <algorithm>
#include <numeric>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/counting_backend.h"
#include "backend/id_rows.h"
#include "core/error.h"
#include "core/rng.h"
#include "kernels/ref/attention_grad_ref.h"
#include "kernels/ref/mamba_grad_ref.h"

using namespace hm;

namespace {

namespace RG = ref::grad;
using Vec = std::vector<float>;
using Vec64 = std::vector<double>;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int kPad = 3;  // extra columns of every strided activation view

// A host matrix behind a Tensor view; strided ones carry kPad NaN columns per row.
struct Mat {
  int rows, cols, ld;
  Vec buf;
  Mat(int r, int c, bool strided, float fill)
      : rows(r), cols(c), ld(c + (strided ? kPad : 0)), buf(size_t(r) * size_t(ld), kNaN) {
    for (int i = 0; i < r; ++i) std::fill_n(buf.begin() + ptrdiff_t(i) * ld, c, fill);
  }
  Mat(const Vec& dense, int r, int c, bool strided) : Mat(r, c, strided, 0.0f) {
    for (int i = 0; i < r; ++i) std::copy_n(dense.begin() + ptrdiff_t(i) * c, c, buf.begin() + ptrdiff_t(i) * ld);
  }
  Tensor t() { return {buf.data(), DType::F32, rows, cols, ld}; }
  Vec dense() const {
    Vec d(size_t(rows) * cols);
    for (int i = 0; i < rows; ++i) std::copy_n(buf.begin() + ptrdiff_t(i) * ld, cols, d.begin() + ptrdiff_t(i) * cols);
    return d;
  }
  // The padding still NaN: nothing wrote past a row.
  bool padding_intact() const {
    for (int i = 0; i < rows; ++i)
      for (int j = cols; j < ld; ++j)
        if (!std::isnan(buf[size_t(i) * ld + j])) return false;
    return true;
  }
};

Vec randv(Rng& rng, size_t n, double lo, double hi) {
  Vec v(n);
  for (float& x : v) x = float(lo + (hi - lo) * rng.uniform());
  return v;
}

// One input of an op: its shape, the range of its random values, whether the op takes it as a
// strided view (activations) and whether it has a gradient.
struct Input {
  std::string name;
  int rows, cols;
  double lo = -1, hi = 1;
  bool strided = true, grad = true;
};

struct RunResult {
  std::vector<Vec> out;    // forward outputs, dense
  std::vector<Vec> grads;  // per input (empty where it has none), dense
};

// An op under test: inputs, the double forward (outputs flattened into one vector, the part the
// backward differentiates first, `n_diff` values), and the backend's forward + backward.
struct OpCase {
  std::string name;
  std::vector<Input> inputs;
  std::function<Vec64(const std::vector<Vec64>&)> f64;
  size_t n_diff = 0;  // leading values of f64's output that dout weighs (0: all)
  std::function<RunResult(Backend&, const std::vector<Vec>&, const Vec& dout)> run;
  double tol_fwd = 2e-5, tol_grad = 2e-5, tol_fd = 2e-5;
};

double rel(const Vec& a, const Vec64& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num = std::max(num, std::fabs(double(a[i]) - b[i]));
    den = std::max(den, std::fabs(b[i]));
    if (std::isnan(a[i])) return INFINITY;
  }
  return num / std::max(den, 1e-30);
}
double rel(const Vec& a, const Vec& b) { return rel(a, Vec64(b.begin(), b.end())); }

void check_op(const OpCase& op, uint64_t seed) {
  SCOPED_TRACE(op.name);
  Rng rng(seed);
  std::vector<Vec> in;
  for (const Input& i : op.inputs) in.push_back(randv(rng, size_t(i.rows) * i.cols, i.lo, i.hi));
  std::vector<Vec64> in64;
  for (const Vec& v : in) in64.emplace_back(v.begin(), v.end());
  const Vec64 want = op.f64(in64);
  const size_t nd = op.n_diff ? op.n_diff : want.size();
  const Vec dout = randv(rng, nd, -1, 1);
  auto cpu = make_cpu_backend();
  auto rf = make_ref_backend();
  const RunResult rc = op.run(*cpu, in, dout), rr = op.run(*rf, in, dout);

  // Forward: every output against the double pair, concatenated as f64 returns them.
  for (const RunResult* r : {&rc, &rr}) {
    Vec got;
    for (const Vec& o : r->out) got.insert(got.end(), o.begin(), o.end());
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LE(rel(got, want), op.tol_fwd) << (r == &rc ? "cpu" : "ref") << " forward";
  }
  // Backward: cpu against ref, then each against finite differences of the double forward.
  double worst = 0;
  for (size_t k = 0; k < op.inputs.size(); ++k) {
    if (!op.inputs[k].grad) continue;
    SCOPED_TRACE(op.inputs[k].name);
    ASSERT_EQ(rc.grads[k].size(), in[k].size());
    EXPECT_LE(rel(rc.grads[k], rr.grads[k]), op.tol_grad) << "cpu against ref";
    const Vec V = randv(rng, in[k].size(), -1, 1);
    auto loss = [&](double h) {
      std::vector<Vec64> x = in64;
      for (size_t j = 0; j < V.size(); ++j) x[k][j] += h * V[j];
      const Vec64 y = op.f64(x);
      long double s = 0;
      for (size_t j = 0; j < nd; ++j) s += (long double)(dout[j]) * y[j];
      return double(s);
    };
    const double h = 1e-3;
    const double fd = (8 * (loss(h) - loss(-h)) - (loss(2 * h) - loss(-2 * h))) / (12 * h);
    for (const RunResult* r : {&rc, &rr}) {
      double a = 0, scale = 0;
      for (size_t j = 0; j < V.size(); ++j) {
        a += double(r->grads[k][j]) * V[j];
        scale += std::fabs(double(r->grads[k][j]) * V[j]);
      }
      const double err = std::fabs(a - fd) / std::max(scale, 1e-12);
      EXPECT_LE(err, op.tol_fd) << (r == &rc ? "cpu" : "ref") << ": <grad, V> " << a << ", fd " << fd;
      worst = std::max(worst, err);
    }
  }
  std::printf("  %-28s worst FD error %.2e\n", op.name.c_str(), worst);
}

// Ragged batch of training sequences (every one from position 0; slots unused).
void fill(Ragged& rg, const std::vector<int>& lens) {
  rg.clear();
  for (int s = 0; s < int(lens.size()); ++s) rg.add(s, lens[size_t(s)], 0);
}
const std::vector<int> kLens = {5, 1, 37};
constexpr int kTok = 43;

// Activation-gradient outputs start NaN (must be assigned), parameter gradients 0.5 (must add).
constexpr float kParamStart = 0.5f;
Vec minus_start(const Vec& g) {
  Vec d(g);
  for (float& v : d) v -= kParamStart;
  return d;
}

// ---------------------------------------------------------------- the ops

OpCase linear_case(bool accumulate) {
  const int m = 11, n = 7, k = 13;
  OpCase op;
  op.name = accumulate ? "linear_backward (dx +=)" : "linear_backward";
  op.inputs = {{"x", m, k}, {"W", n, k, -1, 1, false}};
  op.f64 = [=](const std::vector<Vec64>& in) {
    Vec64 y(size_t(m) * n);
    RG::linear_forward(y.data(), in[0].data(), in[1].data(), m, n, k);
    return y;
  };
  op.run = [=](Backend& be, const std::vector<Vec>& in, const Vec& dout) {
    Mat x(in[0], m, k, true), W(in[1], n, k, false), y(m, n, true, kNaN), dy(dout, m, n, true);
    Mat dx(m, k, true, accumulate ? 0.25f : kNaN), dW(n, k, false, kParamStart);
    be.linear(y.t(), x.t(), W.t(), false);
    be.linear_backward(dx.t(), dW.t(), dy.t(), x.t(), W.t(), accumulate);
    EXPECT_TRUE(x.padding_intact() && dx.padding_intact() && y.padding_intact());
    Vec gx = dx.dense();
    if (accumulate)
      for (float& v : gx) v -= 0.25f;
    return RunResult{{y.dense()}, {gx, minus_start(dW.dense())}};
  };
  return op;
}

OpCase rmsnorm_case() {
  const int n = 9, d = 21;
  const float eps = 1e-5f;
  OpCase op;
  op.name = "rmsnorm_backward";
  op.inputs = {{"x", n, d, -2, 2, false}, {"w", 1, d, 0.5, 1.5, false}};
  op.f64 = [=](const std::vector<Vec64>& in) {
    Vec64 y(size_t(n) * d), rstd(static_cast<size_t>(n));
    RG::rmsnorm_forward(y.data(), rstd.data(), in[0].data(), in[1].data(), n, d, eps);
    return y;
  };
  op.run = [=](Backend& be, const std::vector<Vec>& in, const Vec& dout) {
    Mat x(in[0], n, d, false), w(in[1], 1, d, false), y(n, d, false, kNaN), dy(dout, n, d, false);
    Mat dx(n, d, false, kNaN), dw(1, d, false, kParamStart);
    be.rmsnorm(y.t(), x.t(), w.t(), eps);
    be.rmsnorm_backward(dx.t(), dw.t(), dy.t(), x.t(), w.t(), eps, false);
    return RunResult{{y.dense()}, {dx.dense(), minus_start(dw.dense())}};
  };
  return op;
}

OpCase swiglu_case() {
  const int n = 7, f = 19;
  OpCase op;
  op.name = "swiglu_backward";
  op.inputs = {{"g", n, f, -4, 4}, {"u", n, f}};
  op.f64 = [=](const std::vector<Vec64>& in) {
    Vec64 y(size_t(n) * f);
    RG::swiglu_forward(y.data(), in[0].data(), in[1].data(), n, f);
    return y;
  };
  op.run = [=](Backend& be, const std::vector<Vec>& in, const Vec& dout) {
    // swiglu's g and u share one row stride: column views of one [n, 2f] matrix, as a GEMM writes them.
    Mat gu(n, 2 * f, false, 0.0f);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < f; ++j) {
        gu.buf[size_t(i) * 2 * f + j] = in[0][size_t(i) * f + j];
        gu.buf[size_t(i) * 2 * f + f + j] = in[1][size_t(i) * f + j];
      }
    Mat y(n, f, true, kNaN), dy(dout, n, f, true), dg(n, f, true, kNaN), du(n, f, true, kNaN);
    be.swiglu(y.t(), gu.t().cols_view(0, f), gu.t().cols_view(f, f));
    be.swiglu_backward(dg.t(), du.t(), dy.t(), gu.t().cols_view(0, f), gu.t().cols_view(f, f));
    EXPECT_TRUE(dg.padding_intact() && du.padding_intact());
    return RunResult{{y.dense()}, {dg.dense(), du.dense()}};
  };
  return op;
}

OpCase conv_case(int K) {
  const int E = 19;
  OpCase op;
  op.name = "conv1d_silu K " + std::to_string(K);
  op.inputs = {{"x", kTok, E}, {"w", E, K, -1, 1, false}, {"b", 1, E, -0.5, 0.5, false}};
  op.f64 = [=](const std::vector<Vec64>& in) {
    Vec64 y(size_t(kTok) * E);
    int t0 = 0;
    for (int L : kLens) {
      RG::conv1d_silu_forward(y.data() + size_t(t0) * E, in[0].data() + size_t(t0) * E, in[1].data(),
                              in[2].data(), L, E, K);
      t0 += L;
    }
    return y;
  };
  op.run = [=](Backend& be, const std::vector<Vec>& in, const Vec& dout) {
    Ragged rg;
    fill(rg, kLens);
    Mat x(in[0], kTok, E, true), w(in[1], E, K, false), b(in[2], 1, E, false), y(kTok, E, true, kNaN);
    Mat dy(dout, kTok, E, true), dx(kTok, E, true, kNaN), dw(E, K, false, kParamStart), db(1, E, false, kParamStart);
    be.conv1d_silu_train(y.t(), x.t(), w.t(), b.t(), rg);
    be.conv1d_silu_backward(dx.t(), dw.t(), db.t(), dy.t(), x.t(), w.t(), b.t(), rg);
    EXPECT_TRUE(y.padding_intact() && dx.padding_intact());
    return RunResult{{y.dense()}, {dx.dense(), minus_start(dw.dense()), minus_start(db.dense())}};
  };
  return op;
}

// N 16 takes the CPU's SIMD scan, N 5 its reference fallback; chunk 16 splits the 37-token
// sequence in three, 0 is the backend's default.
OpCase scan_case(int N, int chunk) {
  const int E = 19;
  OpCase op;
  op.name = "selective_scan N " + std::to_string(N) + " chunk " + std::to_string(chunk);
  op.inputs = {{"x", kTok, E},
               {"dt", kTok, E, -3, 0},
               {"dt_bias", 1, E, -1, 0.5, false},
               {"A_log", E, N, -0.5, 1.5, false},
               {"B", kTok, N},
               {"C", kTok, N},
               {"Dskip", 1, E, 0.5, 1.5, false},
               {"z", kTok, E, -2, 2}};
  op.f64 = [=](const std::vector<Vec64>& in) {
    Vec64 y(size_t(kTok) * E), A(size_t(E) * N);
    for (size_t i = 0; i < A.size(); ++i) A[i] = -std::exp(in[3][i]);
    int t0 = 0;
    for (int L : kLens) {
      auto r = [&](int k, int w) { return in[size_t(k)].data() + size_t(t0) * w; };
      RG::selective_scan_forward(y.data() + size_t(t0) * E, r(0, E), r(1, E), in[2].data(), A.data(), r(4, N),
                                 r(5, N), in[6].data(), r(7, E), L, E, N);
      t0 += L;
    }
    return y;
  };
  op.run = [=](Backend& be, const std::vector<Vec>& in, const Vec& dout) {
    Ragged rg;
    fill(rg, kLens);
    // B and C are column views of one [n, 2 + 2N] matrix, as x_proj writes them (dt_r first).
    const int P = 2 + 2 * N;
    Mat dbc(kTok, P, false, kNaN), ddbc(kTok, P, false, kNaN);
    for (int t = 0; t < kTok; ++t)
      for (int j = 0; j < N; ++j) {
        dbc.buf[size_t(t) * P + 2 + j] = in[4][size_t(t) * N + j];
        dbc.buf[size_t(t) * P + 2 + N + j] = in[5][size_t(t) * N + j];
      }
    const Tensor B = dbc.t().cols_view(2, N), C = dbc.t().cols_view(2 + N, N);
    Mat x(in[0], kTok, E, true), dt(in[1], kTok, E, true), z(in[7], kTok, E, true);
    Mat dtb(in[2], 1, E, false), Al(in[3], E, N, false), D(in[6], 1, E, false);
    Mat y(kTok, E, true, kNaN), dy(dout, kTok, E, true);
    Mat dx(kTok, E, true, kNaN), ddt(kTok, E, true, kNaN), dz(kTok, E, true, kNaN);
    Mat ddtb(1, E, false, kParamStart), dAl(E, N, false, kParamStart), dD(1, E, false, kParamStart);
    Buffer saved(be, be.scan_saved_bytes(rg, E, N, chunk));
    be.selective_scan_train(y.t(), saved.data(), x.t(), dt.t(), dtb.t(), Al.t(), B, C, D.t(), z.t(), chunk, rg);
    be.selective_scan_backward(dx.t(), ddt.t(), ddbc.t().cols_view(2, N), ddbc.t().cols_view(2 + N, N), dz.t(),
                               ddtb.t(), dAl.t(), dD.t(), dy.t(), saved.data(), x.t(), dt.t(), dtb.t(), Al.t(),
                               B, C, D.t(), z.t(), chunk, rg);
    EXPECT_TRUE(y.padding_intact() && dx.padding_intact() && ddt.padding_intact() && dz.padding_intact());
    Vec dB(size_t(kTok) * N), dC(size_t(kTok) * N);
    for (int t = 0; t < kTok; ++t) {
      EXPECT_TRUE(std::isnan(ddbc.buf[size_t(t) * P]) && std::isnan(ddbc.buf[size_t(t) * P + 1]))
          << "dt_r's columns written at row " << t;
      for (int j = 0; j < N; ++j) {
        dB[size_t(t) * N + j] = ddbc.buf[size_t(t) * P + 2 + j];
        dC[size_t(t) * N + j] = ddbc.buf[size_t(t) * P + 2 + N + j];
      }
    }
    return RunResult{{y.dense()},
                     {dx.dense(), ddt.dense(), minus_start(ddtb.dense()), minus_start(dAl.dense()), dB, dC,
                      minus_start(dD.dense()), dz.dense()}};
  };
  op.tol_fwd = 1e-5;
  return op;
}

OpCase attention_case(int H, int G, int hd) {
  OpCase op;
  op.name = "attention H " + std::to_string(H) + " G " + std::to_string(G) + " hd " + std::to_string(hd);
  op.inputs = {{"q", kTok, H * hd, -2, 2}, {"k", kTok, G * hd, -2, 2}, {"v", kTok, G * hd}};
  op.n_diff = size_t(kTok) * H * hd;  // out, then lse (not differentiated)
  op.f64 = [=](const std::vector<Vec64>& in) {
    Vec64 out(size_t(kTok) * H * hd), lse(size_t(kTok) * H);
    int t0 = 0;
    for (int L : kLens) {
      RG::attention_forward(out.data() + size_t(t0) * H * hd, lse.data() + size_t(t0) * H,
                            in[0].data() + size_t(t0) * H * hd, in[1].data() + size_t(t0) * G * hd,
                            in[2].data() + size_t(t0) * G * hd, L, H, G, hd);
      t0 += L;
    }
    out.insert(out.end(), lse.begin(), lse.end());
    return out;
  };
  op.run = [=](Backend& be, const std::vector<Vec>& in, const Vec& dout) {
    Ragged rg;
    fill(rg, kLens);
    Mat q(in[0], kTok, H * hd, true), k(in[1], kTok, G * hd, true), v(in[2], kTok, G * hd, true);
    Mat o(kTok, H * hd, true, kNaN), lse(kTok, H, true, kNaN), dy(dout, kTok, H * hd, true);
    Mat dq(kTok, H * hd, true, kNaN), dk(kTok, G * hd, true, kNaN), dv(kTok, G * hd, true, kNaN);
    be.attention_train(o.t(), lse.t(), q.t(), k.t(), v.t(), H, G, hd, rg);
    be.attention_backward(dq.t(), dk.t(), dv.t(), dy.t(), q.t(), k.t(), v.t(), o.t(), lse.t(), H, G, hd, rg);
    EXPECT_TRUE(o.padding_intact() && lse.padding_intact() && dq.padding_intact() && dk.padding_intact());
    return RunResult{{o.dense(), lse.dense()}, {dq.dense(), dk.dense(), dv.dense()}};
  };
  return op;
}

OpCase rope_case() {
  const int heads = 3, hd = 10;
  const float theta = 10000.0f;
  const std::vector<int> pos0 = {0, 700, 3};  // rope_backward takes rope's positions
  OpCase op;
  op.name = "rope_backward";
  op.inputs = {{"x", kTok, heads * hd}};
  op.f64 = [=](const std::vector<Vec64>& in) {
    Vec64 y = in[0];
    int t0 = 0;
    for (size_t s = 0; s < kLens.size(); ++s) {
      RG::rope_forward(y.data() + size_t(t0) * heads * hd, kLens[s], heads, hd, pos0[s], double(theta));
      t0 += kLens[s];
    }
    return y;
  };
  op.run = [=](Backend& be, const std::vector<Vec>& in, const Vec& dout) {
    Ragged rg;
    for (size_t s = 0; s < kLens.size(); ++s) rg.add(int(s), kLens[s], pos0[s]);
    Mat x(in[0], kTok, heads * hd, true), dx(dout, kTok, heads * hd, true);
    be.rope(x.t(), heads, hd, theta, rg);
    be.rope_backward(dx.t(), heads, hd, theta, rg);
    EXPECT_TRUE(dx.padding_intact());
    return RunResult{{x.dense()}, {dx.dense()}};
  };
  op.tol_fwd = 5e-6;  // the float angle (the kernels') against the double one at position 740
  return op;
}

OpCase embedding_case() {
  const int V = 6, D = 11, n = 9;
  const std::vector<int32_t> ids = {3, 0, 5, 3, 3, 1, 0, 2, 5};  // repeats sum their rows
  OpCase op;
  op.name = "embedding_backward";
  op.inputs = {{"table", V, D, -1, 1, false}};
  op.f64 = [=](const std::vector<Vec64>& in) {
    Vec64 y(size_t(n) * D);
    for (int i = 0; i < n; ++i) std::copy_n(in[0].begin() + ptrdiff_t(ids[size_t(i)]) * D, D, y.begin() + ptrdiff_t(i) * D);
    return y;
  };
  op.run = [=](Backend& be, const std::vector<Vec>& in, const Vec& dout) {
    Mat table(in[0], V, D, false), y(n, D, true, kNaN), dy(dout, n, D, true), dtab(V, D, false, kParamStart);
    be.embedding(y.t(), table.t(), ids.data());
    be.embedding_backward(dtab.t(), dy.t(), ids.data());
    return RunResult{{y.dense()}, {minus_start(dtab.dense())}};
  };
  return op;
}

// The loss (times scale) is the one output; rows 2 and 7 are ignored (target -1).
OpCase cross_entropy_case(int V, int n) {
  const int D = 13;
  const double scale = 1.0 / 7;
  std::vector<int32_t> tg(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) tg[size_t(i)] = i == 2 || i == 7 ? -1 : (i * 37 + 5) % V;
  OpCase op;
  op.name = "cross_entropy_head V " + std::to_string(V);
  op.inputs = {{"hn", n, D, -2, 2}, {"W", V, D, -1, 1, false}};
  op.f64 = [=](const std::vector<Vec64>& in) {
    double sum = 0;
    for (int i = 0; i < n; ++i) {
      if (tg[size_t(i)] < 0) continue;
      Vec64 z(static_cast<size_t>(V));
      RG::linear_forward(z.data(), in[0].data() + size_t(i) * D, in[1].data(), 1, V, D);
      double mx = -INFINITY, se = 0;
      for (double v : z) mx = std::max(mx, v);
      for (double v : z) se += std::exp(v - mx);
      sum += mx + std::log(se) - z[size_t(tg[size_t(i)])];
    }
    return Vec64{sum * scale};
  };
  op.run = [=](Backend& be, const std::vector<Vec>& in, const Vec& dout) {
    EXPECT_EQ(dout.size(), 1u);
    Mat hn(in[0], n, D, true), W(in[1], V, D, false), dhn(n, D, true, kNaN), dW(V, D, false, kParamStart);
    const double loss = be.cross_entropy_head(dhn.t(), dW.t(), hn.t(), W.t(), tg.data(), scale);
    EXPECT_TRUE(dhn.padding_intact());
    Vec gh = dhn.dense(), gW = minus_start(dW.dense());
    for (float& v : gh) v *= dout[0];  // the op's gradients are those of loss * scale itself
    for (float& v : gW) v *= dout[0];
    for (int j = 0; j < D; ++j) {
      EXPECT_EQ(gh[size_t(2) * D + j], 0.0f);
      EXPECT_EQ(gh[size_t(7) * D + j], 0.0f);
    }
    return RunResult{{Vec{float(loss * scale)}}, {gh, gW}};
  };
  op.tol_fwd = 1e-6;
  return op;
}

}  // namespace

TEST(BackendGrad, Linear) {
  check_op(linear_case(false), 1);
  check_op(linear_case(true), 2);
}
TEST(BackendGrad, Rmsnorm) { check_op(rmsnorm_case(), 3); }
TEST(BackendGrad, Swiglu) { check_op(swiglu_case(), 4); }
TEST(BackendGrad, Conv1dSilu) {
  for (int K : {2, 3, 4}) check_op(conv_case(K), 5 + uint64_t(K));
}
TEST(BackendGrad, SelectiveScan) {
  for (int N : {16, 5})
    for (int chunk : {16, 0}) check_op(scan_case(N, chunk), 10 + uint64_t(N) + uint64_t(chunk));
}
TEST(BackendGrad, Attention) {
  check_op(attention_case(4, 2, 6), 40);
  check_op(attention_case(3, 3, 8), 41);
  check_op(attention_case(4, 1, 4), 42);
}
TEST(BackendGrad, RopeBackward) { check_op(rope_case(), 50); }
TEST(BackendGrad, EmbeddingBackward) { check_op(embedding_case(), 51); }

// The CUDA embedding_backward's grouping (a counting sort) against a stable sort by id: the same
// order (ties by row), segment starts and ids, at odd sizes with heavy repeats and with unused ids.
TEST(BackendGrad, GroupRowsByIdIsAStableSort) {
  Rng rng(52);
  for (auto [n, n_ids] : {std::pair{1, 1}, std::pair{37, 5}, std::pair{1000, 8191}, std::pair{333, 40000}}) {
    std::vector<int32_t> id(static_cast<size_t>(n));
    for (auto& v : id) v = int32_t(rng.next_u64() % uint64_t(n_ids));
    std::vector<int32_t> order(static_cast<size_t>(n)), seg, seg_id;
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return id[size_t(a)] < id[size_t(b)]; });
    for (int p = 0; p < n; ++p)
      if (p == 0 || id[size_t(order[size_t(p)])] != id[size_t(order[size_t(p - 1)])]) {
        seg.push_back(p);
        seg_id.push_back(id[size_t(order[size_t(p)])]);
      }
    const int nseg = int(seg_id.size());
    seg.push_back(n);
    std::vector<int32_t> want(order);
    want.insert(want.end(), seg.begin(), seg.end());
    want.insert(want.end(), seg_id.begin(), seg_id.end());
    const IdRows g = group_rows_by_id(id.data(), n, n_ids, "test");
    EXPECT_EQ(g.nseg, nseg) << n << " rows";
    EXPECT_EQ(g.plan, want) << n << " rows";
  }
  const int32_t bad[] = {0, 3, -1};
  EXPECT_THROW(group_rows_by_id(bad, 2, 3, "test"), Error);  // 3 is outside a table of 3
  try {
    group_rows_by_id(bad, 3, 4, "cuda embedding_backward");
    FAIL() << "id -1 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("id -1 at row 2"), std::string::npos) << e.what();
  }
}
TEST(BackendGrad, CrossEntropyHead) {
  check_op(cross_entropy_case(29, 9), 52);
  check_op(cross_entropy_case(150, 70), 53);  // more rows than the CPU's blocks of 64
}

// Misfit shapes are an hm::Error naming the backend and the op, on both host backends.
TEST(BackendGrad, ShapeErrorsNameTheOp) {
  std::vector<std::unique_ptr<Backend>> bes;
  bes.push_back(make_cpu_backend());
  bes.push_back(make_ref_backend());
  for (const auto& be : bes) {
    Mat a(4, 5, false, 1.0f), b(3, 5, false, 1.0f), c(4, 3, false, 1.0f), bad(4, 4, false, 1.0f);
    try {
      be->linear_backward(a.t(), b.t(), bad.t(), a.t(), b.t(), false);  // dy must be [4, 3]
      ADD_FAILURE() << "linear_backward accepted dy [4, 4]";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(be->name() + " linear_backward"), std::string::npos) << e.what();
    }
    Ragged rg;
    fill(rg, {2, 2});
    try {
      be->attention_train(a.t(), c.t(), a.t(), a.t(), a.t(), 3, 2, 1, rg);  // H % G != 0
      ADD_FAILURE() << "attention_train accepted 3 heads over 2 kv heads";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("attention_train"), std::string::npos) << e.what();
    }
    try {
      Mat x(4, 5, false, 1.0f), w(5, 3, false, 1.0f), bb(1, 4, false, 1.0f);
      be->conv1d_silu_train(x.t(), x.t(), w.t(), bb.t(), rg);  // b of 4 for 5 channels
      ADD_FAILURE() << "conv1d_silu_train accepted a bias of 4 for 5 channels";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("conv1d_silu_train"), std::string::npos) << e.what();
    }
    const int32_t tg[4] = {0, 1, 9, 0};  // 9 is outside the vocabulary of 3
    try {
      be->cross_entropy_head(a.t(), b.t(), a.t(), b.t(), tg, 1.0);
      ADD_FAILURE() << "cross_entropy_head accepted target 9";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("target 9"), std::string::npos) << e.what();
    }
  }
}

// The counting backend forwards every training op and counts it; a backend without the ops
// (the Backend defaults, as CUDA until its kernels land) says which op is missing.
TEST(BackendGrad, CountingForwardsAndDefaultsThrow) {
  auto cpu = make_cpu_backend();
  CountingBackend cb(*cpu);
  Mat x(4, 5, false, 1.0f), W(3, 5, false, 0.5f), dy(4, 3, false, 1.0f), dx(4, 5, false, kNaN), dW(3, 5, false, 0.0f);
  cb.linear_backward(dx.t(), dW.t(), dy.t(), x.t(), W.t(), false);
  EXPECT_EQ(cb.count(OpKind::LinearBackward).calls, 1);
  EXPECT_EQ(cb.count(OpKind::LinearBackward).flops, 2 * 2.0 * 4 * 3 * 5);
  EXPECT_FLOAT_EQ(dx.buf[0], 1.5f);  // dy W: three rows of 0.5
  EXPECT_FLOAT_EQ(dW.buf[0], 4.0f);  // dy^T x: four rows of 1

  // A backend that overrides none of the training ops.
  class NoTrain final : public Backend {
   public:
    Device device() const override { return Device::CPU; }
    std::string name() const override { return "bare"; }
    bool supports(DType) const override { return true; }
    bool supports_kv(DType) const override { return true; }
    DType default_dtype() const override { return DType::F32; }
    void* alloc(size_t) override { return nullptr; }
    void free(void*) override {}
    void to_device(void*, const void*, size_t) override {}
    void to_host(void*, const void*, size_t) override {}
    void copy(void*, const void*, size_t) override {}
    void memzero(void*, size_t) override {}
    void rmsnorm(Tensor, Tensor, Tensor, float) override {}
    void linear(Tensor, Tensor, Tensor, bool) override {}
    void swiglu(Tensor, Tensor, Tensor) override {}
    void relu2(Tensor, Tensor) override {}
    void embedding(Tensor, Tensor, const int32_t*) override {}
    void conv1d_silu(Tensor, const StatePool&, Tensor, Tensor, Tensor, const Ragged&) override {}
    void selective_scan(Tensor, const StatePool&, Tensor, Tensor, Tensor, const float*, Tensor, Tensor, Tensor,
                        Tensor, const Ragged&) override {}
    void ssd_scan(Tensor, const StatePool&, Tensor, Tensor, Tensor, const float*, Tensor, Tensor, Tensor, int, int,
                  float, float, const Ragged&) override {}
    void gated_rmsnorm(Tensor, Tensor, Tensor, Tensor, int, float) override {}
    void rope(Tensor, int, int, float, const Ragged&) override {}
    void kv_write(const KvPool&, Tensor, Tensor, const Ragged&) override {}
    void attention(Tensor, Tensor, const KvPool&, int, int, int, const Ragged&) override {}
    void copy_rows(Tensor, const int32_t*, Tensor, const int32_t*, int) override {}
    void add_rows(Tensor, const int32_t*, Tensor, const int32_t*, int, const float*, Tensor) override {}
  } bare;
  CountingBackend counted(bare);
  try {
    counted.selective_scan_backward({}, {}, {}, {}, {}, {}, {}, {}, {}, nullptr, {}, {}, {}, {}, {}, {}, {}, {}, 0,
                                    Ragged());
    ADD_FAILURE() << "the default selective_scan_backward did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bare: selective_scan_backward is not implemented"), std::string::npos)
        << e.what();
  }
}
