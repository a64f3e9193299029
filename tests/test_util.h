// Helpers shared by the test files.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

#include "core/rng.h"
#include "model/model.h"
#include "model/params.h"
#include "runtime/memory.h"

namespace hm::test {

// A fresh directory under the system temp dir, removed on scope exit. The pid keeps parallel
// test processes apart.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag)
      : path(std::filesystem::temp_directory_path() / ("hm_" + tag + "_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string str() const { return path.string(); }
};

inline std::vector<int32_t> tokens(Rng& rng, int n, int vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng.next_u64() % uint64_t(vocab));
  return t;
}

// Every position's logits [T, V] of toks, run as one chunk in slot 0 of a fresh memory. The KV
// cache is float32 unless asked otherwise (HybridMemory's own default is f16): transformers'
// reference keeps K and V in float32, and the f16 cache alone moves attention models' logits by
// about 1e-4.
inline std::vector<float> forward_all(HybridModel& m, const std::vector<int32_t>& toks, KvType kv = KvType::F32) {
  HybridMemory mem(m.backend(), m.config(), 1, int(toks.size()), kv);
  Batch b;
  b.logits_all = true;
  b.add(0, toks);
  std::vector<float> logits;
  m.forward(b, mem, logits);
  return logits;
}

// The same, token by token through the memory: the decode path.
inline std::vector<float> forward_stepwise(HybridModel& m, const std::vector<int32_t>& toks,
                                           KvType kv = KvType::F32) {
  HybridMemory mem(m.backend(), m.config(), 1, int(toks.size()), kv);
  std::vector<float> all, logits;
  for (int32_t t : toks) {
    Batch b;
    b.add(0, {t});
    m.forward(b, mem, logits);
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

// The mean cross-entropy over the counted targets (>= 0) of B sequences of L tokens [B, L], from
// m's inference forward (every position's logits, one ragged batch, float32 KV cache): what the
// training forward must equal.
inline double inference_mean_loss(HybridModel& m, const std::vector<int32_t>& tokens,
                                  const std::vector<int32_t>& targets, int B, int L) {
  HybridMemory mem(m.backend(), m.config(), B, L, KvType::F32);
  Batch batch;
  batch.logits_all = true;
  for (int s = 0; s < B; ++s)
    batch.add(s, std::vector<int32_t>(tokens.begin() + int64_t(s) * L, tokens.begin() + int64_t(s + 1) * L));
  std::vector<float> logits;
  m.forward(batch, mem, logits);
  const int V = m.config().vocab_size;
  double sum = 0;
  int64_t count = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    if (targets[i] < 0) continue;
    const float* z = logits.data() + i * size_t(V);
    const double mx = *std::max_element(z, z + V);
    double se = 0;
    for (int v = 0; v < V; ++v) se += std::exp(double(z[v]) - mx);
    sum += mx + std::log(se) - z[targets[i]];
    ++count;
  }
  return sum / double(count);
}

// max |a - b| / max |b|: relative to the logits' scale, not per element (which is ill-posed
// for logits near zero).
inline double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, double(std::fabs(a[i] - b[i])));
    den = std::max(den, double(std::fabs(b[i])));
  }
  return num / std::max(den, 1e-30);
}

// docs/MODEL.md's init, then every value init sets to a constant drawn at random per channel
// and per layer: norm weights, bridge gates, A_log (+-1 around log(n+1): a factor of e either
// way), D, and a true layer's fusion scales, exchange and router. On init's values a model that
// used layer 0's A and D everywhere, indexed A by state only, fixed D at 1, or ignored a norm
// weight or a bridge would give the right logits.
inline void randomize_params(Params& p, uint64_t seed) {
  init_params(p, seed);
  Rng rng(seed + 1000);
  const double D = p.config().d_model;
  for (size_t k = 0; k < p.specs().size(); ++k) {
    const std::string& n = p.specs()[k].name;
    auto ends = [&](const char* s) {
      const size_t m = std::char_traits<char>::length(s);
      return n.size() >= m && n.compare(n.size() - m, m, s) == 0;
    };
    float* w = p.at(k);
    for (int64_t i = 0; i < p.specs()[k].numel(); ++i) {
      if (ends(".gate")) w[i] = float(rng.uniform() - 0.5);
      else if (ends("norm.weight") || ends("norm_f.weight")) w[i] = float(1 + 0.2 * rng.normal());
      else if (ends("mixer.D")) w[i] = float(0.5 + rng.uniform());
      else if (ends("A_log")) w[i] += float(2.0 * (rng.uniform() - 0.5));
      else if (ends("fuse_mamba") || ends("fuse_attn")) w[i] = float(1 + 0.3 * rng.normal());
      else if (ends("exchange")) w[i] = float(0.5 * rng.normal());
      else if (ends("router.weight")) w[i] += float(0.5 * rng.normal() / std::sqrt(D));
      else if (ends("router.feat_weight")) w[i] = float(0.5 * rng.normal());
      else if (ends("router.bias")) w[i] = float(0.3 * rng.normal());
      else if (ends("in_proj.bias") || ends("out_proj.bias")) w[i] = float(0.1 * rng.normal());  // init: 0
    }
  }
}

// The same on a model, which then prepares its derived weights (A = -exp(A_log), ...).
inline void randomize_params(HybridModel& m, uint64_t seed) {
  randomize_params(m.params(), seed);
  m.prepare();
}

}  // namespace hm::test
