// Row gathers and scatters (rows.h): one block row per moved row, columns on grid y.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.h"

namespace hm::cuda {
namespace {

constexpr int kThreads = 256;

// The source and destination rows of move i, or false when either index is out of range.
__device__ __forceinline__ bool row_pair(int i, const int32_t* dst_idx, int dst_rows, const int32_t* src_idx,
                                         int src_rows, int& di, int& si) {
  di = dst_idx ? dst_idx[i] : i;
  si = src_idx ? src_idx[i] : i;
  return di >= 0 && di < dst_rows && si >= 0 && si < src_rows;
}

template <class T>
__global__ void copy_rows_kernel(T* __restrict__ dst, int64_t ldd, int dst_rows, const int32_t* __restrict__ dst_idx,
                                 const T* __restrict__ src, int64_t lds, int src_rows,
                                 const int32_t* __restrict__ src_idx, int cols) {
  const int j = blockIdx.y * kThreads + threadIdx.x;
  int di, si;
  if (j >= cols || !row_pair(blockIdx.x, dst_idx, dst_rows, src_idx, src_rows, di, si)) return;
  dst[di * ldd + j] = src[si * lds + j];
}

template <class T>
__global__ void add_rows_kernel(T* __restrict__ dst, int64_t ldd, int dst_rows, const int32_t* __restrict__ dst_idx,
                                const T* __restrict__ src, int64_t lds, int src_rows,
                                const int32_t* __restrict__ src_idx, int cols, const float* __restrict__ row_gate,
                                const T* __restrict__ scale) {
  const int j = blockIdx.y * kThreads + threadIdx.x;
  int di, si;
  if (j >= cols || !row_pair(blockIdx.x, dst_idx, dst_rows, src_idx, src_rows, di, si)) return;
  float v = to_f(src[si * lds + j]);
  if (scale) v *= to_f(scale[j]);
  if (row_gate) v *= row_gate[blockIdx.x];
  T& d = dst[di * ldd + j];
  d = from_f<T>(to_f(d) + v);
}

}  // namespace

template <class T>
void copy_rows(T* dst, int64_t ldd, int dst_rows, const int32_t* dst_idx, const T* src, int64_t lds,
               int src_rows, const int32_t* src_idx, int n, int cols, cudaStream_t stream) {
  if (n <= 0 || cols <= 0) return;
  copy_rows_kernel<T><<<dim3(n, ceil_div(cols, kThreads)), kThreads, 0, stream>>>(
      dst, ldd, dst_rows, dst_idx, src, lds, src_rows, src_idx, cols);
  HM_CUDA_LAUNCHED("copy_rows");
}

template <class T>
void add_rows(T* dst, int64_t ldd, int dst_rows, const int32_t* dst_idx, const T* src, int64_t lds,
              int src_rows, const int32_t* src_idx, int n, int cols, const float* row_gate,
              const T* scale, cudaStream_t stream) {
  if (n <= 0 || cols <= 0) return;
  add_rows_kernel<T><<<dim3(n, ceil_div(cols, kThreads)), kThreads, 0, stream>>>(
      dst, ldd, dst_rows, dst_idx, src, lds, src_rows, src_idx, cols, row_gate, scale);
  HM_CUDA_LAUNCHED("add_rows");
}

#define HM_INST(T)                                                                                   \
  template void copy_rows<T>(T*, int64_t, int, const int32_t*, const T*, int64_t, int, const int32_t*, \
                             int, int, cudaStream_t);                                                \
  template void add_rows<T>(T*, int64_t, int, const int32_t*, const T*, int64_t, int, const int32_t*,  \
                            int, int, const float*, const T*, cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST

}  // namespace hm::cuda
