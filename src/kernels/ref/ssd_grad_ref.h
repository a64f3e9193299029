// Reference forward and backward passes of the Mamba-2 mixer's two own ops (training), in the
// style of mamba_grad_ref.h: the SSD scan (one token at a time, as ref::ssd_scan) and the gated
// RMSNorm, each forward beside its backward, templated on the scalar type (float: sums in
// double; double: checked against finite differences in tests/test_grad_ssd.cpp).
//
// One sequence of L tokens from zero state. x [L, ldx] with head h at columns h*P .. h*P+P-1;
// dt [L, lddt] raw (delta = clamp(softplus(dt + dt_bias), dt_min, dt_max), per head); B, C
// [L, ldbc] with group g at columns g*N ..; heads h of group g = h / (H / G); A_log, dt_bias,
// Dskip [H], A = -exp(A_log). The recurrence, per head, state S [P, N]:
//   S_t = exp(delta_t A) S_{t-1} + delta_t x_t B_t^T,   y_t = S_t C_t + D x_t
// Gradient rule as everywhere: parameters accumulate (+=), activations are assigned (=).
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/ref/mamba_grad_ref.h"

namespace hm::ref::grad {

// delta of one (token, head) and d delta / d dt_raw (torch.clamp's rule: the gradient passes
// where min <= softplus <= max).
template <class T>
void ssd_delta(acc_t<T>& delta, acc_t<T>& ddelta_du, T dt_raw, T dt_bias, double dt_min, double dt_max) {
  using A = acc_t<T>;
  const A u = A(dt_raw) + A(dt_bias);
  const A sp = softplus(u);
  delta = std::min(std::max(sp, A(dt_min)), A(dt_max));
  ddelta_du = (sp >= A(dt_min) && sp <= A(dt_max)) ? sigmoid(u) : A(0);
}

template <class T>
void ssd_scan_forward(T* y, int ldy, const T* x, int ldx, const T* dt, int lddt, const T* dt_bias, const T* A_log,
                      const T* B, const T* C, int ldbc, const T* Dskip, int L, int H, int P, int G, int N,
                      double dt_min, double dt_max) {
  using Acc = acc_t<T>;
  const int hpg = H / G;
  std::vector<Acc> S(size_t(P) * size_t(N));
  for (int h = 0; h < H; ++h) {
    const int g = h / hpg;
    const Acc A = -std::exp(Acc(A_log[h]));
    std::fill(S.begin(), S.end(), Acc(0));
    for (int t = 0; t < L; ++t) {
      Acc delta, unused;
      ssd_delta<T>(delta, unused, dt[size_t(t) * lddt + h], dt_bias[h], dt_min, dt_max);
      const Acc decay = std::exp(delta * A);
      const T* Bt = B + size_t(t) * ldbc + size_t(g) * N;
      const T* Ct = C + size_t(t) * ldbc + size_t(g) * N;
      for (int p = 0; p < P; ++p) {
        const Acc xt = x[size_t(t) * ldx + size_t(h) * P + p];
        Acc acc = 0;
        for (int n = 0; n < N; ++n) {
          Acc& s = S[size_t(p) * N + n];
          s = decay * s + delta * Acc(Bt[n]) * xt;  // S_t = exp(delta A) S_{t-1} + delta x B^T
          acc += s * Acc(Ct[n]);                    // y = S C
        }
        y[size_t(t) * ldy + size_t(h) * P + p] = T(acc + Acc(Dskip[h]) * xt);  // + D x
      }
    }
  }
}

// dx, ddt, dB, dC assigned (dB and dC summed over the heads of their group); ddt_bias, dA_log,
// dDskip accumulated. The states are recomputed (all L of a head at a time: the reference keeps
// them; the fast kernels recompute per chunk).
template <class T>
void ssd_scan_backward(T* dx, int lddx, T* ddt, int lddt_out, T* dB, T* dC, int lddbc, T* ddt_bias, T* dA_log,
                       T* dDskip, const T* dy, int lddy, const T* x, int ldx, const T* dt, int lddt, const T* dt_bias,
                       const T* A_log, const T* B, const T* C, int ldbc, const T* Dskip, int L, int H, int P, int G,
                       int N, double dt_min, double dt_max) {
  using Acc = acc_t<T>;
  const int hpg = H / G;
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < G * N; ++j) dB[size_t(t) * lddbc + j] = dC[size_t(t) * lddbc + j] = T(0);
  std::vector<Acc> gB(size_t(L) * G * N, Acc(0)), gC(size_t(L) * G * N, Acc(0));
  std::vector<Acc> S(size_t(L + 1) * P * N);  // S[t + 1] = the state after token t; S[0] = 0
  std::vector<Acc> delta(static_cast<size_t>(L)), dd_du(static_cast<size_t>(L)), Gs(static_cast<size_t>(P) * N);
  for (int h = 0; h < H; ++h) {
    const int g = h / hpg;
    const Acc A = -std::exp(Acc(A_log[h])), D = Dskip[h];
    std::fill(S.begin(), S.begin() + size_t(P) * N, Acc(0));
    for (int t = 0; t < L; ++t) {  // the forward's states
      ssd_delta<T>(delta[size_t(t)], dd_du[size_t(t)], dt[size_t(t) * lddt + h], dt_bias[h], dt_min, dt_max);
      const Acc decay = std::exp(delta[size_t(t)] * A);
      const T* Bt = B + size_t(t) * ldbc + size_t(g) * N;
      const Acc* prev = &S[size_t(t) * P * N];
      Acc* cur = &S[size_t(t + 1) * P * N];
      for (int p = 0; p < P; ++p) {
        const Acc xt = x[size_t(t) * ldx + size_t(h) * P + p];
        for (int n = 0; n < N; ++n)
          cur[size_t(p) * N + n] = decay * prev[size_t(p) * N + n] + delta[size_t(t)] * Acc(Bt[n]) * xt;
      }
    }
    std::fill(Gs.begin(), Gs.end(), Acc(0));  // dL/dS_t, carried down
    Acc dA = 0, dD = 0, dbias = 0;
    for (int t = L - 1; t >= 0; --t) {
      const T* Bt = B + size_t(t) * ldbc + size_t(g) * N;
      const T* Ct = C + size_t(t) * ldbc + size_t(g) * N;
      const Acc* prev = &S[size_t(t) * P * N];
      const Acc* cur = &S[size_t(t + 1) * P * N];
      const Acc dl = delta[size_t(t)], decay = std::exp(dl * A);
      Acc* gC_t = &gC[(size_t(t) * G + g) * N];
      Acc* gB_t = &gB[(size_t(t) * G + g) * N];
      Acc ddelta = 0, dS_prev_dot = 0;  // sum G . (x B^T), sum G . S_{t-1}
      for (int p = 0; p < P; ++p) {
        const Acc gy = dy[size_t(t) * lddy + size_t(h) * P + p];
        const Acc xt = x[size_t(t) * ldx + size_t(h) * P + p];
        dD += gy * xt;  // y += D x
        Acc gx = D * gy;
        for (int n = 0; n < N; ++n) {
          Acc& G_ = Gs[size_t(p) * N + n];
          G_ += gy * Acc(Ct[n]);                    // y = S_t C_t
          gC_t[n] += gy * cur[size_t(p) * N + n];
          gx += dl * G_ * Acc(Bt[n]);               // S_t += delta x B^T
          gB_t[n] += dl * G_ * xt;
          ddelta += G_ * xt * Acc(Bt[n]);
          dS_prev_dot += G_ * prev[size_t(p) * N + n];
          G_ *= decay;                              // S_t = exp(delta A) S_{t-1}: dS_{t-1}
        }
        dx[size_t(t) * lddx + size_t(h) * P + p] = T(gx);
      }
      // d exp(delta A) = exp(delta A) (A d delta + delta dA)
      ddelta += dS_prev_dot * decay * A;
      dA += dS_prev_dot * decay * dl;
      const Acc du = ddelta * dd_du[size_t(t)];
      ddt[size_t(t) * lddt_out + h] = T(du);
      dbias += du;
    }
    ddt_bias[h] += T(dbias);
    dA_log[h] += T(dA * A);  // A = -exp(A_log)
    dDskip[h] += T(dD);
  }
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < G * N; ++j) {
      dB[size_t(t) * lddbc + j] = T(gB[size_t(t) * G * N + j]);
      dC[size_t(t) * lddbc + j] = T(gC[size_t(t) * G * N + j]);
    }
}

// out = rmsnorm(y * silu(z)) * w over each group of `group` columns of each of n rows (the
// gated RMSNorm of transformers' Mamba2 and mamba_ssm), E columns.
template <class T>
void gated_rmsnorm_forward(T* out, int ldo, const T* y, int ldy, const T* z, int ldz, const T* w, int n, int E,
                           int group, double eps) {
  using Acc = acc_t<T>;
  std::vector<Acc> v(static_cast<size_t>(E));
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < E; ++j) v[size_t(j)] = Acc(y[size_t(i) * ldy + j]) * silu(Acc(z[size_t(i) * ldz + j]));
    for (int j0 = 0; j0 < E; j0 += group) {
      Acc ss = 0;
      for (int j = j0; j < j0 + group; ++j) ss += v[size_t(j)] * v[size_t(j)];
      const Acc r = Acc(1) / std::sqrt(ss / Acc(group) + Acc(eps));
      for (int j = j0; j < j0 + group; ++j) out[size_t(i) * ldo + j] = T(v[size_t(j)] * r * Acc(w[j]));
    }
  }
}

// dy, dz assigned; dw accumulated. v = y silu(z), r = 1 / sqrt(mean_group(v^2) + eps):
// dv = r (w dout) - v r^3 / group * sum_group(w dout v), dw += dout v r, dy = dv silu(z),
// dz = dv y silu'(z).
template <class T>
void gated_rmsnorm_backward(T* dy, int lddy, T* dz, int lddz, T* dw, const T* dout, int lddo, const T* y, int ldy,
                            const T* z, int ldz, const T* w, int n, int E, int group, double eps) {
  using Acc = acc_t<T>;
  std::vector<Acc> v(static_cast<size_t>(E)), gw(static_cast<size_t>(E), Acc(0));
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < E; ++j) v[size_t(j)] = Acc(y[size_t(i) * ldy + j]) * silu(Acc(z[size_t(i) * ldz + j]));
    for (int j0 = 0; j0 < E; j0 += group) {
      Acc ss = 0, dot = 0;
      for (int j = j0; j < j0 + group; ++j) {
        ss += v[size_t(j)] * v[size_t(j)];
        dot += Acc(w[j]) * Acc(dout[size_t(i) * lddo + j]) * v[size_t(j)];
      }
      const Acc r = Acc(1) / std::sqrt(ss / Acc(group) + Acc(eps));
      for (int j = j0; j < j0 + group; ++j) {
        const Acc go = dout[size_t(i) * lddo + j], zj = z[size_t(i) * ldz + j];
        gw[size_t(j)] += go * v[size_t(j)] * r;
        const Acc dv = r * Acc(w[j]) * go - v[size_t(j)] * r * r * r / Acc(group) * dot;
        dy[size_t(i) * lddy + j] = T(dv * silu(zj));
        dz[size_t(i) * lddz + j] = T(dv * Acc(y[size_t(i) * ldy + j]) * silu_grad(zj));
      }
    }
  }
  for (int j = 0; j < E; ++j) dw[j] += T(gw[size_t(j)]);
}

}  // namespace hm::ref::grad
