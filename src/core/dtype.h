// Element types: those a safetensors file can store, of which weights, activations and KV caches
// use F32, BF16 and F16 (backend/tensor.h). Defined in io/safetensors.cpp.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace hm {

enum class DType : uint8_t { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

size_t dtype_size(DType);
const char* dtype_name(DType);            // "F32" ...
DType dtype_from_name(std::string_view);  // throws hm::Error on unknown

// IEEE binary16, round-to-nearest-even; inf, NaN and subnormals exact.
float f16_to_f32(uint16_t);
uint16_t f32_to_f16(float);
// bfloat16, round-to-nearest-even; NaN stays NaN (quieted), never rounds to inf.
float bf16_to_f32(uint16_t);
uint16_t f32_to_bf16(float);

}  // namespace hm
