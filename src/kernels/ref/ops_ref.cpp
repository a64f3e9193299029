// Reference kernels: plain loops, double accumulation where a sum is long, no tricks.
// They define what the fast kernels must compute; each line mirrors docs/MODEL.md.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "io/safetensors.h"
#include "kernels/ops.h"

namespace hm::ref {
namespace {
double silu(double x) { return x / (1.0 + std::exp(-x)); }
double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

// The first rows x cols halves of h, widened to float (exact).
std::vector<float> widen_f16(const uint16_t* h, int rows, int cols) {
  std::vector<float> f(std::size_t(rows) * cols);
  for (std::size_t i = 0; i < f.size(); ++i) f[i] = f16_to_f32(h[i]);
  return f;
}
}  // namespace

void rmsnorm(float* out, const float* x, const float* w, int n, int d, float eps) {
  for (int i = 0; i < n; ++i) {
    double ss = 0;
    for (int j = 0; j < d; ++j) ss += double(x[i * d + j]) * x[i * d + j];
    const double r = 1.0 / std::sqrt(ss / d + eps);
    for (int j = 0; j < d; ++j) out[i * d + j] = float(x[i * d + j] * r * w[j]);
  }
}

void linear(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n, int k,
            bool accumulate) {
  for (int i = 0; i < m; ++i)
    for (int o = 0; o < n; ++o) {
      double acc = accumulate ? y[i * ldy + o] : 0.0;
      for (int c = 0; c < k; ++c) acc += double(x[i * ldx + c]) * W[o * k + c];
      y[i * ldy + o] = float(acc);
    }
}

void conv1d_silu(float* out, int ldo, float* state, const float* x, int ldx, const float* w,
                 const float* b, int L, int E, int K) {
  // window[e][j], j = 0..K-1: inputs t-K+1 .. t
  for (int e = 0; e < E; ++e) {
    std::vector<double> window(K);
    for (int j = 0; j < K - 1; ++j) window[j] = state[e * (K - 1) + j];
    for (int t = 0; t < L; ++t) {
      window[K - 1] = x[t * ldx + e];                      // conv_state[:, -1] = x
      double acc = b[e];
      for (int j = 0; j < K; ++j) acc += w[e * K + j] * window[j];
      out[t * ldo + e] = float(silu(acc));
      for (int j = 0; j < K - 1; ++j) window[j] = window[j + 1];  // roll left
    }
    for (int j = 0; j < K - 1; ++j) state[e * (K - 1) + j] = float(window[j]);
  }
}

void selective_scan(float* y, int ldy, float* state, const float* x, int ldx, const float* dt,
                    int lddt, const float* dt_bias, const float* A, const float* B, const float* C,
                    int ldbc, const float* Dskip, const float* z, int ldz, int L, int E, int N) {
  for (int e = 0; e < E; ++e) {
    std::vector<double> s(state + e * N, state + (e + 1) * N);
    for (int t = 0; t < L; ++t) {
      const double delta = softplus(double(dt[t * lddt + e]) + dt_bias[e]);
      const double xt = x[t * ldx + e];
      double acc = 0;
      for (int n = 0; n < N; ++n) {
        s[n] = std::exp(delta * A[e * N + n]) * s[n] + delta * B[t * ldbc + n] * xt;
        acc += s[n] * C[t * ldbc + n];
      }
      y[t * ldy + e] = float((acc + Dskip[e] * xt) * silu(z[t * ldz + e]));
    }
    for (int n = 0; n < N; ++n) state[e * N + n] = float(s[n]);
  }
}

void rope(float* x, int ldx, int L, int heads, int hd, int pos0, float theta) {
  const int half = hd / 2;
  for (int t = 0; t < L; ++t)
    for (int h = 0; h < heads; ++h) {
      float* v = x + t * ldx + h * hd;
      for (int i = 0; i < half; ++i) {
        const double inv_freq = std::pow(double(theta), -2.0 * i / hd);
        const double ang = double(pos0 + t) * inv_freq;
        const double c = std::cos(ang), s = std::sin(ang);
        const double a = v[i], bb = v[i + half];
        v[i] = float(a * c - bb * s);
        v[i + half] = float(bb * c + a * s);
      }
    }
}

void attention(float* out, int ldo, const float* q, int ldq, const float* k, const float* v,
               int L, int pos0, int H, int G, int hd) {
  const int group = H / G, ldkv = G * hd;
  const double scale = 1.0 / std::sqrt(double(hd));
  for (int t = 0; t < L; ++t) {
    const int T = pos0 + t + 1;  // causal: keys 0..pos0+t
    std::vector<double> p(T);
    for (int h = 0; h < H; ++h) {
      const int g = h / group;
      const float* qh = q + t * ldq + h * hd;
      double mx = -INFINITY;
      for (int j = 0; j < T; ++j) {
        double dot = 0;
        for (int i = 0; i < hd; ++i) dot += double(qh[i]) * k[j * ldkv + g * hd + i];
        p[j] = dot * scale;
        mx = std::max(mx, p[j]);
      }
      double sum = 0;
      for (int j = 0; j < T; ++j) sum += (p[j] = std::exp(p[j] - mx));
      for (int i = 0; i < hd; ++i) {
        double acc = 0;
        for (int j = 0; j < T; ++j) acc += p[j] * v[j * ldkv + g * hd + i];
        out[t * ldo + h * hd + i] = float(acc / sum);
      }
    }
  }
}

// Widening is exact, so this is attention on the values the cache holds.
void attention_f16kv(float* out, int ldo, const float* q, int ldq, const uint16_t* k,
                     const uint16_t* v, int L, int pos0, int H, int G, int hd) {
  if (L <= 0) return;
  const std::vector<float> kf = widen_f16(k, pos0 + L, G * hd), vf = widen_f16(v, pos0 + L, G * hd);
  attention(out, ldo, q, ldq, kf.data(), vf.data(), L, pos0, H, G, hd);
}

void store_f16(uint16_t* dst, int ld_dst, const float* src, int ld_src, int n, int d) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < d; ++j) dst[i * ld_dst + j] = f32_to_f16(src[i * ld_src + j]);
}

void swiglu(float* out, int ldo, const float* g, const float* u, int ldgu, int n, int f) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < f; ++j)
      out[i * ldo + j] = float(silu(g[i * ldgu + j]) * u[i * ldgu + j]);
}

void relu2(float* out, int ldo, const float* x, int ldx, int n, int f) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < f; ++j) {
      const double r = std::max(double(x[i * ldx + j]), 0.0);
      out[i * ldo + j] = float(r * r);
    }
}

double exp_sum(float* out, const float* x, int n, float shift) {
  double sum = 0.0;
  for (int i = 0; i < n; ++i) {
    const double d = double(x[i]) - double(shift);
    out[i] = d < -88.0 ? 0.0f : float(std::exp(d));
    sum += out[i];
  }
  return sum;
}

}  // namespace hm::ref
