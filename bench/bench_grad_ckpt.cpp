// Gradient checkpointing's memory saving and time cost: loss_and_grad (float) on the demo preset.
//
//   hm_bench_grad_ckpt MODE [B] [L] [SCAN_CHUNK] [STEPS]     MODE: off | on | ab
//   defaults: B 2, L 1024, SCAN_CHUNK 0, STEPS 5              (OMP_NUM_THREADS=2 on the 2-core box)
//
// One mode per process, so that the max RSS (getrusage) is that mode's alone: run it twice.
// ab alternates off and on steps in one process (time ratio only; RSS is then the larger one's),
// so that a load that comes and goes on a shared box hits both modes alike.
// Prints the median and best time per step (after one warm-up step, which also sizes every
// buffer), the median CPU time per step, the peak bytes the saved-activation buffers held (grad_activation_peak_bytes: all
// threads together) and the process's max RSS.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/rng.h"
#include "model/config.h"
#include "model/params.h"
#include "train/model_grad.h"

// The median; for an even count, the mean of the middle two.
static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t h = v.size() / 2;
  return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode != "off" && mode != "on" && mode != "ab") {
    std::fprintf(stderr, "usage: %s off|on|ab [B] [L] [SCAN_CHUNK] [STEPS]\n", argv[0]);
    return 2;
  }
  const int B = argc > 2 ? std::atoi(argv[2]) : 2;
  const int L = argc > 3 ? std::atoi(argv[3]) : 1024;
  const int chunk = argc > 4 ? std::atoi(argv[4]) : 0;
  const int steps = argc > 5 ? std::atoi(argv[5]) : 5;
  if (B < 1 || L < 2 || chunk < 0 || steps < 1) {
    std::fprintf(stderr, "bad arguments\n");
    return 2;
  }
  const hm::ModelConfig c = hm::preset("demo");
  hm::Params p(c), g(c);
  hm::init_params(p, 1);
  hm::Rng rng(2);
  std::vector<int32_t> tok(size_t(B) * L), tgt(size_t(B) * L);
  for (auto& t : tok) t = int32_t(rng.next_u64() % uint64_t(c.vocab_size));
  for (int s = 0; s < B; ++s)
    for (int t = 0; t < L; ++t)
      tgt[size_t(s) * L + t] = t + 1 < L ? tok[size_t(s) * L + t + 1] : -1;

  // CPU seconds (all threads) too: on a shared box they are steadier than wall time.
  auto cpu_now = [] {
    rusage r{};
    getrusage(RUSAGE_SELF, &r);
    return double(r.ru_utime.tv_sec + r.ru_stime.tv_sec) +
           1e-6 * double(r.ru_utime.tv_usec + r.ru_stime.tv_usec);
  };
  struct Times {
    std::vector<double> secs, cpu;
    double loss = 0, act_mib = 0;
  };
  Times t[2];  // [ckpt]
  for (int i = 0; i <= steps; ++i) {  // step 0: warm-up
    for (const bool ckpt : {false, true}) {
      if (mode != "ab" && ckpt != (mode == "on")) continue;
      Times& r = t[ckpt];
      std::fill(g.data(), g.data() + g.numel(), 0.0f);
      hm::reset_grad_activation_peak_bytes();
      const double c0 = cpu_now();
      const auto t0 = std::chrono::steady_clock::now();
      r.loss = hm::loss_and_grad(p, g, tok.data(), tgt.data(), B, L, chunk, ckpt);
      const auto t1 = std::chrono::steady_clock::now();
      const double c1 = cpu_now();
      r.act_mib = double(hm::grad_activation_peak_bytes()) / (1 << 20);
      if (i > 0) {
        r.secs.push_back(std::chrono::duration<double>(t1 - t0).count());
        r.cpu.push_back(c1 - c0);
      }
    }
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  for (const bool ckpt : {false, true}) {
    Times& r = t[ckpt];
    if (r.secs.empty()) continue;
    std::printf("grad_ckpt=%s B=%d L=%d scan_chunk=%d steps=%d: step median %.3f s (best %.3f s, "
                "median CPU %.3f s), activations peak %.1f MiB, max RSS %.1f MiB, loss %.6f\n",
                ckpt ? "on" : "off", B, L, chunk, steps, median(r.secs), *std::min_element(r.secs.begin(), r.secs.end()),
                median(r.cpu), r.act_mib, double(ru.ru_maxrss) / 1024, r.loss);
  }
  if (mode == "ab")
    std::printf("on/off: median %.3fx, best %.3fx, median CPU %.3fx\n", median(t[1].secs) / median(t[0].secs),
                *std::min_element(t[1].secs.begin(), t[1].secs.end()) /
                    *std::min_element(t[0].secs.begin(), t[0].secs.end()),
                median(t[1].cpu) / median(t[0].cpu));
  return 0;
}
