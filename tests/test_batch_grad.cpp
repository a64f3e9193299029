// train/batch_grad.h: the whole batch as one ragged batch on a backend (what hm train --device
// cuda runs), checked on the host backends against loss_and_grad (model_grad.h), itself checked
// against finite differences in test_model_grad.cpp. And the optimizer ops of backend.h against
// hm::AdamW and grad_norm, and the bridge gate's backward against a double loop.
#include <gtest/gtest.h>

#include <functional>
#include <memory>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/params.h"
#include "runtime/memory.h"
#include "model/config.h"
#include "model/model.h"
#include "train/batch_grad.h"
#include "train/comm.h"
#include "train/model_grad.h"
#include "train/optimizer.h"
#include "grad_test_util.h"
#include "test_util.h"

using namespace hm;
using test::arena;
using test::make_batch;
using test::randomize_params;
using test::TokenBatch;
using test::worst_tensor_err;

// stmt throws hm::Error whose message contains text.
#define EXPECT_THROW_MSG(stmt, text)                                                        \
  do {                                                                                      \
    try {                                                                                   \
      stmt;                                                                                 \
      ADD_FAILURE() << "no error from " #stmt;                                              \
    } catch (const hm::Error& e) {                                                          \
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();           \
    }                                                                                       \
  } while (0)

namespace {

std::vector<float> zeros(const Params& p) { return std::vector<float>(size_t(p.numel()), 0.0f); }

// The gradient g of every tensor whose name `pick` accepts, along a random unit direction d per
// tensor, against central differences of BatchGrad's own float loss, (l(w + h d) - l(w - h d)) / 2h
// extrapolated from two steps, with MoE routing frozen (BatchGrad::freeze_routing).
// Returns the number of tensors checked; each must agree within tol (relative).
int check_directions(const Params& p, const std::vector<float>& g, const TokenBatch& b, uint64_t seed,
                     const std::function<bool(const std::string&)>& pick, double tol = 5e-3, double step = 2e-2) {
  auto cpu = make_cpu_backend();
  std::vector<float> w(p.data(), p.data() + p.numel());
  // One evaluator, its MoE routing frozen at the unperturbed weights' (a step must not move a
  // token to another expert: the loss would jump where the gradient holds the choice fixed).
  BatchGrad f(*cpu, p, DType::F32);
  int64_t counted = 0;
  f.set_weights(w.data());
  (void)f.loss_sum(b.tokens.data(), b.targets.data(), b.B, b.L, &counted);
  f.freeze_routing(true);
  auto mean_loss = [&] {
    f.set_weights(w.data());
    const double sum = f.loss_sum(b.tokens.data(), b.targets.data(), b.B, b.L, &counted);
    return sum / double(counted);
  };
  Rng rng(seed);
  int checked = 0;
  double worst = 0;
  for (size_t k = 0; k < p.specs().size(); ++k) {
    const std::string& name = p.specs()[k].name;
    if (!pick(name)) continue;
    const int64_t off = p.at(k) - p.data(), cnt = p.specs()[k].numel();
    std::vector<double> d(static_cast<size_t>(cnt));
    double nrm = 0;
    for (double& v : d) {
      v = rng.normal();
      nrm += v * v;
    }
    double along = 0;  // analytic: g . d
    for (int64_t i = 0; i < cnt; ++i) {
      d[size_t(i)] /= std::sqrt(nrm);
      along += double(g[size_t(off + i)]) * d[size_t(i)];
    }
    // Central differences at steps h and h/2, extrapolated (Richardson): (4 D(h/2) - D(h)) / 3
    // cancels the h^2 term, so the stream-wide tensors (embeddings, out_proj's bias), which
    // curve most, need no smaller step.
    auto central = [&](double h) {
      for (int64_t i = 0; i < cnt; ++i) w[size_t(off + i)] = float(p.data()[off + i] + h * d[size_t(i)]);
      const double up = mean_loss();
      for (int64_t i = 0; i < cnt; ++i) w[size_t(off + i)] = float(p.data()[off + i] - h * d[size_t(i)]);
      const double down = mean_loss();
      for (int64_t i = 0; i < cnt; ++i) w[size_t(off + i)] = p.data()[off + i];
      return (up - down) / (2 * h);
    };
    const double fd = (4 * central(step / 2) - central(step)) / 3;
    const double err = std::fabs(fd - along) / std::max(std::fabs(along), 1e-3);
    std::printf("  %-44s g.d %+.6e  differences %+.6e  rel %.1e\n", name.c_str(), along, fd, err);
    EXPECT_LE(err, tol) << name;
    worst = std::max(worst, err);
    ++checked;
  }
  std::printf("  worst %.1e over %d tensors\n", worst, checked);
  return checked;
}

// A model with random weights (seed w_seed), a batch (seed b_seed), and BatchGrad's loss and
// gradient on it, whose loss must be the inference forward's cross-entropy.
struct GradRun {
  std::unique_ptr<Backend> cpu = make_cpu_backend();
  std::unique_ptr<HybridModel> model;
  TokenBatch b;
  std::vector<float> g;
  double loss = 0;
  const Params& p() const { return model->params(); }
};

std::unique_ptr<GradRun> grad_run(const ModelConfig& c, uint64_t w_seed, uint64_t b_seed, int B, int L) {
  validate(c);
  EXPECT_EQ(training_unsupported(c), "");
  auto r = std::make_unique<GradRun>();
  r->model = std::make_unique<HybridModel>(c, *r->cpu);
  randomize_params(r->model->params(), w_seed);
  r->model->prepare();
  r->b = make_batch(B, L, c.vocab_size, b_seed);
  BatchGrad bg(*r->cpu, r->p(), DType::F32);
  bg.set_weights(r->p().data());
  r->g = zeros(r->p());
  r->loss = bg.loss_and_grad(r->g.data(), r->b.tokens.data(), r->b.targets.data(), B, L);
  EXPECT_NEAR(r->loss, test::inference_mean_loss(*r->model, r->b.tokens, r->b.targets, B, L), 2e-6 * r->loss);
  return r;
}

// loss_and_grad (the CPU trainer's float path, one sequence per thread) gives BatchGrad's loss and
// gradient, each tensor within tol (relative): two float sums in different orders.
void expect_float_path_agrees(const GradRun& r, double tol = 1e-5) {
  Params g2(r.model->config());
  std::fill(g2.data(), g2.data() + g2.numel(), 0.0f);
  EXPECT_NEAR(loss_and_grad(r.p(), g2, r.b.tokens.data(), r.b.targets.data(), r.b.B, r.b.L), r.loss, 1e-6 * r.loss);
  EXPECT_LE(worst_tensor_err(r.p(), g2.data(), r.g.data()).first, tol);
}

// The double reference model (model_grad.h) agrees with BatchGrad.
void expect_double_agrees(const GradRun& r) {
  Params g2(r.model->config());
  std::fill(g2.data(), g2.data() + g2.numel(), 0.0f);
  EXPECT_NEAR(loss_and_grad_f64(r.p(), g2, r.b.tokens.data(), r.b.targets.data(), r.b.B, r.b.L), r.loss, 1e-5 * r.loss);
  EXPECT_LE(worst_tensor_err(r.p(), g2.data(), r.g.data()).first, 1e-4);
}

// The double reference model does not have this layer kind, and says so by name.
void expect_double_refuses(const GradRun& r, const std::string& text) {
  Params g2(r.model->config());
  EXPECT_THROW_MSG(loss_and_grad_f64(r.p(), g2, r.b.tokens.data(), r.b.targets.data(), r.b.B, r.b.L), text);
}

// loss_and_grad's result and BatchGrad's on backend `be` (host memory), for one batch.
void compare(const ModelConfig& c, Backend& be, uint64_t seed, int B, int L, double tol) {
  Params p(c);
  randomize_params(p, seed);
  const TokenBatch b = make_batch(B, L, c.vocab_size, seed + 1);
  Params g_ref(c);
  std::fill(g_ref.data(), g_ref.data() + g_ref.numel(), 0.0f);
  const double l_ref = loss_and_grad_f64(p, g_ref, b.tokens.data(), b.targets.data(), B, L);

  BatchGrad bg(be, p, DType::F32);
  bg.set_weights(p.data());
  std::vector<float> g = zeros(p);
  const double l = bg.loss_and_grad(g.data(), b.tokens.data(), b.targets.data(), B, L);
  EXPECT_NEAR(l, l_ref, 1e-6 * l_ref);
  const auto [err, name] = worst_tensor_err(p, g.data(), g_ref.data());
  std::printf("  %s backend, %s head, %d x %d: loss %.8f vs %.8f (double); worst tensor %s: %.2e\n",
              be.name().c_str(), c.tie_embeddings ? "tied" : "untied", B, L, l, l_ref, name.c_str(), err);
  EXPECT_LE(err, tol) << name;

  // The forward alone gives the same loss; a second call with grad_scale 2 adds twice the gradient.
  int64_t counted = 0;
  const double sum = bg.loss_sum(b.tokens.data(), b.targets.data(), B, L, &counted);
  EXPECT_NEAR(sum / double(counted), l, 1e-12 * l);
  std::vector<float> g2 = zeros(p);
  bg.loss_and_grad(g2.data(), b.tokens.data(), b.targets.data(), B, L, 0.5);
  bg.loss_and_grad(g2.data(), b.tokens.data(), b.targets.data(), B, L, 0.5);
  EXPECT_LE(worst_tensor_err(p, g2.data(), g.data()).first, 1e-6);
}

}  // namespace

TEST(BatchGrad, MatchesDoubleReferenceOnTheCpuBackend) {
  auto cpu = make_cpu_backend();
  for (bool tied : {true, false}) compare(test::small_hybrid_config(tied), *cpu, 11, 3, 37, 2e-5);
  ModelConfig mamba = preset("tiny");
  mamba.attention_layers.clear();
  mamba.d_ff = 0;
  validate(mamba);
  compare(mamba, *cpu, 13, 2, 70, 2e-5);
}

TEST(BatchGrad, MatchesDoubleReferenceOnTheRefBackend) {
  auto ref = make_ref_backend();
  compare(test::small_hybrid_config(true), *ref, 21, 2, 19, 2e-5);
}

// True Hybrid layers (soft, hard, both; token and chunk routing): the same loss, budget term and
// gradients as the double reference (model_grad's true_mixer_*), on both host backends, with
// and without grad_ckpt (bitwise the same). Hard routing compacts each sequence's tokens per path.
TEST(BatchGrad, TrueHybridMatchesDoubleReference) {
  auto cpu = make_cpu_backend();
  auto ref = make_ref_backend();
  for (const char* mode : {"soft", "hard", "both"})
    for (const char* gran : {"token", "chunk"}) {
      ModelConfig c = preset("true-tiny");
      c.routing_mode = mode;
      c.routing_granularity = gran;
      c.attention_budget = 0.3f;
      c.budget_loss_weight = 0.5f;
      validate(c);
      Params p(c);
      randomize_params(p, 61);
      const TokenBatch b = make_batch(3, 29, c.vocab_size, 62);
      Params g_ref(c);
      std::fill(g_ref.data(), g_ref.data() + g_ref.numel(), 0.0f);
      double aux_ref = 0;
      const double l_ref = loss_and_grad_f64(p, g_ref, b.tokens.data(), b.targets.data(), b.B, b.L, 0, false, &aux_ref);
      std::vector<float> g_prev;
      for (Backend* be : {cpu.get(), ref.get()})
        for (bool ckpt : {false, true}) {
          BatchGrad bg(*be, p, DType::F32, ckpt);
          bg.set_weights(p.data());
          std::vector<float> g = zeros(p);
          const double l = bg.loss_and_grad(g.data(), b.tokens.data(), b.targets.data(), b.B, b.L);
          EXPECT_NEAR(l, l_ref, 1e-6 * l_ref) << mode << "/" << gran;
          EXPECT_NEAR(bg.budget_loss(), aux_ref, 1e-6 * std::max(aux_ref, 1e-3)) << mode << "/" << gran;
          if (std::string(mode) != "both") {
            EXPECT_GT(aux_ref, 1e-5);
          }
          const auto [err, name] = worst_tensor_err(p, g.data(), g_ref.data());
          if (!ckpt)
            std::printf("  %s/%s on %s: loss %.8f vs %.8f, budget %.3e vs %.3e; worst %s: %.2e\n", mode, gran,
                        be->name().c_str(), l, l_ref, bg.budget_loss(), aux_ref, name.c_str(), err);
          EXPECT_LE(err, 2e-5) << mode << "/" << gran << " " << be->name() << " " << name;
          if (ckpt) {
            EXPECT_EQ(std::memcmp(g.data(), g_prev.data(), sizeof(float) * g.size()), 0) << "grad_ckpt changed bits";
          }
          g_prev = g;
        }
    }
}

// Data parallelism's two pieces (trainer.h, TrainConfig::comm): loss_and_grad over parts of a
// batch, each told the whole batch's count of targets, sums to the whole batch's loss, budget
// term and gradient; BatchGrad reports every span of the gradient arena done exactly once, from
// the end down, each after its last write (a span's values do not change afterwards).
TEST(BatchGrad, PartsOfABatchSumToTheWhole) {
  ModelConfig c = preset("true-tiny");
  c.budget_loss_weight = 0.5f;
  c.attention_budget = 0.3f;
  validate(c);
  Params p(c);
  randomize_params(p, 71);
  TokenBatch b = make_batch(3, 23, c.vocab_size, 72);
  for (int t = 0; t < 15; ++t) b.targets[size_t(t)] = -1;  // the parts count different numbers of targets
  int64_t whole = 0;
  for (const int32_t t : b.targets) whole += t >= 0;
  Params g_all(c), g_parts(c);
  std::fill(g_all.data(), g_all.data() + g_all.numel(), 0.0f);
  std::fill(g_parts.data(), g_parts.data() + g_parts.numel(), 0.0f);
  double aux_all = 0, aux1 = 0, aux2 = 0;
  const double l_all = loss_and_grad(p, g_all, b.tokens.data(), b.targets.data(), 3, b.L, 0, false, &aux_all);
  const double l1 = loss_and_grad(p, g_parts, b.tokens.data(), b.targets.data(), 1, b.L, 0, false, &aux1, whole);
  const double l2 = loss_and_grad(p, g_parts, b.tokens.data() + b.L, b.targets.data() + b.L, 2, b.L, 0, false, &aux2,
                                  whole);
  EXPECT_NEAR(l1 + l2, l_all, 1e-6 * l_all);
  EXPECT_NEAR(aux1 + aux2, aux_all, 1e-6 * aux_all);
  EXPECT_GT(aux1, 0.0);
  EXPECT_LE(worst_tensor_err(p, g_parts.data(), g_all.data()).first, 2e-6);
  EXPECT_THROW_MSG(loss_and_grad(p, g_parts, b.tokens.data(), b.targets.data(), 3, b.L, 0, false, nullptr, whole - 1),
                   "fewer than this part's");

  auto cpu = make_cpu_backend();
  for (bool ckpt : {false, true}) {
    BatchGrad bg(*cpu, p, DType::F32, ckpt);
    bg.set_weights(p.data());
    std::vector<float> g = zeros(p);
    std::vector<std::pair<int64_t, int64_t>> spans;
    std::vector<std::vector<float>> at_report;  // each span's values when reported
    bg.set_grads_done([&](int64_t lo, int64_t hi) {
      spans.emplace_back(lo, hi);
      at_report.emplace_back(g.begin() + lo, g.begin() + hi);
    });
    bg.loss_and_grad(g.data(), b.tokens.data(), b.targets.data(), 3, b.L);
    ASSERT_EQ(spans.size(), size_t(c.n_layers) + 2);  // final norm + head, each layer, the embedding
    int64_t frontier = p.numel();
    for (size_t k = 0; k < spans.size(); ++k) {
      EXPECT_EQ(spans[k].second, frontier) << "span " << k;
      EXPECT_LE(spans[k].first, spans[k].second);
      frontier = spans[k].first;
      EXPECT_TRUE(std::equal(at_report[k].begin(), at_report[k].end(), g.begin() + spans[k].first))
          << "span " << k << " [" << spans[k].first << ", " << spans[k].second << ") changed after it was reported";
    }
    EXPECT_EQ(frontier, 0);
    // Without a callback nothing is called; with it cleared, neither.
    bg.set_grads_done(nullptr);
    spans.clear();
    bg.loss_and_grad(g.data(), b.tokens.data(), b.targets.data(), 3, b.L);
    EXPECT_TRUE(spans.empty());
  }
}

namespace {
// Two ranks holding the same values: a sum doubles them. Records each call's span.
struct DoublingComm : Comm {
  std::vector<std::pair<int64_t, int64_t>> calls;  // (offset from base, count)
  const float* base = nullptr;
  int rank() const override { return 0; }
  int size() const override { return 2; }
  int local_size() const override { return 2; }
  void allreduce_sum(float* x, int64_t n) override {
    calls.emplace_back(x - base, n);
    for (int64_t i = 0; i < n; ++i) x[i] *= 2;
  }
  void allreduce_sum(double* x, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) x[i] *= 2;
  }
  void allreduce_sum_device(Backend&, float* x, int64_t n) override { allreduce_sum(x, n); }
  void wait_device(Backend&) override {}
  std::vector<uint64_t> allgather(uint64_t v) override { return {v, v}; }
  void broadcast(void*, int64_t, int) override {}
  void barrier() override {}
  [[noreturn]] void abort(int) override { std::abort(); }
};
}  // namespace

// GradReducer's buckets: fixed by the arena's size, sent from the end down as the backward
// reports spans done, every element summed once; a rank whose backward reported nothing sends
// the same buckets from finish().
TEST(BatchGrad, GradReducerBuckets) {
  const int64_t numel = 1000, bucket = 128;
  std::vector<float> g(size_t(numel), 1.0f);
  DoublingComm driven, idle;
  driven.base = idle.base = g.data();
  {
    GradReducer r(driven, nullptr, g.data(), numel, bucket);
    r.done(900, 1000);  // the last bucket, [872, 1000), is not all done yet
    EXPECT_EQ(r.buckets_sent(), 0);
    r.done(300, 900);
    EXPECT_EQ(r.buckets_sent(), 5);  // down to 360
    EXPECT_THROW_MSG(r.done(0, 250), "from the end of the arena down");
    r.finish();
    EXPECT_EQ(r.buckets_sent(), 8);
  }
  for (float v : g) EXPECT_EQ(v, 2.0f);
  {
    GradReducer r(idle, nullptr, g.data(), numel, bucket);
    r.finish();
  }
  EXPECT_EQ(driven.calls, idle.calls);
  ASSERT_EQ(driven.calls.size(), 8u);
  EXPECT_EQ(driven.calls.front(), std::make_pair(int64_t(872), int64_t(128)));
  EXPECT_EQ(driven.calls.back(), std::make_pair(int64_t(0), int64_t(104)));
}

// Mamba-2 layers (HF's Mamba2 mixer with its gated RMSNorm) train through BatchGrad: its forward
// is the inference forward (HybridModel::mamba2_path), and its gradient of each Mamba-2 tensor
// agrees with central differences of its own float loss along a random direction (the ops'
// exact check is tests/test_grad_ssd.cpp's, in double; this one catches the wiring: views,
// strides, which gradient goes where). Layers 0 and 3 Mamba-2 with two groups, attention between,
// a bridge from a Mamba-2 layer, MLPs; dt clamped by a time_step_limit.
TEST(BatchGrad, Mamba2LayersTrain) {
  ModelConfig c = test::small_hybrid_config(false);
  c.mamba2_layers = {0, 3};
  c.mamba2_head_dim = 8;
  c.mamba2_groups = 2;
  c.mamba2_dt_min = 0.01f;
  c.mamba2_dt_max = 0.3f;
  const auto r = grad_run(c, 81, 82, 3, 17);
  expect_float_path_agrees(*r);
  expect_double_agrees(*r);
  // The gradient of every Mamba-2 tensor along a random direction.
  const int checked = check_directions(r->p(), r->g, r->b, 83, [](const std::string& name) {
    return (name.rfind("backbone.layers.0.", 0) == 0 || name.rfind("backbone.layers.3.", 0) == 0) &&
           (name.find("mixer") != std::string::npos || name.find(".norm.") != std::string::npos);
  });
  EXPECT_EQ(checked, 18);  // norm, in_proj, conv weight and bias, dt_bias, A_log, D, gated norm, out_proj; x2
}

// Falcon-H1's Mamba-2 gates (y * silu(z) without a norm; rmsnorm(y) * w * silu(z), the norm
// before the gate, per group or over the whole row) and its layer: a true layer in `both` mode
// whose Mamba path is Mamba-2. Loss = inference's; every tensor against central differences; the
// double reference model agrees.
TEST(BatchGrad, Mamba2GateVariantsAndTrueLayersTrain) {
  struct Case {
    const char* name;
    std::function<void(ModelConfig&)> set;
  };
  auto m2 = [](ModelConfig& c) {
    c.mamba2_layers = {0, 3};
    c.mamba2_head_dim = 8;
    c.mamba2_groups = 2;
  };
  const Case cases[] = {
      {"no norm", [&](ModelConfig& c) { m2(c); c.mamba2_gated_norm = false; }},
      {"norm before the gate, per group",
       [&](ModelConfig& c) { m2(c); c.mamba2_norm_before_gate = true; }},
      {"norm before the gate, whole row",
       [&](ModelConfig& c) { m2(c); c.mamba2_norm_before_gate = true; c.mamba2_norm_per_group = false; }},
      {"true layers in both mode with Mamba-2 paths (Falcon-H1)",
       [&](ModelConfig& c) { c = test::falcon_h1_layer_config(); }},
  };
  for (const Case& cs : cases) {
    SCOPED_TRACE(cs.name);
    std::printf("%s\n", cs.name);
    ModelConfig c = test::small_hybrid_config(false);
    cs.set(c);
    const auto r = grad_run(c, 115, 116, 2, 13);
    // Falcon-H1's layers: 1.8e-5 on an AVX2-only host (AMD EPYC), under 1e-5 with AVX-512.
    expect_float_path_agrees(*r, 4e-5);
    expect_double_agrees(*r);
    // In both mode the router's output is unused: no gradient reaches it, and none is checked.
    // (Along the embeddings the norm before the gate curves: plain central differences' error falls
    // as h^2, 4.7e-2, 4.4e-3, 3.8e-4 at steps of 1e-2, 3e-3, 1e-3; check_directions extrapolates.)
    const int checked = check_directions(r->p(), r->g, r->b, 117, [](const std::string& name) {
      return name.find("router") == std::string::npos;
    });
    EXPECT_GT(checked, 20);
  }
}

// in_proj and out_proj biases (transformers' use_bias for Mamba and Falcon-Mamba, Jamba's
// mamba_proj_bias): every tensor, the biases included, against central differences.
TEST(BatchGrad, ProjBiasesTrain) {
  ModelConfig c = test::small_hybrid_config(true);
  c.mamba_proj_bias = true;
  const auto r = grad_run(c, 119, 120, 2, 13);
  expect_double_refuses(*r, "biases");
  int biases = 0;
  const int checked = check_directions(r->p(), r->g, r->b, 121, [&](const std::string& name) {
    biases += name.find("in_proj.bias") != std::string::npos || name.find("out_proj.bias") != std::string::npos;
    return true;
  });
  EXPECT_EQ(checked, int(r->p().specs().size()));
  EXPECT_EQ(biases, 4);  // in_proj and out_proj of the two Mamba layers
}

// Falcon-Mamba's weightless RMSNorms on dt_r, B and C, and Jamba's learned ones: BatchGrad's
// forward is inference's, and the gradient of every mixer tensor (the norms' weights included)
// matches central differences of the loss along a random direction.
TEST(BatchGrad, BcdtNormsTrain) {
  for (const bool learned : {false, true}) {
    SCOPED_TRACE(learned ? "learned (Jamba)" : "weightless (Falcon-Mamba)");
    ModelConfig c = test::small_hybrid_config(false);
    c.mamba_bcdt_norm = true;
    c.mamba_bcdt_norm_weight = learned;
    c.mamba_bcdt_norm_eps = 1e-5f;
    const auto r = grad_run(c, learned ? 91 : 92, 93, 3, 13);
    expect_float_path_agrees(*r);
    expect_double_refuses(*r, "dt/B/C norms");
    int mamba_layers = 0, norms = 0;
    for (int i = 0; i < c.n_layers; ++i) mamba_layers += c.has_mamba_path(i) && !c.is_true(i);
    const int checked = check_directions(r->p(), r->g, r->b, 94, [&](const std::string& name) {
      if (name.find("mixer") == std::string::npos) return false;
      const int layer = std::stoi(name.substr(name.find("layers.") + 7));
      if (!c.has_mamba_path(layer) || c.is_true(layer)) return false;
      norms += name.find("layernorm") != std::string::npos;
      return true;
    });
    EXPECT_EQ(checked, 9 * mamba_layers + norms);
    EXPECT_EQ(norms, learned ? 3 * mamba_layers : 0);
  }
}

// Bamba's partial rotary (rope_dim < head_dim): the rotated channels gathered, rotated and put
// back in the forward, the transpose likewise in the backward.
TEST(BatchGrad, PartialRopeTrains) {
  ModelConfig c = test::small_hybrid_config(false);
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.rope_dim = 4;  // of head_dim 8
  const auto r = grad_run(c, 95, 96, 3, 13);
  expect_double_agrees(*r);  // the double reference rotates partially too
  const int checked = check_directions(r->p(), r->g, r->b, 97, [](const std::string& name) {
    return name.find("q_proj") != std::string::npos || name.find("k_proj") != std::string::npos;
  });
  EXPECT_EQ(checked, 4);
  // The whole head rotated instead would be a different model: the loss moves.
  c.rope_dim = 8;
  HybridModel whole(c, *r->cpu);
  std::copy(r->p().data(), r->p().data() + r->p().numel(), whole.params().data());
  whole.prepare();
  EXPECT_GT(std::fabs(test::inference_mean_loss(whole, r->b.tokens, r->b.targets, r->b.B, r->b.L) - r->loss), 1e-4);
}

// Mixture-of-experts layers (Jamba's softmax top-2, Granite's renormalized router with a shared
// expert, a DeepSeek-V3-style sigmoid router with correction bias and groups): BatchGrad's forward
// is inference's, and the gradients of every tensor match central differences of the loss along
// a random direction, the routing choice held fixed as the gradient holds it.
TEST(BatchGrad, MoeTrains) {
  struct Case {
    const char* name;
    std::function<void(ModelConfig&)> set;
  };
  const Case cases[] = {
      {"softmax top-2 (Jamba)", [](ModelConfig& c) { c.moe_layers = {1, 3}; }},
      {"renormalized, shared expert, scaling (Granite)",
       [](ModelConfig& c) {
         c.moe_layers = {0, 2};
         c.moe_renormalize = true;
         c.moe_shared_ff = 10;
         c.moe_scaling = 1.5f;
       }},
      {"sigmoid, correction bias, groups (DeepSeek-V3)",
       [](ModelConfig& c) {
         c.moe_layers = {0, 1, 2, 3};
         c.moe_router = "sigmoid";
         c.moe_groups = 2;
         c.moe_topk_groups = 1;
         c.moe_renormalize = true;
         c.moe_scaling = 2.5f;
       }},
  };
  for (const Case& cs : cases) {
    SCOPED_TRACE(cs.name);
    std::printf("%s\n", cs.name);
    ModelConfig c = test::small_hybrid_config(false);
    c.moe_experts = 4;
    c.moe_top_k = 2;
    c.moe_ff = 8;
    cs.set(c);
    const auto r = grad_run(c, 101, 102, 3, 11);
    expect_float_path_agrees(*r);
    expect_double_refuses(*r, "mixture-of-experts");
    int bias = 0;
    const int checked = check_directions(r->p(), r->g, r->b, 103, [&](const std::string& name) {
      if (name.find("correction_bias") != std::string::npos) {  // a buffer in transformers: no gradient
        ++bias;
        const int64_t off = r->p().get(name) - r->p().data();
        for (int64_t q = 0; q < c.moe_experts; ++q) EXPECT_EQ(r->g[size_t(off + q)], 0.0f);
        return false;
      }
      return true;
    });
    EXPECT_EQ(checked + bias, int(r->p().specs().size()));
    EXPECT_EQ(bias, c.moe_router == "sigmoid" ? int(c.moe_layers.size()) : 0);
  }
}

// Granite's multipliers: embeddings times embedding_multiplier, each mixer's and FFN's output
// (an MoE's included) times residual_multiplier, scores q.k times attention_scale, logits divided
// by logits_scaling. Every tensor's gradient against central differences, without MoE and with one.
TEST(BatchGrad, MultipliersTrain) {
  for (const bool moe : {false, true}) {
    SCOPED_TRACE(moe ? "with an MoE layer" : "dense");
    ModelConfig c = test::small_hybrid_config(false);
    c.state_bridges = false;  // residual_multiplier is not defined with bridges (validate)
    c.embedding_multiplier = 3.0f;
    c.residual_multiplier = 0.5f;
    c.attention_scale = 0.3f;
    c.logits_scaling = 2.5f;
    if (moe) {
      c.moe_layers = {3};
      c.moe_experts = 4;
      c.moe_renormalize = true;
      c.moe_shared_ff = 6;
    }
    const auto r = grad_run(c, 106, 107, 3, 11);
    expect_double_refuses(*r, moe ? "mixture-of-experts" : "multipliers");
    const int checked = check_directions(r->p(), r->g, r->b, 108, [](const std::string&) { return true; });
    EXPECT_EQ(checked, int(r->p().specs().size()));
  }
}

// Explicit head_dim (Falcon-H1, Nemotron-H: n_heads x head_dim != d_model): BatchGrad and the
// double reference agree.
TEST(BatchGrad, ExplicitHeadDimTrains) {
  ModelConfig c = test::small_hybrid_config(false);
  c.attn_head_dim = 6;  // d_model 16 over 4 heads would give 4
  expect_double_agrees(*grad_run(c, 110, 111, 2, 13));
}

// Squared-ReLU MLPs (Nemotron-H: no gate projection), dense and as MoE experts with a shared
// expert behind a sigmoid router with groups: every tensor against central differences.
TEST(BatchGrad, Relu2MlpsTrain) {
  for (const bool moe : {false, true}) {
    SCOPED_TRACE(moe ? "relu2 experts" : "relu2 MLPs");
    ModelConfig c = test::small_hybrid_config(false);
    c.mlp_act = "relu2";
    if (moe) {
      c.moe_layers = {0, 3};
      c.moe_experts = 4;
      c.moe_router = "sigmoid";
      c.moe_groups = 2;
      c.moe_renormalize = true;
      c.moe_shared_ff = 6;
    }
    const auto r = grad_run(c, 112, 113, 3, 11);
    expect_double_refuses(*r, moe ? "mixture-of-experts" : "squared-ReLU");
    // Steps of 1e-2: the squared ReLU's curvature jumps at 0, which longer steps cross more often.
    const int checked = check_directions(r->p(), r->g, r->b, 114, [&](const std::string& name) {
      return name.find("correction_bias") == std::string::npos;
    }, 5e-3, 1e-2);
    EXPECT_EQ(checked, int(r->p().specs().size()) - (moe ? 2 : 0));
  }
}

// ffn_layers (only some layers have an FFN, as Nemotron-H's blocks): BatchGrad and the double
// reference both skip the missing MLPs.
TEST(BatchGrad, FfnOnSomeLayersTrains) {
  ModelConfig c = test::small_hybrid_config(true);
  c.ffn_layers = {0, 2};
  expect_double_agrees(*grad_run(c, 104, 105, 2, 15));
}

TEST(BatchGrad, RefusesWhatItCannotTrain) {
  auto cpu = make_cpu_backend();
  Params q(test::small_hybrid_config(true));
  EXPECT_THROW_MSG((void)BatchGrad(*cpu, q, DType::BF16), "cannot compute in bf16");
  BatchGrad bg(*cpu, q, DType::F32);
  std::vector<int32_t> tok(6, 0), tgt(6, 0);
  std::vector<float> g = zeros(q);
  EXPECT_THROW_MSG(bg.loss_and_grad(g.data(), tok.data(), tgt.data(), 2, 3), "set_weights");
  bg.set_weights(q.data());
  tok[4] = 99;
  EXPECT_THROW_MSG(bg.loss_and_grad(g.data(), tok.data(), tgt.data(), 2, 3), "token id 99 at [1, 1]");
}

namespace {

// loss_and_grad and loss_sum of BatchGrad with grad_ckpt on against off on one backend: equal
// bits. Returns the activation bytes {off, on}.
std::pair<size_t, size_t> ckpt_vs_plain(const ModelConfig& c, Backend& be, uint64_t seed, int B, int L) {
  Params p(c);
  randomize_params(p, seed);
  const TokenBatch b = make_batch(B, L, c.vocab_size, seed + 1);
  BatchGrad off(be, p, DType::F32), on(be, p, DType::F32, true);
  EXPECT_FALSE(off.grad_ckpt());
  EXPECT_TRUE(on.grad_ckpt());
  off.set_weights(p.data());
  on.set_weights(p.data());
  std::vector<float> g_off = zeros(p), g_on = zeros(p);
  const double l_off = off.loss_and_grad(g_off.data(), b.tokens.data(), b.targets.data(), B, L);
  const double l_on = on.loss_and_grad(g_on.data(), b.tokens.data(), b.targets.data(), B, L);
  EXPECT_EQ(l_on, l_off);
  int64_t differ = 0, first = -1;
  for (size_t k = 0; k < g_off.size(); ++k)
    if (std::memcmp(&g_off[k], &g_on[k], sizeof(float)) != 0 && differ++ == 0) first = int64_t(k);
  EXPECT_EQ(differ, 0) << "gradient entries differ, first at arena offset " << first;
  int64_t n_off = 0, n_on = 0;
  const double s_off = off.loss_sum(b.tokens.data(), b.targets.data(), B, L, &n_off);
  const double s_on = on.loss_sum(b.tokens.data(), b.targets.data(), B, L, &n_on);
  EXPECT_EQ(s_on, s_off);
  EXPECT_EQ(n_on, n_off);
  std::printf("  %s backend, %d layers, %s head, %d x %d: loss %.8f both; activations %zu -> %zu bytes (%.1f%%)\n",
              be.name().c_str(), c.n_layers, c.tie_embeddings ? "tied" : "untied", B, L, l_on,
              off.activation_bytes(), on.activation_bytes(),
              100.0 * double(on.activation_bytes()) / double(off.activation_bytes()));
  return {off.activation_bytes(), on.activation_bytes()};
}

}  // namespace

// grad_ckpt re-runs each layer's forward (the same ops on the same inputs) before its backward:
// loss and every gradient bit-identical, on the cpu and ref backends, tied and untied, with
// bridges from a Mamba into an attention layer, between attention layers and back (M A A M).
TEST(BatchGrad, GradCheckpointingIsBitIdentical) {
  for (auto make : {make_cpu_backend, make_ref_backend}) {
    auto be = make();
    for (bool tied : {true, false}) ckpt_vs_plain(test::small_hybrid_config(tied), *be, 51, 3, 37);
  }
  ModelConfig deep = test::small_hybrid_config(false);
  deep.n_layers = 8;
  deep.attention_layers = {1, 2, 6};
  validate(deep);
  auto cpu = make_cpu_backend();
  const auto [deep_off, deep_on] = ckpt_vs_plain(deep, *cpu, 53, 2, 64);
  EXPECT_LT(2 * deep_on, deep_off);
  // The HF families' layers: MoE (its routing re-decided in the re-run), dt/B/C norms, a partial
  // rotary, FFNs on some layers only.
  ModelConfig fam = test::small_hybrid_config(false);
  fam.moe_layers = {0, 1};
  fam.moe_experts = 4;
  fam.moe_shared_ff = 6;
  fam.ffn_layers = {0, 1, 3};
  fam.mamba_bcdt_norm = true;
  fam.n_heads = 2;
  fam.n_kv_heads = 1;
  fam.rope_dim = 4;
  validate(fam);
  ckpt_vs_plain(fam, *cpu, 55, 3, 21);
  // Four Mamba layers, no MLP, no bridges. Without grad_ckpt each layer keeps u [n, D], x, z, xc,
  // dt, yg [n, E], dt_r|B|C [n, R + 2N] and the scan's states besides its input [n, D]; with it
  // one slot holds one layer's, so the saving is at least 3 such sets (views are padded to an
  // alignment, hence >=), and with the shared scratch (stream, backward temporaries: 7 [n, D],
  // 4 [n, E], 1 [n, R + 2N], loss_sum's [V, D]) the total drops below half.
  ModelConfig mamba = preset("tiny");
  mamba.attention_layers.clear();
  mamba.d_ff = 0;
  validate(mamba);
  const int B = 2, L = 64;
  const auto [off, on] = ckpt_vs_plain(mamba, *cpu, 55, B, L);
  Ragged rg;
  rg.clear();
  for (int b = 0; b < B; ++b) rg.add(b, L, 0);
  const size_t n = size_t(B) * L, D = size_t(mamba.d_model), E = size_t(mamba.d_inner()),
               P = size_t(mamba.resolved_dt_rank() + 2 * mamba.d_state);
  const size_t layer = sizeof(float) * n * (D + 5 * E + P) + cpu->scan_saved_bytes(rg, int(E), mamba.d_state, 0);
  EXPECT_GE(off - on, size_t(mamba.n_layers - 1) * layer);
  EXPECT_LT(2 * on, off);
}

// Backend::adamw_step and sum_squares on the host backends against hm::AdamW::step and
// grad_norm on the same arenas, over three steps with clipping on.
TEST(BatchGrad, OptimizerOpsMatchAdamW) {
  const ModelConfig c = test::small_hybrid_config(false);
  Params p(c), g(c);
  randomize_params(p, 31);
  randomize_params(g, 32);
  AdamWConfig oc;
  oc.lr = 1e-2f;
  oc.clip_norm = 0.5f;
  AdamW opt(p, oc);
  std::vector<float> pd = arena<float>(p), m(pd.size(), 0.0f), v(pd.size(), 0.0f);
  std::vector<Backend::ArenaSpan> spans;
  for (size_t k = 0; k < p.specs().size(); ++k)
    spans.push_back({p.at(k) - p.data(), p.specs()[k].numel(), decays(p.specs()[k].name) ? oc.weight_decay : 0.0f});
  for (auto make : {make_cpu_backend, make_ref_backend}) {
    auto be = make();
    std::vector<float> pb = pd, mb = m, vb = v;
    Params pp(c), gg(c);
    std::copy_n(p.data(), p.numel(), pp.data());
    AdamW o2(pp, oc);
    for (int t = 1; t <= 3; ++t) {
      std::copy_n(g.data(), g.numel(), gg.data());
      const std::vector<float> gd = arena<float>(g);
      const double sq = be->sum_squares(gd.data(), spans);
      const double norm = o2.step(pp, gg, 0.01f * float(t));
      EXPECT_NEAR(std::sqrt(sq), norm, 1e-12 * norm);
      Backend::AdamWStep k;
      k.lr = 0.01f * float(t);
      k.beta1 = oc.beta1;
      k.beta2 = oc.beta2;
      k.eps = oc.eps;
      k.inv_bc1 = float(1.0 / (1.0 - std::pow(double(oc.beta1), double(t))));
      k.inv_bc2 = float(1.0 / (1.0 - std::pow(double(oc.beta2), double(t))));
      k.grad_scale = float(double(oc.clip_norm) / std::sqrt(sq));
      be->adamw_step(pb.data(), gd.data(), mb.data(), vb.data(), spans, k);
    }
    const auto [err, name] = worst_tensor_err(p, pb.data(), arena<float>(pp).data());
    EXPECT_LE(err, 1e-6) << be->name() << " " << name;
    EXPECT_LE(worst_tensor_err(p, mb.data(), arena<float>(o2.m()).data()).first, 1e-6);
    EXPECT_LE(worst_tensor_err(p, vb.data(), arena<float>(o2.v()).data()).first, 1e-6);
  }
}

// The bridge gate's backward: dsrc = ddst * scale, dscale += column sums of ddst * src.
TEST(BatchGrad, ScaleColsBackward) {
  const int n = 37, d = 13;
  Rng rng(41);
  auto rnd = [&](size_t k) {
    std::vector<float> x(k);
    for (float& e : x) e = float(rng.uniform() * 2 - 1);
    return x;
  };
  const std::vector<float> ddst = rnd(size_t(n) * d), src = rnd(size_t(n) * d), scale = rnd(size_t(d));
  for (auto make : {make_cpu_backend, make_ref_backend}) {
    auto be = make();
    std::vector<float> dsrc(size_t(n) * d, NAN), dscale(size_t(d), 0.5f);
    be->scale_cols_backward(Tensor(dsrc.data(), DType::F32, n, d), Tensor::vec(dscale.data(), DType::F32, d),
                            Tensor(const_cast<float*>(ddst.data()), DType::F32, n, d),
                            Tensor(const_cast<float*>(src.data()), DType::F32, n, d),
                            Tensor::vec(scale.data(), DType::F32, d));
    for (int j = 0; j < d; ++j) {
      double s = 0;
      for (int i = 0; i < n; ++i) {
        s += double(ddst[size_t(i) * d + j]) * src[size_t(i) * d + j];
        EXPECT_EQ(dsrc[size_t(i) * d + j], ddst[size_t(i) * d + j] * scale[size_t(j)]);
      }
      EXPECT_NEAR(dscale[size_t(j)], 0.5 + s, 1e-6);
    }
    std::vector<float> bad(static_cast<size_t>(d));
    EXPECT_THROW_MSG(be->scale_cols_backward(Tensor(dsrc.data(), DType::F32, n, d), Tensor::vec(bad.data(), DType::F32, d - 1),
                                             Tensor(const_cast<float*>(ddst.data()), DType::F32, n, d),
                                             Tensor(const_cast<float*>(src.data()), DType::F32, n, d),
                                             Tensor::vec(scale.data(), DType::F32, d)),
                     "scale_cols_backward");
  }
}

// row_dots (an MoE gate's gradient) on the host backends against a double loop, with indices
// (repeated, out of order) and without, over column views; a bad index and mismatched widths refused.
TEST(BatchGrad, RowDots) {
  const int rows = 29, d = 17, na = 11, lda = 20, ldb = 19;
  Rng rng(43);
  std::vector<float> a(size_t(na) * lda), b(size_t(rows) * ldb);
  for (float& e : a) e = float(rng.normal());
  for (float& e : b) e = float(rng.normal());
  std::vector<int32_t> idx(static_cast<size_t>(rows));
  for (auto& i : idx) i = int32_t(rng.next_u64() % uint64_t(na));
  const Tensor A = Tensor(a.data(), DType::F32, na, lda, lda).cols_view(2, d);
  const Tensor Bt = Tensor(b.data(), DType::F32, rows, ldb, ldb).cols_view(1, d);
  for (auto make : {make_cpu_backend, make_ref_backend}) {
    auto be = make();
    for (const bool indexed : {true, false}) {
      const int n = indexed ? rows : na;  // without indices row r of a meets row r of b
      std::vector<float> out(size_t(n), NAN);
      be->row_dots(Tensor::vec(out.data(), DType::F32, n), A, indexed ? idx.data() : nullptr, Bt.rows_view(0, n));
      for (int r = 0; r < n; ++r) {
        const int ar = indexed ? idx[size_t(r)] : r;
        double want = 0;
        for (int q = 0; q < d; ++q) want += double(a[size_t(ar) * lda + 2 + q]) * b[size_t(r) * ldb + 1 + q];
        EXPECT_NEAR(out[size_t(r)], want, 1e-6 * (1 + std::fabs(want))) << be->name() << " row " << r;
      }
    }
    std::vector<float> out(static_cast<size_t>(rows));
    std::vector<int32_t> bad = idx;
    bad[3] = na;
    EXPECT_THROW_MSG(be->row_dots(Tensor::vec(out.data(), DType::F32, rows), A, bad.data(), Bt), "index 11 of row 3");
    EXPECT_THROW_MSG(be->row_dots(Tensor::vec(out.data(), DType::F32, rows), A.cols_view(0, d - 1), idx.data(), Bt),
                     "row_dots");
  }
}

// router on the host backends against the router's definition written out in double
// (docs/TRUE_HYBRID.md): per sequence an EMA from zero, novelty 1 - cos(u_t, m_{t-1}), position
// log2(1 + t) / 16, s_t = w.u_t + fw.f_t + b; chunk routing broadcasts each chunk's first logit.
TEST(BatchGrad, Router) {
  const int D = 23;
  const std::vector<int> lens = {9, 1, 30};
  Rng rng(44);
  int n = 0;
  for (int l : lens) n += l;
  std::vector<float> u(size_t(n) * D), w(static_cast<size_t>(D)), fw(kRouterFeatures), b(1);
  for (auto* v : {&u, &w, &fw, &b})
    for (float& e : *v) e = float(rng.normal());
  for (int j = 0; j < D; ++j) u[size_t(2) * D + j] = 0.0f;  // a zero row: cos is 0 there
  for (auto make : {make_cpu_backend, make_ref_backend}) {
    auto be = make();
    Ragged rg;
    for (size_t s = 0; s < lens.size(); ++s) rg.add(int(s), lens[s], 0);
    for (const int chunk : {0, 4}) {
      std::vector<float> r(size_t(n), NAN), f(size_t(n) * kRouterFeatures, NAN);
      be->router(Tensor::vec(r.data(), DType::F32, n), Tensor(f.data(), DType::F32, n, kRouterFeatures),
                 Tensor(u.data(), DType::F32, n, D), Tensor::vec(w.data(), DType::F32, D),
                 Tensor::vec(fw.data(), DType::F32, kRouterFeatures), Tensor::vec(b.data(), DType::F32, 1), rg, chunk,
                 nullptr);
      int t0 = 0;
      for (const int L : lens) {
        std::vector<double> m(size_t(D), 0.0), own(static_cast<size_t>(L));
        for (int t = 0; t < L; ++t) {
          const float* x = u.data() + size_t(t0 + t) * D;
          double dot = 0, nx = 0, nm = 0, s = b[0];
          for (int j = 0; j < D; ++j) {
            dot += x[j] * m[size_t(j)];
            nx += double(x[j]) * x[j];
            nm += m[size_t(j)] * m[size_t(j)];
            s += double(w[size_t(j)]) * x[j];
          }
          const double nov = nx > 0 && nm > 0 ? 1 - dot / std::sqrt(nx * nm) : 1.0, pos = std::log2(1.0 + t) / 16;
          s += fw[0] * nov + fw[1] * pos;
          own[size_t(t)] = s;
          for (int j = 0; j < D; ++j) m[size_t(j)] = 0.875 * m[size_t(j)] + 0.125 * x[j];
          EXPECT_NEAR(f[size_t(t0 + t) * 2], nov, 1e-5) << be->name() << " token " << t0 + t;
          EXPECT_NEAR(f[size_t(t0 + t) * 2 + 1], pos, 1e-7);
        }
        for (int t = 0; t < L; ++t)
          EXPECT_NEAR(r[size_t(t0 + t)], own[size_t(chunk > 0 ? t / chunk * chunk : t)], 1e-5 * (1 + std::fabs(own[size_t(t)])))
              << be->name() << " chunk " << chunk << " token " << t0 + t;
        t0 += L;
      }
    }
    // A column view of a wider u gives the same floats.
    std::vector<float> wide(size_t(n) * (D + 3), NAN);
    for (int t = 0; t < n; ++t) std::copy_n(u.data() + size_t(t) * D, D, wide.data() + size_t(t) * (D + 3) + 1);
    std::vector<float> r(static_cast<size_t>(n)), f(size_t(n) * kRouterFeatures), r2(r), f2(f);
    const auto run = [&](std::vector<float>& rr, std::vector<float>& ff, Tensor uu) {
      be->router(Tensor::vec(rr.data(), DType::F32, n), Tensor(ff.data(), DType::F32, n, kRouterFeatures), uu,
                 Tensor::vec(w.data(), DType::F32, D), Tensor::vec(fw.data(), DType::F32, kRouterFeatures),
                 Tensor::vec(b.data(), DType::F32, 1), rg, 3, nullptr);
    };
    run(r, f, Tensor(u.data(), DType::F32, n, D));
    run(r2, f2, Tensor(wide.data(), DType::F32, n, D + 3, D + 3).cols_view(1, D));
    EXPECT_EQ(r, r2);
    EXPECT_EQ(f, f2);
    EXPECT_THROW_MSG(be->router(Tensor::vec(r.data(), DType::F32, n), Tensor(f.data(), DType::F32, n, kRouterFeatures),
                                Tensor(u.data(), DType::F32, n, D), Tensor::vec(w.data(), DType::F32, D - 1),
                                Tensor::vec(fw.data(), DType::F32, kRouterFeatures),
                                Tensor::vec(b.data(), DType::F32, 1), rg, 0, nullptr),
                     "router");
  }
}

// Inference's router: sequences fed in pieces (cut mid-chunk, in slots out of order), each
// continuing its slot's analyzer state (EMA, chunk logit) at its position, give exactly the
// logits of one call over the whole sequences; no features asked for.
TEST(BatchGrad, RouterContinuesState) {
  const int D = 19;
  const std::vector<int> lens = {9, 1, 30};
  const std::vector<std::vector<int>> pieces = {{3, 6, 0}, {1, 0, 0}, {7, 13, 10}};  // per call
  const std::vector<int> slot_of = {2, 0, 1};
  Rng rng(45);
  int n = 0;
  for (int l : lens) n += l;
  std::vector<float> u(size_t(n) * D), w(static_cast<size_t>(D)), fw(kRouterFeatures), b(1);
  for (auto* v : {&u, &w, &fw, &b})
    for (float& e : *v) e = float(rng.normal());
  const Tensor wt = Tensor::vec(w.data(), DType::F32, D), fwt = Tensor::vec(fw.data(), DType::F32, kRouterFeatures),
               bt = Tensor::vec(b.data(), DType::F32, 1);
  for (auto make : {make_cpu_backend, make_ref_backend}) {
    auto be = make();
    for (const int chunk : {0, 4}) {
      Ragged whole;
      for (size_t s = 0; s < lens.size(); ++s) whole.add(int(s), lens[s], 0);
      std::vector<float> want(size_t(n), NAN), f(size_t(n) * kRouterFeatures);
      be->router(Tensor::vec(want.data(), DType::F32, n), Tensor(f.data(), DType::F32, n, kRouterFeatures),
                 Tensor(u.data(), DType::F32, n, D), wt, fwt, bt, whole, chunk, nullptr);

      std::vector<float> pool(size_t(3) * (D + 1), 0.0f), got(size_t(n), NAN);
      const StatePool st{pool.data(), 3, D + 1};
      std::vector<int> done(lens.size(), 0), first(lens.size(), 0);
      for (size_t s = 1; s < lens.size(); ++s) first[s] = first[s - 1] + lens[s - 1];
      for (int call = 0; call < 3; ++call) {
        Ragged rg;
        std::vector<float> uc, rc;
        for (size_t s = 0; s < lens.size(); ++s) {
          const int L = pieces[s][size_t(call)];
          if (L == 0) continue;
          rg.add(slot_of[s], L, done[s]);
          const float* src = u.data() + size_t(first[s] + done[s]) * D;
          uc.insert(uc.end(), src, src + size_t(L) * D);
        }
        const int m = rg.n_tokens();
        rc.assign(size_t(m), NAN);
        be->router(Tensor::vec(rc.data(), DType::F32, m), Tensor(), Tensor(uc.data(), DType::F32, m, D), wt, fwt, bt,
                   rg, chunk, &st);
        int k = 0;
        for (size_t s = 0; s < lens.size(); ++s) {
          const int L = pieces[s][size_t(call)];
          for (int t = 0; t < L; ++t) got[size_t(first[s] + done[s] + t)] = rc[size_t(k++)];
          done[s] += L;
        }
      }
      EXPECT_EQ(got, want) << be->name() << " chunk " << chunk;
      const StatePool narrow{pool.data(), 3, D};
      Ragged one;
      one.add(0, 1, 0);
      std::vector<float> r1(1);
      EXPECT_THROW_MSG(be->router(Tensor::vec(r1.data(), DType::F32, 1), Tensor(), Tensor(u.data(), DType::F32, 1, D),
                                  wt, fwt, bt, one, chunk, &narrow),
                       "analyzer state");
    }
  }
}
