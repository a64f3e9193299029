// Row gathers and scatters over strided matrices (True Hybrid routing, the logits rows):
// the contract of Backend::copy_rows and Backend::add_rows (backend/backend.h) for device memory.
// Plain C++ (no device code); T = float, __nv_bfloat16 or __half.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hm::cuda {

// Byte spans copied within device memory: dst[0, bytes) = src[0, bytes) for each. The list
// travels as the kernel's parameter (kMaxSpansPerLaunch per launch), so n spans cost
// ceil(n / kMaxSpansPerLaunch) launches instead of n cudaMemcpyAsync calls of ~5 us of host
// time each. The spans run concurrently: none may write what another reads or writes.
struct Span {
  void* dst;
  const void* src;
  size_t bytes;
};
constexpr int kMaxSpansPerLaunch = 128;  // 3 KB of parameters: under the classic 4 KB limit
void copy_spans(const Span* spans, int n, cudaStream_t stream);

// dst[di,:] = src[si,:] for i < n over `cols` columns; di = dst_idx ? dst_idx[i] : i, si
// likewise (index arrays in device memory). Rows whose index falls outside [0, dst_rows) or
// [0, src_rows) are skipped: the caller validates indices, the kernel never writes out of bounds.
template <class T>
void copy_rows(T* dst, int64_t ldd, int dst_rows, const int32_t* dst_idx, const T* src, int64_t lds,
               int src_rows, const int32_t* src_idx, int n, int cols, cudaStream_t stream);

// dst[di,j] += gate_i * scale[j] * src[si,j] for i < n, j < cols, summed in float and rounded
// once to T; gate_i = row_gate[i] (float, device) or 1 when null, scale[j] = 1 when null.
// Destination indices must be distinct (rows are updated without atomics); out-of-range
// indices are skipped as in copy_rows.
template <class T>
void add_rows(T* dst, int64_t ldd, int dst_rows, const int32_t* dst_idx, const T* src, int64_t lds,
              int src_rows, const int32_t* src_idx, int n, int cols, const float* row_gate,
              const T* scale, cudaStream_t stream);

}  // namespace hm::cuda
