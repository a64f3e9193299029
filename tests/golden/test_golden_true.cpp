// True Hybrid models against the PyTorch peer (bench/torch_peer.py implements docs/TRUE_HYBRID.md
// independently: router and analyzer features, routes, each path on its compacted subsequence,
// the exchange with carry-forward, fusion, the budget loss). Checkpoints: the true-tiny preset's
// config (Mamba, true, Mamba, attention with a bridge, true) with write-random weights (every
// parameter random: router, fusion scales, exchange, norms, A_log and D off their inits) in soft,
// hard and both modes, and hard with chunk granularity (chunks of 3; 14 tokens, so the split
// prefill ends mid-chunk); and the true-hybrid and true-demo presets at test size (hard).
//
// Logits: full forward, token-by-token decoding and a split prefill then decoding, float32 KV
// cache, max relative error <= 1e-4 (as the simple golden test). A hard route made on a logit
// within rounding of 0 could go either way in float32 on the two sides; the peer writes every
// true layer's routing logits and we require min |r| >= 1e-3 (the seeds were chosen for it).
// Gradients (soft, hard): the peer's float64 autograd of cross-entropy + budget loss against our
// double (<= 1e-10 per tensor) and float (<= 1e-5) gradients; loss (cross-entropy) and budget
// term compared separately. The fixtures are in tests/golden.cmake.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "train/model_grad.h"

using namespace hm;

namespace {
std::string dir_of(const std::string& name) { return std::string(HM_BINARY_DIR) + "/golden/" + name; }

struct Golden {
  int B = 0, L = 0, V = 0;
  std::vector<int32_t> tokens;
  std::vector<float> full, decode, split, route_logits;
};

Golden load_golden(const std::string& dir) {
  SafetensorsReader r(dir + "/golden.safetensors");
  Golden g;
  const TensorInfo* t = r.find("tokens");
  EXPECT_NE(t, nullptr);
  if (t == nullptr) return g;
  g.B = int(t->shape[0]);
  g.L = int(t->shape[1]);
  g.tokens.resize(size_t(g.B) * g.L);
  r.read_raw(*t, g.tokens.data());
  g.V = int(r.find("logits_full")->shape[2]);
  const std::vector<int64_t> shape = {g.B, g.L, g.V};
  for (auto [name, dst] : {std::pair{"logits_full", &g.full}, {"logits_decode", &g.decode},
                           {"logits_prefill_split", &g.split}}) {
    dst->resize(size_t(g.B) * g.L * g.V);
    r.read_f32(name, shape, dst->data());
  }
  const TensorInfo* rl = r.find("route_logits");
  EXPECT_NE(rl, nullptr) << "the peer wrote no routing logits";
  if (rl != nullptr) {
    g.route_logits.resize(size_t(rl->numel()));
    r.read_f32("route_logits", rl->shape, g.route_logits.data());
  }
  return g;
}

double rel_err(const std::vector<float>& ours, const std::vector<float>& theirs) {
  double num = 0, den = 0;
  for (size_t i = 0; i < theirs.size(); ++i) {
    num = std::max(num, double(std::fabs(ours[i] - theirs[i])));
    den = std::max(den, double(std::fabs(theirs[i])));
  }
  return num / den;
}

// The B sequences: the first `prefill` tokens of each as one chunk, then one token per step for
// all of them together (a ragged batch in hard mode: each sequence routes its own way).
std::vector<float> run(HybridModel& m, const Golden& g, int prefill) {
  HybridMemory mem(m.backend(), m.config(), g.B, g.L, KvType::F32);
  std::vector<float> out(size_t(g.B) * g.L * g.V), logits;
  auto put = [&](int b, int t, const float* src) {
    std::memcpy(out.data() + (size_t(b) * g.L + t) * g.V, src, sizeof(float) * size_t(g.V));
  };
  Batch first;
  first.logits_all = true;
  for (int b = 0; b < g.B; ++b)
    first.add(b, std::vector<int32_t>(g.tokens.begin() + long(b) * g.L, g.tokens.begin() + long(b) * g.L + prefill));
  m.forward(first, mem, logits);
  for (int b = 0; b < g.B; ++b)
    for (int t = 0; t < prefill; ++t) put(b, t, logits.data() + (size_t(b) * prefill + t) * g.V);
  for (int t = prefill; t < g.L; ++t) {
    Batch step;
    for (int b = 0; b < g.B; ++b) step.add(b, {g.tokens[size_t(b) * g.L + t]});
    m.forward(step, mem, logits);
    for (int b = 0; b < g.B; ++b) put(b, t, logits.data() + size_t(b) * g.V);
  }
  return out;
}

void check_logits(const std::string& variant, const char* mode, const char* granularity) {
  const std::string dir = dir_of(variant);
  auto be = make_cpu_backend();
  auto m = load_model(dir, *be);
  ASSERT_EQ(m->config().hybrid, "true");
  ASSERT_EQ(m->config().routing_mode, mode);
  ASSERT_EQ(m->config().routing_granularity, granularity);
  const Golden g = load_golden(dir);
  ASSERT_EQ(g.V, m->config().vocab_size);
  ASSERT_EQ(g.route_logits.size(), m->config().true_layers.size() * size_t(g.B) * size_t(g.L));
  double margin = INFINITY;
  int to_attn = 0;
  for (float r : g.route_logits) {
    margin = std::min(margin, double(std::fabs(r)));
    to_attn += r > 0;
  }
  std::printf("  %s: min |route logit| %.3g, %d of %zu routing logits > 0\n", variant.c_str(), margin,
              to_attn, g.route_logits.size());
  if (m->config().routing_mode == "hard") {
    EXPECT_GE(margin, 1e-3) << "a hard route hangs on a logit near 0: choose another seed";
    // Both paths must be exercised, or the compaction and the exchange are not tested.
    EXPECT_GT(to_attn, 0);
    EXPECT_LT(to_attn, int(g.route_logits.size()));
  }
  const double e_full = rel_err(run(*m, g, g.L), g.full);
  const double e_dec = rel_err(run(*m, g, 1), g.decode);
  const double e_split = rel_err(run(*m, g, g.L / 2), g.split);
  std::printf("  %s: rel err full %.2e, decode %.2e, split %.2e\n", variant.c_str(), e_full, e_dec, e_split);
  EXPECT_LT(e_full, 1e-4);
  EXPECT_LT(e_dec, 1e-4);
  EXPECT_LT(e_split, 1e-4);
  // The peer's own cached paths must match its full forward; otherwise the goldens are no reference.
  EXPECT_LT(rel_err(g.decode, g.full), 1e-4);
  EXPECT_LT(rel_err(g.split, g.full), 1e-4);
}

// ---- gradients

std::vector<double> read_f64(const SafetensorsReader& r, const std::string& name,
                             const std::vector<int64_t>& shape) {
  const TensorInfo* t = r.find(name);
  if (t == nullptr) {
    ADD_FAILURE() << "missing tensor " << name;
    return {};
  }
  EXPECT_EQ(t->dtype, DType::F64) << name;
  EXPECT_EQ(t->shape, shape) << name;
  std::vector<double> v(size_t(t->numel()));
  if (t->dtype == DType::F64 && t->shape == shape) r.read_raw(*t, v.data());
  return v;
}

template <class A>
double compare(const Params& p, const A* ours, const std::vector<std::vector<double>>& ref_grads,
               const char* what) {
  double worst = 0;
  for (size_t k = 0; k < p.specs().size(); ++k) {
    const std::vector<double>& ref = ref_grads[k];
    const A* a = ours + (p.at(k) - p.data());
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      num = std::max(num, std::fabs(double(a[i]) - ref[i]));
      den = std::max(den, std::fabs(ref[i]));
    }
    EXPECT_GT(den, 0.0) << p.specs()[k].name << ": PyTorch gradient is zero";
    const double e = num / std::max(den, 1e-300);
    if (std::getenv("HM_GRAD_VERBOSE"))
      std::printf("  %-6s %-44s max|g| %.3e  rel err %.2e\n", what, p.specs()[k].name.c_str(), den, e);
    worst = std::max(worst, e);
  }
  return worst;
}

void check_grads(const std::string& variant) {
  const std::string dir = dir_of(variant);
  const ModelConfig c = load_config(dir + "/config.json");
  Params p(c);
  load_params(p, dir + "/model.safetensors");
  SafetensorsReader r(dir + "/grads.safetensors");
  const TensorInfo* tok = r.find("tokens");
  const TensorInfo* tgt = r.find("targets");
  ASSERT_TRUE(tok && tgt && tok->dtype == DType::I32 && tgt->dtype == DType::I32 &&
              tok->shape.size() == 2 && tok->shape == tgt->shape);
  const int B = int(tok->shape[0]), L = int(tok->shape[1]);
  std::vector<int32_t> tokens(size_t(B) * L), targets(tokens.size());
  r.read_raw(*tok, tokens.data());
  r.read_raw(*tgt, targets.data());
  const double t_loss = read_f64(r, "loss", {}).at(0);
  const double t_budget = read_f64(r, "budget_loss", {}).at(0);
  std::vector<std::vector<double>> ref;
  for (const ParamSpec& s : p.specs()) ref.push_back(read_f64(r, "grad." + s.name, s.shape));

  std::vector<double> pd(size_t(p.numel()), 0.0), gd(pd.size(), 0.0);
  for (size_t k = 0; k < p.specs().size(); ++k)
    for (int64_t i = 0; i < p.specs()[k].numel(); ++i) pd[size_t(p.at(k) - p.data() + i)] = p.at(k)[i];
  if (c.routing_mode == "hard") {  // the same margin as for the logits: no route near its threshold
    LossAux aux;
    aux.want_logits = true;
    loss_only_arena<double>(p, pd.data(), tokens.data(), targets.data(), B, L, &aux);
    ASSERT_FALSE(aux.logits.empty());
    double margin = INFINITY;
    for (double x : aux.logits) margin = std::min(margin, std::fabs(x));
    std::printf("  %s: min |route logit| on the gradient batch %.3g\n", variant.c_str(), margin);
    EXPECT_GE(margin, 1e-3) << "a hard route hangs on a logit near 0: choose another seed";
  }
  double budget = 0;
  const double loss = loss_and_grad_arena<double>(p, pd.data(), gd.data(), tokens.data(), targets.data(),
                                                  B, L, 0, false, &budget);
  std::printf("  %s: loss ours %.15f, PyTorch %.15f; budget ours %.15g, PyTorch %.15g\n", variant.c_str(),
              loss, t_loss, budget, t_budget);
  EXPECT_NEAR(loss, t_loss, 1e-12 * std::fabs(t_loss));
  EXPECT_GT(t_budget, 0.0);
  EXPECT_NEAR(budget, t_budget, 1e-12 * std::fabs(t_budget) + 1e-300);
  const double worst = compare(p, gd.data(), ref, "f64");
  std::printf("  %s: worst tensor, double: %.2e\n", variant.c_str(), worst);
  EXPECT_LE(worst, 1e-10);

  Params gf(c);
  std::fill(gf.data(), gf.data() + gf.numel(), 0.0f);
  double budgetf = 0;
  const double lossf = loss_and_grad(p, gf, tokens.data(), targets.data(), B, L, 0, false, &budgetf);
  EXPECT_NEAR(lossf, t_loss, 1e-6 * std::fabs(t_loss));
  EXPECT_NEAR(budgetf, t_budget, 1e-5 * std::fabs(t_budget));
  const double worstf = compare(p, gf.data(), ref, "f32");
  std::printf("  %s: worst tensor, float: %.2e\n", variant.c_str(), worstf);
  EXPECT_LE(worstf, 1e-5);
}
}  // namespace

TEST(GoldenTrue, SoftRoutingMatchesPyTorch) { check_logits("true_tiny_soft", "soft", "token"); }
TEST(GoldenTrue, HardRoutingMatchesPyTorch) { check_logits("true_tiny_hard", "hard", "token"); }
TEST(GoldenTrue, BothPathsMatchPyTorch) { check_logits("true_tiny_both", "both", "token"); }
TEST(GoldenTrue, HardChunkRoutingMatchesPyTorch) { check_logits("true_tiny_chunk", "hard", "chunk"); }
// The true-hybrid and true-demo presets at test size (tests/golden.cmake), hard routing.
TEST(GoldenTrue, TrueHybridPresetMatchesPyTorch) { check_logits("true_hybrid", "hard", "token"); }
TEST(GoldenTrue, TrueDemoPresetMatchesPyTorch) { check_logits("true_demo", "hard", "token"); }

TEST(GoldenTrue, SoftGradientsMatchPyTorchAutograd) { check_grads("true_tiny_soft"); }
TEST(GoldenTrue, HardGradientsMatchPyTorchAutograd) { check_grads("true_tiny_hard"); }
