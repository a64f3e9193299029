// Batched sampling (sampling.h, docs/CUDA.md "Sampling"). The CPU chain's filtered set is
// always a prefix of the order (logit descending, id ascending): TopK, TopP and MinP each cut
// that order, so the set is "key >= key_f" for one 64-bit key (logit bits, then ~id). Cuts are
// found by radix select over that key, with probabilities as 2^-60 fixed point so every sum is
// exact and independent of the order threads add in. The final draw walks the candidates in
// the CPU chain's own order (sorted, by id, or TopP's bucket order), so a seed gives the same
// token as hm::Dist on the CPU.
//
// Per step: prep (copy, penalties, max, arg-max) -> exp -> select (top-k, top-p) -> exp of the
// tempered logits over the set -> draw. Row kernels are one block per row; the exp kernels
// spread over the whole GPU (exp in double, rounded to float, as glibc's expf does).
#include <climits>
#include <cmath>

#include "core/error.h"
#include "core/rng.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/sampling.h"

namespace hm::cuda {
namespace {

using u64 = unsigned long long;

constexpr int kThreads = 512;  // row kernels
constexpr int kWarps = kThreads / 32;
constexpr int kCap = 1024;       // candidates sorted in shared memory when a select narrows to them
constexpr int kBuckets = 1024;   // TopP's bucket pass (runtime/sampling.cpp)
constexpr int kTopFirst = 64;    // TopP's first try: the top 64 (runtime/sampling.cpp)
constexpr double kFix = 0x1p60;  // probability p is the integer p * 2^60
constexpr int kExpThreads = 256, kExpPerThread = 8;
static_assert(kBuckets == 2 * kThreads, "select_bucket gives each thread two buckets");

// The order the CPU chain leaves its candidates in, which Dist's cumulative walk follows.
enum Order : int { kSorted = 0, kById = 1, kByBucket = 2 };

struct RowState {
  int active;   // a sampling row (temperature > 0) with a valid slot
  int argmax;   // lowest id holding mx; -1 for an invalid slot
  float mx;     // max working logit over ids < n
  float lo;     // min finite working logit (TopP's bucket range)
  u64 key_f;    // the set after TopK and TopP: keys >= key_f
  int minp_on;
  float log_min_p, shift, temperature;
  float mx2;    // max tempered logit over the set
  int order, last_bucket;
};

struct PoolView {
  SamplerSlot* slots;
  int32_t* ring;  // [n_slots, max_last_n]
  int n_slots, max_last_n;
};

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

PoolView view_of(const SamplerPool& p) {
  auto* base = static_cast<unsigned char*>(p.mem);
  return {reinterpret_cast<SamplerSlot*>(base),
          reinterpret_cast<int32_t*>(base + align_up(sizeof(SamplerSlot) * size_t(p.n_slots), 16)),
          p.n_slots, p.max_last_n};
}

__device__ __forceinline__ int slot_of(const int32_t* slots, int b, int n_slots) {
  const int s = slots ? slots[b] : b;
  return s >= 0 && s < n_slots ? s : -1;
}

// NaN -> -inf (Candidates::reset), -0 -> +0 (equal as floats, so they must share a key).
__device__ __forceinline__ float canon(float x) { return x != x ? -INFINITY : (x == 0.0f ? 0.0f : x); }

// Larger key = earlier in the order (logit descending, id ascending). Never 0 for ids < 2^31.
__device__ __forceinline__ u64 key_of(float l, int v) {
  const uint32_t u = __float_as_uint(l);
  const uint32_t o = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (u64(o) << 32) | u64(~uint32_t(v));
}
__device__ __forceinline__ int id_of(u64 key) { return int(~uint32_t(key)); }

__device__ __forceinline__ u64 fix(float p) { return __double2ull_rn(double(p) * kFix); }
__device__ __forceinline__ bool meets(u64 cum, u64 target, bool strict) {
  return strict ? cum > target : cum >= target;
}

// TopP::bucket_select's bucket of a logit, with the same float operations.
__device__ __forceinline__ int bucket_of(float l, float mx, float inv_width) {
  int b = kBuckets - 1;
  if (isfinite(l)) {
    const float x = (mx - l) * inv_width;
    if (x < float(kBuckets - 1)) b = int(x);
  }
  return b;
}
__device__ __forceinline__ float bucket_inv_width(float mx, float lo) {
  return mx > lo ? float(kBuckets) / (mx - lo) : 0.0f;
}

// Reduction over the block in a fixed order (deterministic for doubles); every thread gets it.
template <class T, class Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T part[kWarps];
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  T r = part[0];
  for (int i = 1; i < kWarps; ++i) r = op(r, part[i]);
  __syncthreads();
  return r;
}
struct Add { template <class T> __device__ T operator()(T a, T b) const { return a + b; } };

// Inclusive prefix sum over the block's threads; *total gets the block's sum.
__device__ u64 block_scan(u64 x, u64* total) {
  __shared__ u64 wsum[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 1; o < 32; o <<= 1) {
    const u64 y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) wsum[warp] = x;
  __syncthreads();
  if (warp == 0) {
    u64 t = lane < kWarps ? wsum[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const u64 y = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += y;
    }
    if (lane < kWarps) wsum[lane] = t;
  }
  __syncthreads();
  if (warp > 0) x += wsum[warp - 1];
  *total = wsum[kWarps - 1];
  __syncthreads();
  return x;
}

struct SelectSmem {
  u64 hw[256];       // weight per radix bin
  uint32_t hc[256];  // elements per radix bin
  u64 list[kCap];
  u64 hb[kBuckets];
  u64 res_before, res_key;
  int res_bin, res_found, res_id, list_n;
};

// The element the cumulative walk stops at: the first whose inclusive sum meets the target.
// before = the sum of the elements ahead of it (or the total when not found).
struct Pick {
  int found, id;
  u64 before, key;
};

// Descending sort of a[0, n), n a power of two (bitonic; one compare-exchange per thread and stage).
__device__ void bitonic_desc(u64* a, int n) {
  for (int k = 2; k <= n; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n; i += kThreads) {
        const int l = i ^ j;
        if (l > i) {
          const u64 x = a[i], y = a[l];
          if ((i & k) == 0 ? x < y : x > y) {
            a[i] = y;
            a[l] = x;
          }
        }
      }
      __syncthreads();
    }
}

// The tail of select_desc: the (at most kCap) elements under the key prefix, sorted, walked.
template <class Pred, class Weight>
__device__ Pick finish_sorted(const float* w, int n, u64 prefix, u64 mask, Pred pred, Weight weight,
                              u64 acc, u64 target, bool strict, SelectSmem& sm) {
  if (threadIdx.x == 0) {
    sm.list_n = 0;
    sm.res_found = 0;
    sm.res_before = 0;
  }
  __syncthreads();
  for (int v = threadIdx.x; v < n; v += kThreads) {
    const u64 key = key_of(w[v], v);
    if ((key & mask) != prefix || !pred(v) || weight(v) == 0) continue;
    const int i = atomicAdd(&sm.list_n, 1);
    if (i < kCap) sm.list[i] = key;
  }
  __syncthreads();
  const int m = min(sm.list_n, kCap);
  int p2 = 1;
  while (p2 < m) p2 <<= 1;
  for (int i = m + int(threadIdx.x); i < p2; i += kThreads) sm.list[i] = 0;
  __syncthreads();
  bitonic_desc(sm.list, p2);
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    u64 c = acc;
    bool found = false;
    for (int base = 0; base < m; base += 32) {
      const int i = base + lane;
      const u64 x = i < m ? weight(id_of(sm.list[i])) : 0;
      u64 s = x;
      for (int o = 1; o < 32; o <<= 1) {
        const u64 y = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += y;
      }
      const unsigned hit = __ballot_sync(0xffffffffu, i < m && meets(c + s, target, strict));
      if (hit) {
        if (lane == __ffs(hit) - 1) {
          sm.res_found = 1;
          sm.res_id = id_of(sm.list[i]);
          sm.res_key = sm.list[i];
          sm.res_before = c + s - x;
        }
        found = true;
        break;
      }
      c += __shfl_sync(0xffffffffu, s, 31);
    }
    if (!found && lane == 0) sm.res_before = c;
  }
  __syncthreads();
  const Pick r{sm.res_found, sm.res_found ? sm.res_id : -1, sm.res_before, sm.res_found ? sm.res_key : 0};
  __syncthreads();
  return r;
}

// Walks the elements v < n with pred(v) in key order (logit descending, id ascending) and stops
// at the first whose cumulative weight meets target (>=, or > when strict). Elements of weight
// 0 are skipped (they can never be where the sum crosses). Radix select, 8 bits of the key per
// level, until the bin where the sum crosses holds at most kCap elements; those are sorted.
template <class Pred, class Weight>
__device__ Pick select_desc(const float* w, int n, Pred pred, Weight weight, u64 target, bool strict,
                            SelectSmem& sm) {
  u64 prefix = 0, mask = 0, acc = 0;
  for (int shift = 56;; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) {
      sm.hw[i] = 0;
      sm.hc[i] = 0;
    }
    if (threadIdx.x == 0) sm.res_bin = -1;
    __syncthreads();
    for (int v = threadIdx.x; v < n; v += kThreads) {
      const u64 key = key_of(w[v], v);
      if ((key & mask) != prefix || !pred(v)) continue;
      const u64 x = weight(v);
      if (x == 0) continue;
      const int bin = int((key >> shift) & 255);
      atomicAdd(&sm.hw[bin], x);
      atomicAdd(&sm.hc[bin], 1u);
    }
    __syncthreads();
    // Thread t holds bin 255 - t: the scan runs in descending key order.
    const int t = threadIdx.x;
    const u64 x = t < 256 ? sm.hw[255 - t] : 0;
    u64 total = 0;
    const u64 incl = block_scan(x, &total);
    if (t < 256 && !meets(acc + incl - x, target, strict) && meets(acc + incl, target, strict)) {
      sm.res_bin = 255 - t;
      sm.res_before = acc + incl - x;
    }
    __syncthreads();
    const int bin = sm.res_bin;
    const u64 before = sm.res_before;
    const uint32_t cnt = bin >= 0 ? sm.hc[bin] : 0;
    __syncthreads();
    if (bin < 0) return Pick{0, -1, acc + total, 0};
    acc = before;
    prefix |= u64(bin) << shift;
    mask |= u64(255) << shift;
    if (cnt <= uint32_t(kCap) || shift == 0)
      return finish_sorted(w, n, prefix, mask, pred, weight, acc, target, strict, sm);
  }
}

// The same walk in id order (strict): each thread sums a contiguous run of ids, a block scan
// finds the run where the sum crosses, and its thread walks it.
template <class Pred, class Weight>
__device__ Pick select_by_id(int n, Pred pred, Weight weight, u64 target, SelectSmem& sm) {
  const int seg = (n + kThreads - 1) / kThreads;
  const int v0 = min(n, int(threadIdx.x) * seg), v1 = min(n, v0 + seg);
  u64 s = 0;
  for (int v = v0; v < v1; ++v)
    if (pred(v)) s += weight(v);
  if (threadIdx.x == 0) sm.res_found = 0;
  u64 total = 0;
  const u64 incl = block_scan(s, &total);  // its barriers publish res_found = 0
  const u64 excl = incl - s;
  if (excl <= target && incl > target) {
    u64 c = excl;
    for (int v = v0; v < v1; ++v) {
      if (!pred(v)) continue;
      const u64 x = weight(v);
      c += x;
      if (c > target) {
        sm.res_found = 1;
        sm.res_id = v;
        sm.res_before = c - x;
        break;
      }
    }
  }
  __syncthreads();
  const Pick r{sm.res_found, sm.res_found ? sm.res_id : -1, sm.res_found ? sm.res_before : total, 0};
  __syncthreads();
  return r;
}

// The bucket (ascending) where the cumulative weight first exceeds target; Pick.id = bucket.
template <class Weight, class Bucket>
__device__ Pick select_bucket(int n, Weight weight, Bucket bucket, u64 target, SelectSmem& sm) {
  for (int i = threadIdx.x; i < kBuckets; i += kThreads) sm.hb[i] = 0;
  if (threadIdx.x == 0) sm.res_bin = -1;
  __syncthreads();
  for (int v = threadIdx.x; v < n; v += kThreads) {
    const u64 x = weight(v);
    if (x) atomicAdd(&sm.hb[bucket(v)], x);
  }
  __syncthreads();
  const int b0 = 2 * int(threadIdx.x);
  const u64 s = sm.hb[b0] + sm.hb[b0 + 1];
  u64 total = 0;
  u64 c = block_scan(s, &total) - s;
  for (int b = b0; b < b0 + 2; ++b) {
    if (c <= target && c + sm.hb[b] > target) {
      sm.res_bin = b;
      sm.res_before = c;
    }
    c += sm.hb[b];
  }
  __syncthreads();
  const Pick r{sm.res_bin >= 0, sm.res_bin, sm.res_bin >= 0 ? sm.res_before : total, 0};
  __syncthreads();
  return r;
}

// ---- kernels ----

// The prep pass runs on kPrepChunk ids per block, a row over several blocks: one block per row
// streamed a 50k vocabulary at ~22 us a step (Nsight, docs/CUDA.md), a tenth of a small model's
// decode step.
constexpr int kPrepChunk = 4096;
struct PrepPart {
  float mx, lo;
  int am;
};
int prep_chunks(int n) { return ceil_div(n, kPrepChunk); }

// Row b, ids [c * kPrepChunk, ...) < n: working logits (NaN -> -inf), the penalties of the slot's
// window that fall there (each distinct token once, as RepetitionPenalty; then presence and
// frequency), and the chunk's max, min finite and arg-max into part[b * chunks + c].
__global__ void __launch_bounds__(kThreads) prep_kernel(const float* __restrict__ logits, int ld, int n,
                                                        PoolView pool, const int32_t* __restrict__ slots,
                                                        PrepPart* part, float* work, size_t ldw) {
  const int c = blockIdx.x, b = blockIdx.y, chunks = gridDim.x;
  const int slot = slot_of(slots, b, pool.n_slots);
  if (slot < 0) return;  // prep_finish_kernel marks the row
  const int v0 = c * kPrepChunk, v1 = min(n, v0 + kPrepChunk);
  const float* src = logits + size_t(b) * ld;
  float* w = work + size_t(b) * ldw;  // written and re-read by this block: no read-only loads
  for (int v = v0 + int(threadIdx.x); v < v1; v += kThreads) w[v] = canon(src[v]);
  __syncthreads();

  const SamplerSlot& sp = pool.slots[slot];
  const int L = sp.last_n;
  const int len = L > 0 ? int(min(u64(sp.n_accepted), u64(L))) : 0;  // ring[0, len) is the window
  const bool rep = sp.repeat_penalty != 1.0f;
  const bool pf = sp.presence_penalty != 0.0f || sp.frequency_penalty != 0.0f;
  if (len > 0 && (rep || pf)) {
    __shared__ int32_t window[kMaxSampleLastN];
    const int32_t* ring = pool.ring + size_t(slot) * pool.max_last_n;
    for (int i = threadIdx.x; i < len; i += kThreads) window[i] = ring[i];
    __syncthreads();
    for (int j = threadIdx.x; j < len; j += kThreads) {
      const int t = window[j];
      if (t < v0 || t >= v1) continue;  // another chunk's id (or outside [0, n))
      bool first = true;
      int count = 0;
      for (int i = 0; i < len; ++i) {
        if (window[i] != t) continue;
        if (i < j) {
          first = false;
          break;
        }
        ++count;
      }
      if (!first) continue;  // the token's first slot in the window applies it, once
      float l = w[t];
      if (rep) l = l > 0 ? l / sp.repeat_penalty : l * sp.repeat_penalty;
      if (pf) l = l - (sp.presence_penalty + sp.frequency_penalty * float(count));
      w[t] = canon(l);
    }
    __syncthreads();
  }

  float mx = -INFINITY, lo = INFINITY;
  int am = INT_MAX;
  for (int v = v0 + int(threadIdx.x); v < v1; v += kThreads) {
    const float l = w[v];
    if (am == INT_MAX || l > mx) {  // ids rise within a thread: the first of equals stays
      mx = l;
      am = v;
    }
    if (isfinite(l)) lo = fminf(lo, l);
  }
  const float M = block_reduce(mx, [](float a, float d) { return fmaxf(a, d); });
  const int A = block_reduce(mx == M ? am : INT_MAX, [](int a, int d) { return min(a, d); });
  const float LO = block_reduce(lo, [](float a, float d) { return fminf(a, d); });
  if (threadIdx.x == 0) part[size_t(b) * chunks + c] = PrepPart{M, LO, A};
}

// Row b's state from its chunks' parts, in id order (the lowest id of equal maxima wins).
// With out (the all-greedy launch), also the token of a row that draws nothing: draw_kernel's.
__global__ void prep_finish_kernel(PoolView pool, const int32_t* __restrict__ slots, const PrepPart* __restrict__ part,
                                   int chunks, RowState* rs, int32_t* out) {
  const int b = blockIdx.x;
  if (threadIdx.x != 0) return;
  const int slot = slot_of(slots, b, pool.n_slots);
  RowState& r = rs[b];
  if (slot < 0) {
    r.active = 0;
    r.argmax = -1;
    if (out) out[b] = -1;
    return;
  }
  float M = -INFINITY, LO = INFINITY;
  int A = INT_MAX;
  for (int c = 0; c < chunks; ++c) {
    const PrepPart p = part[size_t(b) * chunks + c];
    if (A == INT_MAX || p.mx > M) {  // chunks rise in id: the first of equal maxima stays
      M = p.mx;
      A = p.am;
    }
    LO = fminf(LO, p.lo);
  }
  r.active = pool.slots[slot].temperature > 0.0f;
  r.argmax = A;
  r.mx = M;
  r.lo = fminf(LO, M);
  if (out && !r.active) out[b] = A;
}

// pass 0: e = exp(l - mx) over ids < n (TopP's probabilities before normalising).
// pass 1: e = exp(l' - mx2) over the filtered set, l' = (l - shift) / t, 0 outside (Dist's).
// A non-finite max gives the CPU's rule instead: 1 at the max, 0 elsewhere.
__global__ void __launch_bounds__(kExpThreads) exp_kernel(const RowState* __restrict__ rs,
                                                          const float* __restrict__ work, float* __restrict__ e,
                                                          size_t ldw, int n, int pass) {
  const int b = blockIdx.y;
  const RowState& r = rs[b];
  if (!r.active) return;
  const float* w = work + size_t(b) * ldw;
  float* eb = e + size_t(b) * ldw;
  const int v0 = blockIdx.x * kExpThreads * kExpPerThread + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kExpPerThread; ++k) {
    const int v = v0 + k * kExpThreads;
    if (v >= n) break;
    const float l = w[v];
    float out;
    if (pass == 0) {
      out = isfinite(r.mx) ? float(exp(double(l - r.mx))) : (l == r.mx ? 1.0f : 0.0f);
    } else {
      const bool in = key_of(l, v) >= r.key_f && (!r.minp_on || l - r.mx >= r.log_min_p);
      const float lt = (l - r.shift) / r.temperature;
      out = !in ? 0.0f : isfinite(r.mx2) ? float(exp(double(lt - r.mx2))) : (lt == r.mx2 ? 1.0f : 0.0f);
    }
    eb[v] = out;
  }
}

// TopK and TopP cuts, the draw order, and what MinP and Temperature need.
__global__ void __launch_bounds__(kThreads) select_kernel(PoolView pool, const int32_t* __restrict__ slots,
                                                          RowState* rs, const float* __restrict__ work,
                                                          const float* __restrict__ e_all, size_t ldw, int n) {
  __shared__ SelectSmem sm;
  const int b = blockIdx.x;
  if (!rs[b].active) return;
  const SamplerSlot& sp = pool.slots[slot_of(slots, b, pool.n_slots)];
  const float* w = work + size_t(b) * ldw;
  const float* e = e_all + size_t(b) * ldw;
  const float mx = rs[b].mx, lo = rs[b].lo;
  const bool finite = isfinite(mx);

  const int k = sp.top_k;
  const bool topk = k > 0 && k < n;
  u64 key_k = 0;
  if (topk) {
    const Pick p = select_desc(w, n, [](int) { return true; }, [](int) { return u64(1); }, u64(k), false, sm);
    key_k = p.key;
  }
  const int size = topk ? k : n;
  const bool topp = sp.top_p < 1.0f && size > 1;
  u64 key_f = key_k;
  bool found = false;
  int boundary = -1;
  if (topp) {
    double z = 0;
    for (int v = threadIdx.x; v < n; v += kThreads)
      if (key_of(w[v], v) >= key_k) z += e[v];
    z = block_reduce(z, Add{});
    const float inv = finite ? float(1.0 / z) : 1.0f / float(z);  // compute_probs's two cases
    const u64 target = __double2ull_ru(double(sp.top_p) * kFix);
    const Pick p = select_desc(
        w, n, [=](int v) { return key_of(w[v], v) >= key_k; }, [=](int v) { return fix(e[v] * inv); },
        target, false, sm);
    if (p.found) {
      key_f = p.key;
      found = true;
      boundary = p.id;
    }
  }
  int order = kById, last = kBuckets - 1;
  if (topk) {
    order = kSorted;
  } else if (topp) {
    order = kSorted;  // TopP sorted the top 64 (or everything, for a non-finite max)
    if (n > kTopFirst && finite) {
      int cnt = 0;
      if (found)
        for (int v = threadIdx.x; v < n; v += kThreads) cnt += key_of(w[v], v) >= key_f;
      cnt = found ? block_reduce(cnt, Add{}) : n;
      if (cnt > kTopFirst) {
        order = kByBucket;
        if (found) last = bucket_of(w[boundary], mx, bucket_inv_width(mx, lo));
      }
    }
  }
  if (threadIdx.x == 0) {
    RowState& r = rs[b];
    r.key_f = key_f;
    r.minp_on = sp.min_p > 0.0f && finite;
    r.log_min_p = sp.log_min_p;
    r.temperature = sp.temperature;
    r.shift = finite ? mx : 0.0f;
    r.mx2 = (mx - r.shift) / sp.temperature;  // the top token is always in the set
    r.order = order;
    r.last_bucket = last;
  }
}

__device__ __forceinline__ u64 rotl64(u64 x, int k) { return (x << k) | (x >> (64 - k)); }

// Rng::uniform() on the slot's xoshiro256** state, advancing it.
__device__ double rng_uniform(u64* s) {
  const u64 result = rotl64(s[1] * 5, 7) * 9;
  const u64 t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl64(s[3], 45);
  return double(result >> 11) * 0x1.0p-53;
}

// Dist: probabilities over the set, then one draw walked in the CPU chain's candidate order
// (or, with probs, the probabilities written out and nothing drawn).
__global__ void __launch_bounds__(kThreads) draw_kernel(int32_t* out, float* probs, int ldp, int V, PoolView pool,
                                                        const int32_t* __restrict__ slots, const RowState* rs,
                                                        const float* __restrict__ work,
                                                        const float* __restrict__ e_all, size_t ldw, int n) {
  __shared__ SelectSmem sm;
  __shared__ u64 s_target;
  const int b = blockIdx.x;
  const RowState r = rs[b];
  if (!r.active) {
    if (out && threadIdx.x == 0) out[b] = r.argmax;
    if (probs)
      for (int v = threadIdx.x; v < V; v += kThreads) probs[size_t(b) * ldp + v] = v == r.argmax ? 1.0f : 0.0f;
    return;
  }
  const float* w = work + size_t(b) * ldw;
  const float* e = e_all + size_t(b) * ldw;
  double z = 0;
  for (int v = threadIdx.x; v < n; v += kThreads) z += e[v];
  z = block_reduce(z, Add{});
  const float inv = isfinite(r.mx2) ? float(1.0 / z) : 1.0f / float(z);
  if (probs) {
    for (int v = threadIdx.x; v < V; v += kThreads) probs[size_t(b) * ldp + v] = v < n ? e[v] * inv : 0.0f;
    return;
  }
  const auto weight = [=](int v) { return fix(e[v] * inv); };
  u64 part = 0;
  for (int v = threadIdx.x; v < n; v += kThreads) part += weight(v);
  const u64 total = block_reduce(part, Add{});
  if (threadIdx.x == 0) {
    uint64_t* s = pool.slots[slot_of(slots, b, pool.n_slots)].rng;
    u64 st[4] = {s[0], s[1], s[2], s[3]};
    const double u = rng_uniform(st);
    for (int i = 0; i < 4; ++i) s[i] = st[i];
    // Dist: the first candidate whose cumulative probability exceeds u * total.
    u64 t = __double2ull_rd(u * double(total));
    if (total > 0 && t >= total) t = total - 1;
    s_target = t;
  }
  __syncthreads();
  const u64 target = s_target;
  Pick p{0, -1, 0, 0};
  if (total > 0) {
    if (r.order == kSorted) {
      p = select_desc(w, n, [](int) { return true; }, weight, target, true, sm);
    } else if (r.order == kById) {
      p = select_by_id(n, [](int) { return true; }, weight, target, sm);
    } else {
      // TopP's bucket order: buckets ascending; ids ascending inside each, except the bucket
      // where the nucleus ended, which TopP sorted.
      const float inv_width = bucket_inv_width(r.mx, r.lo);
      const auto bucket = [=](int v) { return bucket_of(w[v], r.mx, inv_width); };
      const Pick pb = select_bucket(n, weight, bucket, target, sm);
      if (pb.found) {
        const int bs = pb.id;
        const u64 rest = target - pb.before;
        const auto in_bucket = [=](int v) { return bucket(v) == bs; };
        p = bs == r.last_bucket ? select_desc(w, n, in_bucket, weight, rest, true, sm)
                                : select_by_id(n, in_bucket, weight, rest, sm);
      }
    }
  }
  // Not found only if every probability rounded to 0 in fixed point: the arg-max then.
  if (threadIdx.x == 0) out[b] = p.found ? p.id : r.argmax;
}

// Sequence s appends its tokens to its slot's ring (the last last_n of them matter).
__global__ void accept_kernel(PoolView pool, const int32_t* __restrict__ slots, const int32_t* __restrict__ tokens,
                              const int32_t* __restrict__ cu) {
  const int s = blockIdx.x;
  const int slot = slot_of(slots, s, pool.n_slots);
  if (slot < 0) return;
  SamplerSlot& sp = pool.slots[slot];
  const int begin = cu ? cu[s] : s, end = cu ? cu[s + 1] : s + 1;
  const int m = end - begin;
  if (m <= 0) return;
  const int L = sp.last_n;
  const u64 c = sp.n_accepted;
  int32_t* ring = pool.ring + size_t(slot) * pool.max_last_n;
  if (L > 0)
    for (int i = max(0, m - L) + int(threadIdx.x); i < m; i += blockDim.x) ring[(c + u64(i)) % u64(L)] = tokens[begin + i];
  __syncthreads();  // every thread has read n_accepted
  if (threadIdx.x == 0) sp.n_accepted = c + u64(m);
}

size_t work_ld(int V) { return align_up(size_t(V), 32); }

void run(int32_t* out, float* probs, int ldp, const float* logits, int ld, int B, int V, int n_decodable,
         const SamplerPool& pool, const int32_t* slots, void* workspace, cudaStream_t stream, bool all_greedy) {
  const char* op = probs ? "sample_probs" : "sample";
  HM_CHECK(B >= 1 && B <= 65535, op, ": B must be in [1, 65535] (got ", B, ")");
  HM_CHECK(V >= 1, op, ": V must be >= 1 (got ", V, ")");
  HM_CHECK(n_decodable >= 1 && n_decodable <= V, op, ": n_decodable must be in [1, V = ", V, "] (got ",
           n_decodable, ")");
  HM_CHECK(ld >= V, op, ": logits row stride ld (", ld, ") must be >= V (", V, ")");
  HM_CHECK(logits != nullptr && workspace != nullptr, op, ": logits and workspace must be device pointers");
  HM_CHECK(probs ? ldp >= V : out != nullptr, op, probs ? ": probs row stride must be >= V" : ": out must be a device pointer");
  HM_CHECK(pool.mem != nullptr && pool.n_slots >= 1, op, ": sampler pool has no slots");
  const size_t ldw = work_ld(V);
  auto* rs = static_cast<RowState*>(workspace);
  float* work = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + align_up(sizeof(RowState) * size_t(B), 256));
  float* e = work + size_t(B) * ldw;
  auto* part = reinterpret_cast<PrepPart*>(e + size_t(B) * ldw);
  const PoolView pv = view_of(pool);
  const dim3 exp_grid(unsigned(ceil_div(n_decodable, kExpThreads * kExpPerThread)), unsigned(B));
  const int chunks = prep_chunks(n_decodable);
  prep_kernel<<<dim3(unsigned(chunks), unsigned(B)), kThreads, 0, stream>>>(logits, ld, n_decodable, pv, slots, part,
                                                                            work, ldw);
  const bool greedy_only = all_greedy && out != nullptr && probs == nullptr;
  prep_finish_kernel<<<B, 32, 0, stream>>>(pv, slots, part, chunks, rs, greedy_only ? out : nullptr);
  if (greedy_only) {  // every row's token is written: the rest of the chain would only pass them through
    HM_CUDA_LAUNCHED(op);
    return;
  }
  exp_kernel<<<exp_grid, kExpThreads, 0, stream>>>(rs, work, e, ldw, n_decodable, 0);
  select_kernel<<<B, kThreads, 0, stream>>>(pv, slots, rs, work, e, ldw, n_decodable);
  exp_kernel<<<exp_grid, kExpThreads, 0, stream>>>(rs, work, e, ldw, n_decodable, 1);
  draw_kernel<<<B, kThreads, 0, stream>>>(out, probs, ldp, V, pv, slots, rs, work, e, ldw, n_decodable);
  HM_CUDA_LAUNCHED(op);
}

}  // namespace

size_t sampler_pool_bytes(int n_slots, int max_last_n) {
  HM_CHECK(n_slots >= 1, "sampler pool: n_slots must be >= 1 (got ", n_slots, ")");
  HM_CHECK(max_last_n >= 0 && max_last_n <= kMaxSampleLastN, "sampler pool: max_last_n must be in [0, ",
           kMaxSampleLastN, "] (got ", max_last_n, ")");
  return align_up(sizeof(SamplerSlot) * size_t(n_slots), 16) + sizeof(int32_t) * size_t(n_slots) * size_t(max_last_n);
}

SamplerSlot make_sampler_slot(const SampleParams& p, int max_last_n) {
  HM_CHECK(std::isfinite(p.temperature) && p.temperature >= 0,
           "sampling: temperature must be >= 0 (got ", p.temperature, ")");
  HM_CHECK(p.top_k >= 0, "sampling: top_k must be >= 0 (got ", p.top_k, ")");
  HM_CHECK(p.top_p > 0 && p.top_p <= 1, "sampling: top_p must be in (0, 1] (got ", p.top_p, ")");
  HM_CHECK(p.min_p >= 0 && p.min_p < 1, "sampling: min_p must be in [0, 1) (got ", p.min_p, ")");
  HM_CHECK(std::isfinite(p.repeat_penalty) && p.repeat_penalty > 0,
           "sampling: repeat_penalty must be > 0 (got ", p.repeat_penalty, ")");
  HM_CHECK(std::isfinite(p.presence_penalty), "sampling: presence_penalty must be finite (got ",
           p.presence_penalty, ")");
  HM_CHECK(std::isfinite(p.frequency_penalty), "sampling: frequency_penalty must be finite (got ",
           p.frequency_penalty, ")");
  HM_CHECK(p.repeat_last_n >= 0 && p.repeat_last_n <= max_last_n,
           "sampling: repeat_last_n must be in [0, ", max_last_n, "] (the pool's window; got ", p.repeat_last_n, ")");
  SamplerSlot s{};
  s.temperature = p.temperature;
  s.top_p = p.top_p;
  s.min_p = p.min_p;
  s.log_min_p = p.min_p > 0 ? std::log(p.min_p) : 0.0f;  // float log, as MinP takes it
  s.repeat_penalty = p.repeat_penalty;
  s.presence_penalty = p.presence_penalty;
  s.frequency_penalty = p.frequency_penalty;
  s.top_k = p.top_k;
  s.last_n = p.repeat_last_n;
  const Rng::State st = Rng(p.seed).state();
  for (int i = 0; i < 4; ++i) s.rng[i] = st.s[i];
  s.n_accepted = 0;
  return s;
}

void sampler_set_slot(const SamplerPool& pool, int slot, const SamplerSlot& s, cudaStream_t stream) {
  HM_CHECK(pool.mem != nullptr, "sampler_set_slot: the pool has no memory");
  HM_CHECK(slot >= 0 && slot < pool.n_slots, "sampler_set_slot: slot ", slot, " outside the pool's ", pool.n_slots);
  HM_CHECK(s.last_n >= 0 && s.last_n <= pool.max_last_n, "sampler_set_slot: repeat_last_n ", s.last_n,
           " exceeds the pool's window ", pool.max_last_n);
  HM_CUDA_OK(cudaMemcpyAsync(view_of(pool).slots + slot, &s, sizeof s, cudaMemcpyHostToDevice, stream),
             "sampler_set_slot");
}

void sampler_accept(const SamplerPool& pool, const int32_t* slots, const int32_t* tokens, const int32_t* cu,
                    int nseq, cudaStream_t stream) {
  HM_CHECK(nseq >= 0, "sampler_accept: nseq must be >= 0 (got ", nseq, ")");
  if (nseq == 0) return;
  HM_CHECK(pool.mem != nullptr && tokens != nullptr, "sampler_accept: pool and tokens must be device memory");
  accept_kernel<<<nseq, 256, 0, stream>>>(view_of(pool), slots, tokens, cu);
  HM_CUDA_LAUNCHED("sampler_accept");
}

size_t sample_workspace_bytes(int B, int V) {
  HM_CHECK(B >= 1 && V >= 1, "sample_workspace_bytes: B and V must be >= 1 (got ", B, ", ", V, ")");
  return align_up(sizeof(RowState) * size_t(B), 256) + 2 * sizeof(float) * size_t(B) * work_ld(V) +
         sizeof(PrepPart) * size_t(B) * size_t(prep_chunks(V));
}

void sample(int32_t* out, const float* logits, int ld, int B, int V, int n_decodable, const SamplerPool& pool,
            const int32_t* slots, void* workspace, cudaStream_t stream, bool all_greedy) {
  run(out, nullptr, 0, logits, ld, B, V, n_decodable, pool, slots, workspace, stream, all_greedy);
}

void sample_probs(float* probs, int ldp, const float* logits, int ld, int B, int V, int n_decodable,
                  const SamplerPool& pool, const int32_t* slots, void* workspace, cudaStream_t stream) {
  HM_CHECK(probs != nullptr, "sample_probs: probs must be a device pointer");
  run(nullptr, probs, ldp, logits, ld, B, V, n_decodable, pool, slots, workspace, stream, false);
}

}  // namespace hm::cuda
