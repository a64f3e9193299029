// Flash-style causal GQA attention for training (grad.h): the forward that also writes lse, and
// the backward that recomputes P = exp(S - lse) tile by tile. Two families: tensor-core kernels
// for bf16/f16 at hd 64 and 128 (FlashAttention-2 style, the second half of this file), and
// float kernels on the CUDA cores for f32 and every other hd (32 x 32 tiles, 8 warps).
//
// Tile layout shared by the float kernels: a block owns 32 rows (queries in the forward and dq
// kernels, keys in the dk/dv kernel); warp w owns rows w, w + 8, w + 16, w + 24 and lane c the
// c-th column of the other tile, so each row's 32 scores sit in one warp (softmax by shuffles)
// and score c reaches every lane by __shfl_sync for the P.V-like products, where lane c then
// owns output dims c, c + 32, ... (NC chunks of 32, hd <= 32 NC). Shared tiles read by row
// from lanes are padded to hd + 1 floats a row (no bank conflicts for even hd).
#include <cuda_pipeline_primitives.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/grad.h"

namespace hm::cuda {
namespace {

constexpr int kTile = 32;
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = kTile / kWarps;  // 4
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Rows r0 .. r0 + 31 of a token-major matrix (row stride ld, columns c0 .. c0 + hd) into a
// shared [32][lds] float tile; rows at or past L are zeros (masked scores never read garbage).
template <class T>
__device__ void load_tile(float* dst, int lds, const T* __restrict__ src, int64_t ld, int start, int r0, int L,
                          int c0, int hd) {
  for (int e = threadIdx.x; e < kTile * hd; e += kThreads) {
    const int r = e / hd, d = e % hd, t = r0 + r;
    dst[r * lds + d] = t < L ? to_f(src[size_t(start + t) * size_t(ld) + c0 + d]) : 0.0f;
  }
}

// ---- Forward: block (query tile, head, sequence) ----
template <class T, int NC>
__global__ void __launch_bounds__(kThreads) attn_train_fwd_kernel(T* out, int ldo, float* lse, int ldl,
                                                                  const T* __restrict__ q, int ldq,
                                                                  const T* __restrict__ k, int ldk,
                                                                  const T* __restrict__ v, int ldv,
                                                                  const int32_t* __restrict__ cu, int group, int hd,
                                                                  float scale) {
  extern __shared__ float sm[];
  const int s = blockIdx.z, h = blockIdx.y, g = h / group;
  const int start = cu[s], L = cu[s + 1] - start, q0 = blockIdx.x * kTile;
  if (q0 >= L) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, ldp = hd + 1;
  float* Qs = sm;                // [32][hd], rows read as broadcasts
  float* Ks = Qs + kTile * hd;   // [32][hd + 1], row = lane
  float* Vs = Ks + kTile * ldp;  // [32][hd], read along dims
  load_tile(Qs, hd, q, ldq, start, q0, L, h * hd, hd);

  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][NC];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c2 = 0; c2 < NC; ++c2) o[i][c2] = 0.0f;
  }
  const int kend = min(L, q0 + kTile);  // causal: the tile's last query sees keys < q0 + 32
  for (int j0 = 0; j0 < kend; j0 += kTile) {
    __syncthreads();  // the previous tile's reads are done
    load_tile(Ks, ldp, k, ldk, start, j0, L, g * hd, hd);
    load_tile(Vs, hd, v, ldv, start, j0, L, g * hd, hd);
    __syncthreads();
    float sc[kRowsPerWarp] = {};
    for (int d = 0; d < hd; ++d) {
      const float kv = Ks[lane * ldp + d];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) sc[i] += Qs[(warp + kWarps * i) * hd + d] * kv;
    }
    const int j = j0 + lane;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int t = q0 + warp + kWarps * i;
      const float sv = (j <= t && t < L) ? sc[i] * scale : -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(sv));
      const float ms = m_new == -INFINITY ? 0.0f : m_new;  // a row with no key yet stays at zero
      const float p = expf(sv - ms), corr = expf(m[i] - ms);
      l[i] = l[i] * corr + warp_sum(p);
      m[i] = m_new;
#pragma unroll
      for (int c2 = 0; c2 < NC; ++c2) o[i][c2] *= corr;
      for (int c = 0; c < kTile; ++c) {
        const float pc = __shfl_sync(kFull, p, c);
#pragma unroll
        for (int c2 = 0; c2 < NC; ++c2) {
          const int dd = lane + 32 * c2;
          if (dd < hd) o[i][c2] += pc * Vs[c * hd + dd];
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int t = q0 + warp + kWarps * i;
    if (t >= L) continue;
    const float inv = 1.0f / l[i];
    T* orow = out + size_t(start + t) * ldo + size_t(h) * hd;
#pragma unroll
    for (int c2 = 0; c2 < NC; ++c2) {
      const int dd = lane + 32 * c2;
      if (dd < hd) orow[dd] = from_f<T>(o[i][c2] * inv);
    }
    if (lane == 0) lse[size_t(start + t) * ldl + h] = m[i] + logf(l[i]);
  }
}

// ---- Backward ----

// Dsum[t, h] = sum_d dout . out over head h of row t: one warp per (row, head).
template <class T>
__global__ void attn_bwd_dot_kernel(float* __restrict__ Dsum, const T* __restrict__ dout, int ldg,
                                    const T* __restrict__ out, int ldo, int n, int H, int hd) {
  const int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= int64_t(n) * H) return;  // uniform over the warp
  const int t = int(w / H), h = int(w % H);
  float acc = 0;
  for (int d = lane; d < hd; d += 32)
    acc += to_f(dout[size_t(t) * ldg + size_t(h) * hd + d]) * to_f(out[size_t(t) * ldo + size_t(h) * hd + d]);
  acc = warp_sum(acc);
  if (lane == 0) Dsum[w] = acc;
}

// dq: block (query tile, head, sequence); dq_t = scale sum_j dS_tj k_j, dS = P (dO.v_j - D_t).
template <class T, int NC>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(T* dq, int lddq, const T* __restrict__ dout, int ldg,
                                                               const T* __restrict__ q, int ldq,
                                                               const T* __restrict__ k, int ldk,
                                                               const T* __restrict__ v, int ldv,
                                                               const float* __restrict__ lse, int ldl,
                                                               const float* __restrict__ Dsum,
                                                               const int32_t* __restrict__ cu, int H, int group,
                                                               int hd, float scale) {
  extern __shared__ float sm[];
  const int s = blockIdx.z, h = blockIdx.y, g = h / group;
  const int start = cu[s], L = cu[s + 1] - start, q0 = blockIdx.x * kTile;
  if (q0 >= L) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, ldp = hd + 1;
  float* Qs = sm;                // [32][hd] broadcasts
  float* Gs = Qs + kTile * hd;   // [32][hd] broadcasts
  float* Ks = Gs + kTile * hd;   // [32][hd + 1]: row = lane for scores, along dims for dq
  float* Vs = Ks + kTile * ldp;  // [32][hd + 1]
  load_tile(Qs, hd, q, ldq, start, q0, L, h * hd, hd);
  load_tile(Gs, hd, dout, ldg, start, q0, L, h * hd, hd);

  float lse_r[kRowsPerWarp], D_r[kRowsPerWarp], acc[kRowsPerWarp][NC];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int t = q0 + warp + kWarps * i;
    lse_r[i] = t < L ? lse[size_t(start + t) * ldl + h] : 0.0f;
    D_r[i] = t < L ? Dsum[size_t(start + t) * H + h] : 0.0f;
#pragma unroll
    for (int c2 = 0; c2 < NC; ++c2) acc[i][c2] = 0.0f;
  }
  const int kend = min(L, q0 + kTile);
  for (int j0 = 0; j0 < kend; j0 += kTile) {
    __syncthreads();
    load_tile(Ks, ldp, k, ldk, start, j0, L, g * hd, hd);
    load_tile(Vs, ldp, v, ldv, start, j0, L, g * hd, hd);
    __syncthreads();
    float sc[kRowsPerWarp] = {}, dp[kRowsPerWarp] = {};
    for (int d = 0; d < hd; ++d) {
      const float kv = Ks[lane * ldp + d], vv = Vs[lane * ldp + d];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        sc[i] += Qs[(warp + kWarps * i) * hd + d] * kv;
        dp[i] += Gs[(warp + kWarps * i) * hd + d] * vv;
      }
    }
    const int j = j0 + lane;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int t = q0 + warp + kWarps * i;
      const float p = (j <= t && t < L) ? expf(sc[i] * scale - lse_r[i]) : 0.0f;
      const float ds = p * (dp[i] - D_r[i]);
      for (int c = 0; c < kTile; ++c) {
        const float dsc = __shfl_sync(kFull, ds, c);
#pragma unroll
        for (int c2 = 0; c2 < NC; ++c2) {
          const int dd = lane + 32 * c2;
          if (dd < hd) acc[i][c2] += dsc * Ks[c * ldp + dd];
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int t = q0 + warp + kWarps * i;
    if (t >= L) continue;
    T* row = dq + size_t(start + t) * lddq + size_t(h) * hd;
#pragma unroll
    for (int c2 = 0; c2 < NC; ++c2) {
      const int dd = lane + 32 * c2;
      if (dd < hd) row[dd] = from_f<T>(acc[i][c2] * scale);
    }
  }
}

// dk, dv: block (key tile, kv head, sequence), summing over the group's query heads and every
// query tile at or after the key tile, in order: dv_j = sum_t P_tj dO_t, dk_j = scale sum_t dS_tj q_t.
template <class T, int NC>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(T* dk, int lddk, T* dv, int lddv,
                                                                 const T* __restrict__ dout, int ldg,
                                                                 const T* __restrict__ q, int ldq,
                                                                 const T* __restrict__ k, int ldk,
                                                                 const T* __restrict__ v, int ldv,
                                                                 const float* __restrict__ lse, int ldl,
                                                                 const float* __restrict__ Dsum,
                                                                 const int32_t* __restrict__ cu, int H, int group,
                                                                 int hd, float scale) {
  extern __shared__ float sm[];
  const int s = blockIdx.z, g = blockIdx.y;
  const int start = cu[s], L = cu[s + 1] - start, k0 = blockIdx.x * kTile;
  if (k0 >= L) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, ldp = hd + 1;
  float* Ks = sm;                // [32][hd] broadcasts (key rows of this block)
  float* Vs = Ks + kTile * hd;   // [32][hd] broadcasts
  float* Qs = Vs + kTile * hd;   // [32][hd + 1]: row = lane (query) for scores, along dims for dk
  float* Gs = Qs + kTile * ldp;  // [32][hd + 1]
  load_tile(Ks, hd, k, ldk, start, k0, L, g * hd, hd);
  load_tile(Vs, hd, v, ldv, start, k0, L, g * hd, hd);

  float dka[kRowsPerWarp][NC], dva[kRowsPerWarp][NC];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int c2 = 0; c2 < NC; ++c2) dka[i][c2] = dva[i][c2] = 0.0f;

  for (int hh = 0; hh < group; ++hh) {
    const int h = g * group + hh;
    for (int q0 = k0; q0 < L; q0 += kTile) {  // queries before the key tile see none of it
      __syncthreads();
      load_tile(Qs, ldp, q, ldq, start, q0, L, h * hd, hd);
      load_tile(Gs, ldp, dout, ldg, start, q0, L, h * hd, hd);
      __syncthreads();
      const int t = q0 + lane;  // this lane's query
      const float lse_t = t < L ? lse[size_t(start + t) * ldl + h] : 0.0f;
      const float D_t = t < L ? Dsum[size_t(start + t) * H + h] : 0.0f;
      float sc[kRowsPerWarp] = {}, dp[kRowsPerWarp] = {};
      for (int d = 0; d < hd; ++d) {
        const float qv = Qs[lane * ldp + d], gv = Gs[lane * ldp + d];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          sc[i] += qv * Ks[(warp + kWarps * i) * hd + d];
          dp[i] += gv * Vs[(warp + kWarps * i) * hd + d];
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int j = k0 + warp + kWarps * i;  // this row's key
        const float p = (j <= t && t < L) ? expf(sc[i] * scale - lse_t) : 0.0f;
        const float ds = p * (dp[i] - D_t);
        for (int r = 0; r < kTile; ++r) {
          const float pr = __shfl_sync(kFull, p, r), dsr = __shfl_sync(kFull, ds, r);
#pragma unroll
          for (int c2 = 0; c2 < NC; ++c2) {
            const int dd = lane + 32 * c2;
            if (dd < hd) {
              dva[i][c2] += pr * Gs[r * ldp + dd];
              dka[i][c2] += dsr * Qs[r * ldp + dd];
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int j = k0 + warp + kWarps * i;
    if (j >= L) continue;
    T* krow = dk + size_t(start + j) * lddk + size_t(g) * hd;
    T* vrow = dv + size_t(start + j) * lddv + size_t(g) * hd;
#pragma unroll
    for (int c2 = 0; c2 < NC; ++c2) {
      const int dd = lane + 32 * c2;
      if (dd < hd) {
        krow[dd] = from_f<T>(dka[i][c2] * scale);
        vrow[dd] = from_f<T>(dva[i][c2]);
      }
    }
  }
}

// ---- Tensor-core kernels (bf16 / f16, hd 64 and 128) ------------------------------------------
//
// FlashAttention-2 style, on mma.sync m16n8k16 (16-bit in, float accumulate) with the fragment
// layouts of the inference prefill (attention.cu): a warp owns 16 rows of the block's own tile
// (queries in the forward and dq kernels, keys in the dk/dv kernel) and streams tiles of the
// other side through shared memory, double-buffered by 16-byte cp.async (plain loads when a
// tensor's address or row stride is not 16-byte aligned). Tiles sit row-major with rows padded
// by 8 elements (a fragment's 8 rows then hit distinct banks); operands whose reduction runs
// along the tile's rows come through ldmatrix.trans. Accumulators of one product become the A
// fragments of the next in place (P and dS, rounded to T as flash-attention does); softmax
// state, lse, D and every sum are float. Rows past a sequence's end are zero-filled and masked.
// Scores go to log2 units once (scale log2 e), so P = exp2(S c - lse log2 e).

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kTcWarps = 4;  // 16 rows each: 64-row tiles for the block's own side
constexpr int kTcThreads = 32 * kTcWarps;
constexpr int kTcRows = 16 * kTcWarps;

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ uint32_t lds32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Row `row` (rows >= L: zeros) of columns [c, c + 8) of a token-major matrix into 16 bytes of
// shared memory: asynchronous when `aligned` (the source is then 16-byte aligned), else eight
// 16-bit loads and one store. The caller commits.
template <class T>
__device__ __forceinline__ void copy8(T* dst, const T* __restrict__ src, bool valid, bool aligned) {
  if (!valid) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  } else if (aligned) {
    __pipeline_memcpy_async(dst, src, 16);
  } else {
    uint4 w;
    uint16_t* e = reinterpret_cast<uint16_t*>(&w);
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma unroll
    for (int u = 0; u < 8; ++u) e[u] = s[u];
    *reinterpret_cast<uint4*>(dst) = w;
  }
}

// A fragments of 16 rows (r0 .. r0 + 15) of a token-major matrix, columns h0 .. h0 + HD, straight
// from global memory (read once per block): register r of k-step kk holds row gid (+8 if r odd),
// columns kk 16 + 2 tig (+8 if r >= 2), +1. Rows at or past L are zeros.
template <class T, int HD>
__device__ __forceinline__ void load_afrag(uint32_t f[HD / 16][4], const T* __restrict__ x, int ld, int row0, int r0,
                                           int L, int c0, int gid, int tig) {
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = r0 + gid + (r & 1) * 8, col = kk * 16 + 2 * tig + (r >> 1) * 8;
      float a = 0.f, b = 0.f;
      if (row < L) {
        const T* p = x + size_t(row0 + row) * size_t(ld) + c0 + col;
        a = to_f(p[0]);
        b = to_f(p[1]);
      }
      f[kk][r] = pack2<T>(a, b);
    }
}

// acc[n] (16 rows x 8 columns each, NB of them) += A (16 x HD, fragments a) . B^T where B's rows
// n 8 .. n 8 + 7 lie row-major in shared memory (row stride KP): S = Q K^T and dP = dO V^T.
template <class T, int HD, int NB, int KP>
__device__ __forceinline__ void mma_abt(float acc[NB][4], const uint32_t a[HD / 16][4], const T* b_rows, int gid,
                                        int tig) {
#pragma unroll
  for (int n = 0; n < NB; ++n) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      const T* p = b_rows + (n * 8 + gid) * KP + kk * 16 + 2 * tig;
      const uint32_t b[2] = {lds32(p), lds32(p + 8)};
      mma16816<T>(acc[n], a[kk], b);
    }
  }
}

// acc[n] (16 x HD) += P (16 x NK, float accumulators of NK / 8 blocks, rounded to T) . B, where
// B's NK rows (the reduction) lie row-major in shared memory: O += P V, dV += P^T dO, dK +=
// dS^T Q, dQ += dS K. Accumulator blocks 2j and 2j + 1 are the A fragment of k-step j.
template <class T, int HD, int NK, int KP>
__device__ __forceinline__ void mma_pb(float acc[HD / 8][4], const float p[NK / 8][4], const T* b_rows, int lane) {
#pragma unroll
  for (int j = 0; j < NK / 16; ++j) {
    const uint32_t a[4] = {pack2<T>(p[2 * j][0], p[2 * j][1]), pack2<T>(p[2 * j][2], p[2 * j][3]),
                           pack2<T>(p[2 * j + 1][0], p[2 * j + 1][1]), pack2<T>(p[2 * j + 1][2], p[2 * j + 1][3])};
    // Lane t addresses row j 16 + t % 16, columns n 8 + (t / 16) 8: matrices 0 and 1 are rows
    // 0-7 and 8-15 of column block n, 2 and 3 the same rows of block n + 1.
#pragma unroll
    for (int n = 0; n < HD / 8; n += 2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_rows + (j * 16 + (lane & 15)) * KP + n * 8 + (lane >> 4) * 8);
      mma16816<T>(acc[n], a, b);
      mma16816<T>(acc[n + 1], a, b + 2);
    }
  }
}

// Forward: block (tile of 64 query rows, head, sequence), the latest tiles first; tiles of BK
// keys. out and lse as the float kernel's.
template <class T, int HD, int BK>
__global__ void __launch_bounds__(kTcThreads) attn_fwd_tc_kernel(T* __restrict__ out, int ldo, float* __restrict__ lse,
                                                                 int ldl, const T* __restrict__ q, int ldq,
                                                                 const T* __restrict__ k, int ldk,
                                                                 const T* __restrict__ v, int ldv,
                                                                 const int32_t* __restrict__ cu, int group,
                                                                 float scale_log2, bool aligned) {
  constexpr int KP = HD + 8, kTileElems = BK * KP;
  extern __shared__ __align__(16) unsigned char tc_smem[];
  T* const ks = reinterpret_cast<T*>(tc_smem);  // [2][BK][KP]
  T* const vs = ks + 2 * kTileElems;             // [2][BK][KP]

  const int h = blockIdx.x, s = blockIdx.y, g = h / group;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  const int r0 = (gridDim.z - 1 - blockIdx.z) * kTcRows;
  if (r0 >= L) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int wr = r0 + warp * 16;
  const bool warp_live = wr < L;

  uint32_t qf[HD / 16][4];
  load_afrag<T, HD>(qf, q, ldq, row0, wr, L, h * HD, gid, tig);
  float o[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows gid, gid + 8; log2 units

  const int last_key = min(r0 + kTcRows, L) - 1;
  const T* kb = k + size_t(row0) * size_t(ldk) + size_t(g) * HD;
  const T* vb = v + size_t(row0) * size_t(ldv) + size_t(g) * HD;
  auto stage = [&](int buf, int k0) {
    for (int i = threadIdx.x; i < BK * (HD / 8); i += kTcThreads) {
      const int r = i / (HD / 8), c = (i % (HD / 8)) * 8, key = k0 + r;
      const bool ok = key <= last_key;
      copy8(ks + buf * kTileElems + r * KP + c, kb + size_t(ok ? key : 0) * size_t(ldk) + c, ok, aligned);
      copy8(vs + buf * kTileElems + r * KP + c, vb + size_t(ok ? key : 0) * size_t(ldv) + c, ok, aligned);
    }
    __pipeline_commit();
  };
  const int n_tiles = last_key / BK + 1;
  stage(0, 0);
  for (int it = 0; it < n_tiles; ++it) {
    const int k0 = it * BK, buf = it & 1;
    if (it + 1 < n_tiles) stage(buf ^ 1, k0 + BK);
    else __pipeline_commit();  // one group per iteration: waiting for all but the newest = this tile
    __pipeline_wait_prior(1);
    __syncthreads();
    if (warp_live && k0 <= wr + 15) {  // else the whole tile is in this warp's future
      const T* kt = ks + buf * kTileElems;
      const T* vt = vs + buf * kTileElems;
      float sc[BK / 8][4];
#pragma unroll
      for (int n = 0; n < BK / 8; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
      mma_abt<T, HD, BK / 8, KP>(sc, qf, kt, gid, tig);
      // Element e of block n: row gid + 8 (e >= 2), key n 8 + 2 tig + (e & 1).
      const bool need_mask = k0 + BK - 1 > wr;
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < BK / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = sc[n][e] * scale_log2;
          if (need_mask && k0 + n * 8 + 2 * tig + (e & 1) > wr + gid + (e >> 1) * 8) x = -INFINITY;
          sc[n][e] = x;
          mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
      // Key 0 is in every row's past and in the first tile, so m is finite from then on.
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 2));
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
      for (int n = 0; n < BK / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[n][e] = exp2f(sc[n][e] - m[e >> 1]);
          l[e >> 1] += sc[n][e];
        }
      mma_pb<T, HD, BK, KP>(o, sc, vt, lane);
    }
    __syncthreads();  // the stage read here is refilled next iteration
  }
  if (!warp_live) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFull, l[r], 1);
    l[r] += __shfl_xor_sync(kFull, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wr + gid + r * 8;
    if (row >= L) continue;
    const float inv = 1.f / l[r];
    T* op = out + size_t(row0 + row) * size_t(ldo) + size_t(h) * HD + 2 * tig;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      op[n * 8] = from_f<T>(o[n][2 * r] * inv);
      op[n * 8 + 1] = from_f<T>(o[n][2 * r + 1] * inv);
    }
    if (tig == 0) lse[size_t(row0 + row) * size_t(ldl) + h] = (m[r] + log2f(l[r])) * kLn2;
  }
}

// dq: block (tile of 64 query rows, head, sequence), the latest tiles first; tiles of BK keys.
// Per key tile: S = Q K^T, dP = dO V^T, dS = P (dP - D), dQ += dS K; dq = scale dQ.
template <class T, int HD, int BK>
__global__ void __launch_bounds__(kTcThreads) attn_bwd_dq_tc_kernel(
    T* __restrict__ dq, int lddq, const T* __restrict__ dout, int ldg, const T* __restrict__ q, int ldq,
    const T* __restrict__ k, int ldk, const T* __restrict__ v, int ldv, const float* __restrict__ lse, int ldl,
    const float* __restrict__ Dsum, const int32_t* __restrict__ cu, int H, int group, float scale, bool aligned) {
  constexpr int KP = HD + 8, kTileElems = BK * KP;
  extern __shared__ __align__(16) unsigned char tc_smem[];
  T* const ks = reinterpret_cast<T*>(tc_smem);  // [2][BK][KP]
  T* const vs = ks + 2 * kTileElems;             // [2][BK][KP]

  const int h = blockIdx.x, s = blockIdx.y, g = h / group;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  const int r0 = (gridDim.z - 1 - blockIdx.z) * kTcRows;
  if (r0 >= L) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int wr = r0 + warp * 16;
  const bool warp_live = wr < L;
  const float scale_log2 = scale * kLog2e;

  uint32_t qf[HD / 16][4], gf[HD / 16][4];
  load_afrag<T, HD>(qf, q, ldq, row0, wr, L, h * HD, gid, tig);
  load_afrag<T, HD>(gf, dout, ldg, row0, wr, L, h * HD, gid, tig);
  float lse2[2], Dr[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wr + gid + r * 8;
    lse2[r] = row < L ? lse[size_t(row0 + row) * size_t(ldl) + h] * kLog2e : 0.f;
    Dr[r] = row < L ? Dsum[size_t(row0 + row) * size_t(H) + h] : 0.f;
  }
  float acc[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  const int last_key = min(r0 + kTcRows, L) - 1;
  const T* kb = k + size_t(row0) * size_t(ldk) + size_t(g) * HD;
  const T* vb = v + size_t(row0) * size_t(ldv) + size_t(g) * HD;
  auto stage = [&](int buf, int k0) {
    for (int i = threadIdx.x; i < BK * (HD / 8); i += kTcThreads) {
      const int r = i / (HD / 8), c = (i % (HD / 8)) * 8, key = k0 + r;
      const bool ok = key <= last_key;
      copy8(ks + buf * kTileElems + r * KP + c, kb + size_t(ok ? key : 0) * size_t(ldk) + c, ok, aligned);
      copy8(vs + buf * kTileElems + r * KP + c, vb + size_t(ok ? key : 0) * size_t(ldv) + c, ok, aligned);
    }
    __pipeline_commit();
  };
  const int n_tiles = last_key / BK + 1;
  stage(0, 0);
  for (int it = 0; it < n_tiles; ++it) {
    const int k0 = it * BK, buf = it & 1;
    if (it + 1 < n_tiles) stage(buf ^ 1, k0 + BK);
    else __pipeline_commit();
    __pipeline_wait_prior(1);
    __syncthreads();
    if (warp_live && k0 <= wr + 15) {
      const T* kt = ks + buf * kTileElems;
      const T* vt = vs + buf * kTileElems;
      float sc[BK / 8][4], dp[BK / 8][4];
#pragma unroll
      for (int n = 0; n < BK / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[n][e] = dp[n][e] = 0.f;
      mma_abt<T, HD, BK / 8, KP>(sc, qf, kt, gid, tig);
      mma_abt<T, HD, BK / 8, KP>(dp, gf, vt, gid, tig);
      const bool need_mask = k0 + BK - 1 > wr;
#pragma unroll
      for (int n = 0; n < BK / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float p = exp2f(sc[n][e] * scale_log2 - lse2[r]);
          if (need_mask && k0 + n * 8 + 2 * tig + (e & 1) > wr + gid + r * 8) p = 0.f;
          sc[n][e] = p * (dp[n][e] - Dr[r]);  // dS
        }
      mma_pb<T, HD, BK, KP>(acc, sc, kt, lane);
    }
    __syncthreads();
  }
  if (!warp_live) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wr + gid + r * 8;
    if (row >= L) continue;
    T* op = dq + size_t(row0 + row) * size_t(lddq) + size_t(h) * HD + 2 * tig;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      op[n * 8] = from_f<T>(acc[n][2 * r] * scale);
      op[n * 8 + 1] = from_f<T>(acc[n][2 * r + 1] * scale);
    }
  }
}

// dk, dv: block (tile of 64 keys, kv head, sequence), the earliest (longest) tiles first. It
// walks the group's query heads in order and, for each, the query tiles of BQ rows from the key
// tile on, in order (Q, dO, lse and D double-buffered): S^T = K Q^T, P^T = exp2(S^T c - lse),
// dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q; dk = scale dK.
template <class T, int HD, int BQ>
__global__ void __launch_bounds__(kTcThreads) attn_bwd_dkdv_tc_kernel(
    T* __restrict__ dk, int lddk, T* __restrict__ dv, int lddv, const T* __restrict__ dout, int ldg,
    const T* __restrict__ q, int ldq, const T* __restrict__ k, int ldk, const T* __restrict__ v, int ldv,
    const float* __restrict__ lse, int ldl, const float* __restrict__ Dsum, const int32_t* __restrict__ cu, int H,
    int group, float scale, bool aligned) {
  constexpr int KP = HD + 8, kKeyElems = kTcRows * KP, kQElems = BQ * KP;
  extern __shared__ __align__(16) unsigned char tc_smem[];
  T* const ks = reinterpret_cast<T*>(tc_smem);  // [kTcRows][KP]
  T* const vs = ks + kKeyElems;                  // [kTcRows][KP]
  T* const qs = vs + kKeyElems;                  // [2][BQ][KP]
  T* const gs = qs + 2 * kQElems;                // [2][BQ][KP] (dO)
  float* const ls = reinterpret_cast<float*>(gs + 2 * kQElems);  // [2][BQ]: lse log2 e
  float* const ds = ls + 2 * BQ;                                  // [2][BQ]: D

  const int g = blockIdx.x, s = blockIdx.y;
  const int row0 = cu[s], L = cu[s + 1] - row0;
  const int k0 = blockIdx.z * kTcRows;
  if (k0 >= L) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int kw = k0 + warp * 16;  // this warp's first key
  const bool warp_live = kw < L;
  const float scale_log2 = scale * kLog2e;

  // The block's keys (rows past L zeros), in the first commit group.
  for (int i = threadIdx.x; i < kTcRows * (HD / 8); i += kTcThreads) {
    const int r = i / (HD / 8), c = (i % (HD / 8)) * 8, key = k0 + r;
    const bool ok = key < L;
    const size_t at = size_t(row0 + (ok ? key : 0));
    copy8(ks + r * KP + c, k + at * size_t(ldk) + size_t(g) * HD + c, ok, aligned);
    copy8(vs + r * KP + c, v + at * size_t(ldv) + size_t(g) * HD + c, ok, aligned);
  }
  const int nqt = ceil_div(L - k0, BQ), total = group * nqt;
  auto stage = [&](int buf, int step) {
    const int h = g * group + step / nqt, q0 = k0 + (step % nqt) * BQ;
    for (int i = threadIdx.x; i < BQ * (HD / 8); i += kTcThreads) {
      const int r = i / (HD / 8), c = (i % (HD / 8)) * 8, t = q0 + r;
      const bool ok = t < L;
      const size_t at = size_t(row0 + (ok ? t : 0));
      copy8(qs + buf * kQElems + r * KP + c, q + at * size_t(ldq) + size_t(h) * HD + c, ok, aligned);
      copy8(gs + buf * kQElems + r * KP + c, dout + at * size_t(ldg) + size_t(h) * HD + c, ok, aligned);
    }
    for (int r = threadIdx.x; r < BQ; r += kTcThreads) {
      const int t = q0 + r;
      ls[buf * BQ + r] = t < L ? lse[size_t(row0 + t) * size_t(ldl) + h] * kLog2e : 0.f;
      ds[buf * BQ + r] = t < L ? Dsum[size_t(row0 + t) * size_t(H) + h] : 0.f;
    }
    __pipeline_commit();
  };

  float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dka[n][e] = dva[n][e] = 0.f;

  stage(0, 0);
  for (int it = 0; it < total; ++it) {
    const int buf = it & 1, q0 = k0 + (it % nqt) * BQ;
    if (it + 1 < total) stage(buf ^ 1, it + 1);
    else __pipeline_commit();
    __pipeline_wait_prior(1);
    __syncthreads();
    if (warp_live && q0 + BQ - 1 >= kw) {  // else every query of the tile precedes this warp's keys
      const T* qt = qs + buf * kQElems;
      const T* gt = gs + buf * kQElems;
      const float* lt = ls + buf * BQ;
      const float* dt = ds + buf * BQ;
      // The warp's 16 keys (and values) as A fragments, from shared memory.
      uint32_t af[HD / 16][4];
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        const T* p = ks + (warp * 16 + gid) * KP + kk * 16 + 2 * tig;
        af[kk][0] = lds32(p);
        af[kk][1] = lds32(p + 8 * KP);
        af[kk][2] = lds32(p + 8);
        af[kk][3] = lds32(p + 8 * KP + 8);
      }
      float st[BQ / 8][4];
#pragma unroll
      for (int n = 0; n < BQ / 8; ++n) st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.f;
      mma_abt<T, HD, BQ / 8, KP>(st, af, qt, gid, tig);
      // P^T: element e of block n is key kw + gid + 8 (e >= 2), query q0 + n 8 + 2 tig + (e & 1).
      const bool need_mask = q0 < kw + 15 || q0 + BQ > L;
#pragma unroll
      for (int n = 0; n < BQ / 8; ++n) {
        const float2 l2 = *reinterpret_cast<const float2*>(lt + n * 8 + 2 * tig);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = q0 + n * 8 + 2 * tig + (e & 1);
          float p = exp2f(st[n][e] * scale_log2 - ((e & 1) ? l2.y : l2.x));
          if (need_mask && (qi < kw + gid + (e >> 1) * 8 || qi >= L)) p = 0.f;
          st[n][e] = p;
        }
      }
      mma_pb<T, HD, BQ, KP>(dva, st, gt, lane);
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        const T* p = vs + (warp * 16 + gid) * KP + kk * 16 + 2 * tig;
        af[kk][0] = lds32(p);
        af[kk][1] = lds32(p + 8 * KP);
        af[kk][2] = lds32(p + 8);
        af[kk][3] = lds32(p + 8 * KP + 8);
      }
      float dpt[BQ / 8][4];
#pragma unroll
      for (int n = 0; n < BQ / 8; ++n) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
      mma_abt<T, HD, BQ / 8, KP>(dpt, af, gt, gid, tig);
#pragma unroll
      for (int n = 0; n < BQ / 8; ++n) {
        const float2 d2 = *reinterpret_cast<const float2*>(dt + n * 8 + 2 * tig);
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[n][e] = st[n][e] * (dpt[n][e] - ((e & 1) ? d2.y : d2.x));  // dS^T
      }
      mma_pb<T, HD, BQ, KP>(dka, dpt, qt, lane);
    }
    __syncthreads();
  }
  if (!warp_live) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = kw + gid + r * 8;
    if (key >= L) continue;
    T* kp = dk + size_t(row0 + key) * size_t(lddk) + size_t(g) * HD + 2 * tig;
    T* vp = dv + size_t(row0 + key) * size_t(lddv) + size_t(g) * HD + 2 * tig;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      kp[n * 8] = from_f<T>(dka[n][2 * r] * scale);
      kp[n * 8 + 1] = from_f<T>(dka[n][2 * r + 1] * scale);
      vp[n * 8] = from_f<T>(dva[n][2 * r]);
      vp[n * 8 + 1] = from_f<T>(dva[n][2 * r + 1]);
    }
  }
}

// Tile shapes: the forward streams 64 keys a tile; the backward kernels, which hold two score
// tiles and (dk/dv) two output tiles, stream 64 rows at hd 64 and 32 at hd 128 (registers).
constexpr int kTcFwdKeys = 64;
template <int HD> constexpr int tc_bwd_tile() { return HD <= 64 ? 64 : 32; }
template <class T, int HD> constexpr size_t tc_fwd_smem() { return 2 * 2 * size_t(kTcFwdKeys) * (HD + 8) * sizeof(T); }
template <class T, int HD> constexpr size_t tc_dq_smem() { return 2 * 2 * size_t(tc_bwd_tile<HD>()) * (HD + 8) * sizeof(T); }
template <class T, int HD>
constexpr size_t tc_dkdv_smem() {
  return (2 * size_t(kTcRows) + 4 * size_t(tc_bwd_tile<HD>())) * (HD + 8) * sizeof(T) +
         4 * size_t(tc_bwd_tile<HD>()) * sizeof(float);
}

bool aligned16(const void* p, int ld, size_t elem) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (size_t(ld) * elem) % 16 == 0;
}

// Shared memory of the kernels: forward 32 (3 hd + 1) floats, backward 32 (4 hd + 2).
size_t fwd_smem(int hd) { return sizeof(float) * kTile * size_t(3 * hd + 1); }
size_t bwd_smem(int hd) { return sizeof(float) * kTile * size_t(4 * hd + 2); }

// Calls f with the dims-per-lane chunk count NC for hd (hd <= 32 NC).
template <class F>
void dispatch_nc(int hd, F&& f) {
  if (hd <= 64) f(std::integral_constant<int, 2>{});
  else if (hd <= 128) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

template <class... P, class... A>
void launch(const char* op, void (*kernel)(P...), dim3 grid, size_t smem, cudaStream_t stream, A... args) {
  HM_CUDA_OK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), op);
  kernel<<<grid, kThreads, smem, stream>>>(args...);
  HM_CUDA_LAUNCHED(op);
}
template <class... P, class... A>
void launch_tc(const char* op, void (*kernel)(P...), dim3 grid, size_t smem, cudaStream_t stream, A... args) {
  // Above the default 48 KB (hd 64's dk/dv: 56 KB; hd 128's forward and dk/dv: 70 KB). Set on
  // every call, so every device of the process gets it.
  HM_CUDA_OK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), op);
  kernel<<<grid, kTcThreads, smem, stream>>>(args...);
  HM_CUDA_LAUNCHED(op);
}

// Calls f with the tensor-core head size for hd (64 or 128) and returns true; false for T =
// float and every other hd (the float kernels then run).
template <class T, class F>
bool dispatch_tc(int hd, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    (void)hd;
    (void)f;
    return false;
  } else {
    if (hd == 64) f(std::integral_constant<int, 64>{});
    else if (hd == 128) f(std::integral_constant<int, 128>{});
    else return false;
    return true;
  }
}

void check_shape(const char* op, const RaggedBatch& rb, int H, int G, int hd) {
  HM_CHECK(hd >= 1 && hd <= kMaxTrainHeadDim, "cuda ", op, ": head_dim must be in [1, ", kMaxTrainHeadDim,
           "], got ", hd);
  HM_CHECK(H > 0 && G > 0 && H % G == 0 && H <= 65535, "cuda ", op, ": ", H, " heads and ", G, " kv heads");
  HM_CHECK(rb.nseq <= 65535, "cuda ", op, ": ", rb.nseq, " sequences in one batch (at most 65535)");
  HM_CHECK(rb.max_len <= 65535 * kTile, "cuda ", op, ": a sequence of ", rb.max_len, " rows (at most ",
           65535 * kTile, ")");
}

}  // namespace

size_t attention_backward_workspace_bytes(int n_tokens, int H) {
  return sizeof(float) * size_t(std::max(n_tokens, 0)) * size_t(std::max(H, 0));
}

template <class T>
void attention_train(T* out, int ldo, float* lse, int ldl, const T* q, int ldq, const T* k, int ldk, const T* v,
                     int ldv, const RaggedBatch& rb, int H, int G, int hd, cudaStream_t stream) {
  check_shape("attention_train", rb, H, G, hd);
  if (rb.n_tokens <= 0 || rb.max_len <= 0) return;
  const float scale = float(1.0 / std::sqrt(double(hd)));
  const bool aligned = aligned16(k, ldk, sizeof(T)) && aligned16(v, ldv, sizeof(T));
  if (dispatch_tc<T>(hd, [&](auto hdc) {
        constexpr int HD = decltype(hdc)::value;
        launch_tc("attention_train", attn_fwd_tc_kernel<T, HD, kTcFwdKeys>,
                  dim3(H, rb.nseq, ceil_div(rb.max_len, kTcRows)), tc_fwd_smem<T, HD>(), stream, out, ldo, lse, ldl,
                  q, ldq, k, ldk, v, ldv, rb.cu_seqlens, H / G, scale * kLog2e, aligned);
      }))
    return;
  const dim3 grid(ceil_div(rb.max_len, kTile), H, rb.nseq);
  dispatch_nc(hd, [&](auto nc) {
    launch("attention_train", attn_train_fwd_kernel<T, decltype(nc)::value>, grid, fwd_smem(hd), stream, out, ldo,
           lse, ldl, q, ldq, k, ldk, v, ldv, rb.cu_seqlens, H / G, hd, scale);
  });
}

template <class T>
void attention_backward(T* dq, int lddq, T* dk, int lddk, T* dv, int lddv, const T* dout, int ldg, const T* q,
                        int ldq, const T* k, int ldk, const T* v, int ldv, const T* out, int ldo, const float* lse,
                        int ldl, const RaggedBatch& rb, int H, int G, int hd, void* workspace, cudaStream_t stream) {
  check_shape("attention_backward", rb, H, G, hd);
  if (rb.n_tokens <= 0 || rb.max_len <= 0) return;
  auto* Dsum = static_cast<float*>(workspace);
  const float scale = float(1.0 / std::sqrt(double(hd)));
  const int64_t dot_blocks = (int64_t(rb.n_tokens) * H + kWarps - 1) / kWarps;  // a warp per (row, head)
  HM_CHECK(dot_blocks <= INT32_MAX, "cuda attention_backward: ", rb.n_tokens, " rows of ", H, " heads are too many");
  attn_bwd_dot_kernel<T><<<unsigned(dot_blocks), kThreads, 0, stream>>>(Dsum, dout, ldg, out, ldo, rb.n_tokens, H, hd);
  HM_CUDA_LAUNCHED("attention_backward (D)");
  const bool aligned = aligned16(q, ldq, sizeof(T)) && aligned16(k, ldk, sizeof(T)) &&
                       aligned16(v, ldv, sizeof(T)) && aligned16(dout, ldg, sizeof(T));
  if (dispatch_tc<T>(hd, [&](auto hdc) {
        constexpr int HD = decltype(hdc)::value;
        constexpr int BT = tc_bwd_tile<HD>();
        const int tiles64 = ceil_div(rb.max_len, kTcRows);
        launch_tc("attention_backward (dk, dv)", attn_bwd_dkdv_tc_kernel<T, HD, BT>, dim3(G, rb.nseq, tiles64),
                  tc_dkdv_smem<T, HD>(), stream, dk, lddk, dv, lddv, dout, ldg, q, ldq, k, ldk, v, ldv, lse, ldl,
                  static_cast<const float*>(Dsum), rb.cu_seqlens, H, H / G, scale, aligned);
        launch_tc("attention_backward (dq)", attn_bwd_dq_tc_kernel<T, HD, BT>, dim3(H, rb.nseq, tiles64),
                  tc_dq_smem<T, HD>(), stream, dq, lddq, dout, ldg, q, ldq, k, ldk, v, ldv, lse, ldl,
                  static_cast<const float*>(Dsum), rb.cu_seqlens, H, H / G, scale, aligned);
      }))
    return;
  const int tiles = ceil_div(rb.max_len, kTile);
  dispatch_nc(hd, [&](auto nc) {
    constexpr int NC = decltype(nc)::value;
    launch("attention_backward (dk, dv)", attn_bwd_dkdv_kernel<T, NC>, dim3(tiles, G, rb.nseq), bwd_smem(hd), stream,
           dk, lddk, dv, lddv, dout, ldg, q, ldq, k, ldk, v, ldv, lse, ldl, static_cast<const float*>(Dsum), rb.cu_seqlens, H,
           H / G, hd, scale);
    launch("attention_backward (dq)", attn_bwd_dq_kernel<T, NC>, dim3(tiles, H, rb.nseq), bwd_smem(hd), stream, dq,
           lddq, dout, ldg, q, ldq, k, ldk, v, ldv, lse, ldl, static_cast<const float*>(Dsum), rb.cu_seqlens, H, H / G, hd,
           scale);
  });
}

#define HM_INST(T)                                                                                               \
  template void attention_train<T>(T*, int, float*, int, const T*, int, const T*, int, const T*, int,             \
                                   const RaggedBatch&, int, int, int, cudaStream_t);                             \
  template void attention_backward<T>(T*, int, T*, int, T*, int, const T*, int, const T*, int, const T*, int,     \
                                      const T*, int, const T*, int, const float*, int, const RaggedBatch&, int, int, \
                                      int, void*, cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST

}  // namespace hm::cuda
