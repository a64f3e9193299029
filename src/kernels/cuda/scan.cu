// Mamba-1 selective scan: a chunked parallel prefill over a ragged batch, and the decode step.
//
// Per channel e and state n the scan is s_t = a_t s_{t-1} + b_t with a_t = exp(delta_t A[e,n]),
// b_t = delta_t B[t,n] x[t,e]. Over a chunk of tokens, the end state is P s_in + S, where
// P = exp(A[e,n] * sum_t delta_t) and S is the chunk scanned from zero. So the chunks of a
// sequence are independent but for their start states, which a short sequential pass over
// the chunks (not the tokens) supplies. That keeps the SMs busy at batch 1, where one thread
// per channel walking all tokens would leave most of the GPU idle.
#include <cuda_pipeline_primitives.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/decode.h"

namespace hm::cuda {
namespace {

constexpr int kThreads = 128;  // channels per block: one thread per channel, its N states in registers
// Tokens staged in shared memory at a time: 24 KB of x, dt and z per block in any type.
template <class T> constexpr int kTile = sizeof(T) == 4 ? 16 : 32;
constexpr float kLog2e = 1.4426950408889634f;

enum Pass { kChunkState, kOutput };

// exp2 as one MUFU instruction; results under 2^-126 flush to zero, which a decay factor can afford.
__device__ __forceinline__ float exp2_ftz(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
// log1p keeps delta accurate when it is small; exp's error here is a few ulps.
__device__ __forceinline__ float softplus_fast(float v) { return v > 20.0f ? v : log1pf(__expf(v)); }
__device__ __forceinline__ float silu_fast(float v) { return v * (1.0f / (1.0f + __expf(-v))); }

// Copies rows [row_first, row_first + nt) x columns [e0, e0 + kThreads) of src into dst
// [nt][kThreads] with 16-byte asynchronous copies (vec: src and its row stride are 16-byte
// aligned), else element by element. Few wide requests in flight per block are what keep HBM
// busy: one 2-byte load per thread and token left bf16 slower than f32.
template <class T>
__device__ __forceinline__ void stage_rows(T* dst, const T* src, int ld, int row_first, int nt,
                                           int e0, int E, bool vec) {
  constexpr int V = 16 / sizeof(T), VPR = kThreads / V;  // elements per copy, copies per row
  for (int i = threadIdx.x; i < nt * VPR; i += kThreads) {
    const int t = i / VPR, j = (i % VPR) * V, col = e0 + j;
    const T* p = src + size_t(row_first + t) * ld + col;
    T* q = dst + t * kThreads + j;
    if (vec && col + V <= E) {
      __pipeline_memcpy_async(q, p, 16);
    } else {
      for (int k = 0; k < V; ++k)
        if (col + k < E) q[k] = p[k];
    }
  }
}

// Pass 1 (kChunkState): scan chunk c of sequence s from zero; write its end state to
// ws_state[s, c, e, :] and its sum of delta to ws_sum[s, c, e]. A sequence's last chunk is
// skipped: pass 3 finishes it from its true start state and writes the slot's final state.
// Pass 3 (kOutput): scan from the chunk's true start state (ws_state after the carry pass, or
// the slot's state when the sequence is one chunk) and write y; the last chunk of a sequence
// writes the final state to its slot (the only block that touches the slot in this pass).
// EXACT: N == NM, so the state loop has no guards and B, C come from shared memory 16 bytes
// at a time.
template <class T, int NM, bool EXACT, Pass P>
__global__ void __launch_bounds__(kThreads) scan_chunk_kernel(
    T* __restrict__ y, int ldy, float* pool, const T* __restrict__ x, int ldx,
    const T* __restrict__ dt, int lddt, const T* __restrict__ dt_bias, const float* __restrict__ A,
    const T* __restrict__ B, const T* __restrict__ C, int ldbc, const T* __restrict__ Dskip,
    const T* __restrict__ z, int ldz, const int32_t* __restrict__ cu,
    const int32_t* __restrict__ slots, int E, int N, int chunk, float* ws_state,
    float* ws_sum, int vec) {
  constexpr int kT = kTile<T>;
  __shared__ __align__(16) float sB[kT * NM];
  __shared__ __align__(16) float sC[P == kOutput ? kT * NM : 4];
  __shared__ __align__(16) T sX[kT * kThreads];
  __shared__ __align__(16) T sD[kT * kThreads];
  __shared__ __align__(16) T sZ[P == kOutput ? kT * kThreads : 8];
  if (EXACT) N = NM;
  const int e0 = blockIdx.x * kThreads, e = e0 + threadIdx.x;
  const int c = blockIdx.y, s = blockIdx.z, nch = gridDim.y;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  const int tb = c * chunk;
  if (tb >= L) return;  // uniform over the block: this sequence is shorter
  const bool last = tb + chunk >= L;
  if (P == kChunkState && last) return;
  const int te = min(L, tb + chunk);
  const bool active = e < E;
  const bool whole = c == 0 && last;  // the sequence is one chunk: its state is the slot's
  const size_t wbase = (size_t(s) * nch + c) * E + e;  // [s, c, e] in ws_sum; x N in ws_state
  float* slot_state = pool + (size_t(slots[s]) * E + e) * N;

  float a2[NM], st[NM];
  float dtb = 0, dsk = 0, sum_delta = 0;
  if (active) {
    dtb = to_f(dt_bias[e]);
    dsk = to_f(Dskip[e]);
#pragma unroll
    for (int n = 0; n < NM; ++n) {
      a2[n] = EXACT || n < N ? A[size_t(e) * N + n] * kLog2e : 0.0f;
      st[n] = 0.0f;
      if (P == kOutput && (EXACT || n < N)) st[n] = whole ? slot_state[n] : ws_state[wbase * N + n];
    }
  }
  for (int t0 = tb; t0 < te; t0 += kT) {
    const int nt = min(kT, te - t0);
    __syncthreads();  // the previous tile is consumed
    stage_rows(sX, x, ldx, row0 + t0, nt, e0, E, vec & 1);
    stage_rows(sD, dt, lddt, row0 + t0, nt, e0, E, vec & 2);
    if constexpr (P == kOutput) stage_rows(sZ, z, ldz, row0 + t0, nt, e0, E, vec & 4);
    __pipeline_commit();
    for (int i = threadIdx.x; i < nt * N; i += kThreads) {
      const int t = i / N, n = i % N;
      const size_t r = size_t(row0 + t0 + t) * ldbc + n;
      sB[t * NM + n] = to_f(B[r]);
      if constexpr (P == kOutput) sC[t * NM + n] = to_f(C[r]);
    }
    __pipeline_wait_prior(0);
    __syncthreads();
    if (!active) continue;
#pragma unroll 4
    for (int tt = 0; tt < nt; ++tt) {
      const float xv = to_f(sX[tt * kThreads + threadIdx.x]);
      const float delta = softplus_fast(to_f(sD[tt * kThreads + threadIdx.x]) + dtb);
      const float dx = delta * xv;
      const float* Bt = sB + tt * NM;
      const float* Ct = sC + tt * NM;
      float acc = 0.0f;
      if constexpr (EXACT) {
#pragma unroll
        for (int q = 0; q < NM / 4; ++q) {
          const float4 b4 = reinterpret_cast<const float4*>(Bt)[q];
          const float bq[4] = {b4.x, b4.y, b4.z, b4.w};
          float cq[4] = {0, 0, 0, 0};
          if constexpr (P == kOutput) {
            const float4 c4 = reinterpret_cast<const float4*>(Ct)[q];
            cq[0] = c4.x; cq[1] = c4.y; cq[2] = c4.z; cq[3] = c4.w;
          }
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int n = 4 * q + k;
            st[n] = exp2_ftz(delta * a2[n]) * st[n] + dx * bq[k];
            if constexpr (P == kOutput) acc += st[n] * cq[k];
          }
        }
      } else {
#pragma unroll
        for (int n = 0; n < NM; ++n) {
          if (n < N) {
            st[n] = exp2_ftz(delta * a2[n]) * st[n] + dx * Bt[n];
            if constexpr (P == kOutput) acc += st[n] * Ct[n];
          }
        }
      }
      if constexpr (P == kOutput) {
        const float zv = to_f(sZ[tt * kThreads + threadIdx.x]);
        y[size_t(row0 + t0 + tt) * ldy + e] = from_f<T>((acc + dsk * xv) * silu_fast(zv));
      } else {
        sum_delta += delta;
      }
    }
  }
  if (!active) return;
  if constexpr (P == kChunkState) {
#pragma unroll
    for (int n = 0; n < NM; ++n)
      if (EXACT || n < N) ws_state[wbase * N + n] = st[n];
    ws_sum[wbase] = sum_delta;
  } else {
    if (last) {
#pragma unroll
      for (int n = 0; n < NM; ++n)
        if (EXACT || n < N) slot_state[n] = st[n];
    }
  }
}

// Pass 2: one thread per (sequence, channel, state) walks the sequence's chunks in order and
// turns ws_state[s, c] (chunk c scanned from zero) into chunk c's true start state. The slot is
// only read: the last chunk's pass 3 writes the final state.
__global__ void scan_carry_kernel(const float* __restrict__ pool, const float* __restrict__ A,
                                  const int32_t* __restrict__ cu, const int32_t* __restrict__ slots,
                                  int E, int N, int chunk, int nch, float* ws_state,
                                  const float* __restrict__ ws_sum) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;  // e * N + n
  if (idx >= E * N) return;
  const int s = blockIdx.y, e = idx / N;
  const int nc = ceil_div(cu[s + 1] - cu[s], chunk);
  if (nc <= 1) return;  // pass 3 reads the slot itself
  const float a2 = A[idx] * kLog2e;
  float st = pool[size_t(slots[s]) * E * N + idx];
  for (int c = 0; c < nc; ++c) {
    const size_t w = (size_t(s) * nch + c) * E;
    float* ws = ws_state + w * N + idx;
    if (c + 1 == nc) {  // pass 1 skipped the last chunk: only its start state is needed
      *ws = st;
      break;
    }
    const float local = *ws;
    *ws = st;
    st = exp2f(a2 * ws_sum[w + e]) * st + local;
  }
}

// Decode: 4 threads per (sequence, channel), each holding NM / 16 groups of 4 of the channel's
// states: thread q takes states 4 (4 k + q) .. + 3 for k < NM / 16, so the 4 threads of a
// channel read 64 contiguous bytes per group. vec (N % 4 == 0, pool and A 16-byte aligned):
// float4 loads and stores, a group is wholly below N or wholly above; else scalar with a bound
// per state. y is the 4 threads' partial sums added by two shuffles (every lane of the warp
// takes part: channels past E compute zeros and store nothing).
// DTW: dt is not read but computed, dt_r[s, :] . dt_w[e, :] over R columns, thread q taking the
// q-th contiguous quarter, rounded to T as the unfused linear would store it.
// The step is a chain of latencies (a 1.4B layer's is ~1 MB of reads), so every load is issued
// before any is used: the constants (A, dt_bias, Dskip, the quarter of the dt_w row when
// R <= 4 kDtPre) before pdl_wait(), all the rest at once after it. Stop 39's version read dt_w
// and dt_r 2 bytes at a time in a loop and B, C inside the update: 6.8 us a layer (ncu, H100).
constexpr int kStepLanes = 4;
constexpr int kDtPre = 32;  // dt_proj columns a lane holds in registers
template <class T, int NM, bool DTW>
__global__ void __launch_bounds__(kThreads) scan_step_kernel(
    T* __restrict__ y, int ldy, float* pool, const int32_t* __restrict__ slots,
    const T* __restrict__ x, int ldx, const T* __restrict__ dt, int lddt,
    const T* __restrict__ dt_w, int R,
    const T* __restrict__ dt_bias, const float* __restrict__ A, const T* __restrict__ B,
    const T* __restrict__ C, int ldbc, const T* __restrict__ Dskip, const T* __restrict__ z,
    int ldz, int E, int N, bool vec) {
  constexpr int kGroups = NM / (4 * kStepLanes);
  pdl_trigger();
  const int q = threadIdx.x % kStepLanes;
  const int e = blockIdx.x * (kThreads / kStepLanes) + threadIdx.x / kStepLanes;
  const size_t s = blockIdx.y;
  const bool active = e < E;
  const int ec = active ? e : 0;
  const float* Ae = A + size_t(ec) * N;
  float sv[kGroups][4], av[kGroups][4], bv[kGroups][4], cv[kGroups][4];
#pragma unroll
  for (int k = 0; k < kGroups; ++k) {
    const int n0 = 4 * (kStepLanes * k + q);
    if (vec) {
      const float4 a4 = active && n0 < N ? *reinterpret_cast<const float4*>(Ae + n0) : make_float4(0, 0, 0, 0);
      av[k][0] = a4.x; av[k][1] = a4.y; av[k][2] = a4.z; av[k][3] = a4.w;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) av[k][i] = active && n0 + i < N ? Ae[n0 + i] : 0.0f;
    }
  }
  const float dtb = to_f(dt_bias[ec]), dsk = to_f(Dskip[ec]);
  // This lane's columns of the dt_proj row: [r0, r0 + rn).
  const int rq = ceil_div(R, kStepLanes), r0 = min(R, q * rq), rn = DTW ? min(R - r0, rq) : 0;
  const bool dt_pre = DTW && rq <= kDtPre;
  float wq[DTW ? kDtPre : 1], xq[DTW ? kDtPre : 1];
  if constexpr (DTW) {
    if (dt_pre) load_run<T, kDtPre>(wq, dt_w + size_t(ec) * R + r0, active ? rn : 0);
  }
  pdl_wait();

  float* st = pool + (size_t(slots[s]) * E + ec) * N;
  if constexpr (DTW) {
    if (dt_pre) load_run<T, kDtPre>(xq, dt + s * lddt + r0, rn);  // dt holds dt_r here
  }
  const float draw_in = DTW ? 0.0f : to_f(dt[s * lddt + ec]);
  const float xv = to_f(x[s * ldx + ec]), zv = to_f(z[s * ldz + ec]);
#pragma unroll
  for (int k = 0; k < kGroups; ++k) {
    const int n0 = 4 * (kStepLanes * k + q);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool ok = n0 + i < N;
      bv[k][i] = ok ? to_f(B[s * ldbc + n0 + i]) : 0.0f;
      cv[k][i] = ok ? to_f(C[s * ldbc + n0 + i]) : 0.0f;
    }
    if (vec) {
      const float4 s4 = active && n0 < N ? *reinterpret_cast<const float4*>(st + n0) : make_float4(0, 0, 0, 0);
      sv[k][0] = s4.x; sv[k][1] = s4.y; sv[k][2] = s4.z; sv[k][3] = s4.w;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) sv[k][i] = active && n0 + i < N ? st[n0 + i] : 0.0f;
    }
  }
  float draw = draw_in;  // dt before its bias
  if constexpr (DTW) {
    float part = 0.0f;
    if (dt_pre) {
#pragma unroll
      for (int i = 0; i < kDtPre; ++i) part += wq[i] * xq[i];  // zeros past rn
    } else if (active) {
      const T* wr = dt_w + size_t(e) * R + r0;
      const T* xr = dt + s * lddt + r0;
      for (int i = 0; i < rn; ++i) part += to_f(wr[i]) * to_f(xr[i]);
    }
    part += __shfl_xor_sync(0xffffffffu, part, 1);
    part += __shfl_xor_sync(0xffffffffu, part, 2);
    draw = to_f(from_f<T>(part));
  }
  float acc = 0.0f;
  if (active) {
    const float delta = softplus(draw + dtb);
    const float dx = delta * xv;
#pragma unroll
    for (int k = 0; k < kGroups; ++k) {
      const int n0 = 4 * (kStepLanes * k + q);
      if (n0 >= N) continue;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (n0 + i < N) {
          const float v = exp2f(delta * av[k][i] * kLog2e) * sv[k][i] + dx * bv[k][i];
          sv[k][i] = v;
          acc += v * cv[k][i];
        }
      }
      if (vec) {
        *reinterpret_cast<float4*>(st + n0) = make_float4(sv[k][0], sv[k][1], sv[k][2], sv[k][3]);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (n0 + i < N) st[n0 + i] = sv[k][i];
      }
    }
  }
  // The 4 lanes of a channel are adjacent (threadIdx.x / 4): xor 1 and 2 stay inside them.
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  if (active && q == 0) y[s * ldy + e] = from_f<T>((acc + dsk * xv) * silu(zv));
}

// Short prefill (scan_short_fits: a few short sequences, N <= 16): one launch, no workspace.
// A block takes 32 channels of one sequence. First every thread loads its share of the block's
// inputs for all of the sequence's (<= 64) tokens into registers, every load in flight at once,
// and stores delta, x, silu(z), B and C in shared memory; then 4 lanes per channel (4 states
// each, the decode step's layout) walk the tokens in order from the slot's state, reading only
// shared memory. Stop 38's version loaded 4 tokens at a time between the steps: 28 us a layer
// at 52 tokens (E 4096, H100, ncu), a load's latency every 4 tokens with one warp per
// scheduler. The arithmetic is the chunk kernel's (softplus_fast, exp2_ftz, silu_fast); the sum
// over states runs in another order (4 lanes, then a shuffle), so the bits may differ from the
// chunked path.
constexpr int kShortCh = kThreads / kStepLanes;  // channels per block
template <class T, int LMAX>  // LMAX: the longest sequence it takes (registers and shared memory)
__global__ void __launch_bounds__(kThreads) scan_short_kernel(
    T* __restrict__ y, int ldy, float* __restrict__ pool, const T* __restrict__ x, int ldx,
    const T* __restrict__ dt, int lddt, const T* __restrict__ dt_bias, const float* __restrict__ A,
    const T* __restrict__ B, const T* __restrict__ C, int ldbc, const T* __restrict__ Dskip,
    const T* __restrict__ z, int ldz, const int32_t* __restrict__ cu, const int32_t* __restrict__ slots, int E,
    int N) {
  __shared__ float sDelta[LMAX][kShortCh], sX[LMAX][kShortCh], sG[LMAX][kShortCh];
  __shared__ __align__(16) float sB[LMAX][16], sC[LMAX][16];
  const int s = blockIdx.y, row0 = cu[s], L = cu[s + 1] - row0;  // L is uniform over the block
  if (L <= 0) return;
  const int e0 = blockIdx.x * kShortCh;
  const int q = threadIdx.x % kStepLanes, c = threadIdx.x / kStepLanes, e = e0 + c;
  const bool active = e < E;
  const int ec = active ? e : 0;  // idle lanes compute on channel 0 and store nothing
  const int n0 = 4 * q;           // this lane's states n0 .. n0 + 3
  float* st = pool + (size_t(slots[s]) * E + ec) * N;
  float a2[4], sv[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const bool ok = active && n0 + i < N;
    a2[i] = ok ? A[size_t(ec) * N + n0 + i] * kLog2e : 0.0f;
    sv[i] = ok ? st[n0 + i] : 0.0f;
  }
  {
    // All loads first, into registers (callB loaded inside the loop that computes, and ncu counted
    // half its stalls on them), only the L rows: callC loaded all 64 (the last row repeated),
    // and 64 sequences of 4 tokens took 1 ms longer.
    constexpr int kRows = kThreads / kShortCh, kPer = LMAX / kRows, kBC = LMAX * 16 / kThreads;
    const int cl = threadIdx.x % kShortCh, el = min(e0 + cl, E - 1), tf = threadIdx.x / kShortCh;
    T rx[kPer], rd[kPer], rz[kPer], rb[kBC], rc[kBC];
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int t = tf + k * kRows;
      const size_t r = size_t(row0 + t);
      if (t < L) {  // predicated, not a branch: the loads still issue together
        rx[k] = x[r * ldx + el];
        rd[k] = dt[r * lddt + el];
        rz[k] = z[r * ldz + el];
      }
    }
#pragma unroll
    for (int k = 0; k < kBC; ++k) {
      const int i = threadIdx.x + k * kThreads;
      const size_t r = size_t(row0 + i / 16);
      const int n = min(i % 16, N - 1);
      if (i / 16 < L) {
        rb[k] = B[r * ldbc + n];
        rc[k] = C[r * ldbc + n];
      }
    }
    const float dtb = to_f(dt_bias[el]);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int t = tf + k * kRows;
      if (t < L) {
        sDelta[t][cl] = softplus_fast(to_f(rd[k]) + dtb);
        sX[t][cl] = to_f(rx[k]);
        sG[t][cl] = silu_fast(to_f(rz[k]));
      }
    }
#pragma unroll
    for (int k = 0; k < kBC; ++k) {
      const int i = threadIdx.x + k * kThreads, t = i / 16, n = i % 16;
      if (t < L) {
        sB[t][n] = n < N ? to_f(rb[k]) : 0.0f;
        sC[t][n] = n < N ? to_f(rc[k]) : 0.0f;
      }
    }
  }
  __syncthreads();
  const float dsk = to_f(Dskip[ec]);
#pragma unroll 4
  for (int t = 0; t < L; ++t) {
    const float delta = sDelta[t][c], xv = sX[t][c], dx = delta * xv;
    const float4 bv = *reinterpret_cast<const float4*>(&sB[t][n0]);
    const float4 cv = *reinterpret_cast<const float4*>(&sC[t][n0]);
    const float b4[4] = {bv.x, bv.y, bv.z, bv.w}, c4[4] = {cv.x, cv.y, cv.z, cv.w};
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      sv[i] = exp2_ftz(delta * a2[i]) * sv[i] + dx * b4[i];
      acc += sv[i] * c4[i];
    }
    // The 4 lanes of a channel are adjacent: xor 1 and 2 stay inside them.
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    if (active && q == 0) y[size_t(row0 + t) * ldy + e] = from_f<T>((acc + dsk * xv) * sG[t][c]);
  }
  if (active) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (n0 + i < N) st[n0 + i] = sv[i];
  }
}

void check_scan(int N, int nseq) {
  HM_CHECK(N >= 1 && N <= kMaxState, "cuda selective_scan: d_state must be in [1, ", kMaxState,
           "], got ", N);
  HM_CHECK(nseq <= 65535, "cuda selective_scan: at most 65535 sequences per batch, got ", nseq);
}

int chunks_of(const RaggedBatch& rb, int chunk) { return std::max(1, ceil_div(rb.max_len, chunk)); }

template <class T, int NM, bool EXACT>
void scan_launch(T* y, int ldy, float* pool, const T* x, int ldx, const T* dt, int lddt,
                 const T* dt_bias, const float* A, const T* B, const T* C, int ldbc,
                 const T* Dskip, const T* z, int ldz, const RaggedBatch& rb, int E, int N,
                 int chunk, void* workspace, cudaStream_t stream) {
  const int nch = chunks_of(rb, chunk);
  HM_CHECK(nch <= 65535, "cuda selective_scan: ", nch, " chunks of ", chunk, " tokens; use longer chunks");
  float* ws_state = static_cast<float*>(workspace);
  float* ws_sum = nch > 1 ? ws_state + size_t(rb.nseq) * nch * E * N : nullptr;
  const dim3 grid(ceil_div(E, kThreads), nch, rb.nseq);
  auto aligned = [](const T* p, int ld) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && size_t(ld) * sizeof(T) % 16 == 0;
  };
  const int vec = (aligned(x, ldx) ? 1 : 0) | (aligned(dt, lddt) ? 2 : 0) | (aligned(z, ldz) ? 4 : 0);
  if (nch > 1) {
    HM_CHECK(workspace != nullptr, "cuda selective_scan: ", nch, " chunks need a workspace");
    scan_chunk_kernel<T, NM, EXACT, kChunkState><<<grid, kThreads, 0, stream>>>(
        y, ldy, pool, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z, ldz, rb.cu_seqlens,
        rb.slots, E, N, chunk, ws_state, ws_sum, vec);
    HM_CUDA_LAUNCHED("selective_scan chunk states");
    scan_carry_kernel<<<dim3(ceil_div(E * N, 256), rb.nseq), 256, 0, stream>>>(
        pool, A, rb.cu_seqlens, rb.slots, E, N, chunk, nch, ws_state, ws_sum);
    HM_CUDA_LAUNCHED("selective_scan carry");
  }
  scan_chunk_kernel<T, NM, EXACT, kOutput><<<grid, kThreads, 0, stream>>>(
      y, ldy, pool, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z, ldz, rb.cu_seqlens,
      rb.slots, E, N, chunk, ws_state, ws_sum, vec);
  HM_CUDA_LAUNCHED("selective_scan output");
}

}  // namespace

int scan_chunk_auto(const RaggedBatch& rb, int E) {
  // The most chunks whose blocks all fit on the GPU at once (one wave), and no more: all but
  // each sequence's last chunk are walked twice (passes 1 and 3), and a second, partial wave
  // cost 19% at B 8 on the H200 (docs/CUDA.md).
  static const long resident = [] {
    int per_sm = 4;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, scan_chunk_kernel<__nv_bfloat16, 16, true, kOutput>, kThreads, 0) != cudaSuccess)
      per_sm = 4;
    return long(sm_count()) * std::max(per_sm, 1);
  }();
  const long per_chunk = long(ceil_div(E, kThreads)) * std::max(rb.nseq, 1);
  const int len = std::max(rb.max_len, 1);
  const int nch = int(std::min<long>(resident / per_chunk, len));
  if (nch <= 1) return len;
  return std::max(32, (ceil_div(len, nch) + 31) / 32 * 32);
}

size_t selective_scan_workspace_bytes(const RaggedBatch& rb, int E, int N, int chunk) {
  if (chunk <= 0) chunk = scan_chunk_auto(rb, E);
  const int nch = chunks_of(rb, chunk);
  return nch > 1 ? size_t(rb.nseq) * nch * E * (N + 1) * sizeof(float) : 0;
}

template <class T>
void selective_scan(T* y, int ldy, float* ssm_state, const T* x, int ldx, const T* dt, int lddt,
                    const T* dt_bias, const float* A, const T* B, const T* C, int ldbc,
                    const T* Dskip, const T* z, int ldz, const RaggedBatch& rb, int E, int N,
                    int chunk, void* workspace, cudaStream_t stream) {
  check_scan(N, rb.nseq);
  if (rb.nseq <= 0 || rb.n_tokens <= 0 || E <= 0) return;
  if (chunk <= 0) chunk = scan_chunk_auto(rb, E);
  if (N == 16)  // Mamba-1's d_state
    scan_launch<T, 16, true>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z,
                             ldz, rb, E, N, chunk, workspace, stream);
  else if (N < 16)
    scan_launch<T, 16, false>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z,
                              ldz, rb, E, N, chunk, workspace, stream);
  else
    scan_launch<T, kMaxState, false>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc,
                                     Dskip, z, ldz, rb, E, N, chunk, workspace, stream);
}

namespace {
template <class T, bool DTW>
void step_launch(T* y, int ldy, float* ssm_state, const int32_t* slots, const T* x, int ldx, const T* dt,
                 int lddt, const T* dt_w, int R, const T* dt_bias, const float* A, const T* B, const T* C,
                 int ldbc, const T* Dskip, const T* z, int ldz, int nseq, int E, int N, cudaStream_t stream) {
  check_scan(N, nseq);
  if (nseq <= 0 || E <= 0) return;
  const dim3 grid(ceil_div(E, kThreads / kStepLanes), nseq);
  const bool vec = N % 4 == 0 && reinterpret_cast<uintptr_t>(ssm_state) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(A) % 16 == 0;
  if (N <= 16)
    launch_pdl("selective_scan_step", scan_step_kernel<T, 16, DTW>, grid, dim3(kThreads), stream, 0, y, ldy, ssm_state,
               slots, x, ldx, dt, lddt, dt_w, R, dt_bias, A, B, C, ldbc, Dskip, z, ldz, E, N, vec);
  else
    launch_pdl("selective_scan_step", scan_step_kernel<T, kMaxState, DTW>, grid, dim3(kThreads), stream, 0, y, ldy,
               ssm_state, slots, x, ldx, dt, lddt, dt_w, R, dt_bias, A, B, C, ldbc, Dskip, z, ldz, E, N, vec);
}

}  // namespace

int scan_short_tokens() {
  static const int v = [] {
    const char* e = std::getenv("HM_CUDA_SCAN_SHORT_TOKENS");  // A/B runs: 0 turns the short path off
    return e != nullptr ? std::max(0, std::atoi(e)) : kScanShortTokensDefault;
  }();
  return v;
}

bool scan_short_fits(const RaggedBatch& rb, int N) {
  return N <= 16 && rb.max_len <= kScanShortLen && rb.n_tokens <= scan_short_tokens();
}

template <class T>
void selective_scan_short(T* y, int ldy, float* ssm_state, const T* x, int ldx, const T* dt, int lddt,
                          const T* dt_bias, const float* A, const T* B, const T* C, int ldbc, const T* Dskip,
                          const T* z, int ldz, const RaggedBatch& rb, int E, int N, cudaStream_t stream) {
  check_scan(N, rb.nseq);
  HM_CHECK(N <= 16, "cuda selective_scan_short: d_state ", N, " above 16");
  HM_CHECK(rb.max_len <= kScanShortLen, "cuda selective_scan_short: a sequence of ", rb.max_len,
           " tokens, above ", kScanShortLen);
  if (rb.nseq <= 0 || rb.n_tokens <= 0 || E <= 0) return;
  const dim3 grid(ceil_div(E, kThreads / kStepLanes), rb.nseq);
  // Sequences of <= 16 tokens (many short prompts or a speculative step): a quarter of the
  // registers and shared memory, twice the blocks per SM. At LMAX 64 for all, 64 sequences of 4
  // tokens took 5.47 ms against stop 38's 4.78 (callD, 1.3B, graphs).
  if (rb.max_len <= 16)
    scan_short_kernel<T, 16><<<grid, kThreads, 0, stream>>>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, B, C,
                                                             ldbc, Dskip, z, ldz, rb.cu_seqlens, rb.slots, E, N);
  else
    scan_short_kernel<T, kScanShortLen><<<grid, kThreads, 0, stream>>>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias,
                                                                        A, B, C, ldbc, Dskip, z, ldz, rb.cu_seqlens,
                                                                        rb.slots, E, N);
  HM_CUDA_LAUNCHED("selective_scan (short)");
}

template <class T>
void selective_scan_step(T* y, int ldy, float* ssm_state, const int32_t* slots, const T* x, int ldx,
                         const T* dt, int lddt, const T* dt_bias, const float* A, const T* B,
                         const T* C, int ldbc, const T* Dskip, const T* z, int ldz, int nseq, int E,
                         int N, cudaStream_t stream) {
  step_launch<T, false>(y, ldy, ssm_state, slots, x, ldx, dt, lddt, nullptr, 0, dt_bias, A, B, C, ldbc, Dskip, z,
                        ldz, nseq, E, N, stream);
}

template <class T>
void selective_scan_step_dt(T* y, int ldy, float* ssm_state, const int32_t* slots, const T* x, int ldx,
                            const T* dt_r, int lddtr, const T* dt_w, int R, const T* dt_bias, const float* A,
                            const T* B, const T* C, int ldbc, const T* Dskip, const T* z, int ldz, int nseq,
                            int E, int N, cudaStream_t stream) {
  HM_CHECK(R >= 1, "cuda selective_scan_step_dt: dt rank ", R, " must be >= 1");
  step_launch<T, true>(y, ldy, ssm_state, slots, x, ldx, dt_r, lddtr, dt_w, R, dt_bias, A, B, C, ldbc, Dskip, z,
                       ldz, nseq, E, N, stream);
}

#define HM_INST(T)                                                                                \
  template void selective_scan<T>(T*, int, float*, const T*, int, const T*, int, const T*,       \
                                  const float*, const T*, const T*, int, const T*, const T*, int, \
                                  const RaggedBatch&, int, int, int, void*, cudaStream_t);        \
  template void selective_scan_short<T>(T*, int, float*, const T*, int, const T*, int, const T*, \
                                        const float*, const T*, const T*, int, const T*, const T*, int, \
                                        const RaggedBatch&, int, int, cudaStream_t);                   \
  template void selective_scan_step<T>(T*, int, float*, const int32_t*, const T*, int, const T*, \
                                       int, const T*, const float*, const T*, const T*, int,     \
                                       const T*, const T*, int, int, int, int, cudaStream_t);    \
  template void selective_scan_step_dt<T>(T*, int, float*, const int32_t*, const T*, int, const T*, \
                                          int, const T*, int, const T*, const float*, const T*,     \
                                          const T*, int, const T*, const T*, int, int, int, int,    \
                                          cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST

}  // namespace hm::cuda
