// Mixture-of-experts FFN layers (config moe_layers; model.cpp, HybridModel::moe): against a plain
// double-precision reference written out below, every expert not chosen skipped (counted), the
// same logits whatever the batching, and bad configs refused.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <functional>
#include <cmath>
#include <numeric>
#include <vector>

#include "backend/counting_backend.h"
#include "core/error.h"
#include "model/config.h"
#include "model/model.h"
#include "runtime/memory.h"
#include "test_util.h"
#include "train/model_grad.h"

namespace hm {
namespace {

// One attention layer whose output projection is zero (so the stream entering the FFN is the
// token's embedding, whatever its context), then an MoE FFN: small enough to write out by hand.
ModelConfig moe_config(int experts, int top_k, bool renormalize) {
  ModelConfig c;
  c.d_model = 16;
  c.n_layers = 1;
  c.attention_layers = {0};
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.vocab_size = 37;
  c.d_ff = 12;
  c.state_bridges = false;
  c.tie_embeddings = false;
  c.moe_layers = {0};
  c.moe_experts = experts;
  c.moe_top_k = top_k;
  c.moe_renormalize = renormalize;
  return c;
}

std::vector<double> rmsnorm(const float* x, const float* w, int d, double eps) {
  double ss = 0;
  for (int i = 0; i < d; ++i) ss += double(x[i]) * x[i];
  const double r = 1.0 / std::sqrt(ss / d + eps);
  std::vector<double> y(static_cast<size_t>(d), 0.0);
  for (int i = 0; i < d; ++i) y[size_t(i)] = x[i] * r * w[i];
  return y;
}

// Logits of token `tok` through moe_config's model, in double, from the parameters alone.
std::vector<double> reference_logits(const Params& p, int tok) {
  const ModelConfig& c = p.config();
  const int D = c.d_model, F = c.d_ff, X = c.moe_experts, V = c.vocab_size;
  const LayerWeights& w = p.layer(0);
  std::vector<float> h(p.embeddings() + int64_t(tok) * D, p.embeddings() + int64_t(tok + 1) * D);
  const std::vector<double> u = rmsnorm(h.data(), w.mlp_norm, D, c.norm_eps);
  std::vector<double> prob(static_cast<size_t>(X));
  for (int e = 0; e < X; ++e) {
    double s = 0;
    for (int i = 0; i < D; ++i) s += double(w.moe_router[int64_t(e) * D + i]) * u[size_t(i)];
    prob[size_t(e)] = s;
  }
  const double mx = *std::max_element(prob.begin(), prob.end());
  double z = 0;
  for (double& v : prob) z += (v = std::exp(v - mx));
  for (double& v : prob) v /= z;
  std::vector<int> order(static_cast<size_t>(X));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return prob[size_t(a)] > prob[size_t(b)]; });
  double top = 0;
  for (int j = 0; j < c.moe_top_k; ++j) top += prob[size_t(order[size_t(j)])];
  std::vector<double> h2(h.begin(), h.end());
  for (int j = 0; j < c.moe_top_k; ++j) {
    const int e = order[size_t(j)];
    const double gate = c.moe_renormalize ? prob[size_t(e)] / top : prob[size_t(e)];
    const float* Wg = w.e_gate + int64_t(e) * F * D;
    const float* Wu = w.e_up + int64_t(e) * F * D;
    const float* Wd = w.e_down + int64_t(e) * D * F;
    std::vector<double> a(static_cast<size_t>(F));
    for (int f = 0; f < F; ++f) {
      double g = 0, up = 0;
      for (int i = 0; i < D; ++i) {
        g += double(Wg[int64_t(f) * D + i]) * u[size_t(i)];
        up += double(Wu[int64_t(f) * D + i]) * u[size_t(i)];
      }
      a[size_t(f)] = g / (1 + std::exp(-g)) * up;
    }
    for (int i = 0; i < D; ++i) {
      double y = 0;
      for (int f = 0; f < F; ++f) y += double(Wd[int64_t(i) * F + f]) * a[size_t(f)];
      h2[size_t(i)] += gate * y;
    }
  }
  std::vector<float> h2f(h2.begin(), h2.end());
  const std::vector<double> hn = rmsnorm(h2f.data(), p.norm_f(), D, c.norm_eps);
  std::vector<double> logits(static_cast<size_t>(V));
  for (int v = 0; v < V; ++v) {
    double s = 0;
    for (int i = 0; i < D; ++i) s += double(p.lm_head()[int64_t(v) * D + i]) * hn[size_t(i)];
    logits[size_t(v)] = s;
  }
  return logits;
}

std::unique_ptr<HybridModel> moe_model(Backend& be, const ModelConfig& c, uint64_t seed) {
  auto m = std::make_unique<HybridModel>(c, be);
  test::randomize_params(m->params(), seed);
  // Routers with logits of order 1, so the top k differ from token to token.
  const LayerWeights& w = m->params().layer(0);
  Rng rng(seed + 7);
  for (int64_t i = 0; i < int64_t(c.moe_experts) * c.d_model; ++i) w.moe_router[i] = float(rng.normal());
  std::fill(w.wo, w.wo + int64_t(c.d_model) * c.d_model, 0.0f);  // the attention layer adds nothing
  m->prepare();
  return m;
}

}  // namespace

TEST(Moe, MatchesPlainReference) {
  auto be = make_cpu_backend();
  for (auto [X, k, renorm] : {std::tuple{5, 2, false}, std::tuple{5, 2, true}, std::tuple{4, 1, false},
                              std::tuple{3, 3, false}, std::tuple{7, 3, true}}) {
    SCOPED_TRACE(testing::Message() << X << " experts, top " << k << (renorm ? ", renormalized" : ""));
    const ModelConfig c = moe_config(X, k, renorm);
    auto m = moe_model(*be, c, 40 + uint64_t(X * 10 + k));
    Rng rng(9);
    const std::vector<int32_t> toks = test::tokens(rng, 23, c.vocab_size);
    const std::vector<float> got = test::forward_all(*m, toks, KvType::F16);
    std::vector<float> want;
    for (int32_t t : toks) {
      const std::vector<double> r = reference_logits(m->params(), t);
      want.insert(want.end(), r.begin(), r.end());
    }
    EXPECT_LT(test::rel_err(got, want), 1e-5);
  }
}

TEST(Moe, ReferenceCanFail) {
  // A different top k (or no renormalization) moves the logits well past the bound above.
  auto be = make_cpu_backend();
  const ModelConfig c = moe_config(5, 2, true);
  auto m = moe_model(*be, c, 3);
  Rng rng(9);
  const std::vector<int32_t> toks = test::tokens(rng, 23, c.vocab_size);
  const std::vector<float> got = test::forward_all(*m, toks, KvType::F16);
  for (auto [k, renorm] : {std::pair{1, true}, std::pair{3, true}, std::pair{2, false}}) {
    ModelConfig o = c;
    o.moe_top_k = k;
    o.moe_renormalize = renorm;
    Params p(o);
    std::copy(m->params().data(), m->params().data() + p.numel(), p.data());
    std::vector<float> want;
    for (int32_t t : toks) {
      const std::vector<double> r = reference_logits(p, t);
      want.insert(want.end(), r.begin(), r.end());
    }
    EXPECT_GT(test::rel_err(got, want), 1e-3) << "top " << k << (renorm ? " renormalized" : "");
  }
}

TEST(Moe, OnlyChosenExpertsRun) {
  // Linear rows: q | k | v in one projection and o (2 T), the router (T), then gate, up and down
  // of exactly top_k experts per token (3 k T), then the head (T): experts nobody chose are
  // never run.
  auto cpu = make_cpu_backend();
  CountingBackend be(*cpu);
  for (int k : {1, 2, 4}) {
    const ModelConfig c = moe_config(6, k, false);
    auto m = moe_model(be, c, 11);
    Rng rng(4);
    const std::vector<int32_t> toks = test::tokens(rng, 19, c.vocab_size);
    be.reset();
    test::forward_all(*m, toks, KvType::F16);
    const int64_t T = int64_t(toks.size());
    ASSERT_TRUE(m->fused_qkv());
    EXPECT_EQ(be.count(OpKind::Linear).rows, 2 * T + T + 3 * k * T + T) << "top " << k;
  }
}

TEST(Moe, BatchingDoesNotChangeTheAnswer) {
  // Prefill, token-by-token decode and two sequences in one batch give the same logits.
  auto be = make_cpu_backend();
  ModelConfig c = moe_config(5, 2, true);
  c.n_layers = 3;
  c.attention_layers = {1};
  c.moe_layers = {0, 2};  // Mamba + MoE, attention + dense MLP, Mamba + MoE
  c.state_bridges = true;
  auto m = std::make_unique<HybridModel>(c, *be);
  test::randomize_params(*m, 21);
  Rng rng(5);
  const std::vector<int32_t> a = test::tokens(rng, 17, c.vocab_size), b = test::tokens(rng, 9, c.vocab_size);
  const std::vector<float> full_a = test::forward_all(*m, a, KvType::F16);
  const std::vector<float> full_b = test::forward_all(*m, b, KvType::F16);
  const int V = c.vocab_size;
  // The f16 cache's tolerance, as test_model.cpp's kv_tol.
  EXPECT_LT(test::rel_err(test::forward_stepwise(*m, a, KvType::F16), full_a), 1e-4);
  HybridMemory mem(*be, c, 2, 32);
  Batch both;
  both.logits_all = true;
  both.add(0, a);
  both.add(1, b);
  std::vector<float> out;
  m->forward(both, mem, out);
  const std::vector<float> out_a(out.begin(), out.begin() + a.size() * size_t(V));
  const std::vector<float> out_b(out.begin() + a.size() * size_t(V), out.end());
  // Float noise only: OpenBLAS picks its GEMM kernel by m and by CPU, so two sequences in one
  // batch sum in another order than one alone (1.5e-5 on a Zen 4 EPYC, under 1e-5 on the Xeons).
  // A row mixed up between sequences or a wrong expert moves logits by O(1).
  EXPECT_LT(test::rel_err(out_a, full_a), 1e-4);
  EXPECT_LT(test::rel_err(out_b, full_b), 1e-4);
}

TEST(Moe, ConfigRoundTripAndBadConfigs) {
  const ModelConfig c = moe_config(5, 2, true);
  const ModelConfig back = config_from_json(config_to_json(c));
  EXPECT_EQ(back.moe_layers, c.moe_layers);
  EXPECT_EQ(back.moe_experts, 5);
  EXPECT_EQ(back.moe_top_k, 2);
  EXPECT_TRUE(back.moe_renormalize);
  auto bad = [&](const std::function<void(ModelConfig&)>& edit, const char* field) {
    ModelConfig x = c;
    edit(x);
    try {
      validate(x);
      ADD_FAILURE() << "accepted a bad " << field;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  bad([](ModelConfig& x) { x.moe_top_k = 6; }, "moe_top_k");
  bad([](ModelConfig& x) { x.moe_top_k = 0; }, "moe_top_k");
  bad([](ModelConfig& x) { x.moe_experts = 0; }, "moe_experts");
  bad([](ModelConfig& x) { x.moe_layers = {1}; }, "moe_layers");
  bad([](ModelConfig& x) { x.moe_layers = {0, 0}; }, "moe_layers");
  bad([](ModelConfig& x) { x.d_ff = 0; }, "d_ff");
}

// Training's forward (model_grad.h's loss_only, through BatchGrad) routes as inference does: the
// same loss (BatchGrad.MoeTrains checks its gradients).
TEST(Moe, TrainingForwardIsInference) {
  const ModelConfig c = moe_config(5, 2, false);
  auto cpu = make_cpu_backend();
  HybridModel m(c, *cpu);
  init_params(m.params(), 1);
  m.prepare();
  std::vector<int32_t> toks(16), tgts(16);
  for (int i = 0; i < 16; ++i) toks[size_t(i)] = (i * 7 + 3) % c.vocab_size, tgts[size_t(i)] = (i * 5 + 1) % c.vocab_size;
  const double want = test::inference_mean_loss(m, toks, tgts, 2, 8);
  EXPECT_NEAR(loss_only(m.params(), toks.data(), tgts.data(), 2, 8), want, 2e-6 * want);
}

}  // namespace hm
