// linear_packed's kernels with AVX-512 (F, BW, VL, VNNI), compiled for x86-64-v4 + VNNI
// whatever the rest of the build targets; called only where the CPU has them. Keep this file
// free of shared inline code (see quant_isa.h).
//
// bf16 / f16: each 32 weights are widened to two 16-lane float vectors (a shift, or F16C's
// vcvtph2ps) and multiplied with float x by FMAs. q8_0 / q4_0: x arrives rounded to int8 per block; one VNNI instruction (vpdpbusd,
// unsigned x signed bytes) per 32 weights and x row gives 8 partial sums, started from minus
// the offset the unsigned weights add (q8_0 + 128, q4_0 nibbles are q + 8); they are scaled by
// d_w d_x in float. These use 256-bit vectors: ports 0, 1 and 5 stay available (512-bit
// instructions leave port 1 idle) and a block is one vector without shuffles across lanes.
// Widening q4_0 to float instead ran at 7 GB/s per core from L2 (0.6 of the DRAM floor).
#include <immintrin.h>

// g++ 12's AVX-512 intrinsics start from _mm512_undefined_*(), which it then reports as
// maybe-uninitialized (simd.h works around the same with masked forms). clang has no such
// warning (and warns about the unknown name).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <cstring>

#include "kernels/cpu/quant_isa.h"

namespace hm::cpu::packed {
namespace {

// A row's block scales, converted 16 at a time: ds[i] = d of block b0 + i, nd[i] = -8 d.
// Broadcasting a float from memory costs a load; converting one f16 per block costs shuffles on
// the port the widening already saturates.
constexpr int kChunk = 64;  // blocks per batch of scales
inline void scales(const unsigned char* row, int b0, int nb, int stride, float* ds, float* nd) {
  alignas(32) uint16_t h[kChunk] = {};
  for (int i = 0; i < nb; ++i) std::memcpy(&h[i], row + size_t(b0 + i) * stride, 2);
  for (int i = 0; i < nb; i += 16) {
    const __m512 d = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(h + i)));
    _mm512_store_ps(ds + i, d);
    _mm512_store_ps(nd + i, _mm512_mul_ps(d, _mm512_set1_ps(-8.0f)));
  }
}

// The formats, each as "weights 32 b .. 32 b + 31 of a row as two vectors", with d and nd the
// block's entries of scales().
// 16 bf16 or f16 -> 16 floats.
inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 widen_f16(__m256i h) { return _mm512_cvtph_ps(h); }

// bf16 or f16: 16 bits per weight, widened by Widen.
template <__m512 (*Widen)(__m256i)>
struct Half {
  static constexpr int kStride = 0;  // no scales
  static void block(const unsigned char* row, int b, const float*, const float*, __m512& w0, __m512& w1) {
    const unsigned char* p = row + b * 64;
    w0 = Widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    w1 = Widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
  }
  // The last n < 32 weights starting at element 32 * b; lanes past them read as 0.
  static void tail(const unsigned char* row, int b, int n, __m512& w0, __m512& w1) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(row + b * 64);
    const __mmask16 m0 = __mmask16(n >= 16 ? 0xffff : (1u << n) - 1u);
    const __mmask16 m1 = __mmask16(n <= 16 ? 0 : (1u << (n - 16)) - 1u);
    w0 = Widen(_mm256_maskz_loadu_epi16(m0, p));
    w1 = Widen(_mm256_maskz_loadu_epi16(m1, p + 16));
  }
};
using Bf16 = Half<widen_bf16>;
using F16 = Half<widen_f16>;

struct Q8 {
  static constexpr int kStride = 34;
  static void block(const unsigned char* row, int b, const float* d, const float*, __m512& w0, __m512& w1) {
    const unsigned char* p = row + b * 34;
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 18));
    w0 = _mm512_mul_ps(_mm512_set1_ps(*d), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)));
    w1 = _mm512_mul_ps(_mm512_set1_ps(*d), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
  }
  static void tail(const unsigned char*, int, int, __m512& w0, __m512& w1) {  // k % 32 == 0
    w0 = w1 = _mm512_setzero_ps();
  }
};

struct Q4 {
  static constexpr int kStride = 18;
  // d (q - 8) as one rounding of q d + (-8 d): the reference's product exactly (-8 d is exact).
  static void block(const unsigned char* row, int b, const float* d, const float* nd, __m512& w0, __m512& w1) {
    const unsigned char* p = row + b * 18;
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2)));
    const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(15));
    const __m512i hi = _mm512_srli_epi32(v, 4);
    w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(*d), _mm512_set1_ps(*nd));
    w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(*d), _mm512_set1_ps(*nd));
  }
  static void tail(const unsigned char*, int, int, __m512& w0, __m512& w1) {  // k % 32 == 0
    w0 = w1 = _mm512_setzero_ps();
  }
};

// M rows of x against rows [n0, n1) of W. Two blocks per step into four accumulators per x
// row, so that no FMA waits on the previous one.
template <int M, class F>
void gemv(float* y, int ldy, const float* x, int ldx, const unsigned char* W, size_t row_bytes,
          int n0, int n1, int k, bool accumulate) {
  const int nb = k / 32, rest = k % 32;  // rest: bf16 / f16 only
  for (int o = n0; o < n1; ++o) {
    const unsigned char* row = W + size_t(o) * row_bytes;
    __m512 a[M][4];
    for (int i = 0; i < M; ++i)
      for (int c = 0; c < 4; ++c) a[i][c] = _mm512_setzero_ps();
    alignas(64) float ds[kChunk], nd[kChunk];
    int b = 0;
    for (int b0 = 0; b0 < nb; b0 += kChunk) {
      const int b1 = nb - b0 < kChunk ? nb : b0 + kChunk;
      if (F::kStride) scales(row, b0, b1 - b0, F::kStride, ds, nd);
      for (b = b0; b + 2 <= b1; b += 2) {
        __m512 w0, w1, w2, w3;
        F::block(row, b, ds + (b - b0), nd + (b - b0), w0, w1);
        F::block(row, b + 1, ds + b + 1 - b0, nd + b + 1 - b0, w2, w3);
        for (int i = 0; i < M; ++i) {
          const float* xi = x + size_t(i) * ldx + b * 32;
          a[i][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), a[i][0]);
          a[i][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), a[i][1]);
          a[i][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xi + 32), a[i][2]);
          a[i][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xi + 48), a[i][3]);
        }
      }
      if (b < b1) {
        __m512 w0, w1;
        F::block(row, b, ds + (b - b0), nd + (b - b0), w0, w1);
        for (int i = 0; i < M; ++i) {
          const float* xi = x + size_t(i) * ldx + b * 32;
          a[i][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), a[i][0]);
          a[i][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), a[i][1]);
        }
        ++b;
      }
    }
    if (rest) {
      __m512 w0, w1;
      F::tail(row, b, rest, w0, w1);
      const __mmask16 m0 = __mmask16(rest >= 16 ? 0xffff : (1u << rest) - 1u);
      const __mmask16 m1 = __mmask16(rest <= 16 ? 0 : (1u << (rest - 16)) - 1u);
      for (int i = 0; i < M; ++i) {
        const float* xi = x + size_t(i) * ldx + b * 32;
        a[i][2] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, xi), a[i][2]);
        a[i][3] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, xi + 16), a[i][3]);
      }
    }
    for (int i = 0; i < M; ++i) {
      const float s = _mm512_reduce_add_ps(
          _mm512_add_ps(_mm512_add_ps(a[i][0], a[i][1]), _mm512_add_ps(a[i][2], a[i][3])));
      float& out = y[size_t(i) * ldy + o];
      out = accumulate ? out + s : s;
    }
  }
}

template <class F>
void gemv_m(float* y, int ldy, const float* x, int ldx, const unsigned char* W, size_t row_bytes,
            int m, int n0, int n1, int k, bool accumulate) {
  switch (m) {
    case 1: gemv<1, F>(y, ldy, x, ldx, W, row_bytes, n0, n1, k, accumulate); break;
    case 2: gemv<2, F>(y, ldy, x, ldx, W, row_bytes, n0, n1, k, accumulate); break;
    case 3: gemv<3, F>(y, ldy, x, ldx, W, row_bytes, n0, n1, k, accumulate); break;
    default: gemv<4, F>(y, ldy, x, ldx, W, row_bytes, n0, n1, k, accumulate); break;
  }
}

template <class F>
void dequant(float* out, const unsigned char* row, int k) {
  const int nb = k / 32, rest = k % 32;
  alignas(64) float ds[kChunk], nd[kChunk];
  for (int b0 = 0; b0 < nb; b0 += kChunk) {
    const int b1 = nb - b0 < kChunk ? nb : b0 + kChunk;
    if (F::kStride) scales(row, b0, b1 - b0, F::kStride, ds, nd);
    for (int b = b0; b < b1; ++b) {
      __m512 w0, w1;
      F::block(row, b, ds + (b - b0), nd + (b - b0), w0, w1);
      _mm512_storeu_ps(out + b * 32, w0);
      _mm512_storeu_ps(out + b * 32 + 16, w1);
    }
  }
  if (rest) {
    __m512 w0, w1;
    F::tail(row, nb, rest, w0, w1);
    _mm512_mask_storeu_ps(out + nb * 32, __mmask16(rest >= 16 ? 0xffff : (1u << rest) - 1u), w0);
    _mm512_mask_storeu_ps(out + nb * 32 + 16, __mmask16(rest <= 16 ? 0 : (1u << (rest - 16)) - 1u), w1);
  }
}

void quantize_x(int8_t* q, float* d, int32_t* s, const float* x, int k) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int b = 0; b < k / 32; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
    const bool bad = (_mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) |
                      _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q)) != 0 || amax > 3.4e38f;
    const float db = amax / 127.0f;
    const __m512 inv = _mm512_set1_ps(db != 0 && !bad ? 1.0f / db : 0.0f);
    // cvtps rounds to nearest even (the MXCSR default), as the reference's nearbyint.
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * 32), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * 32 + 16), _mm512_cvtepi32_epi8(q1));
    d[b] = bad ? __builtin_nanf("") : db;
    s[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

inline float hsum(__m256 v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

// M rows of rounded x against rows [n0, n1) of a q8_0 (Q4 false) or q4_0 W.
template <int M, bool Q4>
void gemv_q(float* y, int ldy, const int8_t* xq, const float* xd, const int32_t* xs,
            const unsigned char* W, size_t row_bytes, int n0, int n1, int k, bool accumulate) {
  const int nb = k / 32, stride = Q4 ? 18 : 34;
  for (int o = n0; o < n1; ++o) {
    const unsigned char* row = W + size_t(o) * row_bytes;
    __m256 a[M][2];
    for (int i = 0; i < M; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
    alignas(64) float ds[kChunk], nd[kChunk], cs[M][kChunk];
    alignas(64) int32_t off[M][kChunk];
    for (int b0 = 0; b0 < nb; b0 += kChunk) {
      const int cnt = nb - b0 < kChunk ? nb - b0 : kChunk;
      scales(row, b0, cnt, stride, ds, nd);
      // Per x row and block: the float scale d_w d_x, and minus the offset the unsigned
      // weights add to the dot product, spread over its 8 lanes (q8_0: 128 s / 8, q4_0: 8 s / 8).
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < cnt; ++j) {
          cs[i][j] = ds[j] * xd[size_t(i) * nb + b0 + j];
          // In unsigned arithmetic (the same bits): a NaN x block sums to INT_MIN (its output is
          // NaN anyway through its scale), and the product would overflow as int.
          off[i][j] = int32_t((0u - (Q4 ? 1u : 16u)) * uint32_t(xs[size_t(i) * nb + b0 + j]));
        }
      // Two accumulators per x row, even and odd blocks, written out so that they stay in
      // registers (an index j & 1 puts them on the stack).
      auto step = [&](int j, int c) {
        const unsigned char* p = row + size_t(b0 + j) * stride + 2;
        __m256i w;
        if (Q4) {
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
          w = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1),
                               _mm256_set1_epi8(15));
        } else {
          w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_set1_epi8(-128));
        }
        for (int i = 0; i < M; ++i) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + size_t(i) * k + (b0 + j) * 32));
          const __m256i dot = _mm256_dpbusd_epi32(_mm256_set1_epi32(off[i][j]), w, xv);
          a[i][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(cs[i][j]), a[i][c]);
        }
      };
      int j = 0;
      for (; j + 2 <= cnt; j += 2) {
        step(j, 0);
        step(j + 1, 1);
      }
      if (j < cnt) step(j, 0);
    }
    for (int i = 0; i < M; ++i) {
      const float sum = hsum(_mm256_add_ps(a[i][0], a[i][1]));
      float& out = y[size_t(i) * ldy + o];
      out = accumulate ? out + sum : sum;
    }
  }
}

template <bool Q4>
void gemv_q_m(float* y, int ldy, const int8_t* xq, const float* xd, const int32_t* xs,
              const unsigned char* W, size_t row_bytes, int m, int n0, int n1, int k, bool accumulate) {
  switch (m) {
    case 1: gemv_q<1, Q4>(y, ldy, xq, xd, xs, W, row_bytes, n0, n1, k, accumulate); break;
    case 2: gemv_q<2, Q4>(y, ldy, xq, xd, xs, W, row_bytes, n0, n1, k, accumulate); break;
    case 3: gemv_q<3, Q4>(y, ldy, xq, xd, xs, W, row_bytes, n0, n1, k, accumulate); break;
    default: gemv_q<4, Q4>(y, ldy, xq, xd, xs, W, row_bytes, n0, n1, k, accumulate); break;
  }
}

// ---- prefill: integer GEMM ----------------------------------------------------------------------
// A panel of 32 rows of W is repacked per block into 8 groups of 4 k-bytes x 32 rows (lane o of
// a vector holds row o's 4 bytes, as unsigned: q8_0 q + 128, q4_0 the nibble), then the block's
// 32 scales as floats. One 512-bit vpdpbusd multiplies 16 rows' 4 bytes by 4 bytes of an x row
// (broadcast), so a block's whole 32-term dot lands in one lane: 64 multiply-adds per
// instruction against sgemm's 16 per FMA. Per x row and block the int sum starts from minus the
// unsigned offset (128 or 8 times the sum of x's q) and is scaled by d_w d_x into float.

template <bool Q4>
void repack_panel(unsigned char* dst, const unsigned char* W, size_t row_bytes, int o0, int rows, int nb) {
  const int stride = Q4 ? 18 : 34;
  for (int b = 0; b < nb; ++b) {
    unsigned char* blk = dst + size_t(b) * kGemmScratchPerBlock;
    float* ds = reinterpret_cast<float*>(blk + kGemmPanel * 32);
    for (int o = 0; o < kGemmPanel; ++o) {
      alignas(32) unsigned char u[32];
      if (o >= rows) {
        std::memset(u, 0, sizeof u);
        ds[o] = 0.0f;
      } else {
        const unsigned char* p = W + size_t(o0 + o) * row_bytes + size_t(b) * stride;
        uint16_t h;
        std::memcpy(&h, p, 2);
        ds[o] = _cvtsh_ss(h);
        if (Q4) {
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
          _mm_store_si128(reinterpret_cast<__m128i*>(u), _mm_and_si128(v, _mm_set1_epi8(15)));
          _mm_store_si128(reinterpret_cast<__m128i*>(u + 16), _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15)));
        } else {
          _mm256_store_si256(reinterpret_cast<__m256i*>(u),
                             _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2)),
                                              _mm256_set1_epi8(-128)));
        }
      }
      for (int g = 0; g < 8; ++g) std::memcpy(blk + (g * kGemmPanel + o) * 4, u + 4 * g, 4);
    }
  }
}

// MR rows of x against one repacked panel: y[i, o0 + o] for o < cols.
template <int MR, bool Q4>
void gemm_tile(float* y, int ldy, const int8_t* xq, const float* xd, const int32_t* xs, const unsigned char* panel,
               int nb, int k, int cols, bool accumulate) {
  __m512 f[MR][2];
  for (int i = 0; i < MR; ++i) f[i][0] = f[i][1] = _mm512_setzero_ps();
  for (int b = 0; b < nb; ++b) {
    const unsigned char* p = panel + size_t(b) * kGemmScratchPerBlock;
    __m512i acc[MR][2];
    for (int i = 0; i < MR; ++i)  // unsigned arithmetic: see gemv_q
      acc[i][0] = acc[i][1] = _mm512_set1_epi32(int32_t((0u - (Q4 ? 8u : 128u)) * uint32_t(xs[size_t(i) * nb + b])));
    for (int g = 0; g < 8; ++g) {
      const __m512i w0 = _mm512_load_si512(p + g * 128), w1 = _mm512_load_si512(p + g * 128 + 64);
      for (int i = 0; i < MR; ++i) {
        int32_t xv;
        std::memcpy(&xv, xq + size_t(i) * k + b * 32 + g * 4, 4);
        const __m512i xb = _mm512_set1_epi32(xv);
        acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], w0, xb);
        acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], w1, xb);
      }
    }
    const __m512 d0 = _mm512_load_ps(p + kGemmPanel * 32), d1 = _mm512_load_ps(p + kGemmPanel * 32 + 64);
    for (int i = 0; i < MR; ++i) {
      const __m512 dx = _mm512_set1_ps(xd[size_t(i) * nb + b]);
      f[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), _mm512_mul_ps(d0, dx), f[i][0]);
      f[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), _mm512_mul_ps(d1, dx), f[i][1]);
    }
  }
  const __mmask16 m0 = __mmask16(cols >= 16 ? 0xffff : (1u << cols) - 1u);
  const __mmask16 m1 = __mmask16(cols <= 16 ? 0 : cols >= 32 ? 0xffff : (1u << (cols - 16)) - 1u);
  for (int i = 0; i < MR; ++i) {
    float* yi = y + size_t(i) * ldy;
    __m512 v0 = f[i][0], v1 = f[i][1];
    if (accumulate) {
      v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, yi), v0);
      v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, yi + 16), v1);
    }
    _mm512_mask_storeu_ps(yi, m0, v0);
    _mm512_mask_storeu_ps(yi + 16, m1, v1);
  }
}

constexpr int kTileRows = 6;  // x rows per tile: 12 int + 12 float accumulators

template <bool Q4>
void gemm_q(float* y, int ldy, const int8_t* xq, const float* xd, const int32_t* xs, const unsigned char* W,
            size_t row_bytes, int m, int n0, int n1, int k, bool accumulate, unsigned char* scratch) {
  const int nb = k / 32;
  for (int o0 = n0; o0 < n1; o0 += kGemmPanel) {
    const int cols = n1 - o0 < kGemmPanel ? n1 - o0 : kGemmPanel;
    repack_panel<Q4>(scratch, W, row_bytes, o0, cols, nb);
    int i = 0;
    for (; i + kTileRows <= m; i += kTileRows)
      gemm_tile<kTileRows, Q4>(y + size_t(i) * ldy + o0, ldy, xq + size_t(i) * k, xd + size_t(i) * nb,
                               xs + size_t(i) * nb, scratch, nb, k, cols, accumulate);
    float* yi = y + size_t(i) * ldy + o0;
    const int8_t* xqi = xq + size_t(i) * k;
    const float* xdi = xd + size_t(i) * nb;
    const int32_t* xsi = xs + size_t(i) * nb;
    switch (m - i) {
      case 5: gemm_tile<5, Q4>(yi, ldy, xqi, xdi, xsi, scratch, nb, k, cols, accumulate); break;
      case 4: gemm_tile<4, Q4>(yi, ldy, xqi, xdi, xsi, scratch, nb, k, cols, accumulate); break;
      case 3: gemm_tile<3, Q4>(yi, ldy, xqi, xdi, xsi, scratch, nb, k, cols, accumulate); break;
      case 2: gemm_tile<2, Q4>(yi, ldy, xqi, xdi, xsi, scratch, nb, k, cols, accumulate); break;
      case 1: gemm_tile<1, Q4>(yi, ldy, xqi, xdi, xsi, scratch, nb, k, cols, accumulate); break;
      default: break;
    }
  }
}

}  // namespace

Table avx512_table() {
  return {{gemv_m<Bf16>, gemv_m<F16>}, {gemv_q_m<false>, gemv_q_m<true>}, quantize_x,
          {dequant<Bf16>, dequant<Q8>, dequant<Q4>, dequant<F16>}, {gemm_q<false>, gemm_q<true>}};
}

}  // namespace hm::cpu::packed
