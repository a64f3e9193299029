// Causal depthwise conv1d + bias + SiLU, prefill over a ragged batch and the one-token step.
// The window of a channel is its last K-1 inputs (float, per slot) followed by the new rows.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace hm::cuda {
namespace {

constexpr int kThreads = 128;

// Input tau of sequence s for channel e: tau >= 0 is a new row, tau in [-(K-1), -1] the carried
// state (state[K-1+tau]).
template <class T>
__device__ __forceinline__ float conv_input(const T* x, int ldx, int row0, const float* st, int K,
                                            int tau, int e) {
  return tau >= 0 ? to_f(x[size_t(row0 + tau) * ldx + e]) : st[K - 1 + tau];
}

// One thread per (row, channel); rows on grid x (up to 2^31 - 1), channel blocks on y. Reads the state; never writes it (conv_state_kernel does, after).
template <class T>
__global__ void conv_kernel(T* __restrict__ out, int ldo, const float* __restrict__ state,
                            const T* __restrict__ x, int ldx, const T* __restrict__ w,
                            const T* __restrict__ b, const int32_t* __restrict__ cu,
                            const int32_t* __restrict__ slots, int nseq, int E, int K) {
  const int e = blockIdx.y * kThreads + threadIdx.x;
  if (e >= E) return;
  const int row = blockIdx.x;
  const int s = seq_of_row(cu, nseq, row);
  const int row0 = cu[s], t = row - row0;
  const float* st = state + (size_t(slots[s]) * E + e) * (K - 1);
  float acc = to_f(b[e]);
  for (int j = 0; j < K; ++j)  // out[t] = sum_j w[e,j] * in[t-K+1+j]
    acc += to_f(w[size_t(e) * K + j]) * conv_input(x, ldx, row0, st, K, t - K + 1 + j, e);
  out[size_t(row) * ldo + e] = from_f<T>(silu(acc));
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

// Decode: one thread per (sequence, channel) reads the window, writes the output and shifts it.
template <class T>
__global__ void conv_step_kernel(T* __restrict__ out, int ldo, float* state,
                                 const int32_t* __restrict__ slots, const T* __restrict__ x,
                                 int ldx, const T* __restrict__ w, const T* __restrict__ b, int E,
                                 int K) {
  const int e = blockIdx.x * kThreads + threadIdx.x;
  if (e >= E) return;
  const int s = blockIdx.y;
  float* st = state + (size_t(slots[s]) * E + e) * (K - 1);
  float win[kMaxConv];
#pragma unroll
  for (int j = 0; j < kMaxConv - 1; ++j)
    if (j < K - 1) win[j] = st[j];
  const float xv = to_f(x[size_t(s) * ldx + e]);
  float acc = to_f(b[e]) + to_f(w[size_t(e) * K + K - 1]) * xv;  // conv_state[:, -1] = x
#pragma unroll
  for (int j = 0; j < kMaxConv - 1; ++j)
    if (j < K - 1) acc += to_f(w[size_t(e) * K + j]) * win[j];
  out[size_t(s) * ldo + e] = from_f<T>(silu(acc));
#pragma unroll
  for (int j = 0; j < kMaxConv - 1; ++j)  // roll left
    if (j < K - 1) st[j] = j + 1 < K - 1 ? win[j + 1] : xv;
}

void check_conv(int K) {
  HM_CHECK(K >= 2 && K <= kMaxConv, "cuda conv1d: d_conv must be in [2, ", kMaxConv, "], got ", K);
}

}  // namespace

template <class T>
void conv1d_silu(T* out, int ldo, float* conv_state, const T* x, int ldx, const T* w, const T* b,
                 const RaggedBatch& rb, int E, int K, cudaStream_t stream) {
  check_conv(K);
  if (rb.nseq <= 0 || E <= 0) return;
  if (rb.n_tokens > 0) {
    conv_kernel<T><<<dim3(rb.n_tokens, ceil_div(E, kThreads)), kThreads, 0, stream>>>(
        out, ldo, conv_state, x, ldx, w, b, rb.cu_seqlens, rb.slots, rb.nseq, E, K);
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
  conv_step_kernel<T><<<dim3(ceil_div(E, kThreads), nseq), kThreads, 0, stream>>>(
      out, ldo, conv_state, slots, x, ldx, w, b, E, K);
  HM_CUDA_LAUNCHED("conv1d_silu_step");
}

#define HM_INST(T)                                                                               \
  template void conv1d_silu<T>(T*, int, float*, const T*, int, const T*, const T*,              \
                               const RaggedBatch&, int, int, cudaStream_t);                     \
  template void conv1d_silu_step<T>(T*, int, float*, const int32_t*, const T*, int, const T*,   \
                                    const T*, int, int, int, cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST

}  // namespace hm::cuda
