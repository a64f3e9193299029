// linear: y = x . W^T through OpenBLAS (chosen over BLIS in bench/blas_choice.cpp). The build
// links OpenBLAS's OpenMP flavour, which shares our thread pool; call it from outside parallel
// regions (inside one it runs on a single thread).
#include <cblas.h>

#include <algorithm>
#include <cstddef>

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
  const float beta = accumulate ? 1.0f : 0.0f;
  if (m == 1) {  // decoding: a matrix-vector product, bound by reading W
    // gemv applies beta by scaling y, and some OpenBLAS versions let 0 * NaN through: y may be
    // uninitialised workspace.
    if (!accumulate) std::fill(y, y + n, 0.0f);
    cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, W, k, x, 1, beta, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, ldx, W, k, beta, y,
                ldy);
  }
}

}  // namespace hm::cpu
