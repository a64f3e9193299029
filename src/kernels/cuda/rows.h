// Row gathers and scatters over strided matrices (True Hybrid routing, the logits rows):
// the contract of Backend::copy_rows and Backend::add_rows (backend/backend.h) for device memory.
// Plain C++ (no device code); T = float, __nv_bfloat16 or __half.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace hm::cuda {

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
