// The skinny GEMM (skinny.h): y[m, n] (=|+=) x[m, k] . W[n, k]^T for m <= 64 rows.
//
// Grid (splits, tiles), launched as clusters of `splits` blocks along x: block (r, t) owns rows
// [t bn, t bn + bn) of W (columns of y) and the r-th k-range of the tile (skinny.h, SkinnyPlan).
// 256 threads. Per block:
//  1. A cp.async pipeline over the range's k chunks of CH = 32, 64 or 128 elements (8, 6 or 4
//     stages). A stage holds bn rows of W then 8 ceil(m / 8) rows of x, each row the chunk's CH
//     elements (2 CH bytes for 16-bit types, odd rows' 16-byte vectors swizzled from 128 bytes
//     on; float: CH 32, 144 bytes, 128 + 16 of padding so a warp's float4 reads of 32 x rows hit
//     32 banks). Past n, m or k the stage holds zeros (cp.async with a source size of 0). The
//     first stages' W copies are issued before pdl_wait (weights are constant), x's after it.
//  2. bf16/f16: warp w takes the 32 W rows (w % (bn / 32)) * 32 and the x tiles t = w / (bn / 32)
//     + i * (8 / (bn / 32)); per 32 elements of a chunk each lane reads 16 bytes of W rows g, g+8, g+16, g+24
//     (g = lane / 4, elements 8q..8q+7 of the chunk, q = lane % 4) and 16 bytes of x row 8t + g at
//     the same elements, and issues 2 mma m16n8k16 per 16-row W tile and x tile: the mma's k
//     order is a permutation of the chunk's, the same for both operands (the GEMV's trick,
//     gemv.cu, with the operands swapped so the 8-wide mma dimension is the rows of x). A
//     quarter-warp's 16-byte reads (rows g and g + 1) hit distinct banks: with 64-byte rows as
//     they fall, with longer ones through the odd rows' swizzle.
//     float: warp w takes W rows 4w..4w+3, lane l the x rows l and l + 32; fmaf in k order.
//  3. The float partial tile goes to shared memory (reusing the pipeline's), the cluster syncs,
//     and block r finishes every splits-th element of the tile: the partials of blocks 0, 1,
//     ..., splits-1 read through distributed shared memory and added in that order, plus the
//     old y when accumulating, rounded once. A second cluster sync keeps every block's shared
//     memory alive until the others have read it.
// Why the bits of a row do not depend on the batch: skinny.h.
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/skinny.h"

namespace cg = cooperative_groups;

namespace hm::cuda {
namespace {

constexpr int kThreads = 256, kWarps = 8, kMaxSplits = 8;

// Pipeline stages for a chunk width: about 16 KB of each 128-row W tile in flight per stage
// group whatever the width (8 x 32, 6 x 64, 4 x 128 elements), within the shared memory that
// a 128-row tile and 64 x rows need.
__host__ __device__ constexpr int stages_for(int ch) { return ch == 32 ? 8 : ch == 64 ? 6 : 4; }
// Bytes of one staged row (one CH-element chunk of a row of W or x).
template <class T, int CH>
__host__ __device__ constexpr int row_bytes() {
  return sizeof(T) == 4 ? CH * 4 + 16 : CH * 2;
}
// 16-bit rows of 128 or 256 bytes would put rows g and g + 1 of a quarter-warp's reads on the
// same banks: odd rows swap the halves of each 128-byte group (16-byte vector v at v ^ 4).
template <class T, int CH> __host__ __device__ constexpr bool swizzled() { return sizeof(T) == 2 && CH >= 64; }
template <class T, int CH> __device__ __forceinline__ int phys_vec(int row, int v) {
  if constexpr (swizzled<T, CH>()) return v ^ ((row & 1) << 2);
  else return v;
}
// Row stride (floats) of the partial tile [8 mt][bn + 4]: the mma lanes' stores hit 32 banks.
template <int BN> __host__ __device__ constexpr int part_stride() { return BN + 4; }

template <class T, int CH>
size_t smem_bytes(int bn, int mt) {
  const size_t pipe = size_t(stages_for(CH)) * size_t(bn + 8 * mt) * size_t(row_bytes<T, CH>());
  const size_t part = size_t(8 * mt) * size_t(bn + 4) * sizeof(float);
  return std::max(pipe, part);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0: nothing read, 16 zero bytes written
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint4 lds16(const unsigned char* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ float4 ldsf4(const unsigned char* p) { return *reinterpret_cast<const float4*>(p); }

template <class T, class TY>
struct Args {
  TY* y; int64_t ldy;
  const T* x; int64_t ldx;
  const T* W; int64_t ldw;
  int m, n, k;
  int mt;       // ceil(m / 8): 8-row x tiles staged
  int chunks;   // ceil(k / CH)
  bool accumulate;
  bool vec;     // the 16-byte cp.async path (skinny_vectorized); else element by element
};

// Rows [0, rows) x the chunk at column c0 of src (row stride ld) into dst, row_bytes<T, CH>()
// apart (16-byte vectors placed by phys_vec); rows >= valid_rows and columns >= k become zeros.
// Vector path: asynchronous (a cp.async group is the caller's to commit); element path: plain
// loads and a 16-byte shared store.
template <class T, int CH>
__device__ __forceinline__ void stage_rows(unsigned char* dst, const T* src, int64_t ld, int rows, int valid_rows,
                                           int c0, int k, bool vec) {
  constexpr int VE = 16 / int(sizeof(T)), VPR = CH / VE, RS = row_bytes<T, CH>();
  for (int v = threadIdx.x; v < rows * VPR; v += kThreads) {
    const int r = v / VPR, col = c0 + (v % VPR) * VE;
    unsigned char* d = dst + r * RS + phys_vec<T, CH>(r, v % VPR) * 16;
    if (vec) {
      // k is whole vectors here, so a vector is wholly inside k or wholly past it.
      const bool ok = r < valid_rows && col < k;
      cp_async16(d, ok ? src + size_t(r) * size_t(ld) + col : src, ok);
    } else {
      uint4 u = make_uint4(0, 0, 0, 0);
      T* e = reinterpret_cast<T*>(&u);
#pragma unroll
      for (int i = 0; i < VE; ++i)
        if (r < valid_rows && col + i < k) e[i] = src[size_t(r) * size_t(ld) + size_t(col + i)];
      *reinterpret_cast<uint4*>(d) = u;
    }
  }
}

// bf16/f16 on the tensor cores: this warp's 32 W rows x its x tiles (header comment, step 2),
// over the CH / 32 sub-chunks of a stage in k order.
template <class T, int BN, int MTW, int CH>
struct MmaPart {
  static constexpr int WP = BN / 32, WX = kWarps / WP;  // warps along W rows, along x tiles
  float acc[2][MTW][4];
  int p, h, g, q;
  __device__ __forceinline__ MmaPart() {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    p = warp % WP;
    h = warp / WP;
    g = lane / 4;
    q = lane % 4;
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int t = 0; t < MTW; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[a][t][i] = 0.0f;
  }
  // One staged chunk: W rows at st, x rows at st + BN rows.
  __device__ __forceinline__ void step(const unsigned char* st, int mt) {
#pragma unroll
    for (int u = 0; u < CH / 32; ++u) sub(st, mt, phys_vec<T, CH>(g, 4 * u + q) * 16);
  }
  // The 32 elements at 16-byte vectors 4u..4u+3 of every staged row; lane q reads `off` (its
  // vector 4u + q where row parity g % 2 placed it: rows g + 8i and 8t + g share that parity).
  __device__ __forceinline__ void sub(const unsigned char* st, int mt, int off) {
    constexpr int RS = row_bytes<T, CH>();
    const unsigned char* wp = st + (p * 32 + g) * RS + off;
    const uint4 w0 = lds16(wp), w1 = lds16(wp + 8 * RS), w2 = lds16(wp + 16 * RS), w3 = lds16(wp + 24 * RS);
    // A fragments (rows g / g+8; k pairs 2q / 2q+8 of the mma = elements 8q+0,1 / 8q+2,3 of the
    // chunk for the first mma, 8q+4,5 / 8q+6,7 for the second).
    const uint32_t a00[4] = {w0.x, w1.x, w0.y, w1.y}, a01[4] = {w0.z, w1.z, w0.w, w1.w};
    const uint32_t a10[4] = {w2.x, w3.x, w2.y, w3.y}, a11[4] = {w2.z, w3.z, w2.w, w3.w};
    const unsigned char* xp = st + BN * RS + g * RS + off;
#pragma unroll
    for (int i = 0; i < MTW; ++i) {
      const int t = h + i * WX;
      if (t < mt) {  // warp-uniform: every lane takes part in the mma
        const uint4 xv = lds16(xp + t * 8 * RS);
        const uint32_t b0[2] = {xv.x, xv.y}, b1[2] = {xv.z, xv.w};
        mma16816<T>(acc[0][i], a00, b0);
        mma16816<T>(acc[0][i], a01, b1);
        mma16816<T>(acc[1][i], a10, b0);
        mma16816<T>(acc[1][i], a11, b1);
      }
    }
  }
  // acc[a][i] = W rows p 32 + a 16 + g (+8 for 2, 3) x x rows 8t + 2q (+1 for 1, 3).
  __device__ __forceinline__ void store(float* part, int mt) const {
    constexpr int PS = part_stride<BN>();
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int i = 0; i < MTW; ++i) {
        const int t = h + i * WX;
        if (t < mt) {
          const int jl = p * 32 + a * 16 + g, r = 8 * t + 2 * q;
          part[r * PS + jl] = acc[a][i][0];
          part[(r + 1) * PS + jl] = acc[a][i][1];
          part[r * PS + jl + 8] = acc[a][i][2];
          part[(r + 1) * PS + jl + 8] = acc[a][i][3];
        }
      }
  }
};

// float on the CUDA cores: W rows 4w..4w+3 x x rows lane and lane + 32, fmaf in k order.
struct FmaPart {
  static constexpr int BN = 32;
  float acc[4][2];
  int warp, lane;
  __device__ __forceinline__ FmaPart() {
    warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = 0.0f;
  }
  __device__ __forceinline__ void step(const unsigned char* st, int mt) {
    constexpr int RS = row_bytes<float, 32>();
    const int mr = 8 * mt;
    const bool lo = lane < mr, hi = lane + 32 < mr;  // staged rows only (the stage ends at row mr)
    const unsigned char* xp = st + BN * RS;
#pragma unroll
    for (int kq = 0; kq < 32 / 4; ++kq) {
      const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      const float4 xa = lo ? ldsf4(xp + lane * RS + kq * 16) : zero;
      const float4 xb = hi ? ldsf4(xp + (lane + 32) * RS + kq * 16) : zero;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float4 w = ldsf4(st + (4 * warp + r) * RS + kq * 16);  // one address per warp: a broadcast
        acc[r][0] = fmaf(w.x, xa.x, acc[r][0]);
        acc[r][0] = fmaf(w.y, xa.y, acc[r][0]);
        acc[r][0] = fmaf(w.z, xa.z, acc[r][0]);
        acc[r][0] = fmaf(w.w, xa.w, acc[r][0]);
        acc[r][1] = fmaf(w.x, xb.x, acc[r][1]);
        acc[r][1] = fmaf(w.y, xb.y, acc[r][1]);
        acc[r][1] = fmaf(w.z, xb.z, acc[r][1]);
        acc[r][1] = fmaf(w.w, xb.w, acc[r][1]);
      }
    }
  }
  __device__ __forceinline__ void store(float* part, int mt) const {
    constexpr int PS = part_stride<BN>();
    const int mr = 8 * mt;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (lane < mr) part[lane * PS + 4 * warp + r] = acc[r][0];
      if (lane + 32 < mr) part[(lane + 32) * PS + 4 * warp + r] = acc[r][1];
    }
  }
};

template <class T, class TY, int BN, int MTW, int CH>
__global__ void __launch_bounds__(kThreads) skinny_kernel(const Args<T, TY> a) {
  using Part = std::conditional_t<sizeof(T) == 4, FmaPart, MmaPart<T, BN, MTW, CH>>;
  static_assert(sizeof(T) == 2 || (BN == 32 && CH == 32), "float runs 32-row tiles of 32-wide chunks");
  constexpr int RS = row_bytes<T, CH>(), PS = part_stride<BN>(), kStages = stages_for(CH);
  extern __shared__ __align__(16) unsigned char smem[];
  pdl_trigger();
  cg::cluster_group cluster = cg::this_cluster();
  // The cluster spans grid x (dims (splits, 1, 1)): block x = the split = the rank in the cluster.
  const int splits = int(gridDim.x), rank = int(blockIdx.x);
  const int j0 = int(blockIdx.y) * BN, rows_w = min(BN, a.n - j0), mr = 8 * a.mt;
  const int c_begin = int(int64_t(rank) * a.chunks / splits), c_end = int(int64_t(rank + 1) * a.chunks / splits);
  const int nc = c_end - c_begin;
  const size_t stage_bytes = size_t(BN + mr) * RS;
  const T* wblk = a.W + size_t(j0) * size_t(a.ldw);
  auto load_w = [&](int s, int c) {
    stage_rows<T, CH>(smem + size_t(s) * stage_bytes, wblk, a.ldw, BN, rows_w, c * CH, a.k, a.vec);
  };
  auto load_x = [&](int s, int c) {
    stage_rows<T, CH>(smem + size_t(s) * stage_bytes + BN * RS, a.x, a.ldx, mr, a.m, c * CH, a.k, a.vec);
  };

  // Prologue: stages 0..kStages-2. Group 0 holds every prologue W copy and x of stage 0; group
  // s holds x of stage s. Waiting for group s (in order) therefore covers stage s's W too.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s)
    if (s < nc) load_w(s, c_begin + s);
  pdl_wait();  // x and y may be the previous kernel's outputs
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nc) load_x(s, c_begin + s);
    cp_async_commit();
  }

  Part part;
  for (int it = 0; it < nc; ++it) {
    cp_async_wait<kStages - 2>();  // groups 0..it are complete: chunk it is staged
    __syncthreads();               // ... for every thread, and every warp is done with chunk it-1
    const int nxt = it + kStages - 1;  // into the slot of chunk it-1
    if (nxt < nc) {
      load_w(nxt % kStages, c_begin + nxt);
      load_x(nxt % kStages, c_begin + nxt);
    }
    cp_async_commit();
    part.step(smem + size_t(it % kStages) * stage_bytes, a.mt);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's memory becomes the partial tile

  float* ptile = reinterpret_cast<float*>(smem);
  part.store(ptile, a.mt);
  if (splits > 1) cluster.sync(); else __syncthreads();

  // Block `rank` finishes elements rank*256 + tid, stepping by splits*256, of the m x BN tile
  // (row-major along W rows, so the y stores coalesce); the partials in split order.
  for (int e = rank * kThreads + int(threadIdx.x); e < a.m * BN; e += splits * kThreads) {
    const int i = e / BN, jl = e % BN, j = j0 + jl;
    if (j >= a.n) continue;
    float* src = ptile + i * PS + jl;
    float v;
    if (splits > 1) {
      v = *cluster.map_shared_rank(src, 0u);
      for (int s = 1; s < splits; ++s) v += *cluster.map_shared_rank(src, unsigned(s));
    } else {
      v = *src;
    }
    TY* yp = a.y + size_t(i) * size_t(a.ldy) + j;
    if (a.accumulate) v += to_f(*yp);
    *yp = from_f<TY>(v);
  }
  if (splits > 1) cluster.sync();  // no block leaves while another still reads its partials
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T, class TY, int BN, int MTW, int CH>
void launch(const Args<T, TY>& a, int splits, cudaStream_t stream) {
  auto* kern = skinny_kernel<T, TY, BN, MTW, CH>;
  // The largest stage any m takes (m = 64), set once per instantiation.
  static const cudaError_t attr_err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                           int(smem_bytes<T, CH>(BN, kSkinnyMaxRows / 8)));
  HM_CUDA_OK(attr_err, "skinny: cudaFuncSetAttribute");
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(splits), unsigned(ceil_div(a.n, BN)), 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem_bytes<T, CH>(BN, a.mt);
  cfg.stream = stream;
  cudaLaunchAttribute attr[2]{};
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(splits);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 2 : 1;
  HM_CUDA_OK(cudaLaunchKernelEx(&cfg, kern, a), "skinny");
}

// The chunk width of 16-bit plans, from HM_CUDA_SKINNY_CHUNK (32, 64 or 128; default 32), read
// once a process: an A/B switch, so the plan stays one function of the shape for the process.
int chunk_default() {
  static const int c = [] {
    const char* v = std::getenv("HM_CUDA_SKINNY_CHUNK");
    const int w = v != nullptr ? std::atoi(v) : 32;
    return w == 64 || w == 128 ? w : 32;
  }();
  return c;
}

template <class T, class TY, int CH>
void launch_tiles(const Args<T, TY>& a, int bn, int splits, cudaStream_t stream) {
  // x tiles per warp: ceil(mt / (8 warps / (bn / 32))), rounded up to an instantiated count.
  if (bn == 128) {
    if (a.mt <= 2) launch<T, TY, 128, 1, CH>(a, splits, stream);
    else if (a.mt <= 4) launch<T, TY, 128, 2, CH>(a, splits, stream);
    else launch<T, TY, 128, 4, CH>(a, splits, stream);
  } else if (bn == 64) {
    if (a.mt <= 4) launch<T, TY, 64, 1, CH>(a, splits, stream);
    else launch<T, TY, 64, 2, CH>(a, splits, stream);
  } else {
    launch<T, TY, 32, 1, CH>(a, splits, stream);
  }
}

}  // namespace

SkinnyPlan skinny_plan(int n, int k, size_t elem_bytes) {
  const int ch = elem_bytes == 4 ? 32 : chunk_default();
  const int chunks = std::max(1, ceil_div(std::max(k, 1), ch));
  const int max_splits = std::clamp(chunks / 4, 1, kMaxSplits);
  const int64_t sms = sm_count();
  SkinnyPlan best{elem_bytes == 4 ? 32 : 128, 1, ch};
  double best_eff = -1.0;
  for (int bn : {128, 64, 32}) {
    if (elem_bytes == 4 && bn != 32) continue;
    const int64_t tiles = ceil_div(std::max(n, 1), bn);
    for (int s = 1; s <= max_splits; s *= 2) {
      const int64_t blocks = tiles * s, waves = (blocks + sms - 1) / sms;
      const double eff = double(blocks) / double(waves * sms);
      if (eff > best_eff + 0.05) {  // larger tiles (less x re-read) and fewer splits win near-ties
        best = {bn, s, ch};
        best_eff = eff;
      }
    }
  }
  return best;
}

bool skinny_fits(int m, int n, int k) {
  return m >= 1 && m <= kSkinnyMaxRows && n >= 1 && k >= 0 && ceil_div(n, 32) <= 65535;
}

bool skinny_vectorized(int k, const void* x, int64_t ldx, const void* W, int64_t ldw, size_t elem_bytes) {
  const int64_t v = 16 / int64_t(elem_bytes);
  return k % v == 0 && ldx % v == 0 && ldw % v == 0 && aligned16(x) && aligned16(W);
}

template <class T, class TY>
void skinny(TY* y, int64_t ldy, const T* x, int64_t ldx, const T* W, int64_t ldw, int m, int n, int k,
            bool accumulate, cudaStream_t stream, const SkinnyPlan* plan) {
  HM_CHECK(skinny_fits(m, n, k), "cuda skinny: shape m ", m, " n ", n, " k ", k, " not taken (m in [1, ",
           kSkinnyMaxRows, "], n >= 1)");
  HM_CHECK(ldx >= k && ldw >= k && ldy >= n, "cuda skinny: leading dimensions ldx ", ldx, " ldw ", ldw, " ldy ", ldy,
           " below k ", k, " / n ", n);
  if (k == 0) {  // an empty sum: y = 0, or unchanged when accumulating
    if (!accumulate)
      HM_CUDA_OK(cudaMemset2DAsync(y, size_t(ldy) * sizeof(TY), 0, size_t(n) * sizeof(TY), size_t(m), stream),
                 "skinny: cudaMemset2DAsync");
    return;
  }
  const SkinnyPlan p = plan != nullptr ? *plan : skinny_plan(n, k, sizeof(T));
  HM_CHECK(p.bn == 32 || p.bn == 64 || p.bn == 128, "cuda skinny: tiles of 32, 64 or 128 rows, not ", p.bn);
  HM_CHECK(p.chunk == 32 || p.chunk == 64 || p.chunk == 128, "cuda skinny: chunks of 32, 64 or 128, not ", p.chunk);
  Args<T, TY> a{y, ldy, x, ldx, W, ldw, m, n, k, ceil_div(m, 8), ceil_div(k, p.chunk), accumulate,
                skinny_vectorized(k, x, ldx, W, ldw, sizeof(T))};
  HM_CHECK(p.splits >= 1 && p.splits <= kMaxSplits && p.splits <= a.chunks, "cuda skinny: ", p.splits,
           " splits of ", a.chunks, " chunks");
  if constexpr (sizeof(T) == 4) {
    HM_CHECK(p.bn == 32 && p.chunk == 32, "cuda skinny: float takes 32-row tiles of 32-wide chunks, not ", p.bn,
             " x ", p.chunk);
    launch<T, TY, 32, 1, 32>(a, p.splits, stream);
  } else {
    if (p.chunk == 32) launch_tiles<T, TY, 32>(a, p.bn, p.splits, stream);
    else if (p.chunk == 64) launch_tiles<T, TY, 64>(a, p.bn, p.splits, stream);
    else launch_tiles<T, TY, 128>(a, p.bn, p.splits, stream);
  }
}

#define HM_INST(T, TY)                                                                                        \
  template void skinny<T, TY>(TY*, int64_t, const T*, int64_t, const T*, int64_t, int, int, int, bool,         \
                              cudaStream_t, const SkinnyPlan*);
HM_INST(float, float)
HM_INST(__nv_bfloat16, __nv_bfloat16)
HM_INST(__nv_bfloat16, float)
HM_INST(__half, __half)
HM_INST(__half, float)
#undef HM_INST

}  // namespace hm::cuda
