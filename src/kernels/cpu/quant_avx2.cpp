// linear_packed's kernels with AVX2 + FMA + F16C, compiled for x86-64-v3 whatever the rest of
// the build targets (every AMD EPYC and Intel core since Haswell has them). Keep this file free
// of shared inline code (see quant_isa.h). The method is quant_avx512.cpp's; without VNNI the
// q8_0 / q4_0 dot products are vpmaddubsw (unsigned x signed bytes, pairs summed into int16)
// and vpmaddwd (pairs into int32). Their int16 sums saturate past 32767, so q8_0 takes the
// sign of w onto x and multiplies |w| <= 127 (2 * 127 * 127 fits); q4_0 nibbles are <= 15.
#include <immintrin.h>

#include <cstring>

#include "kernels/cpu/quant_isa.h"

namespace hm::cpu::packed {
namespace {

// 8 bf16 or f16 (F16C) -> 8 floats.
inline __m256 widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline __m256 widen_f16(__m128i h) { return _mm256_cvtph_ps(h); }

// A row's block scales, converted 8 at a time: ds[i] = d of block b0 + i, nd[i] = -8 d (see
// quant_avx512.cpp).
constexpr int kChunk = 64;  // blocks per batch of scales
inline void scales(const unsigned char* row, int b0, int nb, int stride, float* ds, float* nd) {
  alignas(16) uint16_t h[kChunk] = {};
  for (int i = 0; i < nb; ++i) std::memcpy(&h[i], row + size_t(b0 + i) * stride, 2);
  for (int i = 0; i < nb; i += 8) {
    const __m256 d = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h + i)));
    _mm256_store_ps(ds + i, d);
    _mm256_store_ps(nd + i, _mm256_mul_ps(d, _mm256_set1_ps(-8.0f)));
  }
}

// bf16 or f16: 16 bits per weight, widened by Widen.
template <__m256 (*Widen)(__m128i)>
struct Half {
  static constexpr int kStride = 0;  // no scales
  static void block(const unsigned char* row, int b, const float*, const float*, __m256* w) {
    for (int c = 0; c < 4; ++c) w[c] = Widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 64 + c * 16)));
  }
  // The last n < 32 weights starting at element 32 * b; the rest read as 0.
  static void tail(const unsigned char* row, int b, int n, __m256* w) {
    unsigned char buf[64] = {};
    std::memcpy(buf, row + b * 64, size_t(n) * 2);
    block(buf, 0, nullptr, nullptr, w);
  }
};
using Bf16 = Half<widen_bf16>;
using F16 = Half<widen_f16>;

struct Q8 {
  static constexpr int kStride = 34;
  static void block(const unsigned char* row, int b, const float* d, const float*, __m256* w) {
    const unsigned char* p = row + b * 34;
    for (int c = 0; c < 4; ++c) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 + 8 * c));
      w[c] = _mm256_mul_ps(_mm256_set1_ps(*d), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
  }
  static void tail(const unsigned char*, int, int, __m256* w) {  // never called: k % 32 == 0
    for (int c = 0; c < 4; ++c) w[c] = _mm256_setzero_ps();
  }
};

struct Q4 {
  static constexpr int kStride = 18;
  // d (q - 8) as one rounding of q d + (-8 d), as in quant_avx512.cpp.
  static void block(const unsigned char* row, int b, const float* d, const float* nd, __m256* w) {
    const unsigned char* p = row + b * 18;
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(v, mask);                      // elements 0..15
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);  // 16..31
    const __m256 dv = _mm256_set1_ps(*d), ndv = _mm256_set1_ps(*nd);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dv, ndv);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), dv, ndv);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dv, ndv);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), dv, ndv);
  }
  static void tail(const unsigned char*, int, int, __m256* w) {  // never called: k % 32 == 0
    for (int c = 0; c < 4; ++c) w[c] = _mm256_setzero_ps();
  }
};

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// M rows of x against rows [n0, n1) of W: a block per step, four accumulators per x row.
template <int M, class F>
void gemv(float* y, int ldy, const float* x, int ldx, const unsigned char* W, size_t row_bytes,
          int n0, int n1, int k, bool accumulate) {
  const int nb = k / 32, rest = k % 32;  // rest: bf16 / f16 only
  for (int o = n0; o < n1; ++o) {
    const unsigned char* row = W + size_t(o) * row_bytes;
    __m256 a[M][4];
    for (int i = 0; i < M; ++i)
      for (int c = 0; c < 4; ++c) a[i][c] = _mm256_setzero_ps();
    alignas(32) float ds[kChunk], nd[kChunk];
    for (int b0 = 0; b0 < nb; b0 += kChunk) {
      const int b1 = nb - b0 < kChunk ? nb : b0 + kChunk;
      if (F::kStride) scales(row, b0, b1 - b0, F::kStride, ds, nd);
      for (int b = b0; b < b1; ++b) {
        __m256 w[4];
        F::block(row, b, ds + (b - b0), nd + (b - b0), w);
        for (int i = 0; i < M; ++i) {
          const float* xi = x + size_t(i) * ldx + b * 32;
          for (int c = 0; c < 4; ++c) a[i][c] = _mm256_fmadd_ps(w[c], _mm256_loadu_ps(xi + 8 * c), a[i][c]);
        }
      }
    }
    if (rest) {
      __m256 w[4];
      F::tail(row, nb, rest, w);
      for (int i = 0; i < M; ++i) {
        float xt[32] = {};
        std::memcpy(xt, x + size_t(i) * ldx + nb * 32, size_t(rest) * 4);
        for (int c = 0; c < 4; ++c) a[i][c] = _mm256_fmadd_ps(w[c], _mm256_loadu_ps(xt + 8 * c), a[i][c]);
      }
    }
    for (int i = 0; i < M; ++i) {
      const float s = hsum(_mm256_add_ps(_mm256_add_ps(a[i][0], a[i][1]), _mm256_add_ps(a[i][2], a[i][3])));
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
  __m256 w[4];
  alignas(32) float ds[kChunk], nd[kChunk];
  for (int b0 = 0; b0 < nb; b0 += kChunk) {
    const int b1 = nb - b0 < kChunk ? nb : b0 + kChunk;
    if (F::kStride) scales(row, b0, b1 - b0, F::kStride, ds, nd);
    for (int b = b0; b < b1; ++b) {
      F::block(row, b, ds + (b - b0), nd + (b - b0), w);
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + b * 32 + 8 * c, w[c]);
    }
  }
  if (rest) {
    float buf[32];
    F::tail(row, nb, rest, w);
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(buf + 8 * c, w[c]);
    std::memcpy(out + nb * 32, buf, size_t(rest) * 4);
  }
}

inline int32_t hsum_i32(__m256i v) {
  __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
  a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xb1));
  return _mm_cvtsi128_si32(a);
}

inline float hmax(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
}

void quantize_x(int8_t* q, float* d, int32_t* s, const float* x, int k) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int b = 0; b < k / 32; ++b) {
    __m256 v[4];
    __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      v[c] = _mm256_loadu_ps(x + b * 32 + 8 * c);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[c]));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v[c], v[c], _CMP_UNORD_Q));
    }
    const float amax = hmax(m);
    const bool bad = _mm256_movemask_ps(nan) != 0 || amax > 3.4e38f;
    const float db = amax / 127.0f;
    const __m256 inv = _mm256_set1_ps(db != 0 && !bad ? 1.0f / db : 0.0f);
    __m256i qi[4];  // rounded to nearest even (MXCSR default), as the reference's nearbyint
    for (int c = 0; c < 4; ++c) qi[c] = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], inv));
    // packs work within 128-bit lanes: the permute puts the 4-byte groups back in order.
    const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
    const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                   _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * 32), p8);
    d[b] = bad ? __builtin_nanf("") : db;
    s[b] = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3])));
  }
}

// M rows of rounded x against rows [n0, n1) of a q8_0 (Q4 false) or q4_0 W.
template <int M, bool Q4>
void gemv_q(float* y, int ldy, const int8_t* xq, const float* xd, const int32_t* xs,
            const unsigned char* W, size_t row_bytes, int n0, int n1, int k, bool accumulate) {
  const int nb = k / 32, stride = Q4 ? 18 : 34;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int o = n0; o < n1; ++o) {
    const unsigned char* row = W + size_t(o) * row_bytes;
    __m256 a[M][2];
    for (int i = 0; i < M; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
    alignas(32) float ds[kChunk], nd[kChunk], cs[M][kChunk];
    alignas(32) int32_t off[M][kChunk];
    for (int b0 = 0; b0 < nb; b0 += kChunk) {
      const int cnt = nb - b0 < kChunk ? nb - b0 : kChunk;
      scales(row, b0, cnt, stride, ds, nd);
      // q4_0's nibbles are q + 8: minus 8 s over the 8 lanes.
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < cnt; ++j) {
          cs[i][j] = ds[j] * xd[size_t(i) * nb + b0 + j];
          // Negated in unsigned arithmetic: a NaN x block sums to INT_MIN (whose output is
          // NaN anyway through its scale), and negating INT_MIN as int is undefined.
          off[i][j] = int32_t(0u - uint32_t(xs[size_t(i) * nb + b0 + j]));
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
          w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        }
        const __m256i aw = Q4 ? w : _mm256_sign_epi8(w, w);  // |w|
        for (int i = 0; i < M; ++i) {
          __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + size_t(i) * k + (b0 + j) * 32));
          if (!Q4) xv = _mm256_sign_epi8(xv, w);
          __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones);
          if (Q4) dot = _mm256_add_epi32(dot, _mm256_set1_epi32(off[i][j]));
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

}  // namespace

Table avx2_table() {
  return {{gemv_m<Bf16>, gemv_m<F16>}, {gemv_q_m<false>, gemv_q_m<true>}, quantize_x,
          {dequant<Bf16>, dequant<Q8>, dequant<Q4>, dequant<F16>}, {nullptr, nullptr}};
}

}  // namespace hm::cpu::packed
