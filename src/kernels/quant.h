// Packed weight formats for linear layers (issue 17) and the kernels that multiply by them.
//
// A weight W [n, k] (PyTorch Linear layout: n outputs, k inputs) is stored row by row; each row
// is packed on its own, so row r starts at r * row_bytes(type, k).
//
//  - BF16: k bfloat16 values (the top 16 bits of the float), rounded to nearest even.
//  - F16:  k IEEE binary16 values, rounded to nearest even (core/dtype.h's f32_to_f16: NaN and
//          inf stay themselves, small values become f16 subnormals or 0). A finite weight
//          beyond the f16 range (|w| >= 65520, which would round to inf) is an hm::Error.
//  - Q8_0: k/32 blocks of {f16 d; int8 q[32]} (34 bytes), w = d * q. Per block,
//          amax = max |w|, d = amax / 127, q = round-half-away(w / d) in [-127, 127].
//  - Q4_0: k/32 blocks of {f16 d; uint8 qs[16]} (18 bytes), w = d * (nibble - 8).
//          Per block, m = the first value of largest |w| (sign kept), d = m / -8, and
//          nibble = min(15, floor(w / d + 8.5)) in [0, 15]; byte j holds element j in its low
//          nibble and element j + 16 in its high nibble.
//  The quantized formats are llama.cpp's q8_0 and q4_0 (same blocks, scales and rounding: a
//  model quantized by either gives the same bytes). In both, the division is a multiplication
//  by 1/d with d in float32 before its rounding to f16, and d = 0 (an all-zero block) gives
//  q = 0. k must be a multiple of 32 for them (no tail rule: every hidden size in use is one);
//  any other k is an hm::Error.
//
// linear_packed: y[m,n] (=|+=) x'[m,k] . dequantize(W)[n,k]^T, sums in float32, where
//  - bf16, f16: x' = x;
//  - q8_0 / q4_0: x' = x rounded to 8 bits per block of 32 as llama.cpp's CPU matmuls do:
//    d = amax / 127 in float32, x' = d * nearbyint(x / d) (ties to even; x / d computed as
//    x * (1 / d)); a block holding NaN or inf gives NaN. Decode then runs on integer dot
//    products (VNNI / vpmaddubsw), 2x the speed of widening the weights to float (measured:
//    bench/bench_quant.cpp, docs/PERFORMANCE.md); prefill feeds the same x' to sgemm, so the
//    two paths compute one function. round_x8 is that rounding (relative error <= 1/254 of a
//    block's largest |x|).
// Only the order of the additions differs between ref and cpu.
//
// hm::ref holds the plain loops (the oracle); hm::cpu the fast ones: a GEMV path for m <= 4
// (decode: reads each weight byte once) and a GEMM path above (dequantizes L2-sized panels of
// W and multiplies them with sgemm). The cpu path picks its SIMD code at run time (AVX-512 with
// VNNI, AVX2+FMA+F16C, or scalar), so one binary runs on any x86-64.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace hm {

enum class WeightType : uint8_t { BF16, Q8_0, Q4_0, F16 };
const char* weight_type_name(WeightType t);  // "bf16" | "f16" | "q8_0" | "q4_0"
WeightType weight_type_from_name(const std::string& name);  // hm::Error for anything else

constexpr int kQuantBlock = 32;  // weights per q8_0 / q4_0 block, along k
// q8_0 / q4_0: blocks of kQuantBlock weights with a scale (k a multiple of 32; x rounded to 8
// bits); bf16 / f16: one 16-bit value per weight, any k, x as given.
constexpr bool is_block_format(WeightType t) { return t == WeightType::Q8_0 || t == WeightType::Q4_0; }

struct BlockQ8_0 {
  uint16_t d;  // f16 bits
  int8_t q[kQuantBlock];
};
struct BlockQ4_0 {
  uint16_t d;  // f16 bits
  uint8_t qs[kQuantBlock / 2];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18, "packed block layout");

// Bytes of one packed row of k weights; hm::Error when k is not valid for the type.
size_t row_bytes(WeightType t, int k);

}  // namespace hm

#define HM_DECLARE_QUANT_KERNELS                                                                   \
  /* dst = n rows of k packed weights (n * row_bytes(t, k) bytes) from src [n, k] */               \
  void quantize(WeightType t, void* dst, const float* src, int n, int k);                         \
  /* dst [n, k] = the values the packed rows stand for */                                          \
  void dequantize(WeightType t, float* dst, const void* src, int n, int k);                       \
  /* y[m,n] (=|+=) x[m,k] . dequantize(W)^T; W is n packed rows of k */                            \
  void linear_packed(float* y, int ldy, const float* x, int ldx, const void* W, WeightType t,     \
                     int m, int n, int k, bool accumulate);

namespace hm::ref {
HM_DECLARE_QUANT_KERNELS
// out[k] = x[k] rounded to 8 bits per block of 32, as linear_packed does for q8_0 / q4_0.
void round_x8(float* out, const float* x, int k);
}  // namespace hm::ref
namespace hm::cpu {
HM_DECLARE_QUANT_KERNELS

// The SIMD code the cpu kernels run. The best one the CPU supports is chosen on first use;
// tests force each in turn.
// Avx2: x86-64-v3 (AVX2, FMA, F16C, BMI1/2); Avx512: x86-64-v4 (F, BW, DQ, CD, VL) and VNNI.
// The float kernels choose theirs the same way (kernels/cpu/dispatch.h).
enum class Isa : uint8_t { Scalar, Avx2, Avx512 };
const char* isa_name(Isa isa);  // "scalar" | "avx2" | "avx512"
bool isa_supported(Isa isa);    // by this CPU (and OS)
Isa best_isa();
Isa default_isa();  // HM_ISA=scalar|avx2|avx512 if set (hm::Error if not supported), else best_isa()
Isa quant_isa();                // the one in use
void set_quant_isa(Isa isa);    // hm::Error if this CPU does not support it
}  // namespace hm::cpu
