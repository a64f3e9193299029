// Deterministic column sums of per-chunk partials: the second pass of the weight gradients that
// are sums over token rows (RMSNorm's dw, the conv's dw and db, the gated scale's dscale).
#pragma once
#include "kernels/cuda/common.cuh"

namespace hm::cuda {

// total[c] = sum over k < chunks of part[k * ncols + c], then out(c, total[c]). A block takes 32
// columns with 8 threads each: thread y sums chunks y, y + 8, ... in order (a warp reads 128
// contiguous bytes per chunk), and the 8 sums are added in order. One thread a column summing
// every chunk left a few thousand threads each waiting on hundreds of loads in turn.
constexpr int kColSumPhases = 8;

template <class Acc, class Out>
__global__ void __launch_bounds__(32 * kColSumPhases) column_sums_kernel(const float* __restrict__ part, int chunks,
                                                                         int ncols, Out out) {
  __shared__ Acc s[kColSumPhases][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  Acc acc = 0;
  if (c < ncols)
    for (int k = threadIdx.y; k < chunks; k += kColSumPhases) acc += Acc(part[size_t(k) * ncols + c]);
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < ncols) {
    Acc t = 0;
    for (int y = 0; y < kColSumPhases; ++y) t += s[y][threadIdx.x];
    out(c, t);
  }
}

template <class Acc, class Out>
void column_sums(const float* part, int chunks, int ncols, Out out, cudaStream_t stream, const char* op) {
  if (ncols <= 0) return;
  column_sums_kernel<Acc, Out><<<ceil_div(ncols, 32), dim3(32, kColSumPhases), 0, stream>>>(part, chunks, ncols, out);
  HM_CUDA_LAUNCHED(op);
}

}  // namespace hm::cuda
