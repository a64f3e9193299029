// Element types: those a safetensors file can store, of which weights, activations and KV caches
// use F32, BF16 and F16 (backend/tensor.h), then the packed weight formats Q8_0 and Q4_0
// (kernels/quant.h), which only a linear layer's W has in memory. They are types of the backend
// interface, not file types: the safetensors name table does not hold them, so no file can
// declare them (a checkpoint stores packed rows as U8, docs/QUANTIZATION.md). Defined in
// io/safetensors.cpp.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace hm {

enum class DType : uint8_t { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64,
                          Q8_0, Q4_0 };

// Q8_0 and Q4_0: blocks of 32 weights along a row, so a size per row (packed_row_bytes in
// backend/tensor.h), never per element: dtype_size throws hm::Error for them.
constexpr bool is_packed(DType t) { return t == DType::Q8_0 || t == DType::Q4_0; }

size_t dtype_size(DType);
const char* dtype_name(DType);            // "F32" ... "Q8_0", "Q4_0"
DType dtype_from_name(std::string_view);  // file dtypes only; throws hm::Error on others

// IEEE binary16, round-to-nearest-even; inf, NaN and subnormals exact.
float f16_to_f32(uint16_t);
uint16_t f32_to_f16(float);
// bfloat16, round-to-nearest-even; NaN stays NaN (quieted), never rounds to inf.
float bf16_to_f32(uint16_t);
uint16_t f32_to_bf16(float);

}  // namespace hm
