// Mamba-1 selective scan: a chunked parallel prefill over a ragged batch, and the decode step.
//
// Per channel e and state n the scan is s_t = a_t s_{t-1} + b_t with a_t = exp(delta_t A[e,n]),
// b_t = delta_t B[t,n] x[t,e]. Over a chunk of tokens, the end state is P s_in + S, where
// P = exp(A[e,n] * sum_t delta_t) and S is the chunk scanned from zero. So the chunks of a
// sequence are independent but for their start states, which a short sequential pass over
// the chunks (not the tokens) supplies. That keeps the SMs busy at batch 1, where one thread
// per channel walking all tokens would leave most of the GPU idle.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace hm::cuda {
namespace {

constexpr int kThreads = 128;  // channels per block: one thread per channel, its N states in registers
constexpr int kTile = 32;      // tokens of B and C staged in shared memory at a time
constexpr float kLog2e = 1.4426950408889634f;

enum Pass { kChunkState, kOutput };

// Pass 1 (kChunkState): scan chunk c of sequence s from zero; write its end state to
// ws_state[s, c, e, :] and its sum of delta to ws_sum[s, c, e].
// Pass 3 (kOutput): scan from the chunk's true start state (ws_state after the carry pass, or
// the slot's state when the whole sequence is one chunk) and write y; in the single-chunk case
// the final state goes back to the slot.
template <class T, int NM, Pass P>
__global__ void __launch_bounds__(kThreads) scan_chunk_kernel(
    T* __restrict__ y, int ldy, float* pool, const T* __restrict__ x, int ldx,
    const T* __restrict__ dt, int lddt, const T* __restrict__ dt_bias, const float* __restrict__ A,
    const T* __restrict__ B, const T* __restrict__ C, int ldbc, const T* __restrict__ Dskip,
    const T* __restrict__ z, int ldz, const int32_t* __restrict__ cu,
    const int32_t* __restrict__ slots, int E, int N, int chunk, int nch, float* ws_state,
    float* ws_sum) {
  constexpr int U = NM <= 16 ? 8 : 2;  // tokens whose loads are issued together
  __shared__ float sB[kTile * NM];
  __shared__ float sC[P == kOutput ? kTile * NM : 1];
  const int e = blockIdx.x * kThreads + threadIdx.x;
  const int c = blockIdx.y, s = blockIdx.z;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  const int tb = c * chunk;
  if (tb >= L) return;  // uniform over the block: this sequence is shorter
  const int te = min(L, tb + chunk);
  const bool active = e < E;
  const bool single = nch == 1;
  const size_t wbase = (size_t(s) * nch + c) * E + e;  // [s, c, e] in ws_sum; x N in ws_state
  float* slot_state = pool + (size_t(slots[s]) * E + e) * N;

  float a2[NM], st[NM];
  float dtb = 0, dsk = 0, sum_delta = 0;
  if (active) {
    dtb = to_f(dt_bias[e]);
    dsk = to_f(Dskip[e]);
#pragma unroll
    for (int n = 0; n < NM; ++n) {
      a2[n] = n < N ? A[size_t(e) * N + n] * kLog2e : 0.0f;
      st[n] = 0.0f;
      if (P == kOutput && n < N) st[n] = single ? slot_state[n] : ws_state[wbase * N + n];
    }
  }
  for (int t0 = tb; t0 < te; t0 += kTile) {
    const int nt = min(kTile, te - t0);
    __syncthreads();  // the previous tile is consumed
    for (int i = threadIdx.x; i < nt * N; i += kThreads) {
      const int t = i / N, n = i % N;
      const size_t r = size_t(row0 + t0 + t) * ldbc + n;
      sB[t * NM + n] = to_f(B[r]);
      if constexpr (P == kOutput) sC[t * NM + n] = to_f(C[r]);
    }
    __syncthreads();
    if (!active) continue;
    for (int tt = 0; tt < nt; tt += U) {
      float xv[U], dv[U], zv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (tt + u >= nt) break;
        const size_t r = size_t(row0 + t0 + tt + u);
        xv[u] = to_f(x[r * ldx + e]);
        dv[u] = to_f(dt[r * lddt + e]);
        if constexpr (P == kOutput) zv[u] = to_f(z[r * ldz + e]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (tt + u >= nt) break;
        const float delta = softplus(dv[u] + dtb);
        const float dx = delta * xv[u];
        const float* Bt = sB + (tt + u) * NM;
        float acc = 0.0f;
#pragma unroll
        for (int n = 0; n < NM; ++n) {
          if (n < N) {
            st[n] = exp2f(delta * a2[n]) * st[n] + dx * Bt[n];
            if constexpr (P == kOutput) acc += st[n] * sC[(tt + u) * NM + n];
          }
        }
        if constexpr (P == kOutput) {
          const size_t r = size_t(row0 + t0 + tt + u);
          y[r * ldy + e] = from_f<T>((acc + dsk * xv[u]) * silu(zv[u]));
        } else {
          sum_delta += delta;
        }
      }
    }
  }
  if (!active) return;
  if constexpr (P == kChunkState) {
#pragma unroll
    for (int n = 0; n < NM; ++n)
      if (n < N) ws_state[wbase * N + n] = st[n];
    ws_sum[wbase] = sum_delta;
  } else {
    if (single) {
#pragma unroll
      for (int n = 0; n < NM; ++n)
        if (n < N) slot_state[n] = st[n];
    }
  }
}

// Pass 2: one thread per (sequence, channel, state) walks the sequence's chunks in order:
// ws_state[s, c] becomes chunk c's true start state, and the slot gets the final state.
__global__ void scan_carry_kernel(float* pool, const float* __restrict__ A,
                                  const int32_t* __restrict__ cu, const int32_t* __restrict__ slots,
                                  int E, int N, int chunk, int nch, float* ws_state,
                                  const float* __restrict__ ws_sum) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;  // e * N + n
  if (idx >= E * N) return;
  const int s = blockIdx.y, e = idx / N;
  const int nc = ceil_div(cu[s + 1] - cu[s], chunk);
  float* p = pool + size_t(slots[s]) * E * N + idx;
  const float a2 = A[idx] * kLog2e;
  float st = *p;
  for (int c = 0; c < nc; ++c) {
    const size_t w = (size_t(s) * nch + c) * E;
    float* ws = ws_state + w * N + idx;
    const float local = *ws;
    *ws = st;
    st = exp2f(a2 * ws_sum[w + e]) * st + local;
  }
  *p = st;
}

// Decode: one thread per (sequence, channel); the N states of the channel are 4N contiguous bytes.
template <class T, int NM>
__global__ void __launch_bounds__(kThreads) scan_step_kernel(
    T* __restrict__ y, int ldy, float* pool, const int32_t* __restrict__ slots,
    const T* __restrict__ x, int ldx, const T* __restrict__ dt, int lddt,
    const T* __restrict__ dt_bias, const float* __restrict__ A, const T* __restrict__ B,
    const T* __restrict__ C, int ldbc, const T* __restrict__ Dskip, const T* __restrict__ z,
    int ldz, int E, int N) {
  const int e = blockIdx.x * kThreads + threadIdx.x;
  if (e >= E) return;
  const size_t s = blockIdx.y;
  float* st = pool + (size_t(slots[s]) * E + e) * N;
  const float xv = to_f(x[s * ldx + e]);
  const float delta = softplus(to_f(dt[s * lddt + e]) + to_f(dt_bias[e]));
  const float dx = delta * xv;
  float acc = 0.0f;
#pragma unroll
  for (int n = 0; n < NM; ++n) {
    if (n < N) {
      const float v = exp2f(delta * A[size_t(e) * N + n] * kLog2e) * st[n] + dx * to_f(B[s * ldbc + n]);
      st[n] = v;
      acc += v * to_f(C[s * ldbc + n]);
    }
  }
  y[s * ldy + e] = from_f<T>((acc + to_f(Dskip[e]) * xv) * silu(to_f(z[s * ldz + e])));
}

void check_scan(int N, int nseq) {
  HM_CHECK(N >= 1 && N <= kMaxState, "cuda selective_scan: d_state must be in [1, ", kMaxState,
           "], got ", N);
  HM_CHECK(nseq <= 65535, "cuda selective_scan: at most 65535 sequences per batch, got ", nseq);
}

int chunks_of(const RaggedBatch& rb, int chunk) { return std::max(1, ceil_div(rb.max_len, chunk)); }

template <class T, int NM>
void scan_launch(T* y, int ldy, float* pool, const T* x, int ldx, const T* dt, int lddt,
                 const T* dt_bias, const float* A, const T* B, const T* C, int ldbc,
                 const T* Dskip, const T* z, int ldz, const RaggedBatch& rb, int E, int N,
                 int chunk, void* workspace, cudaStream_t stream) {
  const int nch = chunks_of(rb, chunk);
  HM_CHECK(nch <= 65535, "cuda selective_scan: ", nch, " chunks of ", chunk, " tokens; use longer chunks");
  float* ws_state = static_cast<float*>(workspace);
  float* ws_sum = nch > 1 ? ws_state + size_t(rb.nseq) * nch * E * N : nullptr;
  const dim3 grid(ceil_div(E, kThreads), nch, rb.nseq);
  if (nch > 1) {
    HM_CHECK(workspace != nullptr, "cuda selective_scan: ", nch, " chunks need a workspace");
    scan_chunk_kernel<T, NM, kChunkState><<<grid, kThreads, 0, stream>>>(
        y, ldy, pool, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z, ldz, rb.cu_seqlens,
        rb.slots, E, N, chunk, nch, ws_state, ws_sum);
    HM_CUDA_LAUNCHED("selective_scan chunk states");
    scan_carry_kernel<<<dim3(ceil_div(E * N, 256), rb.nseq), 256, 0, stream>>>(
        pool, A, rb.cu_seqlens, rb.slots, E, N, chunk, nch, ws_state, ws_sum);
    HM_CUDA_LAUNCHED("selective_scan carry");
  }
  scan_chunk_kernel<T, NM, kOutput><<<grid, kThreads, 0, stream>>>(
      y, ldy, pool, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z, ldz, rb.cu_seqlens,
      rb.slots, E, N, chunk, nch, ws_state, ws_sum);
  HM_CUDA_LAUNCHED("selective_scan output");
}

}  // namespace

int scan_chunk_auto(const RaggedBatch& rb, int E) {
  // Enough (sequence, chunk, channel) threads to fill every SM at ~1024 resident threads, and
  // no more: each chunk boundary costs pass 1 and 2 a second walk over the tokens.
  static const int sms = [] {
    int dev = 0, n = 132;
    if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    return n;
  }();
  const long target = long(sms) * 1024, per_chunk = std::max(1L, long(rb.nseq) * E);
  const int nch = int(std::min<long>((target + per_chunk - 1) / per_chunk, 1L << 20));
  const int len = std::max(rb.max_len, 1);
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
  if (N <= 16)
    scan_launch<T, 16>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z, ldz,
                       rb, E, N, chunk, workspace, stream);
  else
    scan_launch<T, kMaxState>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip,
                              z, ldz, rb, E, N, chunk, workspace, stream);
}

template <class T>
void selective_scan_step(T* y, int ldy, float* ssm_state, const int32_t* slots, const T* x, int ldx,
                         const T* dt, int lddt, const T* dt_bias, const float* A, const T* B,
                         const T* C, int ldbc, const T* Dskip, const T* z, int ldz, int nseq, int E,
                         int N, cudaStream_t stream) {
  check_scan(N, nseq);
  if (nseq <= 0 || E <= 0) return;
  const dim3 grid(ceil_div(E, kThreads), nseq);
  if (N <= 16)
    scan_step_kernel<T, 16><<<grid, kThreads, 0, stream>>>(y, ldy, ssm_state, slots, x, ldx, dt, lddt,
                                                           dt_bias, A, B, C, ldbc, Dskip, z, ldz, E, N);
  else
    scan_step_kernel<T, kMaxState><<<grid, kThreads, 0, stream>>>(
        y, ldy, ssm_state, slots, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z, ldz, E, N);
  HM_CUDA_LAUNCHED("selective_scan_step");
}

#define HM_INST(T)                                                                                \
  template void selective_scan<T>(T*, int, float*, const T*, int, const T*, int, const T*,       \
                                  const float*, const T*, const T*, int, const T*, const T*, int, \
                                  const RaggedBatch&, int, int, int, void*, cudaStream_t);        \
  template void selective_scan_step<T>(T*, int, float*, const int32_t*, const T*, int, const T*, \
                                       int, const T*, const float*, const T*, const T*, int,     \
                                       const T*, const T*, int, int, int, int, cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST

}  // namespace hm::cuda
