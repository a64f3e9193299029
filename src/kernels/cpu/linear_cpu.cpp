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

int isa_level(Isa isa) { return isa == Isa::Avx512 ? 2 : isa == Isa::Avx2 ? 1 : 0; }

}  // namespace

const char* blas_core() {
  const char* c = openblas_get_corename();
  return c ? c : "unknown";
}
void set_linear_large(LinearLarge m) { mode() = m; }
LinearLarge linear_large_mode() { return mode(); }

int blas_core_level(const std::string& core) {
  // OpenBLAS's x86-64 cores whose sgemm kernels use AVX-512, then AVX2 (its kernel/x86_64
  // KERNEL.<core> files); any other core (Prescott, Nehalem, Sandybridge, a name it gives a CPU it
  // does not know) runs SSE or AVX kernels.
  for (const char* k : {"SkylakeX", "Cooperlake", "SapphireRapids"})
    if (core.find(k) != std::string::npos) return 2;
  for (const char* k : {"Haswell", "Zen"})
    if (core.find(k) != std::string::npos) return 1;
  return 0;
}

bool blocks_beat_blas(Isa isa, const std::string& core) { return isa_level(isa) > blas_core_level(core); }

bool linear_large_in_blocks() {
  switch (mode()) {
    case LinearLarge::Blas: return false;
    case LinearLarge::Blocks: return true;
    case LinearLarge::Auto: break;
  }
  static const std::string core = blas_core();
  return blocks_beat_blas(kernel_isa(), core);
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
