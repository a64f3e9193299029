// The device sampler (kernels/cuda/sampling.h) against the CPU chain (runtime/sampling.h).
//
// Random logits at odd V with NaN, -inf, -0 and tied maxima mixed in, odd batch sizes, logits
// and probabilities read and written with row strides wider than V, rows mapped to shuffled
// pool slots, penalty histories accepted on both sides. Checks: the filtered distribution equals
// the CPU chain's (same support, values within 1e-5); greedy and sampled tokens equal the CPU
// chain's token for token over many steps (the device runs the CPU's xoshiro256** per slot);
// a sequence's tokens do not depend on the batch around it; a captured CUDA graph of
// sample + accept gives the same tokens. Without a GPU the device cases are skipped
// (GTEST_SKIP) and the host-side parameter and shape checks still run.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "kernels/cuda/sampling.h"
#include "runtime/sampling.h"

namespace {

namespace hc = hm::cuda;

bool has_gpu() {
  static const bool ok = [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  }();
  return ok;
}
#define REQUIRE_GPU() \
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device"

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// A device array, poisoned with 0xff bytes until written.
template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    ck(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    ck(cudaMemset(p, 0xff, std::max<size_t>(n, 1) * sizeof(T)), "cudaMemset");
  }
  explicit Dev(const std::vector<T>& h) : Dev(h.size()) { put(h); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  void put(const std::vector<T>& h) {
    ck(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  std::vector<T> get() const {
    ck(cudaDeviceSynchronize(), "kernel");
    std::vector<T> h(n);
    ck(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return h;
  }
};

// OpenAI-style penalties for the reference chain (the CPU chain has none): over the last
// last_n accepted tokens, logit -= presence + frequency * count for each token seen.
class PresenceFrequency : public hm::Sampler {
 public:
  PresenceFrequency(float presence, float frequency, int last_n)
      : presence_(presence), frequency_(frequency), last_n_(last_n) {}
  const char* name() const override { return "presence_frequency"; }
  void apply(hm::Candidates& c) override {
    if (window_.empty()) return;
    std::map<int32_t, int> count;
    for (int32_t t : window_) ++count[t];
    for (size_t i = 0; i < c.size(); ++i) {
      const auto it = count.find(c.ids[i]);
      if (it != count.end()) c.logits[i] = c.logits[i] - (presence_ + frequency_ * float(it->second));
    }
    c.sorted = false;
    c.has_probs = false;
  }
  void accept(int32_t t) override {
    if (last_n_ == 0) return;
    window_.push_back(t);
    if (window_.size() > size_t(last_n_)) window_.pop_front();
  }

 private:
  float presence_, frequency_;
  int last_n_;
  std::deque<int32_t> window_;
};

hm::SamplingParams to_cpu(const hc::SampleParams& p) {
  hm::SamplingParams c;
  c.temperature = p.temperature;
  c.top_k = p.top_k;
  c.top_p = p.top_p;
  c.min_p = p.min_p;
  c.repeat_penalty = p.repeat_penalty;
  c.repeat_last_n = p.repeat_last_n;
  c.seed = p.seed;
  return c;
}

bool has_pf(const hc::SampleParams& p) { return p.presence_penalty != 0 || p.frequency_penalty != 0; }

// The CPU chain for p. Without presence/frequency it is make_sampler_chain itself; with them,
// the same samplers in the same order with PresenceFrequency after RepetitionPenalty. with_pick
// = false leaves off the final Greedy/Dist (the distribution Dist would draw from).
std::unique_ptr<hm::SamplerChain> cpu_chain(const hc::SampleParams& p, int n, bool with_pick = true) {
  if (with_pick && !has_pf(p)) return hm::make_sampler_chain(to_cpu(p), n);
  auto chain = std::make_unique<hm::SamplerChain>();
  chain->add(std::make_unique<hm::VocabLimit>(n));
  chain->add(std::make_unique<hm::RepetitionPenalty>(p.repeat_penalty, p.repeat_last_n));
  if (has_pf(p))
    chain->add(std::make_unique<PresenceFrequency>(p.presence_penalty, p.frequency_penalty, p.repeat_last_n));
  if (p.temperature <= 0) {
    chain->add(std::make_unique<hm::Greedy>());
    return chain;
  }
  chain->add(std::make_unique<hm::TopK>(p.top_k));
  chain->add(std::make_unique<hm::TopP>(p.top_p));
  chain->add(std::make_unique<hm::MinP>(p.min_p));
  chain->add(std::make_unique<hm::Temperature>(p.temperature));
  if (with_pick) chain->add(std::make_unique<hm::Dist>(p.seed));
  return chain;
}

// Dist's distribution over the CPU chain's final candidates (compute_probs), as a dense [V] row.
std::vector<float> cpu_probs(const float* logits, int V, int n, const hc::SampleParams& p,
                             const std::vector<int32_t>& accepted) {
  auto chain = cpu_chain(p, n, false);
  for (int32_t t : accepted) chain->accept(t);
  hm::Candidates c;
  c.reset(logits, V);
  chain->apply(c);
  std::vector<float> q(size_t(V), 0.0f);
  if (p.temperature <= 0) {
    q[size_t(c.ids.at(0))] = 1.0f;
    return q;
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (float l : c.logits) mx = std::max(mx, l);
  if (!std::isfinite(mx)) {
    size_t hits = 0;
    for (float l : c.logits) hits += l == mx;
    for (size_t i = 0; i < c.size(); ++i) q[size_t(c.ids[i])] = c.logits[i] == mx ? 1.0f / float(hits) : 0.0f;
    return q;
  }
  std::vector<float> e(c.size());
  double sum = 0;
  for (size_t i = 0; i < c.size(); ++i) sum += e[i] = std::exp(c.logits[i] - mx);
  const float inv = float(1.0 / sum);
  for (size_t i = 0; i < c.size(); ++i) q[size_t(c.ids[i])] = e[i] * inv;
  return q;
}

// Parameter sets that reach every path of the chain: greedy; the defaults (TopK sorted);
// TopP alone (its top-64 path on peaked rows, its bucket path on flat ones); no cut at all
// (id order); a large top-k; MinP alone; tiny top-k; presence and frequency; top-k 1.
std::vector<hc::SampleParams> param_sets() {
  std::vector<hc::SampleParams> v;
  hc::SampleParams p;
  p.temperature = 0;
  p.repeat_penalty = 1.3f;
  p.repeat_last_n = 32;
  v.push_back(p);
  v.push_back(hc::SampleParams{});
  p = {};
  p.top_k = 0;
  p.top_p = 0.9f;
  p.min_p = 0;
  v.push_back(p);
  p = {};
  p.top_k = 0;
  p.top_p = 1;
  p.min_p = 0;
  p.temperature = 1.3f;
  v.push_back(p);
  p = {};
  p.top_k = 5000;
  p.top_p = 0.5f;
  p.min_p = 0.02f;
  p.temperature = 0.7f;
  v.push_back(p);
  p = {};
  p.top_k = 0;
  p.top_p = 1;
  p.min_p = 0.1f;
  v.push_back(p);
  p = {};
  p.top_k = 3;
  p.top_p = 1;
  p.min_p = 0;
  p.temperature = 2.0f;
  v.push_back(p);
  p = {};
  p.top_k = 0;
  p.top_p = 0.95f;
  p.repeat_penalty = 1.2f;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.3f;
  p.repeat_last_n = 100;
  v.push_back(p);
  p = {};
  p.top_k = 1;
  v.push_back(p);
  return v;
}

// One row of logits: normal * scale (scale sets how peaked), with NaN, -inf, -0 and a tie of
// the maximum mixed in at random ids.
void fill_row(hm::Rng& rng, float* row, int V, float scale) {
  for (int v = 0; v < V; ++v) row[v] = float(scale * rng.normal());
  if (V < 8) return;
  row[rng.next_u64() % V] = std::numeric_limits<float>::quiet_NaN();
  row[rng.next_u64() % V] = -std::numeric_limits<float>::infinity();
  row[rng.next_u64() % V] = -0.0f;
  row[rng.next_u64() % V] = 0.0f;
  float mx = 0.0f;
  for (int v = 0; v < V; ++v)
    if (!std::isnan(row[v])) mx = std::max(mx, row[v]);
  const int a = int(rng.next_u64() % V), b = int(rng.next_u64() % V);
  row[a] = row[b] = mx + 0.5f;  // two tied maxima (the lower id must win)
}

float row_scale(int b) { return std::array<float, 3>{1.0f, 4.0f, 12.0f}[size_t(b % 3)]; }

// Device sampler state for a batch: pool (rows on shuffled slots), workspace, ids.
struct DeviceBatch {
  int B, V, n_slots;
  hc::SamplerPool pool;
  std::unique_ptr<Dev<unsigned char>> pool_mem, ws;
  std::unique_ptr<Dev<int32_t>> slots, out;
  std::vector<int32_t> slot_of_row;

  DeviceBatch(int b, int v, const std::vector<hc::SampleParams>& params, uint64_t shuffle_seed) : B(b), V(v), n_slots(b + 3) {
    pool_mem = std::make_unique<Dev<unsigned char>>(hc::sampler_pool_bytes(n_slots, hc::kMaxSampleLastN));
    pool = {pool_mem->p, n_slots, hc::kMaxSampleLastN};
    ws = std::make_unique<Dev<unsigned char>>(hc::sample_workspace_bytes(B, V));
    std::vector<int32_t> perm(static_cast<size_t>(n_slots));
    std::iota(perm.begin(), perm.end(), 0);
    hm::Rng rng(shuffle_seed);
    for (size_t i = perm.size() - 1; i > 0; --i) std::swap(perm[i], perm[rng.next_u64() % (i + 1)]);
    slot_of_row.assign(perm.begin(), perm.begin() + B);
    slots = std::make_unique<Dev<int32_t>>(slot_of_row);
    out = std::make_unique<Dev<int32_t>>(size_t(B));
    for (int r = 0; r < B; ++r)
      hc::sampler_set_slot(pool, slot_of_row[size_t(r)], hc::make_sampler_slot(params[size_t(r)], hc::kMaxSampleLastN), nullptr);
  }
  // Row r accepts hist[r] (one ragged call).
  void accept(const std::vector<std::vector<int32_t>>& hist) {
    std::vector<int32_t> cu{0}, tok;
    for (const auto& h : hist) {
      tok.insert(tok.end(), h.begin(), h.end());
      cu.push_back(int32_t(tok.size()));
    }
    Dev<int32_t> dcu(cu), dtok(std::max<size_t>(tok.size(), 1));
    if (!tok.empty()) dtok.put(tok);
    hc::sampler_accept(pool, slots->p, dtok.p, dcu.p, B, nullptr);
    ck(cudaDeviceSynchronize(), "accept");
  }
};

std::vector<int32_t> random_history(hm::Rng& rng, int V, const float* row) {
  std::vector<int32_t> h(size_t(rng.next_u64() % 120));
  for (auto& t : h) t = int32_t(rng.next_u64() % 3 == 0 ? rng.next_u64() % std::min(V, 40) : rng.next_u64() % V);
  if (!h.empty()) h[h.size() / 2] = int32_t(std::max_element(row, row + V) - row);  // penalise a top token
  return h;
}

// ---- host-side checks (no GPU needed) ----

TEST(CudaSamplingErrors, BadParametersAreErrorsNamingTheField) {
  const auto bad = [](auto edit, const char* field) {
    hc::SampleParams p;
    edit(p);
    try {
      hc::make_sampler_slot(p, 64);
      ADD_FAILURE() << field << ": no error";
    } catch (const hm::Error& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  bad([](hc::SampleParams& p) { p.temperature = -0.1f; }, "temperature");
  bad([&](hc::SampleParams& p) { p.temperature = nan; }, "temperature");
  bad([&](hc::SampleParams& p) { p.temperature = inf; }, "temperature");
  bad([](hc::SampleParams& p) { p.top_k = -1; }, "top_k");
  bad([](hc::SampleParams& p) { p.top_p = 0; }, "top_p");
  bad([](hc::SampleParams& p) { p.top_p = 1.01f; }, "top_p");
  bad([&](hc::SampleParams& p) { p.top_p = nan; }, "top_p");
  bad([](hc::SampleParams& p) { p.min_p = 1; }, "min_p");
  bad([](hc::SampleParams& p) { p.min_p = -0.01f; }, "min_p");
  bad([](hc::SampleParams& p) { p.repeat_penalty = 0; }, "repeat_penalty");
  bad([&](hc::SampleParams& p) { p.repeat_penalty = inf; }, "repeat_penalty");
  bad([&](hc::SampleParams& p) { p.presence_penalty = nan; }, "presence_penalty");
  bad([&](hc::SampleParams& p) { p.frequency_penalty = inf; }, "frequency_penalty");
  bad([](hc::SampleParams& p) { p.repeat_last_n = -1; }, "repeat_last_n");
  bad([](hc::SampleParams& p) { p.repeat_last_n = 65; }, "repeat_last_n");
  // The edges that are allowed.
  hc::SampleParams ok;
  ok.temperature = 0;
  ok.top_k = 0;
  ok.top_p = 1;
  ok.min_p = 0;
  ok.repeat_last_n = 64;
  EXPECT_NO_THROW(hc::make_sampler_slot(ok, 64));
  // The slot carries the CPU's seeded RNG state and the host's log(min_p).
  ok.seed = 77;
  ok.min_p = 0.05f;
  const hc::SamplerSlot s = hc::make_sampler_slot(ok, 64);
  const hm::Rng::State st = hm::Rng(77).state();
  for (int i = 0; i < 4; ++i) EXPECT_EQ(s.rng[i], st.s[i]);
  EXPECT_EQ(s.log_min_p, std::log(0.05f));
}

TEST(CudaSamplingErrors, BadShapesAreErrors) {
  EXPECT_THROW(hc::sampler_pool_bytes(0, 64), hm::Error);
  EXPECT_THROW(hc::sampler_pool_bytes(4, hc::kMaxSampleLastN + 1), hm::Error);
  EXPECT_THROW(hc::sampler_pool_bytes(4, -1), hm::Error);
  EXPECT_THROW(hc::sample_workspace_bytes(0, 10), hm::Error);
  // Fake non-null device pointers: every check below fires before anything touches them.
  auto* fake = reinterpret_cast<void*>(uintptr_t(256));
  const hc::SamplerPool pool{fake, 4, 64};
  auto* out = static_cast<int32_t*>(fake);
  auto* f = static_cast<float*>(fake);
  EXPECT_THROW(hc::sample(out, f, 10, 0, 10, 10, pool, nullptr, fake, nullptr), hm::Error);      // B 0
  EXPECT_THROW(hc::sample(out, f, 10, 2, 0, 0, pool, nullptr, fake, nullptr), hm::Error);        // V 0
  EXPECT_THROW(hc::sample(out, f, 10, 2, 10, 11, pool, nullptr, fake, nullptr), hm::Error);      // n > V
  EXPECT_THROW(hc::sample(out, f, 10, 2, 10, 0, pool, nullptr, fake, nullptr), hm::Error);       // n 0
  EXPECT_THROW(hc::sample(out, f, 9, 2, 10, 10, pool, nullptr, fake, nullptr), hm::Error);       // ld < V
  EXPECT_THROW(hc::sample(nullptr, f, 10, 2, 10, 10, pool, nullptr, fake, nullptr), hm::Error);  // no out
  EXPECT_THROW(hc::sample(out, f, 10, 2, 10, 10, pool, nullptr, nullptr, nullptr), hm::Error);   // no workspace
  EXPECT_THROW(hc::sample(out, f, 10, 2, 10, 10, hc::SamplerPool{}, nullptr, fake, nullptr), hm::Error);
  EXPECT_THROW(hc::sample_probs(f, 9, f, 10, 2, 10, 10, pool, nullptr, fake, nullptr), hm::Error);  // ldp < V
  EXPECT_THROW(hc::sample_probs(nullptr, 10, f, 10, 2, 10, 10, pool, nullptr, fake, nullptr), hm::Error);
  EXPECT_THROW(hc::sampler_set_slot(pool, 4, hc::make_sampler_slot({}, 64), nullptr), hm::Error);  // slot
  EXPECT_THROW(hc::sampler_set_slot(pool, -1, hc::make_sampler_slot({}, 64), nullptr), hm::Error);
  hc::SampleParams wide;
  wide.repeat_last_n = 100;
  EXPECT_THROW(hc::sampler_set_slot(pool, 0, hc::make_sampler_slot(wide, 128), nullptr), hm::Error);  // > pool
  EXPECT_THROW(hc::sampler_accept(pool, nullptr, nullptr, nullptr, 1, nullptr), hm::Error);
  EXPECT_THROW(hc::sampler_accept(pool, nullptr, out, nullptr, -1, nullptr), hm::Error);
}

// ---- device against the CPU chain ----

struct Shape {
  int V, B, n_decodable;
};

// The filtered distribution of every row equals the CPU chain's: same support (a boundary
// token kept on one side only fails), values within 1e-5.
TEST(CudaSampling, FilteredProbsEqualCpuChain) {
  REQUIRE_GPU();
  const auto sets = param_sets();
  hm::Rng rng(2024);
  for (const Shape s : {Shape{5, 7, 5}, Shape{1000, 9, 990}, Shape{50280, 9, 50277}, Shape{151936, 5, 151936},
                        Shape{262144, 2, 262144}, Shape{1000, 256, 1000}}) {
    const int ld = s.V + 3, ldp = s.V + 1;
    std::vector<hc::SampleParams> params(size_t(s.B));
    for (int b = 0; b < s.B; ++b) {
      params[size_t(b)] = sets[size_t(b) % sets.size()];
      params[size_t(b)].seed = rng.next_u64();
    }
    std::vector<float> logits(size_t(s.B) * ld, 123.0f);
    std::vector<std::vector<int32_t>> hist(size_t(s.B));
    for (int b = 0; b < s.B; ++b) {
      fill_row(rng, &logits[size_t(b) * ld], s.V, row_scale(b));
      hist[size_t(b)] = random_history(rng, s.V, &logits[size_t(b) * ld]);
    }
    DeviceBatch db(s.B, s.V, params, rng.next_u64());
    db.accept(hist);
    Dev<float> dlog(logits), dprobs(size_t(s.B) * ldp);
    hc::sample_probs(dprobs.p, ldp, dlog.p, ld, s.B, s.V, s.n_decodable, db.pool, db.slots->p, db.ws->p, nullptr);
    const std::vector<float> got = dprobs.get();
    const std::vector<float> after = dlog.get();  // bitwise: the rows hold NaNs
    EXPECT_EQ(std::memcmp(after.data(), logits.data(), logits.size() * sizeof(float)), 0)
        << "sample_probs changed the logits";
    double worst = 0;
    for (int b = 0; b < s.B; ++b) {
      const auto ref = cpu_probs(&logits[size_t(b) * ld], s.V, s.n_decodable, params[size_t(b)], hist[size_t(b)]);
      int support_diff = 0, first = -1;
      double err = 0, sum = 0;
      for (int v = 0; v < s.V; ++v) {
        const float g = got[size_t(b) * ldp + v], r = ref[size_t(v)];
        sum += g;
        if ((g > 0) != (r > 0)) {
          ++support_diff;
          if (first < 0) first = v;
        }
        err = std::max(err, double(std::fabs(g - r)));
        if (std::isnan(g)) err = INFINITY;
      }
      worst = std::max(worst, err);
      EXPECT_EQ(support_diff, 0) << "V " << s.V << " row " << b << " (param set " << b % sets.size()
                                 << "): support differs at " << support_diff << " ids, first " << first;
      EXPECT_LE(err, 1e-5) << "V " << s.V << " row " << b << " (param set " << b % sets.size() << ")";
      EXPECT_NEAR(sum, 1.0, 1e-4) << "V " << s.V << " row " << b;
    }
    std::printf("sample_probs V %d B %d: max |got - cpu| %.3g\n", s.V, s.B, worst);
  }
}

// Greedy and sampled tokens equal the CPU chain's over many steps: fresh logits each step,
// both sides accept their own token (so a divergence would also change the penalties).
TEST(CudaSampling, TokensEqualCpuChainStepByStep) {
  REQUIRE_GPU();
  const auto sets = param_sets();
  hm::Rng rng(99);
  for (const auto& [shape, steps] : {std::pair{Shape{5, 9, 5}, 150}, std::pair{Shape{1000, 9, 997}, 120},
                                    std::pair{Shape{50280, 9, 50280}, 30}, std::pair{Shape{151936, 3, 151900}, 8}}) {
    const Shape s = shape;
    const int ld = s.V + 5;
    std::vector<hc::SampleParams> params(size_t(s.B));
    std::vector<std::unique_ptr<hm::SamplerChain>> cpu(size_t(s.B));
    std::vector<float> logits(size_t(s.B) * ld, 0.0f);
    std::vector<std::vector<int32_t>> prompt(size_t(s.B));
    for (int b = 0; b < s.B; ++b) {
      params[size_t(b)] = sets[size_t(b) % sets.size()];
      params[size_t(b)].seed = rng.next_u64();
      cpu[size_t(b)] = cpu_chain(params[size_t(b)], s.n_decodable);
      fill_row(rng, &logits[size_t(b) * ld], s.V, row_scale(b));
      prompt[size_t(b)] = random_history(rng, s.V, &logits[size_t(b) * ld]);
      for (int32_t t : prompt[size_t(b)]) cpu[size_t(b)]->accept(t);
    }
    DeviceBatch db(s.B, s.V, params, rng.next_u64());
    db.accept(prompt);
    Dev<float> dlog(logits.size());
    std::vector<int> diverged(size_t(s.B), -1);
    std::vector<std::map<int32_t, int>> seen(size_t(s.B));
    for (int step = 0; step < steps; ++step) {
      for (int b = 0; b < s.B; ++b) fill_row(rng, &logits[size_t(b) * ld], s.V, row_scale(b + step));
      dlog.put(logits);
      hc::sample(db.out->p, dlog.p, ld, s.B, s.V, s.n_decodable, db.pool, db.slots->p, db.ws->p, nullptr);
      hc::sampler_accept(db.pool, db.slots->p, db.out->p, nullptr, s.B, nullptr);
      const std::vector<int32_t> got = db.out->get();
      for (int b = 0; b < s.B; ++b) {
        const int32_t want = cpu[size_t(b)]->sample(&logits[size_t(b) * ld], s.V);
        cpu[size_t(b)]->accept(want);
        ++seen[size_t(b)][want];
        if (got[size_t(b)] != want && diverged[size_t(b)] < 0) {
          diverged[size_t(b)] = step;
          ADD_FAILURE() << "V " << s.V << " row " << b << " (param set " << b % sets.size() << ") step " << step
                        << ": device " << got[size_t(b)] << ", cpu " << want;
        }
      }
    }
    // The draws were not all the arg-max: the comparison exercised the RNG.
    int distinct = 0;
    for (const auto& m : seen) distinct += int(m.size());
    EXPECT_GT(distinct, 2 * s.B) << "V " << s.V;
  }
}

// A sequence samples the same tokens alone (B 1, slot 0) as at row 37 of a batch of 64 (slot 5,
// other rows with other parameters and seeds).
TEST(CudaSampling, SameSeedSameTokensAloneOrInBatch) {
  REQUIRE_GPU();
  const int V = 50280, B = 64, row = 37, steps = 25;
  hc::SampleParams mine;
  mine.top_k = 0;
  mine.top_p = 0.9f;
  mine.seed = 4242;
  const auto sets = param_sets();
  hm::Rng rng(7);
  // Alone.
  DeviceBatch alone(1, V, {mine}, 1);
  // In a batch: row 37 on slot 5.
  std::vector<hc::SampleParams> params(B);
  for (int b = 0; b < B; ++b) {
    params[size_t(b)] = sets[size_t(b) % sets.size()];
    params[size_t(b)].seed = rng.next_u64();
  }
  params[row] = mine;
  DeviceBatch batch(B, V, params, 3);
  const auto it = std::find(batch.slot_of_row.begin(), batch.slot_of_row.end(), 5);
  if (it != batch.slot_of_row.end()) std::swap(*it, batch.slot_of_row[size_t(row)]);
  else batch.slot_of_row[size_t(row)] = 5;
  batch.slots->put(batch.slot_of_row);
  for (int b = 0; b < B; ++b)
    hc::sampler_set_slot(batch.pool, batch.slot_of_row[size_t(b)], hc::make_sampler_slot(params[size_t(b)], hc::kMaxSampleLastN),
                         nullptr);
  std::vector<float> logits(size_t(B) * V), one(static_cast<size_t>(V));
  Dev<float> dlog(logits.size()), done(one.size());
  std::vector<int32_t> a, t;
  for (int step = 0; step < steps; ++step) {
    for (int b = 0; b < B; ++b) fill_row(rng, &logits[size_t(b) * V], V, 1.5f);
    std::copy_n(&logits[size_t(row) * V], V, one.begin());
    dlog.put(logits);
    done.put(one);
    hc::sample(alone.out->p, done.p, V, 1, V, V, alone.pool, alone.slots->p, alone.ws->p, nullptr);
    hc::sampler_accept(alone.pool, alone.slots->p, alone.out->p, nullptr, 1, nullptr);
    hc::sample(batch.out->p, dlog.p, V, B, V, V, batch.pool, batch.slots->p, batch.ws->p, nullptr);
    hc::sampler_accept(batch.pool, batch.slots->p, batch.out->p, nullptr, B, nullptr);
    a.push_back(alone.out->get()[0]);
    t.push_back(batch.out->get()[size_t(row)]);
  }
  EXPECT_EQ(a, t);
  EXPECT_GT(std::set<int32_t>(a.begin(), a.end()).size(), 5u) << "the draws should vary";
}

// sample + accept captured once as a CUDA graph and replayed give the CPU chain's tokens.
TEST(CudaSampling, CapturedGraphReplaysGiveCpuTokens) {
  REQUIRE_GPU();
  const int V = 1000, B = 6, steps = 40;
  const auto sets = param_sets();
  std::vector<hc::SampleParams> params(B);
  std::vector<std::unique_ptr<hm::SamplerChain>> cpu(B);
  for (int b = 0; b < B; ++b) {
    params[size_t(b)] = sets[size_t(b + 1) % sets.size()];
    params[size_t(b)].seed = 1000 + uint64_t(b);
    cpu[size_t(b)] = cpu_chain(params[size_t(b)], V);
  }
  DeviceBatch db(B, V, params, 11);
  Dev<float> dlog(size_t(B) * V);
  cudaStream_t st;
  ck(cudaStreamCreate(&st), "stream");
  ck(cudaDeviceSynchronize(), "sync");
  cudaGraph_t graph;
  ck(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal), "begin capture");
  hc::sample(db.out->p, dlog.p, V, B, V, V, db.pool, db.slots->p, db.ws->p, st);
  hc::sampler_accept(db.pool, db.slots->p, db.out->p, nullptr, B, st);
  ck(cudaStreamEndCapture(st, &graph), "end capture");
  cudaGraphExec_t exec;
  ck(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  hm::Rng rng(5);
  std::vector<float> logits(size_t(B) * V);
  for (int step = 0; step < steps; ++step) {
    for (int b = 0; b < B; ++b) fill_row(rng, &logits[size_t(b) * V], V, row_scale(b + step));
    dlog.put(logits);
    ck(cudaGraphLaunch(exec, st), "graph launch");
    ck(cudaStreamSynchronize(st), "graph sync");
    const auto got = db.out->get();
    for (int b = 0; b < B; ++b) {
      const int32_t want = cpu[size_t(b)]->sample(&logits[size_t(b) * V], V);
      cpu[size_t(b)]->accept(want);
      ASSERT_EQ(got[size_t(b)], want) << "row " << b << " step " << step;
    }
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(st);
}

// The all-greedy launch (prep and prep_finish only) writes the full chain's tokens: the arg-max
// after each slot's penalties, -1 for a slot outside the pool, over steps that accept them.
TEST(CudaSampling, AllGreedyLaunchEqualsFullChain) {
  REQUIRE_GPU();
  hm::Rng rng(4242);
  for (const Shape s : {Shape{7, 5, 7}, Shape{1000, 9, 993}, Shape{50280, 6, 50280}}) {
    std::vector<hc::SampleParams> params(size_t(s.B));
    for (int b = 0; b < s.B; ++b) {
      hc::SampleParams& p = params[size_t(b)];
      p.temperature = 0;
      p.repeat_penalty = b % 3 == 0 ? 1.0f : 1.5f;  // penalties move the arg-max of later steps
      p.presence_penalty = b % 3 == 2 ? 0.7f : 0.0f;
      p.frequency_penalty = b % 3 == 2 ? 0.3f : 0.0f;
      p.repeat_last_n = b % 2 == 0 ? 16 : 0;
    }
    DeviceBatch db(s.B, s.V, params, rng.next_u64());
    std::vector<int32_t> slots = db.slot_of_row;
    slots[size_t(s.B) - 1] = db.n_slots + 2;  // outside the pool
    db.slots->put(slots);
    const int ld = s.V + 2;
    std::vector<float> logits(size_t(s.B) * ld, 0.0f);
    Dev<float> dlog(logits.size());
    Dev<int32_t> greedy_out(size_t(s.B));
    int moved = 0;  // steps where a penalty changed some row's pick from the raw arg-max
    for (int step = 0; step < 40; ++step) {
      // Finite logits (the raw arg-max below is plain), four ids of each row 2 above the rest: the
      // pick is nearly always one of them, so a penalized earlier pick often loses to another.
      for (int b = 0; b < s.B; ++b)
        for (int j = 0; j < ld; ++j) {
          const bool boosted = j < s.n_decodable && (j * 7 + b) % s.n_decodable < 4;
          logits[size_t(b) * ld + size_t(j)] = float(0.5 * rng.normal() + (boosted ? 2.0 : 0.0));
        }
      dlog.put(logits);
      hc::sample(db.out->p, dlog.p, ld, s.B, s.V, s.n_decodable, db.pool, db.slots->p, db.ws->p, nullptr, false);
      hc::sample(greedy_out.p, dlog.p, ld, s.B, s.V, s.n_decodable, db.pool, db.slots->p, db.ws->p, nullptr, true);
      const std::vector<int32_t> want = db.out->get(), got = greedy_out.get();
      ASSERT_EQ(got, want) << "V " << s.V << " step " << step;
      EXPECT_EQ(got[size_t(s.B) - 1], -1);
      for (int b = 0; b + 1 < s.B; ++b) {
        const float* row = &logits[size_t(b) * ld];
        moved += int(std::max_element(row, row + s.n_decodable) - row) != got[size_t(b)];
      }
      hc::sampler_accept(db.pool, db.slots->p, db.out->p, nullptr, s.B, nullptr);
    }
    if (s.V > 7) {
      EXPECT_GT(moved, 0) << "V " << s.V << ": the penalties never changed a pick";
    }
  }
}

// A slot outside the pool gives -1, not a token.
TEST(CudaSampling, SlotOutsidePoolGivesMinusOne) {
  REQUIRE_GPU();
  const int V = 100, B = 3;
  DeviceBatch db(B, V, {hc::SampleParams{}, hc::SampleParams{}, hc::SampleParams{}}, 1);
  std::vector<int32_t> slots = db.slot_of_row;
  slots[1] = db.n_slots;  // one past the end
  db.slots->put(slots);
  std::vector<float> logits(size_t(B) * V);
  hm::Rng rng(1);
  for (int b = 0; b < B; ++b) fill_row(rng, &logits[size_t(b) * V], V, 3.0f);
  Dev<float> dlog(logits);
  hc::sample(db.out->p, dlog.p, V, B, V, V, db.pool, db.slots->p, db.ws->p, nullptr);
  const auto got = db.out->get();
  EXPECT_EQ(got[1], -1);
  EXPECT_GE(got[0], 0);
  EXPECT_GE(got[2], 0);
}

}  // namespace
