// Reference Mamba-2 kernels: the SSD recurrence one token at a time and the gated RMSNorm, in
// double, line by line as kernels/ops.h states them. The oracle of kernels/cpu/ssd_cpu.cpp.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/ops.h"

namespace hm::ref {
namespace {
double silu(double x) { return x / (1.0 + std::exp(-x)); }
double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
}  // namespace

void ssd_scan(float* y, int ldy, float* state, const float* x, int ldx, const float* dt, int lddt,
              const float* dt_bias, const float* A, const float* B, const float* C, int ldbc,
              const float* Dskip, int L, int H, int P, int G, int N, float dt_min, float dt_max) {
  const int heads_per_group = H / G;
  for (int h = 0; h < H; ++h) {
    const int g = h / heads_per_group;
    float* sh = state + static_cast<long>(h) * P * N;
    std::vector<double> s(sh, sh + static_cast<long>(P) * N);
    for (int t = 0; t < L; ++t) {
      double delta = softplus(double(dt[t * lddt + h]) + dt_bias[h]);
      delta = std::min(std::max(delta, double(dt_min)), double(dt_max));  // time_step_limit
      const double decay = std::exp(delta * A[h]);                         // dA = exp(dt * A)
      const float* Bt = B + t * ldbc + g * N;
      const float* Ct = C + t * ldbc + g * N;
      for (int p = 0; p < P; ++p) {
        const double xt = x[t * ldx + h * P + p];
        double acc = 0;
        for (int n = 0; n < N; ++n) {
          double& sv = s[static_cast<size_t>(p) * N + n];
          sv = decay * sv + delta * Bt[n] * xt;  // state = state * dA + dB * x
          acc += sv * Ct[n];                     // y = state @ C
        }
        y[t * ldy + h * P + p] = float(acc + Dskip[h] * xt);  // + D * x
      }
    }
    for (long k = 0; k < static_cast<long>(P) * N; ++k) sh[k] = float(s[size_t(k)]);
  }
}

void gated_rmsnorm(float* out, int ldo, const float* y, int ldy, const float* z, int ldz,
                   const float* w, int n, int E, int group, float eps) {
  std::vector<double> g(static_cast<size_t>(E));
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < E; ++j) g[size_t(j)] = double(y[i * ldy + j]) * silu(z[i * ldz + j]);
    for (int j0 = 0; j0 < E; j0 += group) {
      double ss = 0;
      for (int j = j0; j < j0 + group; ++j) ss += g[size_t(j)] * g[size_t(j)];
      const double r = 1.0 / std::sqrt(ss / group + eps);
      for (int j = j0; j < j0 + group; ++j) out[i * ldo + j] = float(g[size_t(j)] * r * w[j]);
    }
  }
}

}  // namespace hm::ref
