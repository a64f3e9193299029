// Flash-style causal GQA attention for training (grad.h): the forward that also writes lse, and
// the backward that recomputes P = exp(S - lse) tile by tile. Float math on the CUDA cores
// (correct first; tensor cores are a later step), 32 x 32 tiles in shared memory, 8 warps.
//
// Tile layout shared by the kernels: a block owns 32 rows (queries in the forward and dq
// kernels, keys in the dk/dv kernel); warp w owns rows w, w + 8, w + 16, w + 24 and lane c the
// c-th column of the other tile, so each row's 32 scores sit in one warp (softmax by shuffles)
// and score c reaches every lane by __shfl_sync for the P.V-like products, where lane c then
// owns output dims c, c + 32, ... (NC chunks of 32, hd <= 32 NC). Shared tiles read by row
// from lanes are padded to hd + 1 floats a row (no bank conflicts for even hd).
#include <algorithm>
#include <climits>
#include <cmath>
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

void check_shape(const char* op, const RaggedBatch& rb, int H, int G, int hd) {
  HM_CHECK(hd >= 1 && hd <= kMaxTrainHeadDim, "cuda ", op, ": head_dim must be in [1, ", kMaxTrainHeadDim,
           "], got ", hd);
  HM_CHECK(H > 0 && G > 0 && H % G == 0 && H <= 65535, "cuda ", op, ": ", H, " heads and ", G, " kv heads");
  HM_CHECK(rb.nseq <= 65535, "cuda ", op, ": ", rb.nseq, " sequences in one batch (at most 65535)");
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
