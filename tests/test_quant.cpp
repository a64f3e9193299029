// Packed weights (kernels/quant.h): the bytes follow the documented rounding rule, dequantized
// weights are within the format's error bound, and every hm::cpu kernel matches hm::ref on
// fresh random inputs at odd sizes, with each ISA this CPU supports forced in turn.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/quant.h"

namespace {

using hm::WeightType;
using hm::cpu::Isa;

constexpr WeightType kTypes[] = {WeightType::BF16, WeightType::F16, WeightType::Q8_0, WeightType::Q4_0};

std::vector<float> random_vec(hm::Rng& rng, std::size_t n, float lo, float hi) {
  std::vector<float> v(n);
  for (auto& x : v) x = rng.uniform(lo, hi);
  return v;
}

std::vector<unsigned char> packed(WeightType t, const std::vector<float>& w, int n, int k) {
  std::vector<unsigned char> out(hm::row_bytes(t, k) * std::size_t(n));
  hm::ref::quantize(t, out.data(), w.data(), n, k);
  return out;
}

// Every ISA this CPU supports, with the default restored afterwards.
struct EachIsa {
  std::vector<Isa> isas;
  Isa saved = hm::cpu::quant_isa();
  EachIsa() {
    for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512})
      if (hm::cpu::isa_supported(isa)) isas.push_back(isa);
  }
  ~EachIsa() { hm::cpu::set_quant_isa(saved); }
};

// max_i |got_i - want_i| / (|want_i| + rms(want)), as in test_kernels.cpp.
double rel_err(const float* got, const float* want, int rows, int cols, int ld) {
  double ss = 0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) ss += double(want[r * ld + c]) * want[r * ld + c];
  const double rms = std::sqrt(ss / std::max(1, rows * cols)) + 1e-30;
  double worst = 0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const double g = got[r * ld + c], w = want[r * ld + c];
      if (!std::isfinite(g)) return INFINITY;
      worst = std::max(worst, std::fabs(g - w) / (std::fabs(w) + rms));
    }
  return worst;
}

// --- the bytes -------------------------------------------------------------------------------

// Hand-made blocks whose scale is exact, so each q is the rule's by inspection.
TEST(QuantBytes, Q8RoundsHalfAwayFromZero) {
  std::vector<float> w(32, 0.0f);
  w[0] = 127;  // amax 127: d = 1
  w[1] = 2.5f, w[2] = -2.5f, w[3] = 0.49f, w[4] = -126.5f, w[5] = 1.5f, w[6] = -0.5f;
  w.resize(64, 0.0f);  // the second block is all zeros: d = 0, q = 0
  const auto p = packed(WeightType::Q8_0, w, 1, 64);
  hm::BlockQ8_0 b[2];
  std::memcpy(b, p.data(), sizeof b);
  EXPECT_EQ(b[0].d, 0x3c00);  // 1.0 in f16
  const int want[] = {127, 3, -3, 0, -127, 2, -1};
  for (int j = 0; j < 7; ++j) EXPECT_EQ(b[0].q[j], want[j]) << "element " << j;
  EXPECT_EQ(b[1].d, 0);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(b[1].q[j], 0);
}

TEST(QuantBytes, Q4ScaleFromSignedMaxAndHalvesRoundUp) {
  std::vector<float> w(32, 0.0f);
  w[0] = -8;  // m = -8: d = 1, nibble = floor(w + 8.5)
  w[1] = 0.5f, w[2] = -0.5f, w[3] = 7.9f, w[17] = 3.49f, w[18] = -7.5f;
  // Second block: +4 comes before -4, so m = +4, d = -0.5, and w = +4 is nibble 0.
  std::vector<float> w2(32, 1.0f);
  w2[3] = 4, w2[9] = -4;
  w.insert(w.end(), w2.begin(), w2.end());
  const auto p = packed(WeightType::Q4_0, w, 1, 64);
  hm::BlockQ4_0 b[2];
  std::memcpy(b, p.data(), sizeof b);
  EXPECT_EQ(b[0].d, 0x3c00);
  auto nib = [&](int blk, int j) { return j < 16 ? b[blk].qs[j] & 15 : b[blk].qs[j - 16] >> 4; };
  EXPECT_EQ(nib(0, 0), 0);
  EXPECT_EQ(nib(0, 1), 9);   // 0.5 + 8.5 = 9
  EXPECT_EQ(nib(0, 2), 8);   // -0.5 + 8.5 = 8: halves round up, not away from zero
  EXPECT_EQ(nib(0, 3), 15);  // 16.4 clamps to 15
  EXPECT_EQ(nib(0, 4), 8);   // zero
  EXPECT_EQ(nib(0, 17), 11);
  EXPECT_EQ(nib(0, 18), 1);
  EXPECT_EQ(b[1].d, 0xb800);  // -0.5
  EXPECT_EQ(nib(1, 3), 0);    // 4 / -0.5 = -8
  EXPECT_EQ(nib(1, 9), 15);   // -4 / -0.5 = 8 -> 16, clamped
  EXPECT_EQ(nib(1, 0), 6);    // 1 / -0.5 = -2
}

// On random blocks (some with repeated extremes and zeros), the bytes are the rule of
// kernels/quant.h recomputed here, and hm::cpu::quantize writes the same bytes.
TEST(QuantBytes, RandomBlocksFollowTheRule) {
  hm::Rng rng(17);
  const int n = 67, k = 32 * 13;
  auto w = random_vec(rng, std::size_t(n) * k, -3, 3);
  for (int i = 0; i < 200; ++i) w[rng.next_u64() % w.size()] = 0.0f;
  for (int i = 0; i < 50; ++i) {  // ties in magnitude, of either sign
    const std::size_t a = rng.next_u64() % w.size(), b = (a / 32) * 32 + rng.next_u64() % 32;
    w[b] = (i & 1) ? -w[a] : w[a];
  }
  std::fill(w.begin() + 32, w.begin() + 64, 0.0f);  // an all-zero block
  for (WeightType t : {WeightType::Q8_0, WeightType::Q4_0}) {
    SCOPED_TRACE(hm::weight_type_name(t));
    const auto p = packed(t, w, n, k);
    for (std::size_t blk = 0; blk < w.size() / 32; ++blk) {
      const float* x = &w[blk * 32];
      float amax = 0, m = 0;
      for (int j = 0; j < 32; ++j)
        if (std::fabs(x[j]) > amax) amax = std::fabs(x[j]), m = x[j];
      const float d = t == WeightType::Q8_0 ? amax / 127 : m / -8;
      const float inv = d == 0 ? 0.0f : 1 / d;
      uint16_t dbits;
      std::memcpy(&dbits, p.data() + blk * (t == WeightType::Q8_0 ? 34 : 18), 2);
      ASSERT_EQ(dbits, hm::f32_to_f16(d)) << "block " << blk;
      for (int j = 0; j < 32; ++j) {
        int q;
        if (t == WeightType::Q8_0) {
          q = int8_t(p[blk * 34 + 2 + j]);
          ASSERT_EQ(q, int(std::round(x[j] * inv))) << "block " << blk << " element " << j;
        } else {
          const unsigned char byte = p[blk * 18 + 2 + j % 16];
          q = j < 16 ? byte & 15 : byte >> 4;
          const float prod = x[j] * inv;  // rounded to float before the + 8.5
          ASSERT_EQ(q, std::min(15, int(std::floor(prod + 8.5f)))) << "block " << blk << " element " << j;
        }
      }
    }
    std::vector<unsigned char> c(p.size(), 0xAB);
    hm::cpu::quantize(t, c.data(), w.data(), n, k);
    EXPECT_EQ(c, p);
  }
}

TEST(QuantBytes, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 is halfway between two bf16 values: the even one (1.0) wins; 1 + 3*2^-8 rounds up.
  const std::vector<float> w = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, -2.0f, 0.0f};
  const auto p = packed(WeightType::BF16, w, 1, 4);
  uint16_t h[4];
  std::memcpy(h, p.data(), sizeof h);
  EXPECT_EQ(h[0], 0x3f80);
  EXPECT_EQ(h[1], 0x3f82);
  EXPECT_EQ(h[2], 0xc000);
  EXPECT_EQ(h[3], 0x0000);
}

// f16 rounds as core/dtype.h's f32_to_f16: ties to even (also between subnormals), inf and NaN
// kept, -0 kept; a finite weight that would round to inf is an error, not an inf weight.
TEST(QuantBytes, F16RoundsToNearestEven) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> w = {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, -2.0f, -0.0f, 0x1p-24f, 0x1p-25f,
                                3 * 0x1p-25f, 65504.0f, 65519.0f, -inf, NAN};
  const int k = int(w.size());
  const auto p = packed(WeightType::F16, w, 1, k);
  std::vector<uint16_t> h(w.size());
  std::memcpy(h.data(), p.data(), p.size());
  const uint16_t want[] = {0x3c00, 0x3c02, 0xc000, 0x8000, 0x0001, 0x0000, 0x0002, 0x7bff, 0x7bff, 0xfc00};
  for (int j = 0; j < k - 1; ++j) EXPECT_EQ(h[std::size_t(j)], want[j]) << "element " << j;
  EXPECT_EQ(h.back() & 0x7c00, 0x7c00);  // NaN: exponent all ones, mantissa not zero
  EXPECT_NE(h.back() & 0x03ff, 0);
  for (float big : {65520.0f, -1e6f, std::numeric_limits<float>::max()}) {
    std::vector<float> bad(40, 0.5f);
    bad[33] = big;
    std::vector<unsigned char> buf(hm::row_bytes(WeightType::F16, 40) * 2);
    EXPECT_THROW(hm::ref::quantize(WeightType::F16, buf.data(), bad.data(), 1, 40), hm::Error) << big;
    EXPECT_THROW(hm::cpu::quantize(WeightType::F16, buf.data(), bad.data(), 1, 40), hm::Error) << big;
  }
}

// --- dequantize: error bounds and agreement --------------------------------------------------

// Every 16-bit pattern of bf16 and f16 (subnormals, infs, NaNs, -0) widens on every ISA to what
// the conversions of core/dtype.h give, bit for bit (any NaN for a NaN).
TEST(QuantDequantize, EveryHalfPatternWidensAsTheConversion) {
  EachIsa each;
  const int k = 1 << 16;
  std::vector<uint16_t> bits(k);
  for (int j = 0; j < k; ++j) bits[std::size_t(j)] = uint16_t(j);
  for (WeightType t : {WeightType::BF16, WeightType::F16}) {
    std::vector<float> want(k);
    hm::ref::dequantize(t, want.data(), bits.data(), 1, k);
    for (int j = 0; j < k; ++j) {
      const float c = t == WeightType::BF16 ? hm::bf16_to_f32(bits[std::size_t(j)]) : hm::f16_to_f32(bits[std::size_t(j)]);
      ASSERT_TRUE(std::memcmp(&c, &want[std::size_t(j)], 4) == 0 || (std::isnan(c) && std::isnan(want[std::size_t(j)])))
          << hm::weight_type_name(t) << " bits " << j;
    }
    for (Isa isa : each.isas) {
      hm::cpu::set_quant_isa(isa);
      SCOPED_TRACE(std::string(hm::weight_type_name(t)) + " " + hm::cpu::isa_name(isa));
      std::vector<float> got(k, 12345.0f);
      hm::cpu::dequantize(t, got.data(), bits.data(), 1, k);
      std::size_t differ = 0;
      for (int j = 0; j < k; ++j) {
        const float g = got[std::size_t(j)], w = want[std::size_t(j)];
        differ += !(std::memcmp(&g, &w, 4) == 0 || (std::isnan(g) && std::isnan(w)));
      }
      EXPECT_EQ(differ, 0u);
    }
  }
}

// |w - dequantize(quantize(w))| per element: q8_0 <= d/2 plus the f16 rounding of d (2^-11
// relative, times |q| <= 127); q4_0 <= |d| (the clamped top value of the side opposite m loses
// up to one step), plus 8 |d| 2^-11; bf16 <= 2^-8 relative (half a step of 7 stored mantissa
// bits); f16 <= 2^-11 relative (10 bits), or 2^-25 below 2^-14 (its subnormals' half step). The RMS over Gaussian weights says the error is also typical for the format, not just
// bounded: q8_0 ~0.5%, q4_0 ~8% of rms(w).
TEST(QuantRoundTrip, ErrorWithinTheFormatsBound) {
  hm::Rng rng(23);
  const int n = 31, k = 32 * 9;
  std::vector<float> w(std::size_t(n) * k);
  for (auto& v : w) v = float(rng.normal());
  for (WeightType t : kTypes) {
    SCOPED_TRACE(hm::weight_type_name(t));
    const auto p = packed(t, w, n, k);
    std::vector<float> back(w.size());
    hm::ref::dequantize(t, back.data(), p.data(), n, k);
    double se = 0, ss = 0;
    for (std::size_t blk = 0; blk < w.size() / 32; ++blk) {
      float amax = 0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(w[blk * 32 + j]));
      for (int j = 0; j < 32; ++j) {
        const std::size_t i = blk * 32 + j;
        const double err = std::fabs(double(w[i]) - back[i]);
        double bound;
        if (t == WeightType::BF16) bound = std::fabs(w[i]) * 0x1p-8;
        else if (t == WeightType::F16) bound = std::max(std::fabs(w[i]) * 0x1p-11, 0x1p-25);
        else if (t == WeightType::Q8_0) bound = amax / 127.0 * (0.5 + 127 * 0x1p-11) * (1 + 1e-6);
        else bound = amax / 8.0 * (1 + 8 * 0x1p-11) * (1 + 1e-6);
        ASSERT_LE(err, bound) << "element " << i;
        se += err * err;
        ss += double(w[i]) * w[i];
      }
    }
    const double rel_rms = std::sqrt(se / ss);
    const double limit = t == WeightType::BF16 ? 3e-3 : t == WeightType::F16 ? 4e-4 : t == WeightType::Q8_0 ? 0.01 : 0.12;
    EXPECT_LT(rel_rms, limit);
    EXPECT_GT(rel_rms, limit / 30);  // a format that loses nothing would be a bug in the test
  }
}

TEST(QuantDequantize, CpuEqualsReferenceOnEveryIsa) {
  EachIsa each;
  hm::Rng rng(29);
  for (WeightType t : kTypes) {
    for (int k : {32, 96, 800, 37, 75}) {
      if (hm::is_block_format(t) && k % 32) continue;
      const int n = 1031;  // over the threading threshold for every type at k = 800
      const auto w = random_vec(rng, std::size_t(n) * k, -2, 2);
      const auto p = packed(t, w, n, k);
      std::vector<float> want(w.size());
      hm::ref::dequantize(t, want.data(), p.data(), n, k);
      for (Isa isa : each.isas) {
        hm::cpu::set_quant_isa(isa);
        SCOPED_TRACE(std::string(hm::weight_type_name(t)) + " k=" + std::to_string(k) + " " +
                     hm::cpu::isa_name(isa));
        std::vector<float> got(w.size(), NAN);
        hm::cpu::dequantize(t, got.data(), p.data(), n, k);
        // Equal values (q4_0's zero may come out as +0 where the reference has -0).
        std::size_t differ = 0;
        for (std::size_t i = 0; i < got.size(); ++i) differ += !(got[i] == want[i]);
        EXPECT_EQ(differ, 0u);
      }
    }
  }
}

// --- linear_packed ---------------------------------------------------------------------------

// Both sides compute x' . dequantize(W) in float (x' = x rounded per block for q8_0 / q4_0, the
// same integers on every path); only the order of the additions differs (vector partial sums
// and a tree, integer block sums, or sgemm's blocking): ~sqrt(k) eps of the output scale,
// 2e-6 at k = 800 observed; 1e-5.
TEST(QuantLinear, MatchesReferenceOnEveryIsa) {
  EachIsa each;
  const hm::cpu::LinearLarge saved_large = hm::cpu::linear_large_mode();
  struct Case { int m, n, k; };
  const Case cases[] = {{1, 33, 32},   {1, 37, 800},  {2, 1, 96},    {3, 131, 224}, {4, 67, 64},
                        {5, 33, 96},   {17, 131, 800}, {64, 45, 32}, {1, 2049, 256}, {4, 2049, 256},
                        {33, 2049, 256}, {1, 19, 37},  {3, 21, 75},  {9, 21, 75},
                        // the integer GEMM's 6-row tiles and 32-row panels, with tails of each
                        {6, 32, 64},   {7, 65, 96},   {13, 31, 160}, {50, 97, 32}, {130, 70, 416}};
  for (WeightType t : kTypes) {
    for (const Case c : cases) {
      if (hm::is_block_format(t) && c.k % 32) continue;
      for (bool acc : {false, true}) {
        hm::Rng rng(1000 + c.m * 7 + c.n * 13 + c.k + acc + 100 * int(t));
        const int ldx = c.k + 3, ldy = c.n + 5;
        const auto x = random_vec(rng, std::size_t(c.m) * ldx, -1, 1);
        const auto p = packed(t, random_vec(rng, std::size_t(c.n) * c.k, -1, 1), c.n, c.k);
        // Without accumulate y starts as NaN (workspace); padding columns must stay untouched.
        std::vector<float> y0(std::size_t(c.m) * ldy, 12345.0f);
        for (int i = 0; i < c.m; ++i)
          for (int o = 0; o < c.n; ++o) y0[i * ldy + o] = acc ? rng.uniform(-1, 1) : NAN;
        auto want = y0;
        hm::ref::linear_packed(want.data(), ldy, x.data(), ldx, p.data(), t, c.m, c.n, c.k, acc);
        for (Isa isa : each.isas)
          for (hm::cpu::LinearLarge large : {hm::cpu::LinearLarge::Blas, hm::cpu::LinearLarge::Blocks}) {
            hm::cpu::set_quant_isa(isa);
            hm::cpu::set_linear_large(large);  // the float tiles' product: sgemm or linear_rows blocks
            SCOPED_TRACE(std::string(hm::weight_type_name(t)) + " " + hm::cpu::isa_name(isa) +
                         (large == hm::cpu::LinearLarge::Blas ? " sgemm" : " blocks") + " m=" + std::to_string(c.m) +
                         " n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) + " acc=" + std::to_string(acc));
            auto got = y0;
            hm::cpu::linear_packed(got.data(), ldy, x.data(), ldx, p.data(), t, c.m, c.n, c.k, acc);
            EXPECT_LT(rel_err(got.data(), want.data(), c.m, c.n, ldy), 1e-5);
            for (int i = 0; i < c.m; ++i)
              for (int o = c.n; o < ldy; ++o) ASSERT_EQ(got[i * ldy + o], 12345.0f);
          }
        hm::cpu::set_linear_large(saved_large);
      }
    }
  }
}

// The reference itself against the math of kernels/quant.h in double: x as given for bf16,
// x rounded per block (recomputed here from the rule) for q8_0 / q4_0.
TEST(QuantLinear, ReferenceIsTheDocumentedProduct) {
  hm::Rng rng(31);
  const int m = 3, n = 7, k = 64;
  const auto x = random_vec(rng, std::size_t(m) * k, -1, 1);
  const auto w = random_vec(rng, std::size_t(n) * k, -1, 1);
  std::vector<float> xr(x.size());
  for (std::size_t b = 0; b < x.size() / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
    const float d = amax / 127;
    for (int j = 0; j < 32; ++j) {
      xr[b * 32 + j] = d * std::nearbyint(x[b * 32 + j] * (1 / d));
      ASSERT_LE(std::fabs(xr[b * 32 + j] - x[b * 32 + j]), d * 0.5001f);  // the rounding's bound
    }
  }
  for (WeightType t : kTypes) {
    const auto p = packed(t, w, n, k);
    const std::vector<float>& xt = hm::is_block_format(t) ? xr : x;
    std::vector<float> wd(w.size()), y(std::size_t(m) * n);
    hm::ref::dequantize(t, wd.data(), p.data(), n, k);
    hm::ref::linear_packed(y.data(), n, x.data(), k, p.data(), t, m, n, k, false);
    for (int i = 0; i < m; ++i)
      for (int o = 0; o < n; ++o) {
        double s = 0;
        for (int j = 0; j < k; ++j) s += double(xt[i * k + j]) * wd[o * k + j];
        EXPECT_NEAR(y[i * n + o], s, 1e-5) << hm::weight_type_name(t);
      }
  }
  // Ties go to even: 0.5 and 1.5 steps of d = 1 (a block whose largest |x| is 127).
  std::vector<float> tie(32, 0.0f), out(32);
  tie[0] = 127, tie[1] = 2.5f, tie[2] = -3.5f, tie[3] = 0.5f;
  hm::ref::round_x8(out.data(), tie.data(), 32);
  EXPECT_EQ(out[1], 2.0f);
  EXPECT_EQ(out[2], -4.0f);
  EXPECT_EQ(out[3], 0.0f);
}

// f16 weights that are subnormal, infinite or NaN multiply as their float values on every path
// (GEMV and GEMM, every ISA): a row of subnormals gives their sum, a row holding +inf gives +inf
// (x > 0), one holding NaN gives NaN. k = 45 also runs the tails.
TEST(QuantLinear, F16SpecialWeightsOnEveryPath) {
  EachIsa each;
  const int n = 4, k = 45;
  std::vector<uint16_t> bits(std::size_t(n) * k, 0x3c00);  // 1.0
  for (int j = 0; j < k; ++j) bits[std::size_t(j)] = uint16_t(1 + j);  // row 0: subnormals 2^-24 (1 + j)
  bits[std::size_t(k) + 44] = 0x7c00;                                    // row 1: +inf in the tail
  bits[2 * std::size_t(k) + 3] = 0x7e00;                                 // row 2: NaN
  double sub = 0;
  for (int j = 0; j < k; ++j) sub += (1 + j) * 0x1p-24;
  for (int m : {1, 3, 6}) {
    const std::vector<float> x(std::size_t(m) * k, 1.0f);
    for (Isa isa : each.isas) {
      hm::cpu::set_quant_isa(isa);
      SCOPED_TRACE(std::string(hm::cpu::isa_name(isa)) + " m=" + std::to_string(m));
      std::vector<float> y(std::size_t(m) * n, -1.0f);
      hm::cpu::linear_packed(y.data(), n, x.data(), k, bits.data(), WeightType::F16, m, n, k, false);
      for (int i = 0; i < m; ++i) {
        EXPECT_NEAR(y[std::size_t(i) * n], sub, sub * 1e-6);
        EXPECT_EQ(y[std::size_t(i) * n + 1], std::numeric_limits<float>::infinity());
        EXPECT_TRUE(std::isnan(y[std::size_t(i) * n + 2]));
        EXPECT_EQ(y[std::size_t(i) * n + 3], float(k));
      }
    }
  }
}

// Decode (GEMV, m <= 4) and prefill (GEMM, m > 4) compute one function: a row's result does not
// depend on how many rows came with it. A NaN in x gives NaN, on every path.
TEST(QuantLinear, GemvAndGemmAgreeAndNanPropagates) {
  EachIsa each;
  hm::Rng rng(37);
  const int n = 301, k = 256, m = 9;
  auto x = random_vec(rng, std::size_t(m) * k, -1, 1);
  x[5 * k + 40] = NAN;  // row 5, block 1
  for (WeightType t : kTypes) {
    const auto p = packed(t, random_vec(rng, std::size_t(n) * k, -1, 1), n, k);
    for (Isa isa : each.isas) {
      hm::cpu::set_quant_isa(isa);
      SCOPED_TRACE(std::string(hm::weight_type_name(t)) + " " + hm::cpu::isa_name(isa));
      std::vector<float> all(std::size_t(m) * n), one(n);
      hm::cpu::linear_packed(all.data(), n, x.data(), k, p.data(), t, m, n, k, false);
      for (int i = 0; i < m; ++i) {
        hm::cpu::linear_packed(one.data(), n, x.data() + std::size_t(i) * k, k, p.data(), t, 1, n, k, false);
        if (i == 5) {
          for (int o = 0; o < n; ++o) ASSERT_TRUE(std::isnan(one[o]) && std::isnan(all[i * n + o])) << o;
          continue;
        }
        EXPECT_LT(rel_err(one.data(), all.data() + std::size_t(i) * n, 1, n, n), 1e-5) << "row " << i;
      }
    }
  }
}

// --- errors ----------------------------------------------------------------------------------

TEST(QuantErrors, BadSizesAndValuesAreErrors) {
  std::vector<float> f(64 * 4, 0.5f), y(64);
  std::vector<unsigned char> buf(4096);
  for (WeightType t : {WeightType::Q8_0, WeightType::Q4_0}) {
    EXPECT_THROW(hm::row_bytes(t, 48), hm::Error);  // not a multiple of 32
    EXPECT_THROW(hm::ref::quantize(t, buf.data(), f.data(), 1, 48), hm::Error);
    EXPECT_THROW(hm::cpu::quantize(t, buf.data(), f.data(), 1, 48), hm::Error);
    EXPECT_THROW(hm::ref::dequantize(t, f.data(), buf.data(), 1, 40), hm::Error);
    EXPECT_THROW(hm::cpu::dequantize(t, f.data(), buf.data(), 1, 40), hm::Error);
    EXPECT_THROW(hm::cpu::linear_packed(y.data(), 4, f.data(), 40, buf.data(), t, 1, 4, 40, false), hm::Error);
    EXPECT_THROW(hm::ref::linear_packed(y.data(), 4, f.data(), 40, buf.data(), t, 1, 4, 40, false), hm::Error);
    // Weights with no finite scale.
    auto bad = f;
    bad[70] = NAN;
    EXPECT_THROW(hm::cpu::quantize(t, buf.data(), bad.data(), 4, 64), hm::Error);
    bad[70] = 1e12f;  // d beyond the f16 range
    EXPECT_THROW(hm::cpu::quantize(t, buf.data(), bad.data(), 4, 64), hm::Error);
  }
  for (WeightType t : kTypes) {
    EXPECT_THROW(hm::row_bytes(t, 0), hm::Error);
    EXPECT_THROW(hm::cpu::linear_packed(y.data(), 4, f.data(), 64, buf.data(), t, 1, 0, 64, false), hm::Error);
    EXPECT_THROW(hm::cpu::linear_packed(y.data(), 4, f.data(), 64, buf.data(), t, -1, 4, 64, false), hm::Error);
    EXPECT_THROW(hm::cpu::dequantize(t, f.data(), buf.data(), -3, 64), hm::Error);
  }
  EXPECT_THROW(hm::weight_type_from_name("q5_1"), hm::Error);
  EXPECT_EQ(hm::weight_type_from_name("q4_0"), WeightType::Q4_0);
  EXPECT_EQ(hm::weight_type_from_name("f16"), WeightType::F16);
  EXPECT_THROW(hm::weight_type_from_name("fp16"), hm::Error);
  EXPECT_EQ(hm::row_bytes(WeightType::Q8_0, 768), 24u * 34);
  EXPECT_EQ(hm::row_bytes(WeightType::Q4_0, 768), 24u * 18);
  EXPECT_EQ(hm::row_bytes(WeightType::BF16, 37), 74u);
  EXPECT_EQ(hm::row_bytes(WeightType::F16, 37), 74u);
}

TEST(QuantIsa, TheChosenIsaIsUsedAndReported) {
  EachIsa each;
  EXPECT_EQ(each.saved, hm::cpu::default_isa());  // nothing set it before: HM_ISA or the best
  EXPECT_TRUE(hm::cpu::isa_supported(Isa::Scalar));
  for (Isa isa : each.isas) {
    hm::cpu::set_quant_isa(isa);
    EXPECT_EQ(hm::cpu::quant_isa(), isa);
  }
  for (Isa isa : {Isa::Avx2, Isa::Avx512})
    if (!hm::cpu::isa_supported(isa)) {
      EXPECT_THROW(hm::cpu::set_quant_isa(isa), hm::Error);
    }
}

}  // namespace
