// The SIMD pieces of the training blocks (grad_cpu.cpp calls them through dispatch.h), compiled
// once per ISA like the inference kernels (simd.h says what that asks of this file).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/simd.h"

namespace hm::cpu::HM_ISA_NS::grad {

using namespace simd;
namespace {
inline size_t sz(int a, int b) { return size_t(a) * size_t(b); }
}  // namespace

// ---------------------------------------------------------------- selective scan (float I/O)
// The reference recurrence (mamba_grad_ref.h) in double vectors whose kDW lanes are kDW
// channels: each state element (e, n) is its own dependency chain, N of them in flight per
// block, and y = h . C needs no horizontal sum. Channels past the last full block run one
// at a time with the state dimension in the lanes. States and decays stay double: with
// delta*A ~ -1e-3 the decay a = exp(delta*A) is ~0.999 and h's error grows like
// err(a) / (1 - a), so a float exp (2e-7) would cost ~1e-4. The backward keeps each recomputed
// decay, so it takes one exp per (t, e, n) instead of two.
// Needs N % kScanGradLanes == 0 (the callers fall back to the reference otherwise).
namespace {

// One register of doubles: kDW lanes (8 on AVX-512, 4 on AVX2, 2 on SSE2), which divides
// kScanGradLanes.
constexpr int kDW = kW / 2;
static_assert(kScanGradLanes % kDW == 0);
typedef double vd __attribute__((vector_size(8 * kDW)));
typedef int64_t vl __attribute__((vector_size(8 * kDW)));
typedef float vdf __attribute__((vector_size(4 * kDW)));  // kDW floats

inline vd ld(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void st(double* p, vd v) { std::memcpy(p, &v, sizeof v); }
inline vd ldf(const float* p) {
  vdf f;
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

using ScanArgs = ScanGradArgs;

inline void st8f(float* p, vd v) {  // 8 doubles rounded into 8 floats
  const vdf f = __builtin_convertvector(v, vdf);
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
Buf<vd> blocked_A(const ScanArgs& s, int blocks) {
  Buf<vd> At(sz(blocks, s.N));
  for (int b = 0; b < blocks; ++b)
    for (int n = 0; n < s.N; ++n)
      for (int l = 0; l < kDW; ++l) At[sz(b, s.N) + size_t(n)][l] = s.A[sz(b * kDW + l, s.N) + size_t(n)];
  return At;
}

}  // namespace

void scan_forward(float* y, const ScanArgs& s, double* chunk_states, int chunk) {
  const int L = s.L, E = s.E, N = s.N, blocks = E / kDW, tail = E - blocks * kDW;
  const Buf<vd> At = blocked_A(s, blocks);
  Buf<vd> h(static_cast<size_t>(N));
  for (int b = 0; b < blocks; ++b) {
    const int e0 = b * kDW;
    const ScanScalars k = scan_scalars(s, e0, kDW, 0, L, false);
    const vd* Ab = &At[sz(b, N)];
    const vd Dv = ldf(s.Dskip + e0);
    std::fill(h.begin(), h.end(), vd{});
    for (int t = 0; t < L; ++t) {
      if (chunk_states && t % chunk == 0)  // [chunk][e][n]: the lanes scatter to kDW rows
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
  Buf<double> hc(static_cast<size_t>(N));  // the remaining channels, one at a time
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
void scan_backward(float* dx, float* ddt, float* ddt_bias, float* dA, float* dB,
                   float* dC, float* dD, float* dz, const float* dy, const ScanArgs& s, const double* chunk_states, int chunk) {
  const int L = s.L, E = s.E, N = s.N, blocks = E / kDW, tail = E - blocks * kDW;
  if (!chunk_states) chunk = L;
  const Buf<vd> At = blocked_A(s, blocks);
  // Blocked channels: dB and dC sum over channels, so they gather per-lane partials for the
  // chunk's rows here, reduced across lanes when the chunk is done; dA, dD and the bias gradient
  // are per channel.
  Buf<vd> dB_v(sz(chunk, N)), dC_v(sz(chunk, N)), dA_v(sz(blocks, N)), g(sz(blocks, N));
  Buf<vd> dD_v(static_cast<size_t>(blocks)), dbias_v(static_cast<size_t>(blocks));
  Buf<vd> hs(sz(chunk + 1, N)), as(sz(chunk, N));
  // The remaining channels, one at a time (state dimension in the lanes).
  Buf<double> dA_acc(sz(E, N), 0.0), dB_acc(sz(L, N), 0.0), dC_acc(sz(L, N), 0.0);
  Buf<double> dD_acc(size_t(E), 0.0), dbias_acc(size_t(E), 0.0);
  Buf<double> hs1(sz(chunk + 1, N)), as1(sz(chunk, N)), g1(sz(E, N), 0.0);
  for (int c = (L + chunk - 1) / chunk - 1; c >= 0; --c) {  // chunks, last first
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

// ---------------------------------------------------------------- Mamba-2 SSD scan backward
// ref::grad::ssd_scan_backward's sums, in double, with the states recomputed per chunk of
// kSsdChunk tokens from checkpoints taken on a first forward walk (the reference keeps all L of
// a head). The loops over the state index n are what vectorizes: per (token, channel p) they
// read and write rows of N doubles and reduce two sums.
namespace {
constexpr int kSsdChunk = 32;
}  // namespace

void ssd_backward(float* dx, int lddx, float* ddt, int lddt_out, float* dB, float* dC, int lddbc, float* ddt_bias,
                  float* dA_log, float* dDskip, const float* dy, int lddy, const SsdGradArgs& a) {
  const int L = a.L, H = a.H, P = a.P, G = a.G, N = a.N, hpg = H / G, GN = G * N;
  const size_t PN = sz(P, N);
  const int nch = (L + kSsdChunk - 1) / kSsdChunk;
  Buf<double> gB(sz(L, GN), 0.0), gC(sz(L, GN), 0.0);  // dB, dC summed over a group's heads
  Buf<double> ck(sz(nch, int(PN))), S(sz(kSsdChunk + 1, int(PN))), Gs(PN), run(PN);
  Buf<double> delta(static_cast<size_t>(L)), ddu(static_cast<size_t>(L)), decay(static_cast<size_t>(L));
  for (int h = 0; h < H; ++h) {
    const int g = h / hpg;
    const double A = -std::exp(double(a.A_log[h])), D = a.Dskip[h];
    for (int t = 0; t < L; ++t) {  // delta = clamp(softplus(dt + bias)); the clamp passes the gradient inside
      const double u = double(a.dt[sz(t, a.lddt) + size_t(h)]) + double(a.dt_bias[h]);
      const double sp = u > 20.0 ? u : std::log1p(std::exp(u));
      const double dl = std::min(std::max(sp, a.dt_min), a.dt_max);
      delta[size_t(t)] = dl;
      ddu[size_t(t)] = (sp >= a.dt_min && sp <= a.dt_max) ? 1.0 / (1.0 + std::exp(-u)) : 0.0;
      decay[size_t(t)] = std::exp(dl * A);
    }
    // The forward walk: the state entering every chunk.
    std::fill(run.begin(), run.end(), 0.0);
    for (int t = 0; t < L; ++t) {
      if (t % kSsdChunk == 0) std::copy(run.begin(), run.end(), ck.begin() + std::ptrdiff_t(sz(t / kSsdChunk, int(PN))));
      const float* Bt = a.B + sz(t, a.ldbc) + sz(g, N);
      const double dec = decay[size_t(t)], dl = delta[size_t(t)];
      for (int p = 0; p < P; ++p) {
        const double cx = dl * double(a.x[sz(t, a.ldx) + sz(h, P) + size_t(p)]);
        double* r = &run[sz(p, N)];
#pragma omp simd
        for (int n = 0; n < N; ++n) r[n] = dec * r[n] + cx * double(Bt[n]);
      }
    }
    std::fill(Gs.begin(), Gs.end(), 0.0);  // dL/dS, carried down
    double dA = 0, dDacc = 0, dbias = 0;
    for (int c = nch - 1; c >= 0; --c) {
      const int t0 = c * kSsdChunk, len = std::min(kSsdChunk, L - t0);
      std::copy(ck.begin() + std::ptrdiff_t(sz(c, int(PN))), ck.begin() + std::ptrdiff_t(sz(c + 1, int(PN))),
                S.begin());
      for (int i = 0; i < len; ++i) {  // S[i + 1]: the state after token t0 + i
        const int t = t0 + i;
        const float* Bt = a.B + sz(t, a.ldbc) + sz(g, N);
        const double dec = decay[size_t(t)], dl = delta[size_t(t)];
        for (int p = 0; p < P; ++p) {
          const double cx = dl * double(a.x[sz(t, a.ldx) + sz(h, P) + size_t(p)]);
          const double* prev = &S[sz(i, int(PN)) + sz(p, N)];
          double* cur = &S[sz(i + 1, int(PN)) + sz(p, N)];
#pragma omp simd
          for (int n = 0; n < N; ++n) cur[n] = dec * prev[n] + cx * double(Bt[n]);
        }
      }
      for (int i = len - 1; i >= 0; --i) {
        const int t = t0 + i;
        const float *Bt = a.B + sz(t, a.ldbc) + sz(g, N), *Ct = a.C + sz(t, a.ldbc) + sz(g, N);
        const double dec = decay[size_t(t)], dl = delta[size_t(t)];
        double* gCt = &gC[sz(t, GN) + sz(g, N)];
        double* gBt = &gB[sz(t, GN) + sz(g, N)];
        double ddelta = 0, dprev = 0;  // sum G . (x B^T), sum G . S_{t-1}
        for (int p = 0; p < P; ++p) {
          const size_t xo = sz(t, a.ldx) + sz(h, P) + size_t(p);
          const double gy = dy[sz(t, lddy) + sz(h, P) + size_t(p)], xt = a.x[xo];
          dDacc += gy * xt;  // y += D x
          double* Gp = &Gs[sz(p, N)];
          const double* cur = &S[sz(i + 1, int(PN)) + sz(p, N)];
          const double* prev = &S[sz(i, int(PN)) + sz(p, N)];
          const double dlx = dl * xt;
          double gb = 0, gp = 0;
#pragma omp simd reduction(+ : gb, gp)
          for (int n = 0; n < N; ++n) {
            const double Gn = Gp[n] + gy * double(Ct[n]);  // y = S_t C_t
            gCt[n] += gy * cur[n];
            gb += Gn * double(Bt[n]);  // S_t += delta x B^T: dx, d delta
            gBt[n] += dlx * Gn;
            gp += Gn * prev[n];
            Gp[n] = Gn * dec;  // S_t = exp(delta A) S_{t-1}
          }
          dx[sz(t, lddx) + sz(h, P) + size_t(p)] = float(D * gy + dl * gb);
          ddelta += xt * gb;
          dprev += gp;
        }
        ddelta += dprev * dec * A;  // d exp(delta A) = exp(delta A) (A d delta + delta dA)
        dA += dprev * dec * dl;
        const double du = ddelta * ddu[size_t(t)];
        ddt[sz(t, lddt_out) + size_t(h)] = float(du);
        dbias += du;
      }
    }
    ddt_bias[h] += float(dbias);
    dA_log[h] += float(dA * A);  // A = -exp(A_log)
    dDskip[h] += float(dDacc);
  }
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < GN; ++j) {
      dB[sz(t, lddbc) + size_t(j)] = float(gB[sz(t, GN) + size_t(j)]);
      dC[sz(t, lddbc) + size_t(j)] = float(gC[sz(t, GN) + size_t(j)]);
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
  float* dpre = scratch(t_conv_dpre, sz(L, kW));  // [t][lane] for the current channel block
  Buf<vf> wt(static_cast<size_t>(K));
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

// Row t of P = softmax over keys 0..t of s (scaled scores), in place; keys beyond t set to 0
// so that P V and P^T dO can run over full rows. Returns the row's log-sum-exp.
float softmax_causal_row(float* s, int t, int L) {
  const vi lane = iota();
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

void softmax_grad_row(float* p, float* ds, int n, float lse, float D) {
  for (int j = 0; j < n; j += kW) {
    const int m = n - j;
    const vf e = vexp(load_upto(p + j, m) - lse);
    store_upto(p + j, e, m);
    store_upto(ds + j, e * (load_upto(ds + j, m) - D), m);
  }
}

double cross_entropy_row(float* zi, int V, int tgt, double scale) {
  const int Vv = V - V % kW;  // vectorised part of a row
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
  const double loss = double(mx) + std::log(se) - double(zt);  // lse - z_target
  const float f = float(scale / se);  // dz_c = (softmax_c - [c == tgt]) * scale
  for (int c = 0; c < Vv; c += kW) store(zi + c, load(zi + c) * f);
  for (int c = Vv; c < V; ++c) zi[c] *= f;
  zi[tgt] -= float(scale);
  return loss;
}

}  // namespace hm::cpu::HM_ISA_NS::grad
