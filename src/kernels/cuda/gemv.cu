// The decode step's GEMV (decode.h), two kernels:
//  - bf16/f16 on the tensor cores: a warp computes 8 columns of y (8 rows of W) for up to 16
//    (MT = 1) or 32 (MT = 2) rows of x with mma m16n8k16, W as the B operand. Lane (g, q) loads
//    16 contiguous bytes of W row g, elements 8q..8q+7 of each 32-wide k chunk, and x row g
//    (and g + 8) at the same elements: the mma's k order is a permutation of the chunk's, the
//    same for both operands, so the dot products are unchanged and every load is one 16-byte
//    vector with no conversion or shuffle. ks warps split k when the columns alone would not
//    fill the GPU.
//  - f32 (and other shapes) on the CUDA cores: one warp, or ks warps splitting k, per column,
//    lanes streaming 16-byte vectors of the W row, one float sum per x row (m <= 8).
// Either way W is read exactly once, x comes from L1/L2, and the first kPre vectors of every
// lane load before pdl_wait(): they are weights, constant, and their DRAM latency is what a
// tiny per-kernel budget cannot otherwise hide.
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
// Off unless HM_CUDA_GEMV_TC=1: on the H200 the tensor-core kernel lost to the CUDA-core one
// and to cuBLASLt at every shape measured (docs/CUDA.md, "Decode step"); tests still run it.
bool g_tensor_cores = [] {
  const char* v = std::getenv("HM_CUDA_GEMV_TC");
  return v != nullptr && std::strcmp(v, "1") == 0;
}();
}  // namespace
void set_gemv_tensor_cores(bool on) { g_tensor_cores = on; }
bool gemv_tensor_cores() { return g_tensor_cores; }

namespace {
// On unless HM_CUDA_GEMV_ROW=0: on the H200 it took the 1.4B shape's decode step from 1.97 to
// 1.54 ms and cost the 130M shape 1.4% (docs/CUDA.md, "Decode step").
bool g_row_kernel = [] {
  const char* v = std::getenv("HM_CUDA_GEMV_ROW");
  return v == nullptr || std::strcmp(v, "0") != 0;
}();
}  // namespace
void set_gemv_row_kernel(bool on) { g_row_kernel = on; }
bool gemv_row_kernel() { return g_row_kernel; }

namespace {

constexpr int kWarps = 8, kThreads = 32 * kWarps, kPre = 4, kPreMma = 8;

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
  int xs_ld;  // tensor-core kernel: x (normed) staged in shared memory at this row stride; 0: read from global
  const T* col_scale;  // y[r, j] (+)= col_scale[j] * (the sum rounded to T), as linear then add_rows
  // gemv_bridge: the bridge's matrix and norm weight (the row kernel's DUAL columns).
  const T* W2 = nullptr; int ldw2 = 0;
  const T* norm2_w = nullptr;
  // Mamba-2's gated norm (the row kernels): x' = rmsnorm(x * silu(gate)) * norm_w.
  const T* gate = nullptr; int ldgate = 0;
};

// A finished sum of column j: through col_scale when given (rounded to T first, as the linear
// output the unfused add_rows would read).
template <class T, class TY>
__device__ __forceinline__ float scaled(const Args<T, TY>& a, int j, float v) {
  return a.col_scale != nullptr ? to_f(from_f<T>(v)) * to_f(a.col_scale[j]) : v;
}

// The conv step of sequence r, channel j on y[r, j] = v (conv_step_kernel's order of sums).
template <class T>
__device__ __forceinline__ void conv_step(const ConvStep<T>& cs, int r, int j, float v) {
  const int K = cs.K;
  const float xv = to_f(from_f<T>(v));  // the conv reads x as stored
  float* st = cs.state + (size_t(cs.slots[r]) * cs.E + j) * (K - 1);
  const T* w = cs.w + size_t(j) * K;
  float win[kMaxConv];
  float c = to_f(cs.b[j]) + to_f(w[K - 1]) * xv;
#pragma unroll
  for (int i = 0; i < kMaxConv - 1; ++i)
    if (i < K - 1) {
      win[i] = st[i];
      c += to_f(w[i]) * win[i];
    }
  cs.out[size_t(r) * cs.ldo + j] = from_f<T>(silu(c));
#pragma unroll
  for (int i = 0; i < kMaxConv - 1; ++i)
    if (i < K - 1) st[i] = i + 1 < K - 1 ? win[i + 1] : xv;
}

// y[r, j] = v into the conv step when column j is one of its channels.
template <class T>
__device__ __forceinline__ void conv_at(const ConvStep<T>& cs, int r, int j, float v) {
  const int c = j - cs.c0;
  if (c >= 0 && c < cs.E) conv_step(cs, r, c, v);
}

// f[e] *= silu(gate[e]) for one 16-byte vector of the gate, when there is one.
template <class T, int V>
__device__ __forceinline__ void apply_gate(const T* gate, int v, float (&f)[V]) {
  if (gate == nullptr) return;
  float z[V];
  widen<T>(reinterpret_cast<const uint4*>(gate)[v], z);
#pragma unroll
  for (int e = 0; e < V; ++e) f[e] *= silu(z[e]);
}

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
  v = scaled(a, j, v);
  TY* yp = a.y + size_t(r) * a.ldy + j;
  if (a.accumulate) v += to_f(*yp);
  *yp = from_f<TY>(v);
  conv_at(a.conv, r, j, v);
}

// One output y[r, j] of the tensor-core kernel's tile: rounded, accumulated, stored, and fed
// to the conv step when j is a conv channel.
template <class T, class TY>
__device__ __forceinline__ void finish(const Args<T, TY>& a, int r, int j, float v) {
  if (r >= a.m || j >= a.n) return;
  v = scaled(a, j, v);
  TY* yp = a.y + size_t(r) * a.ldy + j;
  if (a.accumulate) v += to_f(*yp);
  *yp = from_f<TY>(v);
  conv_at(a.conv, r, j, v);
}

// 16 bytes of x row r at column k0 as an mma operand: zero past the m rows; staged rows
// (already normed) from shared memory, else straight from global (never with the norm).
template <class T, class TY>
__device__ __forceinline__ uint4 x_frag(const Args<T, TY>& a, const T* xs, int r, int k0) {
  if (r >= a.m) return make_uint4(0, 0, 0, 0);
  if (a.xs_ld > 0) return *reinterpret_cast<const uint4*>(xs + size_t(r) * a.xs_ld + k0);
  return *reinterpret_cast<const uint4*>(a.x + size_t(r) * a.ldx + k0);
}

template <class T, class TY, int MT>
__global__ void __launch_bounds__(kThreads) gemv_mma_kernel(const Args<T, TY> a) {
  __shared__ float red[kWarps][4 * MT][32];
  __shared__ float inv[kGemvMaxNormRows];
  extern __shared__ uint4 xs_raw[];  // the staged x rows (xs_ld elements apart)
  const T* xs = reinterpret_cast<const T*>(xs_raw);
  pdl_trigger();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int part = warp % a.ks;
  const int n0 = (blockIdx.x * (kWarps / a.ks) + warp / a.ks) * 8;
  const bool row_ok = n0 + g < a.n;
  const int chunks = a.k / 32;
  // Chunk c of this lane's W row: the 16 bytes at element 32 c + 8 q.
  const uint4* wrow = reinterpret_cast<const uint4*>(a.W + size_t(row_ok ? n0 + g : 0) * a.ldw) + q;

  uint4 pre[kPreMma];
#pragma unroll
  for (int i = 0; i < kPreMma; ++i) {
    const int c = part + i * a.ks;
    pre[i] = row_ok && c < chunks ? __ldg(wrow + 4 * c) : make_uint4(0, 0, 0, 0);
  }
  pdl_wait();

  if (a.norm_w != nullptr) {  // 1 / rms of the m <= 8 rows of x, over the whole block
    float ss[kGemvMaxNormRows];
#pragma unroll
    for (int r = 0; r < kGemvMaxNormRows; ++r) ss[r] = 0.0f;
    for (int i = threadIdx.x; i < a.k; i += kThreads) {
#pragma unroll
      for (int r = 0; r < kGemvMaxNormRows; ++r)
        if (r < a.m) {
          const float v = to_f(a.x[size_t(r) * a.ldx + i]);
          ss[r] += v * v;
        }
    }
#pragma unroll
    for (int r = 0; r < kGemvMaxNormRows; ++r) {
      ss[r] = warp_sum(ss[r]);
      if (lane == 0) red[warp][r % (4 * MT)][r / (4 * MT)] = ss[r];
    }
    __syncthreads();
    if (threadIdx.x < kGemvMaxNormRows) {
      const int r = threadIdx.x;
      float t = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) t += red[w][r % (4 * MT)][r / (4 * MT)];
      inv[r] = rsqrtf(t / float(a.k) + a.eps);
    }
    __syncthreads();
  }
  // Stage x (normed, rounded to T as a stored normed row) in shared memory: every chunk then
  // reads its x fragment at shared-memory latency instead of one L2 round trip per chunk.
  if (a.xs_ld > 0) {
    T* xw = reinterpret_cast<T*>(xs_raw);
    const int vpr = a.k / 8;  // 16-byte vectors per row
    for (int i = threadIdx.x; i < a.m * vpr; i += kThreads) {
      const int r = i / vpr, k0 = 8 * (i % vpr);
      uint4 v = *reinterpret_cast<const uint4*>(a.x + size_t(r) * a.ldx + k0);
      if (a.norm_w != nullptr) {
        float xf[8], gf[8];
        widen<T>(v, xf);
        widen<T>(*reinterpret_cast<const uint4*>(a.norm_w + k0), gf);
        const float sc = inv[r];
        v = make_uint4(pack2<T>(xf[0] * sc * gf[0], xf[1] * sc * gf[1]), pack2<T>(xf[2] * sc * gf[2], xf[3] * sc * gf[3]),
                       pack2<T>(xf[4] * sc * gf[4], xf[5] * sc * gf[5]), pack2<T>(xf[6] * sc * gf[6], xf[7] * sc * gf[7]));
      }
      *reinterpret_cast<uint4*>(xw + size_t(r) * a.xs_ld + k0) = v;
    }
    __syncthreads();
  }

  float acc[MT][4];
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.0f;
  // Every lane takes part in every mma (a warp-wide instruction): masked rows load zeros.
  auto consume = [&](const uint4& wv, int c) {
    const int k0 = 32 * c + 8 * q;
    const uint32_t b0[2] = {wv.x, wv.y}, b1[2] = {wv.z, wv.w};
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      const uint4 xa = x_frag(a, xs, 16 * t + g, k0), xb = x_frag(a, xs, 16 * t + g + 8, k0);
      const uint32_t a0[4] = {xa.x, xb.x, xa.y, xb.y}, a1[4] = {xa.z, xb.z, xa.w, xb.w};
      mma16816<T>(acc[t], a0, b0);
      mma16816<T>(acc[t], a1, b1);
    }
  };
#pragma unroll
  for (int i = 0; i < kPreMma; ++i) {
    const int c = part + i * a.ks;  // the same for the whole warp
    if (c < chunks) consume(pre[i], c);
  }
  for (int base = part + kPreMma * a.ks; base < chunks; base += kPreMma * a.ks) {
    uint4 w8[kPreMma];
#pragma unroll
    for (int i = 0; i < kPreMma; ++i) {
      const int c = base + i * a.ks;
      w8[i] = row_ok && c < chunks ? __ldg(wrow + 4 * c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kPreMma; ++i) {
      const int c = base + i * a.ks;
      if (c < chunks) consume(w8[i], c);
    }
  }

  if (a.ks > 1) {  // the ks warps of a column group are adjacent: the first adds the others' tiles
    __syncthreads();  // red may still be read for the norm
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp][4 * t + i][lane] = acc[t][i];
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        for (int p = 1; p < a.ks; ++p) acc[t][i] += red[warp + p][4 * t + i][lane];
  }
  // acc[t] = rows 16 t + g (0, 1) and 16 t + g + 8 (2, 3) of x, columns n0 + 2 q (+1) of y.
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) finish(a, 16 * t + g + 8 * (i / 2), n0 + 2 * q + i % 2, acc[t][i]);
}

// One row of x (m == 1): x (times the norm weight) staged once per block in shared memory as
// floats, its 1 / rms applied to the finished sums; each
// warp, or ks warps splitting k, computes kRowCols adjacent columns, so every x vector read
// from shared memory feeds kRowCols weight vectors, and each lane keeps kRowPre x kRowCols
// 16-byte weight loads in flight (the first batch issued before pdl_wait). Per 16 weight bytes:
// one load, the widening, 8 FMAs and a quarter of the x reads, against the CUDA-core kernel's
// x (and norm weight) reload from L1 per vector.
// DUAL (gemv_bridge): a warp's columns are 2 outputs j of W (x as it is) and the same 2 of W2
// (x times norm2_w, staged as a second array, its 1 / rms applied at the end); each output's
// two sums meet by a shuffle and its y is written once. DUAL needs 72-89 registers (at 64, 4
// blocks an SM, it spilled), so 2 blocks an SM. GATE (Mamba-2's gated norm, a.gate): x times
// silu(gate) as it is staged; a template flag, since a run-time test cost the plain form 32-48
// bytes of spills at 64 registers; GATE itself spills at 64, so it also takes 2 blocks an SM.
constexpr int kRowCols = 4, kRowPre = 2;
template <class T, class TY, bool DUAL, bool GATE = false>
__global__ void __launch_bounds__(kThreads, DUAL || GATE ? 2 : 4) gemv_row_kernel(const Args<T, TY> a) {
  constexpr int V = 16 / sizeof(T);
  constexpr int kOut = DUAL ? kRowCols / 2 : kRowCols;  // output columns per warp
  extern __shared__ uint4 xs_raw[];
  float* xs = reinterpret_cast<float*>(xs_raw);  // k floats (DUAL: then k more, x * norm2_w)
  float* xs2 = xs + (DUAL ? a.k : 0);
  __shared__ float red[kWarps][kRowCols];
  pdl_trigger();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int part = warp % a.ks;
  const int j0 = (blockIdx.x * (kWarps / a.ks) + warp / a.ks) * kOut;
  const int nvec = a.k / V, stride = 32 * a.ks, v0 = part * 32 + lane;
  const uint4* wrow[kRowCols];
  bool ok[kRowCols];
#pragma unroll
  for (int c = 0; c < kRowCols; ++c) {
    const int j = j0 + c % kOut;
    ok[c] = j < a.n;
    const bool second = DUAL && c >= kOut;
    wrow[c] = reinterpret_cast<const uint4*>((second ? a.W2 : a.W) + size_t(ok[c] ? j : 0) * (second ? a.ldw2 : a.ldw));
  }
  uint4 pre[kRowPre][kRowCols];
#pragma unroll
  for (int i = 0; i < kRowPre; ++i)
#pragma unroll
    for (int c = 0; c < kRowCols; ++c) {
      const int v = v0 + i * stride;
      pre[i][c] = ok[c] && v < nvec ? __ldg(wrow[c] + v) : make_uint4(0, 0, 0, 0);
    }
  pdl_wait();

  // x (times the norm weight) as floats in shared memory, 16 bytes a load, every load of a
  // thread in flight at once; the row's 1 / rms multiplies the finished sums instead (m = 1).
  const bool norm = DUAL || a.norm_w != nullptr;  // DUAL: the bridge's norm (no norm on W's side)
  const T* gw = DUAL ? a.norm2_w : a.norm_w;
  float ss = 0.0f;
#pragma unroll 2  // 64 registers (4 blocks an SM): a deeper unroll spills
  for (int v = threadIdx.x; v < nvec; v += kThreads) {
    float f[V], g[V];
    widen<T>(reinterpret_cast<const uint4*>(a.x)[v], f);
    if constexpr (GATE) apply_gate<T, V>(a.gate, v, f);
    if (norm) {
      widen<T>(__ldg(reinterpret_cast<const uint4*>(gw) + v), g);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) g[e] = 1.0f;
    }
    if constexpr (DUAL) {
#pragma unroll
      for (int q = 0; q < V / 4; ++q)
        reinterpret_cast<float4*>(xs + v * V)[q] = make_float4(f[4 * q], f[4 * q + 1], f[4 * q + 2], f[4 * q + 3]);
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      ss += f[e] * f[e];
      f[e] *= g[e];
    }
#pragma unroll
    for (int q = 0; q < V / 4; ++q)
      reinterpret_cast<float4*>(xs2 + v * V)[q] = make_float4(f[4 * q], f[4 * q + 1], f[4 * q + 2], f[4 * q + 3]);
  }
  if (norm) {
    ss = warp_sum(ss);
    if (lane == 0) red[warp][0] = ss;
  }
  __syncthreads();
  float inv = 1.0f;
  if (norm) {
    float t = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += red[w][0];
    inv = rsqrtf(t / float(a.k) + a.eps);
  }

  float acc[kRowCols];
#pragma unroll
  for (int c = 0; c < kRowCols; ++c) acc[c] = 0.0f;
  auto consume = [&](const uint4 (&w)[kRowCols], int v) {
    float xf[V], xf2[DUAL ? V : 1];
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(xs2 + v * V)[q];  // = xs unless DUAL
      xf[4 * q] = f.x; xf[4 * q + 1] = f.y; xf[4 * q + 2] = f.z; xf[4 * q + 3] = f.w;
      if constexpr (DUAL) {
        const float4 r = reinterpret_cast<const float4*>(xs + v * V)[q];
        xf2[4 * q] = r.x; xf2[4 * q + 1] = r.y; xf2[4 * q + 2] = r.z; xf2[4 * q + 3] = r.w;
      }
    }
#pragma unroll
    for (int c = 0; c < kRowCols; ++c) {
      float wf[V];
      widen<T>(w[c], wf);
      const float* xc = DUAL && c < kOut ? xf2 : xf;  // DUAL: W's columns take x as it is
#pragma unroll
      for (int e = 0; e < V; ++e) acc[c] += wf[e] * xc[e];
    }
  };
#pragma unroll
  for (int i = 0; i < kRowPre; ++i) {
    const int v = v0 + i * stride;
    if (v < nvec) consume(pre[i], v);
  }
  for (int base = v0 + kRowPre * stride; base < nvec; base += kRowPre * stride) {
    uint4 w[kRowPre][kRowCols];
#pragma unroll
    for (int i = 0; i < kRowPre; ++i)
#pragma unroll
      for (int c = 0; c < kRowCols; ++c) {
        const int v = base + i * stride;
        w[i][c] = ok[c] && v < nvec ? __ldg(wrow[c] + v) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int i = 0; i < kRowPre; ++i) {
      const int v = base + i * stride;
      if (v < nvec) consume(w[i], v);
    }
  }
#pragma unroll
  for (int c = 0; c < kRowCols; ++c) acc[c] = warp_sum(acc[c]);
  if (a.ks > 1) {  // the ks warps of a column group are adjacent: the first adds the others'
    __syncthreads();  // red was read for the norm
    if (lane == 0) {
#pragma unroll
      for (int c = 0; c < kRowCols; ++c) red[warp][c] = acc[c];
    }
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int c = 0; c < kRowCols; ++c)
      for (int p = 1; p < a.ks; ++p) acc[c] += red[warp + p][c];
  }
  if (part != 0) return;
  float v = 0.0f;  // lane c finishes column j0 + c (a register picked without dynamic indexing)
#pragma unroll
  for (int c = 0; c < kRowCols; ++c)
    if (c == lane) v = acc[c];
  if constexpr (DUAL) {
    const float vb = __shfl_down_sync(0xffffffffu, v, kOut);  // the bridge's sum of this lane's output
    if (lane >= kOut) return;
    const int j = j0 + lane;
    if (j >= a.n) return;
    TY* yp = a.y + j;
    const float h = to_f(from_f<TY>(to_f(*yp) + v));  // y += x . W^T, stored
    *yp = from_f<TY>(h + to_f(from_f<T>(vb * inv)) * to_f(a.col_scale[j]));
    return;
  }
  if (lane >= kRowCols) return;
  v *= inv;
  const int j = j0 + lane;
  if (j >= a.n) return;
  v = scaled(a, j, v);
  TY* yp = a.y + j;
  if (a.accumulate) v += to_f(*yp);
  *yp = from_f<TY>(v);
  conv_at(a.conv, 0, j, v);
}

// The row kernel for 2..M rows (M = 2, 4, 8 or 16): the m rows of x (times the norm weight)
// staged as floats in shared memory, each row's 1 / rms applied to its finished sums; a warp
// (or ks warps splitting k) computes kRowCols adjacent columns for every row, so each weight
// vector loaded feeds m rows and each x vector read feeds kRowCols columns. The warp's M x
// kRowCols sums are reduced by halving exchanges (each step a lane sends the half of its sums
// it does not keep: 4M - 1 shuffles in all, not 5 per sum), after which lane l holds sums
// l * S .. l * S + S - 1 (S = 4M / 32, or every lane all 4M / 2^s ones when 4M < 32). Each
// output is finished (norm, scale, accumulate, conv step) by the lane that holds it.
// Every loop but the M x kRowCols inner product is kept rolled: unrolled, the 16-row form was
// 140 KB of code, and each launch spent ~20 us fetching instructions (stop 44, ncu).
template <class T, class TY, int M>
__global__ void __launch_bounds__(kThreads, M >= 8 ? 1 : 2) gemv_rows_kernel(const Args<T, TY> a) {
  constexpr int V = 16 / sizeof(T), S = M * kRowCols;  // sums a warp holds
  constexpr int kHeld = S >= 32 ? S / 32 : 1;            // sums a lane holds after the exchanges
  extern __shared__ uint4 xs_raw[];
  float* xs = reinterpret_cast<float*>(xs_raw);  // [M][k] floats (rows past m unused)
  __shared__ float red[kWarps][S];
  __shared__ float inv[M];
  pdl_trigger();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int part = warp % a.ks;
  const int j0 = (blockIdx.x * (kWarps / a.ks) + warp / a.ks) * kRowCols;
  const int nvec = a.k / V, stride = 32 * a.ks, v0 = part * 32 + lane;
  const uint4* wrow[kRowCols];
  bool ok[kRowCols];
#pragma unroll
  for (int c = 0; c < kRowCols; ++c) {
    ok[c] = j0 + c < a.n;
    wrow[c] = reinterpret_cast<const uint4*>(a.W + size_t(ok[c] ? j0 + c : 0) * a.ldw);
  }
  auto load = [&](uint4 (&w)[kRowCols], int v) {
#pragma unroll
    for (int c = 0; c < kRowCols; ++c) w[c] = ok[c] && v < nvec ? __ldg(wrow[c] + v) : make_uint4(0, 0, 0, 0);
  };
  uint4 w0[kRowCols], w1[kRowCols];  // the next two vectors of each column, in flight
  load(w0, v0);
  load(w1, v0 + stride);
  pdl_wait();

  // Stage x * norm weight, one vector per thread at a time over all m rows.
  const bool norm = a.norm_w != nullptr;
  for (int i = threadIdx.x; i < a.m * nvec; i += kThreads) {
    const int r = i / nvec, v = i % nvec;
    float f[V], g[V];
    widen<T>(reinterpret_cast<const uint4*>(a.x + size_t(r) * a.ldx)[v], f);
    apply_gate<T, V>(a.gate != nullptr ? a.gate + size_t(r) * a.ldgate : nullptr, v, f);
    if (norm) widen<T>(__ldg(reinterpret_cast<const uint4*>(a.norm_w) + v), g);
#pragma unroll
    for (int e = 0; e < V; ++e) f[e] *= norm ? g[e] : 1.0f;
#pragma unroll
    for (int q = 0; q < V / 4; ++q)
      reinterpret_cast<float4*>(xs + size_t(r) * a.k + v * V)[q] =
          make_float4(f[4 * q], f[4 * q + 1], f[4 * q + 2], f[4 * q + 3]);
  }
  // Each row's sum of squares by one warp, from x (gated) itself (the staged rows hold x * g).
  if (!norm && threadIdx.x < M) inv[threadIdx.x] = 1.0f;
  if (norm) {
    for (int r = warp; r < a.m; r += kWarps) {
      float ss = 0.0f;
      for (int v = lane; v < nvec; v += 32) {
        float f[V];
        widen<T>(reinterpret_cast<const uint4*>(a.x + size_t(r) * a.ldx)[v], f);
        apply_gate<T, V>(a.gate != nullptr ? a.gate + size_t(r) * a.ldgate : nullptr, v, f);
#pragma unroll
        for (int e = 0; e < V; ++e) ss += f[e] * f[e];
      }
      ss = warp_sum(ss);
      if (lane == 0) inv[r] = rsqrtf(ss / float(a.k) + a.eps);
    }
  }
  __syncthreads();  // xs and inv

  float acc[S];  // acc[r * kRowCols + c]: row r, column j0 + c
#pragma unroll
  for (int i = 0; i < S; ++i) acc[i] = 0.0f;
#pragma unroll 1
  for (int v = v0; v < nvec; v += stride) {
    float wf[kRowCols][V];
#pragma unroll
    for (int c = 0; c < kRowCols; ++c) widen<T>(w0[c], wf[c]);
#pragma unroll
    for (int c = 0; c < kRowCols; ++c) w0[c] = w1[c];
    load(w1, v + 2 * stride);
#pragma unroll
    for (int r = 0; r < M; ++r) {
      if (r >= a.m) break;
#pragma unroll
      for (int q = 0; q < V / 4; ++q) {
        const float4 f = reinterpret_cast<const float4*>(xs + size_t(r) * a.k + v * V)[q];
#pragma unroll
        for (int c = 0; c < kRowCols; ++c) {
          float& s = acc[r * kRowCols + c];
          s = fmaf(wf[c][4 * q], f.x, s);
          s = fmaf(wf[c][4 * q + 1], f.y, s);
          s = fmaf(wf[c][4 * q + 2], f.z, s);
          s = fmaf(wf[c][4 * q + 3], f.w, s);
        }
      }
    }
  }
  // Halving exchanges: at offset o a lane with bit o set keeps the upper half of its sums.
  int first = 0;  // this lane's sums are acc[0 .. cnt), indices first + i
#pragma unroll
  for (int o = 16, cnt = S; o > 0; o /= 2) {
    if (cnt > 1) {
      const bool upper = (lane & o) != 0;
      const int half = cnt / 2;
#pragma unroll
      for (int i = 0; i < S / 2; ++i)
        if (i < half) {
          const float send = upper ? acc[i] : acc[i + half];
          const float keep = upper ? acc[i + half] : acc[i];
          acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
        }
      if (upper) first += half;
      cnt = half;
    } else {
      acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], o);
    }
  }
  if (a.ks > 1) {  // the ks warps of a column group are adjacent: the first adds the others'
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kHeld; ++i) red[warp][first + i] = acc[i];
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int i = 0; i < kHeld; ++i)
      for (int p = 1; p < a.ks; ++p) acc[i] += red[warp + p][first + i];
  }
  if (part != 0) return;
  // With fewer sums than lanes several lanes hold the same ones: the lowest finishes them.
  if (S < 32 && (lane & (32 / S - 1)) != 0) return;
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int r = (first + i) / kRowCols, j = j0 + (first + i) % kRowCols;
    if (r >= a.m || j >= a.n) continue;
    float v = scaled(a, j, acc[i] * inv[r]);
    TY* yp = a.y + size_t(r) * a.ldy + j;
    if (a.accumulate) v += to_f(*yp);
    *yp = from_f<TY>(v);
    conv_at(a.conv, r, j, v);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

namespace {
bool core_fits(int m, int k, size_t elem_bytes) {
  return m >= 1 && m <= kGemvMaxRowsCudaCores && k >= 1 && k % int(16 / elem_bytes) == 0;
}
// x staged in shared memory: rows padded by 32 elements so the 8 rows of a fragment load fall
// in different banks. Up to kMaxStage bytes (opt-in above 48 KB); the fused norm needs it.
constexpr size_t kMaxStage = 96 * 1024;
constexpr size_t kMaxRowStage = 48 * 1024;  // the row kernel's float x: no opt-in needed
size_t stage_bytes(int m, int k) { return size_t(m) * size_t(k + 32) * 2; }
bool mma_fits(int m, int k, bool norm, size_t elem_bytes) {
  return g_tensor_cores && elem_bytes == 2 && m >= 1 && m <= (norm ? kGemvMaxNormRows : kGemvMaxRows) && k >= 32 &&
         k % 32 == 0 && (!norm || stage_bytes(m, k) <= kMaxStage);
}
// The multi-row row kernel (gemv_rows_kernel): m in [2, kGemvMaxRowsRow], its M (m rounded up
// to a power of 2) rows of float x within kMaxRowsStage (opt-in above 48 KB).
constexpr size_t kMaxRowsStage = 96 * 1024;
int rows_tile(int m) { return m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16; }
bool rows_fits(int m, int k, size_t elem_bytes) {
  return g_row_kernel && m >= 2 && m <= kGemvMaxRowsRow && k >= 1 && k % int(16 / elem_bytes) == 0 &&
         size_t(rows_tile(m)) * size_t(k) * sizeof(float) <= kMaxRowsStage;
}
template <class T, class TY, int M>
void launch_rows(Args<T, TY>& a, cudaStream_t stream) {
  static const cudaError_t e = cudaFuncSetAttribute(gemv_rows_kernel<T, TY, M>,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize, int(kMaxRowsStage));
  HM_CUDA_OK(e, "gemv: cudaFuncSetAttribute");
  const int groups = ceil_div(a.n, kRowCols), nvec = a.k / (16 / int(sizeof(T)));
  while (a.ks < kWarps && ceil_div(groups, kWarps / a.ks) < 2 * sm_count() && 64 * a.ks <= nvec) a.ks *= 2;
  launch_pdl("gemv", gemv_rows_kernel<T, TY, M>, dim3(ceil_div(groups, kWarps / a.ks)), dim3(kThreads), stream,
             size_t(M) * size_t(a.k) * sizeof(float), a);
}
// Lets the kernel take up to kMaxStage bytes of dynamic shared memory (once per instantiation,
// on the device current at the first call: the backend drives one device).
template <class T, class TY, int MT>
void allow_stage() {
  static const cudaError_t e =
      cudaFuncSetAttribute(gemv_mma_kernel<T, TY, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kMaxStage));
  HM_CUDA_OK(e, "gemv: cudaFuncSetAttribute");
}
}  // namespace

bool gemv_rows_fits(int m, int k, size_t elem_bytes) { return rows_fits(m, k, elem_bytes); }

bool gemv_gate_fits(int m, int k, const void* x, int64_t ldx, const void* W, int64_t ldw, const void* norm_w,
                    const void* gate, int64_t ldgate, size_t elem_bytes) {
  const int64_t v = 16 / int64_t(elem_bytes);
  const bool row = m == 1 ? g_row_kernel && k >= 1 && k % v == 0 && size_t(k) * sizeof(float) <= kMaxRowStage
                          : rows_fits(m, k, elem_bytes);
  return row && norm_w != nullptr && gate != nullptr && ldgate % v == 0 && aligned16(gate) &&
         gemv_fits(m, k, x, ldx, W, ldw, norm_w, elem_bytes);
}

bool gemv_fits(int m, int k, const void* x, int64_t ldx, const void* W, int64_t ldw, const void* norm_w,
               size_t elem_bytes) {
  const int64_t v = 16 / int64_t(elem_bytes);
  const bool aligned = ldx % v == 0 && ldw % v == 0 && aligned16(x) && aligned16(W) &&
                       (norm_w == nullptr || aligned16(norm_w));
  return aligned && (core_fits(m, k, elem_bytes) || mma_fits(m, k, norm_w != nullptr, elem_bytes) ||
                     rows_fits(m, k, elem_bytes));
}

template <class T, class TY>
void gemv(TY* y, int ldy, const T* x, int ldx, const T* W, int ldw, int m, int n, int k, bool accumulate,
          const T* norm_w, float eps, const ConvStep<T>* conv, cudaStream_t stream, const T* col_scale,
          const T* gate, int ldgate) {
  HM_CHECK(gemv_fits(m, k, x, ldx, W, ldw, norm_w, sizeof(T)), "cuda gemv: shape m ", m, " k ", k, " ldx ", ldx,
           " ldw ", ldw, " or alignment not taken (gemv_fits)");
  HM_CHECK(gate == nullptr || gemv_gate_fits(m, k, x, ldx, W, ldw, norm_w, gate, ldgate, sizeof(T)),
           "cuda gemv: a gate at m ", m, " k ", k, " ldgate ", ldgate, " not taken (gemv_gate_fits)");
  HM_CHECK(conv == nullptr || conv->E == 0 ||
               (!accumulate && sizeof(TY) == sizeof(T) && conv->c0 >= 0 && conv->E <= n - conv->c0 &&
                conv->K >= 2 && conv->K <= kMaxConv),
           "cuda gemv: the fused conv step needs y of the input type, no accumulation, its columns within n, K in [2, ",
           kMaxConv, "]");
  if (n <= 0) return;
  HM_CHECK(col_scale == nullptr || conv == nullptr || conv->E == 0, "cuda gemv: col_scale with the conv step");
  Args<T, TY> a{y, ldy, x, ldx, W, ldw, m, n, k, 1, accumulate, norm_w, eps, conv ? *conv : ConvStep<T>{}, 0,
                col_scale};
  a.gate = gate;
  a.ldgate = ldgate;
  if (g_row_kernel && m == 1 && size_t(k) * sizeof(float) <= kMaxRowStage) {
    const int groups = ceil_div(n, kRowCols), nvec = k / (16 / int(sizeof(T)));
    while (a.ks < kWarps && ceil_div(groups, kWarps / a.ks) < 2 * sm_count() && 64 * a.ks <= nvec) a.ks *= 2;
    const dim3 grid(ceil_div(groups, kWarps / a.ks));
    if (gate != nullptr)
      launch_pdl("gemv", gemv_row_kernel<T, TY, false, true>, grid, dim3(kThreads), stream, size_t(k) * sizeof(float), a);
    else
      launch_pdl("gemv", gemv_row_kernel<T, TY, false>, grid, dim3(kThreads), stream, size_t(k) * sizeof(float), a);
    return;
  }
  if (rows_fits(m, k, sizeof(T))) {
    switch (rows_tile(m)) {
      case 2: launch_rows<T, TY, 2>(a, stream); break;
      case 4: launch_rows<T, TY, 4>(a, stream); break;
      case 8: launch_rows<T, TY, 8>(a, stream); break;
      default: launch_rows<T, TY, 16>(a, stream); break;
    }
    return;
  }
  if constexpr (sizeof(T) == 2) {
    if (mma_fits(m, k, norm_w != nullptr, sizeof(T))) {
      // Column groups of 8; more warps per group (splitting k) while the grid is under two
      // waves and each warp keeps at least two chunks.
      const int groups = ceil_div(n, 8), chunks = k / 32;
      while (a.ks < kWarps && ceil_div(groups, kWarps / a.ks) < 2 * sm_count() && chunks >= 4 * a.ks) a.ks *= 2;
      const dim3 grid(ceil_div(groups, kWarps / a.ks));
      const size_t smem = stage_bytes(m, k) <= kMaxStage ? stage_bytes(m, k) : 0;
      a.xs_ld = smem > 0 ? k + 32 : 0;
      if (m <= 16) {
        allow_stage<T, TY, 1>();
        launch_pdl("gemv", gemv_mma_kernel<T, TY, 1>, grid, dim3(kThreads), stream, smem, a);
      } else {
        allow_stage<T, TY, 2>();
        launch_pdl("gemv", gemv_mma_kernel<T, TY, 2>, grid, dim3(kThreads), stream, smem, a);
      }
      return;
    }
  }
  // Enough blocks for two waves; more warps per column only while each still gets vectors.
  const int nvec = k / (16 / int(sizeof(T)));
  while (a.ks < kWarps && ceil_div(n, kWarps / a.ks) < 2 * sm_count() && 64 * a.ks <= nvec) a.ks *= 2;
  const dim3 grid(ceil_div(n, kWarps / a.ks));
  if (m == 1)
    launch_pdl("gemv", gemv_kernel<T, TY, 1>, grid, dim3(kThreads), stream, 0, a);
  else if (m == 2)
    launch_pdl("gemv", gemv_kernel<T, TY, 2>, grid, dim3(kThreads), stream, 0, a);
  else if (m <= 4)
    launch_pdl("gemv", gemv_kernel<T, TY, 4>, grid, dim3(kThreads), stream, 0, a);
  else
    launch_pdl("gemv", gemv_kernel<T, TY, 8>, grid, dim3(kThreads), stream, 0, a);
}

bool gemv_bridge_fits(int k, const void* x, const void* W, int64_t ldw, const void* bW, int64_t ldbw,
                      const void* norm_w, size_t elem_bytes) {
  const int64_t v = 16 / int64_t(elem_bytes);
  return g_row_kernel && k >= 1 && k % v == 0 && 2 * size_t(k) * sizeof(float) <= kMaxRowStage && ldw % v == 0 &&
         ldbw % v == 0 && aligned16(x) && aligned16(W) && aligned16(bW) && aligned16(norm_w);
}

template <class T>
void gemv_bridge(T* y, const T* x, const T* W, int ldw, const T* bW, int ldbw, const T* norm_w, float eps,
                 const T* scale, int n, int k, cudaStream_t stream) {
  HM_CHECK(gemv_bridge_fits(k, x, W, ldw, bW, ldbw, norm_w, sizeof(T)) && scale != nullptr, "cuda gemv_bridge: k ", k,
           " ldw ", ldw, " ldbw ", ldbw, ", alignment or the row kernel not taken (gemv_bridge_fits)");
  if (n <= 0) return;
  Args<T, T> a{y, n, x, k, W, ldw, 1, n, k, 1, true, nullptr, eps, ConvStep<T>{}, 0, scale};
  a.W2 = bW;
  a.ldw2 = ldbw;
  a.norm2_w = norm_w;
  const int groups = ceil_div(n, kRowCols / 2), nvec = k / (16 / int(sizeof(T)));
  while (a.ks < kWarps && ceil_div(groups, kWarps / a.ks) < 2 * sm_count() && 64 * a.ks <= nvec) a.ks *= 2;
  launch_pdl("gemv_bridge", gemv_row_kernel<T, T, true>, dim3(ceil_div(groups, kWarps / a.ks)), dim3(kThreads),
             stream, 2 * size_t(k) * sizeof(float), a);
}
template void gemv_bridge<float>(float*, const float*, const float*, int, const float*, int, const float*, float,
                                 const float*, int, int, cudaStream_t);
template void gemv_bridge<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, int,
                                         const __nv_bfloat16*, int, const __nv_bfloat16*, float,
                                         const __nv_bfloat16*, int, int, cudaStream_t);
template void gemv_bridge<__half>(__half*, const __half*, const __half*, int, const __half*, int, const __half*, float,
                                  const __half*, int, int, cudaStream_t);

#define HM_INST(T, TY)                                                                                  \
  template void gemv<T, TY>(TY*, int, const T*, int, const T*, int, int, int, int, bool, const T*, float, \
                            const ConvStep<T>*, cudaStream_t, const T*, const T*, int);
HM_INST(float, float)
HM_INST(__nv_bfloat16, __nv_bfloat16)
HM_INST(__nv_bfloat16, float)
HM_INST(__half, __half)
HM_INST(__half, float)
#undef HM_INST

}  // namespace hm::cuda
