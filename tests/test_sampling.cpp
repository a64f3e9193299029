#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "runtime/sampling.h"

namespace hm {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<float> normal_logits(int n, uint64_t seed, double scale = 1.0) {
  Rng rng(seed);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(scale * rng.normal());
  return v;
}

std::vector<double> softmax(const std::vector<float>& l, double t = 1.0) {
  const double mx = *std::max_element(l.begin(), l.end());
  std::vector<double> p(l.size());
  double sum = 0;
  for (size_t i = 0; i < l.size(); ++i) sum += p[i] = std::exp((l[i] - mx) / t);
  for (auto& x : p) x /= sum;
  return p;
}

// Ids by descending logit, ties by ascending id: a full sort, the reference for the samplers.
std::vector<int32_t> full_order(const std::vector<float>& l) {
  std::vector<int32_t> ids(l.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
  return ids;
}

int32_t argmax(const std::vector<float>& l) {
  return static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
}

std::set<int32_t> id_set(const Candidates& c) { return {c.ids.begin(), c.ids.end()}; }

// Smallest prefix of the full order with mass >= p; asserts p is not within eps of a boundary,
// where float and double arithmetic could legitimately disagree.
std::set<int32_t> nucleus(const std::vector<float>& l, double p) {
  const auto probs = softmax(l);
  const auto order = full_order(l);
  std::set<int32_t> out;
  double cum = 0;
  for (int32_t id : order) {
    const double before = cum;
    cum += probs[static_cast<size_t>(id)];
    out.insert(id);
    if (cum >= p) {
      EXPECT_GT(p - before, 1e-5) << "test logits put p too close to a boundary";
      EXPECT_GT(cum - p, 1e-5) << "test logits put p too close to a boundary";
      break;
    }
  }
  return out;
}

std::string error_of(const SamplingParams& p) {
  try {
    validate(p);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// ---- top-p ----

void expect_top_p(const std::vector<float>& l, double p) {
  const auto want = nucleus(l, p);
  Candidates c;
  c.reset(l.data(), static_cast<int>(l.size()));
  TopP(static_cast<float>(p)).apply(c);
  EXPECT_EQ(id_set(c), want) << "p " << p << ", nucleus of " << want.size();
  if (c.sorted) {
    EXPECT_TRUE(std::is_sorted(c.logits.begin(), c.logits.end(), std::greater<float>()));
  }
}

TEST(Sampling, TopPKeepsExactlyTheNucleus) {
  // Scales give nuclei within the first 64 (partial sort) and far beyond (bucket pass).
  size_t small = 0, large = 0;
  for (double scale : {4.0, 1.0, 0.3}) {
    const auto l = normal_logits(2000, 7, scale);
    for (double p : {0.5, 0.9}) {
      const auto want = nucleus(l, p);
      (want.size() <= 64 ? small : large)++;
      Candidates c;
      c.reset(l.data(), static_cast<int>(l.size()));
      TopP(static_cast<float>(p)).apply(c);
      EXPECT_EQ(id_set(c), want) << "scale " << scale << " p " << p;
      EXPECT_EQ(c.sorted, want.size() <= 64);
      if (c.sorted) {
    EXPECT_TRUE(std::is_sorted(c.logits.begin(), c.logits.end(), std::greater<float>()));
  }
      ASSERT_TRUE(c.has_probs);
      EXPECT_NEAR(std::accumulate(c.probs.begin(), c.probs.end(), 0.0), 1.0, 1e-5);

      // The already-sorted path (as after top-k) agrees.
      Candidates s;
      s.reset(l.data(), static_cast<int>(l.size()));
      s.ids = full_order(l);
      for (size_t i = 0; i < l.size(); ++i) s.logits[i] = l[static_cast<size_t>(s.ids[i])];
      s.sorted = true;
      TopP(static_cast<float>(p)).apply(s);
      EXPECT_EQ(id_set(s), want);
    }
  }
  EXPECT_GT(small, 0u);
  EXPECT_GT(large, 0u);
}

TEST(Sampling, TopPWithTiesAndInfinities) {
  // Few distinct values: ties straddle the boundary and are broken by lower id.
  Rng rng(3);
  std::vector<float> l(1000);
  for (auto& x : l) x = static_cast<float>(static_cast<int>(rng.uniform() * 4));
  expect_top_p(l, 0.6);
  // Masked tokens (-inf) mixed in.
  auto m = normal_logits(1000, 5, 0.5);
  for (size_t i = 0; i < m.size(); i += 3) m[i] = -kInf;
  expect_top_p(m, 0.7);
  // Every logit -inf: all equally likely, so the lowest ids make up the mass (0.5025 needs
  // 100.5 of the 1/200 shares, p kept clear of a share boundary).
  const std::vector<float> dead(200, -kInf);
  Candidates c;
  c.reset(dead.data(), 200);
  TopP(0.5025f).apply(c);
  EXPECT_EQ(c.size(), 101u);
  EXPECT_EQ(*std::max_element(c.ids.begin(), c.ids.end()), 100);
  // +inf takes all the mass.
  auto hot = normal_logits(200, 6);
  hot[150] = kInf;
  c.reset(hot.data(), 200);
  TopP(0.9f).apply(c);
  EXPECT_EQ(c.ids, std::vector<int32_t>{150});
}

TEST(Sampling, TopPNeverSamplesOutsideNucleus) {
  const auto l = normal_logits(1000, 11, 2.0);
  const auto want = nucleus(l, 0.8);
  ASSERT_GT(want.size(), 1u);
  SamplerChain chain;
  chain.add(std::make_unique<TopP>(0.8f));
  chain.add(std::make_unique<Dist>(123));
  std::set<int32_t> seen;
  for (int i = 0; i < 20000; ++i) {
    const int32_t t = chain.sample(l.data(), static_cast<int>(l.size()));
    ASSERT_TRUE(want.count(t)) << "token " << t << " outside the nucleus";
    seen.insert(t);
  }
  EXPECT_GT(seen.size(), 1u);
}

TEST(Sampling, TopPOffKeepsAll) {
  const auto l = normal_logits(100, 3);
  Candidates c;
  c.reset(l.data(), 100);
  TopP(1.0f).apply(c);
  EXPECT_EQ(c.size(), 100u);
}

// ---- temperature ----

TEST(Sampling, TemperatureZeroIsGreedy) {
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    const auto l = normal_logits(500, seed, 2.0);
    const auto order = full_order(l);
    // With t = 1e-6 a runner-up within 1e-4 would still get a visible share; keep the test exact.
    ASSERT_GT(l[order[0]] - l[order[1]], 1e-4f) << "seed " << seed;
    for (float t : {0.0f, 1e-6f}) {
      SamplingParams p;
      p.temperature = t;
      p.top_k = 0;
      p.top_p = 1.0f;
      p.min_p = 0.0f;
      p.repeat_penalty = 1.0f;
      p.seed = seed;
      auto chain = make_sampler_chain(p, 500);
      for (int i = 0; i < 50; ++i) ASSERT_EQ(chain->sample(l.data(), 500), argmax(l)) << "t " << t;
    }
  }
}

TEST(Sampling, TinyTemperatureDoesNotOverflowIntoTies) {
  // Large logits divided by a tiny t overflow to +inf unless scaled relative to the max.
  const std::vector<float> l = {3e30f, 2e30f, -1e30f};
  SamplerChain chain;
  chain.add(std::make_unique<Temperature>(1e-20f));
  chain.add(std::make_unique<Dist>(5));
  for (int i = 0; i < 200; ++i) ASSERT_EQ(chain.sample(l.data(), 3), 0);
}

// ---- reproducibility ----

std::vector<int32_t> generate(uint64_t seed, bool reset_midway = false) {
  SamplingParams p;
  p.seed = seed;
  auto chain = make_sampler_chain(p, 300);
  Rng logits_rng(99);  // the "model": fixed logits stream, independent of the sampler seed
  std::vector<float> l(300);
  std::vector<int32_t> out;
  for (int i = 0; i < 200; ++i) {
    if (reset_midway && i == 100) chain->reset();
    for (auto& x : l) x = static_cast<float>(2.0 * logits_rng.normal());
    const int32_t t = chain->sample(l.data(), 300);
    chain->accept(t);
    out.push_back(t);
  }
  return out;
}

TEST(Sampling, SameSeedSameSequence) {
  const auto a = generate(42), b = generate(42), c = generate(43);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
}

TEST(Sampling, ResetRestartsTheStream) {
  SamplingParams p;
  p.seed = 5;
  auto chain = make_sampler_chain(p, 64);
  const auto l = normal_logits(64, 8, 0.5);
  std::vector<int32_t> first, second;
  for (int i = 0; i < 50; ++i) { first.push_back(chain->sample(l.data(), 64)); chain->accept(first.back()); }
  chain->reset();
  for (int i = 0; i < 50; ++i) { second.push_back(chain->sample(l.data(), 64)); chain->accept(second.back()); }
  EXPECT_EQ(first, second);
}

// ---- distribution ----

void expect_frequencies(const std::vector<int>& counts, const std::vector<double>& probs, int n) {
  for (size_t i = 0; i < probs.size(); ++i) {
    const double mean = n * probs[i];
    const double sigma = std::sqrt(n * probs[i] * (1 - probs[i]));
    EXPECT_NEAR(counts[i], mean, 5 * sigma + 1) << "token " << i << " p " << probs[i];
  }
}

TEST(Sampling, FrequenciesMatchTempSoftmaxOverTopK) {
  const int n_vocab = 200, k = 10, draws = 60000;
  const float t = 0.7f;
  const auto l = normal_logits(n_vocab, 21, 1.5);
  const auto order = full_order(l);
  ASSERT_GT(l[order[k - 1]] - l[order[k]], 1e-4f);  // the top-k boundary is unambiguous

  std::vector<float> top(l.size(), -kInf);
  for (int i = 0; i < k; ++i) top[order[i]] = l[order[i]];
  const auto want = softmax(top, t);

  SamplingParams p;
  p.temperature = t;
  p.top_k = k;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  p.repeat_penalty = 1.0f;
  p.seed = 77;
  auto chain = make_sampler_chain(p, n_vocab);
  std::vector<int> counts(static_cast<size_t>(n_vocab), 0);
  for (int i = 0; i < draws; ++i) ++counts[static_cast<size_t>(chain->sample(l.data(), n_vocab))];
  for (int i = k; i < n_vocab; ++i) EXPECT_EQ(counts[order[i]], 0);
  expect_frequencies(counts, want, draws);
}

TEST(Sampling, TopKKeepsHighestSorted) {
  const auto l = normal_logits(5000, 4);
  const auto order = full_order(l);
  Candidates c;
  c.reset(l.data(), 5000);
  TopK(40).apply(c);
  ASSERT_EQ(c.size(), 40u);
  EXPECT_TRUE(c.sorted);
  for (size_t i = 0; i < 40; ++i) EXPECT_EQ(c.ids[i], order[i]);
}

// ---- min-p ----

TEST(Sampling, MinPDropsExactlyBelowThreshold) {
  const auto l = normal_logits(3000, 13, 2.0);
  const auto probs = softmax(l);
  const double pmax = *std::max_element(probs.begin(), probs.end());
  for (float mp : {0.05f, 0.2f, 0.7f}) {
    std::vector<int32_t> want;
    for (size_t i = 0; i < probs.size(); ++i) {
      const double ratio = probs[i] / pmax;
      ASSERT_GT(std::abs(ratio - mp), 1e-5) << "token " << i << " sits on the boundary";
      if (ratio >= mp) want.push_back(static_cast<int32_t>(i));
    }
    Candidates c;
    c.reset(l.data(), 3000);
    MinP(mp).apply(c);
    EXPECT_EQ(c.ids, want) << "min_p " << mp;  // kept in their original order
  }
}

// ---- repetition penalty ----

TEST(Sampling, RepetitionPenaltyLowersSeenTokensOnly) {
  std::vector<float> l = {2.0f, -1.0f, 0.5f, 1.0f, -0.3f, 0.0f};
  RepetitionPenalty rp(2.0f, 64);
  rp.accept(0);  // positive logit
  rp.accept(1);  // negative logit
  rp.accept(0);  // seen twice: still penalised once
  Candidates c;
  c.reset(l.data(), 6);
  rp.apply(c);
  EXPECT_FLOAT_EQ(c.logits[0], 1.0f);
  EXPECT_FLOAT_EQ(c.logits[1], -2.0f);
  for (size_t i = 2; i < 6; ++i) EXPECT_EQ(c.logits[i], l[i]);

  std::vector<float> after(c.logits.begin(), c.logits.end());
  const auto p0 = softmax(l), p1 = softmax(after);
  EXPECT_LT(p1[0], p0[0]);
  EXPECT_LT(p1[1], p0[1]);
  for (size_t i = 2; i < 6; ++i)
    for (size_t j = 2; j < 6; ++j) EXPECT_NEAR(p1[i] / p1[j], p0[i] / p0[j], 1e-9);
}

TEST(Sampling, RepetitionPenaltyWindowAndReset) {
  std::vector<float> l = {1.0f, 1.0f, 1.0f, 1.0f};
  RepetitionPenalty rp(2.0f, 2);
  for (int32_t t : {0, 1, 2}) rp.accept(t);  // 0 falls out of the window of 2
  Candidates c;
  c.reset(l.data(), 4);
  rp.apply(c);
  EXPECT_EQ(c.logits, (std::vector<float>{1.0f, 0.5f, 0.5f, 1.0f}));
  rp.reset();
  c.reset(l.data(), 4);
  rp.apply(c);
  EXPECT_EQ(c.logits, l);
  RepetitionPenalty off(2.0f, 0);
  off.accept(3);
  c.reset(l.data(), 4);
  off.apply(c);
  EXPECT_EQ(c.logits, l);
}

// ---- vocab limit ----

TEST(Sampling, VocabLimitNeverReturnsUndecodableIds) {
  auto l = normal_logits(150, 17);
  for (size_t i = 100; i < 150; ++i) l[i] = 50.0f;  // the model prefers ids the tokenizer lacks
  for (float t : {0.0f, 1.0f}) {
    SamplingParams p;
    p.temperature = t;
    p.top_k = 0;
    p.min_p = 0;
    p.top_p = 1;
    auto chain = make_sampler_chain(p, 100);
    for (int i = 0; i < 2000; ++i) {
      const int32_t tok = chain->sample(l.data(), 150);
      ASSERT_LT(tok, 100);
      chain->accept(tok);
    }
  }
}

// ---- validation ----

TEST(Sampling, ValidationNamesTheField) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(error_of(SamplingParams{}), "");
  struct Case { const char* field; SamplingParams p; };
  std::vector<Case> cases;
  auto with = [](auto edit) { SamplingParams p; edit(p); return p; };
  cases.push_back({"temperature", with([](SamplingParams& p) { p.temperature = -0.1f; })});
  cases.push_back({"temperature", with([&](SamplingParams& p) { p.temperature = nan; })});
  cases.push_back({"top_p", with([](SamplingParams& p) { p.top_p = 0.0f; })});
  cases.push_back({"top_p", with([](SamplingParams& p) { p.top_p = 1.5f; })});
  cases.push_back({"min_p", with([](SamplingParams& p) { p.min_p = -0.1f; })});
  cases.push_back({"min_p", with([](SamplingParams& p) { p.min_p = 1.0f; })});
  cases.push_back({"repeat_penalty", with([](SamplingParams& p) { p.repeat_penalty = 0.0f; })});
  cases.push_back({"repeat_last_n", with([](SamplingParams& p) { p.repeat_last_n = -1; })});
  for (const auto& c : cases) {
    const std::string msg = error_of(c.p);
    EXPECT_NE(msg.find(c.field), std::string::npos) << c.field << ": \"" << msg << "\"";
    EXPECT_THROW(make_sampler_chain(c.p, 10), Error);
  }
  // Boundaries that are allowed.
  EXPECT_EQ(error_of(with([](SamplingParams& p) { p.top_p = 1.0f; p.min_p = 0.0f; p.temperature = 0; })), "");
  EXPECT_THROW(make_sampler_chain(SamplingParams{}, 0), Error);
  auto chain = make_sampler_chain(SamplingParams{}, 10);
  EXPECT_THROW(chain->sample(nullptr, 0), Error);
}

// ---- edge cases ----

TEST(Sampling, SingleTokenVocab) {
  const float l = -3.0f;
  for (float t : {0.0f, 0.8f}) {
    SamplingParams p;
    p.temperature = t;
    auto chain = make_sampler_chain(p, 1);
    for (int i = 0; i < 10; ++i) {
      ASSERT_EQ(chain->sample(&l, 1), 0);
      chain->accept(0);
    }
  }
}

TEST(Sampling, TopKLargerThanVocab) {
  const auto l = normal_logits(5, 2, 0.5);
  SamplingParams p;
  p.top_k = 100;
  p.top_p = 1;
  p.min_p = 0;
  p.temperature = 1;
  p.repeat_penalty = 1;
  auto chain = make_sampler_chain(p, 5);
  const int draws = 20000;
  std::vector<int> counts(5, 0);
  for (int i = 0; i < draws; ++i) ++counts[static_cast<size_t>(chain->sample(l.data(), 5))];
  expect_frequencies(counts, softmax(l), draws);
}

TEST(Sampling, TiesAreDeterministicAndFair) {
  const std::vector<float> l = {1.0f, 1.0f, 1.0f, 0.0f};
  Candidates c;
  c.reset(l.data(), 4);
  Greedy().apply(c);
  EXPECT_EQ(c.ids, std::vector<int32_t>{0});  // lowest id wins a tie
  c.reset(l.data(), 4);
  TopK(2).apply(c);
  EXPECT_EQ(c.ids, (std::vector<int32_t>{0, 1}));

  SamplerChain chain;
  chain.add(std::make_unique<TopK>(3));
  chain.add(std::make_unique<Dist>(9));
  const int draws = 30000;
  std::vector<int> counts(4, 0);
  for (int i = 0; i < draws; ++i) ++counts[static_cast<size_t>(chain.sample(l.data(), 4))];
  // Not written as {1/3., 1/3., 1/3., 0.}: GCC 12.2 at -O2/-O3 with AVX-512 (-march=native)
  // miscompiles that initializer into four copies of 1/3.
  std::vector<double> want(4, 1.0 / 3);
  want[3] = 0.0;
  expect_frequencies(counts, want, draws);
}

TEST(Sampling, NegativeInfinityAndNaNNeverSampled) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> l = {-kInf, 0.5f, -kInf, nan, 0.2f, -kInf};
  for (float t : {0.0f, 1.0f, 5.0f}) {
    SamplingParams p;
    p.temperature = t;
    p.top_k = 0;
    p.top_p = 0.999f;
    p.min_p = 0;
    auto chain = make_sampler_chain(p, 6);
    for (int i = 0; i < 2000; ++i) {
      const int32_t tok = chain->sample(l.data(), 6);
      ASSERT_TRUE(tok == 1 || tok == 4) << tok;
      chain->accept(tok);
    }
  }
  // Every logit -inf: nothing is preferred, but the chain still returns a valid id.
  const std::vector<float> dead(8, -kInf);
  for (float t : {0.0f, 1.0f}) {
    SamplingParams p;
    p.temperature = t;
    auto chain = make_sampler_chain(p, 8);
    for (int i = 0; i < 100; ++i) {
      const int32_t tok = chain->sample(dead.data(), 8);
      ASSERT_GE(tok, 0);
      ASSERT_LT(tok, 8);
    }
  }
  // +inf takes all the mass.
  const std::vector<float> hot = {0.0f, kInf, 1.0f};
  SamplerChain chain;
  chain.add(std::make_unique<MinP>(0.1f));
  chain.add(std::make_unique<TopP>(0.5f));
  chain.add(std::make_unique<Temperature>(0.5f));
  chain.add(std::make_unique<Dist>(1));
  for (int i = 0; i < 100; ++i) ASSERT_EQ(chain.sample(hot.data(), 3), 1);
}

TEST(Sampling, StorageIsReusedAcrossTokens) {
  const int n = 32000;
  const auto l = normal_logits(n, 31, 1.0);
  auto chain = make_sampler_chain(SamplingParams{}, n);
  Candidates c;
  auto run = [&] {
    c.reset(l.data(), n);
    chain->apply(c);
    ASSERT_EQ(c.size(), 1u);
  };
  run();
  const auto* ids = c.ids.data();
  const auto* logits = c.logits.data();
  const auto* probs = c.probs.data();
  const auto* scratch = c.scratch.data();
  for (int i = 0; i < 20; ++i) {
    run();
    chain->accept(c.ids[0]);
  }
  EXPECT_EQ(c.ids.data(), ids);
  EXPECT_EQ(c.logits.data(), logits);
  EXPECT_EQ(c.probs.data(), probs);
  EXPECT_EQ(c.scratch.data(), scratch);
}

}  // namespace
}  // namespace hm
