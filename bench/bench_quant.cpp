// Packed-weight linear kernels (kernels/quant.h) against the float32 linear, in one run:
//
//   hm_bench_quant [--quick] [--json] [--prefill] [--threads 1,2] [--reps N]   (--prefill: no decode)
//
// Decode (m = 1): GEMV time at the mamba-130m and d 2048 shapes, per weight type, for each
// SIMD path this CPU has. "cold": the weights come from DRAM, as when a model larger than the
// cache decodes; copies of the matrix fill a pool of 4x the L3 and each GEMV reads the next copy.
// "hot": one matrix over and over (it stays in L2/L3): the kernel's compute ceiling. GB/s counts
// weight bytes read; floor = a STREAM-like read of the same pool with the same thread count.
// f32 is hm::cpu::linear (OpenBLAS sgemv); "x f32" is the speed-up over it.
// Prefill (m = 512): GEMM time per weight type against f32 cpu::linear (OpenBLAS sgemm).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/threads.h"
#include "kernels/ops.h"
#include "kernels/quant.h"

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) {
      const std::string v = line.substr(line.find(':') + 1);
      return v.substr(std::min(v.size(), v.find_first_not_of(' ')));
    }
  return "unknown";
}

// The L3 size cpu0 reports in sysfs, 32 MiB when it does not say.
size_t l3_bytes() {
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level(dir + "level"), size(dir + "size");
    int lv = 0;
    std::string sz;
    if (!(level >> lv) || lv != 3 || !(size >> sz) || sz.empty()) continue;
    const size_t unit = sz.back() == 'K' ? 1024 : sz.back() == 'M' ? 1 << 20 : 1;
    return size_t(std::atoll(sz.c_str())) * unit;
  }
  return size_t(32) << 20;
}

// Bytes per second of reading buf once, best of reps, on the current team. Each thread reads
// 8 streams at once, as a GEMV reading several rows does: with one sequential stream a core
// reached only 0.8 of what OpenBLAS's sgemv reads.
double read_bandwidth(const float* buf, size_t n, int reps) {
  constexpr int kStreams = 8;
  double best = 1e30;
  volatile float sink = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
      const int id = omp_get_thread_num(), nt = omp_get_num_threads();
      const size_t b = n * id / nt, len = (n * (id + 1) / nt - b) / kStreams;
      float acc[kStreams][16] = {};  // 16 lanes per stream: the adds vectorize, no reduction
      for (size_t i = 0; i + 16 <= len; i += 16)
        for (int st = 0; st < kStreams; ++st)
          for (int j = 0; j < 16; ++j) acc[st][j] += buf[b + st * len + i + j];
      float s[kStreams] = {};
      for (int st = 0; st < kStreams; ++st)
        for (int j = 0; j < 16; ++j) s[st] += acc[st][j];
      for (float v : s) total += v;
    }
    best = std::min(best, seconds_since(t0));
    sink = sink + total;
  }
  return double(n) * sizeof(float) / best;
}

struct Shape {
  const char* name;
  int n, k;
};

enum class Kind { F32, Packed };

struct Config {
  bool quick = false, json = false, prefill_only = false;
  std::vector<int> threads = {1, 2};
  int reps = 3;
};

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") cfg.quick = true, cfg.reps = 1;
    else if (a == "--json") cfg.json = true;
    else if (a == "--prefill") cfg.prefill_only = true;
    else if (a == "--reps" && i + 1 < argc) cfg.reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--threads" && i + 1 < argc) {
      cfg.threads.clear();
      for (std::string s = argv[++i]; !s.empty();) {
        const size_t c = s.find(',');
        cfg.threads.push_back(std::max(1, std::atoi(s.substr(0, c).c_str())));
        s = c == std::string::npos ? "" : s.substr(c + 1);
      }
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--json] [--prefill] [--threads 1,2] [--reps N]\n", argv[0]);
      return 2;
    }
  }
  if (cfg.quick) cfg.threads.resize(1);

  const std::vector<Shape> decode_shapes =
      cfg.prefill_only ? std::vector<Shape>{}
      : cfg.quick ? std::vector<Shape>{{"130m in_proj x", 1536, 768}, {"130m out_proj", 768, 1536}}
                : std::vector<Shape>{{"130m in_proj x", 1536, 768},  {"130m in_proj", 3072, 768},
                                     {"130m out_proj", 768, 1536},   {"130m lm_head", 50280, 768},
                                     {"d2048 in_proj", 8192, 2048},  {"d2048 out_proj", 2048, 4096},
                                     {"d2048 lm_head", 50280, 2048}};
  const std::vector<Shape> prefill_shapes =
      cfg.quick ? std::vector<Shape>{{"130m in_proj", 3072, 768}}
                : std::vector<Shape>{{"130m in_proj", 3072, 768}, {"130m out_proj", 768, 1536},
                                     {"mamba in_proj", 2048, 512}, {"mamba out_proj", 512, 1024},
                                     {"mamba x_proj", 64, 1024},
                                     {"d2048 in_proj", 8192, 2048}, {"d2048 out_proj", 2048, 4096}};
  const int prefill_m = cfg.quick ? 64 : 512;
  const hm::WeightType types[] = {hm::WeightType::BF16, hm::WeightType::F16, hm::WeightType::Q8_0,
                                  hm::WeightType::Q4_0};
  std::vector<hm::cpu::Isa> isas;
  for (hm::cpu::Isa isa : {hm::cpu::Isa::Avx512, hm::cpu::Isa::Avx2})
    if (hm::cpu::isa_supported(isa)) isas.push_back(isa);
  if (isas.empty()) isas.push_back(hm::cpu::Isa::Scalar);

  const std::string cpu = cpu_model();
  const size_t l3 = l3_bytes();
  const size_t pool_bytes = cfg.quick ? size_t(64) << 20 : 4 * l3;
  std::vector<float> pool(pool_bytes / sizeof(float));
  hm::Rng rng(1);
  for (auto& v : pool) v = rng.uniform(-1, 1);

  std::string js = "{\"cpu_model\": \"" + cpu + "\", \"l3_mb\": " + std::to_string(l3 >> 20) +
                   ", \"pool_mb\": " + std::to_string(pool_bytes >> 20) + ", \"best_isa\": \"" +
                   hm::cpu::isa_name(hm::cpu::best_isa()) + "\"";
  std::string table;
  table += "CPU: " + cpu + ", L3 " + std::to_string(l3 >> 20) + " MiB, cold pool " +
           std::to_string(pool_bytes >> 20) + " MiB\n\n";

  // ---- DRAM floor -------------------------------------------------------------------------------
  std::vector<double> floor_gbs;
  js += ", \"read_bw_gbs\": {";
  for (size_t ti = 0; ti < cfg.threads.size(); ++ti) {
    hm::set_num_threads(cfg.threads[ti]);
    floor_gbs.push_back(read_bandwidth(pool.data(), pool.size(), cfg.reps + 1) / 1e9);
    js += (ti ? ", \"" : "\"") + std::to_string(cfg.threads[ti]) + "\": " + fmt("%.2f", floor_gbs.back());
    table += "read bandwidth floor, " + std::to_string(cfg.threads[ti]) + " thread(s): " +
             fmt("%.1f", floor_gbs.back()) + " GB/s\n";
  }
  js += "}";

  // ---- decode ------------------------------------------------------------------------------------
  table += "\n| shape (n x k) | threads | weights | isa | MiB | cold us | cold GB/s | floor | x f32 cold "
           "| hot us | hot GB/s | x f32 hot |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  js += ", \"decode\": [";
  bool first_row = true;
  std::vector<float> x(8192), y(60000);
  for (auto& v : x) v = rng.uniform(-1, 1);
  for (const Shape& s : decode_shapes) {
    std::vector<float> w(size_t(s.n) * s.k);
    for (auto& v : w) v = rng.uniform(-1, 1);
    // Every variant: f32, then each packed type on each ISA.
    struct Variant { Kind kind; hm::WeightType t; hm::cpu::Isa isa; };
    std::vector<Variant> variants = {{Kind::F32, hm::WeightType::BF16, isas[0]}};
    for (hm::WeightType t : types)
      for (hm::cpu::Isa isa : isas) variants.push_back({Kind::Packed, t, isa});
    for (size_t ti = 0; ti < cfg.threads.size(); ++ti) {
      hm::set_num_threads(cfg.threads[ti]);
      double f32_cold = 0, f32_hot = 0;
      for (const Variant& v : variants) {
        hm::cpu::set_quant_isa(v.isa);
        const size_t bytes = v.kind == Kind::F32 ? w.size() * sizeof(float) : hm::row_bytes(v.t, s.k) * s.n;
        // The pool as copies of this matrix in this format.
        const size_t copies = std::max<size_t>(1, pool_bytes / bytes);
        std::vector<unsigned char> one(bytes);
        if (v.kind == Kind::F32) std::memcpy(one.data(), w.data(), bytes);
        else hm::cpu::quantize(v.t, one.data(), w.data(), s.n, s.k);
        auto* base = reinterpret_cast<unsigned char*>(pool.data());
        for (size_t c = 0; c < copies && (c + 1) * bytes <= pool_bytes; ++c) std::memcpy(base + c * bytes, one.data(), bytes);
        auto gemv = [&](const unsigned char* W) {
          if (v.kind == Kind::F32)
            hm::cpu::linear(y.data(), s.n, x.data(), s.k, reinterpret_cast<const float*>(W), 1, s.n, s.k, false);
          else
            hm::cpu::linear_packed(y.data(), s.n, x.data(), s.k, W, v.t, 1, s.n, s.k, false);
        };
        const size_t used = std::min(copies, pool_bytes / bytes);
        double cold = 1e30;
        for (int r = 0; r < cfg.reps; ++r) {
          const auto t0 = Clock::now();
          for (size_t c = 0; c < used; ++c) gemv(base + c * bytes);
          cold = std::min(cold, seconds_since(t0) / double(used));
        }
        // Hot: the first copy, repeated for about 20 ms per rep (after one warm-up call).
        gemv(base);
        const int calls = int(std::clamp(0.02 / std::max(cold, 1e-7), 3.0, 20000.0));
        double hot = 1e30;
        for (int r = 0; r < cfg.reps; ++r) {
          const auto t0 = Clock::now();
          for (int c = 0; c < calls; ++c) gemv(base);
          hot = std::min(hot, seconds_since(t0) / calls);
        }
        if (v.kind == Kind::F32) f32_cold = cold, f32_hot = hot;
        const double cold_gbs = double(bytes) / cold / 1e9, hot_gbs = double(bytes) / hot / 1e9;
        const std::string type = v.kind == Kind::F32 ? "f32" : hm::weight_type_name(v.t);
        const std::string isa = v.kind == Kind::F32 ? "openblas" : hm::cpu::isa_name(v.isa);
        const int th = cfg.threads[ti];
        js += std::string(first_row ? "" : ",") + "\n  {\"shape\": \"" + s.name + "\", \"n\": " +
              std::to_string(s.n) + ", \"k\": " + std::to_string(s.k) + ", \"threads\": " +
              std::to_string(th) + ", \"type\": \"" + type + "\", \"isa\": \"" + isa +
              "\", \"weight_bytes\": " + std::to_string(bytes) + ", \"cold_us\": " + fmt("%.2f", cold * 1e6) +
              ", \"cold_gbs\": " + fmt("%.2f", cold_gbs) + ", \"cold_floor_fraction\": " +
              fmt("%.3f", cold_gbs / floor_gbs[ti]) + ", \"cold_vs_f32\": " + fmt("%.3f", f32_cold / cold) +
              ", \"hot_us\": " + fmt("%.2f", hot * 1e6) + ", \"hot_gbs\": " + fmt("%.2f", hot_gbs) +
              ", \"hot_vs_f32\": " + fmt("%.3f", f32_hot / hot) + "}";
        first_row = false;
        table += std::string("| ") + s.name + " (" + std::to_string(s.n) + "x" + std::to_string(s.k) + ") | " +
                 std::to_string(th) + " | " + type + " | " + isa + " | " + fmt("%.1f", bytes / 1048576.0) +
                 " | " + fmt("%.1f", cold * 1e6) + " | " + fmt("%.1f", cold_gbs) + " | " +
                 fmt("%.2f", cold_gbs / floor_gbs[ti]) + " | " + fmt("%.2f", f32_cold / cold) + " | " +
                 fmt("%.1f", hot * 1e6) + " | " + fmt("%.1f", hot_gbs) + " | " + fmt("%.2f", f32_hot / hot) + " |\n";
      }
    }
  }
  js += "]";

  // ---- prefill -----------------------------------------------------------------------------------
  table += "\n| prefill m=" + std::to_string(prefill_m) +
           " shape (n x k) | threads | weights | isa | ms | GFLOP/s | x f32 |\n|---|---|---|---|---|---|---|\n";
  js += ", \"prefill_m\": " + std::to_string(prefill_m) + ", \"prefill\": [";
  first_row = true;
  for (const Shape& s : prefill_shapes) {
    std::vector<float> xs(size_t(prefill_m) * s.k), ys(size_t(prefill_m) * s.n);
    for (auto& v : xs) v = rng.uniform(-1, 1);
    std::vector<float> wv(size_t(s.n) * s.k);
    for (auto& v : wv) v = rng.uniform(-1, 1);
    const float* w = wv.data();
    for (size_t ti = 0; ti < cfg.threads.size(); ++ti) {
      hm::set_num_threads(cfg.threads[ti]);
      double f32_t = 0;
      for (int vi = -1; vi < 3; ++vi) {
        hm::cpu::set_quant_isa(isas[0]);
        std::vector<unsigned char> p;
        if (vi >= 0) {
          p.resize(hm::row_bytes(types[vi], s.k) * s.n);
          hm::cpu::quantize(types[vi], p.data(), w, s.n, s.k);
        }
        auto run = [&] {
          if (vi < 0) hm::cpu::linear(ys.data(), s.n, xs.data(), s.k, w, prefill_m, s.n, s.k, false);
          else hm::cpu::linear_packed(ys.data(), s.n, xs.data(), s.k, p.data(), types[vi], prefill_m, s.n, s.k, false);
        };
        run();
        double best = 1e30;
        for (int r = 0; r < cfg.reps; ++r) {
          const auto t0 = Clock::now();
          run();
          best = std::min(best, seconds_since(t0));
        }
        if (vi < 0) f32_t = best;
        const double gflops = 2.0 * prefill_m * s.n * s.k / best / 1e9;
        const std::string type = vi < 0 ? "f32" : hm::weight_type_name(types[vi]);
        const std::string isa = vi < 0 ? "openblas" : hm::cpu::isa_name(isas[0]);
        js += std::string(first_row ? "" : ",") + "\n  {\"shape\": \"" + s.name + "\", \"m\": " +
              std::to_string(prefill_m) + ", \"n\": " + std::to_string(s.n) + ", \"k\": " +
              std::to_string(s.k) + ", \"threads\": " + std::to_string(cfg.threads[ti]) + ", \"type\": \"" +
              type + "\", \"isa\": \"" + isa + "\", \"ms\": " + fmt("%.3f", best * 1e3) + ", \"gflops\": " +
              fmt("%.1f", gflops) + ", \"vs_f32\": " + fmt("%.3f", f32_t / best) + "}";
        first_row = false;
        table += std::string("| ") + s.name + " (" + std::to_string(s.n) + "x" + std::to_string(s.k) + ") | " +
                 std::to_string(cfg.threads[ti]) + " | " + type + " | " + isa + " | " + fmt("%.2f", best * 1e3) +
                 " | " + fmt("%.1f", gflops) + " | " + fmt("%.2f", f32_t / best) + " |\n";
      }
    }
  }
  js += "]}\n";
  std::fputs(cfg.json ? js.c_str() : table.c_str(), stdout);
  return 0;
}
