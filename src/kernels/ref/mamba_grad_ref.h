// Reference forward and backward passes for the Mamba path (training groundwork).
//
// Each op is a pair of free functions side by side, in the style of llm.c:
//   op_forward(outputs, saved, inputs, weights, sizes)
//   op_backward(input grads, param grads, dout, inputs, weights, saved, sizes)
// Gradient rule: parameter gradients accumulate (+=); activation gradients are assigned (=).
//
// One sequence of L tokens starting from zero state (training), contiguous row-major,
// token-major layouts: x [L,E] is x[t*E + e]. Templates on the scalar type T; sums and scan
// states use acc_t<T> (double for float, as hm::ref does; T itself for double or wider), so
// the float instantiation agrees with hm::ref and the double one is checked against finite
// differences (tests/test_grad_mamba.cpp). Plain loops that read like docs/MODEL.md; the
// PyTorch line each backward step differentiates sits beside it.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <type_traits>
#include <vector>

namespace hm::ref::grad {

template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, float>, double, T>;

// ---------------------------------------------------------------- scalar helpers

template <class T> T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
// softplus(x) = log(1 + exp(x)), taken as x for x > 20 (as torch and docs/MODEL.md do): the
// difference, log1p(exp(-x)) < 2e-9, is below float resolution there, and exp cannot overflow.
// d softplus / dx = sigmoid(x) on both branches (1 - sigmoid(x) < 2e-9 past the switch).
template <class T> T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }
template <class T> T silu(T x) { return x * sigmoid(x); }
// d silu / dx = s + x s (1 - s), s = sigmoid(x)
template <class T> T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

// ---------------------------------------------------------------- RMSNorm
// out[i,j] = x[i,j] * rstd[i] * w[j],  rstd[i] = 1 / sqrt(mean_j x[i,j]^2 + eps)

template <class T>
void rmsnorm_forward(T* out, T* rstd, const T* x, const T* w, int n, int d, double eps) {
  using A = acc_t<T>;
  for (int i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    A ss = 0;
    for (int j = 0; j < d; ++j) ss += A(xi[j]) * xi[j];
    const A r = A(1) / std::sqrt(ss / d + A(eps));
    rstd[i] = T(r);
    for (int j = 0; j < d; ++j) out[i * d + j] = T(xi[j] * r * w[j]);
  }
}

template <class T>
void rmsnorm_backward(T* dx, T* dw, const T* dout, const T* x, const T* w, const T* rstd, int n,
                      int d) {
  using A = acc_t<T>;
  for (int i = 0; i < n; ++i) {
    const T* xi = x + i * d;
    const T* gi = dout + i * d;
    const A r = rstd[i];
    // dL/drstd = sum_j dout_j * w_j * x_j;  drstd/dx_j = -rstd^3 * x_j / d
    A dot = 0;
    for (int j = 0; j < d; ++j) dot += A(gi[j]) * w[j] * xi[j];
    for (int j = 0; j < d; ++j)  // dx = dout * w * rstd - rstd^3 / d * (dout . w x) * x
      dx[i * d + j] = T(A(gi[j]) * w[j] * r - r * r * r * dot * xi[j] / d);
  }
  for (int j = 0; j < d; ++j) {  // dw += (dout * x * rstd).sum(rows)
    A acc = 0;
    for (int i = 0; i < n; ++i) acc += A(dout[i * d + j]) * x[i * d + j] * rstd[i];
    dw[j] += T(acc);
  }
}

// ---------------------------------------------------------------- Linear (no bias)
// y[m,n] = x[m,k] . W[n,k]^T   (W is a PyTorch Linear weight [out, in])

template <class T>
void linear_forward(T* y, const T* x, const T* W, int m, int n, int k) {
  using A = acc_t<T>;
  for (int i = 0; i < m; ++i)
    for (int o = 0; o < n; ++o) {
      A acc = 0;
      for (int c = 0; c < k; ++c) acc += A(x[i * k + c]) * W[o * k + c];
      y[i * n + o] = T(acc);
    }
}

// dx may be null (the input needs no gradient, e.g. the first layer's embeddings handled apart).
template <class T>
void linear_backward(T* dx, T* dW, const T* dy, const T* x, const T* W, int m, int n, int k) {
  using A = acc_t<T>;
  if (dx)
    for (int i = 0; i < m; ++i)  // dx = dy @ W
      for (int c = 0; c < k; ++c) {
        A acc = 0;
        for (int o = 0; o < n; ++o) acc += A(dy[i * n + o]) * W[o * k + c];
        dx[i * k + c] = T(acc);
      }
  for (int o = 0; o < n; ++o)  // dW += dy^T @ x
    for (int c = 0; c < k; ++c) {
      A acc = 0;
      for (int i = 0; i < m; ++i) acc += A(dy[i * n + o]) * x[i * k + c];
      dW[o * k + c] += T(acc);
    }
}

// ---------------------------------------------------------------- causal depthwise conv + SiLU
// pre[t,e] = b[e] + sum_j w[e,j] * x[t-K+1+j, e]   (x[<0] = 0: zero state)
// out[t,e] = silu(pre[t,e])

template <class T>
acc_t<T> conv1d_pre(const T* x, const T* w, const T* b, int t, int e, int E, int K) {
  acc_t<T> acc = b[e];
  for (int j = 0; j < K; ++j) {
    const int s = t - K + 1 + j;
    if (s >= 0) acc += acc_t<T>(w[e * K + j]) * x[s * E + e];
  }
  return acc;
}

template <class T>
void conv1d_silu_forward(T* out, const T* x, const T* w, const T* b, int L, int E, int K) {
  for (int t = 0; t < L; ++t)
    for (int e = 0; e < E; ++e) out[t * E + e] = T(silu(conv1d_pre(x, w, b, t, e, E, K)));
}

// The pre-activation is recomputed here rather than saved (the fused block does the same).
template <class T>
void conv1d_silu_backward(T* dx, T* dw, T* db, const T* dout, const T* x, const T* w, const T* b,
                          int L, int E, int K) {
  using A = acc_t<T>;
  std::vector<A> dpre(L);
  for (int e = 0; e < E; ++e) {
    A db_acc = 0;
    for (int t = 0; t < L; ++t) {  // out = silu(pre)
      dpre[t] = A(dout[t * E + e]) * silu_grad(conv1d_pre(x, w, b, t, e, E, K));
      db_acc += dpre[t];           // db += dpre.sum(t)
    }
    db[e] += T(db_acc);
    for (int j = 0; j < K; ++j) {  // dw[e,j] += sum_t dpre[t] * x[t-K+1+j]
      A acc = 0;
      for (int t = std::max(0, K - 1 - j); t < L; ++t)
        acc += dpre[t] * x[(t - K + 1 + j) * E + e];
      dw[e * K + j] += T(acc);
    }
    for (int s = 0; s < L; ++s) {  // dx[s] = sum_j dpre[s+K-1-j] * w[e,j] (outputs reading x[s])
      A acc = 0;
      for (int j = 0; j < K; ++j) {
        const int t = s + K - 1 - j;
        if (t < L) acc += dpre[t] * w[e * K + j];
      }
      dx[s * E + e] = T(acc);
    }
  }
}

// ---------------------------------------------------------------- selective scan (gated)
// delta[t,e] = softplus(dt[t,e] + dt_bias[e])
// h[t,e,n]   = exp(delta*A[e,n]) * h[t-1,e,n] + delta * B[t,n] * x[t,e]      (h[-1] = 0)
// yc[t,e]    = sum_n h[t,e,n] * C[t,n] + Dskip[e] * x[t,e]
// y[t,e]     = yc[t,e] * silu(z[t,e])
// x, dt, z, y [L,E]; B, C [L,N] shared by all channels; A [E,N] = -exp(A_log).
//
// Chunked storage: given chunk_states (and chunk > 0), the forward also saves the state entering
// each chunk: chunk_states [ceil(L/chunk), E, N], entry c = h[c*chunk - 1] (entry 0 is the zero
// state). States are kept in acc_t<T>, the precision the scan runs in.

inline int scan_num_chunks(int L, int chunk) { return (L + chunk - 1) / chunk; }

namespace detail {
// One step of the recurrence for channel e: h (N values) goes from h[t-1] to h[t]; returns
// yc[t,e] (before the gate). The forward, the oracle backward and the chunked recompute all
// call this, so their states agree bit for bit.
template <class T>
acc_t<T> scan_step(acc_t<T>* h, const T* x, const T* dt, const T* dt_bias, const T* A, const T* B,
                   const T* C, const T* Dskip, int t, int e, int E, int N) {
  using Ac = acc_t<T>;
  const Ac delta = softplus(Ac(dt[t * E + e]) + dt_bias[e]);
  const Ac xt = x[t * E + e];
  Ac acc = 0;
  for (int n = 0; n < N; ++n) {
    h[n] = std::exp(delta * A[e * N + n]) * h[n] + delta * B[t * N + n] * xt;
    acc += h[n] * C[t * N + n];
  }
  return acc + Ac(Dskip[e]) * xt;
}

// Sums that run over tokens or channels, kept in acc_t<T> until the end of the backward.
template <class T> struct ScanGradSums {
  std::vector<acc_t<T>> dA, dB, dC, dD, ddt_bias;  // [E,N], [L,N], [L,N], [E], [E]
  ScanGradSums(int L, int E, int N) : dA(E * N), dB(L * N), dC(L * N), dD(E), ddt_bias(E) {}
  // Parameter grads accumulate; dB and dC are activation grads (x_proj outputs): assigned.
  void write(T* dA_, T* dB_, T* dC_, T* dD_, T* ddt_bias_) const {
    for (std::size_t i = 0; i < dA.size(); ++i) dA_[i] += T(dA[i]);
    for (std::size_t i = 0; i < dB.size(); ++i) dB_[i] = T(dB[i]);
    for (std::size_t i = 0; i < dC.size(); ++i) dC_[i] = T(dC[i]);
    for (std::size_t i = 0; i < dD.size(); ++i) dD_[i] += T(dD[i]);
    for (std::size_t i = 0; i < ddt_bias.size(); ++i) ddt_bias_[i] += T(ddt_bias[i]);
  }
};

// Backward of one step (t, e). h_t = state after step t, h_prev = state before it (N each).
// g (N values) holds dL/dh[t] from later steps (already multiplied through a[t+1]); on return it
// holds dL/dh[t-1]. dx, ddt, dz [t,e] are assigned; the rest add into the sums.
template <class T>
void scan_step_backward(T* dx, T* ddt, T* dz, ScanGradSums<T>& sum, acc_t<T>* g,
                        const acc_t<T>* h_t, const acc_t<T>* h_prev, const T* dy, const T* x,
                        const T* dt, const T* dt_bias, const T* A, const T* B, const T* C,
                        const T* Dskip, const T* z, int t, int e, int E, int N) {
  using Ac = acc_t<T>;
  const int te = t * E + e;
  const Ac pre = Ac(dt[te]) + dt_bias[e];
  const Ac delta = softplus(pre);
  const Ac xt = x[te], zt = z[te], dyt = dy[te];
  Ac yc = Ac(Dskip[e]) * xt;
  for (int n = 0; n < N; ++n) yc += h_t[n] * C[t * N + n];
  dz[te] = T(dyt * yc * silu_grad(zt));                      // y = yc * silu(z)
  const Ac dyc = dyt * silu(zt);
  sum.dD[e] += dyc * xt;                                     // yc = h[t] . C[t] + D * x
  Ac dxt = dyc * Dskip[e];
  Ac ddelta = 0;
  for (int n = 0; n < N; ++n) {
    const int tn = t * N + n, en = e * N + n;
    sum.dC[tn] += dyc * h_t[n];
    g[n] += dyc * C[tn];                                     // dL/dh[t], complete
    const Ac a = std::exp(delta * A[en]);                    // h[t] = a * h[t-1] + delta * B * x,
    ddelta += g[n] * (A[en] * a * h_prev[n] + B[tn] * xt);   //   a = exp(delta * A)
    sum.dA[en] += g[n] * delta * a * h_prev[n];
    sum.dB[tn] += g[n] * delta * xt;
    dxt += g[n] * delta * B[tn];
    g[n] *= a;                                               // dL/dh[t-1] through h[t]
  }
  const Ac dpre = ddelta * sigmoid(pre);                     // delta = softplus(dt + dt_bias)
  ddt[te] = T(dpre);
  sum.ddt_bias[e] += dpre;
  dx[te] = T(dxt);
}

}  // namespace detail

template <class T>
void selective_scan_forward(T* y, const T* x, const T* dt, const T* dt_bias, const T* A, const T* B,
                            const T* C, const T* Dskip, const T* z, int L, int E, int N,
                            acc_t<T>* chunk_states = nullptr, int chunk = 0) {
  std::vector<acc_t<T>> h(N);
  for (int e = 0; e < E; ++e) {
    for (int n = 0; n < N; ++n) h[n] = 0;
    for (int t = 0; t < L; ++t) {
      if (chunk_states && t % chunk == 0)  // the state entering chunk t / chunk
        for (int n = 0; n < N; ++n) chunk_states[((t / chunk) * E + e) * N + n] = h[n];
      const acc_t<T> yc = detail::scan_step(h.data(), x, dt, dt_bias, A, B, C, Dskip, t, e, E, N);
      y[t * E + e] = T(yc * silu(acc_t<T>(z[t * E + e])));
    }
  }
}

// The oracle: recomputes and stores every state h[t] (L x E x N), then walks t in reverse.
template <class T>
void selective_scan_backward(T* dx, T* ddt, T* ddt_bias, T* dA, T* dB, T* dC, T* dD, T* dz,
                             const T* dy, const T* x, const T* dt, const T* dt_bias, const T* A,
                             const T* B, const T* C, const T* Dskip, const T* z, int L, int E,
                             int N) {
  using Ac = acc_t<T>;
  detail::ScanGradSums<T> sum(L, E, N);
  std::vector<Ac> hs((L + 1) * N), g(N);  // hs row t+1 = h[t], row 0 = h[-1] = 0
  for (int e = 0; e < E; ++e) {
    for (int n = 0; n < N; ++n) hs[n] = 0;
    for (int t = 0; t < L; ++t) {
      for (int n = 0; n < N; ++n) hs[(t + 1) * N + n] = hs[t * N + n];
      detail::scan_step(&hs[(t + 1) * N], x, dt, dt_bias, A, B, C, Dskip, t, e, E, N);
    }
    for (int n = 0; n < N; ++n) g[n] = 0;
    for (int t = L - 1; t >= 0; --t)
      detail::scan_step_backward(dx, ddt, dz, sum, g.data(), &hs[(t + 1) * N], &hs[t * N], dy, x,
                                 dt, dt_bias, A, B, C, Dskip, z, t, e, E, N);
  }
  sum.write(dA, dB, dC, dD, ddt_bias);
}

// The memory-saving backward: only the chunk-boundary states from the forward are kept; chunks
// are walked in reverse, each one's states recomputed from its boundary state into a buffer of
// chunk x E x N, and dL/dh carried across the boundary. Same gradients as the oracle.
template <class T>
void selective_scan_backward_chunked(T* dx, T* ddt, T* ddt_bias, T* dA, T* dB, T* dC, T* dD, T* dz,
                                     const T* dy, const T* x, const T* dt, const T* dt_bias,
                                     const T* A, const T* B, const T* C, const T* Dskip, const T* z,
                                     int L, int E, int N, const acc_t<T>* chunk_states, int chunk) {
  using Ac = acc_t<T>;
  detail::ScanGradSums<T> sum(L, E, N);
  // buf[(i*E + e)*N + n]: row i = 0 is the chunk's boundary state h[t0-1], row i is h[t0+i-1]
  std::vector<Ac> buf((chunk + 1) * E * N);
  std::vector<Ac> g(E * N, Ac(0));  // dL/dh[t0+len-1] carried in from the chunk after
  for (int c = scan_num_chunks(L, chunk) - 1; c >= 0; --c) {
    const int t0 = c * chunk, len = std::min(chunk, L - t0);
    for (int e = 0; e < E; ++e) {
      Ac* b0 = &buf[e * N];
      for (int n = 0; n < N; ++n) b0[n] = chunk_states[(c * E + e) * N + n];
      for (int i = 0; i < len; ++i) {  // recompute h[t0 .. t0+len-1]
        Ac* hi = &buf[((i + 1) * E + e) * N];
        const Ac* hp = &buf[(i * E + e) * N];
        for (int n = 0; n < N; ++n) hi[n] = hp[n];
        detail::scan_step(hi, x, dt, dt_bias, A, B, C, Dskip, t0 + i, e, E, N);
      }
      for (int i = len - 1; i >= 0; --i)
        detail::scan_step_backward(dx, ddt, dz, sum, &g[e * N], &buf[((i + 1) * E + e) * N],
                                   &buf[(i * E + e) * N], dy, x, dt, dt_bias, A, B, C, Dskip, z,
                                   t0 + i, e, E, N);
    }
  }
  sum.write(dA, dB, dC, dD, ddt_bias);
}

// Convenience form: runs the state-saving forward itself (one extra scan) and then the above.
template <class T>
void selective_scan_backward_chunked(T* dx, T* ddt, T* ddt_bias, T* dA, T* dB, T* dC, T* dD, T* dz,
                                     const T* dy, const T* x, const T* dt, const T* dt_bias,
                                     const T* A, const T* B, const T* C, const T* Dskip, const T* z,
                                     int L, int E, int N, int chunk) {
  std::vector<acc_t<T>> states(scan_num_chunks(L, chunk) * E * N);
  std::vector<T> y(L * E);
  selective_scan_forward(y.data(), x, dt, dt_bias, A, B, C, Dskip, z, L, E, N, states.data(),
                         chunk);
  selective_scan_backward_chunked(dx, ddt, ddt_bias, dA, dB, dC, dD, dz, dy, x, dt, dt_bias, A, B,
                                  C, Dskip, z, L, E, N, states.data(), chunk);
}

// A = -exp(A_log)  =>  dA_log += dA * A   (parameter gradient: accumulates)
template <class T> void a_log_grad(T* dA_log, const T* dA, const T* A, int n) {
  for (int i = 0; i < n; ++i) dA_log[i] += dA[i] * A[i];
}

// ---------------------------------------------------------------- one Mamba mixer
// u [L,D] (already normalized) -> out [L,D] (the caller adds the residual):
//   xz = u @ in_proj^T; x, z = xz[:, :E], xz[:, E:]
//   xc = silu(conv1d(x) + conv_b)
//   dt_r, B, C = split(xc @ x_proj^T, [R, N, N])
//   dt = dt_r @ dt_w^T                         (dt_b is added inside the scan)
//   yg = selective_scan(xc, dt, dt_b, -exp(A_log), B, C, Dskip, z)
//   out = yg @ out_proj^T

struct MambaDims {
  int D, E, N, K, R;  // d_model, d_inner, d_state, d_conv, dt_rank
};

// Pointers into the caller's parameter arena (PyTorch layouts).
template <class T> struct MambaWeights {
  const T* in_proj;   // [2E, D]
  const T* conv_w;    // [E, K]
  const T* conv_b;    // [E]
  const T* x_proj;    // [R+2N, E]
  const T* dt_w;      // [E, R]
  const T* dt_b;      // [E]
  const T* A_log;     // [E, N]
  const T* Dskip;     // [E]
  const T* out_proj;  // [D, E]
};

// Same shapes; mamba_block_backward accumulates (+=) into each.
template <class T> struct MambaGrads {
  T* in_proj; T* conv_w; T* conv_b; T* x_proj; T* dt_w; T* dt_b; T* A_log; T* Dskip; T* out_proj;
};

// What the forward saves for the backward. The conv pre-activation, delta and the scan states
// are recomputed, not stored; with scan_chunk > 0 only the chunk-boundary states are kept.
template <class T> struct MambaActs {
  int L = 0, scan_chunk = 0;
  std::vector<T> x;     // [L,E] conv input (first half of in_proj's output)
  std::vector<T> z;     // [L,E] gate (second half)
  std::vector<T> xc;    // [L,E] silu(conv) output = scan input x
  std::vector<T> dt_r;  // [L,R]
  std::vector<T> B, C;  // [L,N]
  std::vector<T> dt;    // [L,E] dt_r @ dt_w^T, before bias and softplus
  std::vector<T> A;     // [E,N] -exp(A_log)
  std::vector<T> yg;    // [L,E] gated scan output = out_proj input
  std::vector<acc_t<T>> scan_states;  // [ceil(L/scan_chunk), E, N] when scan_chunk > 0
};

template <class T>
void mamba_block_forward(T* out, MambaActs<T>& a, const T* u, const MambaWeights<T>& w,
                         const MambaDims& s, int L, int scan_chunk = 0) {
  const int D = s.D, E = s.E, N = s.N, K = s.K, R = s.R, P = R + 2 * N;
  a.L = L;
  a.scan_chunk = scan_chunk;
  for (auto* v : {&a.x, &a.z, &a.xc, &a.dt, &a.yg}) v->resize(L * E);
  a.dt_r.resize(L * R);
  a.B.resize(L * N);
  a.C.resize(L * N);
  a.A.resize(E * N);
  a.scan_states.resize(scan_chunk > 0 ? scan_num_chunks(L, scan_chunk) * E * N : 0);

  std::vector<T> xz(L * 2 * E), dbc(L * P);
  linear_forward(xz.data(), u, w.in_proj, L, 2 * E, D);         // xz = in_proj(u)
  for (int t = 0; t < L; ++t)                                   // x, z = xz.chunk(2, dim=-1)
    for (int e = 0; e < E; ++e) {
      a.x[t * E + e] = xz[t * 2 * E + e];
      a.z[t * E + e] = xz[t * 2 * E + E + e];
    }
  conv1d_silu_forward(a.xc.data(), a.x.data(), w.conv_w, w.conv_b, L, E, K);  // silu(conv(x))
  linear_forward(dbc.data(), a.xc.data(), w.x_proj, L, P, E);   // dbc = x_proj(x)
  for (int t = 0; t < L; ++t) {                                 // dt_r, B, C = dbc.split([R,N,N])
    for (int r = 0; r < R; ++r) a.dt_r[t * R + r] = dbc[t * P + r];
    for (int n = 0; n < N; ++n) {
      a.B[t * N + n] = dbc[t * P + R + n];
      a.C[t * N + n] = dbc[t * P + R + N + n];
    }
  }
  linear_forward(a.dt.data(), a.dt_r.data(), w.dt_w, L, E, R);  // dt_proj.weight @ dt_r
  for (int i = 0; i < E * N; ++i) a.A[i] = -std::exp(w.A_log[i]);  // A = -exp(A_log)
  selective_scan_forward(a.yg.data(), a.xc.data(), a.dt.data(), w.dt_b, a.A.data(), a.B.data(),
                         a.C.data(), w.Dskip, a.z.data(), L, E, N,
                         scan_chunk > 0 ? a.scan_states.data() : nullptr, scan_chunk);
  linear_forward(out, a.yg.data(), w.out_proj, L, D, E);        // out = out_proj(y)
}

// du [L,D] is assigned (may be null); every field of g accumulates. a is the forward's.
// dyg_extra [L,E] (nullable): gradient reaching the gated output yg from elsewhere (the next
// layer's state bridge reads yg), added to what out_proj sends back.
template <class T>
void mamba_block_backward(T* du, const MambaGrads<T>& g, const T* dout, const T* u,
                          const MambaWeights<T>& w, const MambaActs<T>& a, const MambaDims& s,
                          const T* dyg_extra = nullptr) {
  const int L = a.L, D = s.D, E = s.E, N = s.N, K = s.K, R = s.R, P = R + 2 * N;
  std::vector<T> dyg(L * E), dxc(L * E), dxc2(L * E), ddt(L * E), dz(L * E), dx(L * E);
  std::vector<T> dA(E * N, T(0)), dB(L * N), dC(L * N), ddt_r(L * R), ddbc(L * P), dxz(L * 2 * E);

  // out = out_proj(y)
  linear_backward(dyg.data(), g.out_proj, dout, a.yg.data(), w.out_proj, L, D, E);
  if (dyg_extra)
    for (int i = 0; i < L * E; ++i) dyg[i] += dyg_extra[i];
  // y = selective_scan(xc, dt, dt_b, A, B, C, D, z)
  if (a.scan_chunk > 0)
    selective_scan_backward_chunked(dxc.data(), ddt.data(), g.dt_b, dA.data(), dB.data(),
                                    dC.data(), g.Dskip, dz.data(), dyg.data(), a.xc.data(),
                                    a.dt.data(), w.dt_b, a.A.data(), a.B.data(), a.C.data(),
                                    w.Dskip, a.z.data(), L, E, N, a.scan_states.data(),
                                    a.scan_chunk);
  else
    selective_scan_backward(dxc.data(), ddt.data(), g.dt_b, dA.data(), dB.data(), dC.data(),
                            g.Dskip, dz.data(), dyg.data(), a.xc.data(), a.dt.data(), w.dt_b,
                            a.A.data(), a.B.data(), a.C.data(), w.Dskip, a.z.data(), L, E, N);
  a_log_grad(g.A_log, dA.data(), a.A.data(), E * N);            // A = -exp(A_log)
  // dt = dt_r @ dt_proj.weight^T
  linear_backward(ddt_r.data(), g.dt_w, ddt.data(), a.dt_r.data(), w.dt_w, L, E, R);
  for (int t = 0; t < L; ++t) {                                 // dbc = cat(dt_r, B, C)
    for (int r = 0; r < R; ++r) ddbc[t * P + r] = ddt_r[t * R + r];
    for (int n = 0; n < N; ++n) {
      ddbc[t * P + R + n] = dB[t * N + n];
      ddbc[t * P + R + N + n] = dC[t * N + n];
    }
  }
  // dbc = x_proj(xc); xc feeds both the scan and x_proj, so its two gradients add
  linear_backward(dxc2.data(), g.x_proj, ddbc.data(), a.xc.data(), w.x_proj, L, P, E);
  for (int i = 0; i < L * E; ++i) dxc[i] += dxc2[i];
  // xc = silu(conv1d(x) + conv_b)
  conv1d_silu_backward(dx.data(), g.conv_w, g.conv_b, dxc.data(), a.x.data(), w.conv_w, w.conv_b,
                       L, E, K);
  for (int t = 0; t < L; ++t)                                   // xz = cat(x, z)
    for (int e = 0; e < E; ++e) {
      dxz[t * 2 * E + e] = dx[t * E + e];
      dxz[t * 2 * E + E + e] = dz[t * E + e];
    }
  linear_backward(du, g.in_proj, dxz.data(), u, w.in_proj, L, 2 * E, D);  // xz = in_proj(u)
}

}  // namespace hm::ref::grad
