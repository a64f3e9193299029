// conv1d_silu: causal depthwise conv + bias + SiLU, vectorised across channels (16 consecutive
// channels of a token are one cache line). Each thread owns a contiguous range of channel
// blocks and walks the tokens in order, reading one contiguous segment of each row (good for
// the prefetcher and the TLB); the K-1 earlier rows it also reads are still in L1 (so out must
// not overlap x).
#include <cstddef>

#include "kernels/cpu/simd.h"
#include "kernels/ops.h"

namespace hm::cpu::HM_ISA_NS {
namespace {
using namespace simd;

// Below this many multiply-adds (L*E*K) a parallel region costs more than it saves.
constexpr long kParallelWork = 1L << 16;

// Blocks b0..b1-1, all tokens. wt[(b - b0) * K + j]: tap j of the block's 16 channels;
// hist[(b - b0) * (K - 1) + i]: the block's state column i (input at time i - (K - 1)).
// kK > 0 fixes K at compile time.
template <int kK>
void conv_blocks(float* out, std::ptrdiff_t ldo, const float* x, std::ptrdiff_t ldx,
                 const float* b, int L, int E, int K_rt, int b0, int b1, const vf* wt,
                 const vf* hist) {
  const int K = kK > 0 ? kK : K_rt;
  for (std::ptrdiff_t t = 0; t < L; ++t) {
    for (int blk = b0; blk < b1; ++blk) {
      const int e0 = blk * kW, nc = E - e0 < kW ? E - e0 : kW;
      const vf* w = wt + std::ptrdiff_t(blk - b0) * K;
      const vf* h = hist + std::ptrdiff_t(blk - b0) * (K - 1);
      vf acc = load_upto(b + e0, nc);
      for (int j = 0; j < K; ++j) {  // out[t] = sum_j w[j] * x[t - K + 1 + j], x[< 0] from state
        const std::ptrdiff_t tau = t - K + 1 + j;
        acc += w[j] * (tau >= 0 ? load_upto(x + tau * ldx + e0, nc) : h[K - 1 + tau]);
      }
      store_upto(out + t * ldo + e0, vsilu(acc), nc);
    }
  }
}

}  // namespace

void conv1d_silu(float* out, int ldo, float* state, const float* x, int ldx, const float* w,
                 const float* b, int L, int E, int K) {
  if (L <= 0 || E <= 0 || K <= 0) return;
  const int nblocks = (E + kW - 1) / kW;
  run_team(long(L) * E * K >= kParallelWork, [&](int id, int nt) {
    const auto [b0, b1] = share(nblocks, id, nt);
    thread_local Buf<vf> wt, hist;
    wt.resize(std::size_t(b1 - b0) * K);
    hist.resize(std::size_t(b1 - b0) * (K - 1));
    for (int blk = b0; blk < b1; ++blk) {  // transpose weights and state to lanes = channels
      const int e0 = blk * kW, nc = E - e0 < kW ? E - e0 : kW;
      for (int j = 0; j < K; ++j)
        wt[std::size_t(blk - b0) * K + j] = load_strided(w + std::ptrdiff_t(e0) * K + j, K, nc);
      for (int i = 0; i < K - 1; ++i)
        hist[std::size_t(blk - b0) * (K - 1) + i] =
            load_strided(state + std::ptrdiff_t(e0) * (K - 1) + i, K - 1, nc);
    }
    if (K == 4)
      conv_blocks<4>(out, ldo, x, ldx, b, L, E, K, b0, b1, wt.data(), hist.data());
    else
      conv_blocks<0>(out, ldo, x, ldx, b, L, E, K, b0, b1, wt.data(), hist.data());
    // New state: the last K-1 inputs, reaching back into the old state when L < K-1.
    for (int blk = b0; blk < b1; ++blk) {
      const int e0 = blk * kW, nc = E - e0 < kW ? E - e0 : kW;
      for (int i = 0; i < K - 1; ++i) {
        const std::ptrdiff_t tau = std::ptrdiff_t(L) - (K - 1) + i;
        const vf v = tau >= 0 ? load_upto(x + tau * ldx + e0, nc)
                              : hist[std::size_t(blk - b0) * (K - 1) + (K - 1 + tau)];
        store_strided(state + std::ptrdiff_t(e0) * (K - 1) + i, K - 1, v, nc);
      }
    }
  });
}

}  // namespace hm::cpu::HM_ISA_NS
