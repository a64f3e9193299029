// Helpers shared by the CUDA test files: whether a GPU is present (tests skip, counted, where
// none is), the per-type bounds, and the error measure of a strided view.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/dtype.h"

namespace hm::test {

inline bool has_gpu() {
  static const bool ok = [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  }();
  return ok;
}

// Bounds on max|got - ref| / max|ref| for outputs stored in t.
inline double tol(DType t) { return t == DType::F32 ? 1e-5 : t == DType::F16 ? 1e-3 : 8e-3; }

// max|got - ref| / max|ref| over rows x cols at row stride ld, from column c0 (NaN fails).
inline double rel_err(const std::vector<float>& got, const std::vector<float>& ref, int rows, int cols, int64_t ld,
                      int c0 = 0) {
  double num = 0, den = 0;
  for (int i = 0; i < rows; ++i)
    for (int j = c0; j < c0 + cols; ++j) {
      const size_t k = size_t(i) * size_t(ld) + size_t(j);
      if (std::isnan(got[k]) || std::isnan(ref[k])) return NAN;
      num = std::max(num, std::fabs(double(got[k]) - ref[k]));
      den = std::max(den, std::fabs(double(ref[k])));
    }
  return num / std::max(den, 1e-30);
}

}  // namespace hm::test
