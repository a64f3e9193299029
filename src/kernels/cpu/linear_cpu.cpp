// linear: y = x . W^T; up to linear_rows_max rows (dispatch.h) by gemv_cpu.cpp's kernel, more through OpenBLAS
// (chosen over BLIS in bench/blas_choice.cpp) or that kernel in blocks (dispatch.h, LinearLarge). The build
// links OpenBLAS's OpenMP flavour, which shares our thread pool; call it from outside parallel
// regions (inside one it runs on a single thread).
#include <cblas.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "kernels/cpu/dispatch.h"
#include "kernels/ops.h"

namespace hm::cpu {

namespace {

LinearLarge mode_from_env() {
  const char* env = std::getenv("HM_LINEAR");
  if (!env || !*env) return LinearLarge::Auto;
  const std::string v = env;
  if (v == "blas") return LinearLarge::Blas;
  if (v == "blocks") return LinearLarge::Blocks;
  std::fprintf(stderr, "hm: HM_LINEAR=%s: must be blas or blocks (or unset)\n", env);
  std::exit(2);  // as a bad HM_ISA: running another path than the one asked for would mislead
}

LinearLarge& mode() {
  static LinearLarge m = mode_from_env();
  return m;
}
[[maybe_unused]] const bool g_mode_at_startup = (mode(), true);

// OpenBLAS cores with AVX-512 sgemm kernels (its kernel/x86_64 directories for them).
bool blas_has_avx512() {
  const std::string core = blas_core();
  for (const char* k : {"SkylakeX", "Cooperlake", "SapphireRapids"})
    if (core.find(k) != std::string::npos) return true;
  return false;
}

}  // namespace

const char* blas_core() {
  const char* c = openblas_get_corename();
  return c ? c : "unknown";
}
void set_linear_large(LinearLarge m) { mode() = m; }
LinearLarge linear_large_mode() { return mode(); }

bool linear_large_in_blocks() {
  switch (mode()) {
    case LinearLarge::Blas: return false;
    case LinearLarge::Blocks: return true;
    case LinearLarge::Auto: break;
  }
  static const bool blas512 = blas_has_avx512();
  return kernel_isa() == Isa::Avx512 && !blas512;
}

void linear_in_blocks(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n, int k,
                      bool accumulate) {
  const int block = kernels().linear_rows_max;  // W stays in cache across blocks of this size
  for (int r = 0; r < m; r += block)
    kernels().linear_rows(y + std::ptrdiff_t(r) * ldy, ldy, x + std::ptrdiff_t(r) * ldx, ldx, W,
                          std::min(block, m - r), n, k, accumulate);
}

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
  if (linear_large_in_blocks()) {
    linear_in_blocks(y, ldy, x, ldx, W, m, n, k, accumulate);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, ldx, W, k, accumulate ? 1.0f : 0.0f, y,
              ldy);
}

}  // namespace hm::cpu
