// Packed weight formats, the plain way (the oracle for kernels/cpu/quant_cpu.cpp): one block at
// a time, in the order kernels/quant.h describes them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "kernels/quant.h"

namespace hm {

const char* weight_type_name(WeightType t) {
  switch (t) {
    case WeightType::BF16: return "bf16";
    case WeightType::F16: return "f16";
    case WeightType::Q8_0: return "q8_0";
    case WeightType::Q4_0: return "q4_0";
  }
  return "?";
}

WeightType weight_type_from_name(const std::string& name) {
  for (WeightType t : {WeightType::BF16, WeightType::F16, WeightType::Q8_0, WeightType::Q4_0})
    if (name == weight_type_name(t)) return t;
  throw Error("unknown weight type '" + name + "' (expected bf16, f16, q8_0 or q4_0)");
}

size_t row_bytes(WeightType t, int k) {
  HM_CHECK(k > 0, "packed weights: k = ", k, " must be positive");
  if (!is_block_format(t)) return size_t(k) * 2;
  HM_CHECK(k % kQuantBlock == 0, "packed weights: k = ", k, " is not a multiple of ", kQuantBlock,
           " (the ", weight_type_name(t), " block size)");
  const size_t blocks = size_t(k / kQuantBlock);
  return blocks * (t == WeightType::Q8_0 ? sizeof(BlockQ8_0) : sizeof(BlockQ4_0));
}

}  // namespace hm

namespace hm::ref {
namespace {

void check_sizes(const char* op, WeightType t, int n, int k) {
  HM_CHECK(n > 0, op, ": n = ", n, " must be positive");
  row_bytes(t, k);  // validates k
}

BlockQ8_0 quantize_q8_0(const float* w) {
  float amax = 0;
  for (int j = 0; j < kQuantBlock; ++j) amax = std::max(amax, std::fabs(w[j]));
  const float d = amax / 127.0f;
  const float inv = d != 0 ? 1.0f / d : 0.0f;
  BlockQ8_0 b;
  b.d = f32_to_f16(d);
  for (int j = 0; j < kQuantBlock; ++j) b.q[j] = int8_t(std::round(w[j] * inv));
  return b;
}

BlockQ4_0 quantize_q4_0(const float* w) {
  float amax = 0, m = 0;  // m: the first value of largest magnitude, sign kept
  for (int j = 0; j < kQuantBlock; ++j)
    if (std::fabs(w[j]) > amax) {
      amax = std::fabs(w[j]);
      m = w[j];
    }
  const float d = m / -8.0f;
  const float inv = d != 0 ? 1.0f / d : 0.0f;
  BlockQ4_0 b;
  b.d = f32_to_f16(d);
  for (int j = 0; j < kQuantBlock / 2; ++j) {
    // Two roundings (product, then sum): this file is built with -ffp-contract=off.
    const int lo = std::min(15, int(std::floor(w[j] * inv + 8.5f)));
    const int hi = std::min(15, int(std::floor(w[j + 16] * inv + 8.5f)));
    b.qs[j] = uint8_t(lo | (hi << 4));
  }
  return b;
}

// Row r of a packed W as floats.
void dequantize_row(WeightType t, float* out, const unsigned char* row, int k) {
  switch (t) {
    case WeightType::BF16:
    case WeightType::F16:
      for (int j = 0; j < k; ++j) {
        uint16_t h;
        std::memcpy(&h, row + 2 * j, 2);
        out[j] = t == WeightType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
      }
      break;
    case WeightType::Q8_0:
      for (int b = 0; b < k / kQuantBlock; ++b) {
        BlockQ8_0 blk;
        std::memcpy(&blk, row + b * sizeof blk, sizeof blk);
        const float d = f16_to_f32(blk.d);
        for (int j = 0; j < kQuantBlock; ++j) out[b * kQuantBlock + j] = d * float(blk.q[j]);
      }
      break;
    case WeightType::Q4_0:
      for (int b = 0; b < k / kQuantBlock; ++b) {
        BlockQ4_0 blk;
        std::memcpy(&blk, row + b * sizeof blk, sizeof blk);
        const float d = f16_to_f32(blk.d);
        for (int j = 0; j < kQuantBlock / 2; ++j) {
          out[b * kQuantBlock + j] = d * float((blk.qs[j] & 15) - 8);
          out[b * kQuantBlock + j + 16] = d * float((blk.qs[j] >> 4) - 8);
        }
      }
      break;
  }
}

}  // namespace

void quantize(WeightType t, void* dst, const float* src, int n, int k) {
  check_sizes("quantize", t, n, k);
  const size_t rb = row_bytes(t, k);
  for (int r = 0; r < n; ++r) {
    const float* w = src + size_t(r) * k;
    unsigned char* out = static_cast<unsigned char*>(dst) + size_t(r) * rb;
    if (t == WeightType::BF16 || t == WeightType::F16) {
      for (int j = 0; j < k; ++j) {
        const uint16_t h = t == WeightType::BF16 ? f32_to_bf16(w[j]) : f32_to_f16(w[j]);
        // f16's largest value is 65504: a finite weight must not become inf.
        HM_CHECK(t == WeightType::BF16 || !std::isfinite(w[j]) || std::isfinite(f16_to_f32(h)), "quantize to f16: "
                 "weight [", r, ", ", j, "] is ", w[j], ", beyond the f16 range (largest 65504); use bf16");
        std::memcpy(out + 2 * j, &h, 2);
      }
      continue;
    }
    for (int j = 0; j < k; ++j)
      HM_CHECK(std::isfinite(w[j]), "quantize to ", weight_type_name(t), ": weight [", r, ", ", j,
               "] is ", w[j], " (only finite values have a block scale)");
    for (int b = 0; b < k / kQuantBlock; ++b) {
      uint16_t d;
      if (t == WeightType::Q8_0) {
        const BlockQ8_0 blk = quantize_q8_0(w + b * kQuantBlock);
        std::memcpy(out + b * sizeof blk, &blk, sizeof blk);
        d = blk.d;
      } else {
        const BlockQ4_0 blk = quantize_q4_0(w + b * kQuantBlock);
        std::memcpy(out + b * sizeof blk, &blk, sizeof blk);
        d = blk.d;
      }
      HM_CHECK(std::isfinite(f16_to_f32(d)), "quantize to ", weight_type_name(t), ": row ", r,
               ", block ", b, " has a scale beyond the f16 range (|weight| up to ",
               *std::max_element(w + b * kQuantBlock, w + (b + 1) * kQuantBlock,
                                 [](float a, float c) { return std::fabs(a) < std::fabs(c); }),
               ")");
    }
  }
}

void dequantize(WeightType t, float* dst, const void* src, int n, int k) {
  check_sizes("dequantize", t, n, k);
  const size_t rb = row_bytes(t, k);
  for (int r = 0; r < n; ++r)
    dequantize_row(t, dst + size_t(r) * k, static_cast<const unsigned char*>(src) + size_t(r) * rb, k);
}

void round_x8(float* out, const float* x, int k) {
  HM_CHECK(k > 0 && k % kQuantBlock == 0, "round_x8: k = ", k, " is not a positive multiple of ", kQuantBlock);
  for (int b = 0; b < k / kQuantBlock; ++b) {
    const float* v = x + b * kQuantBlock;
    float amax = 0;
    bool finite = true;
    for (int j = 0; j < kQuantBlock; ++j) {
      amax = std::max(amax, std::fabs(v[j]));
      finite = finite && std::isfinite(v[j]);
    }
    const float d = amax / 127.0f;
    const float inv = d != 0 ? 1.0f / d : 0.0f;
    for (int j = 0; j < kQuantBlock; ++j)
      out[b * kQuantBlock + j] = finite ? d * std::nearbyint(v[j] * inv) : NAN;  // ties to even
  }
}

void linear_packed(float* y, int ldy, const float* x, int ldx, const void* W, WeightType t, int m,
                   int n, int k, bool accumulate) {
  check_sizes("linear_packed", t, n, k);
  HM_CHECK(m >= 0, "linear_packed: m = ", m, " must not be negative");
  const size_t rb = row_bytes(t, k);
  // The x the weights multiply: as given for bf16 / f16, rounded to 8 bits for q8_0 / q4_0.
  std::vector<float> xr(size_t(m) * k), w(k);
  for (int i = 0; i < m; ++i) {
    const float* xi = x + size_t(i) * ldx;
    if (!is_block_format(t)) std::copy(xi, xi + k, xr.begin() + ptrdiff_t(i) * k);
    else round_x8(xr.data() + size_t(i) * k, xi, k);
  }
  for (int o = 0; o < n; ++o) {
    dequantize_row(t, w.data(), static_cast<const unsigned char*>(W) + size_t(o) * rb, k);
    for (int i = 0; i < m; ++i) {
      float s = 0;
      for (int j = 0; j < k; ++j) s += xr[size_t(i) * k + j] * w[j];
      float& out = y[size_t(i) * ldy + o];
      out = accumulate ? out + s : s;
    }
  }
}

}  // namespace hm::ref
