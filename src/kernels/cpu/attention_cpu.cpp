// Causal attention with an online softmax (flash-attention style): keys are visited in blocks
// of kKeys, each row keeps a running max m, sum l and unnormalised output o, and the L x T
// score matrix never exists (only a kKeys x rows block of it, in L1).
//
// A row is one (query t, head h). Two paths:
//  - Tile path (prefill: L * group > kFewRows rows per kv head). The unit of work is a tile of
//    kRows rows r = t * group + j (head g * group + j) of one kv head g, so the query heads of
//    a group share every K/V load. Scores are computed transposed, S^T[key][row], with rows
//    across the 16 lanes: Q^T of the tile is built once, K is read as stored (one broadcast
//    per element), and the softmax max/sum over keys become lane-wise vector ops. P.V
//    accumulates o[row][:] across the lanes of head_dim, broadcasting P. Both products are
//    register-blocked 4 x 4 vectors. Parallel over (kv head, tile), longest tiles first; if
//    that gives too few tasks the keys are split too.
//  - Decode path (L * group <= kFewRows): dot products per (row, key), 16 keys at a time, so
//    no lanes are wasted on missing rows. The keys are split into ranges, one task each, and a
//    task handles every head: it streams whole K/V rows (all kv heads of a position are
//    contiguous), which keeps the prefetcher and the TLB happy. Bound by reading K and V.
//    (An f16 cache adds software prefetches: see kAhead.)
// Split key ranges leave partial (m, l, o) per row, merged by rescaling to the common max.
// Scores are kept in base 2: q is pre-multiplied by log2(e)/sqrt(hd) and exp2 is used.
//
// The cache is float or IEEE half (attention_f16kv): everything is templated on its element
// type and converts K/V as it loads them (simd.h's uint16_t overloads), so an f16 cache runs
// the same arithmetic on half the bytes. The tile path widens while copying a block into its
// float buffers; the decode path converts in registers.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "kernels/cpu/simd.h"
#include "kernels/ops.h"

namespace hm::cpu::HM_ISA_NS {
namespace {
using namespace simd;

// Register blocks: the tile's 4 x kQV score accumulators and pv_rows' kRB x kPV output block
// fit 32 AVX-512 registers at 4 x 4; AVX2 and SSE2 have 16, so 2 vectors.
constexpr int kQV = kRegs >= 32 ? 4 : 2;
constexpr int kPV = kRegs >= 32 ? 4 : 2;
static_assert(kQV == 2 || kQV == 4);
constexpr int kRows = kQV * kW;  // rows per tile: kQV vectors of lanes
constexpr int kKeys = 64;   // keys per block
constexpr int kFewRows = 4;
constexpr int kMinSplitKeys = 256;  // a key range shorter than this is not worth a task
constexpr long kParallelWork = 1L << 18;  // rows * keys * hd below which one thread is faster
// Running max before any key: finite, so that a row that sees no key in a block keeps
// alpha = exp2(m - m) = 1 and p = exp2(-inf) = 0 instead of computing -inf - -inf.
constexpr float kNoMax = -1e30f;

template <class T>  // cache element: float or uint16_t (binary16)
struct Problem {
  const float* q;
  std::ptrdiff_t ldq;
  const T* k;
  const T* v;
  std::ptrdiff_t ldkv;
  int L, pos0, H, G, group, hd, hdp;  // hdp: hd rounded up to whole vectors
  float qscale;
  const float* row_q(int t, int h) const { return q + t * ldq + std::ptrdiff_t(h) * hd; }
};

// Partial state of up to `cap` rows: m[cap], l[cap], o[cap][hdp], each array starting on a
// whole vector (64-byte aligned when base is).
struct Part {
  float* base;
  int cap, hdp;
  static int padded(int n) { return (n + kW - 1) / kW * kW; }
  float* m() const { return base; }
  float* l() const { return base + padded(cap); }
  float* o() const { return base + 2 * padded(cap); }
  static std::size_t size(int cap, int hdp) {
    return std::size_t(padded(cap)) * 2 + std::size_t(cap) * hdp;
  }
  void reset(int nrows) const {
    for (int i = 0; i < cap; ++i) {
      m()[i] = kNoMax;
      l()[i] = 0.0f;
    }
    std::fill(o(), o() + std::size_t(nrows) * hdp, 0.0f);
  }
};

// Per-thread scratch, reused across calls.
struct Scratch {
  FloatBuf q, s, k, v, misc;
};

// One tile: rows r0..r0+nr-1 of kv head g, keys [ka, kb).
struct Tile {
  int g, r0, nr, ka, kb;
};

// --- Tile path -----------------------------------------------------------------------------
// K and V blocks are first copied into contiguous [kKeys][hdp] buffers (zero-padded columns,
// so every load is a full vector): in the cache their rows are G*hd floats apart, often a
// power of two that maps a block's rows onto a few L1 sets, and the block is re-read for
// every 4 rows of the tile.

// st[j][c] (QV vectors per key) = sum_d kp[j][d] * qt[d][c], 4 keys at a time.
template <int QV>
[[gnu::noinline]] void tile_scores(const float* kp, int hd, int hdp, int nk, const float* qt,
                                   float* st) {
  int j = 0;
  for (; j + 4 <= nk; j += 4) {
    const float* k0 = kp + std::ptrdiff_t(j) * hdp;
    const float* k1 = k0 + hdp;
    const float* k2 = k1 + hdp;
    const float* k3 = k2 + hdp;
    vf a0[QV] = {}, a1[QV] = {}, a2[QV] = {}, a3[QV] = {};
    for (int d = 0; d < hd; ++d) {
      const float* qd = qt + d * QV * kW;
      vf b0 = splat(k0[d]), b1 = splat(k1[d]), b2 = splat(k2[d]), b3 = splat(k3[d]);
      pin(b0), pin(b1), pin(b2), pin(b3);
      for (int c = 0; c < QV; ++c) {
        vf qv = load(qd + c * kW);
        pin(qv);
        a0[c] += b0 * qv;
        a1[c] += b1 * qv;
        a2[c] += b2 * qv;
        a3[c] += b3 * qv;
      }
    }
    for (int c = 0; c < QV; ++c) {
      store(st + ((j + 0) * QV + c) * kW, a0[c]);
      store(st + ((j + 1) * QV + c) * kW, a1[c]);
      store(st + ((j + 2) * QV + c) * kW, a2[c]);
      store(st + ((j + 3) * QV + c) * kW, a3[c]);
    }
  }
  for (; j < nk; ++j) {
    const float* k0 = kp + std::ptrdiff_t(j) * hdp;
    vf a0[QV] = {};
    for (int d = 0; d < hd; ++d) {
      const vf b0 = splat(k0[d]);
      for (int c = 0; c < QV; ++c) a0[c] += b0 * load(qt + (d * QV + c) * kW);
    }
    for (int c = 0; c < QV; ++c) store(st + (j * QV + c) * kW, a0[c]);
  }
}

// o[i][c0..c0+16*DV) = o[i] * alpha[i] + sum_j P(i, j) vp[j][c0..], for RB rows from i0.
// P(i, j) = p[j * pks + i]. Not inlined: alone, the 4x4 accumulator block and the V row fit
// the registers.
template <int RB, int DV>
[[gnu::noinline]] void pv_rows(const float* vp, int hdp, int nk, const float* p,
                               std::ptrdiff_t pks, float* o, int c0, const float* alpha, int i0) {
  vf acc[RB][DV];
  for (int ii = 0; ii < RB; ++ii)
    for (int dv = 0; dv < DV; ++dv)
      acc[ii][dv] = load(o + std::ptrdiff_t(i0 + ii) * hdp + c0 + dv * kW) * alpha[i0 + ii];
  for (int j = 0; j < nk; ++j) {
    const float* vr = vp + std::ptrdiff_t(j) * hdp + c0;
    vf vv[DV];
    for (int dv = 0; dv < DV; ++dv) {
      vv[dv] = load(vr + dv * kW);
      pin(vv[dv]);
    }
    const float* pj = p + j * pks + i0;
    for (int ii = 0; ii < RB; ++ii) {
      vf pb = splat(pj[ii]);
      pin(pb);
      for (int dv = 0; dv < DV; ++dv) acc[ii][dv] += pb * vv[dv];
    }
  }
  for (int ii = 0; ii < RB; ++ii)
    for (int dv = 0; dv < DV; ++dv)
      store(o + std::ptrdiff_t(i0 + ii) * hdp + c0 + dv * kW, acc[ii][dv]);
}

template <int RB>
void pv_cols(const float* vp, int hdp, int nk, const float* p, std::ptrdiff_t pks, float* o,
             const float* alpha, int i0) {
  for (int c0 = 0; c0 < hdp; c0 += kPV * kW) {  // column chunks of up to kPV vectors
    switch (std::min(kPV, (hdp - c0) / kW)) {
      case 1: pv_rows<RB, 1>(vp, hdp, nk, p, pks, o, c0, alpha, i0); break;
      case 2: pv_rows<RB, 2>(vp, hdp, nk, p, pks, o, c0, alpha, i0); break;
      case 3: pv_rows<RB, 3>(vp, hdp, nk, p, pks, o, c0, alpha, i0); break;
      default: pv_rows<RB, kPV>(vp, hdp, nk, p, pks, o, c0, alpha, i0);
    }
  }
}

// Runs one tile from its (m, l, o); the caller initialises them and writes the result.
template <int QV, class T>
void tile_run(const Problem<T>& pr, const Tile& tl, Scratch& sc, float* m, float* l, float* o) {
  const int nr = tl.nr, hd = pr.hd, hdp = pr.hdp;
  const T* kg = pr.k + std::ptrdiff_t(tl.g) * hd;
  const T* vg = pr.v + std::ptrdiff_t(tl.g) * hd;
  float* qt = scratch(sc.q, std::size_t(hd) * QV * kW);
  float* st = scratch(sc.s, std::size_t(kKeys) * QV * kW);
  float* kp = scratch(sc.k, std::size_t(kKeys) * hdp);
  float* vp = scratch(sc.v, std::size_t(kKeys) * hdp);
  float* alpha = scratch(sc.misc, QV * kW);

  // Q^T, pre-scaled, lanes = rows, and each lane's last visible key. Padding lanes (rows
  // beyond nr) get q = 0 and no mask; they are never written out.
  int last[QV * kW];
  for (int i = 0; i < QV * kW; ++i) last[i] = i < nr ? pr.pos0 + (tl.r0 + i) / pr.group : 1 << 30;
  for (int i0 = 0; i0 < QV * kW; i0 += kW)  // 16 rows x 16 columns at a time, transposed
    for (int d0 = 0; d0 < hd; d0 += kW) {
      vf blk[kW];
      for (int i = 0; i < kW; ++i) {
        blk[i] = vf{};
        if (i0 + i >= nr) continue;
        const int r = tl.r0 + i0 + i;
        blk[i] = load_upto(pr.row_q(r / pr.group, tl.g * pr.group + r % pr.group) + d0, hd - d0) *
                 pr.qscale;
      }
      transpose(blk);
      for (int d = 0; d < kW && d0 + d < hd; ++d)
        store(qt + ((d0 + d) * QV + i0 / kW) * kW, blk[d]);
    }
  const int first_last = pr.pos0 + tl.r0 / pr.group;  // the smallest last-visible key

  for (int j0 = tl.ka; j0 < tl.kb; j0 += kKeys) {
    const int nk = std::min(kKeys, tl.kb - j0);
    for (int j = 0; j < nk; ++j)
      for (int d = 0; d < hdp; d += kW) {
        const std::ptrdiff_t src = std::ptrdiff_t(j0 + j) * pr.ldkv + d;
        store(kp + j * hdp + d, load_upto(kg + src, hd - d));
        store(vp + j * hdp + d, load_upto(vg + src, hd - d));
      }
    tile_scores<QV>(kp, hd, hdp, nk, qt, st);
    if (j0 + nk - 1 > first_last) {  // the block crosses the diagonal: mask the future
      for (int c = 0; c < QV; ++c) {
        vi lastv;
        std::memcpy(&lastv, last + c * kW, sizeof lastv);
        for (int j = 0; j < nk; ++j) {
          float* sj = st + (j * QV + c) * kW;
          store(sj, (vi{} + (j0 + j)) > lastv ? splat(-INFINITY) : load(sj));
        }
      }
    }
    for (int c = 0; c < QV; ++c) {  // online softmax, lane-wise (one lane per row)
      vf mt = splat(-INFINITY);
      for (int j = 0; j < nk; ++j) mt = vmax(mt, load(st + (j * QV + c) * kW));
      const vf mold = load(m + c * kW), mnew = vmax(mold, mt);
      const vf a = vexp2(mold - mnew);
      vf ls{};
      for (int j = 0; j < nk; ++j) {
        float* sj = st + (j * QV + c) * kW;
        const vf p = vexp2(load(sj) - mnew);
        store(sj, p);
        ls += p;
      }
      store(m + c * kW, mnew);
      store(l + c * kW, load(l + c * kW) * a + ls);
      store(alpha + c * kW, a);
    }
    int i = 0;
    for (; i + 4 <= nr; i += 4) pv_cols<4>(vp, hdp, nk, st, QV * kW, o, alpha, i);
    for (; i < nr; ++i) pv_cols<1>(vp, hdp, nk, st, QV * kW, o, alpha, i);
  }
}

template <class T>
void run_tile(const Problem<T>& pr, const Tile& tl, Scratch& sc, const Part& part) {
  part.reset(tl.nr);
  const int qv = (tl.nr + kW - 1) / kW;  // 1 .. kQV
  if (qv == 1) {
    tile_run<1, T>(pr, tl, sc, part.m(), part.l(), part.o());
  } else if constexpr (kQV == 2) {
    tile_run<2, T>(pr, tl, sc, part.m(), part.l(), part.o());
  } else {
    if (qv == 2) tile_run<2, T>(pr, tl, sc, part.m(), part.l(), part.o());
    else if (qv == 3) tile_run<3, T>(pr, tl, sc, part.m(), part.l(), part.o());
    else tile_run<4, T>(pr, tl, sc, part.m(), part.l(), part.o());
  }
}

// --- Decode path ---------------------------------------------------------------------------
// Keys are taken kSub = kW (16 on AVX-512) at a time. Scores: for each row, the 16 dot products are first
// accumulated as 16 vectors over head_dim, then hsum_lanes turns them into a vector of 16 scores
// (instead of a 16-lane reduction per score). P.V: each row's o stays in registers across the
// 16 keys. The 16 K or V rows (all kv heads, contiguous) stay in L1 while every head uses them.
constexpr int kSub = kW;
// Half-precision caches are prefetched by software, kAhead keys (the next 16) ahead: a head's
// segment of a row is then only 2 lines, and the hardware prefetchers, which do well on float
// rows, left a DRAM-resident f16 cache at ~15 GB/s on one core (28 GB/s with this; it costs
// ~12% when the cache is in L3). On float rows it gained nothing and cost ~15% from L3.
constexpr int kAhead = kSub;

template <class T>
HM_SIMD_INLINE void prefetch_n(const T* p, int n) {
  for (int b = 0; b < int(n * sizeof(T)); b += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + b, 0, 3);
}

// Row i's 16 scores for keys j0..j0+nk-1 (nk <= 16) of kv head segment kg, into s[0..16).
// kDV > 0: head_dim is kDV vectors (the last possibly partial, nlast columns).
// pf: also prefetch the segment of each key kAhead keys on (one row per kv head asks).
template <int kDV, class T>
void decode_scores(const float* qi, const T* kg, std::ptrdiff_t ldkv, int j0, int nk,
                   int dv_rt, int nlast, float* s, bool pf) {
  const int DV = kDV > 0 ? kDV : dv_rt;
  vf part[kSub];
#pragma GCC unroll 16
  for (int jj = 0; jj < kSub; ++jj) {
    vf acc{};
    if (jj < nk) {
      const T* kr = kg + std::ptrdiff_t(j0 + jj) * ldkv;
      if (pf) prefetch_n(kr + kAhead * ldkv, DV * kW);
      for (int dv = 0; dv < DV; ++dv)
        acc += load(qi + dv * kW) *
               (dv < DV - 1 || nlast == kW ? load(kr + dv * kW) : load_n(kr + dv * kW, nlast));
    }
    part[jj] = acc;
  }
  store(s, hsum_lanes(part));
}

// o_i = o_i + sum_jj p[jj] V[j0 + jj] over nk keys, with o_i kept in registers. pf: as in
// decode_scores.
template <int kDV, class T>
void decode_pv(float* oi, const T* vg, std::ptrdiff_t ldkv, int j0, int nk, int dv_rt,
               int nlast, const float* p, bool pf) {
  const int DV = kDV > 0 ? kDV : dv_rt;
  constexpr int kRegs = kDV > 0 ? kDV : 8;
  for (int c0 = 0; c0 < DV; c0 += kRegs) {  // column chunks of kRegs vectors
    const int nv = DV - c0 < kRegs ? DV - c0 : kRegs;
    vf acc[kRegs];
    for (int dv = 0; dv < nv; ++dv) acc[dv] = load(oi + (c0 + dv) * kW);
    for (int jj = 0; jj < nk; ++jj) {
      const T* vr = vg + std::ptrdiff_t(j0 + jj) * ldkv + c0 * kW;
      if (pf) prefetch_n(vr + kAhead * ldkv, nv * kW);
      const vf pj = splat(p[jj]);
      for (int dv = 0; dv < nv; ++dv)
        acc[dv] += pj * (c0 + dv < DV - 1 || nlast == kW ? load(vr + dv * kW)
                                                         : load_n(vr + dv * kW, nlast));
    }
    for (int dv = 0; dv < nv; ++dv) store(oi + (c0 + dv) * kW, acc[dv]);
  }
}

// Every head, keys [ka, kb). Row i = h * L + t.
template <int kDV, class T>
void decode_run(const Problem<T>& pr, int ka, int kb, Scratch& sc, const Part& part) {
  const int L = pr.L, hd = pr.hd, hdp = pr.hdp, nrows = pr.H * L;
  const int dv = hdp / kW, nlast = hd - (dv - 1) * kW;
  part.reset(nrows);
  float *m = part.m(), *l = part.l(), *o = part.o();
  float* qs = scratch(sc.q, std::size_t(nrows) * hdp);  // pre-scaled q rows, zero-padded
  float* s = scratch(sc.s, std::size_t(nrows) * kKeys);  // scores, then P, of one block
  for (int h = 0; h < pr.H; ++h)
    for (int t = 0; t < L; ++t) {
      const float* qi = pr.row_q(t, h);
      float* qd = qs + std::size_t(h * L + t) * hdp;
      for (int d = 0; d < hdp; d += kW) store(qd + d, load_upto(qi + d, hd - d) * pr.qscale);
    }

  for (int j0 = ka; j0 < kb; j0 += kKeys) {
    const int nk = std::min(kKeys, kb - j0);
    // Prefetch while the rows kAhead on stay inside [ka, kb).
    auto prefetch = [&](int jb, int h, int t) {
      return sizeof(T) == 2 && t == 0 && h % pr.group == 0 && j0 + jb + kSub + kAhead <= kb;
    };
    for (int jb = 0; jb < nk; jb += kSub)
      for (int h = 0; h < pr.H; ++h)
        for (int t = 0; t < L; ++t) {
          const int i = h * L + t;
          decode_scores<kDV>(qs + std::size_t(i) * hdp, pr.k + std::ptrdiff_t(h / pr.group) * hd,
                             pr.ldkv, j0 + jb, std::min(kSub, nk - jb), dv, nlast,
                             s + i * kKeys + jb, prefetch(jb, h, t));
        }
    for (int i = 0; i < nrows; ++i) {  // online softmax, vectorised over the keys
      const int last = pr.pos0 + i % L;  // row i sees keys <= last
      float* si = s + i * kKeys;
      vf mt = splat(-INFINITY);
      for (int j = 0; j < kKeys; j += kW) {
        vf sj = load(si + j);
        const vi key = iota() + (j0 + j);
        sj = key > (j0 + nk - 1 < last ? j0 + nk - 1 : last) ? splat(-INFINITY) : sj;
        store(si + j, sj);
        mt = vmax(mt, sj);
      }
      const float mnew = std::max(m[i], hmax(mt));
      vf ls{};
      for (int j = 0; j < kKeys; j += kW) {
        const vf p = vexp2(load(si + j) - mnew);
        store(si + j, p);
        ls += p;
      }
      const float alpha = vexp2(splat(m[i] - mnew))[0];
      l[i] = l[i] * alpha + hsum(ls);
      m[i] = mnew;
      for (int d = 0; d < hdp; d += kW) store(o + i * hdp + d, load(o + i * hdp + d) * alpha);
    }
    for (int jb = 0; jb < nk; jb += kSub)
      for (int h = 0; h < pr.H; ++h)
        for (int t = 0; t < L; ++t) {
          const int i = h * L + t;
          decode_pv<kDV>(o + std::size_t(i) * hdp, pr.v + std::ptrdiff_t(h / pr.group) * hd,
                         pr.ldkv, j0 + jb, std::min(kSub, nk - jb), dv, nlast,
                         s + i * kKeys + jb, prefetch(jb, h, t));
        }
  }
}

template <class T>
void decode_any(const Problem<T>& pr, int ka, int kb, Scratch& sc, const Part& part) {
  switch (pr.hdp / kW) {
    case 1: decode_run<1, T>(pr, ka, kb, sc, part); break;
    case 2: decode_run<2, T>(pr, ka, kb, sc, part); break;
    case 4: decode_run<4, T>(pr, ka, kb, sc, part); break;
    case 8: decode_run<8, T>(pr, ka, kb, sc, part); break;
    default: decode_run<0, T>(pr, ka, kb, sc, part);
  }
}

// out row of every row i < nrows: the nsplit partial states combined (exp2 weights relative to
// the common max; a part that saw no key has m = kNoMax and weight 0), divided by l.
template <class T, class OutRow>
void merge_rows(const Problem<T>& pr, float* parts, std::size_t part_size, int cap, int nsplit,
                int nrows, OutRow out_row) {
  for (int i = 0; i < nrows; ++i) {
    float mx = kNoMax;
    for (int s = 0; s < nsplit; ++s)
      mx = std::max(mx, Part{parts + s * part_size, cap, pr.hdp}.m()[i]);
    vf o[8];  // merged in column chunks of 8 vectors
    float* dst = out_row(i);
    for (int c0 = 0; c0 < pr.hd; c0 += 8 * kW) {
      for (auto& x : o) x = vf{};
      float l = 0.0f;
      for (int s = 0; s < nsplit; ++s) {
        const Part ps{parts + s * part_size, cap, pr.hdp};
        const float w = vexp2(splat(ps.m()[i] - mx))[0];
        l += w * ps.l()[i];
        const float* oi = ps.o() + std::size_t(i) * pr.hdp;
        for (int c = 0; c < 8 && c0 + c * kW < pr.hd; ++c) o[c] += w * load(oi + c0 + c * kW);
      }
      const float inv = 1.0f / l;
      for (int c = 0; c < 8 && c0 + c * kW < pr.hd; ++c)
        store_upto(dst + c0 + c * kW, o[c] * inv, pr.hd - c0 - c * kW);
    }
  }
}

template <class T>
void attention_any(float* out, int ldo, const float* q, int ldq, const T* k, const T* v, int L,
                   int pos0, int H, int G, int hd) {
  if (L <= 0 || H <= 0 || hd <= 0) return;
  const int group = H / G;
  const Problem<T> pr{q, ldq, k, v, std::ptrdiff_t(G) * hd, L, pos0, H, G, group, hd,
                      (hd + kW - 1) / kW * kW, float(1.4426950408889634 / std::sqrt(double(hd)))};
  const int nkeys = pos0 + L;
  const int nthreads = omp_get_max_threads();
  const bool parallel = long(L) * H * nkeys * hd >= kParallelWork && nthreads > 1;

  if (L * group <= kFewRows) {  // decode path: split the keys, every task does every head
    const int nsplit = parallel ? std::clamp(nkeys / kMinSplitKeys, 1, 4 * nthreads) : 1;
    const int split_len = ((nkeys + nsplit - 1) / nsplit + kKeys - 1) / kKeys * kKeys;
    const int nrows = H * L;
    const std::size_t part_size = Part::size(nrows, pr.hdp);
    thread_local FloatBuf parts_buf;
    float* parts = scratch(parts_buf, nsplit * part_size);
    for_tasks(parallel, nsplit, [&](int s) {
      thread_local Scratch sc;
      const int ka = std::min(nkeys, s * split_len), kb = std::min(nkeys, ka + split_len);
      decode_any(pr, ka, kb, sc, Part{parts + s * part_size, nrows, pr.hdp});
    });
    merge_rows(pr, parts, part_size, nrows, nsplit, nrows, [&](int i) {
      return out + std::ptrdiff_t(i % L) * ldo + std::ptrdiff_t(i / L) * hd;
    });
    return;
  }

  // Tile path.
  const int rows = L * group, ntiles = (rows + kRows - 1) / kRows;
  int nsplit = 1;  // split the keys only when (kv head, tile) tasks cannot keep threads busy
  if (parallel && G * ntiles < 2 * nthreads)
    nsplit = std::clamp(4 * nthreads / (G * ntiles), 1, std::max(1, nkeys / kMinSplitKeys));
  const int split_len = ((nkeys + nsplit - 1) / nsplit + kKeys - 1) / kKeys * kKeys;
  const int ntasks = G * ntiles * nsplit;
  const std::size_t part_size = Part::size(kRows, pr.hdp);

  // Task order: longest tiles (last rows, most keys) first, for the dynamic schedule.
  auto task_tile = [&](int task) {
    const int split = task % nsplit, rest = task / nsplit;
    const int g = rest % G, tile = ntiles - 1 - rest / G;
    Tile tl{g, tile * kRows, std::min(kRows, rows - tile * kRows), 0, 0};
    const int kend = pos0 + (tl.r0 + tl.nr - 1) / group + 1;  // keys the last row can see
    tl.ka = std::min(kend, split * split_len);
    tl.kb = std::min(kend, tl.ka + split_len);
    return tl;
  };
  auto tile_out = [&](const Tile& tl) {
    return [&pr, tl, out, ldo](int i) {
      const int r = tl.r0 + i;
      return out + std::ptrdiff_t(r / pr.group) * ldo +
             std::ptrdiff_t(tl.g * pr.group + r % pr.group) * pr.hd;
    };
  };

  thread_local FloatBuf parts_buf;  // split tasks' partial states
  float* parts = nsplit > 1 ? scratch(parts_buf, ntasks * part_size) : nullptr;
  for_tasks(parallel, ntasks, [&](int task) {
    thread_local Scratch sc;
    thread_local FloatBuf own;
    const Tile tl = task_tile(task);
    const Part part{nsplit > 1 ? parts + task * part_size : scratch(own, part_size), kRows,
                    pr.hdp};
    run_tile(pr, tl, sc, part);
    if (nsplit == 1) merge_rows(pr, part.base, part_size, kRows, 1, tl.nr, tile_out(tl));
  });
  if (nsplit > 1)
    for_tasks(parallel, G * ntiles, [&](int base) {
      const Tile tl = task_tile(base * nsplit);
      merge_rows(pr, parts + base * nsplit * part_size, part_size, kRows, nsplit, tl.nr,
                 tile_out(tl));
    });
}

}  // namespace

void attention(float* out, int ldo, const float* q, int ldq, const float* k, const float* v,
               int L, int pos0, int H, int G, int hd) {
  attention_any(out, ldo, q, ldq, k, v, L, pos0, H, G, hd);
}

void attention_f16kv(float* out, int ldo, const float* q, int ldq, const uint16_t* k,
                     const uint16_t* v, int L, int pos0, int H, int G, int hd) {
  attention_any(out, ldo, q, ldq, k, v, L, pos0, H, G, hd);
}

// A cache write is one token's row (d = G*hd) or a prompt's rows: one thread unless there are
// enough rows to share.
void store_f16(uint16_t* dst, int ld_dst, const float* src, int ld_src, int n, int d) {
  if (n <= 0 || d <= 0) return;
  const bool parallel = long(n) * d >= (1L << 18) && omp_get_max_threads() > 1;
  run_team(parallel, [&](int id, int nt) {
    const auto [i0, i1] = share(n, id, nt);
    for (int i = i0; i < i1; ++i) {
      uint16_t* di = dst + std::ptrdiff_t(i) * ld_dst;
      const float* si = src + std::ptrdiff_t(i) * ld_src;
      for (int j = 0; j < d; j += kW) store_upto(di + j, load_upto(si + j, d - j), d - j);
    }
  });
}

}  // namespace hm::cpu::HM_ISA_NS
