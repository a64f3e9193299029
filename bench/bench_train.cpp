// Training step throughput: loss_and_grad (float) on whole batches.
//
//   hm_bench_train --benchmark_min_time=2 [--benchmark_filter=demo]   (OMP_NUM_THREADS=2 on the 2-core box)
//
// Configs: (a) preset tiny, B=8 L=128; (b) a small demo-scale model (d_model 256, 6 layers,
// attention at 2 and 5, vocab 4096, no MLP, 4 heads) at B=8 L=256.
// Counters: tok/s = tokens (B*L) per wall second; GFLOP/s = the usual 6 * params * tokens
// estimate (forward 2, backward 4 per parameter and token; attention's L^2 terms not counted).
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdint>
#include <vector>

#include "core/rng.h"
#include "model/config.h"
#include "model/params.h"
#include "train/model_grad.h"

namespace {

hm::ModelConfig demo_config() {
  hm::ModelConfig c;
  c.d_model = 256;
  c.n_layers = 6;
  c.attention_layers = {2, 5};
  c.vocab_size = 4096;
  c.d_ff = 0;
  c.n_heads = 4;
  c.n_kv_heads = 4;
  hm::validate(c);
  return c;
}

void run(benchmark::State& st, const hm::ModelConfig& c, int B, int L) {
  hm::Params p(c), g(c);
  hm::init_params(p, 1);
  hm::Rng rng(2);
  std::vector<int32_t> tok(size_t(B) * L), tgt(size_t(B) * L);
  for (auto& t : tok) t = int32_t(rng.next_u64() % uint64_t(c.vocab_size));
  for (size_t i = 0; i < tok.size(); ++i) tgt[i] = (i + 1) % size_t(L) ? tok[i + 1] : -1;
  for (auto _ : st) {
    std::fill(g.data(), g.data() + g.numel(), 0.0f);
    benchmark::DoNotOptimize(hm::loss_and_grad(p, g, tok.data(), tgt.data(), B, L));
  }
  const double tokens = double(B) * L;
  using C = benchmark::Counter;
  st.counters["tok/s"] = C(tokens, C::kIsIterationInvariantRate);
  st.counters["GFLOP/s"] =
      C(6.0 * double(hm::count_params(c)) * tokens * 1e-9, C::kIsIterationInvariantRate);
  st.counters["threads"] = omp_get_max_threads();
}

void BM_TrainTiny(benchmark::State& st) { run(st, hm::preset("tiny"), 8, 128); }
void BM_TrainDemo(benchmark::State& st) { run(st, demo_config(), 8, 256); }

// No MinTime here: --benchmark_min_time sets it (2 s for the figures, tiny for the smoke test).
BENCHMARK(BM_TrainTiny)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_TrainDemo)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
