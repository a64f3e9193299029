#include "runtime/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"
#include "kernels/ops.h"

namespace hm {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Descending logit, ties by ascending id: a total order, so results do not depend on the
// standard library's sort implementation.
bool before(const Candidates::Entry& a, const Candidates::Entry& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

float max_logit(const Candidates& c) {
  float m = kNegInf;
  for (float l : c.logits) m = std::max(m, l);
  return m;
}

size_t argmax_index(const Candidates& c) {
  HM_ASSERT(c.size() > 0);
  size_t best = 0;
  for (size_t i = 1; i < c.size(); ++i) {
    const float l = c.logits[i], b = c.logits[best];
    if (l > b || (l == b && c.ids[i] < c.ids[best])) best = i;
  }
  return best;
}

void keep_only(Candidates& c, size_t i) {
  c.ids[0] = c.ids[i];
  c.logits[0] = c.logits[i];
  c.probs[0] = 1.0f;
  c.ids.resize(1);
  c.logits.resize(1);
  c.probs.resize(1);
  c.sorted = true;
  c.has_probs = true;
}

void renormalize(Candidates& c) {
  if (!c.has_probs) return;
  double sum = 0.0;
  for (float p : c.probs) sum += p;
  if (sum <= 0.0) return;
  const float inv = static_cast<float>(1.0 / sum);
  for (float& p : c.probs) p *= inv;
}

void truncate(Candidates& c, size_t n) {
  c.ids.resize(n);
  c.logits.resize(n);
  c.probs.resize(n);
  renormalize(c);
}

// Stable in-place filter; keep(i) sees the original element i (j <= i, so it is unread).
template <class Keep>
void keep_if(Candidates& c, Keep keep) {
  size_t j = 0;
  while (j < c.size() && keep(j)) ++j;  // the common all-kept prefix needs no copying
  if (j == c.size()) return;
  for (size_t i = j + 1; i < c.size(); ++i) {
    if (!keep(i)) continue;
    c.ids[j] = c.ids[i];
    c.logits[j] = c.logits[i];
    c.probs[j] = c.probs[i];
    ++j;
  }
  truncate(c, j);
}

// probs = softmax(logits), max-subtracted. Non-finite max: +inf logits share the mass
// equally; if every logit is -inf, the candidates are equally likely.
void compute_probs(Candidates& c) {
  const size_t n = c.size();
  c.has_probs = true;
  if (n == 0) return;
  const float mx = max_logit(c);
  if (!std::isfinite(mx)) {
    size_t hits = 0;
    for (float l : c.logits) hits += (l == mx);
    const float p = 1.0f / static_cast<float>(hits);
    for (size_t i = 0; i < n; ++i) c.probs[i] = c.logits[i] == mx ? p : 0.0f;
    return;
  }
  // The SIMD exp of the kernels in use: over a whole vocabulary (the API defaults) the chain went
  // from ~150 to ~80 us per token (bench_kernels BM_Sampler; docs/PERFORMANCE.md).
  const double sum = cpu::exp_sum(c.probs.data(), c.logits.data(), static_cast<int>(n), mx);
  const float inv = static_cast<float>(1.0 / sum);  // sum >= 1: the max contributes exp(0)
  for (float& p : c.probs) p *= inv;
}

void fill_scratch(Candidates& c) {
  c.scratch.resize(c.size());
  for (size_t i = 0; i < c.size(); ++i) c.scratch[i] = {c.logits[i], c.ids[i], c.probs[i]};
}

// Put the top k scratch entries first, in order. partial_sort (a heap of k) is cheapest for
// small k; nth_element plus a sort of the k overtakes it near k = 1000 of 32000.
void select_top(Candidates& c, size_t k) {
  const auto first = c.scratch.begin();
  const auto mid = first + static_cast<std::ptrdiff_t>(k);
  if (k <= 1024) {
    std::partial_sort(first, mid, c.scratch.end(), before);
  } else {
    if (k < c.scratch.size()) std::nth_element(first, mid, c.scratch.end(), before);
    std::sort(first, mid, before);
  }
}

// Replace the candidates by the first n scratch entries.
void take_scratch_prefix(Candidates& c, size_t n, bool sorted = true) {
  for (size_t i = 0; i < n; ++i) {
    c.ids[i] = c.scratch[i].id;
    c.logits[i] = c.scratch[i].logit;
    c.probs[i] = c.scratch[i].prob;
  }
  c.sorted = sorted;
  truncate(c, n);
}

// Length of the shortest prefix of the sorted scratch[0, n) with mass >= target, or 0 if
// there is none.
size_t mass_prefix(const Candidates& c, size_t n, double target) {
  double cum = 0.0;
  for (size_t i = 0; i < n; ++i) {
    cum += c.scratch[i].prob;
    if (cum >= target) return i + 1;
  }
  return 0;
}

}  // namespace

void Candidates::reset(const float* src, int n_vocab) {
  HM_ASSERT(n_vocab >= 0 && (src != nullptr || n_vocab == 0));
  const size_t n = static_cast<size_t>(n_vocab);
  ids.resize(n);
  logits.resize(n);
  probs.resize(n);
  std::iota(ids.begin(), ids.end(), 0);
  for (size_t i = 0; i < n; ++i) logits[i] = std::isnan(src[i]) ? kNegInf : src[i];
  sorted = false;
  has_probs = false;
}

// ---- VocabLimit ----

VocabLimit::VocabLimit(int n) : n_(n) {
  HM_CHECK(n > 0, "sampling: vocab limit must be > 0 (got ", n, ")");
}

void VocabLimit::apply(Candidates& c) {
  keep_if(c, [&](size_t i) { return c.ids[i] < n_; });
}

// ---- RepetitionPenalty ----

RepetitionPenalty::RepetitionPenalty(float penalty, int last_n) : penalty_(penalty), last_n_(last_n) {
  HM_CHECK(std::isfinite(penalty) && penalty > 0, "sampling: repeat_penalty must be > 0 (got ", penalty, ")");
  HM_CHECK(last_n >= 0, "sampling: repeat_last_n must be >= 0 (got ", last_n, ")");
  window_.reserve(static_cast<size_t>(last_n));
}

void RepetitionPenalty::accept(int32_t token) {
  HM_CHECK(token >= 0, "sampling: accepted token id must be >= 0 (got ", token, ")");
  if (last_n_ == 0) return;
  if (static_cast<size_t>(token) >= count_.size()) count_.resize(static_cast<size_t>(token) + 1, 0);
  if (window_.size() < static_cast<size_t>(last_n_)) {
    window_.push_back(token);
  } else {
    --count_[static_cast<size_t>(window_[head_])];
    window_[head_] = token;
    head_ = (head_ + 1) % window_.size();
  }
  ++count_[static_cast<size_t>(token)];
}

void RepetitionPenalty::reset() {
  window_.clear();
  head_ = 0;
  std::fill(count_.begin(), count_.end(), 0);
}

void RepetitionPenalty::apply(Candidates& c) {
  if (penalty_ == 1.0f || window_.empty()) return;
  bool changed = false;
  for (size_t i = 0; i < c.size(); ++i) {
    const auto id = static_cast<size_t>(c.ids[i]);
    if (id >= count_.size() || count_[id] == 0) continue;
    float& l = c.logits[i];
    l = l > 0 ? l / penalty_ : l * penalty_;
    changed = true;
  }
  if (changed) {
    c.sorted = false;
    c.has_probs = false;
  }
}

// ---- Temperature ----

void Temperature::apply(Candidates& c) {
  if (c.size() == 0) return;
  if (t_ <= 0) {
    keep_only(c, argmax_index(c));
    return;
  }
  // Softmax is shift-invariant, so scale relative to the max: with a tiny t the top logits
  // then cannot overflow to +inf and tie, and t -> 0 tends to the arg-max as it should.
  const float mx = max_logit(c);
  const float shift = std::isfinite(mx) ? mx : 0.0f;
  for (float& l : c.logits) l = (l - shift) / t_;
  c.has_probs = false;
}

// ---- TopK ----

void TopK::apply(Candidates& c) {
  if (k_ <= 0 || static_cast<size_t>(k_) >= c.size()) return;
  const auto k = static_cast<size_t>(k_);
  if (c.sorted) {
    truncate(c, k);
    return;
  }
  fill_scratch(c);
  select_top(c, k);
  take_scratch_prefix(c, k);
}

// ---- TopP ----

void TopP::apply(Candidates& c) {
  const size_t n = c.size();
  if (p_ >= 1.0f || n <= 1) return;
  if (!c.has_probs) compute_probs(c);
  const double target = p_;
  if (c.sorted) {
    double cum = 0.0;
    size_t keep = n;
    for (size_t i = 0; i < n; ++i) {
      cum += c.probs[i];
      if (cum >= target) { keep = i + 1; break; }
    }
    truncate(c, keep);
    return;
  }
  // A language model's nucleus is usually small: try the top 64 first.
  fill_scratch(c);
  const size_t m = std::min<size_t>(64, n);
  select_top(c, m);
  size_t keep = mass_prefix(c, m, target);
  bool sorted = true;
  if (keep == 0 && m == n) keep = n;  // rounding left the total below p
  if (keep == 0) {
    keep = bucket_select(c);
    sorted = false;
  }
  take_scratch_prefix(c, keep, sorted);
}

size_t TopP::bucket_select(Candidates& c) {
  const size_t n = c.size();
  const double target = p_;
  const float mx = max_logit(c);
  if (!std::isfinite(mx)) {  // +inf present, or every logit -inf: degenerate, sort it all
    select_top(c, n);
    const size_t keep = mass_prefix(c, n, target);
    return keep > 0 ? keep : n;
  }
  // Buckets of equal logit width from the max down to the lowest finite logit. Bucket
  // index is monotone in the logit, so bucket order agrees with the sort order and only
  // the order inside a bucket is left to settle.
  constexpr size_t kBuckets = 1024;
  float lo = mx;
  for (float l : c.logits) if (std::isfinite(l)) lo = std::min(lo, l);
  const float inv_width = mx > lo ? static_cast<float>(kBuckets) / (mx - lo) : 0.0f;
  bucket_start_.assign(kBuckets + 1, 0);
  bucket_mass_.assign(kBuckets, 0.0);
  bucket_of_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const float l = c.logits[i];
    size_t b = kBuckets - 1;
    if (std::isfinite(l)) {
      const float x = (mx - l) * inv_width;
      if (x < static_cast<float>(kBuckets - 1)) b = static_cast<size_t>(x);
    }
    bucket_of_[i] = static_cast<uint16_t>(b);
    ++bucket_start_[b + 1];
    bucket_mass_[b] += c.probs[i];
  }
  size_t last = kBuckets - 1;  // the bucket where the mass crosses p
  double cum = 0.0;            // mass of the buckets before `last`
  for (size_t b = 0; b < kBuckets; ++b) {
    last = b;
    if (cum + bucket_mass_[b] >= target) break;
    cum += bucket_mass_[b];
  }
  for (size_t b = 0; b < kBuckets; ++b) bucket_start_[b + 1] += bucket_start_[b];
  // Counting-sort the tokens of buckets 0..last into scratch. Buckets before `last` are kept
  // whole, so only `last` needs sorting to find where the mass crosses p.
  const size_t total = bucket_start_[last + 1];
  for (size_t i = 0; i < n; ++i) {
    const size_t b = bucket_of_[i];
    if (b > last) continue;
    c.scratch[bucket_start_[b]++] = {c.logits[i], c.ids[i], c.probs[i]};
  }
  // bucket_start_[b] now holds the end of bucket b; bucket `last` ends at total.
  const size_t first = last == 0 ? 0 : bucket_start_[last - 1];
  std::sort(c.scratch.begin() + static_cast<std::ptrdiff_t>(first),
            c.scratch.begin() + static_cast<std::ptrdiff_t>(total), before);
  for (size_t i = first; i < total; ++i) {
    cum += c.scratch[i].prob;
    if (cum >= target) return i + 1;
  }
  return total;  // summing in another order left it a rounding error short: keep the bucket
}

// ---- MinP ----

void MinP::apply(Candidates& c) {
  if (p_ <= 0 || c.size() <= 1) return;
  const float mx = max_logit(c);
  if (!std::isfinite(mx)) return;  // all -inf, or +inf present: ratios are undefined
  // prob_i / max_prob = exp(l_i - max), so the test needs no softmax.
  const float log_p = std::log(p_);
  keep_if(c, [&](size_t i) { return c.logits[i] - mx >= log_p; });
}

// ---- Greedy ----

void Greedy::apply(Candidates& c) { keep_only(c, argmax_index(c)); }

// ---- Dist ----

void Dist::apply(Candidates& c) {
  HM_ASSERT(c.size() > 0);
  if (!c.has_probs) compute_probs(c);
  // Always one draw per call, so the stream position does not depend on the candidate count.
  const double u = rng_.uniform();
  double total = 0.0;
  for (float p : c.probs) total += p;
  const double target = u * total;
  double cum = 0.0;
  size_t pick = c.size();
  size_t last_nonzero = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    if (c.probs[i] <= 0.0f) continue;
    last_nonzero = i;
    cum += c.probs[i];
    if (cum > target) { pick = i; break; }
  }
  if (pick == c.size()) pick = last_nonzero;  // rounding left target at the very top
  keep_only(c, pick);
}

// ---- SamplerChain ----

void SamplerChain::add(std::unique_ptr<Sampler> s) {
  HM_ASSERT(s != nullptr);
  samplers_.push_back(std::move(s));
}

void SamplerChain::apply(Candidates& c) {
  for (auto& s : samplers_) s->apply(c);
}

int32_t SamplerChain::sample(const float* logits, int n_vocab) {
  HM_CHECK(n_vocab > 0, "sampling: n_vocab must be > 0 (got ", n_vocab, ")");
  cand_.reset(logits, n_vocab);
  apply(cand_);
  HM_ASSERT(cand_.size() == 1);  // the chain must end in a picker (Greedy or Dist)
  return cand_.ids[0];
}

void SamplerChain::accept(int32_t token) {
  for (auto& s : samplers_) s->accept(token);
}

void SamplerChain::reset() {
  for (auto& s : samplers_) s->reset();
}

// ---- params ----

void validate(const SamplingParams& p) {
  HM_CHECK(std::isfinite(p.temperature) && p.temperature >= 0,
           "sampling: temperature must be >= 0 (got ", p.temperature, ")");
  HM_CHECK(p.top_p > 0 && p.top_p <= 1, "sampling: top_p must be in (0, 1] (got ", p.top_p, ")");
  HM_CHECK(p.min_p >= 0 && p.min_p < 1, "sampling: min_p must be in [0, 1) (got ", p.min_p, ")");
  HM_CHECK(std::isfinite(p.repeat_penalty) && p.repeat_penalty > 0,
           "sampling: repeat_penalty must be > 0 (got ", p.repeat_penalty, ")");
  HM_CHECK(p.repeat_last_n >= 0, "sampling: repeat_last_n must be >= 0 (got ", p.repeat_last_n, ")");
}

std::unique_ptr<SamplerChain> make_sampler_chain(const SamplingParams& p, int n_decodable_vocab) {
  validate(p);
  HM_CHECK(n_decodable_vocab > 0, "sampling: n_decodable_vocab must be > 0 (got ", n_decodable_vocab, ")");
  auto chain = std::make_unique<SamplerChain>();
  chain->add(std::make_unique<VocabLimit>(n_decodable_vocab));
  chain->add(std::make_unique<RepetitionPenalty>(p.repeat_penalty, p.repeat_last_n));
  if (p.temperature <= 0) {
    chain->add(std::make_unique<Greedy>());
    return chain;
  }
  chain->add(std::make_unique<TopK>(p.top_k));
  chain->add(std::make_unique<TopP>(p.top_p));
  chain->add(std::make_unique<MinP>(p.min_p));
  chain->add(std::make_unique<Temperature>(p.temperature));
  chain->add(std::make_unique<Dist>(p.seed));
  return chain;
}

}  // namespace hm
