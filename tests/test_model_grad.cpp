// train/model_grad.h: the loss and every parameter gradient of the whole model.
//
// ModelGrad.FiniteDifferences*: the double gradients (loss_and_grad_arena<double>) against
// finite differences of the loss, for the entry with the largest gradient and random others of
// EVERY tensor, on a small config with every feature on, tied and untied head.
// - Differences: the 4-point central stencil (8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h
//   (truncation ~h^4), h = 1e-3 x the rms of the tensor's values (>= 1e-5), on the long double
//   instantiation of the same forward (loss_only_arena<long double>), as tests/test_grad_mamba.cpp
//   does for the tiny A_log and dt gradients (~1e-10 here). The Mamba path, norms and loss run
//   in long double; the attention/MLP/bridge helpers keep double sums, which left the loss with
//   ~1e-18 noise (~1e-14 on a difference). Not the 2-point h = 1e-5 of the block tests: the
//   embeddings are ~0.02 in scale and feed an RMSNorm, so the loss curves on that scale and the
//   2-point truncation reached 2.5e-7 relative there.
// - Measure (as tests/test_grad_mamba.cpp), per entry: |a - f| / max(|a|, |f|, 1e-6), a the
//   analytic gradient, f the difference: relative above 1e-6, 1e-12 absolute below.
//   Required <= 1e-6; observed worst 1.4e-8 (tied), 3.6e-9 (untied).
//
// The others: loss_only against the inference forward's logits; float against double gradients;
// chunked scan states against full ones; the batch mean, accumulation, thread count; bad input.
// Set HM_GRAD_VERBOSE=1 to print every difference.
#include <gtest/gtest.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "backend/counting_backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/model.h"
#include "train/model_grad.h"
#include "grad_test_util.h"
#include "test_util.h"

using namespace hm;

namespace {

using LD = long double;

using test::randomize_params;

using test::TokenBatch;
using test::make_batch;
using test::arena;
using test::verbose;
using test::OmpThreads;

// `entries(name)`: how many entries of a tensor to check: the one with the largest gradient,
// then random ones.
void check_fd(bool tied, uint64_t seed, const std::function<int(const std::string&)>& entries) {
  const ModelConfig c = test::small_hybrid_config(tied);
  Params p(c);
  randomize_params(p, seed);
  const TokenBatch b = make_batch(2, 6, c.vocab_size, seed + 1);
  const std::vector<double> pd = arena<double>(p);
  std::vector<double> g(pd.size(), 0.0);
  const double loss =
      loss_and_grad_arena<double>(p, pd.data(), g.data(), b.tokens.data(), b.targets.data(), b.B, b.L);
  std::vector<LD> pl(pd.begin(), pd.end());
  // The differences run one thread: hundreds of tiny forwards gain nothing from a team.
  OmpThreads one(1);
  auto f = [&] { return loss_only_arena<LD>(p, pl.data(), b.tokens.data(), b.targets.data(), b.B, b.L); };
  EXPECT_NEAR(double(f()), loss, 1e-13 * loss);

  Rng rng(seed + 2);
  double worst = 0;
  for (size_t k = 0; k < p.specs().size(); ++k) {
    const ParamSpec& s = p.specs()[k];
    const int64_t off = p.at(k) - p.data(), n = s.numel();
    int64_t big = 0;
    double gmax = 0, ss = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double gi = std::fabs(g[size_t(off + i)]);
      if (gi > gmax) gmax = gi, big = i;
      ss += pd[size_t(off + i)] * pd[size_t(off + i)];
    }
    EXPECT_GT(gmax, 0.0) << s.name << ": no gradient at all";
    const LD h = LD(1e-3 * std::max(std::sqrt(ss / double(n)), 1e-2));
    double terr = 0;
    std::vector<int64_t> picks = {big};
    while (int(picks.size()) < std::min<int64_t>(entries(s.name), n)) {
      const int64_t i = int64_t(rng.next_u64() % uint64_t(n));
      if (std::find(picks.begin(), picks.end(), i) == picks.end()) picks.push_back(i);
    }
    for (int64_t i : picks) {
      const size_t j = size_t(off + i);
      const LD keep = pl[j];
      auto at = [&](LD x) {
        pl[j] = keep + x;
        return f();
      };
      const LD d1 = at(h) - at(-h), d2 = at(2 * h) - at(-2 * h);
      pl[j] = keep;
      const double fd = double((8 * d1 - d2) / (12 * h));
      const double a = g[j];
      const double err = std::fabs(a - fd) / std::max({std::fabs(a), std::fabs(fd), 1e-6});
      if (verbose())
        std::printf("  %-45s [%4lld] grad % .6e fd % .6e err %.2e\n", s.name.c_str(), (long long)i, a, fd, err);
      terr = std::max(terr, err);
    }
    EXPECT_LE(terr, 1e-6) << s.name;
    worst = std::max(worst, terr);
  }
  std::printf("  %s head: loss %.6f, worst FD error %.2e over %zu tensors\n", tied ? "tied" : "untied",
              loss, worst, p.specs().size());
}

using test::worst_tensor_err;

}  // namespace

TEST(ModelGrad, FiniteDifferencesTiedHead) {
  check_fd(true, 11, [](const std::string&) { return 3; });
}

// The untied head changes only where the head and embedding gradients go: three entries of those
// and the final norm, the largest-gradient entry of every other tensor (keeps the test fast).
TEST(ModelGrad, FiniteDifferencesUntiedHead) {
  check_fd(false, 12, [](const std::string& name) {
    return name == "lm_head.weight" || name == "backbone.embeddings.weight" ||
                   name == "backbone.norm_f.weight" ? 3 : 1;
  });
}

// loss_only computes the function the inference engine computes: the mean cross-entropy of
// HybridModel::forward's logits (all positions, float32 KV cache), in float, on both backends.
TEST(ModelGrad, LossOnlyMatchesInferenceForward) {
  for (bool tied : {true, false}) {
    ModelConfig c = preset("tiny");
    c.tie_embeddings = tied;
    const TokenBatch b = make_batch(3, 11, c.vocab_size, 21);
    for (auto make : {make_cpu_backend, make_ref_backend}) {
      auto be = make();
      HybridModel m(c, *be);
      randomize_params(m.params(), 22);
      m.prepare();
      const double want = test::inference_mean_loss(m, b.tokens, b.targets, b.B, b.L);
      const double got = loss_only(m.params(), b.tokens.data(), b.targets.data(), b.B, b.L);
      EXPECT_NEAR(got, want, 2e-6 * want) << (tied ? "tied " : "untied ") << be->name();
      std::printf("  %s %s: loss_only %.8f, inference %.8f, rel diff %.1e\n", tied ? "tied" : "untied",
                  be->name().c_str(), got, want, std::fabs(got - want) / want);
      // The training forward returns the same loss.
      Params g(c);
      std::fill(g.data(), g.data() + g.numel(), 0.0f);
      EXPECT_NEAR(loss_and_grad(m.params(), g, b.tokens.data(), b.targets.data(), b.B, b.L), got,
                  1e-6 * got);
    }
  }
}

// Without MLPs each state bridge runs inside the output projection of the layer before it
// (HybridModel::project_out); the training forward keeps its own bridge code, so the two still
// agree only if the folded bridge computes the same thing.
TEST(ModelGrad, FoldedBridgesMatchTrainingForward) {
  ModelConfig c = preset("tiny");
  c.d_ff = 0;
  const TokenBatch b = make_batch(2, 13, c.vocab_size, 31);
  for (auto make : {make_cpu_backend, make_ref_backend}) {
    auto be = make();
    HybridModel m(c, *be);
    randomize_params(m.params(), 32);
    m.prepare();
    int bridges = 0;
    for (int i = 0; i < c.n_layers; ++i) bridges += c.has_bridge(i);
    ASSERT_GT(bridges, 0);
    EXPECT_EQ(m.folded_bridges(), bridges) << be->name();
    const double want = test::inference_mean_loss(m, b.tokens, b.targets, b.B, b.L);
    const double got = loss_only(m.params(), b.tokens.data(), b.targets.data(), b.B, b.L);
    EXPECT_NEAR(got, want, 2e-6 * want) << be->name();
  }
  c.d_ff = 64;  // an MLP between a layer's output and the next layer's bridge: nothing folds
  auto be = make_cpu_backend();
  HybridModel m(c, *be);
  m.prepare();
  EXPECT_EQ(m.folded_bridges(), 0);
}

// The float gradients (double sums, float storage) against the double ones on the tiny preset
// (M A M A, bridges in front of 1, 2, 3) with nonzero gates. Per tensor max |f - d| / max |d|:
// observed 1.9e-6 (the float path sums in float through sgemm).
TEST(ModelGrad, FloatGradientsMatchDouble) {
  const ModelConfig c = preset("tiny");
  Params p(c), gf(c), gd(c);
  randomize_params(p, 31);
  const TokenBatch b = make_batch(2, 12, c.vocab_size, 32);
  std::fill(gf.data(), gf.data() + gf.numel(), 0.0f);
  std::fill(gd.data(), gd.data() + gd.numel(), 0.0f);
  const double lf = loss_and_grad(p, gf, b.tokens.data(), b.targets.data(), b.B, b.L);
  const double ld = loss_and_grad_f64(p, gd, b.tokens.data(), b.targets.data(), b.B, b.L);
  EXPECT_NEAR(lf, ld, 1e-6 * ld);
  const auto [err, name] = worst_tensor_err(p, gf.data(), gd.data());
  std::printf("  float vs double: loss %.8f vs %.8f; worst tensor %s: %.2e\n", lf, ld, name.c_str(), err);
  EXPECT_LE(err, 1e-5) << name;
}

// Keeping only every k-th scan state and recomputing the rest gives the same gradients.
TEST(ModelGrad, ChunkedScanGivesSameGradients) {
  const ModelConfig c = test::small_hybrid_config(true);
  Params p(c);
  randomize_params(p, 41);
  const TokenBatch b = make_batch(2, 9, c.vocab_size, 42);
  const std::vector<double> pd = arena<double>(p);
  std::vector<double> g0(pd.size(), 0.0);
  const double l0 = loss_and_grad_arena<double>(p, pd.data(), g0.data(), b.tokens.data(),
                                                b.targets.data(), b.B, b.L, 0);
  for (int chunk : {1, 4, 9, 20}) {
    std::vector<double> g(pd.size(), 0.0);
    const double l = loss_and_grad_arena<double>(p, pd.data(), g.data(), b.tokens.data(),
                                                 b.targets.data(), b.B, b.L, chunk);
    EXPECT_EQ(l, l0) << chunk;
    const auto [err, name] = worst_tensor_err(p, g.data(), g0.data());
    EXPECT_LE(err, 1e-13) << "chunk " << chunk << ": " << name;
  }
  // And in float through the public entry point.
  Params a(c), bb(c);
  std::fill(a.data(), a.data() + a.numel(), 0.0f);
  std::fill(bb.data(), bb.data() + bb.numel(), 0.0f);
  loss_and_grad(p, a, b.tokens.data(), b.targets.data(), b.B, b.L, 0);
  loss_and_grad(p, bb, b.tokens.data(), b.targets.data(), b.B, b.L, 4);
  const auto [errf, namef] = worst_tensor_err(p, bb.data(), a.data());
  EXPECT_LE(errf, 1e-6) << namef;
}

// Gradient checkpointing re-runs each layer's forward with the same code on the same input, so
// loss and every gradient entry are bit-identical to the path that keeps all activations: tied
// and untied heads, bridges both ways, with and without the MLP, a model whose first layer is
// attention, float (fast blocks) and double (reference), with the chunked scan too, 1 or 2
// threads. And it holds fewer activation bytes.
template <class T> void check_ckpt_identical(const ModelConfig& c, int chunk, uint64_t seed) {
  Params p(c);
  randomize_params(p, seed);
  const TokenBatch b = make_batch(3, 11, c.vocab_size, seed + 1);
  const std::vector<T> pa = arena<T>(p);
  for (int threads : {1, 2}) {
    const OmpThreads omp(threads);
    std::vector<T> g0(pa.size(), T(0)), g1(pa.size(), T(0));
    reset_grad_activation_peak_bytes();
    const double l0 = loss_and_grad_arena<T>(p, pa.data(), g0.data(), b.tokens.data(),
                                             b.targets.data(), b.B, b.L, chunk, false);
    const int64_t bytes0 = grad_activation_peak_bytes();
    reset_grad_activation_peak_bytes();
    const double l1 = loss_and_grad_arena<T>(p, pa.data(), g1.data(), b.tokens.data(),
                                             b.targets.data(), b.B, b.L, chunk, true);
    const int64_t bytes1 = grad_activation_peak_bytes();
    EXPECT_EQ(l1, l0) << "chunk " << chunk << ", threads " << threads;
    size_t diff = 0;
    while (diff < g0.size() && g0[diff] == g1[diff]) ++diff;
    EXPECT_EQ(diff, g0.size()) << "first differing gradient entry; chunk " << chunk;
    EXPECT_GT(bytes1, 0);
    EXPECT_LT(bytes1, bytes0);
  }
}

TEST(ModelGrad, GradCheckpointingIsBitIdentical) {
  ModelConfig no_mlp = test::small_hybrid_config(false);
  no_mlp.d_ff = 0;
  ModelConfig attn_first = test::small_hybrid_config(true);
  attn_first.attention_layers = {0, 3};
  ModelConfig no_bridges = test::small_hybrid_config(false);
  no_bridges.state_bridges = false;
  validate(no_mlp);
  validate(attn_first);
  validate(no_bridges);
  uint64_t seed = 300;
  for (const ModelConfig& c : {test::small_hybrid_config(true), test::small_hybrid_config(false), no_mlp, attn_first,
                               no_bridges, preset("tiny")}) {
    for (int chunk : {0, 4}) {
      SCOPED_TRACE("layers " + std::to_string(c.n_layers) + ", d_ff " + std::to_string(c.d_ff) +
                   ", tied " + std::to_string(c.tie_embeddings) + ", chunk " +
                   std::to_string(chunk));
      check_ckpt_identical<float>(c, chunk, seed += 2);
      check_ckpt_identical<double>(c, chunk, seed += 2);
    }
  }
  // The public entry points forward the flag.
  const ModelConfig c = test::small_hybrid_config(true);
  Params p(c), a(c), bb(c), ad(c), bd(c);
  randomize_params(p, 77);
  const TokenBatch b = make_batch(2, 10, c.vocab_size, 78);
  for (Params* q : {&a, &bb, &ad, &bd}) std::fill(q->data(), q->data() + q->numel(), 0.0f);
  EXPECT_EQ(loss_and_grad(p, a, b.tokens.data(), b.targets.data(), b.B, b.L, 0, false),
            loss_and_grad(p, bb, b.tokens.data(), b.targets.data(), b.B, b.L, 0, true));
  EXPECT_EQ(std::vector<float>(a.data(), a.data() + a.numel()),
            std::vector<float>(bb.data(), bb.data() + bb.numel()));
  EXPECT_EQ(loss_and_grad_f64(p, ad, b.tokens.data(), b.targets.data(), b.B, b.L, 0, false),
            loss_and_grad_f64(p, bd, b.tokens.data(), b.targets.data(), b.B, b.L, 0, true));
  EXPECT_EQ(std::vector<float>(ad.data(), ad.data() + ad.numel()),
            std::vector<float>(bd.data(), bd.data() + bd.numel()));
}

// The batch loss is the mean over all counted positions of all sequences (not a mean of
// per-sequence means), gradients add into grads, a sequence without targets contributes
// nothing, and the thread count does not change the result.
TEST(ModelGrad, BatchMeanAccumulationAndThreads) {
  const ModelConfig c = test::small_hybrid_config(false);
  Params p(c);
  randomize_params(p, 51);
  TokenBatch b = make_batch(3, 8, c.vocab_size, 52);
  for (int t = 2; t < b.L; ++t) b.targets[size_t(t)] = -1;  // sequence 0 counts 2 positions only
  const int L = b.L;
  const std::vector<double> pd = arena<double>(p);
  const size_t n = pd.size();
  auto run = [&](int first, int count, std::vector<double>& g) {
    return loss_and_grad_arena<double>(p, pd.data(), g.data(), b.tokens.data() + first * L,
                                       b.targets.data() + first * L, count, L);
  };
  std::vector<double> g_all(n, 0.0), g_parts(n, 0.0), g_one(n, 0.0);
  const double l_all = run(0, 3, g_all);
  int cnt[3] = {0, 0, 0};
  for (int s = 0; s < 3; ++s)
    for (int t = 0; t < L; ++t) cnt[s] += b.targets[size_t(s * L + t)] >= 0;
  const int total = cnt[0] + cnt[1] + cnt[2];
  double l_mix = 0;
  for (int s = 0; s < 3; ++s) {
    std::fill(g_one.begin(), g_one.end(), 0.0);
    l_mix += run(s, 1, g_one) * cnt[s] / total;
    for (size_t i = 0; i < n; ++i) g_parts[i] += g_one[i] * cnt[s] / total;
  }
  EXPECT_NEAR(l_all, l_mix, 1e-14 * l_all);
  EXPECT_LE(worst_tensor_err(p, g_parts.data(), g_all.data()).first, 1e-12);

  // += : a second call adds the same gradient again.
  std::vector<double> g_twice = g_all;
  run(0, 3, g_twice);
  for (size_t i = 0; i < n; ++i) EXPECT_NEAR(g_twice[i], 2 * g_all[i], 1e-15 + 1e-14 * std::fabs(g_all[i]));

  // No counted target anywhere: loss 0, grads untouched; an all-ignored sequence adds nothing.
  TokenBatch none = b;
  std::fill(none.targets.begin(), none.targets.end(), -1);
  std::vector<double> g_none(n, 1.5);
  EXPECT_EQ(loss_and_grad_arena<double>(p, pd.data(), g_none.data(), none.tokens.data(),
                                        none.targets.data(), 3, L), 0.0);
  EXPECT_TRUE(std::all_of(g_none.begin(), g_none.end(), [](double v) { return v == 1.5; }));
  EXPECT_EQ(loss_only(p, none.tokens.data(), none.targets.data(), 3, L), 0.0);

  // One thread or several: the same numbers (thread buffers are summed in a fixed order, and
  // with at most two threads that order does not change the sum).
  std::vector<double> g1(n, 0.0), g2(n, 0.0);
  double l1, l2;
  {
    OmpThreads t(1);
    l1 = run(0, 3, g1);
  }
  {
    OmpThreads t(2);
    l2 = run(0, 3, g2);
  }
  EXPECT_EQ(l1, l2);
  EXPECT_LE(worst_tensor_err(p, g1.data(), g2.data()).first, 1e-14);
}

TEST(ModelGrad, BadInputIsAnError) {
  const ModelConfig c = test::small_hybrid_config(true);
  Params p(c), g(c);
  randomize_params(p, 61);
  std::vector<int32_t> tok = {1, 2, 3}, tgt = {2, 3, -1};
  tok[1] = c.vocab_size;
  EXPECT_THROW(loss_and_grad(p, g, tok.data(), tgt.data(), 1, 3), hm::Error);
  EXPECT_THROW(loss_only(p, tok.data(), tgt.data(), 1, 3), hm::Error);
  tok[1] = 2;
  tgt[0] = -2;
  EXPECT_THROW(loss_and_grad(p, g, tok.data(), tgt.data(), 1, 3), hm::Error);
  tgt[0] = c.vocab_size;
  EXPECT_THROW(loss_only(p, tok.data(), tgt.data(), 1, 3), hm::Error);
  tgt[0] = 2;
  EXPECT_THROW(loss_and_grad(p, g, tok.data(), tgt.data(), 1, 3, -1), hm::Error);
  EXPECT_THROW(loss_and_grad(p, g, tok.data(), tgt.data(), 0, 3), hm::Error);
}

// The fast float path (sgemm products, row-blocked LM head of 64 rows: L = 70 gives a full
// block and a partial one) against the plain double reference, on the tiny preset (V = 300,
// MLP, GQA, bridges), tied and untied, with and without chunked scan states. Per tensor
// max |f - d| / max |d| <= 1e-4.
TEST(ModelGrad, FastFloatMatchesDoubleReference) {
  for (bool tied : {true, false}) {
    ModelConfig c = preset("tiny");
    c.tie_embeddings = tied;
    Params p(c);
    randomize_params(p, 71);
    // Built here rather than by make_batch: one more call of it changes g++ 12's inlining in
    // BatchMeanAccumulationAndThreads into a -Wfree-nonheap-object false positive.
    const int B = 3, L = 70;
    std::vector<int32_t> tok(size_t(B) * L), tgt(size_t(B) * L);
    Rng rng(72);
    for (auto& t : tok) t = int32_t(rng.next_u64() % uint64_t(c.vocab_size));
    for (size_t i = 0; i < tok.size(); ++i) tgt[i] = (i + 1) % size_t(L) ? tok[i + 1] : -1;
    tgt[5] = tgt[100] = -1;  // ignored positions inside a row block too
    // The double reference, its gradients rounded once to float (6e-8, far below the bound).
    Params gd(c);
    std::fill(gd.data(), gd.data() + gd.numel(), 0.0f);
    const double ld = loss_and_grad_f64(p, gd, tok.data(), tgt.data(), B, L);
    for (int chunk : {0, 16}) {
      Params gf(c);
      std::fill(gf.data(), gf.data() + gf.numel(), 0.0f);
      const double lf = loss_and_grad(p, gf, tok.data(), tgt.data(), B, L, chunk);
      EXPECT_NEAR(lf, ld, 1e-5 * ld);
      const auto [err, name] = worst_tensor_err(p, gf.data(), gd.data());
      std::printf("  fast float vs double (tied %d, chunk %d): loss %.8f vs %.8f; worst %s: %.2e\n",
                  int(tied), chunk, lf, ld, name.c_str(), err);
      EXPECT_LE(err, 1e-4) << name;
    }
  }
}

// The float path is one layer code on the backend interface: run on the ref backend instead of
// the CPU's it computes the same loss and gradients (to float rounding), and a CountingBackend
// around the CPU's sees every training op once per layer and sequence, and the same results bit
// for bit. Mamba, attention with RoPE and GQA, MLP, bridges both ways, tied head.
TEST(ModelGrad, FloatPathRunsOnTheBackend) {
  const ModelConfig c = test::small_hybrid_config(true);
  Params p(c);
  randomize_params(p, 81);
  const TokenBatch b = make_batch(2, 9, c.vocab_size, 82);
  const OmpThreads one(1);  // CountingBackend counts from one thread
  auto grads = [&](Backend* be) {
    set_train_backend(be);
    Params g(c);
    std::fill(g.data(), g.data() + g.numel(), 0.0f);
    const double loss = loss_and_grad(p, g, b.tokens.data(), b.targets.data(), b.B, b.L);
    set_train_backend(nullptr);
    return std::make_pair(loss, arena<float>(g));
  };
  const auto [l_cpu, g_cpu] = grads(nullptr);
  auto ref = make_ref_backend();
  const auto [l_ref, g_ref] = grads(ref.get());
  EXPECT_NEAR(l_ref, l_cpu, 1e-6 * l_cpu);
  const auto [err, name] = worst_tensor_err(p, g_ref.data(), g_cpu.data());
  std::printf("  ref backend vs cpu backend: worst tensor %s: %.2e\n", name.c_str(), err);
  EXPECT_LE(err, 1e-5) << name;

  auto cpu = make_cpu_backend();
  CountingBackend counted(*cpu);
  const auto [l_cnt, g_cnt] = grads(&counted);
  EXPECT_EQ(l_cnt, l_cpu);
  EXPECT_EQ(g_cnt, g_cpu);
  const int64_t seqs = b.B, mamba = 2, attn = 2;  // small_config: M A A M
  EXPECT_EQ(counted.count(OpKind::ConvTrain).calls, mamba * seqs);
  EXPECT_EQ(counted.count(OpKind::ConvBackward).calls, mamba * seqs);
  EXPECT_EQ(counted.count(OpKind::ScanTrain).calls, mamba * seqs);
  EXPECT_EQ(counted.count(OpKind::ScanBackward).calls, mamba * seqs);
  EXPECT_EQ(counted.count(OpKind::AttentionTrain).calls, attn * seqs);
  EXPECT_EQ(counted.count(OpKind::AttentionBackward).calls, attn * seqs);
  EXPECT_EQ(counted.count(OpKind::RopeBackward).calls, 2 * attn * seqs);  // q and k
  EXPECT_EQ(counted.count(OpKind::SwigluBackward).calls, c.n_layers * seqs);
  EXPECT_EQ(counted.count(OpKind::CrossEntropyHead).calls, seqs);
  EXPECT_EQ(counted.count(OpKind::EmbeddingBackward).calls, seqs);
  // Norms: each layer's two, the final one and the two bridges' (layers 1 and 3).
  EXPECT_EQ(counted.count(OpKind::RmsnormBackward).calls, (2 * c.n_layers + 1 + 2) * seqs);
  EXPECT_GT(counted.count(OpKind::LinearBackward).flops, 0.0);
}
