// The Mamba-2 reference backward passes (kernels/ref/ssd_grad_ref.h) against central finite
// differences, on fresh random inputs at odd sizes, as tests/test_grad_mamba.cpp does for
// Mamba-1: loss l = sum(dout * out), analytic gradients in double, differences of the long
// double forward (h = 1e-5), per-element error |a - f| / max(|a|, |f|, 1e-6) <= 1e-6. Parameter
// gradients start at random values and must come back increased (+=); activation gradients
// start as NaN and must be overwritten (=). The float forward agrees with the inference kernel
// (ref::ssd_scan, ref::gated_rmsnorm).
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
#include "kernels/cpu/dispatch.h"
#include "kernels/ops.h"
#include "kernels/ref/ssd_grad_ref.h"

namespace {

namespace G = hm::ref::grad;
using Vec = std::vector<double>;
using LD = long double;
using VecL = std::vector<LD>;

constexpr LD kStep = 1e-5L;
constexpr double kFloor = 1e-6, kTol = 1e-6;

Vec uniform(hm::Rng& rng, size_t n, double lo, double hi) {
  Vec v(n);
  for (auto& x : v) x = lo + rng.uniform() * (hi - lo);
  return v;
}
Vec normal(hm::Rng& rng, size_t n, double scale) {
  Vec v(n);
  for (auto& x : v) x = scale * rng.normal();
  return v;
}
VecL widen(const Vec& v) { return VecL(v.begin(), v.end()); }

// Worst per-element error of analytic (after - before, or the assigned value) against the
// differences of loss over input `in`.
double worst(const Vec& analytic, VecL& in, const std::function<LD()>& loss, const std::vector<size_t>& skip = {}) {
  double w = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    if (std::find(skip.begin(), skip.end(), i) != skip.end()) continue;
    const LD keep = in[i];
    in[i] = keep + kStep;
    const LD up = loss();
    in[i] = keep - kStep;
    const LD down = loss();
    in[i] = keep;
    const double fd = double((up - down) / (2 * kStep));
    const double a = analytic[i];
    w = std::max(w, std::fabs(a - fd) / std::max({std::fabs(a), std::fabs(fd), kFloor}));
  }
  return w;
}

struct SsdCase {
  int L, H, P, G, N;
  double dt_min, dt_max;
};

void check_ssd(const SsdCase& k, uint64_t seed) {
  const int L = k.L, H = k.H, P = k.P, Gr = k.G, N = k.N;
  SCOPED_TRACE("L " + std::to_string(L) + " H " + std::to_string(H) + " P " + std::to_string(P) + " G " +
               std::to_string(Gr) + " N " + std::to_string(N) + " dt in [" + std::to_string(k.dt_min) + ", " +
               std::to_string(k.dt_max) + "]");
  hm::Rng rng(seed);
  // Padded row strides, and B | C as column views of one matrix, as the model lays them out.
  const int ldx = H * P + 2, lddt = H + 1, ldbc = 2 * Gr * N + 3, ldy = H * P + 1;
  Vec x = normal(rng, size_t(L) * ldx, 1.0), dt = uniform(rng, size_t(L) * lddt, -4.0, 1.0);
  Vec bias = uniform(rng, size_t(H), -1.0, 0.5), A_log = uniform(rng, size_t(H), -0.5, 1.5);
  Vec BC = normal(rng, size_t(L) * ldbc, 1.0), Dskip = normal(rng, size_t(H), 1.0);
  Vec dy = normal(rng, size_t(L) * ldy, 1.0);
  // Keep every softplus at least 100 steps away from a clamp bound (the derivative jumps there).
  if (k.dt_min > 0 || std::isfinite(k.dt_max))
    for (int t = 0; t < L; ++t)
      for (int h = 0; h < H; ++h) {
        double& v = dt[size_t(t) * lddt + h];
        for (int tries = 0; tries < 100; ++tries) {
          const double sp = G::softplus(v + bias[size_t(h)]);
          if (std::fabs(sp - k.dt_min) > 1e-3 && std::fabs(sp - k.dt_max) > 1e-3) break;
          v += 0.01;
        }
      }
  auto loss = [&](const VecL& xl, const VecL& dtl, const VecL& bl, const VecL& al, const VecL& bcl, const VecL& dl) {
    VecL y(size_t(L) * ldy, 0.0L);
    G::ssd_scan_forward<LD>(y.data(), ldy, xl.data(), ldx, dtl.data(), lddt, bl.data(), al.data(), bcl.data(),
                            bcl.data() + Gr * N, ldbc, dl.data(), L, H, P, Gr, N, k.dt_min, k.dt_max);
    LD s = 0;
    for (size_t i = 0; i < y.size(); ++i) s += y[i] * LD(dy[i]);
    return s;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  Vec dx(size_t(L) * ldx, nan), ddt(size_t(L) * lddt, nan), dBC(size_t(L) * ldbc, nan);
  const Vec bias0 = normal(rng, size_t(H), 1.0), alog0 = normal(rng, size_t(H), 1.0), d0 = normal(rng, size_t(H), 1.0);
  Vec dbias = bias0, dalog = alog0, dD = d0;
  G::ssd_scan_backward<double>(dx.data(), ldx, ddt.data(), lddt, dBC.data(), dBC.data() + Gr * N, ldbc, dbias.data(),
                               dalog.data(), dD.data(), dy.data(), ldy, x.data(), ldx, dt.data(), lddt, bias.data(),
                               A_log.data(), BC.data(), BC.data() + Gr * N, ldbc, Dskip.data(), L, H, P, Gr, N,
                               k.dt_min, k.dt_max);
  for (int h = 0; h < H; ++h) {
    dbias[size_t(h)] -= bias0[size_t(h)];
    dalog[size_t(h)] -= alog0[size_t(h)];
    dD[size_t(h)] -= d0[size_t(h)];
  }
  VecL xl = widen(x), dtl = widen(dt), bl = widen(bias), al = widen(A_log), bcl = widen(BC), dl = widen(Dskip);
  auto l = [&] { return loss(xl, dtl, bl, al, bcl, dl); };
  // The padding columns are not inputs: their "gradients" stay untouched (NaN) and are skipped.
  std::vector<size_t> xpad, dtpad, bcpad;
  for (int t = 0; t < L; ++t) {
    for (int j = H * P; j < ldx; ++j) xpad.push_back(size_t(t) * ldx + j);
    for (int j = H; j < lddt; ++j) dtpad.push_back(size_t(t) * lddt + j);
    for (int j = 2 * Gr * N; j < ldbc; ++j) bcpad.push_back(size_t(t) * ldbc + j);
  }
  for (size_t i : xpad) EXPECT_TRUE(std::isnan(dx[i])) << "dx wrote padding";
  for (size_t i : xpad) dx[i] = 0;
  for (size_t i : dtpad) {
    EXPECT_TRUE(std::isnan(ddt[i])) << "ddt wrote padding";
    ddt[i] = 0;
  }
  for (size_t i : bcpad) {
    EXPECT_TRUE(std::isnan(dBC[i])) << "dB/dC wrote padding";
    dBC[i] = 0;
  }
  for (double v : dx) ASSERT_FALSE(std::isnan(v)) << "dx not assigned";
  for (double v : dBC) ASSERT_FALSE(std::isnan(v)) << "dB/dC not assigned";
  const double e_x = worst(dx, xl, l, xpad), e_dt = worst(ddt, dtl, l, dtpad), e_bc = worst(dBC, bcl, l, bcpad);
  const double e_b = worst(dbias, bl, l), e_a = worst(dalog, al, l), e_d = worst(dD, dl, l);
  std::printf("  ssd L %d H %d P %d G %d N %d: dx %.1e ddt %.1e dB|dC %.1e ddt_bias %.1e dA_log %.1e dD %.1e\n", L, H,
              P, Gr, N, e_x, e_dt, e_bc, e_b, e_a, e_d);
  EXPECT_LE(e_x, kTol);
  EXPECT_LE(e_dt, kTol);
  EXPECT_LE(e_bc, kTol);
  EXPECT_LE(e_b, kTol);
  EXPECT_LE(e_a, kTol);
  EXPECT_LE(e_d, kTol);

  // The float forward is the inference kernel's recurrence (from a zero state).
  std::vector<float> xf(x.begin(), x.end()), dtf(dt.begin(), dt.end()), bf(bias.begin(), bias.end()),
      bcf(BC.begin(), BC.end()), df(Dskip.begin(), Dskip.end()), alf(A_log.begin(), A_log.end()), Af(static_cast<size_t>(H));
  for (int h = 0; h < H; ++h) Af[size_t(h)] = -std::exp(alf[size_t(h)]);
  std::vector<float> y1(size_t(L) * ldy, 0.0f), y2(size_t(L) * ldy, 0.0f), state(size_t(H) * P * N, 0.0f);
  G::ssd_scan_forward<float>(y1.data(), ldy, xf.data(), ldx, dtf.data(), lddt, bf.data(), alf.data(), bcf.data(),
                             bcf.data() + Gr * N, ldbc, df.data(), L, H, P, Gr, N, k.dt_min, k.dt_max);
  hm::ref::ssd_scan(y2.data(), ldy, state.data(), xf.data(), ldx, dtf.data(), lddt, bf.data(), Af.data(), bcf.data(),
                    bcf.data() + Gr * N, ldbc, df.data(), L, H, P, Gr, N, float(k.dt_min), float(k.dt_max));
  double e = 0;
  for (size_t i = 0; i < y1.size(); ++i) e = std::max(e, double(std::fabs(y1[i] - y2[i])));
  EXPECT_LE(e, 1e-5);
}

TEST(GradSsd, ScanMatchesFiniteDifferences) {
  check_ssd({7, 3, 3, 1, 5, 0.0, INFINITY}, 101);
  check_ssd({9, 4, 2, 2, 3, 0.0, INFINITY}, 102);  // two groups of two heads
  check_ssd({5, 6, 3, 3, 2, 0.0, INFINITY}, 103);
  check_ssd({8, 2, 5, 1, 4, 0.05, 0.6}, 104);      // time_step_limit clamps some deltas both ways
}

// The chunked matrix form of the backward (ssd_scan_backward_chunked: what a fast kernel
// computes, chunk by chunk) against the token-by-token reference above, in double, on fresh
// random inputs: chunks of 1 token, odd sizes that leave a short last chunk, and one chunk
// longer than the sequence; with and without a time_step_limit that clamps.
TEST(GradSsd, ChunkedBackwardMatchesTheTokenScan) {
  uint64_t seed = 300;
  for (const SsdCase& k : {SsdCase{1, 2, 3, 1, 5, 0.0, INFINITY}, SsdCase{7, 3, 3, 1, 5, 0.0, INFINITY},
                           SsdCase{20, 4, 2, 2, 3, 0.0, INFINITY}, SsdCase{33, 2, 5, 1, 4, 0.05, 0.6}})
    for (int Q : {1, 3, 8, 64}) {
      SCOPED_TRACE("L " + std::to_string(k.L) + " Q " + std::to_string(Q));
      hm::Rng rng(++seed);
      const int L = k.L, H = k.H, P = k.P, Gr = k.G, N = k.N;
      const int ldx = H * P + 2, lddt = H + 1, ldbc = 2 * Gr * N + 3, ldy = H * P + 1;
      const Vec x = normal(rng, size_t(L) * ldx, 1.0), dt = uniform(rng, size_t(L) * lddt, -4.0, 1.0);
      const Vec bias = uniform(rng, size_t(H), -1.0, 0.5), A_log = uniform(rng, size_t(H), -0.5, 1.5);
      const Vec BC = normal(rng, size_t(L) * ldbc, 1.0), Dskip = normal(rng, size_t(H), 1.0);
      const Vec dy = normal(rng, size_t(L) * ldy, 1.0), p0 = normal(rng, size_t(3) * H, 1.0);
      struct Out {
        Vec dx, ddt, dBC, p;
      };
      auto run = [&](bool chunked) {
        Out o{Vec(size_t(L) * ldx, 0.0), Vec(size_t(L) * lddt, 0.0), Vec(size_t(L) * ldbc, 0.0), p0};
        double *db = o.p.data(), *da = db + H, *dd = da + H;
        if (chunked)
          G::ssd_scan_backward_chunked<double>(o.dx.data(), ldx, o.ddt.data(), lddt, o.dBC.data(),
                                               o.dBC.data() + Gr * N, ldbc, db, da, dd, dy.data(), ldy, x.data(), ldx,
                                               dt.data(), lddt, bias.data(), A_log.data(), BC.data(),
                                               BC.data() + Gr * N, ldbc, Dskip.data(), L, H, P, Gr, N, k.dt_min,
                                               k.dt_max, Q);
        else
          G::ssd_scan_backward<double>(o.dx.data(), ldx, o.ddt.data(), lddt, o.dBC.data(), o.dBC.data() + Gr * N,
                                       ldbc, db, da, dd, dy.data(), ldy, x.data(), ldx, dt.data(), lddt, bias.data(),
                                       A_log.data(), BC.data(), BC.data() + Gr * N, ldbc, Dskip.data(), L, H, P, Gr,
                                       N, k.dt_min, k.dt_max);
        return o;
      };
      const Out want = run(false), got = run(true);
      auto err = [](const Vec& a, const Vec& b) {
        double m = 1e-12, e = 0;
        for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(b[i]));
        for (size_t i = 0; i < a.size(); ++i) e = std::max(e, std::fabs(a[i] - b[i]));
        return e / m;
      };
      EXPECT_LE(err(got.dx, want.dx), 1e-11) << "dx";
      EXPECT_LE(err(got.ddt, want.ddt), 1e-11) << "ddt";
      EXPECT_LE(err(got.dBC, want.dBC), 1e-11) << "dB, dC";
      EXPECT_LE(err(got.p, want.p), 1e-11) << "ddt_bias, dA_log, dD";
    }
}

TEST(GradSsd, GatedRmsnormMatchesFiniteDifferences) {
  for (int group : {9, 3}) {
    hm::Rng rng(200 + uint64_t(group));
    const int n = 5, E = 9, ld = 11;
    const Vec y = normal(rng, size_t(n) * ld, 1.0), z = normal(rng, size_t(n) * ld, 1.5),
              w = uniform(rng, size_t(E), 0.5, 1.5), dout = normal(rng, size_t(n) * ld, 1.0);
    const double eps = 1e-5;
    const double nan = std::numeric_limits<double>::quiet_NaN();
    Vec dy(size_t(n) * ld, nan), dz(size_t(n) * ld, nan);
    const Vec w0 = normal(rng, size_t(E), 1.0);
    Vec dw = w0;
    G::gated_rmsnorm_backward<double>(dy.data(), ld, dz.data(), ld, dw.data(), dout.data(), ld, y.data(), ld, z.data(),
                                      ld, w.data(), n, E, group, eps);
    for (int j = 0; j < E; ++j) dw[size_t(j)] -= w0[size_t(j)];
    VecL yl = widen(y), zl = widen(z), wl = widen(w);
    auto l = [&] {
      VecL out(size_t(n) * ld, 0.0L);
      G::gated_rmsnorm_forward<LD>(out.data(), ld, yl.data(), ld, zl.data(), ld, wl.data(), n, E, group, eps);
      LD s = 0;
      for (size_t i = 0; i < out.size(); ++i) s += out[i] * LD(dout[i]);
      return s;
    };
    std::vector<size_t> pad;
    for (int i = 0; i < n; ++i)
      for (int j = E; j < ld; ++j) pad.push_back(size_t(i) * ld + j);
    for (size_t i : pad) {
      EXPECT_TRUE(std::isnan(dy[i]) && std::isnan(dz[i])) << "wrote padding";
      dy[i] = dz[i] = 0;
    }
    const double e_y = worst(dy, yl, l, pad), e_z = worst(dz, zl, l, pad), e_w = worst(dw, wl, l);
    std::printf("  gated rmsnorm group %d: dy %.1e dz %.1e dw %.1e\n", group, e_y, e_z, e_w);
    EXPECT_LE(e_y, kTol);
    EXPECT_LE(e_z, kTol);
    EXPECT_LE(e_w, kTol);
    // The float forward is the inference kernel.
    std::vector<float> yf(y.begin(), y.end()), zf(z.begin(), z.end()), wf(w.begin(), w.end());
    std::vector<float> o1(size_t(n) * ld, 0.0f), o2(size_t(n) * ld, 0.0f);
    G::gated_rmsnorm_forward<float>(o1.data(), ld, yf.data(), ld, zf.data(), ld, wf.data(), n, E, group, eps);
    hm::ref::gated_rmsnorm(o2.data(), ld, yf.data(), ld, zf.data(), ld, wf.data(), n, E, group, float(eps));
    double e = 0;
    for (size_t i = 0; i < o1.size(); ++i) e = std::max(e, double(std::fabs(o1[i] - o2[i])));
    EXPECT_LE(e, 1e-6);
  }
}

// The cpu backend's SSD backward (kernels/cpu/grad_simd.cpp: the states recomputed per chunk
// of 32 tokens, the state loops vectorized) against the reference's float instantiation, on
// every ISA this CPU has: lengths across chunk boundaries, groups, a time_step_limit, padded
// strides. Both sum in double, so they agree to float rounding of the outputs.
HM_ISA_TEST(GradSsd, CpuBackwardMatchesReference) {
  const SsdCase cases[] = {{70, 4, 5, 2, 9, 0.0, INFINITY}, {33, 3, 7, 1, 16, 0.02, 0.4}, {1, 2, 3, 2, 5, 0.0, INFINITY},
                           {64, 6, 4, 3, 8, 0.0, INFINITY}};
  uint64_t seed = 300;
  for (const SsdCase& k : cases) {
    const int L = k.L, H = k.H, P = k.P, Gr = k.G, N = k.N;
    const int ldx = H * P + 3, lddt = H + 2, ldbc = 2 * Gr * N + 1, ldy = H * P + 2;
    hm::Rng rng(seed++);
    auto f = [](const Vec& v) { return std::vector<float>(v.begin(), v.end()); };
    const std::vector<float> x = f(normal(rng, size_t(L) * ldx, 1.0)), dt = f(uniform(rng, size_t(L) * lddt, -4.0, 1.0)),
                             bias = f(uniform(rng, size_t(H), -1.0, 0.5)), alog = f(uniform(rng, size_t(H), -0.5, 1.5)),
                             BC = f(normal(rng, size_t(L) * ldbc, 1.0)), Dk = f(normal(rng, size_t(H), 1.0)),
                             dy = f(normal(rng, size_t(L) * ldy, 1.0)), p0 = f(normal(rng, size_t(3 * H), 1.0));
    struct Out {
      std::vector<float> dx, ddt, dBC, params;
    };
    auto fresh = [&] {
      Out o;
      o.dx.assign(size_t(L) * ldx, 0.0f);
      o.ddt.assign(size_t(L) * lddt, 0.0f);
      o.dBC.assign(size_t(L) * ldbc, 0.0f);
      o.params = p0;  // ddt_bias | dA_log | dD, accumulated into
      return o;
    };
    Out r = fresh(), c = fresh();
    G::ssd_scan_backward<float>(r.dx.data(), ldx, r.ddt.data(), lddt, r.dBC.data(), r.dBC.data() + Gr * N, ldbc,
                                r.params.data(), r.params.data() + H, r.params.data() + 2 * H, dy.data(), ldy, x.data(),
                                ldx, dt.data(), lddt, bias.data(), alog.data(), BC.data(), BC.data() + Gr * N, ldbc,
                                Dk.data(), L, H, P, Gr, N, k.dt_min, k.dt_max);
    hm::cpu::kernels().grad.ssd_backward(
        c.dx.data(), ldx, c.ddt.data(), lddt, c.dBC.data(), c.dBC.data() + Gr * N, ldbc, c.params.data(),
        c.params.data() + H, c.params.data() + 2 * H, dy.data(), ldy,
        hm::cpu::SsdGradArgs{x.data(), ldx, dt.data(), lddt, bias.data(), alog.data(), BC.data(), BC.data() + Gr * N,
                             ldbc, Dk.data(), L, H, P, Gr, N, k.dt_min, k.dt_max});
    auto rel = [](const std::vector<float>& a, const std::vector<float>& b) {
      double d = 0, m = 0;
      for (size_t i = 0; i < a.size(); ++i) {
        d = std::max(d, double(std::fabs(a[i] - b[i])));
        m = std::max(m, double(std::fabs(b[i])));
      }
      return d / std::max(m, 1e-30);
    };
    const double e_x = rel(c.dx, r.dx), e_dt = rel(c.ddt, r.ddt), e_bc = rel(c.dBC, r.dBC), e_p = rel(c.params, r.params);
    std::printf("  cpu ssd backward L %d H %d P %d G %d N %d: dx %.1e ddt %.1e dB|dC %.1e params %.1e\n", L, H, P, Gr, N,
                e_x, e_dt, e_bc, e_p);
    EXPECT_LE(e_x, 1e-6) << "L " << L;
    EXPECT_LE(e_dt, 1e-6) << "L " << L;
    EXPECT_LE(e_bc, 1e-6) << "L " << L;
    EXPECT_LE(e_p, 1e-6) << "L " << L;
    // Padding stays as it was (zero).
    for (int t = 0; t < L; ++t) {
      for (int j = H * P; j < ldx; ++j) EXPECT_EQ(c.dx[size_t(t) * ldx + j], 0.0f);
      for (int j = 2 * Gr * N; j < ldbc; ++j) EXPECT_EQ(c.dBC[size_t(t) * ldbc + j], 0.0f);
    }
  }
}

}  // namespace
