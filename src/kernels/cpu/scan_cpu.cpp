// selective_scan: the Mamba recurrence, vectorised across channels.
//
// (Lane counts below are AVX-512's kW = 16; AVX2 has 8, SSE2 4.)
// x, dt, z and y are token-major, so 16 consecutive channels of one token are one cache line
// and one vector. Each lane is a channel; the N states of a block of 16 channels are N
// vectors ("transposed": s[n] holds state[e0..e0+15][n]). Compared with one channel at a time
// vectorised over N, this
//  - computes softplus(dt), silu(z) and D*x once per (token, 16 channels), not per state;
//  - accumulates y[t, e] = sum_n s[n] C[t, n] lane-wise, with no horizontal sums;
//  - works for any N with no remainder path (N is only the number of state vectors); the
//    remainder is over channels (E % 16), with masked loads and stores.
// exp(delta*A) is computed as exp2(delta * A*log2(e)) with A*log2(e) precomputed, as the CUDA
// kernel does (simd::vexp2_decay, relative error <= 2e-7); 12 vector instructions per 16 state
// updates, 9 of them on the FMA pipes: the kernel is bound by those, not by memory.
//
// Work split: each thread owns a contiguous range of channel blocks and walks time in chunks.
// Per chunk, pass 1 computes what does not depend on the state (softplus(dt), delta*x, D*x,
// silu(z)) row by row over all the thread's channels (contiguous reads, good for the
// prefetcher and the TLB), into an L2-resident buffer; pass 2 runs the recurrence block by
// block with the N states in registers, B and C of the chunk in L1. Keeping pass 1 out of
// the recurrence also lets its long-latency exps and divisions overlap freely instead of
// delaying each token's update. The states of the thread's blocks (E/threads x N floats) stay
// in L1/L2 between chunks.
#include <algorithm>
#include <cstddef>

#include "kernels/cpu/simd.h"
#include "kernels/ops.h"

namespace hm::cpu::HM_ISA_NS {
namespace {
using namespace simd;

constexpr int kChunk = 64;                    // tokens per time chunk, at most
constexpr std::size_t kPreBytes = 256 << 10;  // pass-1 values of a chunk, all blocks of a thread
constexpr float kLog2e = 1.44269504088896341f;
// A parallel region costs ~1-2 us; below ~64K state updates (L*E*N) one thread is faster.
// Decoding one token at E = 1024, N = 16 is 16K updates.
constexpr long kParallelWork = 1L << 16;
// Up to this many tokens (with N = 16) the state is updated in place in its row layout.
constexpr int kRowsMaxTokens = 4;

struct ScanArgs {
  float* y;
  int ldy;
  const float* x;
  int ldx;
  const float* dt;
  int lddt;
  const float* dt_bias;
  const float* B;
  const float* C;
  int ldbc;
  const float* Dskip;
  const float* z;
  int ldz;
  int N;
};

// Per (token, block), computed in pass 1: everything that does not depend on the state.
struct Pre {
  vf delta, dx, dskip_x, gate;  // delta, delta*x, D*x, silu(z)
};

// Pass 1 for token t of blocks b0..b1-1 (one contiguous segment of each row: prefetch- and
// TLB-friendly). pre[(b - b0) * tc + (t - t0)].
void scan_prepare(const ScanArgs& a, Pre* pre, int tc, int E, int b0, int b1, int t0, int t1) {
  for (std::ptrdiff_t t = t0; t < t1; ++t) {
    const float* xt = a.x + t * a.ldx;
    const float* dtt = a.dt + t * a.lddt;
    const float* zt = a.z + t * a.ldz;
    for (int b = b0; b < b1; ++b) {
      const int e0 = b * kW, nc = E - e0 < kW ? E - e0 : kW;
      const vf xv = load_upto(xt + e0, nc);
      const vf delta = vsoftplus(load_upto(dtt + e0, nc) + load_upto(a.dt_bias + e0, nc));
      pre[std::ptrdiff_t(b - b0) * tc + (t - t0)] = {
          delta, delta * xv, load_upto(a.Dskip + e0, nc) * xv, vsilu(load_upto(zt + e0, nc))};
    }
  }
}

// Pass 2, the recurrence, for tokens t0..t1-1 of the channel block at e0 (nc channels).
// s: N state vectors (in/out), a2: the N vectors of A*log2(e), pre: this block's pass-1 values.
// kN > 0 fixes N at compile time so that the states live in registers.
template <int kN>
void scan_block(const ScanArgs& a, vf* s_mem, const vf* a2, const Pre* pre, int e0, int nc,
                int t0, int t1) {
  const int N = kN > 0 ? kN : a.N;
  float* const y = a.y;  // locals: stores through y cannot be assumed to change them
  const float *const B = a.B, *const C = a.C;
  const std::ptrdiff_t ldy = a.ldy, ldbc = a.ldbc;

  vf s_reg[kN > 0 ? kN : 1];
  auto s = [&](int n) -> vf& {
    if constexpr (kN > 0) return s_reg[n]; else return s_mem[n];
  };
  if constexpr (kN > 0) {
#pragma GCC unroll 16
    for (int n = 0; n < kN; ++n) s_reg[n] = s_mem[n];
  }

  for (std::ptrdiff_t t = t0; t < t1; ++t) {
    const Pre& p = pre[t - t0];
    const float* Bt = B + t * ldbc;
    const float* Ct = C + t * ldbc;
    vf acc[4] = {p.dskip_x, {}, {}, {}};  // D * x; four sums cut the add chain by 4
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) {
      s(n) = vexp2_decay(p.delta * a2[n]) * s(n) + p.dx * Bt[n];  // s = exp(delta A) s + delta B x
      acc[n % 4] += s(n) * Ct[n];                                 // y = s . C + D x
    }
    const vf yt = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    store_upto(y + t * ldy + e0, yt * p.gate, nc);  // y * silu(z)
  }

  if constexpr (kN > 0) {
#pragma GCC unroll 16
    for (int n = 0; n < kN; ++n) s_mem[n] = s_reg[n];
  }
}

// Decoding path (N a multiple of kW up to kRowsMaxVecs vectors, a few tokens): the state
// stays in its [E, N] layout, N / kW vectors per channel, so the transposes per block (state
// in and out, A) that the lane layout needs are not worth paying for one token. The kW
// per-channel sums s . C of a block come out of one hsum_lanes. Same arithmetic per state
// element as the lane path.
constexpr int kRowsMaxVecs = 4;
void scan_rows(const ScanArgs& a, float* state, const float* A, int E, int L, int b0, int b1) {
  const int N = a.N, nv = N / kW;
  for (std::ptrdiff_t t = 0; t < L; ++t) {
    vf Bt[kRowsMaxVecs], Ct[kRowsMaxVecs];
    for (int q = 0; q < nv; ++q) {
      Bt[q] = load(a.B + t * a.ldbc + q * kW);
      Ct[q] = load(a.C + t * a.ldbc + q * kW);
    }
    for (int b = b0; b < b1; ++b) {
      const int e0 = b * kW, nc = E - e0 < kW ? E - e0 : kW;
      const vf xv = load_upto(a.x + t * a.ldx + e0, nc);
      const vf delta =
          vsoftplus(load_upto(a.dt + t * a.lddt + e0, nc) + load_upto(a.dt_bias + e0, nc));
      float dl[kW], dx[kW];  // per channel: delta*log2(e), delta*x
      store(dl, delta * kLog2e);
      store(dx, delta * xv);
      vf sc[kW];  // sc[c] = s[c] * C, summed over its lanes below
#pragma GCC unroll 16
      for (int c = 0; c < kW; ++c) {
        sc[c] = vf{};
        if (c < nc) {
          float* sr = state + std::ptrdiff_t(e0 + c) * N;
          const float* ar = A + std::ptrdiff_t(e0 + c) * N;
          for (int q = 0; q < nv; ++q) {
            const vf sv = vexp2_decay(load(ar + q * kW) * dl[c]) * load(sr + q * kW) +
                          dx[c] * Bt[q];  // s = exp(delta A) s + delta B x
            store(sr + q * kW, sv);
            sc[c] += sv * Ct[q];
          }
        }
      }
      const vf yv = hsum_lanes(sc) + load_upto(a.Dskip + e0, nc) * xv;  // y = s . C + D x
      store_upto(a.y + t * a.ldy + e0, yv * vsilu(load_upto(a.z + t * a.ldz + e0, nc)), nc);
    }
  }
}

// Channel-major rows [nc][N] <-> N lane vectors. N = 16 is one in-register 16x16 transpose.
void rows_to_lanes(vf* out, const float* rows, int nc, int N) {
  if (N == kW) {
    for (int c = 0; c < kW; ++c) out[c] = c < nc ? load(rows + c * kW) : vf{};
    transpose(out);
  } else {
    for (int n = 0; n < N; ++n) out[n] = load_strided(rows + n, N, nc);
  }
}
void lanes_to_rows(float* rows, const vf* in, int nc, int N) {
  if (N == kW) {
    vf r[kW];
    for (int n = 0; n < kW; ++n) r[n] = in[n];
    transpose(r);
    for (int c = 0; c < nc; ++c) store(rows + c * kW, r[c]);
  } else {
    for (int n = 0; n < N; ++n) store_strided(rows + n, N, in[n], nc);
  }
}

}  // namespace

void selective_scan(float* y, int ldy, float* state, const float* x, int ldx, const float* dt,
                    int lddt, const float* dt_bias, const float* A, const float* B,
                    const float* C, int ldbc, const float* Dskip, const float* z, int ldz,
                    int L, int E, int N) {
  if (L <= 0 || E <= 0) return;
  const ScanArgs args{y, ldy, x, ldx, dt, lddt, dt_bias, B, C, ldbc, Dskip, z, ldz, N};
  const int nblocks = (E + kW - 1) / kW;
  const long work = long(L) * E * (N > 0 ? N : 1);

  if (N > 0 && N % kW == 0 && N <= kRowsMaxVecs * kW && L <= kRowsMaxTokens) {
    run_team(work >= kParallelWork, [&](int id, int nt) {
      const auto [b0, b1] = share(nblocks, id, nt);
      scan_rows(args, state, A, E, L, b0, b1);
    });
    return;
  }

  run_team(work >= kParallelWork, [&](int id, int nt) {
    const auto [b0, b1] = share(nblocks, id, nt);
    // Per block: N state vectors, then N vectors of A*log2(e); then the pass-1 values of a
    // chunk of tc tokens for every block of this thread (at most kPreBytes, in L2).
    const int nb = b1 - b0;
    const int tc = std::clamp(int(kPreBytes / (sizeof(Pre) * std::max(nb, 1))), 1, kChunk);
    const std::size_t per_block = 2 * std::size_t(N > 0 ? N : 1);
    thread_local Buf<vf> buf;
    thread_local Buf<Pre> pre;
    if (buf.size() < nb * per_block) buf.resize(nb * per_block);
    if (pre.size() < std::size_t(nb) * tc) pre.resize(std::size_t(nb) * tc);

    for (int b = b0; b < b1; ++b) {
      const int e0 = b * kW, nc = E - e0 < kW ? E - e0 : kW;
      vf* s = buf.data() + (b - b0) * per_block;
      rows_to_lanes(s, state + std::ptrdiff_t(e0) * N, nc, N);
      rows_to_lanes(s + N, A + std::ptrdiff_t(e0) * N, nc, N);
      for (int n = 0; n < N; ++n) s[N + n] *= kLog2e;
    }
    for (int t0 = 0; t0 < L; t0 += tc) {
      const int t1 = L - t0 < tc ? L : t0 + tc;
      scan_prepare(args, pre.data(), tc, E, b0, b1, t0, t1);
      for (int b = b0; b < b1; ++b) {
        const int e0 = b * kW, nc = E - e0 < kW ? E - e0 : kW;
        vf* s = buf.data() + (b - b0) * per_block;
        const Pre* pb = pre.data() + std::ptrdiff_t(b - b0) * tc;
        if (N == 16)
          scan_block<16>(args, s, s + N, pb, e0, nc, t0, t1);
        else
          scan_block<0>(args, s, s + N, pb, e0, nc, t0, t1);
      }
    }
    for (int b = b0; b < b1; ++b) {
      const int e0 = b * kW, nc = E - e0 < kW ? E - e0 : kW;
      lanes_to_rows(state + std::ptrdiff_t(e0) * N, buf.data() + (b - b0) * per_block, nc, N);
    }
  });
}

}  // namespace hm::cpu::HM_ISA_NS
