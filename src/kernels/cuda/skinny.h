// The skinny GEMM of decode steps (docs/CUDA.md, "Decode step"): y[m, n] (=|+=) x[m, k] . W[n, k]^T
// for m = 1..kSkinnyMaxRows rows, the contract of ref::linear (row-major, leading dimensions in
// elements, W a PyTorch Linear weight [n, k]). At decode every projection reads its whole
// weight for a handful of rows, so the kernel is built to stream W once at the copy rate:
//  - one launch: a block owns a tile of W's rows (the output columns) and a k-range; the k-ranges
//    of a tile (the split) form a thread-block cluster whose blocks add their float partial sums
//    through distributed shared memory in split order, so there is no second kernel, no
//    workspace and no float atomics;
//  - W and x are staged through a cp.async pipeline of k chunks (8 stages of 32 elements, 6 of
//    64 or 4 of 128: SkinnyPlan::chunk; 16-byte copies; the first W chunks are requested
//    before the previous kernel ends, PDL) and every W tile is shared by all m rows: W is read
//    from memory exactly once per call;
//  - bf16/f16 multiply on the tensor cores (mma m16n8k16, W as the 16-row operand, x rows as the
//    8 columns), float on the CUDA cores (fmaf in k order); sums in float, y rounded once.
//
// Batch invariance (issue 16): the bits of output row i depend only on x row i, W and the
// previous y row i, never on m or on the other rows. The tiling (rows per block, the split of k
// and its reduction order) is chosen from n, k, the element size and the device's SM count
// only (skinny_plan); row i always sits in the same place of its 8-row mma operand (column i % 8
// of tile i / 8) whatever the batch, each element of an mma's result depends only on its own
// row and column of the operands, rows past m are zeros that touch no other element, and the
// sum over k is the same sequence of mmas (or fmafs) and the same split-order addition for every
// m. So a row computed alone, in a batch of 7 or of 64 gives the same bits (CudaSkinny.
// BatchInvariant checks it). The one-row GEMV (decode.h) and cuBLASLt sum in other orders.
//
// Plain C++ declarations, callable from g++-compiled files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hm::cuda {

// The most rows of x the kernel takes (eight 8-row mma tiles).
constexpr int kSkinnyMaxRows = 64;

// The tiling of one shape: `bn` rows of W per block (32, 64 or 128; always 32 for float),
// `splits` k-ranges per tile (1..8, the cluster size), chunk-aligned: range r holds the
// `chunk`-wide k chunks [r C / splits, (r + 1) C / splits) of C = ceil(k / chunk). The chunk
// (32, 64 or 128 elements; 32 for float) is what each pipeline stage copies of every row: wider
// chunks read W in longer runs per row (64, 128 or 256 bytes of bf16) through fewer, deeper
// stages.
struct SkinnyPlan {
  int bn = 0;
  int splits = 0;
  int chunk = 32;
};

// The plan skinny() uses for n x k weights of `elem_bytes` bytes (2 or 4): a function of n, k,
// elem_bytes, the SM count and the process's HM_CUDA_SKINNY_CHUNK (the 16-bit chunk width, 32
// unless it says 64 or 128) only, never of m: the batch invariance above rests on it. It
// picks the largest bn and then the fewest splits (each range keeping >= 4 chunks) that spread
// the tiles evenly over the SMs: blocks / (waves * SMs) best within 0.05.
SkinnyPlan skinny_plan(int n, int k, size_t elem_bytes);

// Whether skinny() takes the shape at all: 1 <= m <= kSkinnyMaxRows, n >= 1, k >= 0, and the
// grid's tile count within CUDA's limit. Any strides and alignments are taken.
bool skinny_fits(int m, int n, int k);

// Whether the shape runs on the 16-byte copy path: x and W 16-byte aligned, k, ldx and ldw whole
// 16-byte vectors. Otherwise the kernel stages elements one by one (correct, tested, much
// slower: the backend sends such shapes to cuBLASLt instead).
bool skinny_vectorized(int k, const void* x, int64_t ldx, const void* W, int64_t ldw, size_t elem_bytes);

// y[m, n] (=|+=) x[m, k] . W[n, k]^T with T = float, __nv_bfloat16 or __half and TY = T or float;
// ldx >= k, ldw >= k, ldy >= n (elements). `plan` overrides skinny_plan (tests: every tiling;
// bn must be 32, 64 or 128 and chunk 32, 64 or 128 (both 32 for float), splits in [1, 8] and at
// most the chunk count).
// Enqueued on `stream` without waiting; an hm::Error for a shape skinny_fits refuses.
template <class T, class TY>
void skinny(TY* y, int64_t ldy, const T* x, int64_t ldx, const T* W, int64_t ldw, int m, int n, int k,
            bool accumulate, cudaStream_t stream, const SkinnyPlan* plan = nullptr);

}  // namespace hm::cuda
