// linear for a few rows of x (decoding a small batch): y[i] (=|+=) W . x[i] for i < m. OpenBLAS's
// sgemm packs all of W on every call, so at m = 2..8 it took 3.5-5x the time of one GEMV
// (bench/results/cpu-amd-zen5-2026-12-05/linear_rows.txt); here each block of W rows is read
// from memory once and used for every row of x while it is in L1.
//
// Each output is one accumulator over k in kW-lane steps (the tail masked), then a lane sum:
// the same operations in the same order whatever m is and wherever the row falls, so a
// sequence's logits do not depend on what else is in its batch.
#include <algorithm>
#include <cstdint>

#include "kernels/cpu/simd.h"

namespace hm::cpu::HM_ISA_NS {

using namespace simd;

namespace {

constexpr int kRows = 4;   // W rows per block
constexpr int kRows1 = 8;  // ... for one row of x: more independent sums and streams of W
constexpr int kXs = 4;     // rows of x per pass over a block

template <int NR, int NI>
void block(float* y, int ldy, const float* x, int ldx, const float* W, int k, bool accumulate) {
  vf acc[NI][NR];
  for (int i = 0; i < NI; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = vf{};
  int kk = 0;
  for (; kk + kW <= k; kk += kW) {
    vf w[NR];
    for (int r = 0; r < NR; ++r) w[r] = load(W + int64_t(r) * k + kk);
    for (int i = 0; i < NI; ++i) {
      const vf xv = load(x + int64_t(i) * ldx + kk);
      for (int r = 0; r < NR; ++r) acc[i][r] = fmadd(w[r], xv, acc[i][r]);
    }
  }
  if (kk < k) {
    const int t = k - kk;
    vf w[NR];
    for (int r = 0; r < NR; ++r) w[r] = load_n(W + int64_t(r) * k + kk, t);
    for (int i = 0; i < NI; ++i) {
      const vf xv = load_n(x + int64_t(i) * ldx + kk, t);
      for (int r = 0; r < NR; ++r) acc[i][r] = fmadd(w[r], xv, acc[i][r]);
    }
  }
  for (int i = 0; i < NI; ++i)
    for (int r = 0; r < NR; ++r) {
      float& out = y[int64_t(i) * ldy + r];
      out = (accumulate ? out : 0.0f) + hsum(acc[i][r]);
    }
}

template <int NR>
void rows_block(float* y, int ldy, const float* x, int ldx, const float* W, int m, int k, bool accumulate) {
  int i = 0;
  for (; i + kXs <= m; i += kXs)
    block<NR, kXs>(y + int64_t(i) * ldy, ldy, x + int64_t(i) * ldx, ldx, W, k, accumulate);
  const float* xi = x + int64_t(i) * ldx;
  float* yi = y + int64_t(i) * ldy;
  switch (m - i) {
    case 1: block<NR, 1>(yi, ldy, xi, ldx, W, k, accumulate); break;
    case 2: block<NR, 2>(yi, ldy, xi, ldx, W, k, accumulate); break;
    case 3: block<NR, 3>(yi, ldy, xi, ldx, W, k, accumulate); break;
    default: break;
  }
}

}  // namespace

// dispatch.h's KernelTable::linear_rows_max for this ISA (measured there).
extern const int kLinearRowsMax = kW == 16 ? 64 : kW == 8 ? 16 : 8;

void linear_rows(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n, int k,
                 bool accumulate) {
  if (m <= 0 || n <= 0) return;
  const int R = m == 1 ? kRows1 : kRows;  // the blocking does not change any output's sum
  const int blocks = (n + R - 1) / R;
  // A parallel region costs ~1-2 us: below ~64K multiply-adds one thread is faster.
  run_team(int64_t(m) * n * k >= (1 << 16) && blocks > 1, [&](int id, int nt) {
    const auto [b0, b1] = share(blocks, id, nt);
    for (int b = b0; b < b1; ++b) {
      const int j0 = b * R, nr = std::min(R, n - j0);
      float* yb = y + j0;
      const float* Wb = W + int64_t(j0) * k;
      switch (nr) {
        case 8: rows_block<8>(yb, ldy, x, ldx, Wb, m, k, accumulate); break;
        case 7: rows_block<7>(yb, ldy, x, ldx, Wb, m, k, accumulate); break;
        case 6: rows_block<6>(yb, ldy, x, ldx, Wb, m, k, accumulate); break;
        case 5: rows_block<5>(yb, ldy, x, ldx, Wb, m, k, accumulate); break;
        case 4: rows_block<4>(yb, ldy, x, ldx, Wb, m, k, accumulate); break;
        case 3: rows_block<3>(yb, ldy, x, ldx, Wb, m, k, accumulate); break;
        case 2: rows_block<2>(yb, ldy, x, ldx, Wb, m, k, accumulate); break;
        default: rows_block<1>(yb, ldy, x, ldx, Wb, m, k, accumulate); break;
      }
    }
  });
}

}  // namespace hm::cpu::HM_ISA_NS
