#include "backend/tensor.h"

#include <algorithm>
#include <cstring>

#include "backend/backend.h"
#include "io/safetensors.h"
#include "kernels/quant.h"

namespace hm {

DType compute_dtype_from_name(const std::string& name) {
  if (name == "f32") return DType::F32;
  if (name == "bf16") return DType::BF16;
  if (name == "f16") return DType::F16;
  throw Error(detail::cat("type must be f32, bf16 or f16, got '", name, "'"));
}

const char* compute_dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::Q8_0: return "q8_0";
    case DType::Q4_0: return "q4_0";
    default: return dtype_name(t);
  }
}

DType weight_format_from_name(const std::string& name) {
  for (DType t : {DType::F32, DType::BF16, DType::F16, DType::Q8_0, DType::Q4_0})
    if (name == compute_dtype_name(t)) return t;
  throw Error(detail::cat("weight format must be f32, bf16, f16, q8_0 or q4_0, got '", name, "'"));
}

WeightType weight_type_of(DType t) {
  switch (t) {
    case DType::BF16: return WeightType::BF16;
    case DType::F16: return WeightType::F16;
    case DType::Q8_0: return WeightType::Q8_0;
    case DType::Q4_0: return WeightType::Q4_0;
    default: break;
  }
  throw Error(detail::cat(compute_dtype_name(t), " is not a weight format (bf16, f16, q8_0 or q4_0)"));
}

size_t packed_row_bytes(DType t, int cols) {
  HM_CHECK(is_packed(t), "packed_row_bytes: ", dtype_name(t), " is not a packed type");
  return row_bytes(weight_type_of(t), cols);
}

void convert_from_f32(void* dst, DType t, const float* src, size_t n) {
  if (t == DType::F32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  auto* d = static_cast<uint16_t*>(dst);
  if (t == DType::BF16)
    for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
  else
    for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
}

void convert_to_f32(float* dst, const void* src, DType t, size_t n) {
  if (t == DType::F32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  const auto* s = static_cast<const uint16_t*>(src);
  if (t == DType::BF16)
    for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  else
    for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
}

void Ragged::upload(Backend& be) {
  const int n = nseq();
  if (!d_ || n > cap_ || be_ != &be) {
    if (d_) be_->free(d_);
    be_ = &be;
    cap_ = std::max(n, 2 * cap_);
    d_ = static_cast<int32_t*>(be.alloc(sizeof(int32_t) * (3 * size_t(cap_) + 1)));
  }
  staging_.assign(3 * size_t(cap_) + 1, 0);
  std::copy(cu_.begin(), cu_.end(), staging_.begin());
  std::copy(slots_.begin(), slots_.end(), staging_.begin() + cap_ + 1);
  std::copy(pos0_.begin(), pos0_.end(), staging_.begin() + 2 * cap_ + 1);
  be.to_device(d_, staging_.data(), sizeof(int32_t) * staging_.size());
}

Ragged::~Ragged() {
  if (d_) be_->free(d_);
}

}  // namespace hm
