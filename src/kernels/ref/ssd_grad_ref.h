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

// dB, dC [L, lddbc] = the sums gB, gC ([L, GN], summed over each group's heads).
template <class T, class Acc>
void store_group_grads(T* dB, T* dC, int lddbc, const std::vector<Acc>& gB, const std::vector<Acc>& gC, int L,
                       int GN) {
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < GN; ++j) {
      dB[size_t(t) * lddbc + j] = T(gB[size_t(t) * GN + j]);
      dC[size_t(t) * lddbc + j] = T(gC[size_t(t) * GN + j]);
    }
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
  store_group_grads(dB, dC, lddbc, gB, gC, L, G * N);
}

// ssd_scan_backward's results in the chunked matrix form that a fast kernel takes (the Mamba-2
// paper's SSD): per chunk of Q tokens and head, with l_t = A (delta_c0 + ... + delta_t) inside the
// chunk, Lm[t, s] = exp(l_t - l_s) (s <= t), S_in the state entering the chunk and G_out
// dL/dS of the state leaving it, every sum is a Q x Q, Q x P or Q x N product:
//   GB = (Lm o C B^T)^T dY + diag(exp(l_end - l)) B G_out^T      (G_t B_t, [Q, P])
//   dX = delta o GB + D dY;   M = Lm o (dY X^T)
//   dB = delta o (M^T C + diag(exp(l_end - l)) X G_out);   dC = M (delta o B) + diag(exp(l)) dY S_in
//   G_in = exp(l_end) G_out + dY^T diag(exp(l)) C
//   dl_t = dy_t . y'_t - delta_t x_t . GB_t (+ <G_out, S_end> at the last token), y' = y - D x
//   d delta_s = x_s . GB_s + A sum_{t >= s} dl_t;   dA = sum_t dl_t (delta_c0 + ... + delta_t)
// Only the chunks' entering states are kept. Plain loops: the reference the device kernel of this
// form is checked against, itself checked against ssd_scan_backward (tests/test_grad_ssd.cpp).
template <class T>
void ssd_scan_backward_chunked(T* dx, int lddx, T* ddt, int lddt_out, T* dB, T* dC, int lddbc, T* ddt_bias,
                               T* dA_log, T* dDskip, const T* dy, int lddy, const T* x, int ldx, const T* dt,
                               int lddt, const T* dt_bias, const T* A_log, const T* B, const T* C, int ldbc,
                               const T* Dskip, int L, int H, int P, int G, int N, double dt_min, double dt_max,
                               int Q) {
  using Acc = acc_t<T>;
  const int hpg = H / G, nch = L > 0 ? (L + Q - 1) / Q : 0;
  const size_t PN = size_t(P) * N;
  std::vector<Acc> gB(size_t(L) * G * N, Acc(0)), gC(size_t(L) * G * N, Acc(0));
  const size_t nL = static_cast<size_t>(L);
  std::vector<Acc> delta(nL), dd_du(nL), l(nL), ddl(nL), direct(nL);
  std::vector<Acc> Sin(size_t(nch + 1) * PN), Gout(PN), Gin(PN), GB(size_t(Q) * P), M(size_t(Q) * Q);
  auto xv = [&](int t, int h, int p) { return Acc(x[size_t(t) * ldx + size_t(h) * P + p]); };
  auto dyv = [&](int t, int h, int p) { return Acc(dy[size_t(t) * lddy + size_t(h) * P + p]); };
  auto Bv = [&](int t, int g, int n) { return Acc(B[size_t(t) * ldbc + size_t(g) * N + n]); };
  auto Cv = [&](int t, int g, int n) { return Acc(C[size_t(t) * ldbc + size_t(g) * N + n]); };
  for (int h = 0; h < H; ++h) {
    const int g = h / hpg;
    const Acc A = -std::exp(Acc(A_log[h])), D = Dskip[h];
    for (int t = 0; t < L; ++t) {
      ssd_delta<T>(delta[size_t(t)], dd_du[size_t(t)], dt[size_t(t) * lddt + h], dt_bias[h], dt_min, dt_max);
      l[size_t(t)] = (t % Q == 0 ? Acc(0) : l[size_t(t) - 1]) + A * delta[size_t(t)];
    }
    // The chunks' entering states: S_in(c + 1) = exp(l_end) S_in(c) + sum_s exp(l_end - l_s) delta_s x_s B_s^T.
    std::fill(Sin.begin(), Sin.begin() + PN, Acc(0));
    for (int c = 0; c < nch; ++c) {
      const int c0 = c * Q, c1 = std::min(L, c0 + Q);
      const Acc le = l[size_t(c1) - 1];
      const Acc* in = &Sin[size_t(c) * PN];
      Acc* out = &Sin[size_t(c + 1) * PN];
      for (size_t i = 0; i < PN; ++i) out[i] = std::exp(le) * in[i];
      for (int s = c0; s < c1; ++s) {
        const Acc w = std::exp(le - l[size_t(s)]) * delta[size_t(s)];
        for (int p = 0; p < P; ++p)
          for (int n = 0; n < N; ++n) out[size_t(p) * N + n] += w * xv(s, h, p) * Bv(s, g, n);
      }
    }
    std::fill(Gout.begin(), Gout.end(), Acc(0));
    Acc dA = 0, dD = 0, dbias = 0;
    for (int c = nch - 1; c >= 0; --c) {
      const int c0 = c * Q, c1 = std::min(L, c0 + Q);
      const Acc le = l[size_t(c1) - 1];
      const Acc* in = &Sin[size_t(c) * PN];
      const Acc* end = &Sin[size_t(c + 1) * PN];
      auto Lm = [&](int t, int s) { return std::exp(l[size_t(t)] - l[size_t(s)]); };  // s <= t
      auto CB = [&](int t, int s) {
        Acc v = 0;
        for (int n = 0; n < N; ++n) v += Cv(t, g, n) * Bv(s, g, n);
        return v;
      };
      // GB[s, p] and M[u, s] (u >= s).
      for (int s = c0; s < c1; ++s) {
        const Acc wo = std::exp(le - l[size_t(s)]);
        for (int p = 0; p < P; ++p) {
          Acc v = 0;
          for (int n = 0; n < N; ++n) v += Gout[size_t(p) * N + n] * Bv(s, g, n);
          v *= wo;
          for (int u = s; u < c1; ++u) v += Lm(u, s) * CB(u, s) * dyv(u, h, p);
          GB[size_t(s - c0) * P + p] = v;
        }
        for (int u = s; u < c1; ++u) {
          Acc d = 0;
          for (int p = 0; p < P; ++p) d += dyv(u, h, p) * xv(s, h, p);
          M[size_t(u - c0) * Q + (s - c0)] = Lm(u, s) * d;
        }
      }
      for (int t = c0; t < c1; ++t) {
        const Acc dl = delta[size_t(t)];
        Acc* gB_t = &gB[(size_t(t) * G + g) * N];
        Acc* gC_t = &gC[(size_t(t) * G + g) * N];
        const Acc wo = std::exp(le - l[size_t(t)]), wi = std::exp(l[size_t(t)]);
        // dX, dD, and the direct part of d delta.
        Acc xgb = 0;
        for (int p = 0; p < P; ++p) {
          const Acc gb = GB[size_t(t - c0) * P + p];
          dx[size_t(t) * lddx + size_t(h) * P + p] = T(dl * gb + D * dyv(t, h, p));
          dD += dyv(t, h, p) * xv(t, h, p);
          xgb += xv(t, h, p) * gb;
        }
        // dB_t = delta_t (sum_{u >= t} M[u, t] C_u + exp(l_end - l_t) x_t G_out);
        // dC_t = sum_{s <= t} M[t, s] delta_s B_s + exp(l_t) dy_t S_in.
        for (int n = 0; n < N; ++n) {
          Acc vb = 0, vc = 0;
          for (int u = t; u < c1; ++u) vb += M[size_t(u - c0) * Q + (t - c0)] * Cv(u, g, n);
          for (int p = 0; p < P; ++p) vb += wo * xv(t, h, p) * Gout[size_t(p) * N + n];
          for (int s = c0; s <= t; ++s) vc += M[size_t(t - c0) * Q + (s - c0)] * delta[size_t(s)] * Bv(s, g, n);
          for (int p = 0; p < P; ++p) vc += wi * dyv(t, h, p) * in[size_t(p) * N + n];
          gB_t[n] += dl * vb;
          gC_t[n] += vc;
        }
        // dl_t = dy_t . y'_t - delta_t x_t . GB_t (+ <G_out, S_end> at the chunk's last token).
        Acc dyy = 0;
        for (int p = 0; p < P; ++p) {
          Acc yp = 0;  // y'_t[p] = sum_{s <= t} Lm CB delta_s x_s[p] + exp(l_t) C_t . S_in[p]
          for (int s = c0; s <= t; ++s) yp += Lm(t, s) * CB(t, s) * delta[size_t(s)] * xv(s, h, p);
          for (int n = 0; n < N; ++n) yp += wi * Cv(t, g, n) * in[size_t(p) * N + n];
          dyy += dyv(t, h, p) * yp;
        }
        ddl[size_t(t)] = dyy - dl * xgb;
        if (t == c1 - 1)
          for (size_t i = 0; i < PN; ++i) ddl[size_t(t)] += Gout[i] * end[i];
        direct[size_t(t)] = xgb;  // d delta's own part; the decays' part below
      }
      // d delta_s += A sum_{t >= s} dl_t; dA += dl_t (delta_c0 + ... + delta_t).
      Acc rev = 0;
      for (int t = c1 - 1; t >= c0; --t) rev += ddl[size_t(t)];
      Acc cum = 0, before = 0;
      for (int t = c0; t < c1; ++t) {
        cum += delta[size_t(t)];
        dA += ddl[size_t(t)] * cum;
        const Acc ddelta = direct[size_t(t)] + A * (rev - before);
        before += ddl[size_t(t)];
        const Acc du = ddelta * dd_du[size_t(t)];
        ddt[size_t(t) * lddt_out + h] = T(du);
        dbias += du;
      }
      // G_in = exp(l_end) G_out + sum_u exp(l_u) dy_u C_u^T: the next (earlier) chunk's G_out.
      for (int p = 0; p < P; ++p)
        for (int n = 0; n < N; ++n) {
          Acc v = std::exp(le) * Gout[size_t(p) * N + n];
          for (int u = c0; u < c1; ++u) v += std::exp(l[size_t(u)]) * dyv(u, h, p) * Cv(u, g, n);
          Gin[size_t(p) * N + n] = v;
        }
      std::swap(Gout, Gin);
    }
    ddt_bias[h] += T(dbias);
    dA_log[h] += T(dA * A);  // A = -exp(A_log)
    dDskip[h] += T(dD);
  }
  store_group_grads(dB, dC, lddbc, gB, gC, L, G * N);
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

// ---------------------------------------------------------------- the Mamba-2 mixer
// HybridModel::mamba2_path's math for one sequence from zero state, in the ops above (the double
// reference model's Mamba-2 layer): zxd = in_proj(u) = z | xBC | dt; xbc = silu(conv(xBC)) =
// x | B | C; ys = the SSD scan; yn = the gate, per group of `group` columns: the gated RMSNorm
// rmsnorm(ys silu(z)) w, or ys silu(z) without a norm, or rmsnorm(ys) w silu(z) with the norm
// before the gate; out = out_proj(yn).
struct Mamba2Dims {
  int D, E, N, K, H, G, group;  // d_model, d_inner, d_state, d_conv, heads, groups, norm group
  double dt_min, dt_max, eps;
  bool norm, norm_before_gate;
  int P() const { return E / H; }
  int CD() const { return E + 2 * G * N; }  // x | B | C
  int IN() const { return E + CD() + H; }   // z | xBC | dt
};

// Pointers into the caller's parameter arena; norm is null without a norm.
template <class T> struct Mamba2Weights {
  const T *in_proj, *conv_w, *conv_b, *dt_b, *A_log, *Dskip, *norm, *out_proj;
};
template <class T> struct Mamba2Grads {  // accumulated (+=)
  T *in_proj, *conv_w, *conv_b, *dt_b, *A_log, *Dskip, *norm, *out_proj;
};
template <class T> struct Mamba2Acts {
  int L = 0;
  std::vector<T> zxd;  // [L, IN]
  std::vector<T> xr;   // [L, CD] the conv's input (xBC of zxd, contiguous)
  std::vector<T> xbc;  // [L, CD] silu(conv(xr))
  std::vector<T> ys;   // [L, E] the scan's output
  std::vector<T> yn;   // [L, E] the gate's output = out_proj's input (the next bridge's source)
};

// yn [L, E] from ys [L, E] and z (row stride ldz), the gate of s (the gated RMSNorm's own above).
template <class T>
void mamba2_gate_forward(T* yn, const T* ys, const T* z, int ldz, const T* w, const Mamba2Dims& s, int L) {
  using Acc = acc_t<T>;
  const int E = s.E;
  if (s.norm && !s.norm_before_gate) return gated_rmsnorm_forward(yn, E, ys, E, z, ldz, w, L, E, s.group, s.eps);
  for (int t = 0; t < L; ++t)
    for (int j0 = 0; j0 < E; j0 += s.group) {
      const T* y = ys + size_t(t) * E;
      Acc r = 1;
      if (s.norm) {  // rmsnorm(ys) w before the gate
        Acc ss = 0;
        for (int j = j0; j < j0 + s.group; ++j) ss += Acc(y[j]) * Acc(y[j]);
        r = Acc(1) / std::sqrt(ss / Acc(s.group) + Acc(s.eps));
      }
      for (int j = j0; j < j0 + s.group; ++j) {
        const Acc v = s.norm ? Acc(y[j]) * r * Acc(w[j]) : Acc(y[j]);
        yn[size_t(t) * E + j] = T(v * silu(Acc(z[size_t(t) * ldz + j])));
      }
    }
}

// dys, dz [L, E] assigned; dw accumulated (with a norm).
template <class T>
void mamba2_gate_backward(T* dys, T* dz, T* dw, const T* dyn, const T* ys, const T* z, int ldz, const T* w,
                          const Mamba2Dims& s, int L) {
  using Acc = acc_t<T>;
  const int E = s.E;
  if (s.norm && !s.norm_before_gate)
    return gated_rmsnorm_backward(dys, E, dz, E, dw, dyn, E, ys, E, z, ldz, w, L, E, s.group, s.eps);
  std::vector<Acc> gw(static_cast<size_t>(E), Acc(0));
  for (int t = 0; t < L; ++t)
    for (int j0 = 0; j0 < E; j0 += s.group) {
      const size_t row = size_t(t) * E;
      Acc r = 1, dot = 0;  // dot = sum_j w_j dv_j y_j, dv = d(rmsnorm(ys) w) = dyn silu(z)
      if (s.norm) {
        Acc ss = 0;
        for (int j = j0; j < j0 + s.group; ++j) {
          const Acc y = ys[row + j], zj = z[size_t(t) * ldz + j];
          ss += y * y;
          dot += Acc(w[j]) * Acc(dyn[row + j]) * silu(zj) * y;
        }
        r = Acc(1) / std::sqrt(ss / Acc(s.group) + Acc(s.eps));
      }
      for (int j = j0; j < j0 + s.group; ++j) {
        const Acc y = ys[row + j], zj = z[size_t(t) * ldz + j], go = dyn[row + j];
        const Acc v = s.norm ? y * r * Acc(w[j]) : y, dv = go * silu(zj);
        dz[row + j] = T(go * v * silu_grad(zj));  // yn = v silu(z)
        if (s.norm) {
          gw[size_t(j)] += dv * y * r;
          dys[row + j] = T(r * Acc(w[j]) * dv - y * r * r * r / Acc(s.group) * dot);
        } else {
          dys[row + j] = T(dv);
        }
      }
    }
  if (s.norm)
    for (int j = 0; j < E; ++j) dw[j] += T(gw[size_t(j)]);
}

template <class T>
void mamba2_block_forward(T* out, Mamba2Acts<T>& a, const T* u, const Mamba2Weights<T>& w, const Mamba2Dims& s,
                          int L) {
  const int E = s.E, CD = s.CD(), IN = s.IN(), GN = s.G * s.N;
  a.L = L;
  a.zxd.resize(size_t(L) * IN);
  a.xr.resize(size_t(L) * CD);
  a.xbc.resize(size_t(L) * CD);
  a.ys.resize(size_t(L) * E);
  a.yn.resize(size_t(L) * E);
  linear_forward(a.zxd.data(), u, w.in_proj, L, IN, s.D);  // z | xBC | dt = in_proj(u)
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < CD; ++j) a.xr[size_t(t) * CD + j] = a.zxd[size_t(t) * IN + E + j];
  conv1d_silu_forward(a.xbc.data(), a.xr.data(), w.conv_w, w.conv_b, L, CD, s.K);  // x | B | C
  ssd_scan_forward(a.ys.data(), E, a.xbc.data(), CD, a.zxd.data() + E + CD, IN, w.dt_b, w.A_log, a.xbc.data() + E,
                   a.xbc.data() + E + GN, CD, w.Dskip, L, s.H, s.P(), s.G, s.N, s.dt_min, s.dt_max);
  mamba2_gate_forward(a.yn.data(), a.ys.data(), a.zxd.data(), IN, w.norm, s, L);
  linear_forward(out, a.yn.data(), w.out_proj, L, s.D, E);
}

// du [L, D] assigned (may be null); every field of g accumulates. dyn_extra [L, E] (nullable):
// the gradient reaching yn from the next layer's state bridge.
template <class T>
void mamba2_block_backward(T* du, const Mamba2Grads<T>& g, const T* dout, const T* u, const Mamba2Weights<T>& w,
                           const Mamba2Acts<T>& a, const Mamba2Dims& s, const T* dyn_extra = nullptr) {
  const int L = a.L, E = s.E, CD = s.CD(), IN = s.IN(), GN = s.G * s.N, H = s.H;
  const size_t LE = size_t(L) * E, LC = size_t(L) * CD;
  std::vector<T> dyn(LE), dys(LE), dz(LE), dxbc(LC), dxr(LC), ddt(size_t(L) * H), dzxd(size_t(L) * IN);
  linear_backward(dyn.data(), g.out_proj, dout, a.yn.data(), w.out_proj, L, s.D, E);
  if (dyn_extra)
    for (size_t i = 0; i < LE; ++i) dyn[i] += dyn_extra[i];
  mamba2_gate_backward(dys.data(), dz.data(), g.norm, dyn.data(), a.ys.data(), a.zxd.data(), IN, w.norm, s, L);
  ssd_scan_backward(dxbc.data(), CD, ddt.data(), H, dxbc.data() + E, dxbc.data() + E + GN, CD, g.dt_b, g.A_log,
                    g.Dskip, dys.data(), E, a.xbc.data(), CD, a.zxd.data() + E + CD, IN, w.dt_b, w.A_log,
                    a.xbc.data() + E, a.xbc.data() + E + GN, CD, w.Dskip, L, H, s.P(), s.G, s.N, s.dt_min,
                    s.dt_max);
  conv1d_silu_backward(dxr.data(), g.conv_w, g.conv_b, dxbc.data(), a.xr.data(), w.conv_w, w.conv_b, L, CD, s.K);
  for (int t = 0; t < L; ++t) {  // z | xBC | dt
    T* row = dzxd.data() + size_t(t) * IN;
    for (int j = 0; j < E; ++j) row[j] = dz[size_t(t) * E + j];
    for (int j = 0; j < CD; ++j) row[E + j] = dxr[size_t(t) * CD + j];
    for (int h = 0; h < H; ++h) row[E + CD + h] = ddt[size_t(t) * H + h];
  }
  linear_backward(du, g.in_proj, dzxd.data(), u, w.in_proj, L, IN, s.D);
}

}  // namespace hm::ref::grad
