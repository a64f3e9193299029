// Causal depthwise conv1d + bias + SiLU for training: the forward from a zero window and its
// backward (ref::grad::conv1d_silu_forward / _backward over every sequence of a ragged batch).
//
// One thread per channel walks a tile of kRows token rows (which may span sequences), keeping
// the K inputs of the current row in registers. The backward recomputes the pre-activation,
// spreads dpre[t] w[j] onto the K rows t reads (dx of a row is complete once the walk has
// passed K-1 rows beyond it, or its sequence has ended), and sums dw and db over its own rows
// into a per-tile part; a second kernel adds the parts to dw and db tile by tile, in order.
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mamba_grad.h"
#include "kernels/cuda/reduce.cuh"

namespace hm::cuda {
namespace {

constexpr int kThreads = 128;  // channels per block
constexpr int kRows = 64;      // token rows per block
constexpr int kAhead = 8;      // rows whose loads a thread issues at once

__device__ __forceinline__ float silu_grad(float v) {  // s + v s (1 - s), s = sigmoid(v)
  const float s = 1.0f / (1.0f + expf(-v));
  return s * (1.0f + v * (1.0f - s));
}

// The window of row t: xw[j] = x[t-K+1+j] of t's sequence, zeros before its first row. Before
// the walk starts at r0 it holds the rows r0-K .. r0-1 (xw[0] is shifted out first).
template <class T, int K>
__device__ __forceinline__ void window_before(float (&xw)[K], const T* x, int ldx, int r0, int first, int e) {
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int r = r0 - K + j;
    xw[j] = r >= first ? to_f(x[size_t(r) * ldx + e]) : 0.0f;
  }
}
template <int K>
__device__ __forceinline__ void shift_in(float (&v)[K], float next) {
#pragma unroll
  for (int j = 0; j + 1 < K; ++j) v[j] = v[j + 1];
  v[K - 1] = next;
}

template <class T, int K>
__global__ void __launch_bounds__(kThreads) conv_train_kernel(T* __restrict__ out, int ldo, const T* __restrict__ x,
                                                              int ldx, const T* __restrict__ w, int ldw,
                                                              const T* __restrict__ b, const int32_t* __restrict__ cu,
                                                              int nseq, int n_tokens, int E) {
  const int e = blockIdx.y * kThreads + threadIdx.x;
  const int r0 = blockIdx.x * kRows, r1 = min(r0 + kRows, n_tokens);
  if (e >= E) return;
  float wr[K];
#pragma unroll
  for (int j = 0; j < K; ++j) wr[j] = to_f(w[size_t(e) * ldw + j]);
  const float bias = to_f(b[e]);
  int s = seq_of_row(cu, nseq, r0), end = cu[s + 1];
  float xw[K];
  window_before<T, K>(xw, x, ldx, r0, cu[s], e);
  for (int t0 = r0; t0 < r1; t0 += kAhead) {
    float xa[kAhead];  // the group's loads are issued together, not one row's latency at a time
#pragma unroll
    for (int u = 0; u < kAhead; ++u) xa[u] = t0 + u < r1 ? to_f(x[size_t(t0 + u) * ldx + e]) : 0.0f;
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int t = t0 + u;
      if (t >= r1) break;
      if (t == end) {  // the next sequence (skipping empty ones) starts from zeros
        while (cu[s + 1] <= t) ++s;
        end = cu[s + 1];
#pragma unroll
        for (int j = 0; j < K; ++j) xw[j] = 0.0f;
      }
      shift_in<K>(xw, xa[u]);
      float acc = bias;  // pre[t] = b + sum_j w[j] x[t-K+1+j], j ascending
#pragma unroll
      for (int j = 0; j < K; ++j) acc += wr[j] * xw[j];
      out[size_t(t) * ldo + e] = from_f<T>(silu(acc));
    }
  }
}

// part[(tile * (K+1) + j) * E + e]: the tile's sum for dw[e, j] (j < K) and db[e] (j = K).
template <class T, int K>
__global__ void __launch_bounds__(kThreads) conv_grad_kernel(T* __restrict__ dx, int lddx, float* __restrict__ part,
                                                             const T* __restrict__ dout, int ldg,
                                                             const T* __restrict__ x, int ldx,
                                                             const T* __restrict__ w, int ldw,
                                                             const T* __restrict__ b, const int32_t* __restrict__ cu,
                                                             int nseq, int n_tokens, int E) {
  const int e = blockIdx.y * kThreads + threadIdx.x;
  const int r0 = blockIdx.x * kRows, r1 = min(r0 + kRows, n_tokens);
  // Rows up to K-1 past the tile feed the dx of its last rows.
  const int tend = min(r1 + K - 1, n_tokens);
  if (e >= E) return;
  float wr[K];
#pragma unroll
  for (int j = 0; j < K; ++j) wr[j] = to_f(w[size_t(e) * ldw + j]);
  const float bias = to_f(b[e]);
  int s = seq_of_row(cu, nseq, r0), first = cu[s], end = cu[s + 1];
  float xw[K], dacc[K], dw[K], db = 0.0f;  // dacc[j]: dx of row t-K+1+j so far
#pragma unroll
  for (int j = 0; j < K; ++j) dacc[j] = dw[j] = 0.0f;
  window_before<T, K>(xw, x, ldx, r0, first, e);
  bool done = false;
  for (int t0 = r0; t0 < tend && !done; t0 += kAhead) {
    float xa[kAhead], ga[kAhead];  // the group's loads are issued together
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const bool in = t0 + u < tend;
      xa[u] = in ? to_f(x[size_t(t0 + u) * ldx + e]) : 0.0f;
      ga[u] = in ? to_f(dout[size_t(t0 + u) * ldg + e]) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int t = t0 + u;
      if (t >= tend) break;
      if (t == end) {
        if (t >= r1) {  // rows of the next sequence add nothing to this tile's dx
          done = true;
          break;
        }
        while (cu[s + 1] <= t) ++s;
        first = cu[s];
        end = cu[s + 1];
#pragma unroll
        for (int j = 0; j < K; ++j) xw[j] = dacc[j] = 0.0f;
      }
      shift_in<K>(xw, xa[u]);
      shift_in<K>(dacc, 0.0f);
      float pre = bias;
#pragma unroll
      for (int j = 0; j < K; ++j) pre += wr[j] * xw[j];
      const float dp = ga[u] * silu_grad(pre);  // out = silu(pre)
      if (t < r1) {
        db += dp;  // db += dpre.sum(t)
#pragma unroll
        for (int j = 0; j < K; ++j) dw[j] += dp * xw[j];  // dw[j] += dpre[t] x[t-K+1+j]
      }
#pragma unroll
      for (int j = 0; j < K; ++j) dacc[j] += wr[j] * dp;  // dx[t-K+1+j] += dpre[t] w[j]
      const int lo = max(r0, first);
      if (t + 1 == end) {  // the sequence ends: every row still held is complete
#pragma unroll
        for (int j = 0; j < K; ++j) {
          const int r = t - K + 1 + j;
          if (r >= lo && r < r1) dx[size_t(r) * lddx + e] = from_f<T>(dacc[j]);
        }
      } else {  // no later row reads row t-K+1
        const int r = t - K + 1;
        if (r >= lo && r < r1) dx[size_t(r) * lddx + e] = from_f<T>(dacc[0]);
      }
    }
  }
  float* p = part + size_t(blockIdx.x) * (K + 1) * E + e;
#pragma unroll
  for (int j = 0; j < K; ++j) p[size_t(j) * E] = dw[j];
  p[size_t(K) * E] = db;
}

// dw[e, j] += the tiles' sum of part for column j * E + e (j < K), db[e] for j = K.
template <class G>
struct ConvGradOut {
  G* dw;
  int lddw;
  G* db;
  int E, K;
  __device__ void operator()(int idx, float t) const {
    const int j = idx / E, e = idx % E;
    G* d = j < K ? dw + size_t(e) * lddw + j : db + e;
    *d = from_f<G>(to_f(*d) + t);
  }
};

void check_conv(int K) {
  HM_CHECK(K >= 2 && K <= kMaxConv, "cuda conv1d_silu_train: d_conv must be in [2, ", kMaxConv, "], got ", K);
}

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

dim3 conv_grid(int n_tokens, int E) {
  HM_CHECK(ceil_div(E, kThreads) <= 65535, "cuda conv1d_silu_train: d_inner ", E, " is too wide");
  return dim3(ceil_div(n_tokens, kRows), ceil_div(E, kThreads));
}

}  // namespace

size_t conv1d_silu_backward_workspace_bytes(int n_tokens, int E, int K) {
  return size_t(ceil_div(n_tokens, kRows)) * size_t(K + 1) * size_t(E) * sizeof(float);
}

template <class T>
void conv1d_silu_train(T* out, int ldo, const T* x, int ldx, const T* w, int ldw, const T* b,
                       const RaggedBatch& rb, int E, int K, cudaStream_t stream) {
  check_conv(K);
  if (rb.nseq <= 0 || rb.n_tokens <= 0 || E <= 0) return;
  const dim3 grid = conv_grid(rb.n_tokens, E);
  with_k(K, [&](auto kc) {
    conv_train_kernel<T, decltype(kc)::value><<<grid, kThreads, 0, stream>>>(out, ldo, x, ldx, w, ldw, b,
                                                                            rb.cu_seqlens, rb.nseq, rb.n_tokens, E);
  });
  HM_CUDA_LAUNCHED("conv1d_silu_train");
}

template <class T, class G>
void conv1d_silu_backward(T* dx, int lddx, G* dw, int lddw, G* db, const T* dout, int ldg, const T* x, int ldx,
                          const T* w, int ldw, const T* b, const RaggedBatch& rb, int E, int K, void* workspace,
                          cudaStream_t stream) {
  check_conv(K);
  if (rb.nseq <= 0 || rb.n_tokens <= 0 || E <= 0) return;
  HM_CHECK(workspace != nullptr, "cuda conv1d_silu_backward: no workspace");
  const dim3 grid = conv_grid(rb.n_tokens, E);
  float* part = static_cast<float*>(workspace);
  with_k(K, [&](auto kc) {
    conv_grad_kernel<T, decltype(kc)::value><<<grid, kThreads, 0, stream>>>(
        dx, lddx, part, dout, ldg, x, ldx, w, ldw, b, rb.cu_seqlens, rb.nseq, rb.n_tokens, E);
  });
  HM_CUDA_LAUNCHED("conv1d_silu_backward");
  column_sums<float>(part, int(grid.x), (K + 1) * E, ConvGradOut<G>{dw, lddw, db, E, K}, stream,
                    "conv1d_silu_backward (dw, db)");
  HM_CUDA_LAUNCHED("conv1d_silu_backward sum");
}

#define HM_INST(T)                                                                                          \
  template void conv1d_silu_train<T>(T*, int, const T*, int, const T*, int, const T*, const RaggedBatch&,  \
                                     int, int, cudaStream_t);                                               \
  template void conv1d_silu_backward<T, float>(T*, int, float*, int, float*, const T*, int, const T*, int, \
                                               const T*, int, const T*, const RaggedBatch&, int, int, void*, \
                                               cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST
#define HM_INST(T)                                                                                        \
  template void conv1d_silu_backward<T, T>(T*, int, T*, int, T*, const T*, int, const T*, int, const T*, \
                                           int, const T*, const RaggedBatch&, int, int, void*, cudaStream_t);
HM_INST(__nv_bfloat16)
HM_INST(__half)
#undef HM_INST

}  // namespace hm::cuda
