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

// The formats, each as "weights j..j+31 of a row as two scaled vectors".
struct Bf16 {
  static void block(const unsigned char* row, int b, __m512& w0, __m512& w1) {
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

inline float scale_of(const unsigned char* blk) {
  uint16_t h;
  std::memcpy(&h, blk, 2);
  return _cvtsh_ss(h);
}

struct Q8 {
  static void block(const unsigned char* row, int b, __m512& w0, __m512& w1) {
    const unsigned char* p = row + b * 34;
    const __m512 d = _mm512_set1_ps(scale_of(p));
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 18));
    w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)));
    w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
  }
  static void tail(const unsigned char*, int, int, __m512& w0, __m512& w1) {  // k % 32 == 0
    w0 = w1 = _mm512_setzero_ps();
  }
};

struct Q4 {
  static void block(const unsigned char* row, int b, __m512& w0, __m512& w1) {
    const unsigned char* p = row + b * 18;
    const __m512 d = _mm512_set1_ps(scale_of(p));
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2)));
    const __m512i eight = _mm512_set1_epi32(8);
    const __m512i lo = _mm512_sub_epi32(_mm512_and_si512(v, _mm512_set1_epi32(15)), eight);
    const __m512i hi = _mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight);
    w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo));
    w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi));
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
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
      __m512 w0, w1, w2, w3;
      F::block(row, b, w0, w1);
      F::block(row, b + 1, w2, w3);
      for (int i = 0; i < M; ++i) {
        const float* xi = x + size_t(i) * ldx + b * 32;
        a[i][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), a[i][0]);
        a[i][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), a[i][1]);
        a[i][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xi + 32), a[i][2]);
        a[i][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xi + 48), a[i][3]);
      }
    }
    if (b < nb) {
      __m512 w0, w1;
      F::block(row, b, w0, w1);
      for (int i = 0; i < M; ++i) {
        const float* xi = x + size_t(i) * ldx + b * 32;
        a[i][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), a[i][0]);
        a[i][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), a[i][1]);
      }
      ++b;
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
  for (int b = 0; b < nb; ++b) {
    __m512 w0, w1;
    F::block(row, b, w0, w1);
    _mm512_storeu_ps(out + b * 32, w0);
    _mm512_storeu_ps(out + b * 32 + 16, w1);
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
