// Mamba-2 kernels on the CPU: the SSD scan in its chunked form, and the gated RMSNorm.
//
// Mamba-2's decay is one scalar per head and token, so within a chunk of Q tokens the scan is
// a masked "attention" (the state-space dual): with cs the running sum of delta*A over the chunk,
//   y[t]  = exp(cs[t]) * (S C[t])                                   the carried state
//         + sum_{s<=t} (C[t].B[s]) exp(cs[t] - cs[s]) delta[s] x[s]  the diagonal block
//         + D x[t]
//   S_new = exp(cs[Q-1]) S + sum_s exp(cs[Q-1] - cs[s]) delta[s] x[s] (outer) B[s].
// C[t].B[s] depends on the group only, so it is computed once per (chunk, group) and shared by
// the group's heads; every exp argument is <= 0, so nothing overflows. Heads run in parallel.
// A few tokens (decoding) take the recurrence itself, token by token: the one-step update.
// Both are exact against ref::ssd_scan to float rounding (tests/test_kernels.cpp).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "kernels/ops.h"

namespace hm::cpu {
namespace {

constexpr int kChunk = 64;           // tokens per chunk (math-neutral)
constexpr int kDirectMaxTokens = 4;  // up to this many tokens: the recurrence, token by token
constexpr long kParallelWork = 1L << 15;  // state updates (L*H*P*N) worth a parallel region

using Idx = std::ptrdiff_t;

struct SsdArgs {
  float* y;
  int ldy;
  float* state;
  const float* x;
  int ldx;
  const float* dt;
  int lddt;
  const float* dt_bias;
  const float* A;
  const float* B;
  const float* C;
  int ldbc;
  const float* Dskip;
  int L, H, P, G, N;
  float dt_min, dt_max;
};

float delta_of(const SsdArgs& a, int t, int h) {
  const float v = a.dt[Idx(t) * a.lddt + h] + a.dt_bias[h];
  const float sp = v > 20.0f ? v : std::log1p(std::exp(v));
  return std::min(std::max(sp, a.dt_min), a.dt_max);
}

// The recurrence for head h over all L tokens (s = exp(delta A) s + delta x B; y = s C + D x).
void head_direct(const SsdArgs& a, int h) {
  const int P = a.P, N = a.N, g = h / (a.H / a.G);
  float* S = a.state + Idx(h) * P * N;
  for (int t = 0; t < a.L; ++t) {
    const float delta = delta_of(a, t, h), decay = std::exp(delta * a.A[h]);
    const float* Bt = a.B + Idx(t) * a.ldbc + Idx(g) * N;
    const float* Ct = a.C + Idx(t) * a.ldbc + Idx(g) * N;
    const float* xt = a.x + Idx(t) * a.ldx + Idx(h) * P;
    float* yt = a.y + Idx(t) * a.ldy + Idx(h) * P;
    for (int p = 0; p < P; ++p) {
      float* s = S + Idx(p) * N;
      const float dx = delta * xt[p];
      float acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int n = 0; n < N; ++n) {
        s[n] = decay * s[n] + dx * Bt[n];
        acc += s[n] * Ct[n];
      }
      yt[p] = acc + a.Dskip[h] * xt[p];
    }
  }
}

// Head h, chunk by chunk. cb: C[t].B[s] of every chunk and group, [chunk][G][kChunk][kChunk].
void head_chunked(const SsdArgs& a, int h, const float* cb, std::vector<float>& scratch) {
  const int P = a.P, N = a.N, g = h / (a.H / a.G);
  float* S = a.state + Idx(h) * P * N;
  scratch.resize(size_t(kChunk) * (P + 3));
  float* xd = scratch.data();            // [kChunk][P]: delta[s] * x[s]
  float* cs = xd + Idx(kChunk) * P;      // running sum of delta * A within the chunk
  float* w = cs + kChunk;                // exp(cs[q-1] - cs[s])
  float* dl = w + kChunk;                // delta
  for (int c0 = 0, chunk = 0; c0 < a.L; c0 += kChunk, ++chunk) {
    const int q = std::min(kChunk, a.L - c0);
    const float* cbc = cb + (Idx(chunk) * a.G + g) * kChunk * kChunk;
    float run = 0;
    for (int t = 0; t < q; ++t) {
      dl[t] = delta_of(a, c0 + t, h);
      run += dl[t] * a.A[h];
      cs[t] = run;
      const float* xt = a.x + Idx(c0 + t) * a.ldx + Idx(h) * P;
      for (int p = 0; p < P; ++p) xd[Idx(t) * P + p] = dl[t] * xt[p];
    }
    for (int t = 0; t < q; ++t) {
      const float* Ct = a.C + Idx(c0 + t) * a.ldbc + Idx(g) * N;
      const float* xt = a.x + Idx(c0 + t) * a.ldx + Idx(h) * P;
      float* yt = a.y + Idx(c0 + t) * a.ldy + Idx(h) * P;
      const float carried = std::exp(cs[t]);
      for (int p = 0; p < P; ++p) {
        const float* s = S + Idx(p) * N;
        float acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int n = 0; n < N; ++n) acc += s[n] * Ct[n];
        yt[p] = carried * acc + a.Dskip[h] * xt[p];
      }
      for (int s = 0; s <= t; ++s) {
        const float m = cbc[Idx(t) * kChunk + s] * std::exp(cs[t] - cs[s]);
        const float* xs = xd + Idx(s) * P;
#pragma omp simd
        for (int p = 0; p < P; ++p) yt[p] += m * xs[p];
      }
    }
    const float last = cs[q - 1];
    for (int s = 0; s < q; ++s) w[s] = std::exp(last - cs[s]);
    const float keep = std::exp(last);
    for (int p = 0; p < P; ++p) {
      float* sp = S + Idx(p) * N;
#pragma omp simd
      for (int n = 0; n < N; ++n) sp[n] *= keep;
      for (int s = 0; s < q; ++s) {
        const float f = w[s] * xd[Idx(s) * P + p];
        const float* Bs = a.B + Idx(c0 + s) * a.ldbc + Idx(g) * N;
#pragma omp simd
        for (int n = 0; n < N; ++n) sp[n] += f * Bs[n];
      }
    }
  }
}

}  // namespace

void ssd_scan(float* y, int ldy, float* state, const float* x, int ldx, const float* dt, int lddt,
              const float* dt_bias, const float* A, const float* B, const float* C, int ldbc,
              const float* Dskip, int L, int H, int P, int G, int N, float dt_min, float dt_max) {
  if (L <= 0) return;
  const SsdArgs a{y, ldy, state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, L, H, P, G, N, dt_min, dt_max};
  const bool parallel = long(L) * H * P * N >= kParallelWork && H > 1;
  if (L <= kDirectMaxTokens) {
#pragma omp parallel for if (parallel)
    for (int h = 0; h < H; ++h) head_direct(a, h);
    return;
  }
  const int n_chunks = (L + kChunk - 1) / kChunk;
  std::vector<float> cb(size_t(n_chunks) * G * kChunk * kChunk);
#pragma omp parallel for collapse(2) if (parallel)
  for (int c = 0; c < n_chunks; ++c)
    for (int g = 0; g < G; ++g) {
      const int c0 = c * kChunk, q = std::min(kChunk, L - c0);
      float* out = cb.data() + (Idx(c) * G + g) * kChunk * kChunk;
      for (int t = 0; t < q; ++t) {
        const float* Ct = C + Idx(c0 + t) * ldbc + Idx(g) * N;
        for (int s = 0; s <= t; ++s) {
          const float* Bs = B + Idx(c0 + s) * ldbc + Idx(g) * N;
          float acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int n = 0; n < N; ++n) acc += Ct[n] * Bs[n];
          out[Idx(t) * kChunk + s] = acc;
        }
      }
    }
#pragma omp parallel if (parallel)
  {
    std::vector<float> scratch;
#pragma omp for
    for (int h = 0; h < H; ++h) head_chunked(a, h, cb.data(), scratch);
  }
}

void gated_rmsnorm(float* out, int ldo, const float* y, int ldy, const float* z, int ldz,
                   const float* w, int n, int E, int group, float eps) {
#pragma omp parallel for if (long(n) * E >= (1L << 16))
  for (int i = 0; i < n; ++i) {
    float* o = out + Idx(i) * ldo;
    const float* yi = y + Idx(i) * ldy;
    const float* zi = z + Idx(i) * ldz;
#pragma omp simd
    for (int j = 0; j < E; ++j) o[j] = yi[j] * (zi[j] / (1.0f + std::exp(-zi[j])));  // y * silu(z)
    for (int j0 = 0; j0 < E; j0 += group) {
      float ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int j = j0; j < j0 + group; ++j) ss += o[j] * o[j];
      const float r = 1.0f / std::sqrt(ss / float(group) + eps);
#pragma omp simd
      for (int j = j0; j < j0 + group; ++j) o[j] = o[j] * r * w[j];
    }
  }
}

}  // namespace hm::cpu
