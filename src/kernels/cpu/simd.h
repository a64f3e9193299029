// What the CPU kernels share: 16-lane float vectors and their math (exp, softplus, silu,
// reductions, transposes), aligned scratch buffers, and thread-team helpers.
// The vectors are GCC vector extensions one register wide: 16 lanes on AVX-512, 8 on AVX2, 4
// on baseline SSE2 (wider than a register, g++ keeps them in memory: 3-5x slower). Kernels are
// written for kW lanes. The places where an ISA has a better instruction (masked load/store,
// f16 conversion, gather/scatter, round, scalef, min/max) have their AVX-512 and AVX2 forms
// beside a plain fallback.
//
// Only the per-ISA kernel files include this: CMakeLists.txt compiles each of them once per ISA
// (scalar = baseline x86-64, avx2 = x86-64-v3, avx512 = x86-64-v4) with HM_ISA_NS naming that
// ISA, and dispatch.cpp picks one table of them at startup. Everything here and in those files
// lives in hm::cpu::HM_ISA_NS, so no inline function or template instantiation is shared
// between ISAs (an AVX-512 copy kept by the linker would kill a baseline caller on an AVX2 CPU);
// containers use AlignedVec with this ISA's tag for the same reason. tests/check_isa_objects.sh
// checks the result with objdump.
#pragma once
#include <omp.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#include "kernels/cpu/aligned.h"

#if !defined(HM_ISA_NS)
#error "simd.h is for the per-ISA kernel files: CMakeLists.txt defines HM_ISA_NS for them"
#endif

#if defined(__AVX512F__)
#if !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "the avx512 kernels need AVX512F, BW and VL (-march=x86-64-v4)"
#endif
#define HM_SIMD_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__)
#if !defined(__FMA__) || !defined(__F16C__)
#error "the avx2 kernels need AVX2, FMA and F16C (-march=x86-64-v3)"
#endif
#define HM_SIMD_AVX2 1
#include <immintrin.h>
#else
#include "core/dtype.h"  // scalar f16 conversions (defined out of line: nothing shared inline)
#endif

// Forced inlining: besides speed, it keeps g++ from warning (-Wpsabi) that 64-byte vector
// arguments change the calling convention when the target lacks AVX-512; the pragma covers
// the cases it still reports. Nothing here is called across an ABI boundary.
#define HM_SIMD_INLINE [[gnu::always_inline]] inline
#if !defined(HM_SIMD_AVX512)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace hm::cpu::HM_ISA_NS::simd {

#if defined(HM_SIMD_AVX512)
constexpr int kW = 16;  // lanes
constexpr int kRegs = 32;  // vector registers, for sizing register blocks
#elif defined(HM_SIMD_AVX2)
constexpr int kW = 8;
constexpr int kRegs = 16;
#else
constexpr int kW = 4;
constexpr int kRegs = 16;
#endif
typedef float vf __attribute__((vector_size(4 * kW)));
typedef int32_t vi __attribute__((vector_size(4 * kW)));

// Lane c = c.
HM_SIMD_INLINE vi iota() {
  vi v;
  for (int c = 0; c < kW; ++c) v[c] = c;
  return v;
}

// s - 0 folds to s (s + 0 does not: -0 + 0 = +0), so this is a bare broadcast.
HM_SIMD_INLINE vf splat(float s) { return s - vf{}; }
// a * b + c, in one rounding where the ISA has FMA whatever the compiler's contraction choices
// (a kernel whose result must not depend on its code path spells it out); baseline x86-64 has
// no FMA: two roundings, the same everywhere.
HM_SIMD_INLINE vf fmadd(vf a, vf b, vf c) {
#if defined(HM_SIMD_AVX512)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(HM_SIMD_AVX2)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}
// Keeps v in a register from here on. g++ otherwise folds the load of a vector that is used by
// several FMAs into each of them, re-reading it from L1 every time, which makes register-
// blocked loops load-bound instead of FMA-bound.
HM_SIMD_INLINE void pin(vf& v) {
#if defined(HM_SIMD_AVX512)
  asm("" : "+v"(v));
#else
  asm("" : "+x"(v));
#endif
}

HM_SIMD_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
HM_SIMD_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

#if defined(HM_SIMD_AVX2)
// Lane i set (all bits) where i < n: the mask of maskload / maskstore / gather.
HM_SIMD_INLINE __m256i mask8(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

// The first n lanes (0 <= n <= 16) from p; the others read as 0 and touch no memory.
HM_SIMD_INLINE vf load_n(const float* p, int n) {
#if defined(HM_SIMD_AVX512)
  return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), p);
#elif defined(HM_SIMD_AVX2)
  return _mm256_maskload_ps(p, mask8(n));
#else
  vf v{};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}
HM_SIMD_INLINE void store_n(float* p, vf v, int n) {
#if defined(HM_SIMD_AVX512)
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1u), v);
#elif defined(HM_SIMD_AVX2)
  _mm256_maskstore_ps(p, mask8(n), v);
#else
  for (int i = 0; i < n; ++i) p[i] = v[i];
#endif
}
// Full vector when n >= 16, masked otherwise.
HM_SIMD_INLINE vf load_upto(const float* p, int n) { return n >= kW ? load(p) : load_n(p, n); }
HM_SIMD_INLINE void store_upto(float* p, vf v, int n) {
  if (n >= kW) store(p, v); else store_n(p, v, n);
}

// IEEE binary16 storage (uint16_t bits): the same loads and stores on half-precision memory,
// widened to / narrowed from float lanes, so a kernel templated on the element type reads
// either. Widening is exact; narrowing rounds to nearest even, like hm::f32_to_f16 (inf on
// overflow, subnormal halves kept, NaN quieted with its top payload bits).
#if defined(HM_SIMD_AVX512)
// maskz forms: the unmasked ones start from an undefined register (see round_nearest).
HM_SIMD_INLINE vf widen(__m256i h) { return _mm512_maskz_cvtph_ps(0xffff, h); }
HM_SIMD_INLINE __m256i narrow(vf v) {
  return _mm512_maskz_cvtps_ph(0xffff, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#elif defined(HM_SIMD_AVX2)
HM_SIMD_INLINE vf widen(__m128i h) { return _mm256_cvtph_ps(h); }
HM_SIMD_INLINE __m128i narrow(vf v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
#endif
HM_SIMD_INLINE vf load(const uint16_t* p) {
#if defined(HM_SIMD_AVX512)
  return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(HM_SIMD_AVX2)
  return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int i = 0; i < kW; ++i) v[i] = hm::f16_to_f32(p[i]);
  return v;
#endif
}
HM_SIMD_INLINE void store(uint16_t* p, vf v) {
#if defined(HM_SIMD_AVX512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v));
#elif defined(HM_SIMD_AVX2)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(v));
#else
  for (int i = 0; i < kW; ++i) p[i] = hm::f32_to_f16(v[i]);
#endif
}
HM_SIMD_INLINE vf load_n(const uint16_t* p, int n) {
#if defined(HM_SIMD_AVX512)
  return widen(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1u), p));
#else
  uint16_t h[kW] = {};
  std::memcpy(h, p, sizeof(uint16_t) * n);
  return load(h);
#endif
}
HM_SIMD_INLINE void store_n(uint16_t* p, vf v, int n) {
#if defined(HM_SIMD_AVX512)
  _mm256_mask_storeu_epi16(p, __mmask16((1u << n) - 1u), narrow(v));
#else
  uint16_t h[kW];
  store(h, v);
  std::memcpy(p, h, sizeof(uint16_t) * n);
#endif
}
HM_SIMD_INLINE vf load_upto(const uint16_t* p, int n) { return n >= kW ? load(p) : load_n(p, n); }
HM_SIMD_INLINE void store_upto(uint16_t* p, vf v, int n) {
  if (n >= kW) store(p, v); else store_n(p, v, n);
}

#if defined(HM_SIMD_AVX512)
// The masked forms with an explicit source: the plain ones start from _mm512_undefined_ps,
// which g++ 12 reports as uninitialized.
HM_SIMD_INLINE vf round_nearest(vf u) {
  return _mm512_mask_roundscale_ps(u, 0xffff, u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
HM_SIMD_INLINE vf scale2(vf p, vf n) { return _mm512_mask_scalef_ps(p, 0xffff, p, n); }  // p * 2^n
#endif

// Lane c (c < n) = p[c * stride]: a column of a row-major block; other lanes 0.
HM_SIMD_INLINE vf load_strided(const float* p, int stride, int n) {
#if defined(HM_SIMD_AVX512)
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(stride));
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), __mmask16((1u << n) - 1u), idx, p, 4);
#elif defined(HM_SIMD_AVX2)
  const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm256_set1_epi32(stride));
  return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), p, idx, _mm256_castsi256_ps(mask8(n)), 4);
#else
  vf v{};
  for (int c = 0; c < n; ++c) v[c] = p[c * stride];
  return v;
#endif
}
HM_SIMD_INLINE void store_strided(float* p, int stride, vf v, int n) {
#if defined(HM_SIMD_AVX512)
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(stride));
  _mm512_mask_i32scatter_ps(p, __mmask16((1u << n) - 1u), idx, v, 4);
#else
  for (int c = 0; c < n; ++c) p[c * stride] = v[c];
#endif
}

#if defined(HM_SIMD_AVX512)
// g++ turns the portable forms below into compare + blend. (Masked forms: see round_nearest.)
HM_SIMD_INLINE vf vmax(vf a, vf b) { return _mm512_mask_max_ps(a, 0xffff, a, b); }
HM_SIMD_INLINE vf vmin(vf a, vf b) { return _mm512_mask_min_ps(a, 0xffff, a, b); }
#elif defined(HM_SIMD_AVX2)
HM_SIMD_INLINE vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
HM_SIMD_INLINE vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
#else
HM_SIMD_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
HM_SIMD_INLINE vf vmin(vf a, vf b) { return a < b ? a : b; }
#endif
HM_SIMD_INLINE vf vabs(vf a) { return (vf)((vi)a & 0x7fffffff); }

namespace detail {
// Lane c takes lane c ^ d: a butterfly step of a reduction.
template <int d, std::size_t... c>
HM_SIMD_INLINE vf butterfly(vf v, std::index_sequence<c...>) {
  return __builtin_shufflevector(v, v, int(c ^ d)...);
}
}  // namespace detail

namespace detail {
// Every lane = the sum (max) of all lanes: butterflies d, d/2, ..., 1 from d = kW/2.
template <int d>
HM_SIMD_INLINE vf all_sum(vf v) {
  v += butterfly<d>(v, std::make_index_sequence<kW>());
  if constexpr (d > 1) return all_sum<d / 2>(v); else return v;
}
template <int d>
HM_SIMD_INLINE vf all_max(vf v) {
  v = vmax(v, butterfly<d>(v, std::make_index_sequence<kW>()));
  if constexpr (d > 1) return all_max<d / 2>(v); else return v;
}
}  // namespace detail

HM_SIMD_INLINE float hsum(vf v) { return detail::all_sum<kW / 2>(v)[0]; }
HM_SIMD_INLINE float hmax(vf v) { return detail::all_max<kW / 2>(v)[0]; }

// 2^f for f in [-0.5, 0.5]: degree-5 polynomial fitted for least maximum relative error;
// 1.1e-7 approximation error, 1.7e-7 after float rounding (measured on 2e5 points). p(0) = 1.
HM_SIMD_INLINE vf exp2_poly(vf f) {
  vf p = splat(1.3305848697200418e-3f);
  p = p * f + 9.672403335571289e-3f;
  p = p * f + 5.550599470734596e-2f;
  p = p * f + 2.402222603559494e-1f;
  p = p * f + 6.931470632553101e-1f;
  return p * f + 1.0f;
}

// 2^u with relative error <= 2e-7; 0 below -150 (and for -inf), inf above 128.
HM_SIMD_INLINE vf vexp2(vf u) {
#if defined(HM_SIMD_AVX512)
  u = vmin(vmax(u, splat(-160.f)), splat(160.f));  // keeps u - round(u) finite for +-inf
  const vf n = round_nearest(u);
  return scale2(exp2_poly(u - n), n);
#else
  const vf uc = vmin(vmax(u, splat(-126.f)), splat(127.f));
  const vf t = uc + 12582912.f;  // 1.5 * 2^23: rounds to an integer, kept in the low bits
  const vf n = t - 12582912.f;
  const vf r = exp2_poly(uc - n) * (vf)(((vi)t << 23) + (127 << 23));
  return u < -126.f ? vf{} : r;
#endif
}

// 2^u for finite u <= 0 (a decay factor), without vexp2's clamps on the AVX-512 path.
HM_SIMD_INLINE vf vexp2_decay(vf u) {
#if defined(HM_SIMD_AVX512)
  const vf n = round_nearest(u);
  return scale2(exp2_poly(u - n), n);
#else
  return vexp2(u);
#endif
}

// e^x with relative error ~2e-7 (Cody-Waite reduction keeps it independent of |x|).
HM_SIMD_INLINE vf vexp(vf x) {
  x = vmin(vmax(x, splat(-110.f)), splat(110.f));
  const vf u = x * 1.44269504088896341f;
#if defined(HM_SIMD_AVX512)
  const vf n = round_nearest(u);
#else
  const vf n = (u + 12582912.f) - 12582912.f;
#endif
  vf r = x - n * 0.693359375f;  // ln 2 split in two: n * hi is exact
  r = r - n * -2.12194440e-4f;
  const vf p = exp2_poly(r * 1.44269504088896341f);
#if defined(HM_SIMD_AVX512)
  return scale2(p, n);
#else
  // Split 2^n in two factors so that |n| up to 160 stays representable.
  const vi ni = __builtin_convertvector(n, vi);
  const vi h = ni >> 1;
  return p * (vf)((h + 127) << 23) * (vf)((ni - h + 127) << 23);
#endif
}

HM_SIMD_INLINE vf vsilu(vf x) { return x / (1.0f + vexp(-x)); }

// log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), with log1p(w) = 2 atanh(w / (2 + w)), which
// stays accurate for tiny w; atanh(s)/s is a degree-4 fit in s^2 on s in [0, 1/3]
// (5e-9 relative). For x > 20 this rounds to x, matching the reference's branch.
HM_SIMD_INLINE vf vsoftplus(vf x) {
  const vf w = vexp(-vabs(x));
  const vf s = w / (2.0f + w);
  const vf q = s * s;
  vf p = splat(0.14011630415916443f);
  p = p * q + 0.1400052011013031f;
  p = p * q + 0.2001071721315384f;
  p = p * q + 0.3333321213722229f;
  p = p * q + 1.0f;
  return vmax(x, vf{}) + 2.0f * s * p;
}

namespace detail {
// Rows i and i+d (i & d == 0) exchange their off-diagonal d-lane blocks.
template <int d, std::size_t... c>
HM_SIMD_INLINE void swap_blocks(vf& a, vf& b, std::index_sequence<c...>) {
  const vf lo = __builtin_shufflevector(a, b, ((c & d) ? int(kW + c - d) : int(c))...);
  const vf hi = __builtin_shufflevector(a, b, ((c & d) ? int(kW + c) : int(c + d))...);
  a = lo;
  b = hi;
}
template <int d>
HM_SIMD_INLINE void swap_stage(vf* r) {
  for (int i = 0; i < kW; ++i)
    if (!(i & d)) swap_blocks<d>(r[i], r[i + d], std::make_index_sequence<kW>());
}
// v[i] and v[i + d] folded into v[i]: their lanes with bit d clear and set, respectively,
// each holding the sum of a pair of lanes d apart.
template <int d>
HM_SIMD_INLINE void fold(vf* v) {
#pragma GCC unroll 8
  for (int i = 0; i < d; ++i) {
    vf a = v[i], b = v[i + d];
    swap_blocks<d>(a, b, std::make_index_sequence<kW>());
    v[i] = a + b;
  }
}
}  // namespace detail

namespace detail {
template <int d>
HM_SIMD_INLINE void fold_all(vf* v) {
  fold<d>(v);
  if constexpr (d > 1) fold_all<d / 2>(v);
}
template <int d>
HM_SIMD_INLINE void swap_all(vf* r) {
  swap_stage<d>(r);
  if constexpr (d > 1) swap_all<d / 2>(r);
}
}  // namespace detail

// Lane c = the sum of v[c]'s lanes, for kW vectors (v is clobbered): for 16 lanes 30 shuffles
// and 15 adds instead of 16 separate reductions.
HM_SIMD_INLINE vf hsum_lanes(vf* v) {
  detail::fold_all<kW / 2>(v);
  return v[0];
}

// In-place transpose of a kW x kW block held as kW row vectors: log2(kW) stages of block
// swaps, no memory round trip.
HM_SIMD_INLINE void transpose(vf* r) { detail::swap_all<kW / 2>(r); }

// Containers of this ISA's own instantiation (see the top of the file).
struct IsaTag {};
template <class T>
using Buf = AlignedVec<T, IsaTag>;
using FloatBuf = Buf<float>;

// buf grown to at least n floats (never shrunk: the buffers are per-thread and reused).
inline float* scratch(FloatBuf& buf, std::size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Runs body(thread, threads) on an OpenMP team when `parallel`, else inline on this thread:
// even a team of one (an `if` clause that is false) costs ~0.3 us in libgomp, as much as a
// one-token kernel.
template <class Body>
void run_team(bool parallel, Body&& body) {
  if (!parallel) {
    body(0, 1);
    return;
  }
#pragma omp parallel
  body(omp_get_thread_num(), omp_get_num_threads());
}

// fn(task) for tasks 0..n-1, handed out one at a time (a dynamic schedule) to the team, or
// run in order on this thread.
template <class Fn>
void for_tasks(bool parallel, int n, Fn&& fn) {
  std::atomic<int> next{0};
  run_team(parallel, [&](int, int) {
    for (int task; (task = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(task);
  });
}

// Thread id's contiguous share [first, second) of n items.
inline std::pair<int, int> share(int n, int id, int nt) {
  return {int(long(n) * id / nt), int(long(n) * (id + 1) / nt)};
}

}  // namespace hm::cpu::HM_ISA_NS::simd
