// grad.h's bridge-gate backward, the compute-type copy of master weights, and the optimizer's
// fused passes over a float32 parameter arena (sum of squares for the global norm, AdamW).
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda/grad.h"

namespace hm::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kScaleRows = 64;  // rows per partial column sum of scale_cols_backward

// Block (column tile, row chunk): each thread owns one column, walks the chunk's rows in order.
template <class T>
__global__ void scale_cols_partial_kernel(T* dsrc, int ldds, const T* ddst, int lddd, const T* src, int lds,
                                          const T* scale, int n, int d, float* partial) {
  const int c = blockIdx.x * kThreads + threadIdx.x;
  if (c >= d) return;
  const int r0 = blockIdx.y * kScaleRows, r1 = min(n, r0 + kScaleRows);
  const float sc = to_f(scale[c]);
  float acc = 0.0f;
  for (int r = r0; r < r1; ++r) {
    const float dd = to_f(ddst[int64_t(r) * lddd + c]);
    acc += dd * to_f(src[int64_t(r) * lds + c]);
    dsrc[int64_t(r) * ldds + c] = from_f<T>(dd * sc);
  }
  partial[int64_t(blockIdx.y) * d + c] = acc;
}

template <class G>
struct AddToScale {  // the column's double sum, rounded once
  G* v;
  __device__ void operator()(int c, double t) const { v[c] = from_f<G>(to_f(v[c]) + float(t)); }
};

template <class TD, class TS>
__global__ void convert_kernel(TD* dst, int64_t ldd, const TS* src, int64_t lds, int rows, int cols) {
  const int64_t total = int64_t(rows) * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    dst[r * ldd + c] = from_f<TD>(to_f(src[r * lds + c]));
  }
}

// One block per chunk: strided double sums per thread, then a fixed shared-memory tree.
__global__ void sum_squares_kernel(double* partial, const float* x, const OptChunk* chunks) {
  __shared__ double red[kThreads];
  const OptChunk ch = chunks[blockIdx.x];
  const float* p = x + ch.offset;
  double s = 0.0;
  for (int i = threadIdx.x; i < ch.n; i += kThreads) s += double(p[i]) * double(p[i]);
  red[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

// Elementwise, so any mapping gives the same bits. The products are written out in the host
// AdamW's order (no fused multiply-adds), so the two agree to rounding of sqrt and division.
__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, const OptChunk* chunks, float lr,
                             float b1, float b2, float eps, float inv_bc1, float inv_bc2, float gscale) {
  const OptChunk ch = chunks[blockIdx.x];
  const float c1 = 1.0f - b1, c2 = 1.0f - b2;
  for (int i = threadIdx.x; i < ch.n; i += kThreads) {
    const int64_t j = ch.offset + i;
    const float gi = __fmul_rn(g[j], gscale);
    const float mi = __fadd_rn(__fmul_rn(b1, m[j]), __fmul_rn(c1, gi));
    const float vi = __fadd_rn(__fmul_rn(b2, v[j]), __fmul_rn(c2, __fmul_rn(gi, gi)));
    m[j] = mi;
    v[j] = vi;
    const float root = __fsqrt_rn(__fmul_rn(vi, inv_bc2));
    const float upd = __fadd_rn(__fdiv_rn(__fmul_rn(mi, inv_bc1), __fadd_rn(root, eps)), __fmul_rn(ch.weight_decay, p[j]));
    p[j] = __fsub_rn(p[j], __fmul_rn(lr, upd));
  }
}

}  // namespace

size_t scale_cols_backward_workspace_bytes(int n, int d) {
  return sizeof(float) * size_t(std::max(1, ceil_div(n, kScaleRows))) * size_t(std::max(d, 0));
}

template <class T, class G>
void scale_cols_backward(T* dsrc, int ldds, G* dscale, const T* ddst, int lddd, const T* src, int lds,
                         const T* scale, int n, int d, void* workspace, cudaStream_t stream) {
  if (n <= 0 || d <= 0) return;
  const int n_chunks = ceil_div(n, kScaleRows);
  auto* partial = static_cast<float*>(workspace);
  scale_cols_partial_kernel<T><<<dim3(ceil_div(d, kThreads), n_chunks), kThreads, 0, stream>>>(
      dsrc, ldds, ddst, lddd, src, lds, scale, n, d, partial);
  HM_CUDA_LAUNCHED("scale_cols_backward (partial sums)");
  column_sums<double>(partial, n_chunks, d, AddToScale<G>{dscale}, stream, "scale_cols_backward (column sums)");
}

template <class TD, class TS>
void convert(TD* dst, int64_t ldd, const TS* src, int64_t lds, int rows, int cols, cudaStream_t stream) {
  const int64_t total = int64_t(rows) * cols;
  if (total <= 0) return;
  const int blocks = int(std::min<int64_t>((total + kThreads - 1) / kThreads, 65536));
  convert_kernel<TD, TS><<<blocks, kThreads, 0, stream>>>(dst, ldd, src, lds, rows, cols);
  HM_CUDA_LAUNCHED("convert");
}

void sum_squares(double* partial, const float* x, const OptChunk* chunks, int n_chunks, cudaStream_t stream) {
  if (n_chunks <= 0) return;
  sum_squares_kernel<<<n_chunks, kThreads, 0, stream>>>(partial, x, chunks);
  HM_CUDA_LAUNCHED("sum_squares");
}

void adamw_step(float* p, const float* g, float* m, float* v, const OptChunk* chunks, int n_chunks, float lr,
                float beta1, float beta2, float eps, float inv_bc1, float inv_bc2, float grad_scale,
                cudaStream_t stream) {
  if (n_chunks <= 0) return;
  adamw_kernel<<<n_chunks, kThreads, 0, stream>>>(p, g, m, v, chunks, lr, beta1, beta2, eps, inv_bc1, inv_bc2,
                                                  grad_scale);
  HM_CUDA_LAUNCHED("adamw_step");
}

#define HM_INST_G(T, G)                                                                                        \
  template void scale_cols_backward<T, G>(T*, int, G*, const T*, int, const T*, int, const T*, int, int, void*, \
                                          cudaStream_t);
#define HM_INST_G_SAME(T) HM_INST_G(T, T)
#define HM_INST_C(T)                                                                        \
  template void convert<T, float>(T*, int64_t, const float*, int64_t, int, int, cudaStream_t); \
  template void convert<float, T>(float*, int64_t, const T*, int64_t, int, int, cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST_G_SAME)
HM_INST_G(__nv_bfloat16, float)
HM_INST_G(__half, float)
HM_INST_C(__nv_bfloat16)
HM_INST_C(__half)
template void convert<float, float>(float*, int64_t, const float*, int64_t, int, int, cudaStream_t);
#undef HM_INST_C
#undef HM_INST_G_SAME
#undef HM_INST_G

}  // namespace hm::cuda
