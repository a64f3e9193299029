// train/model_grad.cpp on True Hybrid models (docs/TRUE_HYBRID.md): the router, both paths on
// their compacted sequences, the exchange, the gates and the budget loss.
//
// TrueHybridGrad.FiniteDifferences*: on preset("true-tiny") (Mamba, true, Mamba, attention with a
// bridge, true) with the true layers' tensors moved off their inits, the double gradients
// (loss_and_grad_arena<double>) against finite differences of the FULL objective,
// cross-entropy + budget loss, in long double (loss_only_arena<long double>, LossAux), with
// tests/test_model_grad.cpp's stencil, step and measure: 2 entries (the largest gradient and a
// random one) of every tensor of the true layers, the largest-gradient entry of every other
// tensor. Required <= 1e-6. The novelty feature's weight is 0 there (see check_fd: features are
// detached by design, so only then is the analytic gradient the exact one). Hard mode: every logit is checked to keep its sign under every step (the
// routes, so the function differenced, do not change) and to stay away from 0 at the base point.
// The others: float fast path vs double, checkpointing bit-identical, returned loss vs
// loss_only, the budget loss's value and weighting, and that hard routing really skips a path.
// Set HM_GRAD_VERBOSE=1 to print every difference.
#include <gtest/gtest.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "core/rng.h"
#include "model/model.h"
#include "model/params.h"
#include "train/model_grad.h"
#include "grad_test_util.h"
#include "test_util.h"

using namespace hm;

namespace {

using LD = long double;

bool has(const std::string& n, const std::string& s) { return n.find(s) != std::string::npos; }

// true-tiny with a routing mode and granularity. The budget's weight and target are raised
// from the defaults so the budget term's gradient is not lost next to the cross-entropy's.
ModelConfig true_tiny(const std::string& mode, const std::string& gran = "token") {
  ModelConfig c = preset("true-tiny");
  c.routing_mode = mode;
  c.routing_granularity = gran;
  c.attention_budget = 0.3f;
  c.budget_loss_weight = 0.5f;
  validate(c);
  return c;
}

using test::randomize_params;

using test::TokenBatch;
using test::make_batch;
using test::arena;
using test::verbose;
using test::OmpThreads;

bool in_true_layer(const ModelConfig& c, const std::string& name) {
  for (int i : c.true_layers)
    if (has(name, "layers." + std::to_string(i) + ".")) return true;
  return false;
}

double min_abs(const std::vector<double>& v) {
  double m = std::numeric_limits<double>::infinity();
  for (double x : v) m = std::min(m, std::fabs(x));
  return m;
}

float* tensor(Params& p, int layer, const std::string& rest) {
  return p.get("backbone.layers." + std::to_string(layer) + "." + rest);
}

// The FD check described at the top.
void check_fd(const ModelConfig& c, uint64_t seed) {
  Params p(c);
  randomize_params(p, seed);
  // The analyzer's features are measurements that carry no gradient (docs/TRUE_HYBRID.md): the
  // novelty 1 - cos(u_t, m_{t-1}) depends on u, but the training gradient leaves that path out
  // by design, so finite differences would see a term the analytic gradient does not have.
  // Its weight is 0 here, which makes the two the same function's; the weight's own gradient
  // (sum of dL/ds_t * novelty_t) is still checked. The position feature does not depend on u.
  for (int i : c.true_layers) tensor(p, i, "mixer.router.feat_weight")[0] = 0.0f;
  const TokenBatch b = make_batch(2, 8, c.vocab_size, seed + 1);
  const std::vector<double> pd = arena<double>(p);
  std::vector<double> g(pd.size(), 0.0);
  double aux = -1;
  const double loss = loss_and_grad_arena<double>(p, pd.data(), g.data(), b.tokens.data(),
                                                  b.targets.data(), b.B, b.L, 0, false, &aux);
  const bool hard = c.routing_mode == "hard", both = c.routing_mode == "both";
  std::vector<LD> pl(pd.begin(), pd.end());
  OmpThreads one(1);
  LossAux la;
  la.want_logits = true;
  auto f = [&] {
    const LD ce = loss_only_arena<LD>(p, pl.data(), b.tokens.data(), b.targets.data(), b.B, b.L, &la);
    return ce + la.budget_loss;
  };
  const LD f0 = f();
  EXPECT_NEAR(double(f0), loss + aux, 1e-13 * loss);
  if (both) {
    EXPECT_EQ(aux, 0.0);
  } else {
    EXPECT_GT(aux, 1e-4);  // the budget term is really part of what is checked
  }
  const std::vector<double> logits0 = la.logits;
  ASSERT_EQ(logits0.size(), size_t(b.B) * c.true_layers.size() * size_t(b.L));
  if (hard) {
    // The check is of the exact gradient of the hard forward: no logit near the threshold (a
    // step of 1e-3 x a tensor's rms moved logits by < 0.01 here; that no route changed under
    // any step is checked below), and in every sequence and true layer both paths run (each gets
    // a non-trivial gradient).
    EXPECT_GT(min_abs(logits0), 0.05);
    for (size_t s = 0; s < logits0.size(); s += size_t(b.L)) {
      const auto first = logits0.begin() + ptrdiff_t(s), last = first + b.L;
      EXPECT_TRUE(std::any_of(first, last, [](double r) { return r > 0; })) << s;
      EXPECT_TRUE(std::any_of(first, last, [](double r) { return r < 0; })) << s;
    }
  }
  int sign_changes = 0;
  Rng rng(seed + 2);
  double worst = 0;
  for (size_t k = 0; k < p.specs().size(); ++k) {
    const ParamSpec& s = p.specs()[k];
    const int64_t off = p.at(k) - p.data(), n = s.numel();
    const bool router = has(s.name, "router.");
    int64_t big = 0;
    double gmax = 0, ss = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double gi = std::fabs(g[size_t(off + i)]);
      if (gi > gmax) gmax = gi, big = i;
      ss += pd[size_t(off + i)] * pd[size_t(off + i)];
    }
    // "both": the gates are constants and there is no budget, so the router gets nothing.
    if (both && router) {
      EXPECT_EQ(gmax, 0.0) << s.name;
    } else {
      EXPECT_GT(gmax, 0.0) << s.name << ": no gradient at all";
    }
    const LD h = LD(1e-3 * std::max(std::sqrt(ss / double(n)), 1e-2));
    const int want = in_true_layer(c, s.name) ? 2 : 1;
    std::vector<int64_t> picks = {big};
    while (int(picks.size()) < std::min<int64_t>(want, n)) {
      const int64_t i = int64_t(rng.next_u64() % uint64_t(n));
      if (std::find(picks.begin(), picks.end(), i) == picks.end()) picks.push_back(i);
    }
    double terr = 0;
    for (int64_t i : picks) {
      const size_t j = size_t(off + i);
      const LD keep = pl[j];
      auto at = [&](LD x) {
        pl[j] = keep + x;
        const LD v = f();
        for (size_t q = 0; q < logits0.size(); ++q)
          sign_changes += (la.logits[q] > 0) != (logits0[q] > 0);
        return v;
      };
      const LD d1 = at(h) - at(-h), d2 = at(2 * h) - at(-2 * h);
      pl[j] = keep;
      const double fd = double((8 * d1 - d2) / (12 * h));
      const double a = g[j];
      if (both && router) {
        EXPECT_EQ(fd, 0.0) << s.name;  // the loss does not depend on the router at all
        continue;
      }
      const double err = std::fabs(a - fd) / std::max({std::fabs(a), std::fabs(fd), 1e-6});
      if (verbose())
        std::printf("  %-45s [%4lld] grad % .6e fd % .6e err %.2e\n", s.name.c_str(), (long long)i, a, fd, err);
      terr = std::max(terr, err);
    }
    EXPECT_LE(terr, 1e-6) << s.name;
    worst = std::max(worst, terr);
  }
  if (hard) {
    EXPECT_EQ(sign_changes, 0) << "a route changed under a finite-difference step";
  }
  std::printf("  %s/%s: loss %.6f + budget %.6f, min |r| %.3g, worst FD error %.2e over %zu tensors\n",
              c.routing_mode.c_str(), c.routing_granularity.c_str(), loss, aux, min_abs(logits0),
              worst, p.specs().size());
}

using test::worst_tensor_err;

}  // namespace

TEST(TrueHybridGrad, FiniteDifferencesSoftToken) { check_fd(true_tiny("soft", "token"), 101); }
TEST(TrueHybridGrad, FiniteDifferencesSoftChunk) { check_fd(true_tiny("soft", "chunk"), 111); }
// Seeds chosen so every logit is at least 0.05 from 0, each sequence uses both paths in each true
// layer (both asserted in check_fd), and some attention path holds 2 tokens or more (with one,
// softmax is 1 and q, k get no gradient) and follows a Mamba token (else the exchange gets none).
TEST(TrueHybridGrad, FiniteDifferencesHardToken) { check_fd(true_tiny("hard", "token"), 231); }
TEST(TrueHybridGrad, FiniteDifferencesHardChunk) { check_fd(true_tiny("hard", "chunk"), 821); }
TEST(TrueHybridGrad, FiniteDifferencesBoth) { check_fd(true_tiny("both", "token"), 141); }

// The fast float path (sgemm blocks on the compacted sequences) against the double reference:
// per tensor max |f - d| / max |d| <= 1e-4, as ModelGrad.FastFloatMatchesDoubleReference. L = 70
// gives each path's compacted sequence a length of its own. Hard mode: the float and double
// forwards must make the same routes, so no logit may sit within float rounding of 0.
TEST(TrueHybridGrad, FastFloatMatchesDoubleReference) {
  uint64_t seed = 200;
  for (const char* mode : {"soft", "hard"}) {
    for (const char* gran : {"token", "chunk"}) {
      const ModelConfig c = true_tiny(mode, gran);
      Params p(c);
      randomize_params(p, seed += 3);
      const TokenBatch b = make_batch(3, 70, c.vocab_size, seed + 1);
      LossAux la;
      la.want_logits = true;
      const std::vector<double> pd = arena<double>(p);
      loss_only_arena<double>(p, pd.data(), b.tokens.data(), b.targets.data(), b.B, b.L, &la);
      if (std::string(mode) == "hard") {
        ASSERT_GT(min_abs(la.logits), 1e-4) << gran;
      }
      Params gd(c), gf(c);
      std::fill(gd.data(), gd.data() + gd.numel(), 0.0f);
      std::fill(gf.data(), gf.data() + gf.numel(), 0.0f);
      double auxd = 0, auxf = 0;
      const double ld = loss_and_grad_f64(p, gd, b.tokens.data(), b.targets.data(), b.B, b.L, 0, false, &auxd);
      const double lf = loss_and_grad(p, gf, b.tokens.data(), b.targets.data(), b.B, b.L, 0, false, &auxf);
      EXPECT_NEAR(lf, ld, 1e-5 * ld);
      EXPECT_NEAR(auxf, auxd, 1e-5 * auxd);
      const auto [err, name] = worst_tensor_err(p, gf.data(), gd.data());
      std::printf("  fast float vs double (%s/%s): loss %.8f vs %.8f, budget %.3e; worst %s: %.2e\n",
                  mode, gran, lf, ld, auxd, name.c_str(), err);
      EXPECT_LE(err, 1e-4) << mode << "/" << gran << ": " << name;
    }
  }
}

// Checkpointing re-runs true layers with the same code: loss, budget and every gradient entry
// bit-identical, in each mode, float and double, chunked scan too, 1 and 2 threads; fewer bytes.
template <class T> void check_ckpt_identical(const ModelConfig& c, int chunk, uint64_t seed) {
  Params p(c);
  randomize_params(p, seed);
  const TokenBatch b = make_batch(3, 11, c.vocab_size, seed + 1);
  const std::vector<T> pa = arena<T>(p);
  for (int threads : {1, 2}) {
    const OmpThreads omp(threads);
    std::vector<T> g0(pa.size(), T(0)), g1(pa.size(), T(0));
    double a0 = -1, a1 = -2;
    reset_grad_activation_peak_bytes();
    const double l0 = loss_and_grad_arena<T>(p, pa.data(), g0.data(), b.tokens.data(),
                                             b.targets.data(), b.B, b.L, chunk, false, &a0);
    const int64_t bytes0 = grad_activation_peak_bytes();
    reset_grad_activation_peak_bytes();
    const double l1 = loss_and_grad_arena<T>(p, pa.data(), g1.data(), b.tokens.data(),
                                             b.targets.data(), b.B, b.L, chunk, true, &a1);
    const int64_t bytes1 = grad_activation_peak_bytes();
    EXPECT_EQ(l1, l0) << "threads " << threads;
    EXPECT_EQ(a1, a0) << "threads " << threads;
    size_t diff = 0;
    while (diff < g0.size() && g0[diff] == g1[diff]) ++diff;
    EXPECT_EQ(diff, g0.size()) << "first differing gradient entry; threads " << threads;
    EXPECT_LT(bytes1, bytes0);
  }
}

TEST(TrueHybridGrad, GradCheckpointingIsBitIdentical) {
  uint64_t seed = 300;
  for (const char* mode : {"soft", "hard", "both"})
    for (int chunk : {0, 4}) {
      SCOPED_TRACE(std::string(mode) + ", scan chunk " + std::to_string(chunk));
      check_ckpt_identical<float>(true_tiny(mode, "chunk"), chunk, seed += 2);
      check_ckpt_identical<double>(true_tiny(mode, "token"), chunk, seed += 2);
    }
}

// The training forward computes the function inference computes: loss_only (float) against the
// mean cross-entropy of HybridModel::forward's logits (float32 KV cache) on both backends, in
// every routing mode. Hard mode: no logit within 1e-3 of 0, so rounding cannot flip a route.
TEST(TrueHybridGrad, LossOnlyMatchesInferenceForward) {
  uint64_t seed = 700;
  for (const char* mode : {"soft", "hard", "both"})
    for (const char* gran : {"token", "chunk"}) {
      const ModelConfig c = true_tiny(mode, gran);
      Rng rng(seed += 2);
      const int B = 2, L = 19;
      std::vector<int32_t> tok(size_t(B) * L), tgt(size_t(B) * L);
      for (auto& t : tok) t = int32_t(rng.next_u64() % uint64_t(c.vocab_size));
      for (size_t i = 0; i < tok.size(); ++i) tgt[i] = (i + 1) % size_t(L) ? tok[i + 1] : -1;
      for (auto make : {make_cpu_backend, make_ref_backend}) {
        auto be = make();
        HybridModel m(c, *be);
        randomize_params(m.params(), seed + 1);
        m.prepare();
        LossAux la;
        la.want_logits = true;
        const double got = double(loss_only_arena<float>(m.params(), m.params().data(), tok.data(),
                                                         tgt.data(), B, L, &la));
        if (std::string(mode) == "hard") {
          ASSERT_GT(min_abs(la.logits), 1e-3) << gran;
        }
        HybridMemory mem(*be, c, B, L, KvType::F32);
        hm::Batch batch;
        batch.logits_all = true;
        for (int s = 0; s < B; ++s)
          batch.add(s, std::vector<int32_t>(tok.begin() + s * L, tok.begin() + (s + 1) * L));
        std::vector<float> logits;
        m.forward(batch, mem, logits);
        const int V = c.vocab_size;
        double want = 0;
        int count = 0;
        for (size_t i = 0; i < tgt.size(); ++i) {
          if (tgt[i] < 0) continue;
          const float* z = logits.data() + i * size_t(V);
          const double mx = *std::max_element(z, z + V);
          double se = 0;
          for (int v = 0; v < V; ++v) se += std::exp(double(z[v]) - mx);
          want += mx + std::log(se) - z[tgt[i]];
          ++count;
        }
        want /= count;
        EXPECT_NEAR(got, want, 2e-6 * want) << mode << "/" << gran << " " << be->name();
        std::printf("  %s/%s %s: loss_only %.8f, inference %.8f, rel diff %.1e\n", mode, gran,
                    be->name().c_str(), got, want, std::fabs(got - want) / want);
      }
    }
}

// The returned loss is the cross-entropy alone, the loss_only of the same model; the budget
// term comes back separately and is the same in both.
TEST(TrueHybridGrad, ReturnedLossIsCrossEntropyAndMatchesLossOnly) {
  for (const char* mode : {"soft", "hard"}) {
    const ModelConfig c = true_tiny(mode);
    Params p(c), g(c);
    randomize_params(p, 401);
    std::fill(g.data(), g.data() + g.numel(), 0.0f);
    const TokenBatch b = make_batch(3, 17, c.vocab_size, 402);
    double aux_g = -1, aux_o = -2;
    const double lg = loss_and_grad(p, g, b.tokens.data(), b.targets.data(), b.B, b.L, 0, false, &aux_g);
    const double lo = loss_only(p, b.tokens.data(), b.targets.data(), b.B, b.L, &aux_o);
    EXPECT_NEAR(lg, lo, 1e-6 * lo) << mode;
    EXPECT_NEAR(aux_g, aux_o, 1e-12 * aux_o) << mode;
    EXPECT_GT(aux_g, 0.0) << mode;
    // Without the out-parameters the same numbers (defaults keep the old signature working).
    EXPECT_EQ(loss_only(p, b.tokens.data(), b.targets.data(), b.B, b.L), lo);
  }
  // A Simple Hybrid model has no budget term.
  const ModelConfig c = preset("tiny");
  Params p(c), g(c);
  init_params(p, 403);
  std::fill(g.data(), g.data() + g.numel(), 0.0f);
  const TokenBatch b = make_batch(2, 9, c.vocab_size, 404);
  double aux = -1;
  loss_and_grad(p, g, b.tokens.data(), b.targets.data(), b.B, b.L, 0, false, &aux);
  EXPECT_EQ(aux, 0.0);
}

// The budget loss's value from the routing logits, computed here independently: per sequence
// and true layer w * (mean_t sigmoid(r_t) - budget)^2, summed over layers, each sequence
// weighted by its counted positions / the batch's. "both" has none; chunk logits are constant
// over each chunk. And a batch's objective is the count-weighted mix of its sequences'.
TEST(TrueHybridGrad, BudgetLossValue) {
  for (const char* mode : {"soft", "hard", "both"})
    for (const char* gran : {"token", "chunk"}) {
      const ModelConfig c = true_tiny(mode, gran);
      Params p(c), g(c);
      randomize_params(p, 501);
      std::fill(g.data(), g.data() + g.numel(), 0.0f);
      TokenBatch b = make_batch(3, 13, c.vocab_size, 502);
      for (int t = 3; t < b.L; ++t) b.targets[size_t(t)] = -1;  // sequence 0 counts 3 positions
      LossAux la;
      la.want_logits = true;
      const std::vector<double> pd = arena<double>(p);
      loss_only_arena<double>(p, pd.data(), b.tokens.data(), b.targets.data(), b.B, b.L, &la);
      const int nl = int(c.true_layers.size());
      ASSERT_EQ(la.logits.size(), size_t(b.B * nl * b.L));
      int cnt[3] = {0, 0, 0}, total = 0;
      for (int s = 0; s < b.B; ++s)
        for (int t = 0; t < b.L; ++t) cnt[s] += b.targets[size_t(s * b.L + t)] >= 0;
      for (int s = 0; s < b.B; ++s) total += cnt[s];
      double want = 0;
      for (int s = 0; s < b.B; ++s)
        for (int l = 0; l < nl; ++l) {
          const double* r = la.logits.data() + size_t((s * nl + l) * b.L);
          double pm = 0;
          for (int t = 0; t < b.L; ++t) {
            pm += 1 / (1 + std::exp(-r[t]));
            if (std::string(gran) == "chunk") {
              EXPECT_EQ(r[t], r[t / c.routing_chunk * c.routing_chunk]);
            }
          }
          pm /= b.L;
          want += double(cnt[s]) / total * c.budget_loss_weight *
                  (pm - c.attention_budget) * (pm - c.attention_budget);
        }
      double got = -1;
      loss_and_grad_f64(p, g, b.tokens.data(), b.targets.data(), b.B, b.L, 0, false, &got);
      if (std::string(mode) == "both") {
        EXPECT_EQ(got, 0.0);
        EXPECT_EQ(double(la.budget_loss), 0.0);
        continue;
      }
      EXPECT_NEAR(got, want, 1e-12 * want) << mode << "/" << gran;
      EXPECT_NEAR(double(la.budget_loss), want, 1e-12 * want) << mode << "/" << gran;
      EXPECT_GT(want, 1e-4);
      // The objective (cross-entropy + budget) and its gradient mix over sequences by count.
      const size_t n = pd.size();
      std::vector<double> g_all(n, 0.0), g_mix(n, 0.0), g_one(n, 0.0);
      double aux_all = 0;
      const double l_all = loss_and_grad_arena<double>(p, pd.data(), g_all.data(), b.tokens.data(),
                                                       b.targets.data(), b.B, b.L, 0, false, &aux_all);
      double obj_mix = 0;
      for (int s = 0; s < b.B; ++s) {
        std::fill(g_one.begin(), g_one.end(), 0.0);
        double aux_s = 0;
        const double l_s = loss_and_grad_arena<double>(p, pd.data(), g_one.data(),
                                                       b.tokens.data() + s * b.L,
                                                       b.targets.data() + s * b.L, 1, b.L, 0,
                                                       false, &aux_s);
        const double w = double(cnt[s]) / total;
        obj_mix += w * (l_s + aux_s);
        for (size_t i = 0; i < n; ++i) g_mix[i] += w * g_one[i];
      }
      EXPECT_NEAR(l_all + aux_all, obj_mix, 1e-13 * obj_mix);
      EXPECT_LE(worst_tensor_err(p, g_mix.data(), g_all.data()).first, 1e-12);
    }
}

// Hard routing skips, not masks: with layer 1's router bias far positive every token runs
// attention there, with layer 4's far negative every token runs Mamba there. The skipped paths'
// weights (and the exchange, which reads a Mamba output that never exists in layer 1 and feeds an
// attention path that never runs in layer 4) get exactly zero gradient, and NaN in them changes
// nothing: they are never read. Float and double.
TEST(TrueHybridGrad, HardRoutingSkipsThePathNotChosen) {
  const ModelConfig c = true_tiny("hard");
  Params p(c);
  randomize_params(p, 601);
  tensor(p, 1, "mixer.router.bias")[0] = 40.0f;
  tensor(p, 4, "mixer.router.bias")[0] = -40.0f;
  const TokenBatch b = make_batch(2, 12, c.vocab_size, 602);
  const std::vector<std::string> mamba_names = {
      "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.x_proj.weight",
      "mixer.dt_proj.weight", "mixer.dt_proj.bias", "mixer.A_log",      "mixer.D",
      "mixer.out_proj.weight", "mixer.fuse_mamba", "mixer.exchange"};
  const std::vector<std::string> attn_names = {"mixer.q_proj.weight", "mixer.k_proj.weight",
                                               "mixer.v_proj.weight", "mixer.o_proj.weight",
                                               "mixer.fuse_attn", "mixer.exchange"};
  auto numel = [&](int layer, const std::string& rest) {
    const std::string n = "backbone.layers." + std::to_string(layer) + "." + rest;
    for (const ParamSpec& s : p.specs())
      if (s.name == n) return s.numel();
    return int64_t(0);
  };
  auto max_abs = [&](Params& g, int layer, const std::string& rest) {
    const float* v = tensor(g, layer, rest);
    float m = 0;
    for (int64_t i = 0; i < numel(layer, rest); ++i) m = std::max(m, std::fabs(v[i]));
    return m;
  };
  double ref_loss[2] = {0, 0};
  for (int pass = 0; pass < 2; ++pass) {  // pass 1: NaN in every skipped weight
    for (bool f64 : {false, true}) {
      Params g(c);
      std::fill(g.data(), g.data() + g.numel(), 0.0f);
      const double loss = f64 ? loss_and_grad_f64(p, g, b.tokens.data(), b.targets.data(), b.B, b.L)
                              : loss_and_grad(p, g, b.tokens.data(), b.targets.data(), b.B, b.L);
      SCOPED_TRACE(std::string(f64 ? "double" : "float") + (pass ? ", NaN weights" : ""));
      if (pass == 0) ref_loss[int(f64)] = loss;
      EXPECT_EQ(loss, ref_loss[int(f64)]);
      for (const auto& n : mamba_names) EXPECT_EQ(max_abs(g, 1, n), 0.0f) << "layer 1 " << n;
      for (const auto& n : attn_names) EXPECT_EQ(max_abs(g, 4, n), 0.0f) << "layer 4 " << n;
      // The paths that ran do learn.
      EXPECT_GT(max_abs(g, 1, "mixer.q_proj.weight"), 0.0f);
      EXPECT_GT(max_abs(g, 4, "mixer.in_proj.weight"), 0.0f);
      for (int64_t i = 0; i < g.numel(); ++i) ASSERT_TRUE(std::isfinite(g.data()[i])) << i;
    }
    for (const auto& n : mamba_names) tensor(p, 1, n)[0] = NAN;
    for (const auto& n : attn_names) tensor(p, 4, n)[0] = NAN;
  }
}
