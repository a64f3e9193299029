// Row and elementwise ops (rows on grid x, which allows 2^31 - 1 of them): RMSNorm (optionally fused with the residual add), embedding gather,
// Mamba-2's gated RMSNorm, SwiGLU and RoPE over a ragged batch. Memory-bound; one pass over the data where possible.
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace hm::cuda {
namespace {

constexpr int kRowThreads = 256;

// One block per row. With delta, h += delta first (stored as T) and the norm reads the stored h.
template <class T>
__global__ void __launch_bounds__(kRowThreads) rmsnorm_kernel(T* __restrict__ out, T* h,
                                                              const T* __restrict__ delta,
                                                              const T* __restrict__ w, int d,
                                                              float eps) {
  const size_t row = size_t(blockIdx.x) * d;
  float ss = 0;
  for (int j = threadIdx.x; j < d; j += kRowThreads) {
    float v = to_f(h[row + j]);
    if (delta) {
      const T hv = from_f<T>(v + to_f(delta[row + j]));
      h[row + j] = hv;
      v = to_f(hv);
    }
    ss += v * v;
  }
  const float r = rsqrtf(block_sum<kRowThreads>(ss) / float(d) + eps);
  // Each thread re-reads only the elements it wrote itself, so no barrier is needed.
  for (int j = threadIdx.x; j < d; j += kRowThreads)
    out[row + j] = from_f<T>(to_f(h[row + j]) * r * to_f(w[j]));
}

// A folded state bridge's second step (bridge_add in cuda_ops.h): one block per row.
template <class T>
__global__ void __launch_bounds__(kRowThreads) bridge_add_kernel(T* y, int ldy, const T* __restrict__ t, int ldt,
                                                                 const T* __restrict__ x, int ldx, int n, int k,
                                                                 float eps, const T* __restrict__ next_w,
                                                                 T* __restrict__ next, int ldn) {
  const int64_t r = blockIdx.x;
  float ss = 0;
  for (int c = threadIdx.x; c < k; c += kRowThreads) {
    const float v = to_f(x[r * ldx + c]);
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum<kRowThreads>(ss) / float(k) + eps);
  const T* tr = t + r * ldt;
  T* yr = y + r * ldy;
  float sy = 0;
  for (int j = threadIdx.x; j < n; j += kRowThreads) {
    const T v = from_f<T>(to_f(yr[j]) + to_f(tr[j]) + inv * to_f(tr[n + j]));
    yr[j] = v;
    sy += to_f(v) * to_f(v);
  }
  if (next == nullptr) return;
  const float ry = rsqrtf(block_sum<kRowThreads>(sy) / float(n) + eps);
  // Each thread re-reads only the elements of y it wrote itself.
  for (int j = threadIdx.x; j < n; j += kRowThreads) next[r * ldn + j] = from_f<T>(to_f(yr[j]) * ry * to_f(next_w[j]));
}

// Many rows (training, long prefills): one warp a row, 4 columns a lane per access, 8 rows a
// block; the second pass re-reads the row from L1/L2, not HBM. Same math as rmsnorm_kernel.
constexpr int kWarpRowsMin = 2048;  // below this, a block a row keeps more of the GPU busy
template <class T>
__global__ void __launch_bounds__(256) rmsnorm_warp_kernel(T* __restrict__ out, T* h, const T* __restrict__ delta,
                                                           const T* __restrict__ w, int n, int d, float eps) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= n) return;
  const size_t r0 = size_t(row) * d;
  float ss = 0;
  for (int j = lane * 4; j < d; j += 128) {
    float v[4];
    load4(h + r0 + j, v);
    if (delta) {
      float dv[4];
      load4(delta + r0 + j, dv);
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = to_f(from_f<T>(v[e] + dv[e]));
      store4(h + r0 + j, v);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) ss += v[e] * v[e];
  }
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  const float r = rsqrtf(ss / float(d) + eps);
  for (int j = lane * 4; j < d; j += 128) {  // each lane re-reads only what it wrote
    float v[4], wv[4];
    load4(h + r0 + j, v);
    load4(w + j, wv);
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = v[e] * r * wv[e];
    store4(out + r0 + j, v);
  }
}

// One block per (row, group): g = y * silu(z) in float, out = g * rsqrt(mean_group(g^2) + eps) * w.
// g is recomputed in the second loop rather than kept: each thread reads only its own columns,
// so out may alias y.
template <class T>
__global__ void __launch_bounds__(kRowThreads) gated_rmsnorm_kernel(T* out, int ldo, const T* y, int ldy,
                                                                    const T* __restrict__ z, int ldz,
                                                                    const T* __restrict__ w, int group,
                                                                    float eps) {
  const size_t i = blockIdx.x;
  const int j0 = blockIdx.y * group;
  float ss = 0;
  for (int j = j0 + threadIdx.x; j < j0 + group; j += kRowThreads) {
    const float g = to_f(y[i * ldy + j]) * silu(to_f(z[i * ldz + j]));
    ss += g * g;
  }
  const float r = rsqrtf(block_sum<kRowThreads>(ss) / float(group) + eps);
  for (int j = j0 + threadIdx.x; j < j0 + group; j += kRowThreads) {
    const float g = to_f(y[i * ldy + j]) * silu(to_f(z[i * ldz + j]));
    out[i * ldo + j] = from_f<T>(g * r * to_f(w[j]));
  }
}

template <class T>
__global__ void embedding_kernel(T* __restrict__ out, const T* __restrict__ table,
                                 const int32_t* __restrict__ ids, int d) {
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j < d) out[size_t(blockIdx.x) * d + j] = table[size_t(ids[blockIdx.x]) * d + j];
}

template <class T>
__global__ void swiglu_kernel(T* __restrict__ out, int ldo, const T* __restrict__ g,
                              const T* __restrict__ u, int ldgu, int f) {
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  const size_t i = blockIdx.x;
  if (j < f) out[i * ldo + j] = from_f<T>(silu(to_f(g[i * ldgu + j])) * to_f(u[i * ldgu + j]));
}

template <class T>
__global__ void relu2_kernel(T* __restrict__ out, int ldo, const T* __restrict__ x, int ldx, int f) {
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  const size_t i = blockIdx.x;
  if (j < f) {
    const float r = fmaxf(to_f(x[i * ldx + j]), 0.0f);
    out[i * ldo + j] = from_f<T>(r * r);
  }
}

// One thread per (row, head, i < hd/2). The angle is formed and reduced in double: at position
// 8192 a float angle would already be off by ~5e-4 rad.
template <class T>
__global__ void rope_kernel(T* x, int ldx, int heads, int hd, const int32_t* __restrict__ cu,
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
  v[i] = from_f<T>(float(a * cs - b * sn));
  v[i + half] = from_f<T>(float(b * cs + a * sn));
}

}  // namespace

template <class T>
void rmsnorm(T* out, const T* x, const T* w, int n, int d, float eps, cudaStream_t stream) {
  if (n <= 0) return;
  // x is only read: the kernel writes h only when delta is given.
  if (n >= kWarpRowsMin && aligned4(out, d) && aligned4(x, d) && aligned4(w, d))
    rmsnorm_warp_kernel<T><<<ceil_div(n, 8), 256, 0, stream>>>(out, const_cast<T*>(x), nullptr, w, n, d, eps);
  else
    rmsnorm_kernel<T><<<n, kRowThreads, 0, stream>>>(out, const_cast<T*>(x), nullptr, w, d, eps);
  HM_CUDA_LAUNCHED("rmsnorm");
}

template <class T>
void add_rmsnorm(T* out, T* h, const T* delta, const T* w, int n, int d, float eps,
                 cudaStream_t stream) {
  if (n <= 0) return;
  if (n >= kWarpRowsMin && aligned4(out, d) && aligned4(h, d) && aligned4(delta, d) && aligned4(w, d))
    rmsnorm_warp_kernel<T><<<ceil_div(n, 8), 256, 0, stream>>>(out, h, delta, w, n, d, eps);
  else
    rmsnorm_kernel<T><<<n, kRowThreads, 0, stream>>>(out, h, delta, w, d, eps);
  HM_CUDA_LAUNCHED("add_rmsnorm");
}

template <class T>
void bridge_add(T* y, int ldy, const T* t, int ldt, const T* x, int ldx, int m, int n, int k, float eps,
                const T* next_w, T* next, int ldn, cudaStream_t stream) {
  if (m <= 0) return;
  bridge_add_kernel<T><<<m, kRowThreads, 0, stream>>>(y, ldy, t, ldt, x, ldx, n, k, eps, next_w, next, ldn);
  HM_CUDA_LAUNCHED("bridge_add");
}

template <class T>
void gated_rmsnorm(T* out, int ldo, const T* y, int ldy, const T* z, int ldz, const T* w, int n, int E, int group,
                   float eps, cudaStream_t stream) {
  HM_CHECK(group > 0 && E % group == 0 && E / group <= 65535, "cuda gated_rmsnorm: group ", group,
           " must divide d_inner ", E, " into at most 65535 groups");
  if (n <= 0 || E <= 0) return;
  gated_rmsnorm_kernel<T><<<dim3(n, E / group), kRowThreads, 0, stream>>>(out, ldo, y, ldy, z, ldz, w, group, eps);
  HM_CUDA_LAUNCHED("gated_rmsnorm");
}

template <class T>
void embedding(T* out, const T* table, const int32_t* ids, int n, int d, cudaStream_t stream) {
  if (n <= 0) return;
  embedding_kernel<T><<<dim3(n, ceil_div(d, 256)), 256, 0, stream>>>(out, table, ids, d);
  HM_CUDA_LAUNCHED("embedding");
}

template <class T>
void swiglu(T* out, int ldo, const T* g, const T* u, int ldgu, int n, int f, cudaStream_t stream) {
  if (n <= 0) return;
  swiglu_kernel<T><<<dim3(n, ceil_div(f, 256)), 256, 0, stream>>>(out, ldo, g, u, ldgu, f);
  HM_CUDA_LAUNCHED("swiglu");
}

template <class T>
void relu2(T* out, int ldo, const T* x, int ldx, int n, int f, cudaStream_t stream) {
  if (n <= 0) return;
  relu2_kernel<T><<<dim3(n, ceil_div(f, 256)), 256, 0, stream>>>(out, ldo, x, ldx, f);
  HM_CUDA_LAUNCHED("relu2");
}

template <class T>
void rope(T* x, int ldx, int heads, int hd, const RaggedBatch& rb, float theta, cudaStream_t stream) {
  HM_CHECK(hd % 2 == 0, "cuda rope: head_dim must be even, got ", hd);
  if (rb.n_tokens <= 0) return;
  const int per_row = heads * (hd / 2);
  rope_kernel<T><<<dim3(rb.n_tokens, ceil_div(per_row, 128)), 128, 0, stream>>>(
      x, ldx, heads, hd, rb.cu_seqlens, rb.pos0, rb.nseq, std::log2(double(theta)));
  HM_CUDA_LAUNCHED("rope");
}

#define HM_INST(T)                                                                              \
  template void rmsnorm<T>(T*, const T*, const T*, int, int, float, cudaStream_t);             \
  template void add_rmsnorm<T>(T*, T*, const T*, const T*, int, int, float, cudaStream_t);     \
  template void bridge_add<T>(T*, int, const T*, int, const T*, int, int, int, int, float, const T*, T*, int, \
                              cudaStream_t);                                                   \
  template void embedding<T>(T*, const T*, const int32_t*, int, int, cudaStream_t);            \
  template void gated_rmsnorm<T>(T*, int, const T*, int, const T*, int, const T*, int, int, int, float, \
                                 cudaStream_t);                                                \
  template void swiglu<T>(T*, int, const T*, const T*, int, int, int, cudaStream_t);           \
  template void relu2<T>(T*, int, const T*, int, int, int, cudaStream_t);                      \
  template void rope<T>(T*, int, int, int, const RaggedBatch&, float, cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST

}  // namespace hm::cuda
