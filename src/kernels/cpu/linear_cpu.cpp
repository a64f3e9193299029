// linear: y = x . W^T; up to linear_rows_max rows (dispatch.h) by gemv_cpu.cpp's kernel, more through OpenBLAS
// (chosen over BLIS in bench/blas_choice.cpp). The build
// links OpenBLAS's OpenMP flavour, which shares our thread pool; call it from outside parallel
// regions (inside one it runs on a single thread).
#include <cblas.h>

#include <algorithm>
#include <cstddef>

#include "kernels/cpu/dispatch.h"
#include "kernels/ops.h"

namespace hm::cpu {

void linear(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n, int k,
            bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // empty sum; BLAS may return early without applying beta
    if (!accumulate)
      for (int i = 0; i < m; ++i) {
        float* yi = y + std::ptrdiff_t(i) * ldy;
        std::fill(yi, yi + n, 0.0f);
      }
    return;
  }
  if (m <= kernels().linear_rows_max) {  // decoding a small batch: bound by reading W, which this reads once
    kernels().linear_rows(y, ldy, x, ldx, W, m, n, k, accumulate);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, ldx, W, k, accumulate ? 1.0f : 0.0f, y,
              ldy);
}

}  // namespace hm::cpu
