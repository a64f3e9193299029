// The per-ISA kernels behind hm::cpu::linear_packed (kernels/quant.h), one table per ISA.
// quant_avx2.cpp and quant_avx512.cpp are compiled with their own -march (CMakeLists.txt), so
// they must not define anything the linker could share with another file: no inline functions
// or templates with external linkage (std::min, std::vector, ...), only this header, the
// intrinsics and file-local code. Otherwise an AVX-512 copy of a shared inline function could be
// the one the linker keeps, and a baseline caller would die on an AVX2 CPU.
#pragma once
#include <cstddef>
#include <cstdint>

namespace hm::cpu::packed {

// Rows o in [n0, n1) of y[m, n] (=|+=) x[m, k] . W^T for 1 <= m <= 4 and bf16 or f16 W, packed
// row by row (row o at W + o * row_bytes).
using GemvFn = void (*)(float* y, int ldy, const float* x, int ldx, const unsigned char* W,
                        size_t row_bytes, int m, int n0, int n1, int k, bool accumulate);
// One row of x rounded to 8 bits per block of 32 (kernels/quant.h): q[k], and per block its
// scale d[k / 32] and the sum of its q, s[k / 32]. A block with a NaN or inf gets d = NaN.
using QuantizeXFn = void (*)(int8_t* q, float* d, int32_t* s, const float* x, int k);
// As GemvFn for q8_0 / q4_0 W, with x given by QuantizeXFn: row i at xq + i k, xd + i k/32,
// xs + i k/32. Integer dot products per block, scaled in float.
using GemvQFn = void (*)(float* y, int ldy, const int8_t* xq, const float* xd, const int32_t* xs,
                         const unsigned char* W, size_t row_bytes, int m, int n0, int n1, int k,
                         bool accumulate);
// out[k] = one packed row as floats.
using DequantFn = void (*)(float* out, const unsigned char* row, int k);
// Prefill by integer GEMM: rows o in [n0, n1) of y[m, n] (=|+=) for any m >= 1, x and W as
// GemvQFn's. W is repacked kGemmPanel rows at a time into scratch (kGemmScratchPerBlock bytes
// per block of k, 64-byte aligned, the calling thread's own). Null where the ISA has none: the
// caller then widens panels of W for sgemm.
using GemmQFn = void (*)(float* y, int ldy, const int8_t* xq, const float* xd, const int32_t* xs,
                         const unsigned char* W, size_t row_bytes, int m, int n0, int n1, int k,
                         bool accumulate, unsigned char* scratch);
constexpr int kGemmPanel = 32;
constexpr size_t kGemmScratchPerBlock = kGemmPanel * 32 + kGemmPanel * 4;  // bytes, then scales

struct Table {
  GemvFn gemv_half[2];  // bf16, f16
  GemvQFn gemv_q[2];    // q8_0, q4_0
  QuantizeXFn quantize_x;
  DequantFn dequant[4];  // by WeightType: BF16, Q8_0, Q4_0, F16
  GemmQFn gemm_q[2];     // q8_0, q4_0 (null: none)
};

Table scalar_table();
Table avx2_table();
Table avx512_table();

}  // namespace hm::cpu::packed
