// Mamba-2 (SSD) scan over a ragged batch: prefill and the decode step in one kernel.
//
// Per sequence s, head h, channel p < P and state n < N (ops.h, ref::ssd_scan):
//   delta = clamp(softplus(dt[t,h] + dt_bias[h]), dt_min, dt_max)    # time_step_limit
//   state[p,n] = exp(delta * A[h]) * state[p,n] + delta * x[t,h,p] * B[t,g,n]
//   y[t,h,p] = sum_n state[p,n] * C[t,g,n] + D[h] * x[t,h,p]
// with g = h / (H / G). One block per (sequence, head, tile of kRows channels); each channel's
// N states live in the registers of kLanes threads (state n in lane n % kLanes), and the block
// walks the sequence's tokens in order from the slot's state, staging a tile of tokens' B, C,
// x and delta in shared memory. A decode batch is the same launch with one token per sequence.
//
// This kernel runs decode steps and short prefills. A prefill with a sequence of 64+ tokens goes
// to the chunked form (ssd_scan_chunked in ssd_grad.cu: per chunk of 32 tokens the masked
// (C B^T * decay) product, the chunk's output and its end state as small matrix products on the
// tensor cores), since this one walks every token of a sequence in turn.
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace hm::cuda {
namespace {

constexpr int kChunkedMinLen = 64;         // tokens of the longest sequence for ssd_scan_chunked (unmeasured)
constexpr int kLanes = 8;                  // threads per channel; a power of two <= 32
constexpr int kRows = 16;                  // channels per block
constexpr int kThreads = kRows * kLanes;   // lanes of a channel are adjacent in one warp
// Tokens staged per tile: B and C of a tile take 2 * kTile * NM floats (32 KB at most).
template <int NM> constexpr int kTile = NM >= 256 ? 16 : 32;

// NM: d_state rounded up to a power of two >= 32; lanes hold NM / kLanes states each, those
// past N stay zero (their B is staged as zero).
template <class T, int NM>
__global__ void __launch_bounds__(kThreads) ssd_scan_kernel(
    T* __restrict__ y, int ldy, float* pool, const T* __restrict__ x, int ldx,
    const T* __restrict__ dt, int lddt, const T* __restrict__ dt_bias, const float* __restrict__ A,
    const T* __restrict__ B, const T* __restrict__ C, int ldbc, const T* __restrict__ Dskip,
    const int32_t* __restrict__ cu, const int32_t* __restrict__ slots, int H, int P, int G, int N,
    float dt_min, float dt_max) {
  constexpr int kT = kTile<NM>, kPer = NM / kLanes;
  __shared__ __align__(16) float sB[kT * NM];
  __shared__ __align__(16) float sC[kT * NM];
  __shared__ float sX[kT * kRows];
  __shared__ float sDelta[kT], sDecay[kT];
  const int ptiles = ceil_div(P, kRows);
  const int h = blockIdx.x / ptiles, p0 = (blockIdx.x % ptiles) * kRows;
  const int s = blockIdx.y;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  if (L <= 0) return;  // uniform over the block: the slot is left as it is
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes, p = p0 + r;
  const bool active = p < P;
  const int g = h / (H / G);
  // The slot's [H, P, N] state; this thread's channel p.
  float* st = pool + ((size_t(slots[s]) * H + h) * P + p) * size_t(N);

  float sv[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int n = lane + kLanes * k;
    sv[k] = active && n < N ? st[n] : 0.0f;
  }
  const float a = A[h], bias = to_f(dt_bias[h]), dsk = to_f(Dskip[h]);
  const size_t bc0 = size_t(g) * N, x0 = size_t(h) * P + p0;

  for (int t0 = 0; t0 < L; t0 += kT) {
    const int nt = min(kT, L - t0);
    __syncthreads();  // the previous tile is consumed
    for (int i = threadIdx.x; i < nt * NM; i += kThreads) {
      const int t = i / NM, n = i % NM;
      const size_t at = size_t(row0 + t0 + t) * ldbc + bc0 + n;
      sB[i] = n < N ? to_f(B[at]) : 0.0f;
      sC[i] = n < N ? to_f(C[at]) : 0.0f;
    }
    for (int i = threadIdx.x; i < nt * kRows; i += kThreads) {
      const int t = i / kRows, q = i % kRows;
      sX[i] = p0 + q < P ? to_f(x[size_t(row0 + t0 + t) * ldx + x0 + q]) : 0.0f;
    }
    if (threadIdx.x < nt) {
      float d = softplus(to_f(dt[size_t(row0 + t0 + threadIdx.x) * lddt + h]) + bias);
      d = fminf(fmaxf(d, dt_min), dt_max);  // time_step_limit
      sDelta[threadIdx.x] = d;
      sDecay[threadIdx.x] = expf(d * a);  // dA = exp(dt * A)
    }
    __syncthreads();
    for (int tt = 0; tt < nt; ++tt) {
      const float xv = sX[tt * kRows + r], dx = sDelta[tt] * xv, decay = sDecay[tt];
      const float* Bt = sB + tt * NM + lane;
      const float* Ct = sC + tt * NM + lane;
      float acc = 0.0f;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        sv[k] = decay * sv[k] + dx * Bt[kLanes * k];  // state = state * dA + dB * x
        acc += sv[k] * Ct[kLanes * k];                 // y = state @ C
      }
      // Every lane of the warp takes part (inactive channels hold zeros).
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (active && lane == 0) y[size_t(row0 + t0 + tt) * ldy + x0 + r] = from_f<T>(acc + dsk * xv);  // + D * x
    }
  }
  if (!active) return;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int n = lane + kLanes * k;
    if (n < N) st[n] = sv[k];
  }
}

template <class T, int NM>
void ssd_launch(T* y, int ldy, float* pool, const T* x, int ldx, const T* dt, int lddt, const T* dt_bias,
                const float* A, const T* B, const T* C, int ldbc, const T* Dskip, const RaggedBatch& rb, int H,
                int P, int G, int N, float dt_min, float dt_max, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(P, kRows)) * unsigned(H), unsigned(rb.nseq));
  ssd_scan_kernel<T, NM><<<grid, kThreads, 0, stream>>>(y, ldy, pool, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc,
                                                         Dskip, rb.cu_seqlens, rb.slots, H, P, G, N, dt_min, dt_max);
  HM_CUDA_LAUNCHED("ssd_scan");
}

}  // namespace

template <class T>
void ssd_scan(T* y, int ldy, float* ssm_state, const T* x, int ldx, const T* dt, int lddt, const T* dt_bias,
              const float* A, const T* B, const T* C, int ldbc, const T* Dskip, const RaggedBatch& rb, int H, int P,
              int G, int N, float dt_min, float dt_max, cudaStream_t stream) {
  HM_CHECK(N >= 1 && N <= kMaxSsdState, "cuda ssd_scan: d_state must be in [1, ", kMaxSsdState, "], got ", N);
  HM_CHECK(H > 0 && G > 0 && H % G == 0, "cuda ssd_scan: ", H, " heads are not a multiple of ", G, " groups");
  HM_CHECK(rb.nseq <= 65535, "cuda ssd_scan: at most 65535 sequences per batch, got ", rb.nseq);
  HM_CHECK(int64_t(ceil_div(P, kRows)) * H <= INT32_MAX, "cuda ssd_scan: ", H, " heads of ", P, " are too many");
  if (rb.nseq <= 0 || rb.n_tokens <= 0 || P <= 0) return;
  // A prefill with a sequence of 2+ chunks: the chunked form (this kernel walks each token in
  // turn, ~0.7 us a token a block; stop 50's profile put it at 1.5 ms a layer of a 130M training
  // step at 8 x 2048). Decode steps and short prefills stay here.
  if (rb.max_len >= kChunkedMinLen && H <= 65535 && ssd_scan_chunked_fits(P, N)) {
    ssd_scan_chunked<T>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, rb, H, P, G, N, dt_min,
                        dt_max, stream);
    return;
  }
  if (N <= 32)
    ssd_launch<T, 32>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, rb, H, P, G, N, dt_min,
                      dt_max, stream);
  else if (N <= 64)
    ssd_launch<T, 64>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, rb, H, P, G, N, dt_min,
                      dt_max, stream);
  else if (N <= 128)
    ssd_launch<T, 128>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, rb, H, P, G, N, dt_min,
                       dt_max, stream);
  else
    ssd_launch<T, kMaxSsdState>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, rb, H, P, G,
                                N, dt_min, dt_max, stream);
}

#define HM_INST(T)                                                                                         \
  template void ssd_scan<T>(T*, int, float*, const T*, int, const T*, int, const T*, const float*, const T*, \
                            const T*, int, const T*, const RaggedBatch&, int, int, int, int, float, float,   \
                            cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST

}  // namespace hm::cuda
