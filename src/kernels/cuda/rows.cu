// Row gathers and scatters (rows.h): one block row per moved row, columns on grid y.
#include <algorithm>

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

// 4 adjacent columns a thread, 8- or 16-byte accesses (cols % 4 == 0, rows 4-element aligned).
constexpr int kVecThreads = 128;
template <class T>
__global__ void copy_rows_vec_kernel(T* __restrict__ dst, int64_t ldd, int dst_rows, const int32_t* __restrict__ dst_idx,
                                     const T* __restrict__ src, int64_t lds, int src_rows,
                                     const int32_t* __restrict__ src_idx, int cols) {
  const int j = (blockIdx.y * kVecThreads + threadIdx.x) * 4;
  int di, si;
  if (j >= cols || !row_pair(blockIdx.x, dst_idx, dst_rows, src_idx, src_rows, di, si)) return;
  *reinterpret_cast<typename Vec4<T>::Raw*>(dst + di * ldd + j) =
      *reinterpret_cast<const typename Vec4<T>::Raw*>(src + si * lds + j);
}

template <class T>
__global__ void add_rows_vec_kernel(T* __restrict__ dst, int64_t ldd, int dst_rows, const int32_t* __restrict__ dst_idx,
                                    const T* __restrict__ src, int64_t lds, int src_rows,
                                    const int32_t* __restrict__ src_idx, int cols, const float* __restrict__ row_gate,
                                    const T* __restrict__ scale) {
  const int j = (blockIdx.y * kVecThreads + threadIdx.x) * 4;
  int di, si;
  if (j >= cols || !row_pair(blockIdx.x, dst_idx, dst_rows, src_idx, src_rows, di, si)) return;
  float v[4], d[4], sc[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  load4(src + si * lds + j, v);
  load4(dst + di * ldd + j, d);
  if (scale) load4(scale + j, sc);
  const float gate = row_gate ? row_gate[blockIdx.x] : 1.0f;
#pragma unroll
  for (int e = 0; e < 4; ++e) {  // the same float operations, in the same order, as add_rows_kernel
    float x = v[e];
    if (scale) x *= sc[e];
    if (row_gate) x *= gate;
    d[e] += x;
  }
  store4(dst + di * ldd + j, d);
}

}  // namespace

template <class T>
void copy_rows(T* dst, int64_t ldd, int dst_rows, const int32_t* dst_idx, const T* src, int64_t lds,
               int src_rows, const int32_t* src_idx, int n, int cols, cudaStream_t stream) {
  if (n <= 0 || cols <= 0) return;
  if (cols % 4 == 0 && aligned4(dst, ldd) && aligned4(src, lds))
    copy_rows_vec_kernel<T><<<dim3(n, ceil_div(cols, 4 * kVecThreads)), kVecThreads, 0, stream>>>(
        dst, ldd, dst_rows, dst_idx, src, lds, src_rows, src_idx, cols);
  else
    copy_rows_kernel<T><<<dim3(n, ceil_div(cols, kThreads)), kThreads, 0, stream>>>(
        dst, ldd, dst_rows, dst_idx, src, lds, src_rows, src_idx, cols);
  HM_CUDA_LAUNCHED("copy_rows");
}

template <class T>
void add_rows(T* dst, int64_t ldd, int dst_rows, const int32_t* dst_idx, const T* src, int64_t lds,
              int src_rows, const int32_t* src_idx, int n, int cols, const float* row_gate,
              const T* scale, cudaStream_t stream) {
  if (n <= 0 || cols <= 0) return;
  if (cols % 4 == 0 && aligned4(dst, ldd) && aligned4(src, lds) && (scale == nullptr || aligned4(scale, 0)))
    add_rows_vec_kernel<T><<<dim3(n, ceil_div(cols, 4 * kVecThreads)), kVecThreads, 0, stream>>>(
        dst, ldd, dst_rows, dst_idx, src, lds, src_rows, src_idx, cols, row_gate, scale);
  else
    add_rows_kernel<T><<<dim3(n, ceil_div(cols, kThreads)), kThreads, 0, stream>>>(
        dst, ldd, dst_rows, dst_idx, src, lds, src_rows, src_idx, cols, row_gate, scale);
  HM_CUDA_LAUNCHED("add_rows");
}

namespace {
struct SpanList {
  Span s[kMaxSpansPerLaunch];
};

// Block (i, part) copies the part-th slice of span i: 16-byte words when the span's ends and
// length allow, else 4-byte words, else bytes.
template <class W>
__device__ __forceinline__ void copy_words(const Span& sp, size_t lo, size_t hi) {
  W* d = static_cast<W*>(sp.dst);
  const W* s = static_cast<const W*>(sp.src);
  for (size_t i = lo + threadIdx.x; i < hi; i += kThreads) d[i] = s[i];
}
__global__ void copy_spans_kernel(const __grid_constant__ SpanList list) {
  const Span& sp = list.s[blockIdx.x];
  const uintptr_t bits = reinterpret_cast<uintptr_t>(sp.dst) | reinterpret_cast<uintptr_t>(sp.src) | sp.bytes;
  const size_t w = bits % 16 == 0 ? 16 : bits % 4 == 0 ? 4 : 1, words = sp.bytes / w;
  const size_t per = (words + gridDim.y - 1) / gridDim.y;
  const size_t lo = min(words, size_t(blockIdx.y) * per), hi = min(words, lo + per);
  if (w == 16)
    copy_words<uint4>(sp, lo, hi);
  else if (w == 4)
    copy_words<uint32_t>(sp, lo, hi);
  else
    copy_words<unsigned char>(sp, lo, hi);
}
}  // namespace

void copy_spans(const Span* spans, int n, cudaStream_t stream) {
  for (int at = 0; at < n; at += kMaxSpansPerLaunch) {
    SpanList list{};
    const int m = std::min(n - at, kMaxSpansPerLaunch);
    size_t most = 0;
    for (int i = 0; i < m; ++i) {
      list.s[i] = spans[at + i];
      most = std::max(most, spans[at + i].bytes);
    }
    // A block per 16 KB of the longest span (up to 64), so a long state copy is spread too.
    const unsigned parts = unsigned(std::min<size_t>(64, std::max<size_t>(1, (most + 16383) / 16384)));
    copy_spans_kernel<<<dim3(unsigned(m), parts), kThreads, 0, stream>>>(list);
    HM_CUDA_LAUNCHED("copy_spans");
  }
}

#define HM_INST(T)                                                                                   \
  template void copy_rows<T>(T*, int64_t, int, const int32_t*, const T*, int64_t, int, const int32_t*, \
                             int, int, cudaStream_t);                                                \
  template void add_rows<T>(T*, int64_t, int, const int32_t*, const T*, int64_t, int, const int32_t*,  \
                            int, int, const float*, const T*, cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST

}  // namespace hm::cuda
