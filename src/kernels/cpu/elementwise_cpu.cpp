// Row-wise and element-wise ops: rmsnorm, rope, swiglu, relu2. Vectorised along the row, parallel
// over rows once there is enough work to pay for a parallel region.
#include <algorithm>
#include <cmath>
#include <cstddef>

#include "kernels/cpu/simd.h"
#include "kernels/ops.h"

namespace hm::cpu::HM_ISA_NS {
namespace {
using namespace simd;
constexpr long kParallelElems = 1L << 16;  // below this, one thread beats a parallel region
}  // namespace

void rmsnorm_row(float* oi, const float* xi, const float* w, int d, float eps) {
  vf s0{}, s1{};  // two partial sums: half the dependency chain
  int j = 0;
  for (; j + 2 * kW <= d; j += 2 * kW) {
    const vf a = load(xi + j), b = load(xi + j + kW);
    s0 += a * a;
    s1 += b * b;
  }
  for (; j < d; j += kW) {
    const vf a = load_upto(xi + j, d - j);
    s0 += a * a;
  }
  const float r = 1.0f / std::sqrt(hsum(s0 + s1) / float(d) + eps);
  for (j = 0; j < d; j += kW)
    store_upto(oi + j, load_upto(xi + j, d - j) * r * load_upto(w + j, d - j), d - j);
}

void rmsnorm(float* out, const float* x, const float* w, int n, int d, float eps) {
  run_team(long(n) * d >= kParallelElems, [&](int id, int nt) {
    const auto [i0, i1] = share(n, id, nt);
    for (int i = i0; i < i1; ++i)
      rmsnorm_row(out + std::ptrdiff_t(i) * d, x + std::ptrdiff_t(i) * d, w, d, eps);
  });
}

// cos/sin of (pos0 + t) * inv_freq come from rotating the previous token's pair by
// (cos inv_freq, sin inv_freq) in double: two sin/cos per frequency per thread instead of
// two per (token, frequency); the drift is ~1e-16 per step, far below float resolution.
void rope(float* x, int ldx, int L, int heads, int hd, int pos0, float theta) {
  const int half = hd / 2;
  if (L <= 0 || half <= 0) return;
  Buf<double> inv_freq(half), step_c(half), step_s(half);
  for (int i = 0; i < half; ++i) {
    inv_freq[i] = std::pow(double(theta), -2.0 * i / hd);
    step_c[i] = std::cos(inv_freq[i]);
    step_s[i] = std::sin(inv_freq[i]);
  }
  run_team(long(L) * heads * hd >= kParallelElems, [&](int id, int nt) {
    const auto [t0, t1] = share(L, id, nt);
    Buf<double> c(half), s(half);
    Buf<float> cf(half + kW), sf(half + kW);
    for (int t = t0; t < t1; ++t) {
      for (int i = 0; i < half; ++i) {
        if (t == t0) {
          const double ang = double(pos0 + t) * inv_freq[i];
          c[i] = std::cos(ang);
          s[i] = std::sin(ang);
        } else {
          const double cn = c[i] * step_c[i] - s[i] * step_s[i];
          s[i] = s[i] * step_c[i] + c[i] * step_s[i];
          c[i] = cn;
        }
        cf[i] = float(c[i]);
        sf[i] = float(s[i]);
      }
      for (int h = 0; h < heads; ++h) {
        float* v = x + std::ptrdiff_t(t) * ldx + std::ptrdiff_t(h) * hd;
        for (int i = 0; i < half; i += kW) {
          const int m = half - i;
          const vf a = load_upto(v + i, m), b = load_upto(v + half + i, m);
          const vf cv = load_upto(cf.data() + i, m), sv = load_upto(sf.data() + i, m);
          store_upto(v + i, a * cv - b * sv, m);         // x[i]*cos - x[i+half]*sin
          store_upto(v + half + i, b * cv + a * sv, m);  // x[i+half]*cos + x[i]*sin
        }
      }
    }
  });
}

void swiglu(float* out, int ldo, const float* g, const float* u, int ldgu, int n, int f) {
  run_team(long(n) * f >= kParallelElems, [&](int id, int nt) {
    const auto [i0, i1] = share(n, id, nt);
    for (int i = i0; i < i1; ++i) {
      const float* gi = g + std::ptrdiff_t(i) * ldgu;
      const float* ui = u + std::ptrdiff_t(i) * ldgu;
      float* oi = out + std::ptrdiff_t(i) * ldo;
      for (int j = 0; j < f; j += kW)
        store_upto(oi + j, vsilu(load_upto(gi + j, f - j)) * load_upto(ui + j, f - j), f - j);
    }
  });
}

// One thread: a vocabulary row (32,000 floats) takes a few microseconds. Lane sums go into the
// double total every 16 vectors, so the sum's rounding does not grow with n.
double exp_sum(float* out, const float* x, int n, float shift) {
  const vi lane = iota();
  double total = 0.0;
  for (int j0 = 0; j0 < n; j0 += 16 * kW) {
    vf acc{};
    for (int j = j0; j < std::min(n, j0 + 16 * kW); j += kW) {
      const vf d = load_upto(x + j, n - j) - shift;
      const vf e = ((d < -88.0f) | (lane >= n - j)) ? vf{} : vexp(d);
      store_upto(out + j, e, n - j);
      acc += e;
    }
    total += double(hsum(acc));
  }
  return total;
}

void relu2(float* out, int ldo, const float* x, int ldx, int n, int f) {
  run_team(long(n) * f >= kParallelElems, [&](int id, int nt) {
    const auto [i0, i1] = share(n, id, nt);
    const vf zero{};
    for (int i = i0; i < i1; ++i) {
      const float* xi = x + std::ptrdiff_t(i) * ldx;
      float* oi = out + std::ptrdiff_t(i) * ldo;
      for (int j = 0; j < f; j += kW) {
        const vf r = vmax(load_upto(xi + j, f - j), zero);
        store_upto(oi + j, r * r, f - j);
      }
    }
  });
}

}  // namespace hm::cpu::HM_ISA_NS
