// linear_packed's GEMV and row dequantization with AVX2 + FMA + F16C, compiled for x86-64-v3
// whatever the rest of the build targets (every AMD EPYC and Intel core since Haswell has it).
// Keep this file free of shared inline code (see quant_isa.h). The method is
// quant_avx512.cpp's with 8-lane vectors: a block is four scaled vectors, x stays float32.
#include <immintrin.h>

#include <cstring>

#include "kernels/cpu/quant_isa.h"

namespace hm::cpu::packed {
namespace {

inline __m256 widen_bf16(const unsigned char* p) {  // 8 bf16 -> 8 floats
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

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

struct Bf16 {
  static constexpr int kStride = 0;  // no scales
  static void block(const unsigned char* row, int b, const float*, const float*, __m256* w) {
    for (int c = 0; c < 4; ++c) w[c] = widen_bf16(row + b * 64 + c * 16);
  }
  // The last n < 32 weights starting at element 32 * b; the rest read as 0.
  static void tail(const unsigned char* row, int b, int n, __m256* w) {
    unsigned char buf[64] = {};
    std::memcpy(buf, row + b * 64, size_t(n) * 2);
    block(buf, 0, nullptr, nullptr, w);
  }
};

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
  const int nb = k / 32, rest = k % 32;  // rest: bf16 only
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
        F::block(row, b, ds + b - b0, nd + b - b0, w);
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
      F::block(row, b, ds + b - b0, nd + b - b0, w);
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

}  // namespace

Table avx2_table() {
  return {{gemv_m<Bf16>, gemv_m<Q8>, gemv_m<Q4>}, {dequant<Bf16>, dequant<Q8>, dequant<Q4>}};
}

}  // namespace hm::cpu::packed
