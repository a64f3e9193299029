// Device helpers shared by the kernels of src/kernels/cuda/.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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
void launch_pdl(const char* op, void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
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
