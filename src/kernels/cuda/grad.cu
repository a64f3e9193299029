// The training kernels of grad.h besides attention (attention_grad.cu): GEMMs with transposes
// (linear.h's Gemm), RMSNorm / SwiGLU / RoPE backward, the embedding scatter, cross-entropy rows.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/grad.h"
#include "kernels/cuda/linear.h"
#include "kernels/cuda/reduce.cuh"
#include "kernels/ref/router_ref.h"

namespace hm::cuda {

// ---- Blas ----

// The training products run through Gemm::gemm: cuBLASLt with plans cached per shape and
// algorithms per bucketed shape (linear.h), the default since stop 38; HM_CUDA_TRAIN_GEMM=ex sends
// them through cublasGemmEx (what every run before stop 38 used), which chooses per exact shape
// inside cuBLAS and so pays for every new row count of a True Hybrid path.
struct Blas::Impl {
  Gemm g;
};

Blas::Blas() : impl_(std::make_unique<Impl>()) {}

Blas::~Blas() = default;

void Blas::gemm(void* C, cudaDataType_t tc, int64_t ldc, const void* A, int64_t lda, bool ta, const void* B,
                int64_t ldb, bool tb, cudaDataType_t tin, int m, int n, int k, bool accumulate,
                cudaStream_t stream) {
  static const bool lt = [] {
    const char* v = std::getenv("HM_CUDA_TRAIN_GEMM");
    return v == nullptr || std::string(v) != "ex";
  }();
  impl_->g.set_use_lt(lt);
  impl_->g.gemm(C, tc, ldc, A, lda, ta, B, ldb, tb, tin, m, n, k, accumulate, stream);
}

namespace {

constexpr int kThreads = 256;

// Sum (or max) over the block of NT threads; every thread gets the result.
template <bool kMax, int NT = kThreads>
__device__ float block_reduce(float v) {
  __shared__ float part[NT / 32];
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, u) : v + u;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  float r = part[0];
#pragma unroll
  for (int i = 1; i < NT / 32; ++i) r = kMax ? fmaxf(r, part[i]) : r + part[i];
  __syncthreads();  // part is reused by the next call
  return r;
}

// ---- RMSNorm backward ----

// One block per row: dx and the row's rstd (kept for the dw pass).
template <class T>
__global__ void __launch_bounds__(kThreads) rmsnorm_dx_kernel(T* dx, int lddx, float* __restrict__ rstd,
                                                              const T* __restrict__ g, int ldg,
                                                              const T* __restrict__ x, int ldx,
                                                              const T* __restrict__ w, int d, float eps, bool acc) {
  const size_t i = blockIdx.x;
  const T* xi = x + i * ldx;
  const T* gi = g + i * ldg;
  float ss = 0, dot = 0;
  for (int j = threadIdx.x; j < d; j += kThreads) {
    const float xv = to_f(xi[j]);
    ss += xv * xv;
    dot += to_f(gi[j]) * to_f(w[j]) * xv;
  }
  ss = block_reduce<false>(ss);
  dot = block_reduce<false>(dot);
  const float r = 1.0f / sqrtf(ss / float(d) + eps), c = r * r * r * dot / float(d);
  T* di = dx + i * lddx;
  for (int j = threadIdx.x; j < d; j += kThreads) {
    const float v = to_f(gi[j]) * to_f(w[j]) * r - c * to_f(xi[j]);
    di[j] = from_f<T>(acc ? to_f(di[j]) + v : v);
  }
  if (threadIdx.x == 0) rstd[i] = r;
}

// dw partial sums: block (32 columns, one chunk of rows); thread (column, phase y of 8) sums
// rows r0 + y, r0 + y + 8, ... in order, then the 8 phases are added in order.
constexpr int kDwPhases = 8;
template <class T>
__global__ void __launch_bounds__(32 * kDwPhases) rmsnorm_dw_partial_kernel(float* __restrict__ part,
                                                                           const T* __restrict__ g, int ldg,
                                                                           const T* __restrict__ x, int ldx,
                                                                           const float* __restrict__ rstd, int n,
                                                                           int d, int rows_per_chunk) {
  __shared__ float s[kDwPhases][33];
  const int j = blockIdx.x * 32 + threadIdx.x;
  const int r0 = blockIdx.y * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
  float acc = 0;
  if (j < d)
    for (int i = r0 + threadIdx.y; i < r1; i += kDwPhases)
      acc += to_f(g[size_t(i) * ldg + j]) * to_f(x[size_t(i) * ldx + j]) * rstd[i];
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < d) {
    float t = 0;
    for (int y = 0; y < kDwPhases; ++y) t += s[y][threadIdx.x];
    part[size_t(blockIdx.y) * d + j] = t;
  }
}

// dw[j] += the chunks' partial sums (column_sums: a fixed order).
template <class G>
struct AddToVec {
  G* v;
  __device__ void operator()(int j, float t) const { v[j] = from_f<G>(to_f(v[j]) + t); }
};

// The fused path for rows of up to 1,024 columns (d % 4 == 0, 4-element aligned rows): one warp
// per row, a lane holding 4 adjacent columns of each 128, so x and dout are read from HBM once for
// both dx and dw (the two-kernel path reads them twice, 256 threads a row). Each warp adds its rows'
// dout x r to its own shared-memory row of dw partials in row order; the block then adds its 8 warps'
// rows in order into the chunk's partial: the same fixed order on every run.
constexpr int kFusedWarps = 8;

template <class T, int K>
__global__ void __launch_bounds__(32 * kFusedWarps) rmsnorm_backward_fused_kernel(
    T* dx, int lddx, float* __restrict__ part, const T* __restrict__ g, int ldg, const T* __restrict__ x, int ldx,
    const T* __restrict__ w, int n, int d, float eps, bool acc, int rows_per_chunk) {
  extern __shared__ float pd[];  // [kFusedWarps][4][K * 32]: column c at [c % 4][c / 4]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, width = K * 128;
  float* mine = pd + warp * width;
  for (int c = lane; c < width; c += 32) mine[c] = 0.0f;
  const int r0 = blockIdx.x * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
  for (int i = r0 + warp; i < r1; i += kFusedWarps) {
    float xv[K][4], gv[K][4];
    float ss = 0, dot = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (k * 32 + lane) * 4;
      if (c < d) {
        float wv[4];
        load4(x + size_t(i) * ldx + c, xv[k]);
        load4(g + size_t(i) * ldg + c, gv[k]);
        load4(w + c, wv);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ss += xv[k][e] * xv[k][e];
          dot += gv[k][e] * wv[e] * xv[k][e];
        }
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      ss += __shfl_xor_sync(0xffffffffu, ss, o);
      dot += __shfl_xor_sync(0xffffffffu, dot, o);
    }
    const float r = 1.0f / sqrtf(ss / float(d) + eps), cc = r * r * r * dot / float(d);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (k * 32 + lane) * 4;
      if (c < d) {
        float wv[4], out[4];
        load4(w + c, wv);
        T* di = dx + size_t(i) * lddx + c;
        if (acc) load4(di, out);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v = gv[k][e] * wv[e] * r - cc * xv[k][e];
          out[e] = acc ? out[e] + v : v;
          mine[e * (K * 32) + c / 4] += gv[k][e] * xv[k][e] * r;  // lanes on consecutive banks
        }
        store4(di, out);
      }
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += 32 * kFusedWarps) {
    float t = 0;
    for (int y = 0; y < kFusedWarps; ++y) t += pd[y * width + (c % 4) * (K * 32) + c / 4];
    part[size_t(blockIdx.x) * d + c] = t;
  }
}

// Rows per chunk of the dw pass: at least 32, and at most 1,024 chunks (the fused kernel's
// warps take 4 rows each at 16,384 rows: 512 blocks, more of them in flight than at 64 rows).
int dw_rows_per_chunk(int n) { return std::max(32, ceil_div(n, 1024)); }

// ---- SwiGLU, RoPE ----

template <class T>
__global__ void swiglu_backward_kernel(T* dg, int lddg, T* du, int lddu, const T* __restrict__ dout, int ldo,
                                       const T* __restrict__ g, int ldgg, const T* __restrict__ u, int ldu, int f) {
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= f) return;
  const size_t i = blockIdx.x;
  const float gv = to_f(g[i * ldgg + j]), d = to_f(dout[i * ldo + j]);
  const float sg = 1.0f / (1.0f + expf(-gv));
  // Both read before either is written: dg or du may alias an input.
  const float uv = to_f(u[i * ldu + j]);
  du[i * lddu + j] = from_f<T>(d * gv * sg);                          // du = dout silu(g)
  dg[i * lddg + j] = from_f<T>(d * uv * sg * (1.0f + gv * (1.0f - sg)));  // silu' = s (1 + g (1 - s))
}

template <class T>
__global__ void relu2_backward_kernel(T* dx, int lddx, const T* dout, int ldo, const T* __restrict__ x, int ldx,
                                      int f) {
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= f) return;
  const size_t i = blockIdx.x;
  const float xv = to_f(x[i * ldx + j]), d = to_f(dout[i * ldo + j]);
  dx[i * lddx + j] = from_f<T>(xv > 0.0f ? 2.0f * xv * d : 0.0f);
}

// One warp per row: lanes stride the columns, then a butterfly sum.
template <class T>
__global__ void row_dots_kernel(float* out, const T* __restrict__ a, int lda, const int32_t* __restrict__ a_idx,
                                const T* __restrict__ b, int ldb, int rows, int d) {
  const int r = int(blockIdx.x) * (kThreads / 32) + int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  if (r >= rows) return;
  const T* x = a + int64_t(a_idx ? a_idx[r] : r) * lda;
  const T* y = b + int64_t(r) * ldb;
  float acc = 0.0f;
  for (int q = lane; q < d; q += 32) acc += to_f(x[q]) * to_f(y[q]);
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) out[r] = acc;
}

// The router: block (s, c) computes tokens [c kRouterTokens, (c + 1) kRouterTokens) of sequence
// s. The analyzer's EMA decays by 7/8 a token, so the block starts it from zero kRouterWarmup
// tokens earlier (what it leaves out weighs 0.875^192 = 7.6e-12 of the sum: below float
// rounding), or from the slot's carried EMA when that reaches back to the call's first token, and
// then runs its own tokens in order, as router_forward does: four block sums per token (u.m,
// u.u, m.m, w.u), the features and the logit by thread 0. Each thread keeps its own channels of
// the EMA in shared memory, so only the sums need barriers. state null: positions from 0.
constexpr int kRouterTokens = 64, kRouterWarmup = 192;

template <class T>
__global__ void __launch_bounds__(kThreads) router_kernel(float* s_out, float* feats, const T* __restrict__ u,
                                                          int ldu, int D, const float* __restrict__ w,
                                                          const float* __restrict__ fw,
                                                          const float* __restrict__ b,
                                                          const int32_t* __restrict__ cu,
                                                          const int32_t* __restrict__ slots,
                                                          const int32_t* __restrict__ pos0s,
                                                          const float* __restrict__ state) {
  extern __shared__ float ema[];  // [D]
  __shared__ float part[kThreads / 32][4];
  const int t0 = cu[blockIdx.x], L = cu[blockIdx.x + 1] - t0;
  const int first = int(blockIdx.y) * kRouterTokens;
  if (first >= L) return;
  const int last = min(L, first + kRouterTokens);
  const int64_t pos0 = state ? pos0s[blockIdx.x] : 0;
  const float beta = float(th::kEmaDecay), alpha = float(1.0 - th::kEmaDecay);
  const bool carried = state && first <= kRouterWarmup;
  const float* m0 = carried ? state + int64_t(slots[blockIdx.x]) * (D + 1) : nullptr;
  for (int j = threadIdx.x; j < D; j += kThreads) ema[j] = carried ? m0[j] : 0.0f;
  for (int t = carried ? 0 : max(0, first - kRouterWarmup); t < first; ++t) {
    const T* ut = u + int64_t(t0 + t) * ldu;
    for (int j = threadIdx.x; j < D; j += kThreads) ema[j] = beta * ema[j] + alpha * to_f(ut[j]);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int t = first; t < last; ++t) {
    const T* ut = u + int64_t(t0 + t) * ldu;
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // u.m, u.u, m.m, w.u
    for (int j = threadIdx.x; j < D; j += kThreads) {
      const float x = to_f(ut[j]), m = ema[j];
      v[0] += x * m;
      v[1] += x * x;
      v[2] += m * m;
      v[3] += w[j] * x;
      ema[j] = beta * m + alpha * x;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k)
      for (int o = 16; o > 0; o /= 2) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    if (lane == 0)
#pragma unroll
      for (int k = 0; k < 4; ++k) part[warp][k] = v[k];
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        sum[k] = part[0][k];
        for (int q = 1; q < kThreads / 32; ++q) sum[k] += part[q][k];
      }
      const float denom = sqrtf(sum[1]) * sqrtf(sum[2]);
      const float f[kRouterFeatures] = {1.0f - (denom > 0.0f ? sum[0] / denom : 0.0f),
                                        float(log2(double(pos0 + t) + 1.0) / 16.0)};
      float s = sum[3];
      for (int k = 0; k < kRouterFeatures; ++k) {
        s += fw[k] * f[k];
        if (feats) feats[int64_t(t0 + t) * kRouterFeatures + k] = f[k];
      }
      s_out[t0 + t] = s + b[0];
    }
    __syncthreads();  // part is reused by the next token
  }
}

// Chunk routing: every token takes the logit of its chunk's first token, which is this call's
// or, for a chunk begun in an earlier call, the slot's carried chunk logit.
__global__ void router_chunk_kernel(float* r, const float* __restrict__ s, const int32_t* __restrict__ cu,
                                    const int32_t* __restrict__ slots, const int32_t* __restrict__ pos0s,
                                    const float* __restrict__ state, int D, int chunk) {
  const int t0 = cu[blockIdx.x], L = cu[blockIdx.x + 1] - t0;
  const int t = int(blockIdx.y) * kThreads + int(threadIdx.x);
  if (t >= L) return;
  const int64_t pos0 = state ? pos0s[blockIdx.x] : 0, cs = (pos0 + t) / chunk * chunk;
  r[t0 + t] = cs >= pos0 ? s[t0 + int(cs - pos0)] : state[int64_t(slots[blockIdx.x]) * (D + 1) + D];
}

// The slots' analyzer state after the call (after router_kernel and router_chunk_kernel have
// read it): the EMA through the last token, one thread a channel (from zero kRouterWarmup tokens
// back, as the blocks), and the logit of the last chunk begun in the call (the last logit with
// token routing, as router_forward keeps it).
template <class T>
__global__ void router_state_kernel(float* state, const T* __restrict__ u, int ldu, int D, const float* __restrict__ s,
                                    const int32_t* __restrict__ cu, const int32_t* __restrict__ slots,
                                    const int32_t* __restrict__ pos0s, int chunk) {
  const int t0 = cu[blockIdx.x], L = cu[blockIdx.x + 1] - t0;
  if (L == 0) return;
  float* st = state + int64_t(slots[blockIdx.x]) * (D + 1);
  const int j = int(blockIdx.y) * kThreads + int(threadIdx.x);
  if (j < D) {
    const float beta = float(th::kEmaDecay), alpha = float(1.0 - th::kEmaDecay);
    const int start = max(0, L - kRouterWarmup);
    float m = start == 0 ? st[j] : 0.0f;
    for (int t = start; t < L; ++t) m = beta * m + alpha * to_f(u[int64_t(t0 + t) * ldu + j]);
    st[j] = m;
  }
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    const int64_t pos0 = pos0s[blockIdx.x], cs = chunk > 0 ? (pos0 + L - 1) / chunk * chunk : pos0 + L - 1;
    if (cs >= pos0) st[D] = s[t0 + int(cs - pos0)];
  }
}

// As elementwise.cu's rope_kernel (same angle, formed in double), rotating by -angle:
// (a, b) -> (a cos + b sin, b cos - a sin).
template <class T>
__global__ void rope_backward_kernel(T* x, int ldx, int heads, int hd, const int32_t* __restrict__ cu,
                                     const int32_t* __restrict__ pos0, int nseq, double log2_theta) {
  const int half = hd / 2;
  const int idx = blockIdx.y * blockDim.x + threadIdx.x;
  if (idx >= heads * half) return;
  const int t = blockIdx.x, h = idx / half, i = idx % half;
  const int s = seq_of_row(cu, nseq, t);
  const double pos = double(pos0[s] + (t - cu[s]));
  const double ang = pos * exp2(-2.0 * i / hd * log2_theta);
  double sn, cs;
  sincos(ang, &sn, &cs);
  T* v = x + size_t(t) * ldx + size_t(h) * hd;
  const float a = to_f(v[i]), b = to_f(v[i + half]);
  v[i] = from_f<T>(float(a * cs + b * sn));
  v[i + half] = from_f<T>(float(b * cs - a * sn));
}

// ---- Embedding ----

template <class T, class G>
__global__ void embedding_backward_kernel(G* dtable, int ldt, const T* __restrict__ dout, int ldo,
                                          const int32_t* __restrict__ order, const int32_t* __restrict__ seg,
                                          const int32_t* __restrict__ seg_id, int d) {
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int s = blockIdx.x;
  float acc = 0;
  for (int p = seg[s]; p < seg[s + 1]; ++p) acc += to_f(dout[size_t(order[p]) * ldo + j]);
  G* row = dtable + size_t(seg_id[s]) * ldt;
  row[j] = from_f<G>(to_f(row[j]) + acc);
}

// ---- Cross-entropy rows ----

// The row staged once in shared memory (V x TZ bytes: a 32,000-entry bf16 row is 64 KB, 3 blocks
// an SM; float 128 KB, one): the logits are read from HBM once. dz may be z itself (TZ = TD): the
// whole row is in shared memory before the first write.
constexpr int kCeThreads = 512;

template <class TZ, class TD>
__global__ void __launch_bounds__(kCeThreads) cross_entropy_rows_smem_kernel(TD* dz, const TZ* z,
                                                                             const int32_t* __restrict__ targets,
                                                                             float* __restrict__ loss, int V,
                                                                             float scale) {
  extern __shared__ __align__(16) unsigned char ce_smem[];
  TZ* row = reinterpret_cast<TZ*>(ce_smem);
  const size_t r = blockIdx.x;
  const TZ* zr = z + r * size_t(V);
  TD* dr = dz + r * size_t(V);
  const int tg = targets[r];
  if (tg < 0) {  // ignored row: no loss, no gradient
    for (int j = threadIdx.x; j < V; j += kCeThreads) dr[j] = from_f<TD>(0.0f);
    if (threadIdx.x == 0) loss[r] = 0.0f;
    return;
  }
  float mx = -INFINITY;
#pragma unroll 8
  for (int j = threadIdx.x; j < V; j += kCeThreads) {
    const TZ v = zr[j];
    row[j] = v;
    mx = fmaxf(mx, to_f(v));
  }
  mx = block_reduce<true, kCeThreads>(mx);  // its barrier also publishes row[]
  float se = 0;
  for (int j = threadIdx.x; j < V; j += kCeThreads) se += expf(to_f(row[j]) - mx);
  se = block_reduce<false, kCeThreads>(se);
  const float lse = mx + logf(se);
  if (threadIdx.x == 0) loss[r] = lse - to_f(row[tg]);
  for (int j = threadIdx.x; j < V; j += kCeThreads)
    dr[j] = from_f<TD>((expf(to_f(row[j]) - lse) - (j == tg ? 1.0f : 0.0f)) * scale);
}

// Rows too long for shared memory: three passes over z in global memory (max, sum, dz).
template <class TZ, class TD>
__global__ void __launch_bounds__(kThreads) cross_entropy_rows_kernel(TD* dz, const TZ* z,
                                                                      const int32_t* __restrict__ targets,
                                                                      float* __restrict__ loss, int V, float scale) {
  const size_t r = blockIdx.x;
  const TZ* zr = z + r * size_t(V);
  TD* dr = dz + r * size_t(V);
  const int tg = targets[r];
  if (tg < 0) {
    for (int j = threadIdx.x; j < V; j += kThreads) dr[j] = from_f<TD>(0.0f);
    if (threadIdx.x == 0) loss[r] = 0.0f;
    return;
  }
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < V; j += kThreads) mx = fmaxf(mx, to_f(zr[j]));
  mx = block_reduce<true>(mx);
  const float zt = to_f(zr[tg]);
  float se = 0;
  for (int j = threadIdx.x; j < V; j += kThreads) se += expf(to_f(zr[j]) - mx);
  se = block_reduce<false>(se);  // its barriers also order every read of z above before the writes below
  const float lse = mx + logf(se);
  if (threadIdx.x == 0) loss[r] = lse - zt;
  for (int j = threadIdx.x; j < V; j += kThreads)  // each thread reads z[j] before it writes dz[j]
    dr[j] = from_f<TD>((expf(to_f(zr[j]) - lse) - (j == tg ? 1.0f : 0.0f)) * scale);
}

}  // namespace

// ---- Launchers ----

size_t rmsnorm_backward_workspace_bytes(int n, int d) {
  if (n <= 0) return 0;
  const int chunks = ceil_div(n, dw_rows_per_chunk(n));
  return sizeof(float) * (size_t(n) + size_t(chunks) * size_t(std::max(d, 0)));
}

template <class T, class G>
void rmsnorm_backward(T* dx, int lddx, G* dw, const T* dout, int ldg, const T* x, int ldx, const T* w, int n, int d,
                      float eps, bool accumulate_dx, void* workspace, cudaStream_t stream) {
  if (n <= 0 || d <= 0) return;
  auto* rstd = static_cast<float*>(workspace);
  float* part = rstd + n;
  const int rpc = dw_rows_per_chunk(n), chunks = ceil_div(n, rpc);
  const int K = d <= 128 ? 1 : d <= 256 ? 2 : d <= 512 ? 4 : d <= 1024 ? 8 : 0;
  const char* ab = std::getenv("HM_CUDA_RMSNORM_BWD");  // =two: the two-kernel path (A/B runs)
  const bool two = ab != nullptr && std::string(ab) == "two";
  if (!two && K > 0 && d % 4 == 0 && aligned4(dx, lddx) && aligned4(dout, ldg) && aligned4(x, ldx) && aligned4(w, 0)) {
    const size_t smem = sizeof(float) * kFusedWarps * size_t(K) * 128;
    auto launch = [&](auto kernel) {
      kernel<<<chunks, 32 * kFusedWarps, smem, stream>>>(dx, lddx, part, dout, ldg, x, ldx, w, n, d, eps,
                                                         accumulate_dx, rpc);
    };
    if (K == 1) launch(rmsnorm_backward_fused_kernel<T, 1>);
    else if (K == 2) launch(rmsnorm_backward_fused_kernel<T, 2>);
    else if (K == 4) launch(rmsnorm_backward_fused_kernel<T, 4>);
    else launch(rmsnorm_backward_fused_kernel<T, 8>);
    HM_CUDA_LAUNCHED("rmsnorm_backward (fused dx and dw partials)");
    column_sums<float>(part, chunks, d, AddToVec<G>{dw}, stream, "rmsnorm_backward (dw)");
    return;
  }
  rmsnorm_dx_kernel<T><<<n, kThreads, 0, stream>>>(dx, lddx, rstd, dout, ldg, x, ldx, w, d, eps, accumulate_dx);
  HM_CUDA_LAUNCHED("rmsnorm_backward (dx)");
  rmsnorm_dw_partial_kernel<T><<<dim3(ceil_div(d, 32), chunks), dim3(32, kDwPhases), 0, stream>>>(
      part, dout, ldg, x, ldx, rstd, n, d, rpc);
  HM_CUDA_LAUNCHED("rmsnorm_backward (dw partials)");
  column_sums<float>(part, chunks, d, AddToVec<G>{dw}, stream, "rmsnorm_backward (dw)");
}

template <class T>
void swiglu_backward(T* dg, int lddg, T* du, int lddu, const T* dout, int ldo, const T* g, int ldgg, const T* u,
                     int ldu, int n, int f, cudaStream_t stream) {
  if (n <= 0 || f <= 0) return;
  HM_CHECK(ceil_div(f, kThreads) <= 65535, "cuda swiglu_backward: ", f, " columns are too many");
  swiglu_backward_kernel<T><<<dim3(n, ceil_div(f, kThreads)), kThreads, 0, stream>>>(dg, lddg, du, lddu, dout, ldo,
                                                                                     g, ldgg, u, ldu, f);
  HM_CUDA_LAUNCHED("swiglu_backward");
}

template <class T>
void rope_backward(T* dx, int ldx, int heads, int hd, const RaggedBatch& rb, float theta, cudaStream_t stream) {
  HM_CHECK(hd > 0 && hd % 2 == 0, "cuda rope_backward: head_dim must be even, got ", hd);
  if (rb.n_tokens <= 0) return;
  const int per_row = heads * (hd / 2);
  rope_backward_kernel<T><<<dim3(rb.n_tokens, ceil_div(per_row, 128)), 128, 0, stream>>>(
      dx, ldx, heads, hd, rb.cu_seqlens, rb.pos0, rb.nseq, std::log2(double(theta)));
  HM_CUDA_LAUNCHED("rope_backward");
}

template <class T, class G>
void embedding_backward(G* dtable, int ldt, const T* dout, int ldo, const int32_t* order, const int32_t* seg,
                        const int32_t* seg_id, int nseg, int d, cudaStream_t stream) {
  if (nseg <= 0 || d <= 0) return;
  HM_CHECK(ceil_div(d, kThreads) <= 65535, "cuda embedding_backward: ", d, " columns are too many");
  embedding_backward_kernel<T, G><<<dim3(nseg, ceil_div(d, kThreads)), kThreads, 0, stream>>>(
      dtable, ldt, dout, ldo, order, seg, seg_id, d);
  HM_CUDA_LAUNCHED("embedding_backward");
}

template <class TZ, class TD>
void cross_entropy_rows(TD* dz, const TZ* z, const int32_t* targets, float* loss, int n, int V, float scale,
                        cudaStream_t stream) {
  if (n <= 0 || V <= 0) return;
  // The kernel's own static shared memory (its block reductions' arrays) counts against the same
  // per-block limit as the row: both are read from the device and the function, not assumed.
  static const std::pair<int, int> limits = [] {
    int dev = 0, optin = 0;
    HM_CUDA_OK(cudaGetDevice(&dev), "cross_entropy_head (cudaGetDevice)");
    HM_CUDA_OK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
               "cross_entropy_head (shared memory per block)");
    cudaFuncAttributes fa{};
    HM_CUDA_OK(cudaFuncGetAttributes(&fa, cross_entropy_rows_smem_kernel<TZ, TD>),
               "cross_entropy_head (cudaFuncGetAttributes)");
    const int dyn = optin - int(fa.sharedSizeBytes);
    HM_CUDA_OK(cudaFuncSetAttribute(cross_entropy_rows_smem_kernel<TZ, TD>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, dyn),
               "cross_entropy_head (cudaFuncSetAttribute)");
    return std::pair<int, int>{optin, dyn};
  }();
  const size_t bytes = size_t(V) * sizeof(TZ);
  const char* ab = std::getenv("HM_CUDA_HEAD_ROWS");  // =passes: the three-pass kernel (A/B runs)
  const bool passes = ab != nullptr && std::string(ab) == "passes";
  if (!passes && bytes <= size_t(limits.second)) {
    cross_entropy_rows_smem_kernel<TZ, TD><<<n, kCeThreads, bytes, stream>>>(dz, z, targets, loss, V, scale);
  } else {
    cross_entropy_rows_kernel<TZ, TD><<<n, kThreads, 0, stream>>>(dz, z, targets, loss, V, scale);
  }
  HM_CUDA_LAUNCHED("cross_entropy_head (rows)");
}

template <class T>
void relu2_backward(T* dx, int lddx, const T* dout, int ldo, const T* x, int ldx, int n, int f, cudaStream_t stream) {
  if (n <= 0 || f <= 0) return;
  HM_CHECK(ceil_div(f, kThreads) <= 65535, "cuda relu2_backward: ", f, " columns are too many");
  relu2_backward_kernel<T><<<dim3(n, ceil_div(f, kThreads)), kThreads, 0, stream>>>(dx, lddx, dout, ldo, x, ldx, f);
  HM_CUDA_LAUNCHED("relu2_backward");
}

template <class T>
void row_dots(float* out, const T* a, int lda, const int32_t* a_idx, const T* b, int ldb, int rows, int d,
              cudaStream_t stream) {
  if (rows <= 0) return;
  row_dots_kernel<T><<<ceil_div(rows, kThreads / 32), kThreads, 0, stream>>>(out, a, lda, a_idx, b, ldb, rows, d);
  HM_CUDA_LAUNCHED("row_dots");
}

template <class T>
void router(float* r, float* s_tmp, float* feats, const T* u, int ldu, int D, const float* w, const float* fw,
            const float* b, const RaggedBatch& rb, int chunk, float* state, cudaStream_t stream) {
  if (rb.n_tokens <= 0 || rb.nseq <= 0) return;
  HM_CHECK(D >= 1 && D <= kMaxRouterWidth, "cuda router: width ", D, " (1 to ", kMaxRouterWidth, ")");
  HM_CHECK(ceil_div(rb.max_len, kRouterTokens) <= 65535, "cuda router: a sequence of ", rb.max_len,
           " tokens is too long");
  float* s = chunk > 0 ? s_tmp : r;
  router_kernel<T><<<dim3(rb.nseq, ceil_div(rb.max_len, kRouterTokens)), kThreads, sizeof(float) * size_t(D),
                     stream>>>(s, feats, u, ldu, D, w, fw, b, rb.cu_seqlens, rb.slots, rb.pos0, state);
  HM_CUDA_LAUNCHED("router");
  if (chunk > 0) {
    router_chunk_kernel<<<dim3(rb.nseq, ceil_div(rb.max_len, kThreads)), kThreads, 0, stream>>>(
        r, s, rb.cu_seqlens, rb.slots, rb.pos0, state, D, chunk);
    HM_CUDA_LAUNCHED("router (chunks)");
  }
  if (state) {
    router_state_kernel<T><<<dim3(rb.nseq, ceil_div(D, kThreads)), kThreads, 0, stream>>>(
        state, u, ldu, D, s, rb.cu_seqlens, rb.slots, rb.pos0, chunk);
    HM_CUDA_LAUNCHED("router (state)");
  }
}

#define HM_INST_G(T, G)                                                                                        \
  template void rmsnorm_backward<T, G>(T*, int, G*, const T*, int, const T*, int, const T*, int, int, float, bool, \
                                       void*, cudaStream_t);                                                   \
  template void embedding_backward<T, G>(G*, int, const T*, int, const int32_t*, const int32_t*, const int32_t*, \
                                         int, int, cudaStream_t);
#define HM_INST(T)                                                                                              \
  HM_INST_G(T, T)                                                                                               \
  template void swiglu_backward<T>(T*, int, T*, int, const T*, int, const T*, int, const T*, int, int, int,       \
                                   cudaStream_t);                                                               \
  template void relu2_backward<T>(T*, int, const T*, int, const T*, int, int, int, cudaStream_t);              \
  template void row_dots<T>(float*, const T*, int, const int32_t*, const T*, int, int, int, cudaStream_t);      \
  template void router<T>(float*, float*, float*, const T*, int, int, const float*, const float*,               \
                          const float*, const RaggedBatch&, int, float*, cudaStream_t);                         \
  template void rope_backward<T>(T*, int, int, int, const RaggedBatch&, float, cudaStream_t);                  \
  template void cross_entropy_rows<T, T>(T*, const T*, const int32_t*, float*, int, int, float, cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
HM_INST_G(__nv_bfloat16, float)
HM_INST_G(__half, float)
template void cross_entropy_rows<float, __nv_bfloat16>(__nv_bfloat16*, const float*, const int32_t*, float*, int, int,
                                                       float, cudaStream_t);
template void cross_entropy_rows<float, __half>(__half*, const float*, const int32_t*, float*, int, int, float,
                                                cudaStream_t);
#undef HM_INST
#undef HM_INST_G

}  // namespace hm::cuda
