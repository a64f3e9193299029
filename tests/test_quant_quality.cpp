// hm eval --weights (eval/weight_quality.h): the KL code against a plain reference and known
// values, and the per-format evaluation: f32 against the f32 reference is exactly 0, the packed
// formats are scored on the same windows and tokens as the training forward's evaluate().
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "eval/weight_quality.h"
#include "model/model.h"
#include "runtime/tokenizer.h"
#include "train/trainer.h"
#include "test_util.h"

using namespace hm;

namespace {

std::vector<double> lsm(const std::vector<float>& x) {
  std::vector<double> out(x.size());
  log_softmax(x.data(), int(x.size()), out.data());
  return out;
}

double kl(const std::vector<float>& p, const std::vector<float>& q) {
  const std::vector<double> lp = lsm(p), lq = lsm(q);
  return kl_divergence(lp.data(), lq.data(), int(p.size()));
}

std::vector<float> random_logits(Rng& r, int n, double scale) {
  std::vector<float> x(size_t(n), 0.0f);
  for (float& v : x) v = float(scale * r.normal());
  return x;
}

}  // namespace

TEST(KlDivergence, IdenticalDistributionsGiveExactlyZero) {
  Rng r(3);
  for (int n : {1, 2, 7, 4096}) {
    const std::vector<float> x = random_logits(r, n, 4.0);
    EXPECT_EQ(kl(x, x), 0.0) << n;
  }
}

// p = (0.9, 0.1), q = (0.5, 0.5): KL(p || q) = 0.9 ln 1.8 + 0.1 ln 0.2 = 0.3681, and the other
// direction 0.5 ln(5/9) + 0.5 ln 5 = 0.5108: a swapped argument order fails.
TEST(KlDivergence, KnownTwoPointValuesAndDirection) {
  const std::vector<float> p = {std::log(0.9f), std::log(0.1f)}, q = {0.0f, 0.0f};
  EXPECT_NEAR(kl(p, q), 0.9 * std::log(1.8) + 0.1 * std::log(0.2), 1e-7);
  EXPECT_NEAR(kl(q, p), 0.5 * std::log(0.5 / 0.9) + 0.5 * std::log(0.5 / 0.1), 1e-7);
  // Logits are defined up to a constant: a shift that floats hold exactly changes nothing.
  const std::vector<float> a = {3.0f, -2.0f, 0.5f, 1.25f}, b = {103.0f, 98.0f, 100.5f, 101.25f};
  EXPECT_NEAR(kl(a, b), 0.0, 1e-12);
  // Far-apart logits stay finite (the max is subtracted before exp): KL = 1000 nats.
  EXPECT_NEAR(kl({1000.0f, 0.0f}, {0.0f, 1000.0f}), 1000.0, 1e-9);
}

// Against softmax and sum p log(p / q) written out plainly, on odd sizes.
TEST(KlDivergence, MatchesPlainReference) {
  Rng r(11);
  for (int n : {3, 513, 4097}) {
    const std::vector<float> x = random_logits(r, n, 3.0), y = random_logits(r, n, 3.0);
    auto softmax = [](const std::vector<float>& v) {
      double z = 0;
      for (float e : v) z += std::exp(double(e));
      std::vector<double> p;
      for (float e : v) p.push_back(std::exp(double(e)) / z);
      return p;
    };
    const std::vector<double> p = softmax(x), q = softmax(y), lp = lsm(x);
    double ref = 0;
    for (int v = 0; v < n; ++v) {
      ref += p[size_t(v)] * std::log(p[size_t(v)] / q[size_t(v)]);
      EXPECT_NEAR(lp[size_t(v)], std::log(p[size_t(v)]), 1e-12);
    }
    EXPECT_GT(ref, 0.1);
    EXPECT_NEAR(kl(x, y), ref, 1e-12 * ref) << n;
  }
}

namespace {

// A tiny model whose embeddings are 20x init's, saved with a byte tokenizer, and a corpus: the
// residual stream is then mostly the input token's embedding and the tied head bets on that
// token, so a window or target off by one would move the loss by nats (as in test_packed_model).
struct Fixture {
  test::TempDir dir{"quant_quality"};
  std::string model, corpus;
  Fixture() {
    std::string text;
    Rng r(7);
    const char* words[] = {"the cat", "a dog", "sees", "likes", "the ball", "a red hat", "runs", "home"};
    for (int i = 0; i < 400; ++i)
      text += std::string(words[r.next_u64() % 8]) + " " + words[r.next_u64() % 8] + " " + words[r.next_u64() % 8] +
              ".\n";
    corpus = (dir.path / "corpus.txt").string();
    std::ofstream(corpus) << text;
    auto be = make_cpu_backend();
    ModelConfig c = preset("tiny");
    c.d_ff = 64;
    HybridModel m(c, *be);
    test::randomize_params(m.params(), 12);
    const int64_t table = int64_t(c.vocab_size) * c.d_model;
    for (int64_t i = 0; i < table; ++i) m.params().embeddings()[i] *= 20.0f;
    m.prepare();
    model = (dir.path / "m").string();
    save_model(m, model);
    ByteTokenizer().save(model);
  }
};

}  // namespace

TEST(WeightQuality, Float32IsExactlyTheReferenceAndPackedFormatsAreScoredOnTheSameTokens) {
  Fixture fx;
  const EvalResult train_fwd = evaluate(fx.model, fx.corpus, 32, 0, 4);
  const std::vector<DType> formats = {DType::F32, DType::BF16, DType::Q8_0, DType::Q4_0};
  const WeightQualityResult r = evaluate_weights(fx.model, fx.corpus, formats, 32, 0, 4);
  ASSERT_EQ(r.formats.size(), formats.size());
  EXPECT_EQ(r.tokens, train_fwd.tokens);
  EXPECT_GT(r.tokens, 300);
  EXPECT_EQ(r.seq_len, 32);
  EXPECT_EQ(r.stored, DType::F32);
  // The inference forward's f32 loss is the training forward's (same windows and targets).
  EXPECT_GT(train_fwd.loss, std::log(256.0) + 1.0) << "the model should bet on the input token";
  EXPECT_NEAR(r.ref_loss, train_fwd.loss, 1e-5 * train_fwd.loss);
  // f32 is a model of its own, run again: bit for bit the reference.
  const WeightQuality& f32 = r.formats[0];
  EXPECT_EQ(f32.format, DType::F32);
  EXPECT_EQ(f32.kl_mean, 0.0);
  EXPECT_EQ(f32.kl_max, 0.0);
  EXPECT_EQ(f32.ppl, r.ref_ppl);
  EXPECT_EQ(f32.ppl_ratio, 1.0);
  EXPECT_EQ(f32.top1_agree, 1.0);
  double prev = 0;
  for (size_t i = 1; i < formats.size(); ++i) {
    const WeightQuality& q = r.formats[i];
    std::printf("  %s: ppl %.4f (x%.5f), KL mean %.3e p99 %.3e max %.3e, top-1 %.4f\n", compute_dtype_name(q.format),
                q.ppl, q.ppl_ratio, q.kl_mean, q.kl_p99, q.kl_max, q.top1_agree);
    EXPECT_EQ(q.format, formats[i]);
    EXPECT_DOUBLE_EQ(q.ppl_ratio, q.ppl / r.ref_ppl);
    // Coarser weights move the distribution further: bf16 < q8_0 < q4_0 (each ~5x apart here).
    EXPECT_GT(q.kl_mean, prev) << compute_dtype_name(q.format);
    EXPECT_LE(q.kl_mean, q.kl_max);
    EXPECT_LE(q.kl_p99, q.kl_max);
    EXPECT_GT(q.kl_p99, 0.0);
    prev = q.kl_mean;
  }
  EXPECT_LT(r.formats[1].kl_mean, 1e-3);                              // bf16
  EXPECT_LT(std::fabs(r.formats[1].ppl_ratio - 1.0), 1e-2);
  EXPECT_LT(std::fabs(r.formats[2].ppl_ratio - 1.0), 5e-2);           // q8_0

  // A checkpoint stored as q8_0: its reference is the dequantized arena, and q8_0 of it computes
  // what packing at load did (the round trip is exact).
  auto be = make_cpu_backend();
  auto q = load_model(fx.model, *be);
  q->set_weight_format(DType::Q8_0);
  q->prepare();
  const std::string qdir = (fx.dir.path / "q").string();
  save_model(*q, qdir);
  ByteTokenizer().save(qdir);
  const WeightQualityResult rq = evaluate_weights(qdir, fx.corpus, {DType::Q8_0}, 32, 0, 4);
  EXPECT_EQ(rq.stored, DType::Q8_0);
  EXPECT_EQ(rq.formats[0].ppl, r.formats[2].ppl);
  EXPECT_NE(rq.ref_ppl, r.ref_ppl);
}

TEST(WeightQuality, BadInputIsAnError) {
  Fixture fx;
  EXPECT_THROW(evaluate_weights(fx.model, fx.corpus, {}, 32, 0, 4), Error);
  EXPECT_THROW(evaluate_weights(fx.model, fx.corpus, {DType::Q8_0, DType::F32, DType::Q8_0}, 32, 0, 4), Error);
  EXPECT_THROW(evaluate_weights(fx.model, fx.corpus, {DType::F32}, 32, 0, 0), Error);
  EXPECT_THROW(evaluate_weights(fx.model, (fx.dir.path / "missing.txt").string(), {DType::F32}, 32, 0, 4), Error);
}
