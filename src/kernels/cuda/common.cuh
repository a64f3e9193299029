// Device helpers shared by the kernels of src/kernels/cuda/.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/error.h"

// A failed launch or CUDA call is an hm::Error naming the op, never an ignored return code.
#define HM_CUDA_OK(call, op)                                                              \
  do {                                                                                    \
    const cudaError_t hm_err_ = (call);                                                   \
    HM_CHECK(hm_err_ == cudaSuccess, "cuda ", op, ": ", cudaGetErrorString(hm_err_));     \
  } while (0)
#define HM_CUDA_LAUNCHED(op) HM_CUDA_OK(cudaGetLastError(), op)

namespace hm::cuda {

// Loads widen to float and stores round to nearest even: every sum runs in float.
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// Sum over a block of Threads threads (a multiple of 32); every thread gets the total. Every
// thread of the block must call it.
template <int Threads>
__device__ float block_sum(float v) {
  static_assert(Threads % 32 == 0 && Threads <= 1024);
  __shared__ float part[Threads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  float s = 0;
#pragma unroll
  for (int i = 0; i < Threads / 32; ++i) s += part[i];
  __syncthreads();  // part is reused by the next call
  return s;
}

// Four adjacent elements as one 8- or 16-byte access (the address 4-element aligned).
template <class T>
struct Vec4 {
  using Raw = std::conditional_t<sizeof(T) == 4, float4, uint2>;
  union {
    Raw raw;
    T e[4];
  };
};

template <class T>
__device__ __forceinline__ void load4(const T* p, float v[4]) {
  Vec4<T> u;
  u.raw = *reinterpret_cast<const typename Vec4<T>::Raw*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = to_f(u.e[i]);
}

template <class T>
__device__ __forceinline__ void store4(T* p, const float v[4]) {
  Vec4<T> u;
#pragma unroll
  for (int i = 0; i < 4; ++i) u.e[i] = from_f<T>(v[i]);
  *reinterpret_cast<typename Vec4<T>::Raw*>(p) = u.raw;
}

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

// f[i] = p[i] for i < n, 0 up to MAXN: one 16-byte load per vector where p is 16-byte aligned
// and n a whole number of vectors, so a short row loads in one round of latency either way.
template <class T, int MAXN>
__device__ __forceinline__ void load_run(float (&f)[MAXN], const T* p, int n) {
  constexpr int V = 16 / sizeof(T);
  static_assert(MAXN % V == 0, "whole vectors");
  if (reinterpret_cast<uintptr_t>(p) % 16 == 0 && n % V == 0) {
#pragma unroll
    for (int i = 0; i < MAXN / V; ++i) {
      if (i * V < n) {
        widen<T>(*reinterpret_cast<const uint4*>(p + i * V), f + i * V);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) f[i * V + j] = 0.0f;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < MAXN; ++i) f[i] = i < n ? to_f(p[i]) : 0.0f;
  }
}

// Whether p (and every row start, given the row stride ld) is 4-element aligned.
template <class T>
inline bool aligned4(const T* p, int64_t ld) {
  return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0 && ld % 4 == 0;
}

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }
__device__ __forceinline__ float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

// The sequence that owns token row t: the last s with cu[s] <= t (binary search; nseq is small).
__device__ __forceinline__ int seq_of_row(const int32_t* cu, int nseq, int t) {
  int lo = 0, hi = nseq - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The current device's multiprocessor count, read once (132 when it cannot be read, an H100's:
// it only sizes grids).
inline int sm_count() {
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

// Two floats rounded to KV and packed as one 32-bit mma operand (low half first).
template <class KV> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += a . b on the tensor cores: one m16n8k16 tile, bf16 or f16 in, float accumulate (the
// PTX ISA's fragment layouts: a 4 registers of 2 elements, b 2, d 4 floats per lane).
template <class KV> __device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], const uint32_t b[2]);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a . b on the tensor cores: one m16n8k8 tile on tf32 operands (a 4 registers, b 2, d 4
// floats per lane; one element a register), float accumulate. to_tf32 rounds a float to tf32
// (10 mantissa bits) to nearest; the mma itself would truncate.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ void mma1688_tf32(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Programmatic dependent launch (Hopper): a kernel launched with launch_pdl() may start while
// the kernel before it in the stream still runs, once that one has called pdl_trigger(). It
// must call pdl_wait() before it reads or writes anything an earlier kernel touches; before
// the wait it may only load constants (weights), which is the point: their DRAM latency and
// the launch overlap the previous kernel's tail. Without the launch attribute both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launches kernel with the programmatic-dependent-launch attribute (see pdl_wait), unless
// HM_CUDA_PDL=0 (read once: the A/B switch of docs/CUDA.md).
bool pdl_enabled();
template <class... P, class... A>
void launch_pdl(const char* op, void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, size_t smem,
                A&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  HM_CUDA_OK(cudaLaunchKernelEx(&cfg, kernel, static_cast<A&&>(args)...), op);
}

}  // namespace hm::cuda

// One explicit instantiation per activation type.
#define HM_CUDA_FOR_TYPES(X) X(float) X(__nv_bfloat16) X(__half)
