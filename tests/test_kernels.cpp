// Every hm::cpu kernel against the hm::ref oracle on fresh random inputs, at odd sizes, with
// strided inputs and outputs, plus the state carried across calls for the recurrent kernels.
//
// Error measure: max_i |cpu_i - ref_i| / (|ref_i| + rms(ref)). An element much smaller than
// the typical output is judged against the typical output, so cancellation near zero does not
// read as a huge relative error; everything else is judged relatively. Float32 epsilon is
// 6e-8; each tolerance below says where its margin comes from.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/threads.h"
#include "io/safetensors.h"
#include "kernels/ops.h"
#include "isa_each.h"

namespace {

std::vector<float> random_vec(hm::Rng& rng, std::size_t n, float lo, float hi) {
  std::vector<float> v(n);
  for (auto& x : v) x = rng.uniform(lo, hi);
  return v;
}

// Error of a rows x cols block stored with row stride ld (see the top of the file).
double rel_err(const float* got, const float* want, int rows, int cols, int ld) {
  double ss = 0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) ss += double(want[r * ld + c]) * want[r * ld + c];
  const double rms = std::sqrt(ss / std::max(1, rows * cols)) + 1e-30;
  double worst = 0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const double w = want[r * ld + c], g = got[r * ld + c];
      worst = std::max(worst, std::fabs(g - w) / (std::fabs(w) + rms));
      if (!std::isfinite(g)) return INFINITY;
    }
  return worst;
}
double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  return rel_err(got.data(), want.data(), 1, int(want.size()), int(want.size()));
}

// Columns cols..ld-1 of each row are padding that a kernel must not write.
constexpr float kGuard = 12345.0f;
bool padding_intact(const std::vector<float>& buf, int rows, int cols, int ld) {
  for (int r = 0; r < rows; ++r)
    for (int c = cols; c < ld; ++c)
      if (buf[std::size_t(r) * ld + c] != kGuard) return false;
  return true;
}

// --- linear ----------------------------------------------------------------------------------
// Float sums of k products: error ~ sqrt(k) eps relative to the output scale (k eps at worst,
// 3e-5 at k = 512); 1e-5 leaves a margin over the ~1e-6 observed.
// Up to linear_rows_max rows run the per-ISA linear_rows kernel (every ISA here), more sgemm or
// that kernel in blocks (dispatch.h, LinearLarge): both paths on every ISA.
HM_ISA_TEST(KernelsLinear, MatchesReference) {
  struct Case { int m, n, k; };
  const int rmax = hm::cpu::kernels().linear_rows_max;
  const hm::cpu::LinearLarge saved = hm::cpu::linear_large_mode();
  for (hm::cpu::LinearLarge large : {hm::cpu::LinearLarge::Blas, hm::cpu::LinearLarge::Blocks}) {
  hm::cpu::set_linear_large(large);
  SCOPED_TRACE(large == hm::cpu::LinearLarge::Blas ? "large m: sgemm" : "large m: blocks");
  for (const Case c : {Case{1, 33, 17}, Case{1, 512, 1024}, Case{2, 1, 1}, Case{5, 64, 512},
                       Case{130, 100, 37}, Case{17, 48, 16}, Case{3, 5, 0}, Case{1, 7, 3}, Case{2, 9, 15},
                       Case{3, 13, 33}, Case{4, 6, 100}, Case{6, 3, 7}, Case{7, 37, 129}, Case{8, 5, 16},
                       Case{9, 11, 31}, Case{33, 19, 65}, Case{rmax, 23, 47}, Case{rmax + 1, 23, 47},
                       Case{3 * rmax + 5, 29, 71}, Case{300, 0, 9}, Case{301, 7, 0}}) {
    for (bool acc : {false, true}) {
      hm::Rng rng(1000 + c.m * 7 + c.n * 13 + c.k + acc);
      const int ldx = c.k + 3, ldy = c.n + 5;
      const auto x = random_vec(rng, std::size_t(c.m) * ldx, -1, 1);
      const auto W = random_vec(rng, std::size_t(c.n) * c.k, -1, 1);
      // Without accumulate, y starts as NaN: it is workspace and must be overwritten.
      std::vector<float> y0(std::size_t(c.m) * ldy, kGuard);
      for (int i = 0; i < c.m; ++i)
        for (int o = 0; o < c.n; ++o) y0[i * ldy + o] = acc ? rng.uniform(-1, 1) : NAN;
      auto y_ref = y0, y_cpu = y0;
      hm::ref::linear(y_ref.data(), ldy, x.data(), ldx, W.data(), c.m, c.n, c.k, acc);
      hm::cpu::linear(y_cpu.data(), ldy, x.data(), ldx, W.data(), c.m, c.n, c.k, acc);
      SCOPED_TRACE("m=" + std::to_string(c.m) + " n=" + std::to_string(c.n) +
                   " k=" + std::to_string(c.k) + " acc=" + std::to_string(acc));
      if (c.n > 0) {
        EXPECT_LT(rel_err(y_cpu.data(), y_ref.data(), c.m, c.n, ldy), 1e-5);
      }
      EXPECT_TRUE(padding_intact(y_cpu, c.m, c.n, ldy));
    }
  }
  }
  hm::cpu::set_linear_large(saved);
}

// A row's output does not depend on the other rows of the call, up to linear_rows_max rows
// (linear_rows computes each output the same way at any m), so a sequence decoded beside up to
// that many others gets the linear outputs it gets alone; with large m in blocks, at any m.
HM_ISA_TEST(KernelsLinear, RowsDoNotDependOnTheBatch) {
  hm::Rng rng(77);
  const int n = 37, k = 131;
  const auto W = random_vec(rng, std::size_t(n) * k, -1, 1);
  const int rmax = hm::cpu::kernels().linear_rows_max;
  const hm::cpu::LinearLarge saved = hm::cpu::linear_large_mode();
  hm::cpu::set_linear_large(hm::cpu::LinearLarge::Blocks);
  for (int m : {2, 3, 5, 8, 13, rmax, rmax + 1, 2 * rmax + 3}) {
    const auto x = random_vec(rng, std::size_t(m) * k, -1, 1);
    std::vector<float> y(std::size_t(m) * n), one(static_cast<std::size_t>(n));
    hm::cpu::linear(y.data(), n, x.data(), k, W.data(), m, n, k, false);
    for (int i = 0; i < m; ++i) {
      hm::cpu::linear(one.data(), n, x.data() + std::size_t(i) * k, k, W.data(), 1, n, k, false);
      EXPECT_TRUE(std::equal(one.begin(), one.end(), y.begin() + std::ptrdiff_t(i) * n)) << "m " << m << " row " << i;
    }
  }
  hm::cpu::set_linear_large(saved);
}

// Which path runs large m (dispatch.h): blocks only where our kernels are wider than the sgemm
// of the core OpenBLAS chose, by openblas_get_corename's names.
TEST(KernelsLinear, BlocksWhereOpenBlasIsNarrower) {
  using hm::cpu::Isa;
  EXPECT_EQ(hm::cpu::blas_core_level("SkylakeX"), 2);
  EXPECT_EQ(hm::cpu::blas_core_level("Cooperlake"), 2);
  EXPECT_EQ(hm::cpu::blas_core_level("SapphireRapids"), 2);
  EXPECT_EQ(hm::cpu::blas_core_level("Haswell"), 1);
  EXPECT_EQ(hm::cpu::blas_core_level("Zen"), 1);
  for (const char* core : {"Prescott", "Nehalem", "Sandybridge", "Core2", "unknown", ""})
    EXPECT_EQ(hm::cpu::blas_core_level(core), 0) << core;
  EXPECT_TRUE(hm::cpu::blocks_beat_blas(Isa::Avx512, "Haswell"));
  EXPECT_TRUE(hm::cpu::blocks_beat_blas(Isa::Avx512, "Prescott"));
  EXPECT_TRUE(hm::cpu::blocks_beat_blas(Isa::Avx2, "Prescott"));
  EXPECT_TRUE(hm::cpu::blocks_beat_blas(Isa::Avx2, "Sandybridge"));
  EXPECT_FALSE(hm::cpu::blocks_beat_blas(Isa::Avx512, "Cooperlake"));
  EXPECT_FALSE(hm::cpu::blocks_beat_blas(Isa::Avx2, "Haswell"));
  EXPECT_FALSE(hm::cpu::blocks_beat_blas(Isa::Avx2, "Zen"));
  EXPECT_FALSE(hm::cpu::blocks_beat_blas(Isa::Scalar, "Prescott"));
}

// --- rmsnorm ---------------------------------------------------------------------------------
// Float sum of d squares (relative error ~ few eps in vector partial sums), a sqrt and two
// products: ~4e-7 expected; 2e-6.
HM_ISA_TEST(KernelsRmsnorm, MatchesReference) {
  struct Case { int n, d; };
  for (const Case c : {Case{1, 512}, Case{3, 17}, Case{7, 5}, Case{130, 1000}, Case{2, 48}}) {
    hm::Rng rng(2000 + c.n * 31 + c.d);
    const auto x = random_vec(rng, std::size_t(c.n) * c.d, -2, 2);
    const auto w = random_vec(rng, c.d, 0.5f, 1.5f);
    std::vector<float> o_ref(x.size()), o_cpu(x.size());
    hm::ref::rmsnorm(o_ref.data(), x.data(), w.data(), c.n, c.d, 1e-5f);
    hm::cpu::rmsnorm(o_cpu.data(), x.data(), w.data(), c.n, c.d, 1e-5f);
    SCOPED_TRACE("n=" + std::to_string(c.n) + " d=" + std::to_string(c.d));
    EXPECT_LT(rel_err(o_cpu, o_ref), 2e-6);
  }
}

// --- swiglu ----------------------------------------------------------------------------------
// silu through the polynomial exp (2e-7) and a division, then one product: 1e-6.
HM_ISA_TEST(KernelsSwiglu, MatchesReference) {
  struct Case { int n, f; };
  for (const Case c : {Case{1, 1}, Case{3, 17}, Case{1, 2048}, Case{130, 1000}}) {
    hm::Rng rng(3000 + c.n * 17 + c.f);
    // g and u are the two halves of one [n, 2f + 3] buffer, as after a fused projection.
    const int ldgu = 2 * c.f + 3, ldo = c.f + 2;
    const auto gu = random_vec(rng, std::size_t(c.n) * ldgu, -12, 12);
    std::vector<float> o_ref(std::size_t(c.n) * ldo, kGuard), o_cpu = o_ref;
    hm::ref::swiglu(o_ref.data(), ldo, gu.data(), gu.data() + c.f, ldgu, c.n, c.f);
    hm::cpu::swiglu(o_cpu.data(), ldo, gu.data(), gu.data() + c.f, ldgu, c.n, c.f);
    SCOPED_TRACE("n=" + std::to_string(c.n) + " f=" + std::to_string(c.f));
    EXPECT_LT(rel_err(o_cpu.data(), o_ref.data(), c.n, c.f, ldo), 1e-6);
    EXPECT_TRUE(padding_intact(o_cpu, c.n, c.f, ldo));
  }
}

// --- exp_sum (sampling's softmax) -------------------------------------------------------------
// Against exp in double of x - shift in double: vexp's ~2e-7 relative error plus the rounding of
// x - shift to float (half an ulp of |x - shift| <= 88: up to 6e-8 |x - shift| relative after
// exp); the sum 1e-6. Masked logits (-inf) and ones far below the shift give exactly 0; the
// output past n is untouched.
HM_ISA_TEST(KernelsExpSum, MatchesReference) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int n : {1, 7, 17, 100, 1000, 32001}) {
    hm::Rng rng(7000 + n);
    std::vector<float> x = random_vec(rng, std::size_t(n), -30, 8);
    for (int i = 1; i < n; i += 11) x[std::size_t(i)] = -inf;  // x[0] stays finite: so does the max
    for (int i = 5; i < n; i += 13) x[std::size_t(i)] = -95.0f - float(i % 7);
    float mx = -inf;
    for (float v : x) mx = std::max(mx, v);
    std::vector<float> o_ref(std::size_t(n) + 3, kGuard), o_cpu = o_ref;
    const double s_ref = hm::ref::exp_sum(o_ref.data(), x.data(), n, mx);
    const double s_cpu = hm::cpu::exp_sum(o_cpu.data(), x.data(), n, mx);
    SCOPED_TRACE("n=" + std::to_string(n));
    EXPECT_NEAR(s_cpu, s_ref, 1e-6 * s_ref);
    EXPECT_GE(s_ref, 1.0);  // the max contributes exp(0)
    double worst = 0;  // relative error over its bound
    for (int i = 0; i < n; ++i) {
      const float r = o_ref[std::size_t(i)], c = o_cpu[std::size_t(i)];
      const double d = double(x[std::size_t(i)]) - mx;
      if (d < -88.0) {
        EXPECT_EQ(c, 0.0f) << "i=" << i;
        EXPECT_EQ(r, 0.0f) << "i=" << i;
      } else {
        worst = std::max(worst, std::abs(double(c) - r) / r / (3e-7 + 6e-8 * std::abs(d)));
      }
    }
    EXPECT_LT(worst, 1.0);
    for (int i = n; i < n + 3; ++i) EXPECT_EQ(o_cpu[std::size_t(i)], kGuard);
  }
}

// --- rope ------------------------------------------------------------------------------------
// cos/sin exact in double, rounded to float, then a*c - b*s in float: ~2 ulp; 1e-6.
HM_ISA_TEST(KernelsRope, MatchesReference) {
  struct Case { int L, heads, hd, pos0; };
  for (const Case c : {Case{1, 4, 64, 0}, Case{3, 2, 8, 5}, Case{17, 8, 16, 100},
                       Case{130, 3, 64, 1000}, Case{40, 1, 128, 100000}, Case{5, 2, 6, 7}}) {
    hm::Rng rng(4000 + c.L * 3 + c.hd + c.pos0);
    const int ldx = c.heads * c.hd + 7;
    auto x_ref = random_vec(rng, std::size_t(c.L) * ldx, -1, 1);
    for (int t = 0; t < c.L; ++t)
      for (int j = c.heads * c.hd; j < ldx; ++j) x_ref[t * ldx + j] = kGuard;
    auto x_cpu = x_ref;
    hm::ref::rope(x_ref.data(), ldx, c.L, c.heads, c.hd, c.pos0, 10000.0f);
    hm::cpu::rope(x_cpu.data(), ldx, c.L, c.heads, c.hd, c.pos0, 10000.0f);
    SCOPED_TRACE("L=" + std::to_string(c.L) + " hd=" + std::to_string(c.hd) +
                 " pos0=" + std::to_string(c.pos0));
    EXPECT_LT(rel_err(x_cpu.data(), x_ref.data(), c.L, c.heads * c.hd, ldx), 1e-6);
    EXPECT_TRUE(padding_intact(x_cpu, c.L, c.heads * c.hd, ldx));
  }
}

// --- conv1d_silu -----------------------------------------------------------------------------
struct ConvData {
  int E, K;
  std::vector<float> w, b, state;
  ConvData(hm::Rng& rng, int E_, int K_) : E(E_), K(K_) {
    const float s = 1.0f / std::sqrt(float(K));
    w = random_vec(rng, std::size_t(E) * K, -s, s);
    b = random_vec(rng, E, -s, s);
    state = random_vec(rng, std::size_t(E) * (K - 1), -2, 2);
  }
};

// K products summed in float plus silu (2e-7): 1e-6.
HM_ISA_TEST(KernelsConv1dSilu, MatchesReference) {
  struct Case { int L, E, K; };
  for (const Case c : {Case{1, 1024, 4}, Case{3, 37, 4}, Case{17, 16, 4}, Case{130, 1000, 4},
                       Case{5, 20, 3}, Case{9, 7, 2}, Case{4, 5, 1}, Case{64, 33, 6}}) {
    hm::Rng rng(5000 + c.L * 11 + c.E * 3 + c.K);
    ConvData d(rng, c.E, c.K);
    const int ldx = 2 * c.E + 1, ldo = c.E + 3;  // x is half of an in_proj-like output
    const auto x = random_vec(rng, std::size_t(c.L) * ldx, -2, 2);
    std::vector<float> o_ref(std::size_t(c.L) * ldo, kGuard), o_cpu = o_ref;
    auto s_ref = d.state, s_cpu = d.state;
    hm::ref::conv1d_silu(o_ref.data(), ldo, s_ref.data(), x.data(), ldx, d.w.data(), d.b.data(),
                         c.L, c.E, c.K);
    hm::cpu::conv1d_silu(o_cpu.data(), ldo, s_cpu.data(), x.data(), ldx, d.w.data(), d.b.data(),
                         c.L, c.E, c.K);
    SCOPED_TRACE("L=" + std::to_string(c.L) + " E=" + std::to_string(c.E) +
                 " K=" + std::to_string(c.K));
    EXPECT_LT(rel_err(o_cpu.data(), o_ref.data(), c.L, c.E, ldo), 1e-6);
    EXPECT_TRUE(padding_intact(o_cpu, c.L, c.E, ldo));
    EXPECT_EQ(s_cpu, s_ref);  // the state is a copy of inputs: exact
  }
}

// One call over L tokens == two calls (L1 + L2) == L one-token calls. The per-token arithmetic
// does not depend on the split, so the outputs agree to rounding; 1e-6 allows a future
// implementation to reorder sums.
HM_ISA_TEST(KernelsConv1dSilu, StateCarriesAcrossCalls) {
  const int L = 37, E = 45, K = 4, split = 20;
  hm::Rng rng(5500);
  ConvData d(rng, E, K);
  const auto x = random_vec(rng, std::size_t(L) * E, -2, 2);
  std::vector<float> o_one(std::size_t(L) * E), o_two(o_one.size()), o_tok(o_one.size());
  auto s_one = d.state, s_two = d.state, s_tok = d.state;
  hm::cpu::conv1d_silu(o_one.data(), E, s_one.data(), x.data(), E, d.w.data(), d.b.data(), L, E,
                       K);
  hm::cpu::conv1d_silu(o_two.data(), E, s_two.data(), x.data(), E, d.w.data(), d.b.data(), split,
                       E, K);
  hm::cpu::conv1d_silu(o_two.data() + split * E, E, s_two.data(), x.data() + split * E, E,
                       d.w.data(), d.b.data(), L - split, E, K);
  for (int t = 0; t < L; ++t)
    hm::cpu::conv1d_silu(o_tok.data() + t * E, E, s_tok.data(), x.data() + t * E, E, d.w.data(),
                         d.b.data(), 1, E, K);
  EXPECT_LT(rel_err(o_two, o_one), 1e-6);
  EXPECT_LT(rel_err(o_tok, o_one), 1e-6);
  EXPECT_EQ(s_two, s_one);
  EXPECT_EQ(s_tok, s_one);
}

// --- selective_scan --------------------------------------------------------------------------
// Inputs laid out as the model does: x and z are the halves of in_proj's output [L, 2E],
// B and C are columns of x_proj's output [L, R + 2N], dt and y have padded rows.
struct ScanData {
  int L, E, N, R = 3;
  int ldxz, lddt, ldbc, ldy;
  std::vector<float> xz, dt, dbc, dt_bias, A, D, state;
  ScanData(hm::Rng& rng, int L_, int E_, int N_, float dt_lo = -3, float dt_hi = 1)
      : L(L_), E(E_), N(N_), ldxz(2 * E_), lddt(E_ + 3), ldbc(R + 2 * N_), ldy(E_ + 5) {
    xz = random_vec(rng, std::size_t(L) * ldxz, -2, 2);
    dt = random_vec(rng, std::size_t(L) * lddt, dt_lo, dt_hi);
    dbc = random_vec(rng, std::size_t(L) * ldbc, -1, 1);
    dt_bias = random_vec(rng, E, -4.6f, -2.3f);  // softplus^-1 of dt in [0.01, 0.1]
    A.resize(std::size_t(E) * N);  // -exp(A_log), A_log = log(n + 1) perturbed
    for (int e = 0; e < E; ++e)
      for (int n = 0; n < N; ++n)
        A[e * N + n] = -std::exp(std::log(n + 1.0f) + rng.uniform(-0.3f, 0.3f));
    D = random_vec(rng, E, 0.5f, 1.5f);
    state = random_vec(rng, std::size_t(E) * N, -1, 1);
  }
  const float* x(int t = 0) const { return xz.data() + std::size_t(t) * ldxz; }
  const float* z(int t = 0) const { return xz.data() + std::size_t(t) * ldxz + E; }
  const float* dtp(int t = 0) const { return dt.data() + std::size_t(t) * lddt; }
  const float* B(int t = 0) const { return dbc.data() + std::size_t(t) * ldbc + R; }
  const float* C(int t = 0) const { return dbc.data() + std::size_t(t) * ldbc + R + N; }
  // Tokens t0..t0+n-1 into y (rows of ldy) and s.
  template <class Fn>
  void run(Fn fn, float* y, float* s, int t0, int n) const {
    fn(y + std::size_t(t0) * ldy, ldy, s, x(t0), ldxz, dtp(t0), lddt, dt_bias.data(), A.data(),
       B(t0), C(t0), ldbc, D.data(), z(t0), ldxz, n, E, N);
  }
};

// Per step: exp to 2e-7, softplus 4e-7, silu 3e-7, N-term float sums. The state remembers
// ~1/(delta |A|) steps (up to ~100 here), adding a rounding error of eps at each, which
// reaches a few 1e-6 relative (observed <= 1.1e-6); 2e-5.
HM_ISA_TEST(KernelsSelectiveScan, MatchesReference) {
  struct Case { int L, E, N; };
  for (const Case c : {Case{1, 1024, 16}, Case{3, 37, 16}, Case{17, 16, 5}, Case{130, 100, 16},
                       Case{64, 48, 7}, Case{5, 33, 1}, Case{70, 20, 32}, Case{70, 1000, 16},
                       // decode: the row-layout path at each ISA's lane counts (N / kW = 1..4)
                       Case{2, 45, 32}, Case{1, 29, 8}, Case{4, 21, 64}}) {
    hm::Rng rng(6000 + c.L * 7 + c.E * 3 + c.N);
    const ScanData d(rng, c.L, c.E, c.N);
    std::vector<float> y_ref(std::size_t(c.L) * d.ldy, kGuard), y_cpu = y_ref;
    auto s_ref = d.state, s_cpu = d.state;
    d.run(hm::ref::selective_scan, y_ref.data(), s_ref.data(), 0, c.L);
    d.run(hm::cpu::selective_scan, y_cpu.data(), s_cpu.data(), 0, c.L);
    SCOPED_TRACE("L=" + std::to_string(c.L) + " E=" + std::to_string(c.E) +
                 " N=" + std::to_string(c.N));
    EXPECT_LT(rel_err(y_cpu.data(), y_ref.data(), c.L, c.E, d.ldy), 2e-5);
    EXPECT_LT(rel_err(s_cpu, s_ref), 2e-5);
    EXPECT_TRUE(padding_intact(y_cpu, c.L, c.E, d.ldy));
  }
}

// dt + dt_bias across [-40, 30]: both sides of softplus's x > 20 branch, deltas from 1e-17
// (state barely moves) to 30 (exp(delta A) underflows to 0).
HM_ISA_TEST(KernelsSelectiveScan, ExtremeTimeSteps) {
  hm::Rng rng(6500);
  const ScanData d(rng, 40, 50, 16, -36, 34);
  std::vector<float> y_ref(std::size_t(d.L) * d.ldy), y_cpu = y_ref;
  auto s_ref = d.state, s_cpu = d.state;
  d.run(hm::ref::selective_scan, y_ref.data(), s_ref.data(), 0, d.L);
  d.run(hm::cpu::selective_scan, y_cpu.data(), s_cpu.data(), 0, d.L);
  EXPECT_LT(rel_err(y_cpu.data(), y_ref.data(), d.L, d.E, d.ldy), 2e-5);
  EXPECT_LT(rel_err(s_cpu, s_ref), 2e-5);
}

// One call over L tokens == two calls == L one-token calls (decoding). With N = 16 the short
// calls take the decoding path (state kept in its row layout, sums in another order), so the
// results agree to rounding (observed 2e-7); 1e-6.
HM_ISA_TEST(KernelsSelectiveScan, StateCarriesAcrossCalls) {
  for (const int N : {16, 5}) {
    hm::Rng rng(6600 + N);
    const ScanData d(rng, 37, 45, N);
    const int split = 20;
    std::vector<float> y_one(std::size_t(d.L) * d.ldy), y_two(y_one.size()), y_tok(y_one.size());
    auto s_one = d.state, s_two = d.state, s_tok = d.state;
    d.run(hm::cpu::selective_scan, y_one.data(), s_one.data(), 0, d.L);
    d.run(hm::cpu::selective_scan, y_two.data(), s_two.data(), 0, split);
    d.run(hm::cpu::selective_scan, y_two.data(), s_two.data(), split, d.L - split);
    for (int t = 0; t < d.L; ++t) d.run(hm::cpu::selective_scan, y_tok.data(), s_tok.data(), t, 1);
    SCOPED_TRACE("N=" + std::to_string(N));
    EXPECT_LT(rel_err(y_two, y_one), 1e-6);
    EXPECT_LT(rel_err(y_tok, y_one), 1e-6);
    EXPECT_LT(rel_err(s_two, s_one), 1e-6);
    EXPECT_LT(rel_err(s_tok, s_one), 1e-6);
  }
}

// --- attention -------------------------------------------------------------------------------
struct AttnCase { int L, pos0, H, G, hd; };

void check_attention(const AttnCase& c, double tol) {
  hm::Rng rng(7000 + c.L * 13 + c.pos0 * 7 + c.H * 5 + c.G * 3 + c.hd);
  const int T = c.pos0 + c.L, ldq = c.H * c.hd + 5, ldo = c.H * c.hd + 3, ldkv = c.G * c.hd;
  // q scaled so that some softmax rows are peaked and others flat.
  const auto q = random_vec(rng, std::size_t(c.L) * ldq, -3, 3);
  const auto k = random_vec(rng, std::size_t(T) * ldkv, -1, 1);
  const auto v = random_vec(rng, std::size_t(T) * ldkv, -1, 1);
  std::vector<float> o_ref(std::size_t(c.L) * ldo, kGuard), o_cpu = o_ref;
  hm::ref::attention(o_ref.data(), ldo, q.data(), ldq, k.data(), v.data(), c.L, c.pos0, c.H, c.G,
                     c.hd);
  hm::cpu::attention(o_cpu.data(), ldo, q.data(), ldq, k.data(), v.data(), c.L, c.pos0, c.H, c.G,
                     c.hd);
  SCOPED_TRACE("L=" + std::to_string(c.L) + " pos0=" + std::to_string(c.pos0) +
               " H=" + std::to_string(c.H) + " G=" + std::to_string(c.G) +
               " hd=" + std::to_string(c.hd));
  EXPECT_LT(rel_err(o_cpu.data(), o_ref.data(), c.L, c.H * c.hd, ldo), tol);
  EXPECT_TRUE(padding_intact(o_cpu, c.L, c.H * c.hd, ldo));
}

// Float dot products over hd (sqrt(hd) eps of scores up to ~10, so ~1e-6 absolute in the
// exponent), exp2 to 2e-7, and float sums over up to T keys whose terms are positive weights:
// a few 1e-6 relative to the output (observed <= 1.6e-6); 2e-5.
HM_ISA_TEST(KernelsAttention, Prefill) {
  for (const AttnCase c : {AttnCase{3, 0, 4, 4, 8}, AttnCase{3, 5, 4, 4, 8},
                           AttnCase{17, 0, 4, 2, 16}, AttnCase{130, 0, 4, 1, 64},
                           AttnCase{130, 70, 2, 2, 64}, AttnCase{65, 200, 1, 1, 40},
                           AttnCase{20, 10, 2, 1, 128}, AttnCase{9, 3, 3, 3, 24}})
    check_attention(c, 2e-5);
}

HM_ISA_TEST(KernelsAttention, Decode) {
  for (const AttnCase c : {AttnCase{1, 0, 4, 4, 16}, AttnCase{1, 100, 4, 1, 64},
                           AttnCase{1, 4095, 8, 8, 64}, AttnCase{2, 63, 2, 1, 16},
                           AttnCase{1, 77, 2, 2, 8}, AttnCase{1, 50, 2, 2, 40},
                           AttnCase{1, 300, 4, 2, 128}, AttnCase{3, 40, 1, 1, 200}})
    check_attention(c, 2e-5);
}

// With more threads than (kv head, tile) tasks, keys are split into ranges whose partial
// softmax states are merged; force that path with 4 threads.
HM_ISA_TEST(KernelsAttention, SplitKeysAcrossThreads) {
  const int saved = hm::num_threads();
  hm::set_num_threads(4);
  for (const AttnCase c : {AttnCase{1, 3000, 2, 1, 64}, AttnCase{8, 2000, 1, 1, 64},
                           AttnCase{3, 1500, 4, 1, 16}, AttnCase{2, 1000, 4, 2, 16}})
    check_attention(c, 2e-5);
  hm::set_num_threads(saved);
}

// --- attention with a half-precision cache ---------------------------------------------------
// K and V as a cache of halves: random values rounded to binary16, plus `extra` rows of NaN
// past the keys a call may read, which would turn any output that touched them into NaN.
std::vector<uint16_t> random_f16(hm::Rng& rng, int rows, int cols, int extra) {
  std::vector<uint16_t> h(std::size_t(rows + extra) * cols, uint16_t(0x7e00));
  for (std::size_t i = 0; i < std::size_t(rows) * cols; ++i)
    h[i] = hm::f32_to_f16(rng.uniform(-1, 1));
  return h;
}
std::vector<float> widen(const std::vector<uint16_t>& h) {
  std::vector<float> f(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) f[i] = hm::f16_to_f32(h[i]);
  return f;
}

struct AttnF16Data {
  int ldq, ldo;
  std::vector<float> q, o0;
  std::vector<uint16_t> k, v;
  AttnF16Data(const AttnCase& c)
      : ldq(c.H * c.hd + 5), ldo(c.H * c.hd + 3), o0(std::size_t(c.L) * ldo, kGuard) {
    hm::Rng rng(7500 + c.L * 13 + c.pos0 * 7 + c.H * 5 + c.G * 3 + c.hd);
    q = random_vec(rng, std::size_t(c.L) * ldq, -3, 3);
    k = random_f16(rng, c.pos0 + c.L, c.G * c.hd, 2);
    v = random_f16(rng, c.pos0 + c.L, c.G * c.hd, 2);
  }
};

std::string attn_name(const AttnCase& c) {
  return "L=" + std::to_string(c.L) + " pos0=" + std::to_string(c.pos0) +
         " H=" + std::to_string(c.H) + " G=" + std::to_string(c.G) + " hd=" + std::to_string(c.hd);
}

// Same error budget as the float kernel: the halves widen exactly, the arithmetic is float.
void check_attention_f16(const AttnCase& c, double tol) {
  const AttnF16Data d(c);
  auto o_ref = d.o0, o_cpu = d.o0;
  hm::ref::attention_f16kv(o_ref.data(), d.ldo, d.q.data(), d.ldq, d.k.data(), d.v.data(), c.L,
                           c.pos0, c.H, c.G, c.hd);
  hm::cpu::attention_f16kv(o_cpu.data(), d.ldo, d.q.data(), d.ldq, d.k.data(), d.v.data(), c.L,
                           c.pos0, c.H, c.G, c.hd);
  SCOPED_TRACE(attn_name(c));
  EXPECT_LT(rel_err(o_cpu.data(), o_ref.data(), c.L, c.H * c.hd, d.ldo), tol);
  EXPECT_TRUE(padding_intact(o_cpu, c.L, c.H * c.hd, d.ldo));
}

HM_ISA_TEST(KernelsAttentionF16, Prefill) {
  for (const AttnCase c : {AttnCase{3, 0, 4, 4, 8}, AttnCase{3, 5, 4, 4, 8},
                           AttnCase{17, 0, 4, 2, 16}, AttnCase{130, 0, 4, 1, 64},
                           AttnCase{130, 70, 2, 2, 64}, AttnCase{65, 200, 1, 1, 40},
                           AttnCase{20, 10, 2, 1, 128}, AttnCase{9, 3, 3, 3, 24}})
    check_attention_f16(c, 2e-5);
}

HM_ISA_TEST(KernelsAttentionF16, Decode) {
  for (const AttnCase c : {AttnCase{1, 0, 4, 4, 16}, AttnCase{1, 100, 4, 1, 64},
                           AttnCase{1, 4095, 8, 8, 64}, AttnCase{2, 63, 2, 1, 16},
                           AttnCase{1, 77, 2, 2, 8}, AttnCase{1, 50, 2, 2, 40},
                           AttnCase{1, 300, 4, 2, 128}, AttnCase{3, 40, 1, 1, 200}})
    check_attention_f16(c, 2e-5);
}

HM_ISA_TEST(KernelsAttentionF16, SplitKeysAcrossThreads) {
  const int saved = hm::num_threads();
  hm::set_num_threads(4);
  for (const AttnCase c : {AttnCase{1, 3000, 2, 1, 64}, AttnCase{1, 4095, 8, 8, 64},
                           AttnCase{8, 2000, 1, 1, 64}, AttnCase{3, 1500, 4, 1, 16},
                           AttnCase{2, 1000, 4, 2, 16}, AttnCase{1, 2500, 4, 2, 40}})
    check_attention_f16(c, 2e-5);
  hm::set_num_threads(saved);
}

// The f16 kernel is the float kernel reading halves: on a cache whose values are already
// halves it must give the float kernel's result on the same values (the same arithmetic in
// the same order; 1e-6 would still allow a reordered sum).
HM_ISA_TEST(KernelsAttentionF16, MatchesFloatOnRoundedCache) {
  const int saved = hm::num_threads();
  for (const int threads : {1, 4}) {
    hm::set_num_threads(threads);
    for (const AttnCase c : {AttnCase{1, 4095, 8, 8, 64}, AttnCase{1, 300, 4, 2, 128},
                             AttnCase{3, 40, 1, 1, 200}, AttnCase{130, 70, 2, 2, 64},
                             AttnCase{8, 2000, 1, 1, 64}, AttnCase{17, 0, 4, 2, 16}}) {
      const AttnF16Data d(c);
      const auto kf = widen(d.k), vf = widen(d.v);
      auto o_f32 = d.o0, o_f16 = d.o0;
      hm::cpu::attention(o_f32.data(), d.ldo, d.q.data(), d.ldq, kf.data(), vf.data(), c.L,
                         c.pos0, c.H, c.G, c.hd);
      hm::cpu::attention_f16kv(o_f16.data(), d.ldo, d.q.data(), d.ldq, d.k.data(), d.v.data(),
                               c.L, c.pos0, c.H, c.G, c.hd);
      SCOPED_TRACE(attn_name(c) + " threads=" + std::to_string(threads));
      EXPECT_LT(rel_err(o_f16.data(), o_f32.data(), c.L, c.H * c.hd, d.ldo), 1e-6);
    }
  }
  hm::set_num_threads(saved);
}

// --- store_f16 -------------------------------------------------------------------------------
// Bit-exact against the scalar conversion (hm::f32_to_f16) on every kind of input: explicit
// edge cases (overflow to inf and the largest finite, ties to even in the normal and subnormal
// ranges, the subnormal/zero boundary, NaN payloads, float denormals), exact ties between
// random neighbouring halves, values spread over the half range and beyond, and random bits.
std::vector<float> f16_edge_values(hm::Rng& rng, std::size_t n) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {
      0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, -65504.0f, std::nextafter(65520.0f, 0.0f), 65520.0f,
      -65520.0f, 65536.0f, 1e5f, 3.4e38f, inf, -inf,
      std::bit_cast<float>(0x7fc00000u), std::bit_cast<float>(0xffc00001u),  // quiet NaNs
      std::bit_cast<float>(0x7f800001u), std::bit_cast<float>(0x7fa02000u),  // signalling
      std::bit_cast<float>(0x7fffffffu),
      0x1p-14f, std::nextafter(0x1p-14f, 0.0f), 0x1p-24f, -0x1p-24f, 0x1p-25f,  // 2^-25: tie -> 0
      std::nextafter(0x1p-25f, 1.0f), std::nextafter(0x1p-25f, 0.0f), 3 * 0x1p-25f,
      5 * 0x1p-25f, 1023 * 0x1p-24f, 2047 * 0x1p-25f,  // last one: tie between 1023 and 1024
      1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 2049.0f, 2051.0f, 1e-40f, -1e-45f,
      std::numeric_limits<float>::min(), 0.1f, -3.14159f};
  while (v.size() < n) {
    const uint32_t r = uint32_t(rng.next_u64());
    float x;
    switch (r % 4) {
      case 0: {  // exact tie between two finite halves (even one wins)
        const uint16_t h = uint16_t((r >> 8) & 0xffff);
        const uint16_t up = uint16_t(h + 1);
        if ((h & 0x7c00) == 0x7c00 || (up & 0x7fff) > 0x7bff) continue;
        x = float((double(hm::f16_to_f32(h)) + double(hm::f16_to_f32(up))) / 2);
        break;
      }
      case 1: {  // |x| in [2^-27, 2^18): all of the half range plus both ends
        const uint32_t e = 127 - 27 + (r >> 2) % 45;
        x = std::bit_cast<float>((r & 0x80000000u) | (e << 23) |
                                 (uint32_t(rng.next_u64()) & 0x7fffff));
        break;
      }
      default: x = std::bit_cast<float>(r);  // any float, NaN and denormals included
    }
    v.push_back(x);
  }
  v.resize(n);
  return v;
}

HM_ISA_TEST(KernelsStoreF16, BitExact) {
  struct Case { int n, d; };
  const int saved = hm::num_threads();
  for (const int threads : {1, 4}) {
    hm::set_num_threads(threads);
    for (const Case c : {Case{1, 1}, Case{1, 15}, Case{1, 16}, Case{3, 17}, Case{1, 512},
                         Case{7, 100}, Case{600, 512}, Case{300, 1001}}) {
      hm::Rng rng(8000 + c.n * 7 + c.d);
      const int ld_src = c.d + 3, ld_dst = c.d + 5;
      const auto src = f16_edge_values(rng, std::size_t(c.n) * ld_src);
      std::vector<uint16_t> want(std::size_t(c.n) * ld_dst, uint16_t(0xbeef)), got = want,
                            ref = want;
      for (int i = 0; i < c.n; ++i)
        for (int j = 0; j < c.d; ++j)
          want[std::size_t(i) * ld_dst + j] = hm::f32_to_f16(src[std::size_t(i) * ld_src + j]);
      hm::cpu::store_f16(got.data(), ld_dst, src.data(), ld_src, c.n, c.d);
      hm::ref::store_f16(ref.data(), ld_dst, src.data(), ld_src, c.n, c.d);
      SCOPED_TRACE("n=" + std::to_string(c.n) + " d=" + std::to_string(c.d) +
                   " threads=" + std::to_string(threads));
      EXPECT_EQ(ref, want);
      int bad = 0;  // padding (0xbeef) included: it must stay
      for (int i = 0; i < c.n; ++i)
        for (int j = 0; j < ld_dst; ++j) {
          const std::size_t at = std::size_t(i) * ld_dst + j;
          if (got[at] != want[at] && bad++ < 5)
            ADD_FAILURE() << "row " << i << " col " << j << std::hex << ": float 0x"
                          << (j < c.d ? std::bit_cast<uint32_t>(src[std::size_t(i) * ld_src + j])
                                      : 0u)
                          << " gave 0x" << got[at] << ", want 0x" << want[at];
        }
      EXPECT_EQ(bad, 0);
    }
  }
  hm::set_num_threads(saved);
}

// --- threads ---------------------------------------------------------------------------------
TEST(KernelsThreads, SetAndGet) {
  const int saved = hm::num_threads();
  hm::set_num_threads(1);
  EXPECT_EQ(hm::num_threads(), 1);
  hm::set_num_threads(3);
  EXPECT_EQ(hm::num_threads(), 3);
  hm::set_num_threads(0);  // default: hardware threads
  EXPECT_GE(hm::num_threads(), 1);
  hm::set_num_threads(saved);
}

}  // namespace
