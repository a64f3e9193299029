// Causal depthwise conv1d + bias + SiLU, prefill over a ragged batch and the one-token step.
// The window of a channel is its last K-1 inputs (float, per slot) followed by the new rows.
#include <cuda_pipeline_primitives.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace hm::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Prefill tile: kRows token rows x one warp's width of 16-byte vectors (256 channels of bf16 or
// f16, 128 of f32). 32 rows keep ~4 tiles per SM at B 1, L 2048, E 2048. A batch too small to
// give every SM one such tile (a short prompt: 52 tokens at E 4096 made 32 blocks, 12.6 us on an
// H100) takes tiles of kShortRows, one row per warp.
constexpr int kRows = 32;
constexpr int kShortRows = kWarps;
template <class T> constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte vector
template <class T> constexpr int kCols = 32 * kVec<T>;

// Input tau of sequence s for channel e: tau >= 0 is a new row, tau in [-(K-1), -1] the carried
// state (state[K-1+tau]).
template <class T>
__device__ __forceinline__ float conv_input(const T* x, int ldx, int row0, const float* st, int K,
                                            int tau, int e) {
  return tau >= 0 ? to_f(x[size_t(row0 + tau) * ldx + e]) : st[K - 1 + tau];
}

// 16 bytes of T as floats, and back (registers only: constant indices after unrolling).
template <class T>
__device__ __forceinline__ void unpack16(const uint4& u, float (&f)[kVec<T>]) {
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int v = 0; v < kVec<T>; ++v) f[v] = to_f(e[v]);
}
template <class T>
__device__ __forceinline__ uint4 pack16(const float (&f)[kVec<T>]) {
  uint4 u;
  T* e = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int v = 0; v < kVec<T>; ++v) e[v] = from_f<T>(f[v]);
  return u;
}

// Block (tile of R token rows of the whole batch, kRows or kShortRows; kCols channels). The tile and the K-1 rows
// before it (a halo that the previous tile also reads, mostly from L2) are staged in shared
// memory with 16-byte asynchronous copies (vec & 1: x and ldx 16-byte aligned; else element by
// element); lane l then computes channels c0 + l V .. + V-1 of one row per warp at a time, K taps
// from shared memory, and stores them as one 16-byte vector (vec & 2: out and ldo aligned).
// A tile may span several sequences: each row finds its own, and a tap before its sequence's
// first row reads the slot's carried state instead. Reads the state; never writes it
// (conv_state_kernel does, after).
template <class T, int K, int R>
__global__ void __launch_bounds__(kThreads) conv_tile_kernel(
    T* __restrict__ out, int ldo, const float* __restrict__ state, const T* __restrict__ x, int ldx,
    const T* __restrict__ w, const T* __restrict__ b, const int32_t* __restrict__ cu,
    const int32_t* __restrict__ slots, int nseq, int n_tokens, int E, int vec) {
  constexpr int V = kVec<T>, TC = kCols<T>;
  __shared__ __align__(16) T sx[(R + K - 1) * TC];
  __shared__ int s_seq[R], s_t[R];
  const int r0 = blockIdx.x * R, c0 = blockIdx.y * TC;
  // Staged rows [g0, g1): every row a tap can read. A tap of row r < g1 reads row r-K+1+j only
  // when that row is in r's own sequence (so >= 0) and j >= 0 (so >= r0 - (K-1)).
  const int g0 = max(r0 - (K - 1), 0), g1 = min(r0 + R, n_tokens);
  for (int i = threadIdx.x; i < (g1 - g0) * 32; i += kThreads) {
    const int r = i / 32, j = (i % 32) * V, col = c0 + j;
    const T* p = x + size_t(g0 + r) * ldx + col;
    T* q = sx + r * TC + j;
    if ((vec & 1) && col + V <= E) {
      __pipeline_memcpy_async(q, p, 16);
    } else {  // zeros past E: those lanes compute values that are never stored
#pragma unroll
      for (int k = 0; k < V; ++k) q[k] = col + k < E ? p[k] : from_f<T>(0.0f);
    }
  }
  __pipeline_commit();
  if (threadIdx.x < R) {
    const int r = r0 + threadIdx.x;
    const int s = r < n_tokens ? seq_of_row(cu, nseq, r) : 0;
    s_seq[threadIdx.x] = s;
    s_t[threadIdx.x] = r - cu[s];  // the row's index in its sequence
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, c = c0 + lane * V;
  float wr[K][V], bias[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const bool ok = c + v < E;
    bias[v] = ok ? to_f(b[c + v]) : 0.0f;
#pragma unroll
    for (int j = 0; j < K; ++j) wr[j][v] = ok ? to_f(w[size_t(c + v) * K + j]) : 0.0f;
  }
  __pipeline_wait_prior(0);
  __syncthreads();

  for (int rl = warp; rl < R && r0 + rl < n_tokens; rl += kWarps) {
    const int r = r0 + rl, t = s_t[rl];
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = bias[v];
#pragma unroll
    for (int j = 0; j < K; ++j) {  // out[t] = b + sum_j w[e,j] * in[t-K+1+j], j ascending
      const int tau = t - (K - 1) + j;
      float in[V];
      if (tau >= 0) {
        unpack16<T>(*reinterpret_cast<const uint4*>(sx + (r - (K - 1) + j - g0) * TC + lane * V), in);
      } else {  // before the sequence's first row: the slot's state[K-1+tau]
        const float* st = state + (size_t(slots[s_seq[rl]]) * E + c) * (K - 1) + (K - 1 + tau);
#pragma unroll
        for (int v = 0; v < V; ++v) in[v] = c + v < E ? st[v * (K - 1)] : 0.0f;
      }
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += wr[j][v] * in[v];
    }
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = silu(acc[v]);
    T* o = out + size_t(r) * ldo + c;
    if ((vec & 2) && c + V <= E) {
      *reinterpret_cast<uint4*>(o) = pack16<T>(acc);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        if (c + v < E) o[v] = from_f<T>(acc[v]);
    }
  }
}

// One thread per (sequence, channel): the state becomes the last K-1 inputs, which may still
// include old state when the chunk is shorter than K-1. All reads precede the writes.
template <class T>
__global__ void conv_state_kernel(float* state, const T* __restrict__ x, int ldx,
                                  const int32_t* __restrict__ cu, const int32_t* __restrict__ slots,
                                  int E, int K) {
  const int e = blockIdx.x * kThreads + threadIdx.x;
  if (e >= E) return;
  const int s = blockIdx.y, row0 = cu[s], L = cu[s + 1] - row0;
  float* st = state + (size_t(slots[s]) * E + e) * (K - 1);
  float next[kMaxConv - 1];
#pragma unroll
  for (int j = 0; j < kMaxConv - 1; ++j)
    if (j < K - 1) next[j] = conv_input(x, ldx, row0, st, K, L - (K - 1) + j, e);
#pragma unroll
  for (int j = 0; j < kMaxConv - 1; ++j)
    if (j < K - 1) st[j] = next[j];
}

// Decode: one thread per (sequence, 4 channels) reads their windows, 4 (K-1) contiguous floats,
// writes the outputs and shifts the windows. vec (the pool 16-byte aligned and E (K-1) a
// multiple of 4, so every slot's row and every 4th channel's window start on 16 bytes): the
// windows move as K-1 float4 each way; else (and for the last channels past a multiple of 4)
// float by float. NORM (conv1d_silu_step_normed): x is row s of xz, the projection of h[s] itself;
// each block first sums h[s]'s squares for r = 1 / rms(h[s]), then stores x r and z r (z = x + E)
// rounded to T in place and convolves the stored x, as the plain ops would have stored it.
template <class T, int K, bool NORM>
__global__ void __launch_bounds__(kThreads) conv_step_kernel(
    T* __restrict__ out, int ldo, float* state, const int32_t* __restrict__ slots, T* __restrict__ x,
    int ldx, const T* __restrict__ w, const T* __restrict__ b, int E, bool vec, const T* __restrict__ h, int ldh,
    int D, float eps) {
  constexpr int C4 = 4, W = C4 * (K - 1);  // channels per thread, floats of their windows
  const int c = (blockIdx.x * kThreads + threadIdx.x) * C4;
  const int s = blockIdx.y;
  float r = 1.0f;
  if constexpr (NORM) {  // before the early return: every thread takes part in the block sum
    float ss = 0;
    for (int j = threadIdx.x; j < D; j += kThreads) {
      const float v = to_f(h[size_t(s) * ldh + j]);
      ss += v * v;
    }
    r = rsqrtf(block_sum<kThreads>(ss) / float(D) + eps);
  }
  if (c >= E) return;
  float* st = state + (size_t(slots[s]) * E + c) * (K - 1);
  const bool full = vec && c + C4 <= E;
  float win[W];
  if (full) {
#pragma unroll
    for (int i = 0; i < K - 1; ++i) {
      const float4 f = reinterpret_cast<const float4*>(st)[i];
      win[4 * i] = f.x; win[4 * i + 1] = f.y; win[4 * i + 2] = f.z; win[4 * i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) win[i] = c + i / (K - 1) < E ? st[i] : 0.0f;
  }
  float next[W];
#pragma unroll
  for (int v = 0; v < C4; ++v) {
    const int e = c + v;
    if (e >= E) break;
    const float* wv = win + v * (K - 1);
    T* xe = x + size_t(s) * ldx + e;
    float xv = to_f(*xe);
    if constexpr (NORM) {
      const T xs = from_f<T>(xv * r);
      *xe = xs;
      xv = to_f(xs);
      xe[E] = from_f<T>(to_f(xe[E]) * r);
    }
    float acc = to_f(b[e]) + to_f(w[size_t(e) * K + K - 1]) * xv;  // conv_state[:, -1] = x
#pragma unroll
    for (int j = 0; j < K - 1; ++j) acc += to_f(w[size_t(e) * K + j]) * wv[j];
    out[size_t(s) * ldo + e] = from_f<T>(silu(acc));
#pragma unroll
    for (int j = 0; j < K - 1; ++j) next[v * (K - 1) + j] = j + 1 < K - 1 ? wv[j + 1] : xv;  // roll left
  }
  if (full) {
#pragma unroll
    for (int i = 0; i < K - 1; ++i)
      reinterpret_cast<float4*>(st)[i] = make_float4(next[4 * i], next[4 * i + 1], next[4 * i + 2], next[4 * i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i)
      if (c + i / (K - 1) < E) st[i] = next[i];
  }
}

void check_conv(int K) {
  HM_CHECK(K >= 2 && K <= kMaxConv, "cuda conv1d: d_conv must be in [2, ", kMaxConv, "], got ", K);
}

// f(std::integral_constant<int, K>) for K in [2, kMaxConv] (check_conv ran first).
template <class F>
void with_k(int K, F&& f) {
  static_assert(kMaxConv == 8, "with_k lists every d_conv up to kMaxConv");
  switch (K) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// 16-byte vectors of T can start at p + i * ld for every row i.
template <class T>
bool aligned16(const T* p, int ld) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && size_t(ld) * sizeof(T) % 16 == 0;
}

}  // namespace

template <class T>
void conv1d_silu(T* out, int ldo, float* conv_state, const T* x, int ldx, const T* w, const T* b,
                 const RaggedBatch& rb, int E, int K, cudaStream_t stream) {
  check_conv(K);
  if (rb.nseq <= 0 || E <= 0) return;
  if (rb.n_tokens > 0) {
    HM_CHECK(ceil_div(E, kCols<T>) <= 65535, "cuda conv1d: d_inner ", E, " is too wide");
    const int col_blocks = ceil_div(E, kCols<T>);
    const bool few = long(ceil_div(rb.n_tokens, kRows)) * col_blocks < long(sm_count());
    const dim3 grid(ceil_div(rb.n_tokens, few ? kShortRows : kRows), col_blocks);
    const int vec = (aligned16(x, ldx) ? 1 : 0) | (aligned16(out, ldo) ? 2 : 0);
    with_k(K, [&](auto kc) {
      if (few)
        conv_tile_kernel<T, decltype(kc)::value, kShortRows><<<grid, kThreads, 0, stream>>>(
            out, ldo, conv_state, x, ldx, w, b, rb.cu_seqlens, rb.slots, rb.nseq, rb.n_tokens, E, vec);
      else
        conv_tile_kernel<T, decltype(kc)::value, kRows><<<grid, kThreads, 0, stream>>>(
            out, ldo, conv_state, x, ldx, w, b, rb.cu_seqlens, rb.slots, rb.nseq, rb.n_tokens, E, vec);
    });
    HM_CUDA_LAUNCHED("conv1d_silu");
  }
  conv_state_kernel<T><<<dim3(ceil_div(E, kThreads), rb.nseq), kThreads, 0, stream>>>(
      conv_state, x, ldx, rb.cu_seqlens, rb.slots, E, K);
  HM_CUDA_LAUNCHED("conv1d_silu state");
}

template <class T>
void conv1d_silu_step(T* out, int ldo, float* conv_state, const int32_t* slots, const T* x, int ldx,
                      const T* w, const T* b, int nseq, int E, int K, cudaStream_t stream) {
  check_conv(K);
  if (nseq <= 0 || E <= 0) return;
  const bool vec = reinterpret_cast<uintptr_t>(conv_state) % 16 == 0 && E * (K - 1) % 4 == 0;
  with_k(K, [&](auto kc) {
    // NORM off: x is only read.
    conv_step_kernel<T, decltype(kc)::value, false><<<dim3(ceil_div(E, 4 * kThreads), nseq), kThreads, 0, stream>>>(
        out, ldo, conv_state, slots, const_cast<T*>(x), ldx, w, b, E, vec, nullptr, 0, 0, 0.0f);
  });
  HM_CUDA_LAUNCHED("conv1d_silu_step");
}

template <class T>
void conv1d_silu_step_normed(T* out, int ldo, float* conv_state, const int32_t* slots, T* xz, int ldxz,
                             const T* h, int ldh, int D, float eps, const T* w, const T* b, int nseq, int E, int K,
                             cudaStream_t stream) {
  check_conv(K);
  HM_CHECK(D > 0, "cuda conv1d_silu_step_normed: h has ", D, " columns");
  if (nseq <= 0 || E <= 0) return;
  const bool vec = reinterpret_cast<uintptr_t>(conv_state) % 16 == 0 && E * (K - 1) % 4 == 0;
  with_k(K, [&](auto kc) {
    conv_step_kernel<T, decltype(kc)::value, true><<<dim3(ceil_div(E, 4 * kThreads), nseq), kThreads, 0, stream>>>(
        out, ldo, conv_state, slots, xz, ldxz, w, b, E, vec, h, ldh, D, eps);
  });
  HM_CUDA_LAUNCHED("conv1d_silu_step_normed");
}

#define HM_INST(T)                                                                               \
  template void conv1d_silu<T>(T*, int, float*, const T*, int, const T*, const T*,              \
                               const RaggedBatch&, int, int, cudaStream_t);                     \
  template void conv1d_silu_step<T>(T*, int, float*, const int32_t*, const T*, int, const T*,   \
                                    const T*, int, int, int, cudaStream_t);                     \
  template void conv1d_silu_step_normed<T>(T*, int, float*, const int32_t*, T*, int, const T*, int, \
                                           int, float, const T*, const T*, int, int, int, cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST

}  // namespace hm::cuda
