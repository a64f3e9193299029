// Mamba-1 selective scan for training: the forward that saves one state per chunk and the
// backward that recomputes the states in between (mamba_grad.h; the math of
// ref::grad::selective_scan_forward / scan_step_backward).
//
// Per channel e and state n: h_t = a_t h_{t-1} + delta_t B[t,n] x[t,e], a_t = exp(delta_t A[e,n]).
// The adjoint g_t = dL/dh_t = dyc_t C[t,n] + a_{t+1} g_{t+1} needs no state, so both directions
// split into groups of kScanGroup tokens the same way: each group is scanned from zero (its end
// state, or its start adjoint, and its sum of delta), a pass over the groups of a sequence
// carries the true value across them (the end is P s_in + S with P = exp(A sum delta)), and a
// last pass runs every group from its true start. That keeps the SMs busy at small batch.
//
// Threads: kNpl = 4 states of one channel per thread (n = q + NL k for lane q of the channel's
// NL lanes), so sums over n are NL-lane shuffles; CPB channels per block. dB and dC sum over
// channels: a reduce-scatter over the channels of a warp, then over the warps of the block in
// shared memory, gives one part per block of channels, which a last kernel adds up in order.
#include <cuda_pipeline_primitives.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mamba_grad.h"

namespace hm::cuda {
namespace {

constexpr int kNpl = 4;                     // states per thread
constexpr int kSub = 8;                     // tokens whose states the backward holds at once
constexpr int kMaxSub = kScanGroup / kSub;  // sub-chunks per group

template <int NM>
struct Cfg {
  static constexpr int NL = NM / kNpl;              // lanes per channel: 4 or 16
  static constexpr int TPB = NM == 16 ? 256 : 128;  // threads per block
  static constexpr int CPB = TPB / NL;              // channels per block
  static constexpr int CW = 32 / NL;                // channels per warp
  static constexpr int W = TPB / 32;                // warps per block
  static constexpr int RV = 2 * kNpl / CW;          // dB, dC sums a lane holds after the reduce-scatter
  static_assert(RV >= 1 && NL <= 32 && W * 32 == TPB, "layout");
};

// The fast forms the inference scan uses: exp2f (one MUFU op, 2 ulp) for the decay
// a = 2^(delta A log2 e), __expf where a relative error of a few 1e-7 is far below the bounds;
// log1p keeps a small delta accurate.
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float sigmoid(float v) { return __fdividef(1.0f, 1.0f + __expf(-v)); }
// 2^v as the one MUFU op alone: exp2f adds a fix-up (3 more instructions) for results below
// 2^-126, which this flushes to 0; a decay that small leaves nothing of the state either way.
__device__ __forceinline__ float fexp2(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ float softplus_acc(float v) { return v > 20.0f ? v : log1pf(__expf(v)); }

// Sum over the NL lanes of a channel (adjacent lanes); every lane gets the sum.
template <int NL>
__device__ __forceinline__ float lane_sum(float v) {
#pragma unroll
  for (int o = 1; o < NL; o *= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Reduce-scatter of V values over the lanes that differ in bits O, O/2, .., NL (the channels of
// a warp): afterwards v[0 .. V*NL/32) of lane l holds the sums of values
// (l / NL) * (V*NL/32) + j over those lanes.
template <int H, int O, int NL, int V>
__device__ __forceinline__ void reduce_scatter(float (&v)[V], int lane) {
  if constexpr (O >= NL) {
    const bool up = (lane & O) != 0;
#pragma unroll
    for (int i = 0; i < H; ++i) {
      const float send = up ? v[i] : v[i + H];
      const float keep = up ? v[i + H] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
    reduce_scatter<H / 2, O / 2, NL, V>(v, lane);
  }
}

__host__ __device__ inline int groups_per_chunk(int chunk) { return ceil_div(chunk, kScanGroup); }
// Groups of a sequence of L tokens: each chunk cut into pieces of kScanGroup.
__host__ __device__ inline int groups_of(int L, int chunk) {
  return (L / chunk) * groups_per_chunk(chunk) + ceil_div(L % chunk, kScanGroup);
}
struct Group {
  int ci, t0, len;  // its chunk, first token and length in the sequence
};
__device__ __forceinline__ Group group_at(int g, int L, int chunk) {
  const int gpc = groups_per_chunk(chunk), ci = g / gpc, gi = g % gpc;
  Group r;
  r.ci = ci;
  r.t0 = ci * chunk + gi * kScanGroup;
  r.len = min(min(kScanGroup, chunk - gi * kScanGroup), L - r.t0);
  return r;
}

// The per-thread view of one channel: its index (clamped for idle lanes, which compute on
// channel 0 and store nothing), its lane, A and Dskip (dt_bias is staged with dt).
template <class T, int NM>
struct Chan {
  int e, ec, q;
  bool on;
  float A[kNpl], A2[kNpl];  // A[e, n] and A[e, n] log2 e
  float dsk;
  __device__ Chan(const float* Aall, const T* Dskip, int E, int N) {
    using K = Cfg<NM>;
    q = threadIdx.x % K::NL;
    e = blockIdx.x * K::CPB + threadIdx.x / K::NL;
    on = e < E;
    ec = on ? e : 0;
#pragma unroll
    for (int k = 0; k < kNpl; ++k) {
      const int n = q + K::NL * k;
      A[k] = n < N ? Aall[size_t(ec) * N + n] : 0.0f;  // 0 past N: those states stay 0
      A2[k] = A[k] * kLog2e;
    }
    dsk = to_f(Dskip[ec]);
  }
  __device__ int n(int k) const { return q + Cfg<NM>::NL * k; }
};

// B[r, n] (or C) of this thread's states, 0 past N.
template <class T, int NM>
__device__ __forceinline__ void load_states(float (&v)[kNpl], const T* P, size_t r, int ldbc, int q, int N) {
#pragma unroll
  for (int k = 0; k < kNpl; ++k) {
    const int n = q + Cfg<NM>::NL * k;
    v[k] = n < N ? to_f(P[r * ldbc + n]) : 0.0f;
  }
}

// One forward step of row r: h = exp(delta A) h + delta B x.
template <class T, int NM>
__device__ __forceinline__ void step_forward(float (&h)[kNpl], const Chan<T, NM>& c, const ScanTrainIn<T>& in,
                                             size_t r, float delta, int N) {
  const float xv = to_f(in.x[r * in.ldx + c.ec]);
  float Bv[kNpl];
  load_states<T, NM>(Bv, in.B, r, in.ldbc, c.q, N);
#pragma unroll
  for (int k = 0; k < kNpl; ++k) h[k] = fexp2(delta * c.A2[k]) * h[k] + delta * Bv[k] * xv;
}

// pre = dt + dt_bias and delta = softplus(pre) of rows [row, row + n) (n <= kSub) for the block's
// channels, into sPre / sDelta [i * CPB + channel]: once per channel, not once per lane. Every
// thread of the block calls it (it synchronizes).
template <class T, int NM>
__device__ __forceinline__ void stage_delta(float* sPre, float* sDelta, const ScanTrainIn<T>& in, int row, int n,
                                            int E) {
  using K = Cfg<NM>;
  __syncthreads();  // the previous rows are consumed
  for (int idx = threadIdx.x; idx < n * K::CPB; idx += K::TPB) {
    const int i = idx / K::CPB, e = blockIdx.x * K::CPB + idx % K::CPB;
    const float pre = e < E ? to_f(in.dt[size_t(row + i) * in.lddt + e]) + to_f(in.dt_bias[e]) : 0.0f;
    sPre[idx] = pre;
    sDelta[idx] = softplus_acc(pre);
  }
  __syncthreads();
}

// Group-level passes of the forward. kLocal: scan the group from zero, write its end state and
// sum of delta to ws_state / ws_sum [group, e]. kOut: scan from the true start state (ws_state
// after train_carry_kernel) and write y.
enum FwdPass { kLocal, kOut };
template <class T, int NM, FwdPass P>
__global__ void __launch_bounds__(Cfg<NM>::TPB) train_fwd_kernel(T* __restrict__ y, int ldy, const ScanTrainIn<T> in,
                                                                  const float* __restrict__ A,
                                                                  const int32_t* __restrict__ cu,
                                                                  const int32_t* __restrict__ goff, int E, int N,
                                                                  int chunk, float* ws_state, float* ws_sum) {
  __shared__ float sPre[kSub * Cfg<NM>::CPB], sDelta[kSub * Cfg<NM>::CPB];
  const int g = blockIdx.y, s = blockIdx.z;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  if (g >= groups_of(L, chunk)) return;  // uniform over the block
  const Group gr = group_at(g, L, chunk);
  const Chan<T, NM> c(A, in.Dskip, E, N);
  const int ch = threadIdx.x / Cfg<NM>::NL;
  const size_t gi = size_t(goff[s] + g) * E + c.ec;  // [group, e]
  float h[kNpl];
#pragma unroll
  for (int k = 0; k < kNpl; ++k) h[k] = P == kOut && c.n(k) < N ? ws_state[gi * N + c.n(k)] : 0.0f;
  float sum_delta = 0.0f;
  for (int i = 0; i < gr.len; ++i) {
    const size_t r = size_t(row0 + gr.t0 + i);
    if (i % kSub == 0) stage_delta<T, NM>(sPre, sDelta, in, row0 + gr.t0 + i, min(kSub, gr.len - i), E);
    const float delta = sDelta[(i % kSub) * Cfg<NM>::CPB + ch];
    step_forward<T, NM>(h, c, in, r, delta, N);
    if constexpr (P == kOut) {
      float Cv[kNpl];
      load_states<T, NM>(Cv, in.C, r, in.ldbc, c.q, N);
      float acc = 0.0f;
#pragma unroll
      for (int k = 0; k < kNpl; ++k) acc += h[k] * Cv[k];
      acc = lane_sum<Cfg<NM>::NL>(acc);  // yc = h . C + D x; y = yc silu(z)
      if (c.on && c.q == 0) {
        const float xv = to_f(in.x[r * in.ldx + c.e]);
        y[r * ldy + c.e] = from_f<T>((acc + c.dsk * xv) * silu(to_f(in.z[r * in.ldz + c.e])));
      }
    } else {
      sum_delta += delta;
    }
  }
  if (P == kLocal && c.on) {
#pragma unroll
    for (int k = 0; k < kNpl; ++k)
      if (c.n(k) < N) ws_state[gi * N + c.n(k)] = h[k];
    if (c.q == 0) ws_sum[gi] = sum_delta;
  }
}

// One thread per (sequence, e * N + n) walks the sequence's groups in order: the end-state parts
// in ws_state become each group's true start state, and the state entering each chunk goes to
// `saved` (entry coff[s] + chunk).
__global__ void train_carry_kernel(float* __restrict__ saved, const float* __restrict__ A,
                                   const int32_t* __restrict__ cu, const int32_t* __restrict__ coff,
                                   const int32_t* __restrict__ goff, int E, int N, int chunk,
                                   float* __restrict__ ws_state, const float* __restrict__ ws_sum) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= E * N) return;
  const int s = blockIdx.y, e = idx / N;
  const int ng = groups_of(cu[s + 1] - cu[s], chunk), gpc = groups_per_chunk(chunk);
  const float a = A[idx];
  float st = 0.0f;  // every sequence starts from zero
  for (int g = 0; g < ng; ++g) {
    const size_t w = size_t(goff[s] + g) * E;
    if (g % gpc == 0) saved[size_t(coff[s] + g / gpc) * E * N + idx] = st;
    float* ws = ws_state + w * N + idx;
    const float local = *ws;
    *ws = st;
    st = fexp2(a * kLog2e * ws_sum[w + e]) * st + local;
  }
}

// Backward pass 1: each group from its end with a zero adjoint coming in: the adjoint it
// passes to the group before (ws_g) and its sum of delta (ws_sum), [group, e].
template <class T, int NM>
__global__ void __launch_bounds__(Cfg<NM>::TPB) grad_local_kernel(const T* __restrict__ dy, int lddy,
                                                                   const ScanTrainIn<T> in, const float* __restrict__ A,
                                                                   const int32_t* __restrict__ cu,
                                                                   const int32_t* __restrict__ goff, int E, int N,
                                                                   int chunk, float* ws_g, float* ws_sum) {
  __shared__ float sPre[kSub * Cfg<NM>::CPB], sDelta[kSub * Cfg<NM>::CPB];
  const int g = blockIdx.y, s = blockIdx.z;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  if (g >= groups_of(L, chunk)) return;
  const Group gr = group_at(g, L, chunk);
  const Chan<T, NM> c(A, in.Dskip, E, N);
  const int ch = threadIdx.x / Cfg<NM>::NL;
  float gk[kNpl] = {};
  float sum_delta = 0.0f;
  for (int i = gr.len - 1; i >= 0; --i) {
    const size_t r = size_t(row0 + gr.t0 + i);
    const int i0 = i / kSub * kSub;  // the staged rows: the sub-chunk holding i
    if (i == gr.len - 1 || i % kSub == kSub - 1)
      stage_delta<T, NM>(sPre, sDelta, in, row0 + gr.t0 + i0, min(kSub, gr.len - i0), E);
    const float delta = sDelta[(i - i0) * Cfg<NM>::CPB + ch];
    const float zv = to_f(in.z[r * in.ldz + c.ec]), dyc = to_f(dy[r * lddy + c.ec]) * zv * sigmoid(zv);
    float Cv[kNpl];
    load_states<T, NM>(Cv, in.C, r, in.ldbc, c.q, N);
#pragma unroll
    for (int k = 0; k < kNpl; ++k) gk[k] = (gk[k] + dyc * Cv[k]) * fexp2(delta * c.A2[k]);
    sum_delta += delta;
  }
  if (!c.on) return;
  const size_t gi = size_t(goff[s] + g) * E + c.e;
#pragma unroll
  for (int k = 0; k < kNpl; ++k)
    if (c.n(k) < N) ws_g[gi * N + c.n(k)] = gk[k];
  if (c.q == 0) ws_sum[gi] = sum_delta;
}

// Backward pass 2: one thread per (sequence, e * N + n) walks the groups in reverse; ws_g
// becomes the adjoint coming into each group from the ones after it.
__global__ void grad_carry_kernel(const float* __restrict__ A, const int32_t* __restrict__ cu,
                                  const int32_t* __restrict__ goff, int E, int N, int chunk, float* __restrict__ ws_g,
                                  const float* __restrict__ ws_sum) {
  constexpr int kB = 8;  // groups whose loads are in flight at once (the chain itself is serial)
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= E * N) return;
  const int s = blockIdx.y, e = idx / N;
  const int ng = groups_of(cu[s + 1] - cu[s], chunk);
  const float a2 = A[idx] * kLog2e;
  float gin = 0.0f;
  for (int g0 = ng - 1; g0 >= 0; g0 -= kB) {
    float local[kB], sum[kB];
#pragma unroll
    for (int j = 0; j < kB; ++j) {
      const size_t w = size_t(goff[s] + max(g0 - j, 0)) * E;
      local[j] = ws_g[w * N + idx];
      sum[j] = ws_sum[w + e];
    }
#pragma unroll
    for (int j = 0; j < kB; ++j) {
      if (g0 - j < 0) break;
      ws_g[size_t(goff[s] + g0 - j) * E * N + idx] = gin;
      gin = fexp2(a2 * sum[j]) * gin + local[j];
    }
  }
}

// Backward pass 3, one group per block (ref::grad::scan_step_backward at every token, in
// reverse). Writes dx, ddt, dz; dB and dC sums of this block's channels to part_bc
// [blockIdx.x, row, 0 | 1, NM]; dA sums to ws_g (each thread overwrites the adjoint it read);
// ddt_bias and Dskip sums to part_e [group, 0 | 1, E].
template <class T, int NM>
__global__ void __launch_bounds__(Cfg<NM>::TPB) grad_kernel(
    const ScanTrainGrad<T, float> gr_out, const T* __restrict__ dy, int lddy, const float* __restrict__ saved,
    const ScanTrainIn<T> in, const float* __restrict__ A, const int32_t* __restrict__ cu,
    const int32_t* __restrict__ coff, const int32_t* __restrict__ goff, int E, int N, int chunk, int n_tokens,
    float* ws_g, float* __restrict__ part_e, float* __restrict__ part_bc) {
  using K = Cfg<NM>;
  __shared__ float stash[kSub * kNpl * K::TPB];     // [i][k][thread]: the sub-chunk's states
  __shared__ float red[kSub * K::W * 32 * K::RV];   // [i][warp][lane][j]: dB, dC per warp
  __shared__ float sPre[kSub * K::CPB], sDelta[kSub * K::CPB];
  const int g = blockIdx.y, s = blockIdx.z, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  if (g >= groups_of(L, chunk)) return;
  const Group gr = group_at(g, L, chunk);
  const Chan<T, NM> c(A, in.Dskip, E, N);
  const int ch = tid / K::NL;
  // n <= kSub rows from row r0 forward (before the group, or a sub-chunk), keeping no states.
  auto walk = [&](float (&st)[kNpl], int r0, int n) {
    stage_delta<T, NM>(sPre, sDelta, in, r0, n, E);
#pragma unroll 1
    for (int i = 0; i < n; ++i) step_forward<T, NM>(st, c, in, size_t(r0 + i), sDelta[i * K::CPB + ch], N);
  };

  // The state entering the group: the chunk's saved state, walked to the group's first token.
  float h[kNpl];
  const size_t ci = size_t(coff[s] + gr.ci) * E + c.ec;
#pragma unroll
  for (int k = 0; k < kNpl; ++k) h[k] = c.n(k) < N ? saved[ci * N + c.n(k)] : 0.0f;
  for (int t = gr.ci * chunk; t < gr.t0; t += kSub) walk(h, row0 + t, min(kSub, gr.t0 - t));
  // The state entering each sub-chunk (registers: constant indices after unrolling).
  const int nsub = ceil_div(gr.len, kSub);
  float sub[kMaxSub][kNpl];
#pragma unroll
  for (int j = 0; j < kMaxSub; ++j) {
#pragma unroll
    for (int k = 0; k < kNpl; ++k) sub[j][k] = h[k];
    if (j + 1 < nsub) walk(h, row0 + gr.t0 + j * kSub, kSub);
  }

  const size_t gi = size_t(goff[s] + g) * E + c.ec;
  float gk[kNpl], dA[kNpl] = {};  // gk: dL/dh from the tokens after, through their a
#pragma unroll
  for (int k = 0; k < kNpl; ++k) gk[k] = c.n(k) < N ? ws_g[gi * N + c.n(k)] : 0.0f;
  float ddtb = 0.0f, dD = 0.0f;
#pragma unroll
  for (int j = kMaxSub - 1; j >= 0; --j) {
    if (j >= nsub) continue;  // uniform over the block
    const int ts = gr.t0 + j * kSub, slen = min(kSub, gr.len - j * kSub);
    float hp[kNpl];
#pragma unroll
    for (int k = 0; k < kNpl; ++k) hp[k] = sub[j][k];
    stage_delta<T, NM>(sPre, sDelta, in, row0 + ts, slen, E);
#pragma unroll 1
    for (int i = 0; i < slen; ++i) {
      step_forward<T, NM>(hp, c, in, size_t(row0 + ts + i), sDelta[i * K::CPB + ch], N);
#pragma unroll
      for (int k = 0; k < kNpl; ++k) stash[(i * kNpl + k) * K::TPB + tid] = hp[k];
    }
#pragma unroll 1
    for (int i = slen - 1; i >= 0; --i) {
      const size_t r = size_t(row0 + ts + i);
      float ht[kNpl], hv[kNpl];  // h[t], h[t-1]
#pragma unroll
      for (int k = 0; k < kNpl; ++k) {
        ht[k] = stash[(i * kNpl + k) * K::TPB + tid];
        hv[k] = i > 0 ? stash[((i - 1) * kNpl + k) * K::TPB + tid] : sub[j][k];
      }
      const float pre = sPre[i * K::CPB + ch], delta = sDelta[i * K::CPB + ch];
      const float xv = to_f(in.x[r * in.ldx + c.ec]), zv = to_f(in.z[r * in.ldz + c.ec]);
      const float dyv = to_f(dy[r * lddy + c.ec]);
      float Bv[kNpl], Cv[kNpl];
      load_states<T, NM>(Bv, in.B, r, in.ldbc, c.q, N);
      load_states<T, NM>(Cv, in.C, r, in.ldbc, c.q, N);
      float yc = 0.0f;
#pragma unroll
      for (int k = 0; k < kNpl; ++k) yc += ht[k] * Cv[k];
      yc = lane_sum<K::NL>(yc) + c.dsk * xv;                      // yc = h[t] . C[t] + D x
      const float sz = sigmoid(zv), dyc = dyv * zv * sz;           // y = yc silu(z)
      dD += dyc * xv;
      float v[2 * kNpl];  // dB, then dC, of this thread's states
      float ddelta = 0.0f, dxs = 0.0f;
#pragma unroll
      for (int k = 0; k < kNpl; ++k) {
        v[kNpl + k] = dyc * ht[k];                                 // dC[t,n] += dyc h[t]
        gk[k] += dyc * Cv[k];                                      // dL/dh[t], complete
        const float a = fexp2(delta * c.A2[k]);                    // h[t] = a h[t-1] + delta B x
        ddelta += gk[k] * (c.A[k] * a * hv[k] + Bv[k] * xv);
        dA[k] += gk[k] * delta * a * hv[k];
        v[k] = gk[k] * delta * xv;                                 // dB[t,n]
        dxs += gk[k] * delta * Bv[k];
        gk[k] *= a;                                                // dL/dh[t-1] through h[t]
      }
      ddelta = lane_sum<K::NL>(ddelta);
      dxs = lane_sum<K::NL>(dxs);
      const float dpre = ddelta * sigmoid(pre);                    // delta = softplus(dt + dt_bias)
      ddtb += dpre;
      if (c.on && c.q == 0) {
        gr_out.dz[r * gr_out.lddz + c.e] = from_f<T>(dyv * yc * sz * (1.0f + zv * (1.0f - sz)));
        gr_out.ddt[r * gr_out.lddt + c.e] = from_f<T>(dpre);
        gr_out.dx[r * gr_out.lddx + c.e] = from_f<T>(dyc * c.dsk + dxs);
      }
      if (!c.on) {
#pragma unroll
        for (int k = 0; k < 2 * kNpl; ++k) v[k] = 0.0f;  // idle channels add nothing
      }
      reduce_scatter<kNpl, 16, K::NL, 2 * kNpl>(v, lane);
#pragma unroll
      for (int jj = 0; jj < K::RV; ++jj) red[((i * K::W + warp) * 32 + lane) * K::RV + jj] = v[jj];
    }
    __syncthreads();
    // This block's channels summed over its warps: value (lane / NL) RV + jj of lane q = lane % NL.
    for (int idx = tid; idx < slen * 32 * K::RV; idx += K::TPB) {
      const int i = idx / (32 * K::RV), ln = (idx / K::RV) % 32, jj = idx % K::RV;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < K::W; ++w) sum += red[((i * K::W + w) * 32 + ln) * K::RV + jj];
      const int vi = (ln / K::NL) * K::RV + jj, which = vi / kNpl, n = ln % K::NL + K::NL * (vi % kNpl);
      part_bc[((size_t(blockIdx.x) * n_tokens + row0 + ts + i) * 2 + which) * NM + n] = sum;
    }
    __syncthreads();  // red is refilled by the next sub-chunk
  }
  if (!c.on) return;
#pragma unroll
  for (int k = 0; k < kNpl; ++k)
    if (c.n(k) < N) ws_g[gi * N + c.n(k)] = dA[k];
  if (c.q == 0) {
    part_e[(size_t(goff[s] + g) * 2 + 0) * E + c.e] = ddtb;
    part_e[(size_t(goff[s] + g) * 2 + 1) * E + c.e] = dD;
  }
}

// ---- The fast path for N <= 16 (Mamba-1's d_state): 2 lanes per channel, 8 states per lane ----
// Lane q of channel ch holds states n = 8 q + k (k < 8), so B and C of a token are two float4
// reads from shared memory, and the sums over n (y, ddelta, dx) are one shuffle. A block of
// kFCh channels stages a tile of R tokens at a time (x, dt + dt_bias and its softplus, z, dy as
// floats, B and C padded to 16 with zeros) with one pair of barriers: every input is read from
// global memory once per pass, 16 to 32 bytes per row of the block, not once per state lane.
// States past N have A = 0 and B = C = 0: they stay 0 and add nothing.
constexpr int kFCh = 64;          // channels per block
constexpr int kFT = 2 * kFCh;     // threads per block
constexpr int kSpt = 8;           // states per lane
constexpr int kFTile = 16;        // tokens per tile in the forward and the adjoint pass
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kFCh == Cfg<16>::CPB, "part_bc is carved for Cfg<16>'s blocks of channels");

template <int R>
struct Tile {
  float B[R * 16], C[R * 16];  // [i][n], first: 16-byte aligned with the struct
  float x[R * kFCh], pre[R * kFCh], delta[R * kFCh], z[R * kFCh], dy[R * kFCh];  // [i][channel]
};
enum Stage { kStX = 1, kStZ = 2, kStDy = 4, kStB = 8, kStC = 16 };

// Rows [row, row + nrows) (nrows <= R) of the block's channels into tl; rows past nrows and
// channels past E are zeros. Every thread of the block calls it (it synchronizes).
template <class T, int R>
__device__ __forceinline__ void stage_tile(Tile<R>& tl, const ScanTrainIn<T>& in, const T* __restrict__ dy,
                                           int lddy, int row, int nrows, int E, int N, int what) {
  __syncthreads();  // the previous tile (and whatever else the block shares) is consumed
  const int e0 = blockIdx.x * kFCh;
  for (int idx = threadIdx.x; idx < R * kFCh; idx += kFT) {
    const int i = idx / kFCh, e = e0 + idx % kFCh;
    float pre = 0.0f, xv = 0.0f, zv = 0.0f, dv = 0.0f;
    if (i < nrows && e < E) {
      const size_t r = size_t(row + i);
      pre = to_f(in.dt[r * in.lddt + e]) + to_f(in.dt_bias[e]);
      if (what & kStX) xv = to_f(in.x[r * in.ldx + e]);
      if (what & kStZ) zv = to_f(in.z[r * in.ldz + e]);
      if (what & kStDy) dv = to_f(dy[r * lddy + e]);
    }
    tl.pre[idx] = pre;
    tl.delta[idx] = softplus_acc(pre);
    tl.x[idx] = xv;
    tl.z[idx] = zv;
    tl.dy[idx] = dv;
  }
  for (int idx = threadIdx.x; idx < R * 16; idx += kFT) {
    const int i = idx / 16, n = idx % 16;
    const bool ok = i < nrows && n < N;
    const size_t r = size_t(row + (ok ? i : 0)) * in.ldbc + n;
    tl.B[idx] = ok && (what & kStB) ? to_f(in.B[r]) : 0.0f;
    tl.C[idx] = ok && (what & kStC) ? to_f(in.C[r]) : 0.0f;
  }
  __syncthreads();
}

// stage_tile in two halves, so that the global loads of the next tile are in flight while the
// block computes on the current one: tile_load reads this thread's share of the rows into
// registers (raw T), tile_store converts it into tl between a pair of barriers.
template <class T, int R>
struct TileRegs {
  static constexpr int PE = R * kFCh / kFT, PN = R * 16 / kFT;  // per thread: [i][channel], [i][n]
  static_assert(PE * kFT == R * kFCh && PN * kFT == R * 16, "tile split");
  T dt[PE], x[PE], z[PE], dy[PE], b[PN], c[PN];
  int nrows;
};
template <class T, int R>
__device__ __forceinline__ void tile_load(TileRegs<T, R>& rg, const ScanTrainIn<T>& in, const T* __restrict__ dy,
                                          int lddy, int row, int nrows, int E, int N, int what) {
  const int e0 = blockIdx.x * kFCh;
  rg.nrows = nrows;
  const T zero = from_f<T>(0.0f);
#pragma unroll
  for (int p = 0; p < TileRegs<T, R>::PE; ++p) {
    const int idx = threadIdx.x + p * kFT, i = idx / kFCh, e = e0 + idx % kFCh;
    rg.dt[p] = rg.x[p] = rg.z[p] = rg.dy[p] = zero;
    if (i < nrows && e < E) {
      const size_t r = size_t(row + i);
      rg.dt[p] = in.dt[r * in.lddt + e];
      if (what & kStX) rg.x[p] = in.x[r * in.ldx + e];
      if (what & kStZ) rg.z[p] = in.z[r * in.ldz + e];
      if (what & kStDy) rg.dy[p] = dy[r * lddy + e];
    }
  }
#pragma unroll
  for (int p = 0; p < TileRegs<T, R>::PN; ++p) {
    const int idx = threadIdx.x + p * kFT, i = idx / 16, n = idx % 16;
    const bool ok = i < nrows && n < N;
    const size_t r = size_t(row + (ok ? i : 0)) * in.ldbc + n;
    rg.b[p] = ok && (what & kStB) ? in.B[r] : zero;
    rg.c[p] = ok && (what & kStC) ? in.C[r] : zero;
  }
}
// GS (the backward's form): the per-channel scalars of the reverse step once per (token,
// channel), not once per state lane: tl.pre holds sigmoid(pre) (ddelta -> dpre), tl.dy holds
// dyc = dy silu(z) (dL/dyc), tl.z holds dy sigmoid(z) (1 + z (1 - sigmoid(z))) (dz = yc times it).
template <class T, int R, bool GS = false>
__device__ __forceinline__ void tile_store(Tile<R>& tl, const TileRegs<T, R>& rg, const ScanTrainIn<T>& in, int E) {
  const int e0 = blockIdx.x * kFCh;
  __syncthreads();  // the previous tile (and whatever else the block shares) is consumed
#pragma unroll
  for (int p = 0; p < TileRegs<T, R>::PE; ++p) {
    const int idx = threadIdx.x + p * kFT, i = idx / kFCh, e = e0 + idx % kFCh;
    const float pre = i < rg.nrows && e < E ? to_f(rg.dt[p]) + to_f(in.dt_bias[e]) : 0.0f;
    tl.delta[idx] = softplus_acc(pre);
    tl.x[idx] = to_f(rg.x[p]);
    const float zv = to_f(rg.z[p]), dyv = to_f(rg.dy[p]);
    if constexpr (GS) {
      const float sz = sigmoid(zv);                        // y = yc silu(z)
      tl.pre[idx] = sigmoid(pre);                          // delta = softplus(dt + dt_bias)
      tl.dy[idx] = dyv * zv * sz;
      tl.z[idx] = dyv * sz * (1.0f + zv * (1.0f - sz));
    } else {
      tl.pre[idx] = pre;
      tl.z[idx] = zv;
      tl.dy[idx] = dyv;
    }
  }
#pragma unroll
  for (int p = 0; p < TileRegs<T, R>::PN; ++p) {
    const int idx = threadIdx.x + p * kFT;
    tl.B[idx] = to_f(rg.b[p]);
    tl.C[idx] = to_f(rg.c[p]);
  }
  __syncthreads();
}

// The 8 values of this lane's states from a [16] row of shared memory.
__device__ __forceinline__ void load8(float (&v)[kSpt], const float* row16, int q) {
  const float4 a = reinterpret_cast<const float4*>(row16)[2 * q], b = reinterpret_cast<const float4*>(row16)[2 * q + 1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// The per-thread view: channel (clamped for idle lanes, which compute on channel 0 and store
// nothing), lane, A log2 e of its states, Dskip.
struct FLane {
  int q, ch, e, ec;
  bool on;
  float A2[kSpt];
  float dsk;
  template <class T>
  __device__ FLane(const float* Aall, const T* Dskip, int E, int N) {
    q = threadIdx.x & 1;
    ch = threadIdx.x >> 1;
    e = blockIdx.x * kFCh + ch;
    on = e < E;
    ec = on ? e : 0;
#pragma unroll
    for (int k = 0; k < kSpt; ++k) A2[k] = n(k) < N ? Aall[size_t(ec) * N + n(k)] * kLog2e : 0.0f;
    dsk = to_f(Dskip[ec]);
  }
  __device__ int n(int k) const { return kSpt * q + k; }
};

// h = exp(delta A) h + delta B x at row i of the tile.
template <int R>
__device__ __forceinline__ void fstep(float (&h)[kSpt], const FLane& c, const Tile<R>& tl, int i) {
  const float delta = tl.delta[i * kFCh + c.ch], dx = delta * tl.x[i * kFCh + c.ch];
  float Bv[kSpt];
  load8(Bv, tl.B + i * 16, c.q);
#pragma unroll
  for (int k = 0; k < kSpt; ++k) h[k] = fexp2(delta * c.A2[k]) * h[k] + dx * Bv[k];
}

// ---- The training forward for N <= 16, laid out as the prefill (scan.cu): one thread per
// channel with its 16 states in registers, kPT channels per block, tiles of x, dt (and z) copied
// to shared memory 16 bytes at a time. Its groups are `fg` tokens long (fwd_group: a multiple of
// kScanGroup such that the blocks fill the GPU about once; only this kernel's passes use them):
// kLocal scans each group but a sequence's last from zero, fwd_carry_kernel turns the end states
// into start states, kOut scans from there, writes y and, at every chunk start, the state
// entering the chunk to `saved`.
constexpr int kPT = 128;
template <class T>
constexpr int kPTile = sizeof(T) == 4 ? 16 : 32;

// Rows [row, row + nt) x columns [e0, e0 + kPT) of src into dst [nt][kPT]: 16-byte asynchronous
// copies when vec (src and its row stride 16-byte aligned), else element by element. Columns
// past E are left unwritten (their threads compute nothing).
template <class T>
__device__ __forceinline__ void stage_cols(T* dst, const T* src, int ld, int row, int nt, int e0, int E, bool vec) {
  constexpr int V = 16 / sizeof(T), VPR = kPT / V;
  for (int i = threadIdx.x; i < nt * VPR; i += kPT) {
    const int t = i / VPR, j = (i % VPR) * V, col = e0 + j;
    const T* p = src + size_t(row + t) * ld + col;
    T* q = dst + t * kPT + j;
    if (vec && col + V <= E) {
      __pipeline_memcpy_async(q, p, 16);
    } else {
      for (int k = 0; k < V; ++k)
        if (col + k < E) q[k] = p[k];
    }
  }
}

template <class T, FwdPass P>
__global__ void __launch_bounds__(kPT) pf_fwd_kernel(T* __restrict__ y, int ldy, float* __restrict__ saved,
                                                     const ScanTrainIn<T> in, const float* __restrict__ A,
                                                     const int32_t* __restrict__ cu, const int32_t* __restrict__ coff,
                                                     const int32_t* __restrict__ foff, int E, int N, int chunk,
                                                     int fg, float* ws_state, float* ws_sum, int vec) {
  constexpr int kT = kPTile<T>;
  __shared__ __align__(16) float sB[kT * 16];
  __shared__ __align__(16) float sC[P == kOut ? kT * 16 : 4];
  __shared__ __align__(16) T sX[kT * kPT];
  __shared__ __align__(16) T sD[kT * kPT];
  __shared__ __align__(16) T sZ[P == kOut ? kT * kPT : 8];
  const int e0 = blockIdx.x * kPT, e = e0 + threadIdx.x;
  const int g = blockIdx.y, s = blockIdx.z;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  const int tb = g * fg;
  if (tb >= L) return;  // uniform over the block
  const bool last = tb + fg >= L;
  if (P == kLocal && last) return;  // only the start state of a sequence's last group is needed
  const int te = min(L, tb + fg);
  const bool active = e < E;
  const size_t wi = size_t(foff[s] + g) * E + e;  // [group, e]
  float a2[16], st[16];
  float dtb = 0.0f, dsk = 0.0f, sum_delta = 0.0f;
#pragma unroll
  for (int n = 0; n < 16; ++n) a2[n] = st[n] = 0.0f;
  if (active) {
    dtb = to_f(in.dt_bias[e]);
    dsk = to_f(in.Dskip[e]);
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      if (n < N) {
        a2[n] = A[size_t(e) * N + n] * kLog2e;
        if (P == kOut) st[n] = ws_state[wi * N + n];
      }
    }
  }
  int next_save = ceil_div(tb, chunk) * chunk;  // the next chunk start (kOut)
  for (int t0 = tb; t0 < te; t0 += kT) {
    const int nt = min(kT, te - t0);
    __syncthreads();  // the previous tile is consumed
    stage_cols(sX, in.x, in.ldx, row0 + t0, nt, e0, E, vec & 1);
    stage_cols(sD, in.dt, in.lddt, row0 + t0, nt, e0, E, vec & 2);
    if constexpr (P == kOut) stage_cols(sZ, in.z, in.ldz, row0 + t0, nt, e0, E, vec & 4);
    __pipeline_commit();
    for (int i = threadIdx.x; i < nt * 16; i += kPT) {
      const int t = i / 16, n = i % 16;
      const bool ok = n < N;
      const size_t r = size_t(row0 + t0 + t) * in.ldbc + (ok ? n : 0);
      sB[i] = ok ? to_f(in.B[r]) : 0.0f;  // B = C = 0 past N: those states stay 0
      if constexpr (P == kOut) sC[i] = ok ? to_f(in.C[r]) : 0.0f;
    }
    __pipeline_wait_prior(0);
    __syncthreads();
    if (!active) continue;
#pragma unroll 4
    for (int tt = 0; tt < nt; ++tt) {
      if (P == kOut && t0 + tt == next_save) {  // the state entering a chunk
        float* d = saved + (size_t(coff[s] + next_save / chunk) * E + e) * N;
#pragma unroll
        for (int n = 0; n < 16; ++n)
          if (n < N) d[n] = st[n];
        next_save += chunk;
      }
      const float xv = to_f(sX[tt * kPT + threadIdx.x]);
      const float delta = softplus_acc(to_f(sD[tt * kPT + threadIdx.x]) + dtb);
      const float dx = delta * xv;
      const float4* B4 = reinterpret_cast<const float4*>(sB + tt * 16);
      const float4* C4 = reinterpret_cast<const float4*>(sC + tt * 16);
      float acc = 0.0f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float4 b4 = B4[q];
        const float bq[4] = {b4.x, b4.y, b4.z, b4.w};
        float cq[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if constexpr (P == kOut) {
          const float4 c4 = C4[q];
          cq[0] = c4.x;
          cq[1] = c4.y;
          cq[2] = c4.z;
          cq[3] = c4.w;
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int n = 4 * q + k;
          st[n] = fexp2(delta * a2[n]) * st[n] + dx * bq[k];  // h = exp(delta A) h + delta B x
          if constexpr (P == kOut) acc += st[n] * cq[k];
        }
      }
      if constexpr (P == kOut) {  // yc = h . C + D x; y = yc silu(z)
        const float zv = to_f(sZ[tt * kPT + threadIdx.x]);
        y[size_t(row0 + t0 + tt) * ldy + e] = from_f<T>((acc + dsk * xv) * silu(zv));
      } else {
        sum_delta += delta;
      }
    }
  }
  if (P == kLocal && active) {
#pragma unroll
    for (int n = 0; n < 16; ++n)
      if (n < N) ws_state[wi * N + n] = st[n];
    ws_sum[wi] = sum_delta;
  }
}

// One thread per (sequence, e * N + n) walks the sequence's groups of fg tokens in order: the
// end-state parts in ws_state become each group's true start state (the last group's part was
// never written: only its start is stored). The chain is serial, its loads are not: kB groups'
// loads go out at once (stop 39's one-at-a-time walk: 79 us at E 1536, B 8, L 2048 on an H100,
// against 46 for grad_carry_kernel, which batched them).
__global__ void fwd_carry_kernel(const float* __restrict__ A, const int32_t* __restrict__ cu,
                                 const int32_t* __restrict__ foff, int E, int N, int fg, float* __restrict__ ws_state,
                                 const float* __restrict__ ws_sum) {
  constexpr int kB = 8;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= E * N) return;
  const int s = blockIdx.y, e = idx / N;
  const int ng = ceil_div(cu[s + 1] - cu[s], fg);
  const float a2 = A[idx] * kLog2e;
  float st = 0.0f;  // every sequence starts from zero
  for (int g0 = 0; g0 < ng; g0 += kB) {
    float local[kB], sum[kB];
#pragma unroll
    for (int j = 0; j < kB; ++j) {  // past the last group: a clamped load, never used
      const size_t w = size_t(foff[s] + min(g0 + j, ng - 1)) * E;
      local[j] = ws_state[w * N + idx];
      sum[j] = ws_sum[w + e];
    }
#pragma unroll
    for (int j = 0; j < kB; ++j) {
      const int g = g0 + j;
      if (g >= ng) break;
      ws_state[size_t(foff[s] + g) * E * N + idx] = st;
      st = fexp2(a2 * sum[j]) * st + local[j];
    }
  }
}

// grad_local_kernel on the fast layout, in one forward walk: the chunk's saved state walked to
// the group's start, then through the group, writing the true state entering each of its
// sub-chunks of kSub tokens to ws_sub [group, kMaxSub, E, N] (fast_grad_kernel reads them instead
// of walking the group again). The same walk gives the group's adjoint from a zero one after it:
// the reverse recurrence g = (g + dyc_t C_t) a_t ends at sum_t dyc_t C_t prod_{s <= t} a_s, so a
// running product P of the decays (one exp2 per state and token serves the state and P).
template <class T>
__global__ void __launch_bounds__(kFT, 4) fast_grad_local_kernel(const T* __restrict__ dy, int lddy,
                                                              const float* __restrict__ saved,
                                                              const ScanTrainIn<T> in, const float* __restrict__ A,
                                                              const int32_t* __restrict__ cu,
                                                              const int32_t* __restrict__ coff,
                                                              const int32_t* __restrict__ goff, int E, int N,
                                                              int chunk, float* ws_g, float* ws_sum,
                                                              float* __restrict__ ws_sub) {
  __shared__ __align__(16) Tile<kFTile> tl;
  const int g = blockIdx.y, s = blockIdx.z;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  if (g >= groups_of(L, chunk)) return;
  const Group gr = group_at(g, L, chunk);
  const FLane c(A, in.Dskip, E, N);
  TileRegs<T, kFTile> rg;
  float h[kSpt];
  const size_t ci = size_t(coff[s] + gr.ci) * E + c.ec;
#pragma unroll
  for (int k = 0; k < kSpt; ++k) h[k] = c.n(k) < N ? saved[ci * N + c.n(k)] : 0.0f;
  // The chunk's tokens before the group: the state only.
  const int tw = gr.ci * chunk;
  if (tw < gr.t0) tile_load<T, kFTile>(rg, in, nullptr, 0, row0 + tw, min(kFTile, gr.t0 - tw), E, N, kStX | kStB);
  for (int t0 = tw; t0 < gr.t0; t0 += kFTile) {
    const int nt = min(kFTile, gr.t0 - t0);
    tile_store<T, kFTile>(tl, rg, in, E);
    if (t0 + kFTile < gr.t0)
      tile_load<T, kFTile>(rg, in, nullptr, 0, row0 + t0 + kFTile, min(kFTile, gr.t0 - t0 - kFTile), E, N,
                           kStX | kStB);
    for (int i = 0; i < nt; ++i) fstep(h, c, tl, i);
  }
  // The group: state, entries of the sub-chunks, decay product and adjoint.
  constexpr int kAll = kStX | kStZ | kStDy | kStB | kStC;
  const size_t sbase = size_t(goff[s] + g) * kMaxSub;
  float P[kSpt], gk[kSpt];
#pragma unroll
  for (int k = 0; k < kSpt; ++k) P[k] = 1.0f, gk[k] = 0.0f;
  float sum_delta = 0.0f;
  tile_load<T, kFTile>(rg, in, dy, lddy, row0 + gr.t0, min(kFTile, gr.len), E, N, kAll);
  for (int t0 = 0; t0 < gr.len; t0 += kFTile) {
    const int nt = min(kFTile, gr.len - t0);
    tile_store<T, kFTile, true>(tl, rg, in, E);
    if (t0 + kFTile < gr.len)
      tile_load<T, kFTile>(rg, in, dy, lddy, row0 + gr.t0 + t0 + kFTile, min(kFTile, gr.len - t0 - kFTile), E, N,
                           kAll);
    for (int i = 0; i < nt; ++i) {
      if ((t0 + i) % kSub == 0 && c.on) {
        float* d = ws_sub + ((sbase + (t0 + i) / kSub) * E + c.e) * N;
        if (N == 16) {  // as fast_grad_kernel's load_sub
          reinterpret_cast<float4*>(d)[2 * c.q] = make_float4(h[0], h[1], h[2], h[3]);
          reinterpret_cast<float4*>(d)[2 * c.q + 1] = make_float4(h[4], h[5], h[6], h[7]);
        } else {
#pragma unroll
          for (int k = 0; k < kSpt; ++k)
            if (c.n(k) < N) d[c.n(k)] = h[k];
        }
      }
      const int ti = i * kFCh + c.ch;
      const float delta = tl.delta[ti], dx = delta * tl.x[ti], dyc = tl.dy[ti];
      float Bv[kSpt], Cv[kSpt];
      load8(Bv, tl.B + i * 16, c.q);
      load8(Cv, tl.C + i * 16, c.q);
#pragma unroll
      for (int k = 0; k < kSpt; ++k) {
        const float a = fexp2(delta * c.A2[k]);
        h[k] = a * h[k] + dx * Bv[k];  // h = exp(delta A) h + delta B x
        P[k] *= a;
        gk[k] += P[k] * (dyc * Cv[k]);
      }
      sum_delta += delta;
    }
  }
  if (!c.on) return;
  const size_t gi = size_t(goff[s] + g) * E + c.e;
#pragma unroll
  for (int k = 0; k < kSpt; ++k)
    if (c.n(k) < N) ws_g[gi * N + c.n(k)] = gk[k];
  if (c.q == 0) ws_sum[gi] = sum_delta;
}

// grad_kernel on the fast layout (same outputs and workspace layout). The state entering each
// sub-chunk of kSub tokens comes from ws_sub (fast_grad_local_kernel), the next one's load in
// flight while this one computes, as is the next sub-chunk's tile (TileRegs); a sub-chunk's
// kSub states are recomputed into `stash`, then walked in reverse.
constexpr int kFastGradSmem =
    int(sizeof(Tile<kSub>)) + ((kSub - 1) * kSpt * kFT + kSub * (kFT / 32) * 32 + kFT * 16) * int(sizeof(float));
static_assert(sizeof(Tile<kSub>) % 16 == 0, "the stash after the tile stays 16-byte aligned");
template <class T>
__global__ void __launch_bounds__(kFT, 4) fast_grad_kernel(
    const ScanTrainGrad<T, float> gr_out, const T* __restrict__ dy, int lddy, const float* __restrict__ ws_sub,
    const ScanTrainIn<T> in, const float* __restrict__ A, const int32_t* __restrict__ cu,
    const int32_t* __restrict__ goff, int E, int N, int chunk, int n_tokens,
    float* ws_g, float* __restrict__ part_e, float* __restrict__ part_bc) {
  constexpr int W = kFT / 32;
  extern __shared__ __align__(16) unsigned char fg_smem[];  // kFastGradSmem bytes
  Tile<kSub>& tl = *reinterpret_cast<Tile<kSub>*>(fg_smem);
  float* stash = reinterpret_cast<float*>(fg_smem + sizeof(Tile<kSub>));  // [i][k][thread]: states but the last
  float* red = stash + (kSub - 1) * kSpt * kFT;  // [i][warp][lane]: dB, dC summed over the warp's channels
  float* xp = red + kSub * W * 32;               // [warp][lane][16]: one token's dB, dC, to transpose
  const int g = blockIdx.y, s = blockIdx.z, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  if (g >= groups_of(L, chunk)) return;
  const Group gr = group_at(g, L, chunk);
  const FLane c(A, in.Dskip, E, N);
  const int nsub = ceil_div(gr.len, kSub);
  const size_t sbase = size_t(goff[s] + g) * kMaxSub;
  auto load_sub = [&](float (&v)[kSpt], int j) {
    const float* p = ws_sub + ((sbase + j) * E + c.ec) * N;
    if (N == 16) {  // 32-byte aligned: the workspace is 256-aligned and a lane's 8 states start at 8 q
      const float4 a = reinterpret_cast<const float4*>(p)[2 * c.q], b = reinterpret_cast<const float4*>(p)[2 * c.q + 1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
      return;
    }
#pragma unroll
    for (int k = 0; k < kSpt; ++k) v[k] = c.n(k) < N ? p[c.n(k)] : 0.0f;
  };
  constexpr int kAll = kStX | kStZ | kStDy | kStB | kStC;
  float hn[kSpt];  // the state entering sub-chunk j - 1, loaded ahead
  load_sub(hn, nsub - 1);
  TileRegs<T, kSub> rg;
  {
    const int ts = gr.t0 + (nsub - 1) * kSub;
    tile_load<T, kSub>(rg, in, dy, lddy, row0 + ts, gr.len - (nsub - 1) * kSub, E, N, kAll);
  }

  const size_t gi = size_t(goff[s] + g) * E + c.ec;
  float gk[kSpt], dA[kSpt] = {};  // gk: dL/dh from the tokens after, through their a
#pragma unroll
  for (int k = 0; k < kSpt; ++k) gk[k] = c.n(k) < N ? ws_g[gi * N + c.n(k)] : 0.0f;
  float ddtb = 0.0f, dD = 0.0f;
#pragma unroll 1
  for (int j = nsub - 1; j >= 0; --j) {
    const int ts = gr.t0 + j * kSub, slen = min(kSub, gr.len - j * kSub);
    float hs[kSpt];  // the state entering this sub-chunk
#pragma unroll
    for (int k = 0; k < kSpt; ++k) hs[k] = hn[k];
    tile_store<T, kSub, true>(tl, rg, in, E);
    if (j > 0) {
      load_sub(hn, j - 1);
      tile_load<T, kSub>(rg, in, dy, lddy, row0 + ts - kSub, kSub, E, N, kAll);
    }
    float ht[kSpt];  // h[t], carried down the reverse loop: h[t-1] of one token is h[t] of the next
    {
      float hp[kSpt];
#pragma unroll
      for (int k = 0; k < kSpt; ++k) hp[k] = hs[k];
#pragma unroll 1
      for (int i = 0; i < slen - 1; ++i) {
        fstep(hp, c, tl, i);
#pragma unroll
        for (int k = 0; k < kSpt; ++k) stash[(i * kSpt + k) * kFT + tid] = hp[k];
      }
      fstep(hp, c, tl, slen - 1);  // the last state stays in registers
#pragma unroll
      for (int k = 0; k < kSpt; ++k) ht[k] = hp[k];
    }
#pragma unroll 2  // the dB, dC shuffles of one token overlap the next
    for (int i = slen - 1; i >= 0; --i) {
      const size_t r = size_t(row0 + ts + i);
      float hv[kSpt];  // h[t-1]
#pragma unroll
      for (int k = 0; k < kSpt; ++k) hv[k] = i > 0 ? stash[((i - 1) * kSpt + k) * kFT + tid] : hs[k];
      const int ti = i * kFCh + c.ch;  // the channel's scalars, staged once per (token, channel)
      const float spre = tl.pre[ti], delta = tl.delta[ti], xv = tl.x[ti], dzf = tl.z[ti], dyc = tl.dy[ti];
      float Bv[kSpt], Cv[kSpt];
      load8(Bv, tl.B + i * 16, c.q);
      load8(Cv, tl.C + i * 16, c.q);
      float yc = 0.0f;
#pragma unroll
      for (int k = 0; k < kSpt; ++k) yc += ht[k] * Cv[k];
      yc += __shfl_xor_sync(0xffffffffu, yc, 1);
      yc += c.dsk * xv;  // yc = h[t] . C[t] + D x; y = yc silu(z), dyc = dy silu(z)
      dD += dyc * xv;
      const float dxv = delta * xv;
      float v[2 * kSpt];  // dB, then dC, of this lane's states
      float sa = 0.0f, sb = 0.0f;  // sum_n g A2 a h[t-1], sum_n g B
#pragma unroll
      for (int k = 0; k < kSpt; ++k) {
        v[kSpt + k] = dyc * ht[k];                         // dC[t,n] += dyc h[t]
        gk[k] += dyc * Cv[k];                              // dL/dh[t], complete
        const float a = fexp2(delta * c.A2[k]);            // h[t] = a h[t-1] + delta B x
        const float gah = gk[k] * (a * hv[k]);
        sa += gah * c.A2[k];
        dA[k] += gah * delta;
        sb += gk[k] * Bv[k];
        v[k] = gk[k] * dxv;                                // dB[t,n]
        gk[k] *= a;                                        // dL/dh[t-1] through h[t]
        ht[k] = hv[k];
      }
      sa += __shfl_xor_sync(0xffffffffu, sa, 1);
      sb += __shfl_xor_sync(0xffffffffu, sb, 1);
      const float ddelta = sa * kLn2 + sb * xv;            // A = A2 ln 2
      const float dpre = ddelta * spre;                    // delta = softplus(dt + dt_bias)
      ddtb += dpre;
      if (c.on && c.q == 0) {
        gr_out.dz[r * gr_out.lddz + c.e] = from_f<T>(yc * dzf);
        gr_out.ddt[r * gr_out.lddt + c.e] = from_f<T>(dpre);
        gr_out.dx[r * gr_out.lddx + c.e] = from_f<T>(dyc * c.dsk + delta * sb);
      }
      // Idle channels add nothing: their tile columns are zeros (x, dy), so dxv = dyc = 0 and v = 0.
      // Over the warp's 16 channels: lane l sums value l / 2 of the lanes of its half q = l % 2
      // (lanes 2 c + q), through a transpose in shared memory: row l holds lane l's 16 values,
      // its float4 j at slot j ^ ((l >> 1) & 3), so that both the writes and the reads are free of
      // bank conflicts.
      float* xw = xp + warp * 32 * 16;
      __syncwarp();  // the previous token's reads are done
#pragma unroll
      for (int j = 0; j < 4; ++j)
        reinterpret_cast<float4*>(xw + lane * 16)[j ^ ((lane >> 1) & 3)] =
            make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
      __syncwarp();
      {
        const int q = lane & 1, vi = lane >> 1;
        const float* col = xw + q * 16 + (vi & 3);
        float sum = 0.0f;
#pragma unroll
        for (int cc = 0; cc < 16; ++cc) sum += col[cc * 32 + 4 * ((vi >> 2) ^ (cc & 3))];
        red[(i * W + warp) * 32 + lane] = sum;
      }
    }
    __syncthreads();
    // This block's channels summed over its warps, in order: lane ln holds value vi = ln / 2 of
    // half q = ln % 2, i.e. dB (vi < 8) or dC of state 8 q + vi % 8.
    for (int idx = tid; idx < slen * 32; idx += kFT) {
      const int i = idx / 32, ln = idx % 32;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < W; ++w) sum += red[(i * W + w) * 32 + ln];
      const int vi = ln / 2, which = vi / kSpt, n = kSpt * (ln % 2) + vi % kSpt;
      part_bc[((size_t(blockIdx.x) * n_tokens + row0 + ts + i) * 2 + which) * 16 + n] = sum;
    }
    // the next tile_store's barrier keeps red and stash until this is read
  }
  if (!c.on) return;
#pragma unroll
  for (int k = 0; k < kSpt; ++k)
    if (c.n(k) < N) ws_g[gi * N + c.n(k)] = dA[k];
  if (c.q == 0) {
    part_e[(size_t(goff[s] + g) * 2 + 0) * E + c.e] = ddtb;
    part_e[(size_t(goff[s] + g) * 2 + 1) * E + c.e] = dD;
  }
}

// dB[t, n] and dC[t, n]: the parts of every block of channels, in order.
template <class T, int NM>
__global__ void grad_bc_kernel(T* __restrict__ dB, int lddB, T* __restrict__ dC, int lddC,
                               const float* __restrict__ part_bc, int tiles, int n_tokens, int N) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;  // (t * 2 + which) * N + n
  if (idx >= n_tokens * 2 * N) return;
  const int n = idx % N, which = (idx / N) % 2, t = idx / (2 * N);
  float sum = 0.0f;
  for (int b = 0; b < tiles; ++b) sum += part_bc[((size_t(b) * n_tokens + t) * 2 + which) * NM + n];
  if (which == 0)
    dB[size_t(t) * lddB + n] = from_f<T>(sum);
  else
    dC[size_t(t) * lddC + n] = from_f<T>(sum);
}

// The parameter gradients, every group's part in a fixed order: dA_log += dA A (A = -exp(A_log)),
// ddt_bias and dDskip (at n == 0) likewise. A block holds kPrmCols entries (e * N + n) x kPrmSl
// slices: slice j sums groups j, j + kPrmSl, ... in order, then slice 0 adds the slices in order.
constexpr int kPrmCols = 32, kPrmSl = 8;
template <class G>
__global__ void __launch_bounds__(kPrmCols* kPrmSl) grad_param_kernel(
    G* __restrict__ dA_log, int lddA, G* __restrict__ ddt_bias, G* __restrict__ dDskip, const float* __restrict__ A,
    const float* __restrict__ part_a, const float* __restrict__ part_e, int64_t groups, int E, int N) {
  __shared__ float red[3][kPrmSl][kPrmCols];
  const int col = threadIdx.x % kPrmCols, sl = threadIdx.x / kPrmCols;
  const int idx = blockIdx.x * kPrmCols + col;  // e * N + n
  const bool ok = idx < E * N;
  const int e = ok ? idx / N : 0, n = ok ? idx % N : 1;
  float sa = 0.0f, sb = 0.0f, sd = 0.0f;
  if (ok) {
    for (int64_t g = sl; g < groups; g += kPrmSl) sa += part_a[size_t(g) * E * N + idx];
    if (n == 0)
      for (int64_t g = sl; g < groups; g += kPrmSl) {
        sb += part_e[(size_t(g) * 2 + 0) * E + e];
        sd += part_e[(size_t(g) * 2 + 1) * E + e];
      }
  }
  red[0][sl][col] = sa;
  red[1][sl][col] = sb;
  red[2][sl][col] = sd;
  __syncthreads();
  if (sl != 0 || !ok) return;
  sa = sb = sd = 0.0f;
#pragma unroll
  for (int j = 0; j < kPrmSl; ++j) {
    sa += red[0][j][col];
    sb += red[1][j][col];
    sd += red[2][j][col];
  }
  G* d = dA_log + size_t(e) * lddA + n;
  *d = from_f<G>(to_f(*d) + sa * A[idx]);
  if (n == 0) {
    ddt_bias[e] = from_f<G>(to_f(ddt_bias[e]) + sb);
    dDskip[e] = from_f<G>(to_f(dDskip[e]) + sd);
  }
}

// A = -exp(A_log) as float [E, N] (dense).
template <class P>
__global__ void neg_exp_kernel(float* __restrict__ A, const P* __restrict__ A_log, int ld, int E, int N) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= E * N) return;
  A[idx] = -expf(to_f(A_log[size_t(idx / N) * ld + idx % N]));
}

// coff[s], goff[s]: the first saved chunk and the first group of sequence s (exclusive sums over
// the sequences before it). One block: each thread sums a run of sequences, thread 0 scans the
// runs.
__global__ void offsets_kernel(const int32_t* __restrict__ cu, int nseq, int chunk, int32_t* __restrict__ coff,
                               int32_t* __restrict__ goff) {
  constexpr int kT = 256;
  __shared__ int sc[kT], sg[kT];
  const int per = ceil_div(nseq, kT), s0 = min(nseq, int(threadIdx.x) * per), s1 = min(nseq, s0 + per);
  int c = 0, g = 0;
  for (int s = s0; s < s1; ++s) {
    const int L = cu[s + 1] - cu[s];
    c += ceil_div(L, chunk);
    g += groups_of(L, chunk);
  }
  sc[threadIdx.x] = c;
  sg[threadIdx.x] = g;
  __syncthreads();
  if (threadIdx.x == 0) {
    int rc = 0, rg = 0;
    for (int i = 0; i < kT; ++i) {
      const int vc = sc[i], vg = sg[i];
      sc[i] = rc;
      sg[i] = rg;
      rc += vc;
      rg += vg;
    }
  }
  __syncthreads();
  c = sc[threadIdx.x];
  g = sg[threadIdx.x];
  for (int s = s0; s < s1; ++s) {
    const int L = cu[s + 1] - cu[s];
    coff[s] = c;
    goff[s] = g;
    c += ceil_div(L, chunk);
    g += groups_of(L, chunk);
  }
}

// The workspace, carved in 256-byte pieces: A, the offsets, the group states or adjoints and
// their delta sums; the backward adds part_e and part_bc.
struct Work {
  float *A, *state, *sum, *part_e, *part_bc, *sub;
  int32_t *coff, *goff, *foff, *fdum;
  size_t bytes;
};
int nm_of(int N) { return N <= 16 ? 16 : kMaxState; }
int block_tiles(const ScanTrainShape& sh) {
  return ceil_div(sh.E, sh.N <= 16 ? Cfg<16>::CPB : Cfg<kMaxState>::CPB);
}
Work carve(void* base, const ScanTrainShape& sh, bool backward) {
  char* p = static_cast<char*>(base);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    char* q = p ? p + off : nullptr;
    off += (bytes + 255) / 256 * 256;
    return q;
  };
  const size_t E = size_t(sh.E), N = size_t(sh.N), G = size_t(sh.groups);
  Work w{};
  w.A = reinterpret_cast<float*>(take(E * N * sizeof(float)));
  w.coff = reinterpret_cast<int32_t*>(take(size_t(sh.nseq + 1) * sizeof(int32_t)));
  w.goff = reinterpret_cast<int32_t*>(take(size_t(sh.nseq + 1) * sizeof(int32_t)));
  w.foff = reinterpret_cast<int32_t*>(take(size_t(sh.nseq + 1) * sizeof(int32_t)));  // the forward's groups
  w.fdum = reinterpret_cast<int32_t*>(take(size_t(sh.nseq + 1) * sizeof(int32_t)));
  w.state = reinterpret_cast<float*>(take(G * E * N * sizeof(float)));
  w.sum = reinterpret_cast<float*>(take(G * E * sizeof(float)));
  if (backward) {
    w.part_e = reinterpret_cast<float*>(take(G * 2 * E * sizeof(float)));
    w.part_bc = reinterpret_cast<float*>(
        take(size_t(block_tiles(sh)) * size_t(sh.n_tokens) * 2 * size_t(nm_of(sh.N)) * sizeof(float)));
    if (sh.N <= 16)  // the state entering every sub-chunk: [group, kMaxSub, E, N]
      w.sub = reinterpret_cast<float*>(take(G * kMaxSub * E * N * sizeof(float)));
  }
  w.bytes = off;
  return w;
}

template <class T>
void prologue(const Work& w, const ScanTrainIn<T>& in, const RaggedBatch& rb, const ScanTrainShape& sh,
              cudaStream_t stream) {
  const int EN = sh.E * sh.N;
  if (in.a_log_f32)
    neg_exp_kernel<float><<<ceil_div(EN, 256), 256, 0, stream>>>(w.A, static_cast<const float*>(in.A_log), in.ldA,
                                                                 sh.E, sh.N);
  else
    neg_exp_kernel<T><<<ceil_div(EN, 256), 256, 0, stream>>>(w.A, static_cast<const T*>(in.A_log), in.ldA, sh.E,
                                                             sh.N);
  HM_CUDA_LAUNCHED("selective_scan_train A");
  offsets_kernel<<<1, 256, 0, stream>>>(rb.cu_seqlens, rb.nseq, sh.chunk, w.coff, w.goff);
  HM_CUDA_LAUNCHED("selective_scan_train offsets");
}

bool skip(const RaggedBatch& rb, const ScanTrainShape& sh) {
  return rb.nseq <= 0 || sh.n_tokens <= 0 || sh.E <= 0 || sh.groups == 0;
}

template <class T, int NM>
void train_launch(T* y, int ldy, float* saved, const ScanTrainIn<T>& in, const RaggedBatch& rb,
                  const ScanTrainShape& sh, const Work& w, cudaStream_t stream) {
  using K = Cfg<NM>;
  const dim3 grid(ceil_div(sh.E, K::CPB), sh.max_groups, rb.nseq);
  train_fwd_kernel<T, NM, kLocal><<<grid, K::TPB, 0, stream>>>(y, ldy, in, w.A, rb.cu_seqlens, w.goff, sh.E, sh.N,
                                                               sh.chunk, w.state, w.sum);
  HM_CUDA_LAUNCHED("selective_scan_train group states");
  train_carry_kernel<<<dim3(ceil_div(sh.E * sh.N, 256), rb.nseq), 256, 0, stream>>>(
      saved, w.A, rb.cu_seqlens, w.coff, w.goff, sh.E, sh.N, sh.chunk, w.state, w.sum);
  HM_CUDA_LAUNCHED("selective_scan_train carry");
  train_fwd_kernel<T, NM, kOut><<<grid, K::TPB, 0, stream>>>(y, ldy, in, w.A, rb.cu_seqlens, w.goff, sh.E, sh.N,
                                                             sh.chunk, w.state, w.sum);
  HM_CUDA_LAUNCHED("selective_scan_train output");
}

// The forward's group length: the fewest kScanGroup multiples that keep every SM busy (one
// wave of pf_fwd_kernel blocks), as the prefill picks its chunks; never more groups than sh.groups.
int fwd_group(const ScanTrainShape& sh) {
  static const long resident = [] {
    int per_sm = 4;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, pf_fwd_kernel<__nv_bfloat16, kOut>, kPT, 0) !=
        cudaSuccess)
      per_sm = 4;
    return long(sm_count()) * std::max(per_sm, 1);
  }();
  const long per_group = long(ceil_div(sh.E, kPT)) * std::max(sh.nseq, 1);
  const int target = int(std::max(1L, resident / per_group));
  const int lmax = kScanGroup * sh.max_groups;  // at least the longest sequence
  return std::max(kScanGroup, ceil_div(ceil_div(lmax, target), kScanGroup) * kScanGroup);
}

template <class T>
bool aligned16(const T* p, int ld) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (size_t(ld) * sizeof(T)) % 16 == 0;
}

template <class T>
void fast_train_launch(T* y, int ldy, float* saved, const ScanTrainIn<T>& in, const RaggedBatch& rb,
                       const ScanTrainShape& sh, const Work& w, cudaStream_t stream) {
  const int fg = fwd_group(sh);
  offsets_kernel<<<1, 256, 0, stream>>>(rb.cu_seqlens, rb.nseq, fg, w.foff, w.fdum);
  HM_CUDA_LAUNCHED("selective_scan_train forward offsets");
  const int vec = (aligned16(in.x, in.ldx) ? 1 : 0) | (aligned16(in.dt, in.lddt) ? 2 : 0) |
                  (aligned16(in.z, in.ldz) ? 4 : 0);
  const dim3 grid(ceil_div(sh.E, kPT), ceil_div(kScanGroup * sh.max_groups, fg), rb.nseq);
  pf_fwd_kernel<T, kLocal><<<grid, kPT, 0, stream>>>(y, ldy, saved, in, w.A, rb.cu_seqlens, w.coff, w.foff, sh.E,
                                                     sh.N, sh.chunk, fg, w.state, w.sum, vec);
  HM_CUDA_LAUNCHED("selective_scan_train group states");
  fwd_carry_kernel<<<dim3(ceil_div(sh.E * sh.N, 256), rb.nseq), 256, 0, stream>>>(
      w.A, rb.cu_seqlens, w.foff, sh.E, sh.N, fg, w.state, w.sum);
  HM_CUDA_LAUNCHED("selective_scan_train carry");
  pf_fwd_kernel<T, kOut><<<grid, kPT, 0, stream>>>(y, ldy, saved, in, w.A, rb.cu_seqlens, w.coff, w.foff, sh.E, sh.N,
                                                   sh.chunk, fg, w.state, w.sum, vec);
  HM_CUDA_LAUNCHED("selective_scan_train output");
}

template <class T, class G, int NM, bool FAST>
void grad_launch(const ScanTrainGrad<T, G>& gd, const T* dy, int lddy, const float* saved, const ScanTrainIn<T>& in,
                 const RaggedBatch& rb, const ScanTrainShape& sh, const Work& w, cudaStream_t stream) {
  using K = Cfg<NM>;
  const dim3 grid(ceil_div(sh.E, FAST ? kFCh : K::CPB), sh.max_groups, rb.nseq);
  if constexpr (FAST)
    fast_grad_local_kernel<T><<<grid, kFT, 0, stream>>>(dy, lddy, saved, in, w.A, rb.cu_seqlens, w.coff, w.goff,
                                                        sh.E, sh.N, sh.chunk, w.state, w.sum, w.sub);
  else
    grad_local_kernel<T, NM><<<grid, K::TPB, 0, stream>>>(dy, lddy, in, w.A, rb.cu_seqlens, w.goff, sh.E, sh.N,
                                                          sh.chunk, w.state, w.sum);
  HM_CUDA_LAUNCHED("selective_scan_backward group adjoints");
  grad_carry_kernel<<<dim3(ceil_div(sh.E * sh.N, 256), rb.nseq), 256, 0, stream>>>(
      w.A, rb.cu_seqlens, w.goff, sh.E, sh.N, sh.chunk, w.state, w.sum);
  HM_CUDA_LAUNCHED("selective_scan_backward carry");
  ScanTrainGrad<T, float> act{};  // the activation gradients (the parameter ones come last)
  act.dx = gd.dx;
  act.lddx = gd.lddx;
  act.ddt = gd.ddt;
  act.lddt = gd.lddt;
  act.dz = gd.dz;
  act.lddz = gd.lddz;
  if constexpr (FAST) {
    // Above the default 48 KB of shared memory; set on every call, so every device gets it.
    HM_CUDA_OK(cudaFuncSetAttribute(fast_grad_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, kFastGradSmem),
               "selective_scan_backward shared memory");
    HM_CUDA_OK(cudaFuncSetAttribute(fast_grad_kernel<T>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                    int(cudaSharedmemCarveoutMaxShared)),
               "selective_scan_backward shared memory");  // 4 blocks of 52 KB per SM
    fast_grad_kernel<T><<<grid, kFT, kFastGradSmem, stream>>>(act, dy, lddy, w.sub, in, w.A, rb.cu_seqlens, w.goff,
                                                              sh.E, sh.N, sh.chunk, sh.n_tokens, w.state, w.part_e,
                                                              w.part_bc);
  } else {
    grad_kernel<T, NM><<<grid, K::TPB, 0, stream>>>(act, dy, lddy, saved, in, w.A, rb.cu_seqlens, w.coff, w.goff,
                                                    sh.E, sh.N, sh.chunk, sh.n_tokens, w.state, w.part_e, w.part_bc);
  }
  HM_CUDA_LAUNCHED("selective_scan_backward");
  grad_bc_kernel<T, NM><<<ceil_div(sh.n_tokens * 2 * sh.N, 256), 256, 0, stream>>>(
      gd.dB, gd.lddB, gd.dC, gd.lddC, w.part_bc, int(grid.x), sh.n_tokens, sh.N);
  HM_CUDA_LAUNCHED("selective_scan_backward dB dC");
  grad_param_kernel<G><<<ceil_div(sh.E * sh.N, kPrmCols), kPrmCols * kPrmSl, 0, stream>>>(
      gd.dA_log, gd.lddA, gd.ddt_bias, gd.dDskip, w.A, w.state, w.part_e, sh.groups, sh.E, sh.N);
  HM_CUDA_LAUNCHED("selective_scan_backward parameters");
}

void check_shape(const ScanTrainShape& sh, const RaggedBatch& rb, const char* op) {
  HM_CHECK(sh.N >= 1 && sh.N <= kMaxState, "cuda ", op, ": d_state must be in [1, ", kMaxState, "], got ", sh.N);
  HM_CHECK(sh.chunk >= 1, "cuda ", op, ": chunk ", sh.chunk, " must be positive");
  HM_CHECK(rb.nseq == sh.nseq && rb.n_tokens == sh.n_tokens, "cuda ", op, ": the shape is of another batch (",
           sh.nseq, " sequences of ", sh.n_tokens, " tokens, the batch has ", rb.nseq, " of ", rb.n_tokens, ")");
  HM_CHECK(rb.nseq <= 65535 && sh.max_groups <= 65535, "cuda ", op, ": ", rb.nseq, " sequences of up to ",
           sh.max_groups, " groups of ", kScanGroup, " tokens; at most 65535 of each per call");
  // The element-wise kernels index [E, N] and [n_tokens, 2, N] with an int.
  HM_CHECK(int64_t(sh.E) * sh.N <= INT32_MAX && int64_t(sh.n_tokens) * 2 * sh.N <= INT32_MAX, "cuda ", op, ": ",
           sh.n_tokens, " tokens of d_inner ", sh.E, " and d_state ", sh.N, " are too many for one call");
}

}  // namespace

ScanTrainShape scan_train_shape(const int32_t* host_cu, int nseq, int E, int N, int chunk) {
  ScanTrainShape sh;
  sh.E = E;
  sh.N = N;
  sh.chunk = chunk > 0 ? chunk : kScanTrainChunk;
  sh.nseq = nseq;
  sh.n_tokens = nseq > 0 ? host_cu[nseq] : 0;
  for (int s = 0; s < nseq; ++s) {
    const int L = host_cu[s + 1] - host_cu[s];
    sh.chunks += ceil_div(L, sh.chunk);
    const int g = groups_of(L, sh.chunk);
    sh.groups += g;
    sh.max_groups = std::max(sh.max_groups, g);
  }
  return sh;
}

size_t scan_train_saved_bytes(const ScanTrainShape& sh) {
  return size_t(sh.chunks) * size_t(sh.E) * size_t(sh.N) * sizeof(float);
}

size_t scan_train_workspace_bytes(const ScanTrainShape& sh, bool backward) {
  return carve(nullptr, sh, backward).bytes;
}

template <class T>
void selective_scan_train(T* y, int ldy, float* saved, const ScanTrainIn<T>& in, const RaggedBatch& rb,
                          const ScanTrainShape& sh, void* workspace, cudaStream_t stream) {
  check_shape(sh, rb, "selective_scan_train");
  if (skip(rb, sh)) return;
  HM_CHECK(workspace != nullptr && saved != nullptr, "cuda selective_scan_train: no workspace or saved buffer");
  const Work w = carve(workspace, sh, false);
  prologue(w, in, rb, sh, stream);
  if (sh.N <= 16)
    fast_train_launch<T>(y, ldy, saved, in, rb, sh, w, stream);
  else
    train_launch<T, kMaxState>(y, ldy, saved, in, rb, sh, w, stream);
}

template <class T, class G>
void selective_scan_backward(const ScanTrainGrad<T, G>& grad, const T* dy, int lddy, const float* saved,
                             const ScanTrainIn<T>& in, const RaggedBatch& rb, const ScanTrainShape& sh,
                             void* workspace, cudaStream_t stream) {
  check_shape(sh, rb, "selective_scan_backward");
  if (skip(rb, sh)) return;
  HM_CHECK(workspace != nullptr && saved != nullptr, "cuda selective_scan_backward: no workspace or saved buffer");
  const Work w = carve(workspace, sh, true);
  prologue(w, in, rb, sh, stream);
  if (sh.N <= 16)
    grad_launch<T, G, 16, true>(grad, dy, lddy, saved, in, rb, sh, w, stream);
  else
    grad_launch<T, G, kMaxState, false>(grad, dy, lddy, saved, in, rb, sh, w, stream);
}

#define HM_INST(T)                                                                                         \
  template void selective_scan_train<T>(T*, int, float*, const ScanTrainIn<T>&, const RaggedBatch&,       \
                                        const ScanTrainShape&, void*, cudaStream_t);                       \
  template void selective_scan_backward<T, float>(const ScanTrainGrad<T, float>&, const T*, int,         \
                                                  const float*, const ScanTrainIn<T>&, const RaggedBatch&, \
                                                  const ScanTrainShape&, void*, cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST
#define HM_INST(T)                                                                                              \
  template void selective_scan_backward<T, T>(const ScanTrainGrad<T, T>&, const T*, int, const float*,        \
                                              const ScanTrainIn<T>&, const RaggedBatch&, const ScanTrainShape&, \
                                              void*, cudaStream_t);
HM_INST(__nv_bfloat16)
HM_INST(__half)
#undef HM_INST

}  // namespace hm::cuda
