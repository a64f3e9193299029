#include "kernels/cpu/grad_cpu.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/aligned.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/ops.h"

namespace hm::cpu::grad {

// ---------------------------------------------------------------- sgemm wrappers (row-major)

void gemm_xwT(float* y, const float* x, const float* W, int m, int n, int k, bool accumulate,
              int ldy, int ldx, int ldw) {
  if (m <= 0 || n <= 0) return;
  if (ldw == 0 || ldw == k) {  // inference's linear: its per-row kernel where that is faster (dispatch.h)
    hm::cpu::linear(y, ldy ? ldy : n, x, ldx ? ldx : k, W, m, n, k, accumulate);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, ldx ? ldx : k, W,
              ldw ? ldw : k, accumulate ? 1.0f : 0.0f, y, ldy ? ldy : n);
}

void gemm_dyW(float* dx, const float* dy, const float* W, int m, int n, int k, bool accumulate,
              int ldx, int ldy, int ldw) {
  if (m <= 0 || k <= 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, k, n, 1.0f, dy, ldy ? ldy : n, W,
              ldw ? ldw : k, accumulate ? 1.0f : 0.0f, dx, ldx ? ldx : k);
}

void gemm_dyTx(float* dW, const float* dy, const float* x, int m, int n, int k, int ldw, int ldy,
               int ldx) {
  if (n <= 0 || k <= 0 || m <= 0) return;
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, k, m, 1.0f, dy, ldy ? ldy : n, x,
              ldx ? ldx : k, 1.0f, dW, ldw ? ldw : k);
}

namespace {
using Vec = std::vector<float>;
inline size_t sz(int a, int b) { return size_t(a) * size_t(b); }
// The state-saving interval of the fast scan when its caller asks for none (see
// mamba_block_forward).
constexpr int kScanChunk = 128;
}  // namespace

// The SIMD pieces are grad_simd.cpp's, one copy per ISA (dispatch.h).
void conv1d_silu_backward(float* dx, float* dw, float* db, const float* dout, const float* x,
                          const float* w, const float* b, int L, int E, int K) {
  kernels().grad.conv1d_silu_backward(dx, dw, db, dout, x, w, b, L, E, K);
}

// ---------------------------------------------------------------- Mamba mixer

void mamba_block_forward(float* out, G::MambaActs<float>& a, const float* u,
                         const G::MambaWeights<float>& w, const G::MambaDims& s, int L,
                         int scan_chunk) {
  const int D = s.D, E = s.E, N = s.N, K = s.K, R = s.R, P = R + 2 * N;
  // Without a chunk from the caller, states are kept every kScanChunk tokens anyway: the
  // backward then recomputes one chunk at a time, and its scratch is chunk-sized, not L-sized
  // (the gradients are the same: each chunk restarts from the exact saved state).
  if (scan_chunk <= 0) scan_chunk = kScanChunk;
  a.L = L;
  a.scan_chunk = scan_chunk;
  for (auto* v : {&a.x, &a.z, &a.xc, &a.dt, &a.yg}) v->resize(sz(L, E));
  a.dt_r.resize(sz(L, R));
  a.B.resize(sz(L, N));
  a.C.resize(sz(L, N));
  a.A.resize(sz(E, N));
  a.scan_states.resize(sz(G::scan_num_chunks(L, scan_chunk), E) * N);

  // in_proj's two halves straight into x and z (no [L, 2E] buffer to split).
  gemm_xwT(a.x.data(), u, w.in_proj, L, E, D);
  gemm_xwT(a.z.data(), u, w.in_proj + sz(E, D), L, E, D);
  {  // the inference kernel, from a zero state (a training sequence starts fresh)
    Vec state(sz(E, K - 1), 0.0f);
    cpu::conv1d_silu(a.xc.data(), E, state.data(), a.x.data(), E, w.conv_w, w.conv_b, L, E, K);
  }
  Vec dbc(sz(L, P));
  gemm_xwT(dbc.data(), a.xc.data(), w.x_proj, L, P, E);
  for (int t = 0; t < L; ++t) {
    const float* row = dbc.data() + sz(t, P);
    std::copy_n(row, R, a.dt_r.data() + sz(t, R));
    std::copy_n(row + R, N, a.B.data() + sz(t, N));
    std::copy_n(row + R + N, N, a.C.data() + sz(t, N));
  }
  gemm_xwT(a.dt.data(), a.dt_r.data(), w.dt_w, L, E, R);
  for (size_t i = 0; i < a.A.size(); ++i) a.A[i] = -std::exp(w.A_log[i]);
  if (N % kScanGradLanes == 0)
    kernels().grad.scan_forward(a.yg.data(),
                                ScanGradArgs{a.xc.data(), a.dt.data(), w.dt_b, a.A.data(), a.B.data(),
                                         a.C.data(), w.Dskip, a.z.data(), L, E, N},
                                a.scan_states.data(), scan_chunk);
  else
    G::selective_scan_forward(a.yg.data(), a.xc.data(), a.dt.data(), w.dt_b, a.A.data(),
                              a.B.data(), a.C.data(), w.Dskip, a.z.data(), L, E, N,
                              a.scan_states.data(), scan_chunk);
  gemm_xwT(out, a.yg.data(), w.out_proj, L, D, E);
}

void mamba_block_backward(float* du, const G::MambaGrads<float>& g, const float* dout,
                          const float* u, const G::MambaWeights<float>& w,
                          const G::MambaActs<float>& a, const G::MambaDims& s,
                          const float* dyg_extra) {
  const int L = a.L, D = s.D, E = s.E, N = s.N, K = s.K, R = s.R, P = R + 2 * N;
  Vec dyg(sz(L, E)), dxc(sz(L, E)), ddt(sz(L, E)), dz(sz(L, E));
  Vec dA(sz(E, N), 0.0f), dB(sz(L, N)), dC(sz(L, N)), ddt_r(sz(L, R)), ddbc(sz(L, P));

  gemm_dyW(dyg.data(), dout, w.out_proj, L, D, E, false);  // out = yg out_proj^T
  gemm_dyTx(g.out_proj, dout, a.yg.data(), L, D, E);
  if (dyg_extra)
    for (size_t i = 0; i < dyg.size(); ++i) dyg[i] += dyg_extra[i];
  if (N % kScanGradLanes == 0)
    kernels().grad.scan_backward(dxc.data(), ddt.data(), g.dt_b, dA.data(), dB.data(), dC.data(),
                                 g.Dskip, dz.data(), dyg.data(),
                                 ScanGradArgs{a.xc.data(), a.dt.data(), w.dt_b, a.A.data(), a.B.data(),
                                          a.C.data(), w.Dskip, a.z.data(), L, E, N},
                                 a.scan_chunk > 0 ? a.scan_states.data() : nullptr, a.scan_chunk);
  else if (a.scan_chunk > 0)
    G::selective_scan_backward_chunked(dxc.data(), ddt.data(), g.dt_b, dA.data(), dB.data(),
                                       dC.data(), g.Dskip, dz.data(), dyg.data(), a.xc.data(),
                                       a.dt.data(), w.dt_b, a.A.data(), a.B.data(), a.C.data(),
                                       w.Dskip, a.z.data(), L, E, N, a.scan_states.data(),
                                       a.scan_chunk);
  else
    G::selective_scan_backward(dxc.data(), ddt.data(), g.dt_b, dA.data(), dB.data(), dC.data(),
                               g.Dskip, dz.data(), dyg.data(), a.xc.data(), a.dt.data(), w.dt_b,
                               a.A.data(), a.B.data(), a.C.data(), w.Dskip, a.z.data(), L, E, N);
  G::a_log_grad(g.A_log, dA.data(), a.A.data(), E * N);
  gemm_dyW(ddt_r.data(), ddt.data(), w.dt_w, L, E, R, false);  // dt = dt_r dt_w^T
  gemm_dyTx(g.dt_w, ddt.data(), a.dt_r.data(), L, E, R);
  for (int t = 0; t < L; ++t) {  // dbc = cat(dt_r, B, C)
    float* row = ddbc.data() + sz(t, P);
    std::copy_n(ddt_r.data() + sz(t, R), R, row);
    std::copy_n(dB.data() + sz(t, N), N, row + R);
    std::copy_n(dC.data() + sz(t, N), N, row + R + N);
  }
  // xc feeds both the scan and x_proj: x_proj's gradient is added straight into dxc.
  gemm_dyW(dxc.data(), ddbc.data(), w.x_proj, L, P, E, true);
  gemm_dyTx(g.x_proj, ddbc.data(), a.xc.data(), L, P, E);
  Vec& dx = dyg;  // dyg is dead once the scan's backward is done: its memory takes dx
  conv1d_silu_backward(dx.data(), g.conv_w, g.conv_b, dxc.data(), a.x.data(), w.conv_w, w.conv_b,
                       L, E, K);
  // xz = u in_proj^T with xz = cat(x, z): each half against its rows of in_proj.
  if (du) {
    gemm_dyW(du, dx.data(), w.in_proj, L, E, D, false);
    gemm_dyW(du, dz.data(), w.in_proj + sz(E, D), L, E, D, true);
  }
  gemm_dyTx(g.in_proj, dx.data(), u, L, E, D);
  gemm_dyTx(g.in_proj + sz(E, D), dz.data(), u, L, E, D);
}

// ---------------------------------------------------------------- attention mixer
// The reference core loops over keys per query in double, ~10x an sgemm's time at hd 64. Here
// the scores of a block of kAttnRows queries against the keys they can see (0 .. the block's
// last row) are materialized, so the four products are sgemms and the masked upper triangle is
// skipped but for the diagonal blocks. Scratch: one (two in the backward) kAttnRows x L buffer
// per thread, reused across calls: 256 KiB at L = 1024, where a full L x L matrix would be 4 MiB.

namespace {
constexpr int kAttnRows = 64;
thread_local AlignedVec<float> t_scores, t_dscores;
float* scratch(AlignedVec<float>& buf, size_t n) {  // grown, never shrunk: reused per thread
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace

void attention_core_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                            int L, int H, int G, int hd) {
  const int group = H / G, ldq = H * hd, ldkv = G * hd;
  const float scale = 1.0f / std::sqrt(float(hd));
  float* P = scratch(t_scores, sz(std::min(L, kAttnRows), L));
  for (int h = 0; h < H; ++h) {
    const int g = h / group;
    for (int r0 = 0; r0 < L; r0 += kAttnRows) {
      const int rows = std::min(kAttnRows, L - r0), keys = r0 + rows;  // P is rows x keys
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, hd, scale,
                  q + sz(r0, ldq) + h * hd, ldq, k + g * hd, ldkv, 0.0f, P, keys);  // S = scale Q K^T
      for (int i = 0; i < rows; ++i)
        lse[sz(r0 + i, H) + h] = kernels().grad.softmax_causal_row(P + sz(i, keys), r0 + i, keys);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, keys, 1.0f, P, keys,
                  v + g * hd, ldkv, 0.0f, out + sz(r0, ldq) + h * hd, ldq);  // O = P V
    }
  }
}

void attention_core_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                             const float* k, const float* v, const float* out, const float* lse,
                             int L, int H, int G, int hd) {
  const int group = H / G, ldq = H * hd, ldkv = G * hd;
  const float scale = 1.0f / std::sqrt(float(hd));
  float* P = scratch(t_scores, sz(std::min(L, kAttnRows), L));
  float* dS = scratch(t_dscores, sz(std::min(L, kAttnRows), L));
  std::fill(dk, dk + sz(L, ldkv), 0.0f);  // dK, dV sum over query blocks and the group's heads
  std::fill(dv, dv + sz(L, ldkv), 0.0f);
  for (int h = 0; h < H; ++h) {
    const int g = h / group;
    const float *kg = k + g * hd, *vg = v + g * hd;
    for (int r0 = 0; r0 < L; r0 += kAttnRows) {
      const int rows = std::min(kAttnRows, L - r0), keys = r0 + rows;
      const float *qb = q + sz(r0, ldq) + h * hd, *dob = dout + sz(r0, ldq) + h * hd;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, hd, scale, qb, ldq, kg,
                  ldkv, 0.0f, P, keys);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, hd, 1.0f, dob, ldq, vg,
                  ldkv, 0.0f, dS, keys);  // dP = dO V^T
      for (int i = 0; i < rows; ++i) {
        const int t = r0 + i, n = t + 1;
        float* pt = P + sz(i, keys);
        float* dst = dS + sz(i, keys);
        const float* ot = out + sz(t, ldq) + h * hd;
        const float* dot = dob + sz(i, ldq);
        float Dt = 0;  // D_t = dO_t . O_t = sum_j P_tj dP_tj
        for (int c = 0; c < hd; ++c) Dt += dot[c] * ot[c];
        const float l = lse[sz(t, H) + h];
        kernels().grad.softmax_grad_row(pt, dst, n, l, Dt);  // P = exp(S - lse), dS = P (dP - D)
        std::fill(pt + n, pt + keys, 0.0f);
        std::fill(dst + n, dst + keys, 0.0f);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, keys, scale, dS, keys, kg,
                  ldkv, 0.0f, dq + sz(r0, ldq) + h * hd, ldq);  // dQ = scale dS K
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, hd, rows, scale, dS, keys, qb,
                  ldq, 1.0f, dk + g * hd, ldkv);  // dK += scale dS^T Q
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, keys, hd, rows, 1.0f, P, keys, dob,
                  ldq, 1.0f, dv + g * hd, ldkv);  // dV += P^T dO
    }
  }
}

// RoPE's transpose is the rotation by -angle: with the second half negated before and after,
// the forward rotation (a c - b s, b c + a s) becomes (a c + b s, b c - a s).
void rope_backward(float* dx, int L, int heads, int hd, float theta) {
  const int half = hd / 2;
  auto negate_second_half = [&] {
    for (int r = 0; r < L * heads; ++r)
      for (int i = half; i < hd; ++i) dx[sz(r, hd) + i] = -dx[sz(r, hd) + i];
  };
  negate_second_half();
  cpu::rope(dx, heads * hd, L, heads, hd, 0, theta);
  negate_second_half();
}

void attention_block_forward(float* out, G::AttnSaved<float>& s, const float* u,
                             const G::AttnWeights<float>& w, const G::AttnShape& c) {
  HM_CHECK(!c.rope || c.rope_dim == 0 || c.rope_dim == c.hd, "attention block: a partial rotary (rope_dim ",
           c.rope_dim, " of head_dim ", c.hd, ") trains through BatchGrad");
  const int Q = c.H * c.hd, KV = c.G * c.hd;
  s.q.resize(sz(c.L, Q));
  s.k.resize(sz(c.L, KV));
  s.v.resize(sz(c.L, KV));
  s.lse.resize(sz(c.L, c.H));
  s.inner.resize(sz(c.L, Q));
  gemm_xwT(s.q.data(), u, w.wq, c.L, Q, c.D);
  gemm_xwT(s.k.data(), u, w.wk, c.L, KV, c.D);
  gemm_xwT(s.v.data(), u, w.wv, c.L, KV, c.D);
  if (c.rope) {
    cpu::rope(s.q.data(), Q, c.L, c.H, c.hd, 0, float(c.theta));
    cpu::rope(s.k.data(), KV, c.L, c.G, c.hd, 0, float(c.theta));
  }
  attention_core_forward(s.inner.data(), s.lse.data(), s.q.data(), s.k.data(), s.v.data(), c.L,
                         c.H, c.G, c.hd);
  gemm_xwT(out, s.inner.data(), w.wo, c.L, c.D, Q);
}

void attention_block_backward(float* du, const G::AttnWeightGrads<float>& gw, const float* dout,
                              const float* dinner, const float* u, const G::AttnWeights<float>& w,
                              const G::AttnSaved<float>& s, const G::AttnShape& c) {
  const int Q = c.H * c.hd, KV = c.G * c.hd;
  Vec dinn(sz(c.L, Q)), dq(sz(c.L, Q)), dk(sz(c.L, KV)), dv(sz(c.L, KV));
  if (dinner) std::copy(dinner, dinner + dinn.size(), dinn.begin());
  gemm_dyW(dinn.data(), dout, w.wo, c.L, c.D, Q, dinner != nullptr);
  gemm_dyTx(gw.wo, dout, s.inner.data(), c.L, c.D, Q);
  attention_core_backward(dq.data(), dk.data(), dv.data(), dinn.data(), s.q.data(), s.k.data(),
                          s.v.data(), s.inner.data(), s.lse.data(), c.L, c.H, c.G, c.hd);
  if (c.rope) {
    rope_backward(dq.data(), c.L, c.H, c.hd, float(c.theta));
    rope_backward(dk.data(), c.L, c.G, c.hd, float(c.theta));
  }
  gemm_dyW(du, dq.data(), w.wq, c.L, Q, c.D, false);
  gemm_dyW(du, dk.data(), w.wk, c.L, KV, c.D, true);
  gemm_dyW(du, dv.data(), w.wv, c.L, KV, c.D, true);
  gemm_dyTx(gw.wq, dq.data(), u, c.L, Q, c.D);
  gemm_dyTx(gw.wk, dk.data(), u, c.L, KV, c.D);
  gemm_dyTx(gw.wv, dv.data(), u, c.L, KV, c.D);
}

// ---------------------------------------------------------------- SwiGLU MLP

void mlp_block_forward(float* out, G::MlpSaved<float>& s, const float* m,
                       const G::MlpWeights<float>& w, int n, int D, int F) {
  s.g.resize(sz(n, F));
  s.u.resize(sz(n, F));
  s.a.resize(sz(n, F));
  gemm_xwT(s.g.data(), m, w.gate, n, F, D);
  gemm_xwT(s.u.data(), m, w.up, n, F, D);
  G::swiglu_forward(s.a.data(), s.g.data(), s.u.data(), n, F);
  gemm_xwT(out, s.a.data(), w.down, n, D, F);
}

void mlp_block_backward(float* dm, const G::MlpWeightGrads<float>& gw, const float* dout,
                        const float* m, const G::MlpWeights<float>& w, const G::MlpSaved<float>& s,
                        int n, int D, int F) {
  Vec da(sz(n, F)), dg(sz(n, F)), du(sz(n, F));
  gemm_dyW(da.data(), dout, w.down, n, D, F, false);
  gemm_dyTx(gw.down, dout, s.a.data(), n, D, F);
  G::swiglu_backward(dg.data(), du.data(), da.data(), s.g.data(), s.u.data(), n, F);
  gemm_dyW(dm, dg.data(), w.gate, n, F, D, false);
  gemm_dyW(dm, du.data(), w.up, n, F, D, true);
  gemm_dyTx(gw.gate, dg.data(), m, n, F, D);
  gemm_dyTx(gw.up, du.data(), m, n, F, D);
}

// ---------------------------------------------------------------- state bridge

void bridge_forward(float* h_out, const float* h, const float* y, const float* W,
                    const float* gate, int n, int D, int S) {
  Vec p(sz(n, D));
  gemm_xwT(p.data(), y, W, n, D, S);
  for (int i = 0; i < n; ++i)
    for (int d = 0; d < D; ++d) {
      const size_t o = sz(i, D) + size_t(d);
      h_out[o] = h[o] + gate[d] * p[o];
    }
}

void bridge_backward(float* dy, float* dW, float* dgate, const float* dh_out, const float* y,
                     const float* W, const float* gate, int n, int D, int S) {
  Vec p(sz(n, D)), dp(sz(n, D));
  gemm_xwT(p.data(), y, W, n, D, S);  // recompute p = y W^T
  std::vector<double> acc(size_t(D), 0.0);
  for (int i = 0; i < n; ++i)
    for (int d = 0; d < D; ++d) {
      const size_t o = sz(i, D) + size_t(d);
      acc[size_t(d)] += double(dh_out[o]) * p[o];  // dgate_d += sum_i dh_out p
      dp[o] = dh_out[o] * gate[d];
    }
  for (int d = 0; d < D; ++d) dgate[d] += float(acc[size_t(d)]);
  gemm_dyW(dy, dp.data(), W, n, D, S, false);
  gemm_dyTx(dW, dp.data(), y, n, D, S);
}

// ---------------------------------------------------------------- LM head + cross-entropy

double cross_entropy_forward_backward(float* dhn, float* dW, const float* hn, const float* W,
                                      const int32_t* targets, int n, int D, int V, double scale) {
  // 64 rows of logits at a time: 64 x V floats per thread bounds memory for any vocabulary
  // while each sgemm still has enough rows to run near peak.
  constexpr int kRows = 64;
  Vec z(sz(std::min(n, kRows), V));
  double loss = 0;
  for (int r0 = 0; r0 < n; r0 += kRows) {
    const int nb = std::min(kRows, n - r0);
    gemm_xwT(z.data(), hn + sz(r0, D), W, nb, V, D);
    for (int i = 0; i < nb; ++i) {
      float* zi = z.data() + sz(i, V);
      const int tgt = targets[r0 + i];
      if (tgt < 0) {  // ignored row: no loss, no gradient
        std::fill_n(zi, V, 0.0f);
        continue;
      }
      loss += kernels().grad.cross_entropy_row(zi, V, tgt, scale);
    }
    gemm_dyW(dhn + sz(r0, D), z.data(), W, nb, V, D, false);  // dhn = dz W
    gemm_dyTx(dW, z.data(), hn + sz(r0, D), nb, V, D);       // dW += dz^T hn
  }
  return loss;
}

}  // namespace hm::cpu::grad
