// The sampler chains before and after exp_sum (stop 35), one shell run: compiled against build/libhm_core.a
// of the parent commit (s2) and of the exp_sum commit (s2b), run alternately twice:
//   g++ -std=c++20 -O2 -fopenmp -Isrc sampler_ab.cpp build/libhm_core.a -lopenblas -o s2
// AMD EPYC Zen 5, best of 50 tokens, us per token (before -> after): API defaults 149.9 / 151.1 -> 70.2 / 71.6,
// hm defaults 62.2 / 56.0 -> 63.5 / 63.5, greedy 32.7 / 32.7 -> 32.8 / 30.8, top-p 0.9 alone 234.1 / 233.9 -> 157.5 / 158.0.
// Since then bench_kernels has BM_Sampler (the same chains), for the tree as it is.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>
#include "runtime/sampling.h"
using namespace hm;
int main() {
  const int V = 32000;
  std::vector<float> logits(V);
  std::mt19937 g(1); std::normal_distribution<float> nd(0.f, 3.f);
  for (auto& x : logits) x = nd(g);
  struct Case { const char* name; SamplingParams p; };
  SamplingParams api; api.temperature = 1; api.top_k = 0; api.top_p = 1; api.min_p = 0; api.repeat_penalty = 1;
  SamplingParams def;
  SamplingParams greedy; greedy.temperature = 0;
  SamplingParams topp = api; topp.top_p = 0.9f;
  for (Case c : {Case{"api defaults", api}, Case{"hm defaults", def}, Case{"greedy", greedy}, Case{"api top_p 0.9", topp}}) {
    auto chain = make_sampler_chain(c.p, V);
    double best = 1e9;
    for (int r = 0; r < 50; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      int32_t t = chain->sample(logits.data(), V);
      chain->accept(t);
      double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      if (us < best) best = us;
    }
    std::printf("%-16s %.1f us per token (best of 50), vocab %d, N(0,3) logits\n", c.name, best, V);
  }
}
