// The decode step's GEMV (decode.h). One warp, or ks warps splitting k, per output column j
// of y (a row of W); 8 warps per block. Each lane streams 16-byte vectors of its W row and
// keeps one float sum per x row (m <= 8), so W is read exactly once and x comes from L1/L2.
// The first kPre vectors of every lane load before pdl_wait(): they are weights, constant,
// and their DRAM latency is what a tiny per-kernel budget cannot otherwise hide.
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/decode.h"

namespace hm::cuda {

bool pdl_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("HM_CUDA_PDL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

namespace {

constexpr int kWarps = 8, kThreads = 32 * kWarps, kPre = 4;

// 16 bytes of T as floats.
template <class T> __device__ __forceinline__ void widen(const uint4& u, float* f);
template <> __device__ __forceinline__ void widen<float>(const uint4& u, float* f) {
  f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y); f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
}
template <> __device__ __forceinline__ void widen<__nv_bfloat16>(const uint4& u, float* f) {
  const auto* p = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(p[i]);
    f[2 * i] = t.x; f[2 * i + 1] = t.y;
  }
}
template <> __device__ __forceinline__ void widen<__half>(const uint4& u, float* f) {
  const auto* p = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(p[i]);
    f[2 * i] = t.x; f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T, class TY>
struct Args {
  TY* y; int ldy;
  const T* x; int ldx;
  const T* W; int ldw;
  int m, n, k, ks;
  bool accumulate;
  const T* norm_w; float eps;
  ConvStep<T> conv;
};

template <class T, class TY, int M>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const Args<T, TY> a) {
  constexpr int V = 16 / sizeof(T);
  __shared__ float red[kWarps][M];
  __shared__ float inv[M];
  pdl_trigger();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rpb = kWarps / a.ks, part = warp % a.ks;
  const int j = blockIdx.x * rpb + warp / a.ks;
  const bool row_ok = j < a.n;
  const int nvec = a.k / V, stride = 32 * a.ks, v0 = part * 32 + lane;
  const uint4* wrow = reinterpret_cast<const uint4*>(a.W + size_t(row_ok ? j : 0) * a.ldw);

  uint4 pre[kPre];
#pragma unroll
  for (int i = 0; i < kPre; ++i) {
    const int v = v0 + i * stride;
    pre[i] = row_ok && v < nvec ? __ldg(wrow + v) : make_uint4(0, 0, 0, 0);
  }
  pdl_wait();

  if (a.norm_w != nullptr) {  // 1 / rms of each x row, over the whole block
    float ss[M];
#pragma unroll
    for (int r = 0; r < M; ++r) ss[r] = 0.0f;
    for (int i = threadIdx.x; i < a.k; i += kThreads) {
#pragma unroll
      for (int r = 0; r < M; ++r)
        if (r < a.m) {
          const float v = to_f(a.x[size_t(r) * a.ldx + i]);
          ss[r] += v * v;
        }
    }
#pragma unroll
    for (int r = 0; r < M; ++r) {
      ss[r] = warp_sum(ss[r]);
      if (lane == 0) red[warp][r] = ss[r];
    }
    __syncthreads();
    if (threadIdx.x < M) {
      float t = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) t += red[w][threadIdx.x];
      inv[threadIdx.x] = rsqrtf(t / float(a.k) + a.eps);
    }
    __syncthreads();
  }

  float acc[M];
#pragma unroll
  for (int r = 0; r < M; ++r) acc[r] = 0.0f;
  auto consume = [&](const uint4& wv, int v) {
    float wf[V], g[V];
    widen<T>(wv, wf);
    const int c0 = v * V;
    if (a.norm_w != nullptr) {
      widen<T>(*reinterpret_cast<const uint4*>(a.norm_w + c0), g);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) g[e] = 1.0f;
    }
#pragma unroll
    for (int r = 0; r < M; ++r)
      if (r < a.m) {
        float xf[V];
        widen<T>(*reinterpret_cast<const uint4*>(a.x + size_t(r) * a.ldx + c0), xf);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[r] += wf[e] * (xf[e] * g[e]);
      }
  };
#pragma unroll
  for (int i = 0; i < kPre; ++i) {
    const int v = v0 + i * stride;
    if (row_ok && v < nvec) consume(pre[i], v);
  }
  for (int base = v0 + kPre * stride; base < nvec; base += kPre * stride) {
    uint4 w4[kPre];
#pragma unroll
    for (int i = 0; i < kPre; ++i) {
      const int v = base + i * stride;
      w4[i] = row_ok && v < nvec ? __ldg(wrow + v) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kPre; ++i) {
      const int v = base + i * stride;
      if (row_ok && v < nvec) consume(w4[i], v);
    }
  }

#pragma unroll
  for (int r = 0; r < M; ++r) acc[r] = warp_sum(acc[r]);
  if (a.ks > 1) {  // the ks warps of a column are adjacent: the first adds the others' sums
    __syncthreads();  // red may still be read for the norm
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < M; ++r) red[warp][r] = acc[r];
    }
    __syncthreads();
    if (part == 0) {
#pragma unroll
      for (int r = 0; r < M; ++r) {
        float t = 0.0f;
        for (int p = 0; p < a.ks; ++p) t += red[warp + p][r];
        acc[r] = t;
      }
    }
  }
  if (part != 0 || !row_ok || lane >= a.m) return;
  // Lane r finishes row r (a register picked without dynamic indexing).
  const int r = lane;
  float v = 0.0f;
#pragma unroll
  for (int i = 0; i < M; ++i)
    if (i == r) v = acc[i] * (a.norm_w != nullptr ? inv[i] : 1.0f);
  TY* yp = a.y + size_t(r) * a.ldy + j;
  if (a.accumulate) v += to_f(*yp);
  *yp = from_f<TY>(v);
  if (j < a.conv.E) {  // the conv step of sequence r, channel j (conv_step_kernel's order of sums)
    const int K = a.conv.K;
    const float xv = to_f(from_f<T>(v));
    float* st = a.conv.state + (size_t(a.conv.slots[r]) * a.conv.E + j) * (K - 1);
    const T* w = a.conv.w + size_t(j) * K;
    float win[kMaxConv];
    float c = to_f(a.conv.b[j]) + to_f(w[K - 1]) * xv;
#pragma unroll
    for (int i = 0; i < kMaxConv - 1; ++i)
      if (i < K - 1) {
        win[i] = st[i];
        c += to_f(w[i]) * win[i];
      }
    a.conv.out[size_t(r) * a.conv.ldo + j] = from_f<T>(silu(c));
#pragma unroll
    for (int i = 0; i < kMaxConv - 1; ++i)
      if (i < K - 1) st[i] = i + 1 < K - 1 ? win[i + 1] : xv;
  }
}

int sm_count() {
  static const int n = [] {
    int dev = 0, c = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      cudaGetLastError();
      return 132;
    }
    return c;
  }();
  return n;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool gemv_fits(int m, int k, const void* x, int64_t ldx, const void* W, int64_t ldw, const void* norm_w,
               size_t elem_bytes) {
  const int64_t v = 16 / int64_t(elem_bytes);
  return m >= 1 && m <= kGemvMaxRows && k >= 1 && k % v == 0 && ldx % v == 0 && ldw % v == 0 && aligned16(x) &&
         aligned16(W) && (norm_w == nullptr || aligned16(norm_w));
}

template <class T, class TY>
void gemv(TY* y, int ldy, const T* x, int ldx, const T* W, int ldw, int m, int n, int k, bool accumulate,
          const T* norm_w, float eps, const ConvStep<T>* conv, cudaStream_t stream) {
  HM_CHECK(gemv_fits(m, k, x, ldx, W, ldw, norm_w, sizeof(T)), "cuda gemv: shape m ", m, " k ", k, " ldx ", ldx,
           " ldw ", ldw, " or alignment not taken (gemv_fits)");
  HM_CHECK(conv == nullptr || conv->E == 0 || (!accumulate && sizeof(TY) == sizeof(T) && conv->E <= n &&
                                               conv->K >= 2 && conv->K <= kMaxConv),
           "cuda gemv: the fused conv step needs y of the input type, no accumulation, E <= n, K in [2, ",
           kMaxConv, "]");
  if (n <= 0) return;
  Args<T, TY> a{y, ldy, x, ldx, W, ldw, m, n, k, 1, accumulate, norm_w, eps, conv ? *conv : ConvStep<T>{}};
  // Enough blocks for two waves; more warps per column only while each still gets vectors.
  const int nvec = k / (16 / int(sizeof(T)));
  while (a.ks < kWarps && ceil_div(n, kWarps / a.ks) < 2 * sm_count() && 64 * a.ks <= nvec) a.ks *= 2;
  const dim3 grid(ceil_div(n, kWarps / a.ks));
  if (m == 1)
    launch_pdl("gemv", gemv_kernel<T, TY, 1>, grid, dim3(kThreads), stream, a);
  else if (m == 2)
    launch_pdl("gemv", gemv_kernel<T, TY, 2>, grid, dim3(kThreads), stream, a);
  else if (m <= 4)
    launch_pdl("gemv", gemv_kernel<T, TY, 4>, grid, dim3(kThreads), stream, a);
  else
    launch_pdl("gemv", gemv_kernel<T, TY, 8>, grid, dim3(kThreads), stream, a);
}

#define HM_INST(T, TY)                                                                                  \
  template void gemv<T, TY>(TY*, int, const T*, int, const T*, int, int, int, int, bool, const T*, float, \
                            const ConvStep<T>*, cudaStream_t);
HM_INST(float, float)
HM_INST(__nv_bfloat16, __nv_bfloat16)
HM_INST(__nv_bfloat16, float)
HM_INST(__half, __half)
HM_INST(__half, float)
#undef HM_INST

}  // namespace hm::cuda
