// Token sampling as a chain of samplers, each editing a shared candidate set in place
// (the llama.cpp design). A chain is built once per sequence and run once per generated
// token; after the first call it allocates nothing.
//
// Typical use:
//   auto chain = make_sampler_chain(params, tokenizer.vocab_size());
//   for (int32_t t : prompt) chain->accept(t);
//   for (;;) { int32_t t = chain->sample(logits, n_vocab); chain->accept(t); ... }
// sample() does not accept the token itself: the caller accepts every token the sequence
// gets, so prompt and generated tokens go through one path.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/rng.h"

namespace hm {

// The working set a sampler edits in place. ids, logits and probs always have equal length;
// probs hold softmax(logits) over the current set only while has_probs is true.
struct Candidates {
  std::vector<int32_t> ids;
  std::vector<float> logits;
  std::vector<float> probs;
  bool sorted = false;     // ids are in descending logit order
  bool has_probs = false;

  size_t size() const { return ids.size(); }
  // Fill with every token 0..n_vocab-1, reusing storage. NaN logits become -inf: NaN would
  // break the strict ordering the partial sorts rely on, and such a token must never win.
  void reset(const float* logits, int n_vocab);

  // Scratch for the partial sorts, kept here so it is reused across tokens.
  struct Entry { float logit; int32_t id; float prob; };
  std::vector<Entry> scratch;
};

class Sampler {
 public:
  virtual ~Sampler() = default;
  virtual const char* name() const = 0;
  virtual void apply(Candidates& c) = 0;
  virtual void accept(int32_t /*token*/) {}  // sees every token the sequence gets
  virtual void reset() {}                    // forget the sequence (new generation)
};

// Drops ids >= n: tokens the tokenizer cannot decode (the model's vocab may be larger).
class VocabLimit : public Sampler {
 public:
  explicit VocabLimit(int n);
  const char* name() const override { return "vocab_limit"; }
  void apply(Candidates& c) override;

 private:
  int n_;
};

// CTRL rule on tokens seen among the last last_n accepted: logit > 0 ? logit/penalty :
// logit*penalty, once per token however often it was seen. penalty 1 or last_n 0 = off.
// Keeps a count per id up to the largest accepted id, so accept ids within the model's vocab.
class RepetitionPenalty : public Sampler {
 public:
  RepetitionPenalty(float penalty, int last_n);
  const char* name() const override { return "repetition_penalty"; }
  void apply(Candidates& c) override;
  void accept(int32_t token) override;
  void reset() override;

 private:
  float penalty_;
  int last_n_;
  std::vector<int32_t> window_;  // ring buffer of the last last_n_ accepted tokens
  size_t head_ = 0;              // next slot to overwrite once the window is full
  std::vector<int32_t> count_;   // occurrences of each id in the window
};

// Divides logits by t. t <= 0 means greedy: keep only the arg-max.
class Temperature : public Sampler {
 public:
  explicit Temperature(float t) : t_(t) {}
  const char* name() const override { return "temperature"; }
  void apply(Candidates& c) override;

 private:
  float t_;
};

// Keeps the k highest logits (ties: lower id first), sorted. k <= 0 = off.
class TopK : public Sampler {
 public:
  explicit TopK(int k) : k_(k) {}
  const char* name() const override { return "top_k"; }
  void apply(Candidates& c) override;

 private:
  int k_;
};

// Keeps the smallest set of highest-probability tokens whose mass >= p (ties: lower id
// first). p >= 1 = off. Never sorts the whole vocabulary: a partial sort of the top 64
// settles peaked distributions (output sorted); otherwise one bucket pass by logit finds the
// bucket where the mass crosses p and only that bucket is sorted (output not sorted).
class TopP : public Sampler {
 public:
  explicit TopP(float p) : p_(p) {}
  const char* name() const override { return "top_p"; }
  void apply(Candidates& c) override;

 private:
  size_t bucket_select(Candidates& c);  // puts the nucleus first in c.scratch, returns its size

  float p_;
  std::vector<uint32_t> bucket_start_;
  std::vector<double> bucket_mass_;
  std::vector<uint16_t> bucket_of_;
};

// Drops tokens with prob < p * max_prob. p <= 0 = off.
class MinP : public Sampler {
 public:
  explicit MinP(float p) : p_(p) {}
  const char* name() const override { return "min_p"; }
  void apply(Candidates& c) override;

 private:
  float p_;
};

// Keeps the arg-max (ties: lowest id).
class Greedy : public Sampler {
 public:
  const char* name() const override { return "greedy"; }
  void apply(Candidates& c) override;
};

// Final pick: one draw from softmax of the remaining logits. reset() reseeds, so a seed
// reproduces the same sequence on every platform.
class Dist : public Sampler {
 public:
  explicit Dist(uint64_t seed) : seed_(seed), rng_(seed) {}
  const char* name() const override { return "dist"; }
  void apply(Candidates& c) override;
  void reset() override { rng_.reseed(seed_); }

 private:
  uint64_t seed_;
  Rng rng_;
};

class SamplerChain : public Sampler {
 public:
  void add(std::unique_ptr<Sampler> s);
  size_t length() const { return samplers_.size(); }
  const Sampler& at(size_t i) const { return *samplers_.at(i); }
  // Applies each sampler in order; the last must leave exactly one candidate (Greedy and
  // Dist do). hm::Error if n_vocab <= 0. Does not call accept().
  int32_t sample(const float* logits, int n_vocab);
  void accept(int32_t token) override;
  void reset() override;
  void apply(Candidates& c) override;
  const char* name() const override { return "chain"; }

 private:
  std::vector<std::unique_ptr<Sampler>> samplers_;
  Candidates cand_;
};

struct SamplingParams {
  float temperature = 0.8f;
  int top_k = 40;
  float top_p = 0.95f;
  float min_p = 0.05f;
  float repeat_penalty = 1.1f;
  int repeat_last_n = 64;
  uint64_t seed = 0;
};

// hm::Error naming the field: temperature < 0, top_p not in (0,1], min_p not in [0,1),
// repeat_penalty <= 0, repeat_last_n < 0 (non-finite values are rejected too).
void validate(const SamplingParams& p);

// VocabLimit, RepetitionPenalty, then Greedy if temperature <= 0, else TopK, TopP, MinP,
// Temperature, Dist. Validates p; hm::Error if n_decodable_vocab <= 0.
std::unique_ptr<SamplerChain> make_sampler_chain(const SamplingParams& p, int n_decodable_vocab);

}  // namespace hm
