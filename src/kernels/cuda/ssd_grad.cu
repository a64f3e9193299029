// Mamba-2 training on CUDA: the SSD scan from a zero state (chunked, below; or the inference
// kernel over a zeroed pool), its backward and the gated RMSNorm's backward.
//
// Two backwards, one block per (sequence, head) each (the chunked one: per segment of a sequence,
// when few sequences would leave SMs idle). The chunked one (below) is the fast one: per chunk of
// kQ tokens a few register-tiled matrix products in shared memory, in float. The first one
// walks the tokens in order in doubles (ref::grad::ssd_scan_backward's sums, the states
// recomputed per chunk of kChunk tokens from checkpoints): each thread owns a fixed set of the
// head's P x N state elements, and the sums over channels and states of each token are block
// reductions in a fixed order. It is the device-side check of the chunked one, and runs shapes
// whose chunked shared memory would not fit. In both, dB and dC (summed over a group's heads)
// and the per-head parameter sums (over sequences and segments) are written per head or per block and added
// in order by two small kernels, so every result is deterministic. Workspace:
// ssd_backward_workspace_bytes.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/reduce.cuh"

namespace hm::cuda {
namespace {

constexpr int kChunk = 32;     // tokens recomputed from one checkpoint
constexpr int kThreads = 256;  // per block

// The per-(sequence, head) scratch, in doubles, laid out from the block's base.
struct SsdScratch {
  int64_t PN, nch, max_len;
  __host__ __device__ int64_t ck() const { return 0; }                         // [nch][PN]
  __host__ __device__ int64_t S() const { return nch * PN; }                  // [kChunk + 1][PN]
  __host__ __device__ int64_t G() const { return S() + (kChunk + 1) * PN; }   // [PN] dL/dS carried
  __host__ __device__ int64_t Gn() const { return G() + PN; }                 // [PN] this token's dL/dS_t
  __host__ __device__ int64_t delta() const { return Gn() + PN; }             // [max_len]
  __host__ __device__ int64_t ddu() const { return delta() + max_len; }       // [max_len]
  __host__ __device__ int64_t decay() const { return ddu() + max_len; }       // [max_len]
  __host__ __device__ int64_t size() const { return decay() + max_len; }
};

__device__ double block_sum_d(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (int(threadIdx.x) < o) red[threadIdx.x] += red[threadIdx.x + o];
    __syncthreads();
  }
  const double r = red[0];
  __syncthreads();
  return r;
}

// Grid (H, the sequences of a slice): block (h, y) takes sequence seq0 + y and the slice's
// scratch y. part_bc [n_tokens, H, 2, N] float: per token and head, gB then gC summed over the
// head's channels; part_p [nseq, H, 3] double: ddt_bias, dA_log, dD of the sequence.
template <class T>
__global__ void __launch_bounds__(kThreads) ssd_backward_kernel(
    T* __restrict__ dx, int lddx, T* __restrict__ ddt, int lddt_out, float* __restrict__ part_bc,
    double* __restrict__ part_p, const T* __restrict__ dy, int lddy, const T* __restrict__ x, int ldx,
    const T* __restrict__ dt, int lddt, const T* __restrict__ dt_bias, const float* __restrict__ A_log,
    const T* __restrict__ B, const T* __restrict__ C, int ldbc, const T* __restrict__ Dskip,
    const int32_t* __restrict__ cu, int H, int P, int G, int N, float dt_min, float dt_max, double* ws,
    SsdScratch sc, int seq0) {
  __shared__ double red[kThreads];
  const int h = blockIdx.x, s = seq0 + int(blockIdx.y), g = h / (H / G);
  const int row0 = cu[s], L = cu[s + 1] - row0;
  double* base = ws + (int64_t(blockIdx.y) * H + h) * sc.size();  // the slice's own scratch
  double *ck = base + sc.ck(), *S = base + sc.S(), *Gs = base + sc.G(), *Gn = base + sc.Gn();
  double *delta = base + sc.delta(), *ddu = base + sc.ddu(), *decay = base + sc.decay();
  const int64_t PN = sc.PN;
  const double A = -exp(double(A_log[h])), D = to_f(Dskip[h]), bias = to_f(dt_bias[h]);
  for (int t = threadIdx.x; t < L; t += kThreads) {
    const double u = double(to_f(dt[int64_t(row0 + t) * lddt + h])) + bias;
    const double sp = u > 20.0 ? u : log1p(exp(u));
    const double dl = fmin(fmax(sp, double(dt_min)), double(dt_max));
    delta[t] = dl;
    ddu[t] = (sp >= double(dt_min) && sp <= double(dt_max)) ? 1.0 / (1.0 + exp(-u)) : 0.0;
    decay[t] = exp(dl * A);
  }
  __syncthreads();
  // The forward walk: each thread its own elements; the state entering every chunk kept.
  for (int64_t i = threadIdx.x; i < PN; i += kThreads) {
    const int p = int(i / N), n = int(i % N);
    double v = 0;
    for (int t = 0; t < L; ++t) {
      if (t % kChunk == 0) ck[int64_t(t / kChunk) * PN + i] = v;
      const int64_t r = row0 + t;
      v = decay[t] * v + delta[t] * double(to_f(x[r * ldx + int64_t(h) * P + p])) *
                             double(to_f(B[r * ldbc + int64_t(g) * N + n]));
    }
    Gs[i] = 0;
  }
  __syncthreads();
  double dA = 0, dD = 0, dbias = 0;  // thread 0's
  const int nch = (L + kChunk - 1) / kChunk;
  for (int c = nch - 1; c >= 0; --c) {
    const int t0 = c * kChunk, len = min(kChunk, L - t0);
    for (int64_t i = threadIdx.x; i < PN; i += kThreads) {  // S[k + 1]: the state after token t0 + k
      const int p = int(i / N), n = int(i % N);
      double v = ck[int64_t(c) * PN + i];
      S[i] = v;
      for (int k = 0; k < len; ++k) {
        const int64_t r = row0 + t0 + k;
        v = decay[t0 + k] * v + delta[t0 + k] * double(to_f(x[r * ldx + int64_t(h) * P + p])) *
                                    double(to_f(B[r * ldbc + int64_t(g) * N + n]));
        S[int64_t(k + 1) * PN + i] = v;
      }
    }
    __syncthreads();
    for (int k = len - 1; k >= 0; --k) {
      const int t = t0 + k;
      const int64_t r = row0 + t;
      const double dl = delta[t], dec = decay[t];
      const double* cur = S + int64_t(k + 1) * PN;
      const double* prev = S + int64_t(k) * PN;
      double gp = 0;  // sum G . S_{t-1}, this thread's part
      for (int64_t i = threadIdx.x; i < PN; i += kThreads) {
        const int p = int(i / N), n = int(i % N);
        const double gy = to_f(dy[r * lddy + int64_t(h) * P + p]);
        const double v = Gs[i] + gy * double(to_f(C[r * ldbc + int64_t(g) * N + n]));  // y = S_t C_t
        Gn[i] = v;
        gp += v * prev[i];
        Gs[i] = v * dec;  // S_t = exp(delta A) S_{t-1}
      }
      const double gp_all = block_sum_d(gp, red);  // also orders Gn's writes before the reads below
      // Per channel p: dx, and its share of d delta and dD.
      double dd = 0, dDt = 0;
      for (int p = threadIdx.x; p < P; p += kThreads) {
        const double gy = to_f(dy[r * lddy + int64_t(h) * P + p]);
        const double xt = to_f(x[r * ldx + int64_t(h) * P + p]);
        double gb = 0;
        for (int n = 0; n < N; ++n) gb += Gn[int64_t(p) * N + n] * double(to_f(B[r * ldbc + int64_t(g) * N + n]));
        dx[r * lddx + int64_t(h) * P + p] = from_f<T>(float(D * gy + dl * gb));
        dd += xt * gb;
        dDt += gy * xt;
      }
      // Per state n: the head's gB and gC of this token (summed over p).
      for (int n = threadIdx.x; n < N; n += kThreads) {
        double gB = 0, gC = 0;
        for (int p = 0; p < P; ++p) {
          const double gy = to_f(dy[r * lddy + int64_t(h) * P + p]);
          const double xt = to_f(x[r * ldx + int64_t(h) * P + p]);
          gB += dl * xt * Gn[int64_t(p) * N + n];
          gC += gy * cur[int64_t(p) * N + n];
        }
        float* pb = part_bc + (r * H + h) * 2 * int64_t(N);
        pb[n] = float(gB);
        pb[N + n] = float(gC);
      }
      const double dd_all = block_sum_d(dd, red), dD_all = block_sum_d(dDt, red);
      if (threadIdx.x == 0) {
        const double ddelta = dd_all + gp_all * dec * A;  // d exp(delta A) = exp(delta A)(A d delta + delta dA)
        dA += gp_all * dec * dl;
        dD += dD_all;
        const double du = ddelta * ddu[t];
        ddt[r * lddt_out + h] = from_f<T>(float(du));
        dbias += du;
      }
      __syncthreads();
    }
  }
  if (threadIdx.x == 0) {
    double* pp = part_p + (int64_t(s) * H + h) * 3;
    pp[0] = dbias;
    pp[1] = dA * A;  // A = -exp(A_log)
    pp[2] = dD;
  }
}

// ---- The chunked backward (the Mamba-2 paper's SSD form; ref::grad::ssd_scan_backward_chunked) ----
//
// One block per (sequence, head) again, but each chunk of kQ tokens is a handful of small
// matrix products over shared memory instead of kQ dependent token steps, and everything is
// float. A forward walk over the chunks stores the state entering each ([nch, P, N] float
// scratch); the backward walk carries G = dL/dS of the state leaving the chunk in shared memory.
// Per chunk, with l_t = A (delta_c0 + ... + delta_t):
//   W[t, s] = exp(l_t - l_s) C_t . B_s,  M[t, s] = exp(l_t - l_s) dy_t . x_s   (s <= t)
//   GB = W^T dY + diag(exp(l_end - l)) B G^T;  DS = dY S_in
//   dx = delta o GB + D dy;  dB_t = delta_t (M[:, t] . C + exp(l_end - l_t) x_t G)
//   dC_t = M[t, :] (delta o B) + exp(l_t) DS_t;  G <- exp(l_end) G + dY^T diag(exp(l)) C
// and the per-token scalars of d delta as in the reference (dl_t, then a reverse sum per chunk).
// Each product is register-tiled, on the tensor cores for bf16 and f16 data (WarpTile, below),
// else in float FMAs (Tile): a thread keeps TM x TN sums, and each step of 4
// k reads its operands as 16-byte vectors (4 k of a row, or 4 adjacent rows or columns of one k),
// so a step of a 2 x 4 tile is 6 shared loads for 32 FMAs. Stop 49's form (one output a thread)
// read two floats a FMA; its first tiled form (scalar reads through index lambdas) was bound by
// the integer work of its addresses (ncu: issue slots 69% busy, the ALU the busiest pipe).
// Rows are padded to ld = 4 (mod 32) floats, so the 16-byte reads of 8 adjacent rows hit
// distinct banks; padding is zero, so sums may run k to a multiple of 4.
constexpr int kQ = 32;    // tokens a chunk: one warp's lanes (l is a warp prefix sum)
constexpr int kCT = 256;  // threads a block where two blocks fit an SM (512 where one does)
constexpr int kLdQ = kQ + 4;

constexpr int padded_ld(int k) { return (k + 31) / 32 * 32 + 4; }
constexpr int round8(int k) { return (k + 7) / 8 * 8; }

struct ChunkLayout {  // float offsets into the dynamic shared memory
  int ldP, ldN;
  int X, DY, B, C, W, M, WM, S, G, GB, DS, delta, l, ddu, eend, el, ed, xgb, dyy, total;
};

ChunkLayout chunk_layout(int P, int N) {
  ChunkLayout o{};
  o.ldP = padded_ld(P);
  o.ldN = padded_ld(N);
  int at = 0;
  auto take = [&](int n) {  // every part starts 16-byte aligned: n is a multiple of 4
    const int r = at;
    at += n;
    return r;
  };
  o.X = take(kQ * o.ldP);
  o.DY = take(kQ * o.ldP);
  o.B = take(kQ * o.ldN);
  o.C = take(kQ * o.ldN);
  o.W = take(kQ * kLdQ);
  o.M = take(kQ * kLdQ);
  o.WM = take(kQ * kLdQ);
  o.S = take(round8(P) * o.ldN);  // rows p; those past P stay zero (a warp tile's k runs to 8)
  o.G = take(round8(P) * o.ldN);
  o.GB = take(kQ * o.ldP);
  o.DS = take(kQ * o.ldN);
  o.delta = take(kQ);
  o.l = take(kQ);
  o.ddu = take(kQ);
  o.eend = take(kQ);
  o.el = take(kQ);
  o.ed = take(kQ);
  o.xgb = take(kQ);
  o.dyy = take(kQ);
  o.total = at;
  return o;
}

// A shared-memory operand of a product over k: element (row, k) at p[row * ld + k] when it is
// k-major (a row's k adjacent), else at p[k * ld + row].
struct Opd {
  const float* p;
  int ld;
};

template <int n>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[n]) {
  static_assert(n == 2 || n == 4, "vector of 2 or 4");
  if constexpr (n == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    const float2 q = *reinterpret_cast<const float2*>(p);
    v[0] = q.x, v[1] = q.y;
  }
}

// Which operand of a product holds values that tf32 does not represent exactly: none (both are
// bf16 or f16 data as loaded), a, or b (a float result, or data scaled per k).
enum Split { kExact = 0, kSplitA = 1, kSplitB = 2 };

// One thread's TM x TN outputs of an M x Nc product: rows i0 .. i0 + TM - 1 (adjacent, so a
// causal product's k range is one interval a tile). With kBRows the b operand is k-major (its
// rows are the output's columns) and the columns are strided (j0, j0 + nt, ...: the lanes of a
// warp read adjacent rows); without, b is read 4 adjacent columns of one k at a time and the
// columns are adjacent (j0 .. j0 + TN - 1). Reads past M or Nc fall in zero padding or are
// clamped; their sums are never stored.
template <int TM, int TN, bool kBRows>
struct Tile {
  static_assert(TN == 4 || (TN == 2 && kBRows), "adjacent columns are read 4 at a time");
  int i0, j0, step, M, Nc;
  float acc[TM][TN];
  __device__ Tile(int tile, int M_, int Nc_) : M(M_), Nc(Nc_) {
    const int nt = (Nc_ + TN - 1) / TN;
    i0 = (tile / nt) * TM;
    j0 = kBRows ? tile % nt : (tile % nt) * TN;
    step = kBRows ? nt : 1;
    zero();
  }
  static __device__ int count(int rows, int cols) { return ((rows + TM - 1) / TM) * ((cols + TN - 1) / TN); }
  __device__ int first_col() const { return j0; }
  __device__ int row_end() const { return i0 + TM; }
  __device__ void zero() {
#pragma unroll
    for (int r = 0; r < TM; ++r)
#pragma unroll
      for (int c = 0; c < TN; ++c) acc[r][c] = 0.0f;
  }
  // acc[r][c] += sum_{k in [k0, k1)} a(i0 + r, k) ks[k] b(k, col c), with ks[k] = 1 when ks is
  // null; k0 and k1 widen to multiples of 4 (the operands' terms there must be zero).
  template <bool kAK, Split>  // float FMAs: the Split is WarpTile's
  __device__ void add(int k0, int k1, Opd a, Opd b, const float* ks = nullptr) {
    k0 &= ~3;
    k1 = (k1 + 3) & ~3;
    int jr[TN];
#pragma unroll
    for (int c = 0; c < TN; ++c) jr[c] = min(j0 + c * step, Nc - 1);
    for (int k = k0; k < k1; k += 4) {
      float av[4][TM], bv[4][TN];
      if constexpr (kAK) {
#pragma unroll
        for (int r = 0; r < TM; ++r) {
          float v[4];
          load_vec<4>(a.p + (i0 + r) * a.ld + k, v);
#pragma unroll
          for (int q = 0; q < 4; ++q) av[q][r] = v[q];
        }
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) load_vec<TM>(a.p + (k + q) * a.ld + i0, av[q]);
      }
      if constexpr (kBRows) {
#pragma unroll
        for (int c = 0; c < TN; ++c) {
          float v[4];
          load_vec<4>(b.p + jr[c] * b.ld + k, v);
#pragma unroll
          for (int q = 0; q < 4; ++q) bv[q][c] = v[q];
        }
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) load_vec<TN>(b.p + (k + q) * b.ld + j0, bv[q]);
      }
      if (ks != nullptr) {
        float s[4];
        load_vec<4>(ks + k, s);
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
          for (int r = 0; r < TM; ++r) av[q][r] *= s[q];
      }
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int r = 0; r < TM; ++r)
#pragma unroll
          for (int c = 0; c < TN; ++c) acc[r][c] = fmaf(av[q][r], bv[q][c], acc[r][c]);
    }
  }
  template <class F>
  __device__ void scale_rows(F f) {
#pragma unroll
    for (int r = 0; r < TM; ++r) {
      const float sc = f(min(i0 + r, M - 1));
#pragma unroll
      for (int c = 0; c < TN; ++c) acc[r][c] *= sc;
    }
  }
  template <class F>
  __device__ void store(F out) const {
#pragma unroll
    for (int r = 0; r < TM; ++r)
#pragma unroll
      for (int c = 0; c < TN; ++c)
        if (i0 + r < M && j0 + c * step < Nc) out(i0 + r, j0 + c * step, acc[r][c]);
  }
};

// One warp's (16 MT) x (8 NT) outputs of an M x Nc product on the tensor cores (Tile's interface):
// mma m16n8k8 on tf32 operands, float sums; the bf16 and f16 kernels use it. bf16 and f16 values
// are exact in tf32 (8 and 11 significant bits; tf32 keeps 11), so an operand of loaded data
// goes in as it is, and the other one, when it is a float, as two tf32 parts: v = hi + lo with hi
// = tf32(v), lo = tf32(v - hi), two mmas, and v's rounding error 2^-22 instead of 2^-11. That
// keeps the products within float accuracy: one tf32 pass (stop 51's first form) put 14% errors
// into dA_log, a per-head sum with heavy cancellation that float FMAs hold to 2e-4. Lane (g, q) =
// (lane / 4, lane % 4) holds rows g and g + 8 of each 16-row block and columns 2q, 2q + 1 of each
// 8; its fragment reads hit 32 distinct banks at any ld = 4 (mod 32). Reads past M or Nc are
// clamped; k widens to multiples of 8 (the operands' terms there must be zero).
template <int MT, int NT, bool kBRows>
struct WarpTile {
  int i0, j0, M, Nc, g, q;
  float acc[MT][NT][4];
  __device__ WarpTile(int tile, int M_, int Nc_) : M(M_), Nc(Nc_) {
    const int nt = (Nc_ + 8 * NT - 1) / (8 * NT);
    i0 = (tile / nt) * 16 * MT;
    j0 = (tile % nt) * 8 * NT;
    g = int(threadIdx.x) % 32 / 4;
    q = int(threadIdx.x) % 4;
    zero();
  }
  static __device__ int count(int rows, int cols) {
    return ((rows + 16 * MT - 1) / (16 * MT)) * ((cols + 8 * NT - 1) / (8 * NT));
  }
  __device__ int first_col() const { return j0; }
  __device__ int row_end() const { return i0 + 16 * MT; }
  __device__ void zero() {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[m][n][r] = 0.0f;
  }
  template <bool kAK, Split kSplit>
  __device__ void add(int k0, int k1, Opd a, Opd b, const float* ks = nullptr) {
    k0 &= ~7;
    k1 = (k1 + 7) & ~7;
    int ar[MT][2], bc[NT];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) ar[m][h] = min(i0 + m * 16 + g + 8 * h, M - 1);
#pragma unroll
    for (int n = 0; n < NT; ++n) bc[n] = min(j0 + n * 8 + g, Nc - 1);
    auto at = [&](int row, int k) { return kAK ? a.p[row * a.ld + k] : a.p[k * a.ld + row]; };
    auto bt = [&](int k, int col) { return kBRows ? b.p[col * b.ld + k] : b.p[k * b.ld + col]; };
    // hi (and lo) of v: its tf32 parts when split, else its own bits (exact in tf32)
    auto part = [](float v, bool split, uint32_t& hi, uint32_t& lo) {
      if (split) {
        hi = to_tf32(v);
        lo = to_tf32(v - __uint_as_float(hi));
      } else {
        hi = __float_as_uint(v);
      }
    };
    for (int k = k0; k < k1; k += 8) {
      const int ka = k + q, kb = k + q + 4;
      const float s0 = ks != nullptr ? ks[ka] : 1.0f, s1 = ks != nullptr ? ks[kb] : 1.0f;
      uint32_t af[MT][4], al[MT][4], bf[NT][2], bl[NT][2];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        part(at(ar[m][0], ka) * s0, kSplit == kSplitA, af[m][0], al[m][0]);
        part(at(ar[m][1], ka) * s0, kSplit == kSplitA, af[m][1], al[m][1]);
        part(at(ar[m][0], kb) * s1, kSplit == kSplitA, af[m][2], al[m][2]);
        part(at(ar[m][1], kb) * s1, kSplit == kSplitA, af[m][3], al[m][3]);
      }
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        part(bt(ka, bc[n]), kSplit == kSplitB, bf[n][0], bl[n][0]);
        part(bt(kb, bc[n]), kSplit == kSplitB, bf[n][1], bl[n][1]);
      }
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          if (kSplit == kSplitA) mma1688_tf32(acc[m][n], al[m], bf[n]);
          if (kSplit == kSplitB) mma1688_tf32(acc[m][n], af[m], bl[n]);
          mma1688_tf32(acc[m][n], af[m], bf[n]);
        }
    }
  }
  template <class F>
  __device__ void scale_rows(F f) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sc = f(min(i0 + m * 16 + g + 8 * h, M - 1));
#pragma unroll
        for (int n = 0; n < NT; ++n) acc[m][n][2 * h] *= sc, acc[m][n][2 * h + 1] *= sc;
      }
  }
  template <class F>
  __device__ void store(F out) const {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = i0 + m * 16 + g + 8 * (r / 2), col = j0 + n * 8 + 2 * q + r % 2;
          if (row < M && col < Nc) out(row, col, acc[m][n][r]);
        }
  }
};

// Every tile of an M x Nc product spread over the block: TM x TN float-FMA tiles a thread, or
// with kTC (16 MT) x (8 NT) tensor-core tiles a warp.
template <bool kTC, int TM, int TN, int MT, int NT, bool kBRows, class F>
__device__ void for_tiles(int rows, int cols, F f) {
  if constexpr (kTC) {
    const int n = WarpTile<MT, NT, kBRows>::count(rows, cols), nw = int(blockDim.x) / 32;
    for (int t = int(threadIdx.x) / 32; t < n; t += nw) {
      WarpTile<MT, NT, kBRows> tl(t, rows, cols);
      f(tl);
    }
  } else {
    const int n = Tile<TM, TN, kBRows>::count(rows, cols);
    for (int t = int(threadIdx.x); t < n; t += int(blockDim.x)) {
      Tile<TM, TN, kBRows> tl(t, rows, cols);
      f(tl);
    }
  }
}

// Warp 0's part of loading a chunk: each token's delta = clamp(softplus(dt + bias)) (time_step_limit)
// and its slope d delta / d dt (0 where clamped; ddu may be null), l = the prefix sum of A delta,
// exp(l_end - l), exp(l) and exp(l_end - l) delta. Tokens past len have delta 0, so l stays at l_end.
template <class T>
__device__ __forceinline__ void chunk_scalars(int lane, int len, const T* __restrict__ dt, int lddt, float A,
                                              float bias, float dt_min, float dt_max, float* sdelta, float* sddu,
                                              float* sl, float* seend, float* sel, float* sed) {
  float d = 0.0f, du = 0.0f;
  if (lane < len) {
    const float u = to_f(dt[lane * int64_t(lddt)]) + bias, sp = softplus(u);
    d = fminf(fmaxf(sp, dt_min), dt_max);
    du = (sp >= dt_min && sp <= dt_max) ? 1.0f / (1.0f + expf(-u)) : 0.0f;
  }
  float lv = A * d;
#pragma unroll
  for (int k = 1; k < 32; k <<= 1) {
    const float v = __shfl_up_sync(0xffffffffu, lv, k);
    if (lane >= k) lv += v;
  }
  const float le = __shfl_sync(0xffffffffu, lv, 31);
  sdelta[lane] = d;
  if (sddu != nullptr) sddu[lane] = du;
  sl[lane] = lv;
  seend[lane] = expf(le - lv);  // <= 1: l only falls
  sel[lane] = expf(lv);
  sed[lane] = seend[lane] * d;
}

// Segments: a long sequence's chunks are cut into segments of seg_chunks chunks, a block each
// (grid z), so a batch of few long sequences still fills the device (stop 50: 8 x 2048 tokens of
// a 24-head model were 192 blocks walking 64 chunks each). Both recurrences are linear, so over
// a segment S_out = a S_in + S_loc and G_in = a G_out + G_loc, with a = exp(A sum(delta)) of the
// segment and S_loc, G_loc the segment's own sums from zero. A local launch (seg.local) forms
// those ([P, N] S_loc and G_loc, and a), ssd_segment_pass_kernel turns them into each segment's entering
// state and G_out in place, and the backward blocks start from them. One segment a sequence
// (seg null) needs neither pass.
struct Segs {
  float* S;  // [slice seqs][H][max_seg][P * N]: S_loc, then the state entering the segment
  float* G;  // same: G_loc, then dL/dS of the state leaving it
  float* a;  // [slice seqs][H][max_seg]
  int chunks, max_seg;
  bool local;  // this launch forms S_loc, G_loc and a (a flag, not a template argument: the
               // backward's code would be unreachable in a local instance, which nvcc rejects)
};

// Launch bounds of 512 threads an SM (<= 128 registers a thread): without the second bound this
// file's ptxas gave the float forms 64 registers and spills (stop 51).
template <class T, int CT, bool kTC>
__global__ void __launch_bounds__(CT, 2 * kCT / CT) ssd_backward_chunked_kernel(
    T* __restrict__ dx, int lddx, T* __restrict__ ddt, int lddt_out, float* __restrict__ part_bc,
    double* __restrict__ part_p, const T* __restrict__ dy, int lddy, const T* __restrict__ x, int ldx,
    const T* __restrict__ dt, int lddt, const T* __restrict__ dt_bias, const float* __restrict__ A_log,
    const T* __restrict__ B, const T* __restrict__ C, int ldbc, const T* __restrict__ Dskip,
    const int32_t* __restrict__ cu, int H, int P, int G, int N, float dt_min, float dt_max, float* ws,
    int64_t ws_block, ChunkLayout o, int seq0, Segs seg) {
  extern __shared__ float sm[];
  float *sX = sm + o.X, *sDY = sm + o.DY, *sB = sm + o.B, *sC = sm + o.C, *sW = sm + o.W, *sM = sm + o.M;
  float *sWM = sm + o.WM, *sS = sm + o.S, *sG = sm + o.G, *sGB = sm + o.GB, *sDS = sm + o.DS;
  float *sdelta = sm + o.delta, *sl = sm + o.l, *sddu = sm + o.ddu, *seend = sm + o.eend, *sel = sm + o.el;
  float *sed = sm + o.ed, *sxgb = sm + o.xgb, *sdyy = sm + o.dyy;
  const int ldP = o.ldP, ldN = o.ldN, tid = int(threadIdx.x);
  // Warp tiles half as wide at 16 warps, so every warp has one (64 x 128, 32 x 128, 32 x 64 at
  // P 64, N 128: 16 tiles each)
  constexpr int kWide = CT / kCT;
  const int h = blockIdx.x, s = seq0 + int(blockIdx.y), g = h / (H / G);
  const int row0 = cu[s], L = cu[s + 1] - row0, nch = (L + kQ - 1) / kQ, PN = P * N;
  const int sg = int(blockIdx.z), c0 = sg * seg.chunks, c1 = min(nch, c0 + seg.chunks);
  const int64_t bsg = (int64_t(blockIdx.y) * H + h) * seg.max_seg + sg;  // this block's (slice seq, head, segment)
  double* pp = part_p + ((int64_t(s) * H + h) * seg.max_seg + sg) * 3;
  if (c0 >= nch) {  // a segment past the sequence (or an empty sequence): nothing to add, and
    // ssd_segment_pass_kernel reads no segment past the sequence
    if (!seg.local && tid == 0) pp[0] = pp[1] = pp[2] = 0.0;
    return;  // uniform over the block
  }
  float* Sck = ws + bsg * ws_block;  // [seg.chunks][P * N]: the state entering chunk c0 + i
  const float A = -expf(A_log[h]), D = to_f(Dskip[h]), bias = to_f(dt_bias[h]);
  const int64_t xh = int64_t(h) * P, bg = int64_t(g) * N;

  // Chunk c's rows into shared memory (rows past the sequence zero, with delta 0 so l stays at
  // l_end), and its per-token scalars: warp 0 forms l as a prefix sum of A delta.
  auto load = [&](int c, bool back) {
    const int t0 = c * kQ, len = min(kQ, L - t0);
    for (int i = tid; i < kQ * P; i += CT) {
      const int t = i / P, p = i % P;
      const int64_t r = row0 + t0 + t;
      sX[t * ldP + p] = t < len ? to_f(x[r * ldx + xh + p]) : 0.0f;
      if (back) sDY[t * ldP + p] = t < len ? to_f(dy[r * lddy + xh + p]) : 0.0f;
    }
    for (int i = tid; i < kQ * N; i += CT) {
      const int t = i / N, n = i % N;
      const int64_t r = row0 + t0 + t;
      sB[t * ldN + n] = t < len ? to_f(B[r * ldbc + bg + n]) : 0.0f;
      if (back) sC[t * ldN + n] = t < len ? to_f(C[r * ldbc + bg + n]) : 0.0f;
    }
    if (tid < 32)
      chunk_scalars(tid, len, dt + (row0 + t0) * int64_t(lddt) + h, lddt, A, bias, dt_min, dt_max, sdelta, sddu, sl,
                    seend, sel, sed);
  };

  // G <- exp(l_end) G + sum_t exp(l_t) dy_t C_t^T over the loaded chunk: dL/dS of the state
  // entering it (each element read and written by its own thread only).
  auto update_G = [&] {
    const float eall = sel[kQ - 1];
    for_tiles<kTC, 4, 4, 2 / kWide, 4, false>(P, N, [&](auto& tl) {
      tl.template add<false, kSplitA>(0, kQ, Opd{sDY, ldP}, Opd{sC, ldN}, sel);
      tl.store([&](int p, int n, float v) { sG[p * ldN + n] = eall * sG[p * ldN + n] + v; });
    });
  };

  // Every float zero: the padding the products read past P, N and the sequence stays so, and S
  // starts at zero (a local pass, or the first segment) or at the segment's entering state.
  for (int i = tid; i < o.total; i += CT) sm[i] = 0.0f;
  __syncthreads();
  if (!seg.local && seg.S != nullptr)
    for (int i = tid; i < PN; i += CT) sS[(i / N) * ldN + i % N] = seg.S[bsg * PN + i];
  float lsum = 0.0f;  // A sum(delta) over the segment (thread 0's)
  // The forward walk: S_in(c + 1) = exp(l_end) S_in(c) + sum_s exp(l_end - l_s) delta_s x_s B_s^T.
  for (int c = c0; c < c1; ++c) {
    __syncthreads();  // the previous chunk's rows are consumed
    load(c, false);
    __syncthreads();
    float* Sc = Sck + int64_t(c - c0) * PN;
    if (tid == 0) lsum += sl[kQ - 1];  // padded tokens have delta 0: l_end is the chunk's sum
    if (!seg.local && c + 1 == c1) {
      for (int i = tid; i < PN; i += CT) Sc[i] = sS[(i / N) * ldN + i % N];
      continue;
    }
    const float eall = sel[kQ - 1];
    // each element read and written by its own thread only
    for_tiles<kTC, 4, 4, 2 / kWide, 4, false>(P, N, [&](auto& tl) {
      tl.template add<false, kSplitA>(0, kQ, Opd{sX, ldP}, Opd{sB, ldN}, sed);
      tl.store([&](int p, int n, float v) {
        const float old = sS[p * ldN + n];
        Sc[p * N + n] = old;
        sS[p * ldN + n] = eall * old + v;
      });
    });
  }

  (void)lsum;  // read only by local blocks
  if (seg.local) {
    // S_loc and a; then G_loc: G's update alone, from zero, over the segment's chunks.
    __syncthreads();
    for (int i = tid; i < PN; i += CT) seg.S[bsg * PN + i] = sS[(i / N) * ldN + i % N];
    if (tid == 0) seg.a[bsg] = expf(lsum);
    for (int c = c1 - 1; c >= c0; --c) {
      __syncthreads();
      load(c, true);
      __syncthreads();
      update_G();
    }
    __syncthreads();
    for (int i = tid; i < PN; i += CT) seg.G[bsg * PN + i] = sG[(i / N) * ldN + i % N];
    return;
  }
  // G = dL/dS of the state leaving the segment: zero at the sequence's end.
  for (int i = tid; i < PN; i += CT) sG[(i / N) * ldN + i % N] = seg.G != nullptr ? seg.G[bsg * PN + i] : 0.0f;
  float dDp = 0.0f;               // this thread's part of dD
  double dA = 0.0, dbias = 0.0;   // thread 0's
  for (int c = c1 - 1; c >= c0; --c) {
    const int t0 = c * kQ, len = min(kQ, L - t0);
    __syncthreads();
    load(c, true);
    for (int i = tid; i < PN; i += CT) sS[(i / N) * ldN + i % N] = Sck[int64_t(c - c0) * PN + i];
    __syncthreads();
    // W = CB^T and M = dY X^T, masked and scaled, and W o (dy x^T) o delta (the last for dl);
    // a tile wholly above the diagonal sums nothing. DS = dY S_in.
    for_tiles<kTC, 2, 2, 1, 1, true>(kQ, kQ, [&](auto& tl) {
      const bool above = tl.row_end() <= tl.first_col();  // its last row before its first column
      tl.template add<true, kExact>(0, above ? 0 : N, Opd{sC, ldN}, Opd{sB, ldN});
      tl.store([&](int t, int u, float v) { sW[t * kLdQ + u] = v; });
      tl.zero();
      tl.template add<true, kExact>(0, above ? 0 : P, Opd{sDY, ldP}, Opd{sX, ldP});
      tl.store([&](int t, int u, float yx) {  // the thread's own W entries, just written
        float w = 0.0f, m = 0.0f, wm = 0.0f;
        if (u <= t) {
          const float e = expf(sl[t] - sl[u]);
          w = e * sW[t * kLdQ + u];
          m = e * yx;
          wm = w * yx * sdelta[u];
        }
        sW[t * kLdQ + u] = w;
        sM[t * kLdQ + u] = m;
        sWM[t * kLdQ + u] = wm;
      });
    });
    for_tiles<kTC, 2, 4, 1, 4 / kWide, false>(kQ, N, [&](auto& tl) {
      tl.template add<true, kSplitB>(0, P, Opd{sDY, ldP}, Opd{sS, ldN});
      tl.store([&](int t, int n, float v) { sDS[t * ldN + n] = v; });
    });
    __syncthreads();
    // GB[u, p] = exp(l_end - l_u) B_u . G[p] + sum_{t >= u} W[t, u] dy_t[p], in two passes
    // whose tiles differ (G's rows are the columns p; dY's columns are)
    for_tiles<kTC, 2, 4, 1, 2 / kWide, true>(kQ, P, [&](auto& tl) {
      tl.template add<true, kSplitB>(0, N, Opd{sB, ldN}, Opd{sG, ldN});
      tl.scale_rows([&](int u) { return seend[u]; });
      tl.store([&](int u, int p, float v) { sGB[u * ldP + p] = v; });
    });
    __syncthreads();
    for_tiles<kTC, 2, 4, 1, 2 / kWide, false>(kQ, P, [&](auto& tl) {
      tl.template add<false, kSplitA>(tl.i0, kQ, Opd{sW, kLdQ}, Opd{sDY, ldP});
      tl.store([&](int u, int p, float v) { sGB[u * ldP + p] += v; });
    });
    __syncthreads();
    for (int i = tid; i < kQ * P; i += CT) {
      const int t = i / P, p = i % P;
      if (t >= len) continue;
      const float gy = sDY[t * ldP + p];
      dx[(row0 + t0 + t) * int64_t(lddx) + xh + p] = from_f<T>(sdelta[t] * sGB[t * ldP + p] + D * gy);
      dDp += gy * sX[t * ldP + p];
    }
    // dB_t = delta_t (exp(l_end - l_t) x_t G + sum_{u >= t} M[u, t] C_u);
    // dC_t = sum_{u <= t} M[t, u] delta_u B_u + exp(l_t) DS_t
    for_tiles<kTC, 2, 4, 1, 4 / kWide, false>(kQ, N, [&](auto& tl) {
      float* pb = part_bc + ((row0 + t0) * int64_t(H) + h) * 2 * N;  // token t at + t * H * 2N
      const int64_t ldpb = int64_t(H) * 2 * N;
      tl.template add<true, kSplitB>(0, P, Opd{sX, ldP}, Opd{sG, ldN});
      tl.scale_rows([&](int t) { return seend[t]; });
      tl.template add<false, kSplitA>(tl.i0, kQ, Opd{sM, kLdQ}, Opd{sC, ldN});
      tl.scale_rows([&](int t) { return sdelta[t]; });
      tl.store([&](int t, int n, float v) {
        if (t < len) pb[t * ldpb + n] = v;
      });
      tl.zero();
      tl.template add<true, kSplitA>(0, tl.row_end(), Opd{sM, kLdQ}, Opd{sB, ldN}, sdelta);
      tl.store([&](int t, int n, float v) {
        if (t < len) pb[t * ldpb + N + n] = v + sel[t] * sDS[t * ldN + n];
      });
    });
    {  // per token: x_t . GB_t and dy_t . y'_t (y' = y - D x), one warp a token
      const int warp = tid / 32, lane = tid % 32;
      for (int t = warp; t < kQ; t += CT / 32) {
        float a = 0.0f, b = 0.0f;
        for (int p = lane; p < P; p += 32) a += sX[t * ldP + p] * sGB[t * ldP + p];
        for (int n = lane; n < N; n += 32) b += sC[t * ldN + n] * sDS[t * ldN + n];
        b = b * sel[t] + sWM[t * kLdQ + lane];  // kQ == 32: one u a lane
#pragma unroll
        for (int k = 16; k > 0; k >>= 1) {
          a += __shfl_xor_sync(0xffffffffu, a, k);
          b += __shfl_xor_sync(0xffffffffu, b, k);
        }
        if (lane == 0) {
          sxgb[t] = a;
          sdyy[t] = b;
        }
      }
    }
    float ge = 0.0f;  // <G, S_end>: the state leaving the chunk is the next one's entering state
    if (c + 1 < nch) {
      const float* Se = c + 1 < c1 ? Sck + int64_t(c + 1 - c0) * PN : seg.S + (bsg + 1) * PN;
      for (int i = tid; i < PN; i += CT) ge += sG[(i / N) * ldN + i % N] * Se[i];
    }
    ge = block_sum<CT>(ge);  // its barriers also end every read of G above
    // G <- exp(l_end) G + sum_t exp(l_t) dy_t C_t^T: dL/dS of the state entering this chunk.
    update_G();
    if (tid == 0) {
      // dl_t = dy_t . y'_t - delta_t x_t . GB_t (+ <G, S_end> at the last token); then
      // d delta_t = x_t . GB_t + A sum_{t' >= t} dl_t', dA += dl_t (delta_c0 + ... + delta_t).
      float rev = 0.0f;
      for (int t = 0; t < len; ++t) {
        sdyy[t] = sdyy[t] - sdelta[t] * sxgb[t] + (t == len - 1 ? ge : 0.0f);
        rev += sdyy[t];
      }
      float cum = 0.0f, before = 0.0f;
      for (int t = 0; t < len; ++t) {
        cum += sdelta[t];
        dA += double(sdyy[t]) * cum;
        const float du = (sxgb[t] + A * (rev - before)) * sddu[t];
        before += sdyy[t];
        ddt[(row0 + t0 + t) * int64_t(lddt_out) + h] = from_f<T>(du);
        dbias += du;
      }
    }
  }
  const float dD = block_sum<CT>(dDp);
  if (tid == 0) {
    pp[0] = dbias;
    pp[1] = dA * A;  // A = -exp(A_log)
    pp[2] = dD;
  }
}

// The chunked forward (the matrix form above): one block a (sequence, head), walking its chunks
// with S, the state entering the chunk, in shared memory:  Y = diag(exp(l)) C S^T + (Lm o C B^T)
// (delta o X) + D X,  S <- exp(l_end) S + X^T diag(exp(l_end - l) delta) B.  Training runs it from
// a zero state and keeps none (pool null; stop 50's profile put the token-serial scan it replaces
// at 35.6 ms of a 130M step at 8 x 2048); prefill (ssd_scan_chunked) from each sequence's slot in
// the pool and back. A is A_log (training's parameter) or -exp(A_log) (inference's).
struct FwdLayout {  // float offsets into the dynamic shared memory
  int ldP, ldN;
  int X, B, C, W, Y, S, delta, l, eend, el, ed, total;
};

FwdLayout fwd_layout(int P, int N) {
  FwdLayout o{};
  o.ldP = padded_ld(P);
  o.ldN = padded_ld(N);
  int at = 0;
  auto take = [&](int n) {  // every part starts 16-byte aligned: n is a multiple of 4
    const int r = at;
    at += n;
    return r;
  };
  o.X = take(kQ * o.ldP);
  o.B = take(kQ * o.ldN);
  o.C = take(kQ * o.ldN);
  o.W = take(kQ * kLdQ);
  o.Y = take(kQ * o.ldP);
  o.S = take(round8(P) * o.ldN);
  o.delta = take(kQ);
  o.l = take(kQ);
  o.eend = take(kQ);
  o.el = take(kQ);
  o.ed = take(kQ);
  o.total = at;
  return o;
}

template <class T, bool kTC>
__global__ void __launch_bounds__(kCT, 2) ssd_forward_chunked_kernel(  // two blocks an SM (P 64, N 128: 90 KB)
    T* __restrict__ y, int ldy, float* __restrict__ pool, const int32_t* __restrict__ slots, const T* __restrict__ x,
    int ldx, const T* __restrict__ dt, int lddt, const T* __restrict__ dt_bias, const float* __restrict__ Ah,
    bool a_is_log, const T* __restrict__ B, const T* __restrict__ C, int ldbc, const T* __restrict__ Dskip,
    const int32_t* __restrict__ cu, int H, int P, int G, int N, float dt_min, float dt_max, FwdLayout o) {
  extern __shared__ float sm[];
  float *sX = sm + o.X, *sB = sm + o.B, *sC = sm + o.C, *sW = sm + o.W, *sY = sm + o.Y, *sS = sm + o.S;
  float *sdelta = sm + o.delta, *sl = sm + o.l, *seend = sm + o.eend, *sel = sm + o.el, *sed = sm + o.ed;
  const int ldP = o.ldP, ldN = o.ldN, tid = int(threadIdx.x);
  const int h = blockIdx.x, s = int(blockIdx.y), g = h / (H / G);
  const int row0 = cu[s], L = cu[s + 1] - row0, nch = (L + kQ - 1) / kQ;
  if (nch == 0) return;  // uniform over the block: an empty sequence's slot stays as it is
  const float A = a_is_log ? -expf(Ah[h]) : Ah[h], D = to_f(Dskip[h]), bias = to_f(dt_bias[h]);
  const int64_t xh = int64_t(h) * P, bg = int64_t(g) * N;
  float* st = pool != nullptr ? pool + (int64_t(slots[s]) * H + h) * int64_t(P) * N : nullptr;  // [P, N]
  for (int i = tid; i < o.total; i += kCT) sm[i] = 0.0f;  // S starts at zero; padding stays so
  if (st != nullptr) {
    __syncthreads();
    for (int i = tid; i < P * N; i += kCT) sS[(i / N) * ldN + i % N] = st[i];
  }
  for (int c = 0; c < nch; ++c) {
    const int t0 = c * kQ, len = min(kQ, L - t0);
    __syncthreads();  // the previous chunk is consumed
    for (int i = tid; i < kQ * P; i += kCT) {
      const int t = i / P, p = i % P;
      sX[t * ldP + p] = t < len ? to_f(x[(row0 + t0 + t) * int64_t(ldx) + xh + p]) : 0.0f;
    }
    for (int i = tid; i < kQ * N; i += kCT) {
      const int t = i / N, n = i % N;
      const int64_t r = (row0 + t0 + t) * int64_t(ldbc) + bg + n;
      sB[t * ldN + n] = t < len ? to_f(B[r]) : 0.0f;
      sC[t * ldN + n] = t < len ? to_f(C[r]) : 0.0f;
    }
    if (tid < 32)
      chunk_scalars(tid, len, dt + (row0 + t0) * int64_t(lddt) + h, lddt, A, bias, dt_min, dt_max, sdelta,
                    static_cast<float*>(nullptr), sl, seend, sel, sed);
    __syncthreads();
    // W = Lm o C B^T (a tile wholly above the diagonal sums nothing); Y = diag(exp(l)) C S^T
    for_tiles<kTC, 2, 2, 1, 1, true>(kQ, kQ, [&](auto& tl) {
      const bool above = tl.row_end() <= tl.first_col();
      tl.template add<true, kExact>(0, above ? 0 : N, Opd{sC, ldN}, Opd{sB, ldN});
      tl.store([&](int t, int u, float v) { sW[t * kLdQ + u] = u <= t ? expf(sl[t] - sl[u]) * v : 0.0f; });
    });
    for_tiles<kTC, 2, 4, 1, 2, true>(kQ, P, [&](auto& tl) {
      tl.template add<true, kSplitB>(0, N, Opd{sC, ldN}, Opd{sS, ldN});
      tl.scale_rows([&](int t) { return sel[t]; });
      tl.store([&](int t, int p, float v) { sY[t * ldP + p] = v; });
    });
    __syncthreads();
    // Y += W (delta o X): terms u <= t, so a tile's k runs to its last row
    for_tiles<kTC, 2, 4, 1, 2, false>(kQ, P, [&](auto& tl) {
      tl.template add<true, kSplitA>(0, tl.row_end(), Opd{sW, kLdQ}, Opd{sX, ldP}, sdelta);
      tl.store([&](int t, int p, float v) { sY[t * ldP + p] += v; });
    });
    __syncthreads();
    for (int i = tid; i < len * P; i += kCT) {
      const int t = i / P, p = i % P;
      y[(row0 + t0 + t) * int64_t(ldy) + xh + p] = from_f<T>(sY[t * ldP + p] + D * sX[t * ldP + p]);
    }
    if (c + 1 < nch || st != nullptr) {  // S leaving the chunk (each element read and written by its own thread only)
      const float eall = sel[kQ - 1];
      for_tiles<kTC, 4, 4, 2, 4, false>(P, N, [&](auto& tl) {
        tl.template add<false, kSplitA>(0, kQ, Opd{sX, ldP}, Opd{sB, ldN}, sed);
        tl.store([&](int p, int n, float v) { sS[p * ldN + n] = eall * sS[p * ldN + n] + v; });
      });
    }
  }
  if (st != nullptr) {
    __syncthreads();
    for (int i = tid; i < P * N; i += kCT) st[i] = sS[(i / N) * ldN + i % N];
  }
}

// Per (slice seq, head) and state element: S_loc -> the state entering each segment, G_loc ->
// dL/dS of the state leaving it, walking the sequence's segments in order (Segs above).
__global__ void ssd_segment_pass_kernel(Segs seg, const int32_t* __restrict__ cu, int seq0, int H, int PN) {
  const int i = int(blockIdx.x) * blockDim.x + int(threadIdx.x), h = int(blockIdx.y), y = int(blockIdx.z);
  if (i >= PN) return;
  const int s = seq0 + y, L = cu[s + 1] - cu[s];
  const int nseg = ceil_div(ceil_div(L, kQ), seg.chunks);
  const int64_t b0 = (int64_t(y) * H + h) * seg.max_seg;
  float S = 0.0f;
  for (int g = 0; g < nseg; ++g) {
    const float t = seg.S[(b0 + g) * PN + i];
    seg.S[(b0 + g) * PN + i] = S;
    S = seg.a[b0 + g] * S + t;
  }
  float Gv = 0.0f;
  for (int g = nseg - 1; g >= 0; --g) {
    const float t = seg.G[(b0 + g) * PN + i];
    seg.G[(b0 + g) * PN + i] = Gv;
    Gv = seg.a[b0 + g] * Gv + t;
  }
}

// dB, dC [t, g*N + n] = the sums over the group's heads of part_bc (assigned).
template <class T>
__global__ void ssd_bc_finish_kernel(T* __restrict__ dB, T* __restrict__ dC, int lddbc,
                                     const float* __restrict__ part_bc, int n_tokens, int H, int G, int N) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(n_tokens) * G * N) return;
  const int64_t t = i / (int64_t(G) * N);
  const int j = int(i % (int64_t(G) * N)), g = j / N, n = j % N, hpg = H / G;
  double sB = 0, sC = 0;
  for (int h = g * hpg; h < (g + 1) * hpg; ++h) {
    const float* pb = part_bc + (t * H + h) * 2 * int64_t(N);
    sB += pb[n];
    sC += pb[N + n];
  }
  dB[t * lddbc + j] = from_f<T>(float(sB));
  dC[t * lddbc + j] = from_f<T>(float(sC));
}

// ddt_bias, dA_log, dDskip [h] += the sums of part_p [nseq, H, max_seg, 3] over sequences and
// their segments, in order (the token-serial kernel: one segment).
__global__ void ssd_param_finish_kernel(float* __restrict__ ddt_bias, float* __restrict__ dA_log,
                                        float* __restrict__ dDskip, const double* __restrict__ part_p, int nseq,
                                        int H, int max_seg) {
  const int h = int(blockIdx.x) * blockDim.x + threadIdx.x;
  if (h >= H) return;
  double b = 0, a = 0, d = 0;
  for (int i = 0; i < nseq * max_seg; ++i) {  // sequence s, segment g: i = s * max_seg + g
    const double* pp = part_p + ((int64_t(i / max_seg) * H + h) * max_seg + i % max_seg) * 3;
    b += pp[0];
    a += pp[1];
    d += pp[2];
  }
  ddt_bias[h] += float(b);
  dA_log[h] += float(a);
  dDskip[h] += float(d);
}

// The gated RMSNorm's backward (ref::grad::gated_rmsnorm_backward) in two passes over the rows,
// sums in float: one warp a row for dy, dz and each (row, group)'s 1 / rms; then dw's partial
// sums per chunk of rows (each column's rows in a fixed order, as rmsnorm_backward's) and
// column_sums over the chunks. Stop 49's profile of a d 64 Mamba-2 MQAR step (32,768 rows of
// 128) had the former kernels (a block of 256 a row in double, then one thread a column over all
// rows) at 4.5 of its 12.5 ms.
constexpr int kNormWarps = 8;   // rows a block of the first pass
constexpr int kNormPhases = 8;  // row phases a block of the second

int norm_rows_per_chunk(int n) { return std::max(32, ceil_div(n, 1024)); }

template <class T>
__global__ void __launch_bounds__(32 * kNormWarps) gated_norm_dx_kernel(
    T* __restrict__ dy, int lddy, T* __restrict__ dz, int lddz, float* __restrict__ rstd, const T* __restrict__ dout,
    int lddo, const T* __restrict__ y, int ldy, const T* __restrict__ z, int ldz, const T* __restrict__ w, int n,
    int E, int group, float eps) {
  const int lane = int(threadIdx.x) % 32;
  const int64_t i = int64_t(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  if (i >= n) return;  // a whole warp
  for (int j0 = 0, gi = 0; j0 < E; j0 += group, ++gi) {
    float ss = 0.0f, dot = 0.0f;
    for (int j = j0 + lane; j < j0 + group; j += 32) {
      const float zj = to_f(z[i * ldz + j]), v = to_f(y[i * ldy + j]) * zj / (1.0f + expf(-zj));
      ss += v * v;
      dot += to_f(w[j]) * to_f(dout[i * lddo + j]) * v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      ss += __shfl_xor_sync(0xffffffffu, ss, o);
      dot += __shfl_xor_sync(0xffffffffu, dot, o);
    }
    const float r = 1.0f / sqrtf(ss / float(group) + eps), cc = r * r * r / float(group) * dot;
    for (int j = j0 + lane; j < j0 + group; j += 32) {
      const float zj = to_f(z[i * ldz + j]), yj = to_f(y[i * ldy + j]), go = to_f(dout[i * lddo + j]);
      const float sg = 1.0f / (1.0f + expf(-zj)), v = yj * zj * sg;
      const float dv = r * to_f(w[j]) * go - v * cc;
      dy[i * lddy + j] = from_f<T>(dv * zj * sg);                           // silu(z)
      dz[i * lddz + j] = from_f<T>(dv * yj * sg * (1.0f + zj * (1.0f - sg)));  // silu'(z)
    }
    if (lane == 0) rstd[i * (E / group) + gi] = r;
  }
}

// part[chunk, j] = sum over the chunk's rows of dout v r (phase y takes rows r0 + y, r0 + y + 8, ...).
template <class T>
__global__ void __launch_bounds__(32 * kNormPhases) gated_norm_dw_partial_kernel(
    float* __restrict__ part, const T* __restrict__ dout, int lddo, const T* __restrict__ y, int ldy,
    const T* __restrict__ z, int ldz, const float* __restrict__ rstd, int n, int E, int group, int rows_per_chunk) {
  __shared__ float sp[kNormPhases][33];
  const int j = int(blockIdx.x) * 32 + int(threadIdx.x);
  const int r0 = int(blockIdx.y) * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
  float acc = 0.0f;
  if (j < E)
    for (int64_t i = r0 + int(threadIdx.y); i < r1; i += kNormPhases) {
      const float zj = to_f(z[i * ldz + j]), v = to_f(y[i * ldy + j]) * zj / (1.0f + expf(-zj));
      acc += to_f(dout[i * lddo + j]) * v * rstd[i * (E / group) + j / group];
    }
  sp[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < E) {
    float t = 0.0f;
    for (int k = 0; k < kNormPhases; ++k) t += sp[k][threadIdx.x];
    part[size_t(blockIdx.y) * E + j] = t;
  }
}

struct AddToF32 {  // dw[j] += the chunks' sum
  float* v;
  __device__ void operator()(int j, float t) const { v[j] += t; }
};

__global__ void neg_exp_kernel(float* __restrict__ A, const float* __restrict__ A_log, int H) {
  const int h = int(blockIdx.x) * blockDim.x + threadIdx.x;
  if (h < H) A[h] = -expf(A_log[h]);
}

SsdScratch scratch_of(int max_len, int P, int N) {
  SsdScratch sc;
  sc.PN = int64_t(P) * N;
  sc.nch = ceil_div(max(max_len, 1), kChunk);
  sc.max_len = max(max_len, 1);
  return sc;
}

// The backward's (sequence, head) blocks run in slices of `seqs` sequences, each slice reusing
// one scratch of seqs x H blocks, so the scratch stays within g_scratch_cap (a slice of one
// sequence at least) whatever the batch: at L 64, P = N = 64 a block's is 1.2 MB, and batch 512
// at 16 heads asked for 10.2 GB in one piece (stop 48). 1 GiB still holds ~850 blocks at
// that size, about what an H100 keeps resident, so slicing costs no parallelism there.
size_t g_scratch_cap = size_t(1) << 30;

SsdBackward g_kernel = [] {  // HM_CUDA_SSD_BACKWARD=reference: the token-serial kernel (A/B runs)
  const char* v = std::getenv("HM_CUDA_SSD_BACKWARD");
  return v != nullptr && std::string(v) == "reference" ? SsdBackward::Reference : SsdBackward::Auto;
}();

// The chunked kernel's threads a block: 0, its own choice (launch below), or 256 or 512
// (HM_CUDA_SSD_THREADS, A/B runs); and whether bf16 and f16 data take tensor-core products
// (WarpTile; HM_CUDA_SSD_TENSOR_CORES=0: the float FMA tiles).
int g_threads = [] {
  const char* v = std::getenv("HM_CUDA_SSD_THREADS");
  const int t = v != nullptr ? std::atoi(v) : 0;
  return t == kCT || t == 2 * kCT ? t : 0;
}();
const bool g_forward_serial = [] {
  const char* v = std::getenv("HM_CUDA_SSD_FORWARD");
  return v != nullptr && std::string(v) == "serial";
}();
bool g_tensor_cores = [] {
  const char* v = std::getenv("HM_CUDA_SSD_TENSOR_CORES");
  return v == nullptr || std::string(v) != "0";
}();

size_t chunked_smem_bytes(int P, int N) { return size_t(chunk_layout(P, N).total) * sizeof(float); }

// The chunked kernel's shared memory within what a block of this device may opt in to.
struct DeviceLimits {
  int optin = 0, sm_smem = 0, sms = 0;  // shared memory a block may opt in to, an SM's, SMs
};
DeviceLimits device_limits() {  // of the current device, cached while it stays current
  thread_local int cached_dev = -1;
  thread_local DeviceLimits d;
  int dev = 0;
  HM_CUDA_OK(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev != cached_dev) {
    HM_CUDA_OK(cudaDeviceGetAttribute(&d.optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
               "cudaDeviceGetAttribute");
    HM_CUDA_OK(cudaDeviceGetAttribute(&d.sm_smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev),
               "cudaDeviceGetAttribute");
    HM_CUDA_OK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    cached_dev = dev;
  }
  return d;
}

bool chunked_fits(int P, int N) {
  // + block_sum's static part
  return int64_t(P) * N <= (int64_t(1) << 24) && chunked_smem_bytes(P, N) + 64 <= size_t(device_limits().optin);
}

// Blocks of the chunked kernel the device holds at once: its shared memory (with the 1 KB the
// driver reserves a block) allows one or two an SM at the head sizes models use.
int64_t resident_blocks(int P, int N) {
  const DeviceLimits d = device_limits();
  const size_t per_block = chunked_smem_bytes(P, N) + 1024 + 64;
  return int64_t(d.sms) * std::clamp<int64_t>(int64_t(size_t(d.sm_smem) / per_block), 1, 2048 / kCT);
}

// 0: segment_chunks's choice; HM_CUDA_SSD_SEGMENT_CHUNKS=n sets it (A/B runs: a large n is one
// segment a sequence).
int g_segment_chunks = [] {
  const char* v = std::getenv("HM_CUDA_SSD_SEGMENT_CHUNKS");
  return v != nullptr ? std::max(std::atoi(v), 0) : 0;
}();

// Chunks a segment (Segs): one segment a sequence while (sequences x heads) blocks fill the
// device's resident blocks once; below that, as many segments as fit those blocks, each at least
// 4 chunks (128 tokens) so the two extra passes stay small beside the backward. More segments
// than that only add the passes' work: stop 50 measured a Mamba-2 130M step at 8 x 2048 (192
// blocks of one an SM) at 241.6 ms with 6 segments a sequence against 219.9 ms with one.
int segment_chunks(int nseq, int H, int nch_max, int64_t resident) {
  if (g_segment_chunks > 0) return std::min(g_segment_chunks, nch_max);
  const int64_t blocks = int64_t(nseq) * H;
  const int64_t nseg = resident / std::max<int64_t>(blocks, 1);
  if (nseg <= 1) return nch_max;
  return std::clamp(ceil_div(nch_max, int(std::min<int64_t>(nseg, nch_max))), std::min(4, nch_max), nch_max);
}

// The workspace's parts, in bytes from its start: per-block scratch, the segments' states
// (Segs: only with several segments), part_bc, part_p.
struct SsdLayout {
  size_t scratch, segs, bc, p, total;
  int seqs;              // sequences a slice
  int64_t block_floats;  // the chunked kernel's scratch a block: [segment chunks, P, N] float
  int seg_chunks, max_seg;
};
SsdLayout layout_of(const RaggedBatch& rb, int H, int P, int N, bool chunked) {
  const SsdScratch sc = scratch_of(rb.max_len, P, N);
  SsdLayout l;
  const int nch_max = ceil_div(std::max(rb.max_len, 1), kQ);
  const int64_t PN = int64_t(P) * N;
  l.seg_chunks = chunked ? segment_chunks(rb.nseq, H, nch_max, resident_blocks(P, N)) : nch_max;
  l.max_seg = chunked ? ceil_div(nch_max, l.seg_chunks) : 1;
  l.block_floats = int64_t(l.seg_chunks) * PN;
  const size_t seg_floats = l.max_seg > 1 ? size_t(l.max_seg) * size_t(2 * PN + 1) : 0;  // S, G, a
  const size_t per_seq =
      size_t(H) * (chunked ? (size_t(l.max_seg) * size_t(l.block_floats) + seg_floats) * sizeof(float)
                           : size_t(sc.size()) * sizeof(double));
  l.seqs = int(std::clamp<size_t>(g_scratch_cap / per_seq, 1, size_t(std::max(rb.nseq, 1))));
  l.scratch = 0;
  l.segs = size_t(l.seqs) * size_t(H) * size_t(l.max_seg) * size_t(l.block_floats) * sizeof(float);
  l.bc = (size_t(l.seqs) * per_seq + 255) / 256 * 256;
  l.p = l.bc + (size_t(rb.n_tokens) * size_t(H) * 2 * size_t(N) * sizeof(float) + 255) / 256 * 256;
  l.total = l.p + size_t(rb.nseq) * size_t(H) * size_t(l.max_seg) * 3 * sizeof(double);
  return l;
}

}  // namespace

void set_ssd_backward_scratch_cap(size_t bytes) { g_scratch_cap = bytes; }
void set_ssd_backward_segment_chunks(int chunks) { g_segment_chunks = std::max(chunks, 0); }
void set_ssd_backward_kernel(SsdBackward k) { g_kernel = k; }
void set_ssd_backward_threads(int threads) {
  HM_CHECK(threads == 0 || threads == kCT || threads == 2 * kCT, "cuda ssd_scan_backward: threads a block ", threads,
           " (0, ", kCT, " or ", 2 * kCT, ")");
  g_threads = threads;
}
void set_ssd_backward_tensor_cores(bool on) { g_tensor_cores = on; }

SsdBackward ssd_backward_kernel_for(int P, int N) {
  if (g_kernel == SsdBackward::Reference) return SsdBackward::Reference;
  const bool fits = chunked_fits(P, N);
  HM_CHECK(fits || g_kernel == SsdBackward::Auto, "cuda ssd_scan_backward: the chunked kernel's ",
           chunked_smem_bytes(P, N), " bytes of shared memory for head size ", P, " and d_state ", N,
           " do not fit this device");
  return fits ? SsdBackward::Chunked : SsdBackward::Reference;
}
size_t ssd_backward_scratch_cap() { return g_scratch_cap; }

size_t ssd_train_workspace_bytes(const RaggedBatch& rb, int H, int P, int N) {
  // The token-serial forward's zeroed state pool [nseq, H, P, N] float and A [H] float; the
  // chunked one needs none.
  if (ssd_scan_chunked_fits(P, N)) return 0;
  return (size_t(rb.nseq) * size_t(H) * size_t(P) * size_t(N) + size_t(H)) * sizeof(float);
}

size_t ssd_backward_workspace_bytes(const RaggedBatch& rb, int H, int P, int N) {
  return layout_of(rb, H, P, N, ssd_backward_kernel_for(P, N) == SsdBackward::Chunked).total;
}

namespace {

// One launch of the chunked forward over the batch (pool null: from zero, no state kept).
template <class T>
void forward_chunked(T* y, int ldy, float* pool, const T* x, int ldx, const T* dt, int lddt, const T* dt_bias,
                     const float* A, bool a_is_log, const T* B, const T* C, int ldbc, const T* Dskip,
                     const RaggedBatch& rb, int H, int P, int G, int N, float dt_min, float dt_max,
                     cudaStream_t stream) {
  const FwdLayout o = fwd_layout(P, N);
  const size_t smem = size_t(o.total) * sizeof(float);
  auto go = [&](auto kernel) {
    HM_CUDA_OK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "cudaFuncSetAttribute (ssd chunked forward)");
    kernel<<<dim3(unsigned(H), unsigned(rb.nseq)), kCT, smem, stream>>>(y, ldy, pool, rb.slots, x, ldx, dt, lddt,
                                                                       dt_bias, A, a_is_log, B, C, ldbc, Dskip,
                                                                       rb.cu_seqlens, H, P, G, N, dt_min, dt_max, o);
  };
  constexpr bool k16 = !std::is_same_v<T, float>;  // float data keeps float products
  if (k16 && g_tensor_cores)
    go(ssd_forward_chunked_kernel<T, k16>);
  else
    go(ssd_forward_chunked_kernel<T, false>);
  HM_CUDA_LAUNCHED("ssd chunked forward");
}

}  // namespace

// The chunked forward wherever its shared memory fits (less than the backward's: P 64 at d_state
// 256 fits it, 155 KB, and not the backward, 273 KB); HM_CUDA_SSD_BACKWARD=reference selects the
// token-serial pair, HM_CUDA_SSD_FORWARD=serial the token-serial forward alone, for training and
// prefill (A/B runs).
bool ssd_scan_chunked_fits(int P, int N) {
  return !g_forward_serial && g_kernel != SsdBackward::Reference && int64_t(P) * N <= (int64_t(1) << 24) &&
         size_t(fwd_layout(P, N).total) * sizeof(float) + 64 <= size_t(device_limits().optin);
}

template <class T>
void ssd_scan_chunked(T* y, int ldy, float* ssm_state, const T* x, int ldx, const T* dt, int lddt, const T* dt_bias,
                      const float* A, const T* B, const T* C, int ldbc, const T* Dskip, const RaggedBatch& rb, int H,
                      int P, int G, int N, float dt_min, float dt_max, cudaStream_t stream) {
  HM_CHECK(ssd_scan_chunked_fits(P, N) && rb.nseq <= 65535 && H <= 65535, "cuda ssd_scan_chunked: ", rb.nseq,
           " sequences of ", H, " heads of ", P, " channels, d_state ", N, " do not fit");
  forward_chunked<T>(y, ldy, ssm_state, x, ldx, dt, lddt, dt_bias, A, false, B, C, ldbc, Dskip, rb, H, P, G, N,
                     dt_min, dt_max, stream);
}

template <class T>
void ssd_scan_train(T* y, int ldy, const T* x, int ldx, const T* dt, int lddt, const T* dt_bias, const float* A_log,
                    const T* B, const T* C, int ldbc, const T* Dskip, const RaggedBatch& rb, int H, int P, int G,
                    int N, float dt_min, float dt_max, void* workspace, cudaStream_t stream) {
  HM_CHECK(H > 0 && G > 0 && H % G == 0 && P > 0 && N > 0, "cuda ssd_scan_train: ", H, " heads of ", P, " in ", G,
           " groups, d_state ", N, " do not fit");
  HM_CHECK(rb.nseq <= 65535 && H <= 65535, "cuda ssd_scan_train: at most 65535 sequences and heads, got ", rb.nseq,
           " and ", H);
  if (rb.nseq <= 0 || rb.n_tokens <= 0) return;
  if (ssd_scan_chunked_fits(P, N)) {
    forward_chunked<T>(y, ldy, nullptr, x, ldx, dt, lddt, dt_bias, A_log, true, B, C, ldbc, Dskip, rb, H, P, G, N,
                       dt_min, dt_max, stream);
    return;
  }
  float* pool = static_cast<float*>(workspace);
  float* A = pool + size_t(rb.nseq) * size_t(H) * size_t(P) * size_t(N);
  HM_CUDA_OK(cudaMemsetAsync(pool, 0, size_t(rb.nseq) * size_t(H) * size_t(P) * size_t(N) * sizeof(float), stream),
             "cudaMemsetAsync");
  neg_exp_kernel<<<ceil_div(H, 128), 128, 0, stream>>>(A, A_log, H);
  HM_CUDA_LAUNCHED("ssd_scan_train");
  // Training batches put sequence s in slot s (BatchGrad's Ragged): the pool is dense.
  ssd_scan<T>(y, ldy, pool, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, rb, H, P, G, N, dt_min, dt_max, stream);
}

template <class T>
void ssd_scan_backward(T* dx, int lddx, T* ddt, int lddt_out, T* dB, T* dC, int lddbc, float* ddt_bias, float* dA_log,
                       float* dDskip, const T* dy, int lddy, const T* x, int ldx, const T* dt, int lddt,
                       const T* dt_bias, const float* A_log, const T* B, const T* C, int ldbc, const T* Dskip,
                       const RaggedBatch& rb, int H, int P, int G, int N, float dt_min, float dt_max,
                       void* workspace, cudaStream_t stream) {
  HM_CHECK(H > 0 && G > 0 && H % G == 0 && P > 0 && N > 0, "cuda ssd_scan_backward: ", H, " heads of ", P, " in ", G,
           " groups, d_state ", N, " do not fit");
  HM_CHECK(rb.nseq <= 65535 && H <= 65535, "cuda ssd_scan_backward: at most 65535 sequences and heads, got ", rb.nseq,
           " and ", H);
  if (rb.nseq <= 0 || rb.n_tokens <= 0) return;
  const bool chunked = ssd_backward_kernel_for(P, N) == SsdBackward::Chunked;
  const SsdLayout l = layout_of(rb, H, P, N, chunked);
  char* ws = static_cast<char*>(workspace);
  float* part_bc = reinterpret_cast<float*>(ws + l.bc);
  double* part_p = reinterpret_cast<double*>(ws + l.p);
  const ChunkLayout o = chunk_layout(P, N);
  const size_t smem = chunked_smem_bytes(P, N);
  Segs sg{nullptr, nullptr, nullptr, l.seg_chunks, l.max_seg, false};
  if (chunked) {
    if (l.max_seg > 1) {
      const size_t n = size_t(l.seqs) * size_t(H) * size_t(l.max_seg) * size_t(P) * size_t(N);
      sg.S = reinterpret_cast<float*>(ws + l.segs);
      sg.G = sg.S + n;
      sg.a = sg.G + n;
    }
  }
  // Rows of empty sequences and padding of part_bc are never read; part_p is written by every block.
  // Each block's results depend on its own (sequence, head) only, so the slices give the same bits.
  for (int s0 = 0; s0 < rb.nseq; s0 += l.seqs) {
    const int n = std::min(l.seqs, rb.nseq - s0);
    const dim3 grid(unsigned(H), unsigned(n), unsigned(chunked ? l.max_seg : 1));
    float* scratch = reinterpret_cast<float*>(ws + l.scratch);
    // The chunked kernel's form: 512 threads where one block fills an SM (N 128 at P 64: 159 KB;
    // stop 50's ncu: 12% occupancy with 8 warps), tensor-core products for 16-bit data.
    const bool wide = g_threads == 512 || (g_threads == 0 && resident_blocks(P, N) <= device_limits().sms);
    auto launch = [&](const Segs& sgs) {
      auto go = [&](auto kernel, int threads) {
        HM_CUDA_OK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                   "cudaFuncSetAttribute (ssd_scan_backward)");
        kernel<<<grid, threads, smem, stream>>>(dx, lddx, ddt, lddt_out, part_bc, part_p, dy, lddy, x, ldx, dt, lddt,
                                                dt_bias, A_log, B, C, ldbc, Dskip, rb.cu_seqlens, H, P, G, N, dt_min,
                                                dt_max, scratch, l.block_floats, o, s0, sgs);
      };
      constexpr bool k16 = !std::is_same_v<T, float>;  // float data keeps float products
      if (k16 && g_tensor_cores) {
        if (wide)
          go(ssd_backward_chunked_kernel<T, 2 * kCT, k16>, 2 * kCT);
        else
          go(ssd_backward_chunked_kernel<T, kCT, k16>, kCT);
      } else if (wide) {
        go(ssd_backward_chunked_kernel<T, 2 * kCT, false>, 2 * kCT);
      } else {
        go(ssd_backward_chunked_kernel<T, kCT, false>, kCT);
      }
    };
    if (chunked && sg.S != nullptr) {
      Segs local = sg;
      local.local = true;
      launch(local);
      HM_CUDA_LAUNCHED("ssd_scan_backward (segments)");
      ssd_segment_pass_kernel<<<dim3(unsigned(ceil_div(P * N, 256)), unsigned(H), unsigned(n)), 256, 0, stream>>>(
          sg, rb.cu_seqlens, s0, H, P * N);
      HM_CUDA_LAUNCHED("ssd_scan_backward (segment pass)");
    }
    if (chunked)
      launch(sg);
    else
      ssd_backward_kernel<T><<<grid, kThreads, 0, stream>>>(
          dx, lddx, ddt, lddt_out, part_bc, part_p, dy, lddy, x, ldx, dt, lddt, dt_bias, A_log, B, C, ldbc, Dskip,
          rb.cu_seqlens, H, P, G, N, dt_min, dt_max, reinterpret_cast<double*>(ws + l.scratch),
          scratch_of(rb.max_len, P, N), s0);
    HM_CUDA_LAUNCHED("ssd_scan_backward");
  }
  const int64_t nbc = int64_t(rb.n_tokens) * G * N;
  ssd_bc_finish_kernel<T><<<unsigned((nbc + 255) / 256), 256, 0, stream>>>(dB, dC, lddbc, part_bc, rb.n_tokens, H, G,
                                                                          N);
  HM_CUDA_LAUNCHED("ssd_scan_backward (dB, dC)");
  ssd_param_finish_kernel<<<ceil_div(H, 128), 128, 0, stream>>>(ddt_bias, dA_log, dDskip, part_p, rb.nseq, H,
                                                                  l.max_seg);
  HM_CUDA_LAUNCHED("ssd_scan_backward (parameters)");
}

size_t gated_rmsnorm_backward_workspace_bytes(int n, int E, int group) {
  if (n <= 0 || E <= 0 || group <= 0) return 0;
  return (size_t(n) * size_t(E / group) + size_t(ceil_div(n, norm_rows_per_chunk(n))) * size_t(E)) * sizeof(float);
}

template <class T>
void gated_rmsnorm_backward(T* dy, int lddy, T* dz, int lddz, float* dw, const T* dout, int lddo, const T* y, int ldy,
                            const T* z, int ldz, const T* w, int n, int E, int group, float eps, void* workspace,
                            cudaStream_t stream) {
  HM_CHECK(group > 0 && E % group == 0, "cuda gated_rmsnorm_backward: group ", group, " does not divide ", E);
  if (n <= 0 || E <= 0) return;
  float* rstd = static_cast<float*>(workspace);
  float* part = rstd + size_t(n) * size_t(E / group);
  const int rpc = norm_rows_per_chunk(n), chunks = ceil_div(n, rpc);
  gated_norm_dx_kernel<T><<<unsigned(ceil_div(n, kNormWarps)), 32 * kNormWarps, 0, stream>>>(
      dy, lddy, dz, lddz, rstd, dout, lddo, y, ldy, z, ldz, w, n, E, group, eps);
  HM_CUDA_LAUNCHED("gated_rmsnorm_backward (dy, dz)");
  gated_norm_dw_partial_kernel<T><<<dim3(unsigned(ceil_div(E, 32)), unsigned(chunks)), dim3(32, kNormPhases), 0,
                                    stream>>>(part, dout, lddo, y, ldy, z, ldz, rstd, n, E, group, rpc);
  HM_CUDA_LAUNCHED("gated_rmsnorm_backward (dw partials)");
  column_sums<float>(part, chunks, E, AddToF32{dw}, stream, "gated_rmsnorm_backward (dw)");
}

#define HM_INST(T)                                                                                              \
  template void ssd_scan_train<T>(T*, int, const T*, int, const T*, int, const T*, const float*, const T*,       \
                                  const T*, int, const T*, const RaggedBatch&, int, int, int, int, float, float,  \
                                  void*, cudaStream_t);                                                           \
  template void ssd_scan_backward<T>(T*, int, T*, int, T*, T*, int, float*, float*, float*, const T*, int,        \
                                     const T*, int, const T*, int, const T*, const float*, const T*, const T*, int, \
                                     const T*, const RaggedBatch&, int, int, int, int, float, float, void*,       \
                                     cudaStream_t);                                                               \
  template void gated_rmsnorm_backward<T>(T*, int, T*, int, float*, const T*, int, const T*, int, const T*, int,   \
                                          const T*, int, int, int, float, void*, cudaStream_t);                    \
  template void ssd_scan_chunked<T>(T*, int, float*, const T*, int, const T*, int, const T*, const float*,          \
                                    const T*, const T*, int, const T*, const RaggedBatch&, int, int, int, int,    \
                                    float, float, cudaStream_t);
HM_CUDA_FOR_TYPES(HM_INST)
#undef HM_INST

}  // namespace hm::cuda
