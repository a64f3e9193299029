// Attention over a ragged batch and a per-slot KV cache: the cache write, a flash-style causal
// prefill on the tensor cores (mma.sync m16n8k16, bf16/f16 in, f32 accumulate, online softmax,
// no L x L matrix anywhere) and a split-KV decode (one query per sequence, the cache cut into
// chunks read by separate warps, then a combine kernel). docs/CUDA.md has the design. A float
// cache takes a plain float kernel instead (the f32 model's path, exact rather than fast).
#include <cuda_pipeline_primitives.h>

#include <cmath>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace hm::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// Four 8x8 b16 matrices from shared memory, transposed: lanes 8i .. 8i+7 give the row addresses
// of matrix i, and register i of lane t receives its elements (2 (t % 4), t / 4) and
// (2 (t % 4) + 1, t / 4): for rows = keys and columns = dimensions, an mma B fragment of V.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// ---- KV write ---------------------------------------------------------------------------------

// One block row per token: its K and V rows go to slot slots[s] at position pos0[s] + t.
template <class T, class KV>
__global__ void kv_write_kernel(KvPool<KV> pool, const T* __restrict__ k, int ldk, const T* __restrict__ v,
                                int ldv, const int32_t* __restrict__ cu, const int32_t* __restrict__ slots,
                                const int32_t* __restrict__ pos0, int nseq, int width) {
  pdl_trigger();
  pdl_wait();  // everything it reads comes from earlier work (see launch_pdl)
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= width) return;
  const int t = blockIdx.x, s = seq_of_row(cu, nseq, t);
  const int pos = pos0[s] + t - cu[s];
  if (pos < 0 || pos >= pool.max_ctx) return;  // the caller checks positions on the host
  const size_t at = size_t(slots[s]) * pool.slot_stride + size_t(pos) * width + j;
  pool.k[at] = from_f<KV>(to_f(k[size_t(t) * ldk + j]));
  pool.v[at] = from_f<KV>(to_f(v[size_t(t) * ldv + j]));
}

// ---- Flash prefill ----------------------------------------------------------------------------

constexpr int kBq = 64;  // query rows per block: 4 warps x 16
constexpr int kBk = 64;  // keys per tile
constexpr int kPrefillThreads = 128;

// Shared memory of the prefill: two stages of a K and a V tile, kBk rows of HD + 8 elements
// (the padding puts the 8 rows of a fragment or ldmatrix read in different banks).
template <class KV, int HD>
constexpr int prefill_smem_bytes() { return 2 * 2 * kBk * (HD + 8) * int(sizeof(KV)); }

// Block (tile of 64 query rows, query head h, sequence s). Each warp owns 16 query rows: its Q
// fragments, its output accumulators and its softmax state stay in registers. K and V tiles
// sit in shared memory row-major, double-buffered: the 16-byte asynchronous copies of tile
// i + 1 fly while tile i is computed. K rows are the B operand of S = Q K^T as they lie; V's B
// fragments of O += P V come through ldmatrix.trans. P goes from the S accumulators straight
// to A operands (same thread layout).
template <class T, class KV, int HD>
__global__ void __launch_bounds__(kPrefillThreads) flash_prefill_kernel(
    T* __restrict__ out, int ldo, const T* __restrict__ q, int ldq, KvPool<KV> pool,
    const int32_t* __restrict__ cu, const int32_t* __restrict__ slots, const int32_t* __restrict__ pos0,
    int H, int G, float scale_log2) {
  constexpr int KP = HD + 8, kTileElems = kBk * KP;
  extern __shared__ __align__(16) unsigned char prefill_smem[];
  KV* const ks = reinterpret_cast<KV*>(prefill_smem);  // [2][kBk][KP]
  KV* const vs = ks + 2 * kTileElems;                   // [2][kBk][KP]

  const int s = blockIdx.z, h = blockIdx.y;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  const int r0 = (gridDim.x - 1 - blockIdx.x) * kBq;  // the longest (latest) tiles start first
  if (r0 >= L) return;
  const int p0 = pos0[s], ldkv = G * HD, g = h / (H / G);
  const KV* kb = pool.k + size_t(slots[s]) * pool.slot_stride + size_t(g) * HD;
  const KV* vb = pool.v + size_t(slots[s]) * pool.slot_stride + size_t(g) * HD;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int wr = r0 + warp * 16;  // this warp's first query row in the sequence

  // Q as A fragments: register r holds row gid (+8 if r odd), columns 2 tig, 2 tig + 1 (+8 if r >= 2).
  uint32_t qf[HD / 16][4];
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = wr + gid + (r & 1) * 8, col = kk * 16 + 2 * tig + (r >> 1) * 8;
      float a = 0.f, b = 0.f;
      if (row < L) {
        const T* qp = q + size_t(row0 + row) * ldq + size_t(h) * HD + col;
        a = to_f(qp[0]);
        b = to_f(qp[1]);
      }
      qf[kk][r] = pack2<KV>(a, b);
    }

  float o[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows gid and gid + 8, log2 units

  const int last_key = p0 + min(r0 + kBq, L) - 1;  // the last key any row of the block reads
  const int warp_last = p0 + wr + 15;              // ... and any row of this warp
  const bool warp_live = wr < L;
  // Tile at key k0 into stage buf: consecutive threads take consecutive 16-byte pieces of a
  // row (sources 16-byte aligned: the pool, slot_stride, g HD and c all are). Rows past the
  // block's last key are zeros: masked in S, but 0 * stale V could be NaN.
  auto stage = [&](int buf, int k0) {
    for (int i = threadIdx.x; i < kBk * (HD / 8); i += kPrefillThreads) {
      const int r = i / (HD / 8), c = (i % (HD / 8)) * 8, key = k0 + r;
      KV* kd = ks + buf * kTileElems + r * KP + c;
      KV* vd = vs + buf * kTileElems + r * KP + c;
      if (key <= last_key) {
        __pipeline_memcpy_async(kd, kb + size_t(key) * ldkv + c, 16);
        __pipeline_memcpy_async(vd, vb + size_t(key) * ldkv + c, 16);
      } else {
        *reinterpret_cast<uint4*>(kd) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(vd) = make_uint4(0, 0, 0, 0);
      }
    }
    __pipeline_commit();
  };
  const int n_tiles = last_key / kBk + 1;
  stage(0, 0);
  for (int it = 0; it < n_tiles; ++it) {
    const int k0 = it * kBk, buf = it & 1;
    // One commit group per iteration (empty on the last), so waiting for all but the newest
    // group always means this tile's copies have landed.
    if (it + 1 < n_tiles) stage(buf ^ 1, k0 + kBk);
    else __pipeline_commit();
    __pipeline_wait_prior(1);
    __syncthreads();  // ... in every thread's view, as have the zero stores
    if (warp_live && k0 <= warp_last) {  // else every key of the tile is in this warp's future
      const KV* kt = ks + buf * kTileElems;
      const KV* vt = vs + buf * kTileElems;
      // S = Q K^T for 16 rows x 64 keys: 8 accumulators of 16 x 8.
      float sc[kBk / 8][4];
#pragma unroll
      for (int n = 0; n < kBk / 8; ++n) {
        sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
          const KV* kp = kt + (n * 8 + gid) * KP + kk * 16 + 2 * tig;
          const uint32_t b[2] = {*reinterpret_cast<const uint32_t*>(kp), *reinterpret_cast<const uint32_t*>(kp + 8)};
          mma16816<KV>(sc[n], qf[kk], b);
        }
      }
      // Scale into log2 units and mask the future: element e is row gid + 8 (e >= 2), key 2 tig + (e & 1).
      const bool need_mask = k0 + kBk - 1 > p0 + wr;
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kBk / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = sc[n][e] * scale_log2;
          if (need_mask && k0 + n * 8 + 2 * tig + (e & 1) > p0 + wr + gid + (e >> 1) * 8) v = -INFINITY;
          sc[n][e] = v;
          mx[e >> 1] = fmaxf(mx[e >> 1], v);
        }
      // Row max over the quad that shares a row; key 0 is in every row's past, so after the first
      // tile m is finite and exp2(-inf - m) is 0.
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float mn = fmaxf(m[r], mx[r]);
        alpha[r] = exp2f(m[r] - mn);
        m[r] = mn;
        l[r] *= alpha[r];
      }
#pragma unroll
      for (int n = 0; n < HD / 8; ++n) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }
#pragma unroll
      for (int n = 0; n < kBk / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[n][e] = exp2f(sc[n][e] - m[e >> 1]);
          l[e >> 1] += sc[n][e];
        }
      // O += P V: the accumulators of key blocks 2j and 2j + 1 are the A fragment of keys 16j..16j+15.
#pragma unroll
      for (int j = 0; j < kBk / 16; ++j) {
        const uint32_t a[4] = {pack2<KV>(sc[2 * j][0], sc[2 * j][1]), pack2<KV>(sc[2 * j][2], sc[2 * j][3]),
                               pack2<KV>(sc[2 * j + 1][0], sc[2 * j + 1][1]),
                               pack2<KV>(sc[2 * j + 1][2], sc[2 * j + 1][3])};
        // Lane t addresses key j 16 + t % 16, dimensions n 8 + (t / 16) 8: matrices 0 and 1 are
        // keys 0-7 and 8-15 of dimension block n, 2 and 3 the same keys of block n + 1.
#pragma unroll
        for (int n = 0; n < HD / 8; n += 2) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, vt + (j * 16 + (lane & 15)) * KP + n * 8 + (lane >> 4) * 8);
          mma16816<KV>(o[n], a, b);
          mma16816<KV>(o[n + 1], a, b + 2);
        }
      }
    }
    __syncthreads();  // the stage read here is refilled by the next iteration
  }
  if (!warp_live) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wr + gid + r * 8;
    if (row >= L) continue;
    const float inv = 1.f / l[r];
    T* op = out + size_t(row0 + row) * ldo + size_t(h) * HD + 2 * tig;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      op[n * 8] = from_f<T>(o[n][2 * r] * inv);
      op[n * 8 + 1] = from_f<T>(o[n][2 * r + 1] * inv);
    }
  }
}

// ---- Split-KV decode --------------------------------------------------------------------------

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;

// Softmax state merge: (m, l, acc) absorbs (mo, lo, acco); -inf means empty.
__device__ __forceinline__ void merge_weights(float m, float mo, float& a, float& b, float& mn) {
  mn = fmaxf(m, mo);
  a = m == -INFINITY ? 0.f : exp2f(m - mn);
  b = mo == -INFINITY ? 0.f : exp2f(mo - mn);
}

// Block (chunk c of the cache, kv head g, sequence s); the query heads of group g share every K
// and V load. HD / 8 lanes read one key row with 16-byte loads, so a warp reads 32 / (HD / 8)
// keys at a time, each lane 8 dimensions; a lane group takes U such keys per step, all their
// loads issued before the first use, and folds them into its online softmax with one rescale.
// QM bounds the heads per group (the model's H / G rounded up to 1, 2, 4 or 8), so the query
// and accumulator arrays take the registers that group needs. The lane groups of a warp merge
// by shuffles, and each warp leaves one partial per head for the combine kernel: acc[HD] in
// part_acc, (m, l) in part_ml.
template <class T, class KV, int HD, int QM>
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(
    float* __restrict__ part_acc, float2* __restrict__ part_ml, const T* __restrict__ q, int ldq, KvPool<KV> pool,
    const int32_t* __restrict__ cu, const int32_t* __restrict__ slots, const int32_t* __restrict__ pos0,
    int H, int G, int chunk, float scale_log2, const T* __restrict__ k_new, const T* __restrict__ v_new, int ld_new) {
  constexpr int LPK = HD / 8, KPW = 32 / LPK;
  constexpr int U = QM >= 8 ? 2 : 4;  // keys per lane group and step (registers: QM 8 holds 144 floats)
  pdl_trigger();
  pdl_wait();
  const int s = blockIdx.z, g = blockIdx.y, c = blockIdx.x;
  const int qpg = H / G;  // <= QM (the host's choice of QM)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, sub = lane / LPK, li = lane % LPK;
  const int n_part = gridDim.x * kDecodeWarps;
  const bool has_row = cu[s + 1] - cu[s] == 1;
  const int n_keys = has_row ? pos0[s] + 1 : 0;
  const int kbeg = c * chunk, kend = min(n_keys, kbeg + chunk);

  float qv[QM][8], acc[QM][8], m[QM], l[QM];
#pragma unroll
  for (int j = 0; j < QM; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      acc[j][i] = 0.f;
      qv[j][i] = j < qpg && has_row ? to_f(q[size_t(cu[s]) * ldq + size_t(g * qpg + j) * HD + li * 8 + i]) * scale_log2 : 0.f;
    }
  }
  const KV* kb = pool.k + size_t(slots[s]) * pool.slot_stride + size_t(g) * HD + li * 8;
  const KV* vb = pool.v + size_t(slots[s]) * pool.slot_stride + size_t(g) * HD + li * 8;
  const int ldkv = G * HD;
  // kv_write fused (k_new, KV == T: the same bits): the step's key, position n_keys - 1, is read
  // from k_new / v_new, and the block whose chunk holds it stores it in the cache.
  const int fresh = k_new != nullptr && has_row ? n_keys - 1 : -1;
  const size_t new_at = size_t(cu[s]) * ld_new + size_t(g) * HD;
  if (fresh >= kbeg && fresh < kend && threadIdx.x < HD / 8) {
    const size_t at = size_t(slots[s]) * pool.slot_stride + size_t(fresh) * ldkv + size_t(g) * HD + threadIdx.x * 8;
    *reinterpret_cast<uint4*>(pool.k + at) = *reinterpret_cast<const uint4*>(k_new + new_at + threadIdx.x * 8);
    *reinterpret_cast<uint4*>(pool.v + at) = *reinterpret_cast<const uint4*>(v_new + new_at + threadIdx.x * 8);
  }
  // Warp w's step covers keys base .. base + U KPW - 1: key base + u KPW + sub for lane group
  // sub. The loop bound is the same for the whole warp (the shuffles need every lane).
  for (int base = kbeg + warp * KPW * U; base < kend; base += kDecodeWarps * KPW * U) {
    uint4 kw[U], vw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + u * KPW + sub;
      kw[u] = vw[u] = make_uint4(0, 0, 0, 0);
      if (key < kend) {
        const bool from_new = key == fresh;
        const void* kp = from_new ? static_cast<const void*>(k_new + new_at + li * 8) : kb + size_t(key) * ldkv;
        const void* vp = from_new ? static_cast<const void*>(v_new + new_at + li * 8) : vb + size_t(key) * ldkv;
        kw[u] = *static_cast<const uint4*>(kp);
        vw[u] = *static_cast<const uint4*>(vp);
      }
    }
    // Keys grow with u, so a lane group has a valid key in this step iff its first one is.
    const int n_valid = min(U, max(0, ceil_div(kend - base - sub, KPW)));
#pragma unroll
    for (int j = 0; j < QM; ++j) {
      if (j >= qpg) break;
      float d[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const KV* ke = reinterpret_cast<const KV*>(&kw[u]);
        d[u] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d[u] += qv[j][i] * to_f(ke[i]);
#pragma unroll
        for (int o = LPK / 2; o > 0; o >>= 1) d[u] += __shfl_xor_sync(0xffffffffu, d[u], o);
      }
      if (n_valid == 0) continue;
      float mn = m[j];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n_valid) mn = fmaxf(mn, d[u]);
      const float a = exp2f(m[j] - mn);  // m = -inf before the first key: a = 0
      m[j] = mn;
      l[j] *= a;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[j][i] *= a;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float p = u < n_valid ? exp2f(d[u] - mn) : 0.f;
        const KV* ve = reinterpret_cast<const KV*>(&vw[u]);
        l[j] += p;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[j][i] += p * to_f(ve[i]);
      }
    }
  }
  // Merge the KPW lane groups of the warp (lanes li, li + LPK, ...) into lanes 0..LPK-1.
#pragma unroll
  for (int o = LPK; o < 32; o <<= 1)
#pragma unroll
    for (int j = 0; j < QM; ++j) {
      if (j >= qpg) break;
      const float mo = __shfl_xor_sync(0xffffffffu, m[j], o), lo = __shfl_xor_sync(0xffffffffu, l[j], o);
      float a, b, mn;
      merge_weights(m[j], mo, a, b, mn);
      m[j] = mn;
      l[j] = l[j] * a + lo * b;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[j][i] = acc[j][i] * a + __shfl_xor_sync(0xffffffffu, acc[j][i], o) * b;
    }
  if (sub != 0) return;
  // Partial p = chunk c, warp w of head h: part_acc[(s H + h) n_part + p][HD], part_ml likewise.
  const int p = c * kDecodeWarps + warp;
#pragma unroll
  for (int j = 0; j < QM; ++j) {
    if (j >= qpg) break;
    const size_t at = (size_t(s) * H + g * qpg + j) * n_part + p;
    float4* dst = reinterpret_cast<float4*>(part_acc + at * HD + li * 8);  // 16-byte aligned: HD, li * 8 and the base
    dst[0] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
    dst[1] = make_float4(acc[j][4], acc[j][5], acc[j][6], acc[j][7]);
    if (li == 0) part_ml[at] = make_float2(m[j], l[j]);
  }
}

// One block of kCombineWarps warps per (query head, sequence) merges its n_part partials (264
// at batch 1 with G 8, so a serial walk would be latency-bound). HD / 4 lanes cover one
// partial's acc with float4 loads; lane group pg of warp w takes partials w PPS + pg, then every
// kCombineWarps PPS-th one, weighing each by exp2(m - M) for the block's max M (empty partials,
// m = -inf, weigh 0). The lane groups meet by shuffles, the warps in shared memory.
constexpr int kCombineWarps = 8;
template <class T, int HD>
__global__ void __launch_bounds__(kCombineWarps * 32) decode_combine_kernel(
    T* __restrict__ out, int ldo, const float* __restrict__ part_acc, const float2* __restrict__ part_ml,
    const int32_t* __restrict__ cu, int H, int n_part) {
  constexpr int LPP = HD / 4, PPS = 32 / LPP;  // lanes per partial, partials per warp and step
  __shared__ float s_mx[kCombineWarps], s_den[kCombineWarps];
  __shared__ float s_num[kCombineWarps][HD];
  const int h = blockIdx.x, s = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, pg = lane / LPP, li = lane % LPP;
  pdl_trigger();
  pdl_wait();
  if (cu[s + 1] - cu[s] != 1) return;  // uniform over the block
  const size_t first = (size_t(s) * H + h) * n_part;
  const float2* ml = part_ml + first;
  float mx = -INFINITY;
  for (int p = threadIdx.x; p < n_part; p += kCombineWarps * 32) mx = fmaxf(mx, ml[p].x);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) s_mx[warp] = mx;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) mx = fmaxf(mx, s_mx[w]);
  // mx is finite: warp 0 of chunk 0 holds key 0 of every sequence with a row.
  float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
  float den = 0.f;
  const float4* acc = reinterpret_cast<const float4*>(part_acc + first * HD) + li;  // 16-byte aligned rows
#pragma unroll 4
  for (int p = warp * PPS + pg; p < n_part; p += kCombineWarps * PPS) {
    const float2 w2 = ml[p];
    const float4 a = acc[size_t(p) * LPP];
    const float w = w2.x == -INFINITY ? 0.f : exp2f(w2.x - mx);
    den += w * w2.y;
    num.x += w * a.x;
    num.y += w * a.y;
    num.z += w * a.z;
    num.w += w * a.w;
  }
#pragma unroll
  for (int o = LPP; o < 32; o <<= 1) {  // the lane groups of the warp (same li, other pg)
    den += __shfl_xor_sync(0xffffffffu, den, o);
    num.x += __shfl_xor_sync(0xffffffffu, num.x, o);
    num.y += __shfl_xor_sync(0xffffffffu, num.y, o);
    num.z += __shfl_xor_sync(0xffffffffu, num.z, o);
    num.w += __shfl_xor_sync(0xffffffffu, num.w, o);
  }
  if (pg == 0) {
    s_num[warp][li * 4] = num.x;
    s_num[warp][li * 4 + 1] = num.y;
    s_num[warp][li * 4 + 2] = num.z;
    s_num[warp][li * 4 + 3] = num.w;
    if (li == 0) s_den[warp] = den;
  }
  __syncthreads();
  if (threadIdx.x >= HD) return;  // HD <= 128 < the block's 256 threads
  float n = 0.f, d = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) {
    n += s_num[w][threadIdx.x];
    d += s_den[w];
  }
  out[size_t(cu[s]) * ldo + size_t(h) * HD + threadIdx.x] = from_f<T>(n / d);
}

// Chunks per (sequence, kv head): enough blocks for a few waves over 132 SMs, but at least 64
// keys per chunk (shorter ones cost more in partials than they save).
int decode_chunks(const RaggedBatch& rb, int G, int max_keys) {
  const int want = ceil_div(4 * 132, std::max(1, rb.nseq * G));
  return std::max(1, std::min(want, ceil_div(max_keys, 64)));
}

// The tensor-core prefill and split-KV decode kernels are specialised for these head sizes; any
// other head_dim up to kMaxAnyHd runs attention_any_hd_kernel (float, no tensor cores).
bool fast_head_dim(int hd) { return hd == 32 || hd == 64 || hd == 128; }

void check_attention(const RaggedBatch& rb, int H, int G, int hd, int max_keys, int max_ctx, bool split_kv) {
  HM_CHECK(hd >= 1 && hd <= kMaxAnyHd, "cuda attention: head_dim must be in [1, ", kMaxAnyHd, "], got ", hd);
  HM_CHECK(G > 0 && H > 0 && H % G == 0, "cuda attention: n_heads ", H, " is not a multiple of n_kv_heads ", G);
  if (rb.max_len == 1 && split_kv && fast_head_dim(hd))
    HM_CHECK(H / G <= kMaxGroup, "cuda attention: the decode kernel takes at most ", kMaxGroup,
             " query heads per kv head, got ", H / G);
  HM_CHECK(max_keys >= 1 && max_keys <= max_ctx, "cuda attention: max_keys must be in [1, max_ctx ", max_ctx,
           "], got ", max_keys);
}

template <class T, class KV, int HD>
void attention_hd_lowp(T* out, int ldo, const T* q, int ldq, const KvPool<KV>& pool, const RaggedBatch& rb, int H,
                       int G, int max_keys, void* workspace, cudaStream_t stream, bool split_kv, const T* k_new,
                       const T* v_new, int ld_new) {
  const float scale_log2 = float(1.0 / std::sqrt(double(HD))) * kLog2e;
  if (rb.max_len == 1 && split_kv) {
    const int chunks = decode_chunks(rb, G, max_keys), chunk = ceil_div(max_keys, chunks);
    const int n_part = chunks * kDecodeWarps;
    float* part_acc = static_cast<float*>(workspace);
    float2* part_ml = reinterpret_cast<float2*>(part_acc + size_t(rb.nseq) * H * n_part * HD);
    const dim3 grid(chunks, G, rb.nseq);
    const int qpg = H / G;  // <= kMaxGroup (check_attention)
    if (qpg == 1)
      launch_pdl("attention decode", decode_split_kernel<T, KV, HD, 1>, grid, dim3(kDecodeThreads), stream, 0,
                 part_acc, part_ml, q, ldq, pool, rb.cu_seqlens, rb.slots, rb.pos0, H, G, chunk, scale_log2,
                 k_new, v_new, ld_new);
    else if (qpg == 2)
      launch_pdl("attention decode", decode_split_kernel<T, KV, HD, 2>, grid, dim3(kDecodeThreads), stream, 0,
                 part_acc, part_ml, q, ldq, pool, rb.cu_seqlens, rb.slots, rb.pos0, H, G, chunk, scale_log2,
                 k_new, v_new, ld_new);
    else if (qpg <= 4)
      launch_pdl("attention decode", decode_split_kernel<T, KV, HD, 4>, grid, dim3(kDecodeThreads), stream, 0,
                 part_acc, part_ml, q, ldq, pool, rb.cu_seqlens, rb.slots, rb.pos0, H, G, chunk, scale_log2,
                 k_new, v_new, ld_new);
    else
      launch_pdl("attention decode", decode_split_kernel<T, KV, HD, kMaxGroup>, grid, dim3(kDecodeThreads), stream, 0,
                 part_acc, part_ml, q, ldq, pool, rb.cu_seqlens, rb.slots, rb.pos0, H, G, chunk, scale_log2,
                 k_new, v_new, ld_new);
    launch_pdl("attention decode combine", decode_combine_kernel<T, HD>, dim3(H, rb.nseq), dim3(kCombineWarps * 32),
               stream, 0, out, ldo, part_acc, part_ml, rb.cu_seqlens, H, n_part);
    return;
  }
  constexpr int smem = prefill_smem_bytes<KV, HD>();
  if (smem > 48 * 1024)  // above the default limit (hd 128: 68 KB); per call, so every device gets it
    HM_CUDA_OK(cudaFuncSetAttribute(flash_prefill_kernel<T, KV, HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    smem),
               "attention prefill shared memory");
  flash_prefill_kernel<T, KV, HD><<<dim3(ceil_div(rb.max_len, kBq), H, rb.nseq), kPrefillThreads, smem, stream>>>(
      out, ldo, q, ldq, pool, rb.cu_seqlens, rb.slots, rb.pos0, H, G, scale_log2);
  HM_CUDA_LAUNCHED("attention prefill");
}

// ---- Plain float kernel: the float cache, and head sizes the fast kernels do not take ------------

// One block per (query row, query head), prefill and decode alike: each of 4 warps takes every
// 4th key with the lanes splitting the head dimension and keeps its own online softmax in float;
// the warps merge through shared memory. All float, q never rounded: so an f32 model matches
// the CPU's float attention to float rounding. O(keys) per row and no tensor cores: not a fast path.
constexpr int kF32Warps = 4;

// Any head_dim up to 32 PER (true-demo's 48, Hugging Face models' 80 or 96, and the float
// cache's 32, 64 or 128) from a cache of any type: lane l holds columns l, l + 32, ... below hd.
template <class T, class KV, int PER>
__global__ void __launch_bounds__(kF32Warps * 32)
    attention_any_hd_kernel(T* __restrict__ out, int ldo, const T* __restrict__ q, int ldq, KvPool<KV> pool,
                            const int32_t* __restrict__ cu, const int32_t* __restrict__ slots,
                            const int32_t* __restrict__ pos0, int nseq, int H, int G, int hd, float scale) {
  constexpr int kPer = PER;
  const int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int s = seq_of_row(cu, nseq, t);
  const int n_keys = min(pos0[s] + t - cu[s] + 1, pool.max_ctx);  // causal: keys 0..pos
  const int width = G * hd;
  const size_t head = size_t(slots[s]) * pool.slot_stride + size_t(h / (H / G)) * hd;
  float qv[kPer], acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = lane + 32 * i;
    qv[i] = c < hd ? to_f(q[size_t(t) * ldq + size_t(h) * hd + c]) : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j = warp; j < n_keys; j += kF32Warps) {
    const KV* kr = pool.k + head + size_t(j) * width;
    float d = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < hd) d += qv[i] * to_f(kr[lane + 32 * i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
    const float sc = d * scale, mn = fmaxf(m, sc);
    const float corr = expf(m - mn), p = expf(sc - mn);  // corr = 0 on the first key (m = -inf)
    l = l * corr + p;
    const KV* vr = pool.v + head + size_t(j) * width;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < hd) acc[i] = acc[i] * corr + p * to_f(vr[lane + 32 * i]);
    m = mn;
  }
  __shared__ float sm[kF32Warps], sl[kF32Warps], sacc[kF32Warps][32 * PER];
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) sacc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  if (warp != 0) return;
  float mx = -INFINITY;
  for (int w = 0; w < kF32Warps; ++w) mx = fmaxf(mx, sm[w]);
  float den = 0.f, num[kPer] = {};
  for (int w = 0; w < kF32Warps; ++w) {
    if (sm[w] == -INFINITY) continue;  // a warp with no key (fewer keys than warps)
    const float c = expf(sm[w] - mx);
    den += c * sl[w];
#pragma unroll
    for (int i = 0; i < kPer; ++i) num[i] += c * sacc[w][lane + 32 * i];
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i)
    if (lane + 32 * i < hd) out[size_t(t) * ldo + size_t(h) * hd + lane + 32 * i] = from_f<T>(num[i] / den);
}

template <class T, class KV, int HD>
void attention_hd(T* out, int ldo, const T* q, int ldq, const KvPool<KV>& pool, const RaggedBatch& rb, int H,
                  int G, int max_keys, void* workspace, cudaStream_t stream, bool split_kv, const T* k_new,
                  const T* v_new, int ld_new) {
  if constexpr (std::is_same_v<KV, float>) {
    attention_any_hd_kernel<T, KV, HD / 32><<<dim3(rb.n_tokens, H), kF32Warps * 32, 0, stream>>>(
        out, ldo, q, ldq, pool, rb.cu_seqlens, rb.slots, rb.pos0, rb.nseq, H, G, HD,
        float(1.0 / std::sqrt(double(HD))));
    HM_CUDA_LAUNCHED("attention (float cache)");
  } else {
    attention_hd_lowp<T, KV, HD>(out, ldo, q, ldq, pool, rb, H, G, max_keys, workspace, stream, split_kv, k_new, v_new,
                                 ld_new);
  }
}

}  // namespace

template <class T, class KV>
void kv_write(const KvPool<KV>& pool, const T* k, int ldk, const T* v, int ldv, const RaggedBatch& rb, int G,
              int hd, cudaStream_t stream) {
  HM_CHECK(G > 0 && hd > 0, "cuda kv_write: n_kv_heads ", G, " and head_dim ", hd, " must be positive");
  if (rb.n_tokens <= 0) return;
  const int width = G * hd;
  launch_pdl("kv_write", kv_write_kernel<T, KV>, dim3(rb.n_tokens, ceil_div(width, 128)), dim3(128), stream, 0, pool,
             k, ldk, v, ldv, rb.cu_seqlens, rb.slots, rb.pos0, rb.nseq, width);
}

bool attention_writes_kv(const RaggedBatch& rb, int hd, bool split_kv, bool cache_is_input_type) {
  return rb.max_len == 1 && rb.n_tokens == rb.nseq && split_kv && fast_head_dim(hd) && cache_is_input_type;
}

size_t attention_workspace_bytes(const RaggedBatch& rb, int H, int G, int hd, int max_keys, bool split_kv) {
  if (rb.max_len != 1 || !split_kv || rb.nseq <= 0 || G <= 0 || !fast_head_dim(hd)) return 0;
  const int chunks = decode_chunks(rb, G, std::max(max_keys, 1));
  return size_t(rb.nseq) * H * chunks * kDecodeWarps * (hd + 2) * sizeof(float);
}

template <class T, class KV>
void attention(T* out, int ldo, const T* q, int ldq, const KvPool<KV>& pool, const RaggedBatch& rb, int H, int G,
               int hd, int max_keys, void* workspace, cudaStream_t stream, bool split_kv, const T* k_new,
               const T* v_new, int ld_new) {
  check_attention(rb, H, G, hd, max_keys, pool.max_ctx, split_kv);
  HM_CHECK(k_new == nullptr || (v_new != nullptr &&
                                attention_writes_kv(rb, hd, split_kv, std::is_same_v<T, KV> && sizeof(KV) == 2) &&
                                ld_new % 8 == 0 && (reinterpret_cast<uintptr_t>(k_new) |
                                                    reinterpret_cast<uintptr_t>(v_new)) % 16 == 0),
           "cuda attention: new K/V rows only on a decode step's split-KV kernels, the cache of the input type, "
           "16-byte aligned rows (ld_new ", ld_new, ")");
  HM_CHECK((reinterpret_cast<uintptr_t>(pool.k) | reinterpret_cast<uintptr_t>(pool.v)) % 16 == 0 &&
               (pool.slot_stride * int64_t(sizeof(KV))) % 16 == 0,
           "cuda attention: the KV pool must be 16-byte aligned (slot_stride ", pool.slot_stride, ")");
  if (rb.nseq <= 0 || rb.n_tokens <= 0) return;
  if (!fast_head_dim(hd)) {
    attention_any_hd_kernel<T, KV, kMaxAnyHd / 32><<<dim3(rb.n_tokens, H), kF32Warps * 32, 0, stream>>>(
        out, ldo, q, ldq, pool, rb.cu_seqlens, rb.slots, rb.pos0, rb.nseq, H, G, hd,
        float(1.0 / std::sqrt(double(hd))));
    HM_CUDA_LAUNCHED("attention (any head_dim)");
    return;
  }
  HM_CHECK(rb.max_len != 1 || !split_kv || (std::is_same_v<KV, float>) ||
               (workspace != nullptr && reinterpret_cast<uintptr_t>(workspace) % 16 == 0),
           "cuda attention: decode needs attention_workspace_bytes of 16-byte aligned workspace");
  switch (hd) {
    case 32: attention_hd<T, KV, 32>(out, ldo, q, ldq, pool, rb, H, G, max_keys, workspace, stream, split_kv, k_new,
                                        v_new, ld_new);
      break;
    case 64: attention_hd<T, KV, 64>(out, ldo, q, ldq, pool, rb, H, G, max_keys, workspace, stream, split_kv, k_new,
                                        v_new, ld_new);
      break;
    default: attention_hd<T, KV, 128>(out, ldo, q, ldq, pool, rb, H, G, max_keys, workspace, stream, split_kv, k_new,
                                        v_new, ld_new);
      break;
  }
}

#define HM_INST_KV(T, KV)                                                                           \
  template void kv_write<T, KV>(const KvPool<KV>&, const T*, int, const T*, int, const RaggedBatch&, int, int, \
                                cudaStream_t);                                                      \
  template void attention<T, KV>(T*, int, const T*, int, const KvPool<KV>&, const RaggedBatch&, int, int, int, \
                                 int, void*, cudaStream_t, bool, const T*, const T*, int);
#define HM_INST(T) HM_INST_KV(T, __nv_bfloat16) HM_INST_KV(T, __half) HM_INST_KV(T, float)
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST
#undef HM_INST_KV

}  // namespace hm::cuda
