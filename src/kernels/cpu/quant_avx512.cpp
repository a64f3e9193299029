// linear_packed's GEMV and row dequantization with AVX-512 (F, BW, VL), compiled for
// x86-64-v4 whatever the rest of the build targets; called only where the CPU has it.
// Keep this file free of shared inline code (see quant_isa.h).
//
// Each 32-weight block is widened to two 16-lane float vectors already multiplied by its scale
// (the same float products d * q as the reference), then multiplied with x by FMAs: x stays
// float32, so the result is the reference's up to the order of additions. Decode is bound by
// reading W; the widening costs 2-3 instructions per 16 weights, far below that bound.
#include <immintrin.h>

// g++ 12's AVX-512 intrinsics start from _mm512_undefined_*(), which it then reports as
// maybe-uninitialized (simd.h works around the same with masked forms).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

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
struct Bf16 {
  static constexpr int kStride = 0;  // no scales
  static void block(const unsigned char* row, int b, const float*, const float*, __m512& w0, __m512& w1) {
    const unsigned char* p = row + b * 64;
    w0 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
    w1 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))), 16));
  }
  // The last n < 32 weights starting at element 32 * b; lanes past them read as 0.
  static void tail(const unsigned char* row, int b, int n, __m512& w0, __m512& w1) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(row + b * 64);
    const __mmask16 m0 = __mmask16(n >= 16 ? 0xffff : (1u << n) - 1u);
    const __mmask16 m1 = __mmask16(n <= 16 ? 0 : (1u << (n - 16)) - 1u);
    w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m0, p)), 16));
    w1 = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m1, p + 16)), 16));
  }
};

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
  const int nb = k / 32, rest = k % 32;  // rest: bf16 only
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
        F::block(row, b, ds + b - b0, nd + b - b0, w0, w1);
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
        F::block(row, b, ds + b - b0, nd + b - b0, w0, w1);
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
      F::block(row, b, ds + b - b0, nd + b - b0, w0, w1);
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

}  // namespace

Table avx512_table() {
  return {{gemv_m<Bf16>, gemv_m<Q8>, gemv_m<Q4>}, {dequant<Bf16>, dequant<Q8>, dequant<Q4>}};
}

}  // namespace hm::cpu::packed
