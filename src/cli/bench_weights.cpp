#include "cli/bench_weights.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <memory>

#include "cli/bench_common.h"
#include "core/error.h"
#include "core/rng.h"

namespace hm::cli {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<int32_t> random_ids(Rng& rng, int n, int vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng.next_u64() % uint64_t(vocab));
  return t;
}

// Bytes a decoded token reads: every weight once, but of the embedding table only one row,
// unless it is also the (float32) head.
double decode_bytes(const HybridModel& m) {
  const ModelConfig& c = m.config();
  const double table = double(c.vocab_size) * c.d_model * 4.0;
  const bool table_is_head = c.tie_embeddings && m.weight_format() == DType::F32;
  return double(m.weight_bytes()) - (table_is_head ? 0.0 : table - c.d_model * 4.0);
}

// Resident bytes of this process now (/proc/self/statm), NAN where it cannot be read.
double resident_bytes() {
  std::ifstream f("/proc/self/statm");
  long size = 0, res = 0;
  return f >> size >> res ? double(res) * double(sysconf(_SC_PAGESIZE)) : NAN;
}

}  // namespace

nlohmann::json bench_weight_formats(const HybridModel& src, const std::vector<DType>& formats, KvType kv,
                                    int reps, double read_bw_gbs, bool quiet) {
  HM_CHECK(!formats.empty() && reps >= 1, "bench --weights: needs at least one format and --reps >= 1");
  const ModelConfig& c = src.config();
  const int V = c.vocab_size, prompt = 32, steps = 50, plen = 512;
  std::vector<std::unique_ptr<HybridModel>> ms;
  std::vector<double> rss;  // what each model holds resident, as an inference load keeps it
  for (DType f : formats) {
    const double r0 = resident_bytes();
    auto m = std::make_unique<HybridModel>(c, src.backend());
    std::copy_n(src.params().data(), src.params().numel(), m->params().data());
    m->set_weight_format(f);
    m->prepare();
    if (f != DType::F32) m->release_float_weights();
    rss.push_back(resident_bytes() - r0);
    ms.push_back(std::move(m));
  }
  const size_t n = ms.size();
  Rng rng(77);
  std::vector<float> logits;
  std::vector<std::vector<double>> dec(n), pre(n);
  HybridMemory dmem(src.backend(), c, 1, prompt + steps + 1, kv), pmem(src.backend(), c, 1, plen, kv);
  for (int rep = 0; rep <= reps; ++rep) {  // rep 0 warms up
    if (!quiet) std::fprintf(stderr, "bench: weight formats, repetition %d of %d...\n", rep, reps);
    const std::vector<int32_t> toks = random_ids(rng, prompt, V), ptoks = random_ids(rng, plen, V);
    for (size_t i = 0; i < n; ++i) {
      HybridModel& m = *ms[i];
      dmem.seq_rm(0);
      Batch b;
      b.add(0, toks);
      m.forward(b, dmem, logits);
      int32_t tok = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
      auto t0 = Clock::now();
      for (int s = 0; s < steps; ++s) {
        Batch d;
        d.add(0, {tok});
        m.forward(d, dmem, logits);
        tok = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
      }
      if (rep > 0) dec[i].push_back(seconds_since(t0));
      pmem.seq_rm(0);
      Batch p;
      p.add(0, ptoks);
      t0 = Clock::now();
      m.forward(p, pmem, logits);
      if (rep > 0) pre[i].push_back(seconds_since(t0));
    }
  }
  // Quality proxy: every position's logits of a 64-token prompt against the f32 model's.
  const auto f32_at = std::find(formats.begin(), formats.end(), DType::F32);
  std::vector<std::vector<float>> all(n);
  {
    const std::vector<int32_t> toks = random_ids(rng, 64, V);
    for (size_t i = 0; i < n; ++i) {
      HybridMemory mem(src.backend(), c, 1, 64, kv);
      Batch b;
      b.add(0, toks);
      b.logits_all = true;
      ms[i]->forward(b, mem, all[i]);
    }
  }
  nlohmann::json rows = nlohmann::json::array();
  double f32_dec = NAN, f32_pre = NAN;
  for (size_t i = 0; i < n; ++i) {
    const double tok_s = steps / median(dec[i]), pre_ms = median(pre[i]) / plen * 1e3;
    if (formats[i] == DType::F32) {
      f32_dec = tok_s;
      f32_pre = pre_ms;
    }
    const double bytes = decode_bytes(*ms[i]);
    nlohmann::json row = {{"format", compute_dtype_name(formats[i])},
                          {"weight_mb", double(ms[i]->weight_bytes()) / 1e6},
                          {"resident_mb", rss[i] / 1e6},
                          {"decode_mb_per_token", bytes / 1e6},
                          {"decode_tok_s", tok_s},
                          {"decode_floor_tok_s", read_bw_gbs * 1e9 / bytes},
                          {"decode_floor_fraction", tok_s / (read_bw_gbs * 1e9 / bytes)},
                          {"prefill_ms_per_token", pre_ms}};
    if (f32_at != formats.end()) {
      const std::vector<float>& ref = all[size_t(f32_at - formats.begin())];
      double num = 0, den = 0;
      for (size_t k = 0; k < ref.size(); ++k) {
        num = std::max(num, double(std::fabs(all[i][k] - ref[k])));
        den = std::max(den, double(std::fabs(ref[k])));
      }
      row["logits_rel_err"] = num / std::max(den, 1e-30);
    }
    rows.push_back(row);
  }
  for (auto& row : rows) {
    row["decode_vs_f32"] = row["decode_tok_s"].get<double>() / f32_dec;
    row["prefill_vs_f32"] = f32_pre / row["prefill_ms_per_token"].get<double>();
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return {{"formats", rows}, {"decode", "50 tokens after 32, batch 1, greedy"},
          {"resident", "the model's resident memory after loading (packed: without the float32 copies)"},
          {"process_peak_rss_mb", double(ru.ru_maxrss) * 1024 / 1e6},
          {"prefill", "512 tokens in one chunk"}, {"read_bw_gbs", read_bw_gbs}, {"reps", reps}};
}

void print_weight_formats(const nlohmann::json& r) {
  std::printf("%-6s %10s %11s %10s %11s %11s %9s %8s %14s %8s %10s\n", "format", "weights MB", "resident MB", "MB/token",
              "decode t/s", "floor t/s", "of floor", "vs f32", "prefill ms/t", "vs f32", "logit err");
  auto num = [](const nlohmann::json& j, const char* k) { return j.contains(k) ? j[k].get<double>() : NAN; };
  for (const auto& f : r["formats"])
    std::printf("%-6s %10.1f %11.1f %10.1f %11.1f %11.1f %8.0f%% %7.2fx %14.3f %7.2fx %10.2g\n",
                f["format"].get<std::string>().c_str(), num(f, "weight_mb"), num(f, "resident_mb"),
                num(f, "decode_mb_per_token"),
                num(f, "decode_tok_s"), num(f, "decode_floor_tok_s"), 100 * num(f, "decode_floor_fraction"),
                num(f, "decode_vs_f32"), num(f, "prefill_ms_per_token"), num(f, "prefill_vs_f32"),
                num(f, "logits_rel_err"));
  std::printf("decode: %s; prefill: %s; floor: DRAM read %.1f GB/s / MB per token; median of %d after 1 "
              "warm-up, formats interleaved\n", r["decode"].get<std::string>().c_str(),
              r["prefill"].get<std::string>().c_str(), r["read_bw_gbs"].get<double>(), r["reps"].get<int>());
  std::printf("resident: %s; peak RSS of this process (all formats at once): %.1f MB\n",
              r["resident"].get<std::string>().c_str(), r["process_peak_rss_mb"].get<double>());
}

}  // namespace hm::cli
