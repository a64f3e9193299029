#include "kernels/cpu/grad_cpu.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/simd.h"
#include "kernels/ops.h"

namespace hm::cpu::grad {

// ---------------------------------------------------------------- sgemm wrappers (row-major)

void gemm_xwT(float* y, const float* x, const float* W, int m, int n, int k, bool accumulate,
              int ldy, int ldx, int ldw) {
  if (m <= 0 || n <= 0) return;
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
}  // namespace

// ---------------------------------------------------------------- selective scan (float I/O)
// The reference recurrence (mamba_grad_ref.h) in 8-lane double vectors whose lanes are 8
// channels: each state element (e, n) is its own dependency chain, N of them in flight per
// block, and y = h . C needs no horizontal sum. Channels past the last full block of 8 run one
// at a time with the state dimension in the lanes. States and decays stay double: with
// delta*A ~ -1e-3 the decay a = exp(delta*A) is ~0.999 and h's error grows like
// err(a) / (1 - a), so a float exp (2e-7) would cost ~1e-4. The backward keeps each recomputed
// decay, so it takes one exp per (t, e, n) instead of two.
// Needs N % 8 == 0 (the callers fall back to the reference otherwise).
namespace {

typedef double vd __attribute__((vector_size(64)));
typedef int64_t vl __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
constexpr int kDW = 8;

inline vd ld(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void st(double* p, vd v) { std::memcpy(p, &v, sizeof v); }
inline vd ldf(const float* p) {
  v8f f;
  std::memcpy(&f, p, sizeof f);
  return __builtin_convertvector(f, vd);
}
inline vd splatd(double s) { return s - vd{}; }
inline double hsumd(vd v) {
  double s = 0;
  for (int i = 0; i < kDW; ++i) s += v[i];
  return s;
}

// e^x to ~1 ulp: x = k ln2 + r (ln2 in two parts, k*hi exact), |r| <= ln2/2, Taylor to r^13
// (remainder < 1e-17). x is clamped to [-700, 700]: scan decays never get near either end.
inline vd vexpd(vd x) {
  x = x < -700.0 ? splatd(-700.0) : x;
  x = x > 700.0 ? splatd(700.0) : x;
  const vd k = (x * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;  // round
  const vd r = (x - k * 0.6931471803691238) - k * 1.9082149292705877e-10;
  vd p = splatd(1.0 / 6227020800.0);  // 1/13!
  constexpr double inv[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                            1.0 / 362880.0,    1.0 / 40320.0,    1.0 / 5040.0,
                            1.0 / 720.0,       1.0 / 120.0,      1.0 / 24.0,
                            1.0 / 6.0,         0.5,              1.0,
                            1.0};
  for (double c : inv) p = p * r + c;
  const vl e = (__builtin_convertvector(k, vl) + 1023) << 52;  // 2^k
  vd two_k;
  std::memcpy(&two_k, &e, sizeof two_k);
  return p * two_k;
}

struct ScanArgs {
  const float *x, *dt, *dt_bias, *A, *B, *C, *Dskip, *z;
  int L, E, N;
};

// The state-saving interval the fast forward uses when its caller asks for none (see
// mamba_block_forward).
constexpr int kScanChunk = 128;

inline void st8f(float* p, vd v) {  // 8 doubles rounded into 8 floats
  const v8f f = __builtin_convertvector(v, v8f);
  std::memcpy(p, &f, sizeof f);
}

// The scan's per-(t, e) scalars for channels e0 .. e0+w-1 (w <= 16) and rows t0 .. t0+len-1,
// laid out [t - t0][w], in float SIMD: as libm calls in double they were a quarter of a small
// model's training step. Float is enough: they feed the double recurrence with ~2e-7 relative
// error, the rounding of the float activations they are computed from. Per-thread buffers of
// 4 x len x w floats, reused across calls.
thread_local simd::FloatBuf t_delta, t_gate, t_gate_grad, t_dsoftplus;
struct ScanScalars {
  const float *delta, *gate;           // softplus(dt + bias), silu(z)
  const float *gate_grad, *dsoftplus;  // silu'(z), sigmoid(dt + bias): backward only
};
ScanScalars scan_scalars(const ScanArgs& s, int e0, int w, int t0, int len, bool backward) {
  using namespace simd;
  const size_t n = sz(len, w);
  float* delta = scratch(t_delta, n);
  float* gate = scratch(t_gate, n);
  float* gate_grad = backward ? scratch(t_gate_grad, n) : nullptr;
  float* dsp = backward ? scratch(t_dsoftplus, n) : nullptr;
  const vf bias = load_n(s.dt_bias + e0, w);
  for (int i = 0; i < len; ++i) {
    const size_t o = sz(t0 + i, s.E) + size_t(e0), r = sz(i, w);
    const vf pre = load_n(s.dt + o, w) + bias;
    const vf z = load_n(s.z + o, w);
    const vf sg = 1.0f / (1.0f + vexp(-z));
    store_n(delta + r, vsoftplus(pre), w);
    store_n(gate + r, z * sg, w);
    if (backward) {
      store_n(gate_grad + r, sg * (1.0f + z * (1.0f - sg)), w);
      store_n(dsp + r, 1.0f / (1.0f + vexp(-pre)), w);
    }
  }
  return {delta, gate, gate_grad, dsp};
}

// At[b * N + n] = lanes A[8b + l, n]: the blocks' decay rates, channel-major in the lanes.
std::vector<vd> blocked_A(const ScanArgs& s, int blocks) {
  std::vector<vd> At(sz(blocks, s.N));
  for (int b = 0; b < blocks; ++b)
    for (int n = 0; n < s.N; ++n)
      for (int l = 0; l < kDW; ++l) At[sz(b, s.N) + size_t(n)][l] = s.A[sz(b * kDW + l, s.N) + size_t(n)];
  return At;
}

}  // namespace

static void selective_scan_forward_fast(float* y, const ScanArgs& s, double* chunk_states, int chunk) {
  const int L = s.L, E = s.E, N = s.N, blocks = E / kDW, tail = E - blocks * kDW;
  const std::vector<vd> At = blocked_A(s, blocks);
  std::vector<vd> h(static_cast<size_t>(N));
  for (int b = 0; b < blocks; ++b) {
    const int e0 = b * kDW;
    const ScanScalars k = scan_scalars(s, e0, kDW, 0, L, false);
    const vd* Ab = &At[sz(b, N)];
    const vd Dv = ldf(s.Dskip + e0);
    std::fill(h.begin(), h.end(), vd{});
    for (int t = 0; t < L; ++t) {
      if (chunk_states && t % chunk == 0)  // [chunk][e][n]: the lanes scatter to 8 rows
        for (int n = 0; n < N; ++n)
          for (int l = 0; l < kDW; ++l) chunk_states[sz((t / chunk) * E + e0 + l, N) + size_t(n)] = h[size_t(n)][l];
      const size_t o = sz(t, E) + size_t(e0), r = sz(t, kDW);
      const vd dl = ldf(k.delta + r), xt = ldf(s.x + o), dlx = dl * xt;
      const float *Bt = s.B + sz(t, N), *Ct = s.C + sz(t, N);
      vd acc{};
      for (int n = 0; n < N; ++n) {
        const vd hn = vexpd(dl * Ab[n]) * h[size_t(n)] + dlx * double(Bt[n]);
        h[size_t(n)] = hn;
        acc += hn * double(Ct[n]);
      }
      st8f(y + o, (acc + Dv * xt) * ldf(k.gate + r));
    }
  }
  std::vector<double> hc(static_cast<size_t>(N));  // the remaining channels, one at a time
  const ScanScalars k = tail ? scan_scalars(s, blocks * kDW, tail, 0, L, false) : ScanScalars{};
  for (int e = blocks * kDW; e < E; ++e) {
    const int c = e - blocks * kDW;
    std::fill(hc.begin(), hc.end(), 0.0);
    for (int t = 0; t < L; ++t) {
      if (chunk_states && t % chunk == 0)
        std::copy(hc.begin(), hc.end(), chunk_states + sz((t / chunk) * E + e, N));
      const size_t te = sz(t, E) + size_t(e);
      const double delta = k.delta[sz(t, tail) + size_t(c)], xt = s.x[te];
      vd acc{};
      for (int n = 0; n < N; n += kDW) {
        const vd a = vexpd(delta * ldf(s.A + sz(e, N) + n));
        const vd hn = a * ld(&hc[size_t(n)]) + (delta * xt) * ldf(s.B + sz(t, N) + n);
        st(&hc[size_t(n)], hn);
        acc += hn * ldf(s.C + sz(t, N) + n);
      }
      y[te] = float((hsumd(acc) + double(s.Dskip[e]) * xt) * k.gate[sz(t, tail) + size_t(c)]);
    }
  }
}

// chunk_states null: one chunk of L from the zero state (the full-state oracle's schedule).
static void selective_scan_backward_fast(float* dx, float* ddt, float* ddt_bias, float* dA, float* dB,
                                  float* dC, float* dD, float* dz, const float* dy,
                                  const ScanArgs& s, const double* chunk_states, int chunk) {
  const int L = s.L, E = s.E, N = s.N, blocks = E / kDW, tail = E - blocks * kDW;
  if (!chunk_states) chunk = L;
  const std::vector<vd> At = blocked_A(s, blocks);
  // Blocked channels: dB and dC sum over channels, so they gather per-lane partials for the
  // chunk's rows here, reduced across lanes when the chunk is done; dA, dD and the bias gradient
  // are per channel.
  std::vector<vd> dB_v(sz(chunk, N)), dC_v(sz(chunk, N)), dA_v(sz(blocks, N)), g(sz(blocks, N));
  std::vector<vd> dD_v(static_cast<size_t>(blocks)), dbias_v(static_cast<size_t>(blocks));
  std::vector<vd> hs(sz(chunk + 1, N)), as(sz(chunk, N));
  // The remaining channels, one at a time (state dimension in the lanes).
  std::vector<double> dA_acc(sz(E, N), 0.0), dB_acc(sz(L, N), 0.0), dC_acc(sz(L, N), 0.0);
  std::vector<double> dD_acc(size_t(E), 0.0), dbias_acc(size_t(E), 0.0);
  std::vector<double> hs1(sz(chunk + 1, N)), as1(sz(chunk, N)), g1(sz(E, N), 0.0);
  for (int c = G::scan_num_chunks(L, chunk) - 1; c >= 0; --c) {
    const int t0 = c * chunk, len = std::min(chunk, L - t0);
    std::fill(dB_v.begin(), dB_v.end(), vd{});
    std::fill(dC_v.begin(), dC_v.end(), vd{});
    for (int b = 0; b < blocks; ++b) {
      const int e0 = b * kDW;
      const ScanScalars k = scan_scalars(s, e0, kDW, t0, len, true);
      const vd* Ab = &At[sz(b, N)];
      const vd Dv = ldf(s.Dskip + e0);
      for (int n = 0; n < N; ++n)
        for (int l = 0; l < kDW; ++l)
          hs[size_t(n)][l] = chunk_states ? chunk_states[sz(c * E + e0 + l, N) + size_t(n)] : 0.0;
      for (int i = 0; i < len; ++i) {  // recompute h[t0 .. t0+len-1], keeping the decays
        const size_t o = sz(t0 + i, E) + size_t(e0);
        const vd dl = ldf(k.delta + sz(i, kDW)), dlx = dl * ldf(s.x + o);
        const float* Bt = s.B + sz(t0 + i, N);
        for (int n = 0; n < N; ++n) {
          const vd a = vexpd(dl * Ab[n]);
          as[sz(i, N) + size_t(n)] = a;
          hs[sz(i + 1, N) + size_t(n)] = a * hs[sz(i, N) + size_t(n)] + dlx * double(Bt[n]);
        }
      }
      vd* gb = &g[sz(b, N)];
      vd* dAb = &dA_v[sz(b, N)];
      for (int i = len - 1; i >= 0; --i) {
        const int t = t0 + i;
        const size_t o = sz(t, E) + size_t(e0), r = sz(i, kDW);
        const vd dl = ldf(k.delta + r), xt = ldf(s.x + o), dyt = ldf(dy + o);
        const vd *ht = &hs[sz(i + 1, N)], *hp = &hs[sz(i, N)], *ai = &as[sz(i, N)];
        const float *Bt = s.B + sz(t, N), *Ct = s.C + sz(t, N);
        vd ycv{};
        for (int n = 0; n < N; ++n) ycv += ht[n] * double(Ct[n]);
        st8f(dz + o, dyt * (ycv + Dv * xt) * ldf(k.gate_grad + r));  // y = yc * silu(z)
        const vd dyc = dyt * ldf(k.gate + r);
        dD_v[size_t(b)] += dyc * xt;
        vd ddelta{}, dxv{};
        for (int n = 0; n < N; ++n) {
          const double Bn = Bt[n], Cn = Ct[n];
          dC_v[sz(i, N) + size_t(n)] += dyc * ht[n];
          const vd gv = gb[n] + dyc * Cn;  // dL/dh[t], complete
          const vd ahp = ai[n] * hp[n];
          ddelta += gv * (Ab[n] * ahp + Bn * xt);
          dAb[n] += gv * dl * ahp;
          dB_v[sz(i, N) + size_t(n)] += gv * (dl * xt);
          dxv += gv * Bn;
          gb[n] = gv * ai[n];  // dL/dh[t-1] through h[t]
        }
        const vd dpre = ddelta * ldf(k.dsoftplus + r);
        st8f(ddt + o, dpre);
        dbias_v[size_t(b)] += dpre;
        st8f(dx + o, dyc * Dv + dl * dxv);
      }
    }
    for (size_t j = 0; j < sz(len, N); ++j) {
      dB_acc[sz(t0, N) + j] += hsumd(dB_v[j]);
      dC_acc[sz(t0, N) + j] += hsumd(dC_v[j]);
    }
    const ScanScalars k = tail ? scan_scalars(s, blocks * kDW, tail, t0, len, true) : ScanScalars{};
    for (int e = blocks * kDW; e < E; ++e) {
      const int ch = e - blocks * kDW;
      const float* Ae = s.A + sz(e, N);
      if (chunk_states)
        std::copy_n(chunk_states + sz(c * E + e, N), N, hs1.begin());
      else
        std::fill_n(hs1.begin(), N, 0.0);
      for (int i = 0; i < len; ++i) {
        const int t = t0 + i;
        const size_t te = sz(t, E) + size_t(e);
        const double delta = k.delta[sz(i, tail) + size_t(ch)], bx = delta * double(s.x[te]);
        for (int n = 0; n < N; n += kDW) {
          const vd a = vexpd(delta * ldf(Ae + n));
          st(&as1[sz(i, N) + size_t(n)], a);
          st(&hs1[sz(i + 1, N) + size_t(n)],
             a * ld(&hs1[sz(i, N) + size_t(n)]) + bx * ldf(s.B + sz(t, N) + n));
        }
      }
      double* ge = &g1[sz(e, N)];
      for (int i = len - 1; i >= 0; --i) {
        const int t = t0 + i;
        const size_t te = sz(t, E) + size_t(e);
        const size_t r = sz(i, tail) + size_t(ch);
        const double delta = k.delta[r], xt = s.x[te], dyt = dy[te];
        const double *ht = &hs1[sz(i + 1, N)], *hp = &hs1[sz(i, N)], *ai = &as1[sz(i, N)];
        const float *Bt = s.B + sz(t, N), *Ct = s.C + sz(t, N);
        vd ycv{};
        for (int n = 0; n < N; n += kDW) ycv += ld(ht + n) * ldf(Ct + n);
        const double yc = hsumd(ycv) + double(s.Dskip[e]) * xt;
        dz[te] = float(dyt * yc * k.gate_grad[r]);
        const double dyc = dyt * k.gate[r];
        dD_acc[size_t(e)] += dyc * xt;
        vd ddelta{}, dxv{};
        for (int n = 0; n < N; n += kDW) {
          const vd Bv = ldf(Bt + n), a = ld(ai + n), hpv = ld(hp + n);
          double* dCt = &dC_acc[sz(t, N) + size_t(n)];
          st(dCt, ld(dCt) + dyc * ld(ht + n));
          const vd gv = ld(ge + n) + dyc * ldf(Ct + n);
          ddelta += gv * (ldf(Ae + n) * a * hpv + Bv * xt);
          double* dAe = &dA_acc[sz(e, N) + size_t(n)];
          st(dAe, ld(dAe) + gv * delta * a * hpv);
          double* dBt = &dB_acc[sz(t, N) + size_t(n)];
          st(dBt, ld(dBt) + gv * (delta * xt));
          dxv += gv * Bv;
          st(ge + n, gv * a);
        }
        const double dpre = hsumd(ddelta) * k.dsoftplus[r];
        ddt[te] = float(dpre);
        dbias_acc[size_t(e)] += dpre;
        dx[te] = float(dyc * s.Dskip[e] + delta * hsumd(dxv));
      }
    }
  }
  for (size_t i = 0; i < dB_acc.size(); ++i) {
    dB[i] = float(dB_acc[i]);
    dC[i] = float(dC_acc[i]);
  }
  for (int b = 0; b < blocks; ++b)
    for (int l = 0; l < kDW; ++l) {
      const int e = b * kDW + l;
      for (int n = 0; n < N; ++n) dA_acc[sz(e, N) + size_t(n)] = dA_v[sz(b, N) + size_t(n)][l];
      dD_acc[size_t(e)] = dD_v[size_t(b)][l];
      dbias_acc[size_t(e)] = dbias_v[size_t(b)][l];
    }
  for (size_t i = 0; i < dA_acc.size(); ++i) dA[i] += float(dA_acc[i]);
  for (int e = 0; e < E; ++e) {
    dD[e] += float(dD_acc[size_t(e)]);
    ddt_bias[e] += float(dbias_acc[size_t(e)]);
  }
}

// ---------------------------------------------------------------- causal conv + SiLU backward
// ref::grad::conv1d_silu_backward with 16 channels per vector (rows are token-major, so the
// reference's per-channel walk over t strided through memory), one block of channels at a time
// so that the scratch is L x 16 floats. dw and db sum over up to L tokens: float partial sums
// over blocks of kConvBlock tokens, added into double totals, keep that sum's error at the
// float rounding of a 64-term sum.
namespace {
constexpr int kConvBlock = 64;
thread_local simd::FloatBuf t_conv_dpre;
}  // namespace

void conv1d_silu_backward(float* dx, float* dw, float* db, const float* dout, const float* x,
                          const float* w, const float* b, int L, int E, int K) {
  using namespace simd;
  float* dpre = scratch(t_conv_dpre, sz(L, kW));  // [t][lane] for the current channel block
  std::vector<vf> wt(static_cast<size_t>(K));
  for (int e = 0; e < E; e += kW) {
    const int m = std::min(kW, E - e);
    for (int j = 0; j < K; ++j) wt[size_t(j)] = load_strided(w + sz(e, K) + j, K, m);
    for (int t = 0; t < L; ++t) {  // dpre = dout * silu'(pre), pre recomputed
      vf pre = load_n(b + e, m);
      for (int j = std::max(0, K - 1 - t); j < K; ++j)
        pre += wt[size_t(j)] * load_n(x + sz(t - K + 1 + j, E) + e, m);
      const vf sg = 1.0f / (1.0f + vexp(-pre));
      store(dpre + sz(t, kW), load_n(dout + sz(t, E) + e, m) * (sg * (1.0f + pre * (1.0f - sg))));
    }
    for (int t = 0; t < L; ++t) {  // dx[t] = sum_j dpre[t+K-1-j] w[j]: the outputs that read x[t]
      vf acc{};
      for (int j = 0; j < K; ++j)
        if (t + K - 1 - j < L) acc += load(dpre + sz(t + K - 1 - j, kW)) * wt[size_t(j)];
      store_n(dx + sz(t, E) + e, acc, m);
    }
    double db_acc[kW] = {}, dw_acc[kW] = {};
    for (int t0 = 0; t0 < L; t0 += kConvBlock) {
      vf pb{};
      for (int t = t0; t < std::min(L, t0 + kConvBlock); ++t) pb += load(dpre + sz(t, kW));
      for (int c = 0; c < m; ++c) db_acc[c] += pb[c];
    }
    for (int c = 0; c < m; ++c) db[e + c] += float(db_acc[c]);
    for (int j = 0; j < K; ++j) {  // dw[e, j] += sum_t dpre[t] x[t-K+1+j]
      std::fill(dw_acc, dw_acc + kW, 0.0);
      for (int t0 = std::max(0, K - 1 - j); t0 < L; t0 += kConvBlock) {
        vf pw{};
        for (int t = t0; t < std::min(L, t0 + kConvBlock); ++t)
          pw += load(dpre + sz(t, kW)) * load_n(x + sz(t - K + 1 + j, E) + e, m);
        for (int c = 0; c < m; ++c) dw_acc[c] += pw[c];
      }
      for (int c = 0; c < m; ++c) dw[sz(e + c, K) + j] += float(dw_acc[c]);
    }
  }
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
  if (N % kDW == 0)
    selective_scan_forward_fast(a.yg.data(),
                                ScanArgs{a.xc.data(), a.dt.data(), w.dt_b, a.A.data(), a.B.data(),
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
  if (N % kDW == 0)
    selective_scan_backward_fast(dxc.data(), ddt.data(), g.dt_b, dA.data(), dB.data(), dC.data(),
                                 g.Dskip, dz.data(), dyg.data(),
                                 ScanArgs{a.xc.data(), a.dt.data(), w.dt_b, a.A.data(), a.B.data(),
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
thread_local simd::FloatBuf t_scores, t_dscores;

// Row t of P = softmax over keys 0..t of s (scaled scores), in place; keys beyond t set to 0
// so that P V and P^T dO can run over full rows. Returns the row's log-sum-exp.
float softmax_causal_row(float* s, int t, int L) {
  using namespace simd;
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vf neg_inf = splat(-std::numeric_limits<float>::infinity());
  const int n = t + 1;
  vf vm = neg_inf;
  for (int j = 0; j < n; j += kW) vm = vmax(vm, lane < n - j ? load_upto(s + j, n - j) : neg_inf);
  const float mx = hmax(vm);
  vf vs{};
  for (int j = 0; j < n; j += kW) {
    const int m = n - j;
    const vf e = lane < m ? vexp(load_upto(s + j, m) - mx) : vf{};
    store_upto(s + j, e, m);
    vs += e;
  }
  const float sum = hsum(vs), inv = 1.0f / sum;
  for (int j = 0; j < n; j += kW) store_upto(s + j, load_upto(s + j, n - j) * inv, n - j);
  std::fill(s + n, s + L, 0.0f);
  return mx + std::log(sum);
}
}  // namespace

void attention_core_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                            int L, int H, int G, int hd) {
  const int group = H / G, ldq = H * hd, ldkv = G * hd;
  const float scale = 1.0f / std::sqrt(float(hd));
  float* P = simd::scratch(t_scores, sz(std::min(L, kAttnRows), L));
  for (int h = 0; h < H; ++h) {
    const int g = h / group;
    for (int r0 = 0; r0 < L; r0 += kAttnRows) {
      const int rows = std::min(kAttnRows, L - r0), keys = r0 + rows;  // P is rows x keys
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, hd, scale,
                  q + sz(r0, ldq) + h * hd, ldq, k + g * hd, ldkv, 0.0f, P, keys);  // S = scale Q K^T
      for (int i = 0; i < rows; ++i)
        lse[sz(r0 + i, H) + h] = softmax_causal_row(P + sz(i, keys), r0 + i, keys);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, keys, 1.0f, P, keys,
                  v + g * hd, ldkv, 0.0f, out + sz(r0, ldq) + h * hd, ldq);  // O = P V
    }
  }
}

void attention_core_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                             const float* k, const float* v, const float* out, const float* lse,
                             int L, int H, int G, int hd) {
  using namespace simd;
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
        for (int j = 0; j < n; j += kW) {
          const int m = n - j;
          const vf p = vexp(load_upto(pt + j, m) - l);  // P_tj = exp(S_tj - lse_t)
          store_upto(pt + j, p, m);
          store_upto(dst + j, p * (load_upto(dst + j, m) - Dt), m);  // dS = P (dP - D)
        }
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
  using namespace simd;
  // 64 rows of logits at a time: 64 x V floats per thread bounds memory for any vocabulary
  // while each sgemm still has enough rows to run near peak.
  constexpr int kRows = 64;
  const float fscale = float(scale);
  const int Vv = V - V % kW;  // vectorised part of a row
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
      vf vm = splat(-std::numeric_limits<float>::infinity());
      for (int c = 0; c < Vv; c += kW) vm = vmax(vm, load(zi + c));
      float mx = hmax(vm);
      for (int c = Vv; c < V; ++c) mx = std::max(mx, zi[c]);
      const float zt = zi[tgt];
      // exp(z - max) in place; the sum in double across lanes (each lane sums V/16 terms).
      vf vs{};
      for (int c = 0; c < Vv; c += kW) {
        const vf e = vexp(load(zi + c) - mx);
        store(zi + c, e);
        vs += e;
      }
      double se = hsum(vs);
      for (int c = Vv; c < V; ++c) se += double(zi[c] = std::exp(zi[c] - mx));
      loss += double(mx) + std::log(se) - double(zt);  // lse - z_target
      const float f = float(scale / se);  // dz_c = (softmax_c - [c == tgt]) * scale
      for (int c = 0; c < Vv; c += kW) store(zi + c, load(zi + c) * f);
      for (int c = Vv; c < V; ++c) zi[c] *= f;
      zi[tgt] -= fscale;
    }
    gemm_dyW(dhn + sz(r0, D), z.data(), W, nb, V, D, false);  // dhn = dz W
    gemm_dyTx(dW, z.data(), hn + sz(r0, D), nb, V, D);       // dW += dz^T hn
  }
  return loss;
}

}  // namespace hm::cpu::grad
