// hm::cpu vs hm::ref kernels at the seed model's sizes (d_model 512, E 1024, N 16, K 4, H 8,
// hd 64), plus two floors measured in the same run: read bandwidth and FMA peak. Report each
// kernel as a fraction of its floor (bytes / read bandwidth, or flops / FMA peak).
//
//   hm_bench_kernels --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
//
// Counters: bytes and flops are rates (per second of wall time); ns/tok/ch is the inverse rate
// per (token, channel). Wall time throughout: the kernels run on all OpenMP threads.
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <omp.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/rng.h"
#include "kernels/cpu/aligned.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/ops.h"
#include "model/config.h"
#include "model/params.h"
#include "runtime/sampling.h"
#include "train/optimizer.h"

namespace {

constexpr int kD = 512, kE = 1024, kN = 16, kK = 4, kH = 8, kG = 8, kHd = 64;

// 64-byte aligned, like the CPU backend's buffers (unaligned rows would split every vector
// access across two cache lines).
using Vec = hm::cpu::AlignedVec<float>;

Vec random_vec(std::size_t n, float lo, float hi, uint64_t seed) {
  hm::Rng rng(seed);
  Vec v(n);
  for (auto& x : v) x = rng.uniform(lo, hi);
  return v;
}

// Bytes of the last-level cache, as Google Benchmark reads it (sysfs); the context of every run
// prints it. A working set labelled DRAM must exceed it.
std::size_t llc_bytes() {
  std::size_t b = 0;
  for (const auto& c : benchmark::CPUInfo::Get().caches) b = std::max(b, std::size_t(c.size));
  return b;
}

using benchmark::Counter;
void set_rates(benchmark::State& st, double bytes, double flops) {
  if (bytes > 0) st.counters["bytes"] = Counter(bytes, Counter::kIsIterationInvariantRate);
  if (flops > 0) st.counters["flops"] = Counter(flops, Counter::kIsIterationInvariantRate);
}

// --- selective_scan: x, dt, z read and y written once ([L, E] each), B and C ([L, N]) --------
void BM_Scan(benchmark::State& st, bool ref) {
  const int L = int(st.range(0)), E = kE, N = kN;
  const auto x = random_vec(std::size_t(L) * E, -1, 1, 1), dt = random_vec(x.size(), -3, 1, 2),
             z = random_vec(x.size(), -3, 3, 3), bc = random_vec(std::size_t(L) * 2 * N, -1, 1, 4),
             bias = random_vec(E, -4.6f, -2.3f, 5), D = random_vec(E, 0.5f, 1.5f, 6);
  Vec A(std::size_t(E) * N), y(x.size()), s(std::size_t(E) * N, 0.0f);
  for (int e = 0; e < E; ++e)
    for (int n = 0; n < N; ++n) A[e * N + n] = -float(n + 1);
  auto fn = ref ? hm::ref::selective_scan : hm::cpu::selective_scan;
  for (auto _ : st) {
    fn(y.data(), E, s.data(), x.data(), E, dt.data(), E, bias.data(), A.data(), bc.data(),
       bc.data() + N, 2 * N, D.data(), z.data(), E, L, E, N);
    benchmark::DoNotOptimize(y.data());
  }
  set_rates(st, 4.0 * (4.0 * L * E + 2.0 * L * N + 2.0 * E * N), 0);
  st.counters["ns/tok/ch"] =
      Counter(double(L) * E, Counter::kIsIterationInvariantRate | Counter::kInvert);
}
BENCHMARK_CAPTURE(BM_Scan, cpu, false)->Arg(1)->Arg(64)->Arg(512)->Arg(4096)->UseRealTime();
BENCHMARK_CAPTURE(BM_Scan, ref, true)->Arg(1)->Arg(64)->Arg(512)->Arg(4096)->UseRealTime();

// --- conv1d_silu: x read, out written ----------------------------------------------------------
void BM_Conv(benchmark::State& st, bool ref) {
  const int L = int(st.range(0)), E = kE, K = kK;
  const auto x = random_vec(std::size_t(L) * E, -1, 1, 7),
             w = random_vec(std::size_t(E) * K, -.5f, .5f, 8), b = random_vec(E, -.5f, .5f, 9);
  Vec out(x.size()), state(std::size_t(E) * (K - 1), 0.0f);
  auto fn = ref ? hm::ref::conv1d_silu : hm::cpu::conv1d_silu;
  for (auto _ : st) {
    fn(out.data(), E, state.data(), x.data(), E, w.data(), b.data(), L, E, K);
    benchmark::DoNotOptimize(out.data());
  }
  set_rates(st, 4.0 * 2.0 * L * E, 0);
}
BENCHMARK_CAPTURE(BM_Conv, cpu, false)->Arg(1)->Arg(64)->Arg(512)->Arg(4096)->UseRealTime();
BENCHMARK_CAPTURE(BM_Conv, ref, true)->Arg(1)->Arg(64)->Arg(512)->Arg(4096)->UseRealTime();

// --- attention ---------------------------------------------------------------------------------
// flops: QK^T and PV, 2 * hd each per visible (query head, key) pair. bytes: q, out, K, V once.
// The cache is float (ref, cpu) or half (cpu_f16: attention_f16kv), whose bytes are halved.
enum class Attn { ref, cpu, cpu_f16 };

// A [rows, G*hd] cache of random values: floats, or halves of them.
struct Cache {
  Vec f;
  hm::cpu::AlignedVec<uint16_t> h;
  Cache(int rows, uint64_t seed, bool half)
      : f(random_vec(std::size_t(rows) * kG * kHd, -1, 1, seed)) {
    if (!half) return;
    h.resize(f.size());
    hm::cpu::store_f16(h.data(), kG * kHd, f.data(), kG * kHd, rows, kG * kHd);
    Vec().swap(f);
  }
};

void attend(Attn impl, float* out, const float* q, const Cache& k, const Cache& v, int L,
            int pos0) {
  const int ld = kH * kHd;
  switch (impl) {
    case Attn::ref:
      hm::ref::attention(out, ld, q, ld, k.f.data(), v.f.data(), L, pos0, kH, kG, kHd);
      break;
    case Attn::cpu:
      hm::cpu::attention(out, ld, q, ld, k.f.data(), v.f.data(), L, pos0, kH, kG, kHd);
      break;
    case Attn::cpu_f16:
      hm::cpu::attention_f16kv(out, ld, q, ld, k.h.data(), v.h.data(), L, pos0, kH, kG, kHd);
  }
}
double kv_bytes(Attn impl) { return impl == Attn::cpu_f16 ? 2.0 : 4.0; }

void run_attention(benchmark::State& st, Attn impl, int L, int pos0) {
  const int T = pos0 + L;
  const auto q = random_vec(std::size_t(L) * kH * kHd, -1, 1, 10);
  const Cache k(T, 11, impl == Attn::cpu_f16), v(T, 12, impl == Attn::cpu_f16);
  Vec out(q.size());
  for (auto _ : st) {
    attend(impl, out.data(), q.data(), k, v, L, pos0);
    benchmark::DoNotOptimize(out.data());
  }
  const double pairs = double(kH) * (double(L) * pos0 + double(L) * (L + 1) / 2);
  set_rates(st, 4.0 * 2.0 * L * kH * kHd + kv_bytes(impl) * 2.0 * T * kG * kHd,
            4.0 * kHd * pairs);
}
void BM_AttentionPrefill(benchmark::State& st, Attn impl) {
  run_attention(st, impl, int(st.range(0)), 0);
}
void BM_AttentionDecode(benchmark::State& st, Attn impl) {
  run_attention(st, impl, 1, int(st.range(0)) - 1);  // one query over a cache of T keys
}
// Decode as in a model with many attention layers: each call reads another layer's cache, and
// the layers together hold twice the last-level cache (at least 4 layers: 16.8 MB each at
// T = 4096 in float, 8.4 MB in half; 60 and 120 layers against a 480 MiB L3), so K and V come
// from DRAM as they would.
void BM_AttentionDecodeCold(benchmark::State& st, Attn impl) {
  const int T = int(st.range(0));
  const double layer_bytes = kv_bytes(impl) * 2.0 * T * kG * kHd;
  const int layers = std::max(4, int(std::ceil(2.0 * double(llc_bytes()) / layer_bytes)));
  st.counters["layers"] = layers;
  const auto q = random_vec(std::size_t(kH) * kHd, -1, 1, 15);
  std::vector<Cache> k, v;
  for (int i = 0; i < layers; ++i) {
    k.emplace_back(T, 16 + i, impl == Attn::cpu_f16);
    v.emplace_back(T, 32 + i, impl == Attn::cpu_f16);
  }
  Vec out(q.size());
  int layer = 0;
  for (auto _ : st) {
    attend(impl, out.data(), q.data(), k[layer], v[layer], 1, T - 1);
    layer = (layer + 1) % layers;
    benchmark::DoNotOptimize(out.data());
  }
  set_rates(st, kv_bytes(impl) * 2.0 * T * kG * kHd, 4.0 * kHd * kH * T);
}
BENCHMARK_CAPTURE(BM_AttentionDecodeCold, cpu, Attn::cpu)->Arg(4096)->UseRealTime();
BENCHMARK_CAPTURE(BM_AttentionDecodeCold, cpu_f16, Attn::cpu_f16)->Arg(4096)->UseRealTime();

BENCHMARK_CAPTURE(BM_AttentionPrefill, cpu, Attn::cpu)->Arg(64)->Arg(512)->Arg(4096)->UseRealTime();
BENCHMARK_CAPTURE(BM_AttentionPrefill, cpu_f16, Attn::cpu_f16)->Arg(512)->UseRealTime();
// The reference is left out at L = 4096: ~17 GFLOP in scalar double, tens of seconds a run.
BENCHMARK_CAPTURE(BM_AttentionPrefill, ref, Attn::ref)->Arg(64)->Arg(512)->UseRealTime();
BENCHMARK_CAPTURE(BM_AttentionDecode, cpu, Attn::cpu)->Arg(512)->Arg(4096)->UseRealTime();
// In the L3 at T = 4096 (8.4 MB of halves against 16.8 MB of floats).
BENCHMARK_CAPTURE(BM_AttentionDecode, cpu_f16, Attn::cpu_f16)->Arg(512)->Arg(4096)->UseRealTime();
BENCHMARK_CAPTURE(BM_AttentionDecode, ref, Attn::ref)->Arg(512)->Arg(4096)->UseRealTime();

// --- linear at a few rows (decoding a small batch): W [n, k] from memory, as in decode -------
// linear_rows (W read once for all m rows) against OpenBLAS's sgemm (sgemv at m = 1), which
// linear() used for every m before: the crossover sets linear_rows_max. Copies of W fill 4x the
// last-level cache and each call reads the next one. Args: m, n, k.
// rows: one call of the per-row kernel for all m rows; blas: sgemv / sgemm; blocks: the per-row
// kernel on blocks of linear_rows_max rows (what linear() runs for large m where OpenBLAS lacks
// this CPU's widest kernels, linear_cpu.cpp).
enum class LinearWay { rows, blas, blocks };
void BM_LinearRows(benchmark::State& st, LinearWay way) {
  const int m = int(st.range(0)), n = int(st.range(1)), k = int(st.range(2));
  const std::size_t wn = std::size_t(n) * k;
  const int copies = int(std::max<std::size_t>(2, 4 * llc_bytes() / (wn * sizeof(float)) + 1));
  const auto W = random_vec(wn * copies, -1, 1, 21), x = random_vec(std::size_t(m) * k, -1, 1, 22);
  Vec y(std::size_t(m) * n);
  int c = 0;
  for (auto _ : st) {
    const float* w = W.data() + std::size_t(c) * wn;
    if (way == LinearWay::rows) hm::cpu::kernels().linear_rows(y.data(), n, x.data(), k, w, m, n, k, false);
    else if (way == LinearWay::blocks) {
      const int b = hm::cpu::kernels().linear_rows_max;
      for (int r = 0; r < m; r += b)
        hm::cpu::kernels().linear_rows(y.data() + std::size_t(r) * n, n, x.data() + std::size_t(r) * k, k, w,
                                       std::min(b, m - r), n, k, false);
    } else if (m == 1) cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, w, k, x.data(), 1, 0.0f, y.data(), 1);
    else cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x.data(), k, w, k, 0.0f, y.data(), n);
    c = (c + 1) % copies;
    benchmark::DoNotOptimize(y.data());
  }
  set_rates(st, double(wn) * sizeof(float), 2.0 * m * n * k);
}
void LinearRowsArgs(benchmark::internal::Benchmark* b) {
  for (int m : {1, 2, 4, 8, 12, 16, 32, 64, 128})
    for (auto [n, k] : {std::pair{2048, 512}, {512, 1024}, {32000, 512}}) b->Args({m, n, k});
}
BENCHMARK_CAPTURE(BM_LinearRows, rows, LinearWay::rows)->Apply(LinearRowsArgs)->UseRealTime();
BENCHMARK_CAPTURE(BM_LinearRows, blas, LinearWay::blas)->Apply(LinearRowsArgs)->UseRealTime();
// Prefill-sized m: OpenBLAS's sgemm against the per-row kernel in blocks.
void LinearPrefillArgs(benchmark::internal::Benchmark* b) {
  for (int m : {256, 2048})
    for (auto [n, k] : {std::pair{2048, 512}, {512, 1024}, {32000, 512}}) b->Args({m, n, k});
}
BENCHMARK_CAPTURE(BM_LinearRows, prefill_blas, LinearWay::blas)->Apply(LinearPrefillArgs)->UseRealTime();
BENCHMARK_CAPTURE(BM_LinearRows, prefill_blocks, LinearWay::blocks)->Apply(LinearPrefillArgs)->UseRealTime();

// --- rmsnorm: x read, out written --------------------------------------------------------------
void BM_Rmsnorm(benchmark::State& st, bool ref) {
  const int n = int(st.range(0)), d = kD;
  const auto x = random_vec(std::size_t(n) * d, -1, 1, 13), w = random_vec(d, .5f, 1.5f, 14);
  Vec out(x.size());
  auto fn = ref ? hm::ref::rmsnorm : hm::cpu::rmsnorm;
  for (auto _ : st) {
    fn(out.data(), x.data(), w.data(), n, d, 1e-5f);
    benchmark::DoNotOptimize(out.data());
  }
  set_rates(st, 4.0 * 2.0 * n * d, 0);
}
BENCHMARK_CAPTURE(BM_Rmsnorm, cpu, false)->Arg(1)->Arg(64)->Arg(512)->Arg(4096)->UseRealTime();
BENCHMARK_CAPTURE(BM_Rmsnorm, ref, true)->Arg(1)->Arg(64)->Arg(512)->Arg(4096)->UseRealTime();

// --- sampling: exp_sum over a vocabulary row, and whole sampler chains ------------------------
// Logits N(0, 3) over 32,000 ids (a peaked distribution, as a language model's); one token each.
std::vector<float> vocab_logits() {
  hm::Rng rng(31);
  std::vector<float> l(32000);
  for (float& v : l) v = 3.0f * float(rng.normal());
  return l;
}

void BM_ExpSum(benchmark::State& st, bool ref) {
  const auto l = vocab_logits();
  std::vector<float> out(l.size());
  const float mx = *std::max_element(l.begin(), l.end());
  auto fn = ref ? hm::ref::exp_sum : hm::cpu::exp_sum;
  for (auto _ : st) benchmark::DoNotOptimize(fn(out.data(), l.data(), int(l.size()), mx));
  set_rates(st, 8.0 * double(l.size()), 0);
}
BENCHMARK_CAPTURE(BM_ExpSum, cpu, false)->UseRealTime();
BENCHMARK_CAPTURE(BM_ExpSum, ref, true)->UseRealTime();

// The chains: the OpenAI API's defaults (temperature 1, no truncation: a softmax over the whole
// vocabulary), hm generate's (top-k 40, top-p 0.95, min-p 0.05, repeat penalty 1.1), greedy, and
// top-p 0.9 alone.
void BM_Sampler(benchmark::State& st, int which) {
  hm::SamplingParams p;
  if (which == 0) { p.top_k = 0; p.top_p = 1; p.min_p = 0; p.repeat_penalty = 1; p.temperature = 1; }
  if (which == 2) p.temperature = 0;
  if (which == 3) { p.top_k = 0; p.top_p = 0.9f; p.min_p = 0; p.repeat_penalty = 1; p.temperature = 1; }
  const auto l = vocab_logits();
  auto chain = hm::make_sampler_chain(p, int(l.size()));
  for (auto _ : st) {
    const int32_t t = chain->sample(l.data(), int(l.size()));
    chain->accept(t);
    benchmark::DoNotOptimize(t);
  }
}
BENCHMARK_CAPTURE(BM_Sampler, api_defaults, 0)->UseRealTime();
BENCHMARK_CAPTURE(BM_Sampler, hm_defaults, 1)->UseRealTime();
BENCHMARK_CAPTURE(BM_Sampler, greedy, 2)->UseRealTime();
BENCHMARK_CAPTURE(BM_Sampler, top_p_0_9, 3)->UseRealTime();

// --- AdamW over the seed preset's 37.2 M parameters (train/optimizer.cpp, compiled for baseline
// x86-64): reads p, g, m, v and writes p, m, v, 28 bytes a parameter.
void BM_AdamWStep(benchmark::State& st) {
  const hm::ModelConfig c = hm::preset("seed");
  hm::Params p(c), g(c);
  for (int64_t i = 0; i < p.numel(); ++i) {
    p.data()[i] = 0.01f * float(i % 97);
    g.data()[i] = 1e-3f * float(i % 13);
  }
  hm::AdamW opt(p, hm::AdamWConfig{});
  for (auto _ : st) benchmark::DoNotOptimize(opt.step(p, g, 1e-4f));
  set_rates(st, 28.0 * double(p.numel()), 0);
}
BENCHMARK(BM_AdamWStep)->UseRealTime()->Unit(benchmark::kMillisecond);

// --- floors ------------------------------------------------------------------------------------
// DRAM read bandwidth: a vectorised sum over 4x the last-level cache and at least 1 GiB (a
// 256 MiB probe fits this machine's 480 MiB L3) on all threads, with four independent
// accumulators so that the adds keep up with the loads.
// One pass over buf[0, n) on all threads. Cloned per ISA and chosen at load time: a 64-byte
// vector compiled for baseline x86-64 lives in memory, not registers, and would read slower.
[[gnu::target_clones("avx512f", "avx2", "default")]] void read_all(const float* buf, std::size_t n) {
  typedef float v16 __attribute__((vector_size(64)));
#pragma omp parallel
  {
    v16 a0{}, a1{}, a2{}, a3{};
#pragma omp for schedule(static)
    for (std::size_t i = 0; i < n; i += 64) {
      v16 b0, b1, b2, b3;
      std::memcpy(&b0, &buf[i], 64);
      std::memcpy(&b1, &buf[i + 16], 64);
      std::memcpy(&b2, &buf[i + 32], 64);
      std::memcpy(&b3, &buf[i + 48], 64);
      a0 += b0, a1 += b1, a2 += b2, a3 += b3;
    }
    const v16 sum = (a0 + a1) + (a2 + a3);
    benchmark::DoNotOptimize(sum);
  }
}
void BM_FloorReadBandwidth(benchmark::State& st) {
  const std::size_t n = std::max(std::size_t(1) << 30, 4 * llc_bytes()) / sizeof(float) / 64 * 64;
  st.counters["probe_MiB"] = double(n * sizeof(float)) / (1 << 20);
  Vec buf(n, 1.0f);
  for (auto _ : st) read_all(buf.data(), n);
  set_rates(st, 4.0 * double(n), 0);
}
BENCHMARK(BM_FloorReadBandwidth)->UseRealTime();

// FMA peak: 12 independent 16-lane FMA chains per thread (enough to cover FMA latency).
// AVX-512 code whatever the build targets (the kernels choose their ISA at run time); skipped
// on CPUs without it.
[[gnu::target("avx512f")]] void fma_peak_avx512(long steps) {
#pragma omp parallel
    {
      __m512 acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(float(i) * 1e-3f);
      const __m512 m = _mm512_set1_ps(0.9999f), c = _mm512_set1_ps(1e-4f);
      for (long s = 0; s < steps; ++s)
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], m, c);
      float sum[16];
      for (int i = 1; i < 12; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
      _mm512_storeu_ps(sum, acc[0]);
      benchmark::DoNotOptimize(sum);
    }
}
void BM_FloorFmaPeak(benchmark::State& st) {
  if (!__builtin_cpu_supports("avx512f")) {
    st.SkipWithError("no AVX-512 on this CPU");
    return;
  }
  const long steps = 1L << 22;
  for (auto _ : st) fma_peak_avx512(steps);
  set_rates(st, 0, 2.0 * 16 * 12 * double(steps) * omp_get_max_threads());
}
BENCHMARK(BM_FloorFmaPeak)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
