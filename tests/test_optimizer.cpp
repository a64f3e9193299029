#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/params.h"
#include "train/optimizer.h"

namespace fs = std::filesystem;
using hm::AdamW;
using hm::AdamWConfig;
using hm::ModelConfig;
using hm::Params;

namespace {

struct OptTempDir {
  fs::path path;
  explicit OptTempDir(const std::string& tag)
      : path(fs::temp_directory_path() / ("hm_opt_" + tag + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~OptTempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Whole arena, padding included, so tests also see whether padding was touched.
void fill_normal(Params& p, hm::Rng& rng, double scale) {
  for (int64_t k = 0; k < p.numel(); ++k) p.data()[k] = float(scale * rng.normal());
}

void copy(Params& dst, const Params& src) {
  ASSERT_EQ(dst.numel(), src.numel());
  std::memcpy(dst.data(), src.data(), size_t(src.numel()) * sizeof(float));
}

bool same_bits(const Params& a, const Params& b) {
  return a.numel() == b.numel() && std::memcmp(a.data(), b.data(), size_t(a.numel()) * sizeof(float)) == 0;
}

// Marks every padding float of p with value (padding sits between the end of one tensor and the
// start of the next, and after the last one).
void fill_padding(Params& p, float value) {
  std::vector<char> used(size_t(p.numel()), 0);
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const int64_t off = p.at(i) - p.data();
    for (int64_t k = 0; k < p.specs()[i].numel(); ++k) used[size_t(off + k)] = 1;
  }
  for (int64_t k = 0; k < p.numel(); ++k)
    if (!used[size_t(k)]) p.data()[k] = value;
}

// Scalar AdamW written straight from the formula, one element at a time, over the named tensors.
struct RefAdamW {
  AdamWConfig c;
  std::vector<std::vector<float>> m, v;
  int64_t t = 0;

  RefAdamW(const Params& p, AdamWConfig cfg) : c(cfg) {
    for (const auto& s : p.specs()) {
      m.emplace_back(size_t(s.numel()), 0.0f);
      v.emplace_back(size_t(s.numel()), 0.0f);
    }
  }
  double step(Params& p, Params& g, float lr) {
    double ss = 0.0;
    for (size_t i = 0; i < p.specs().size(); ++i)
      for (int64_t k = 0; k < p.specs()[i].numel(); ++k) ss += double(g.at(i)[k]) * double(g.at(i)[k]);
    const double norm = std::sqrt(ss);
    float scale = 1.0f;
    if (c.clip_norm > 0.0f && norm > c.clip_norm) scale = float(c.clip_norm / norm);
    ++t;
    const float bc1 = float(1.0 - std::pow(double(c.beta1), double(t)));
    const float bc2 = float(1.0 - std::pow(double(c.beta2), double(t)));
    for (size_t i = 0; i < p.specs().size(); ++i) {
      const bool decay = hm::decays(p.specs()[i].name);
      for (int64_t k = 0; k < p.specs()[i].numel(); ++k) {
        const float gk = g.at(i)[k] * scale;
        float& mk = m[i][size_t(k)];
        float& vk = v[i][size_t(k)];
        mk = c.beta1 * mk + (1.0f - c.beta1) * gk;
        vk = c.beta2 * vk + (1.0f - c.beta2) * gk * gk;
        const float m_hat = mk / bc1, v_hat = vk / bc2;
        float& w = p.at(i)[k];
        w = w - lr * (m_hat / (std::sqrt(v_hat) + c.eps) + (decay ? c.weight_decay : 0.0f) * w);
      }
    }
    return norm;
  }
};

// Agreement to a few float ulps of the operands' scale: the library may fuse multiply-adds and
// multiply by reciprocals where the reference divides, and w - lr * u may cancel.
void expect_close(const Params& got, const Params& want, float scale, const char* what) {
  int bad = 0;
  for (size_t i = 0; i < want.specs().size() && bad < 5; ++i)
    for (int64_t k = 0; k < want.specs()[i].numel() && bad < 5; ++k) {
      const float a = got.at(i)[k], b = want.at(i)[k];
      if (!(std::fabs(a - b) <= 2e-6f * (std::fabs(b) + scale))) {
        ADD_FAILURE() << what << ": " << want.specs()[i].name << "[" << k << "] = " << a << ", reference " << b;
        ++bad;
      }
    }
}

void expect_moments_close(const AdamW& opt, const RefAdamW& ref, float g_scale) {
  int bad = 0;
  for (size_t i = 0; i < opt.m().specs().size() && bad < 5; ++i)
    for (int64_t k = 0; k < opt.m().specs()[i].numel() && bad < 5; ++k) {
      const float m = opt.m().at(i)[k], v = opt.v().at(i)[k];
      const float rm = ref.m[i][size_t(k)], rv = ref.v[i][size_t(k)];
      if (!(std::fabs(m - rm) <= 2e-6f * (std::fabs(rm) + g_scale)) ||
          !(std::fabs(v - rv) <= 2e-6f * (rv + g_scale * g_scale))) {
        ADD_FAILURE() << opt.m().specs()[i].name << "[" << k << "]: m " << m << " vs " << rm << ", v " << v
                      << " vs " << rv;
        ++bad;
      }
    }
}

ModelConfig tiny() { return hm::preset("tiny"); }

ModelConfig tiny_untied() {
  ModelConfig c = hm::preset("tiny");
  c.tie_embeddings = false;
  return c;
}

// Runs `steps` steps of the library and the reference side by side from the same start.
void run_against_reference(const ModelConfig& mc, AdamWConfig c, int steps, double grad_scale) {
  Params p(mc), pr(mc), g(mc), gr(mc);
  hm::Rng rng(7);
  fill_normal(p, rng, 0.5);
  fill_padding(p, 123.0f);
  copy(pr, p);
  AdamW opt(p, c);
  RefAdamW ref(pr, c);
  for (int s = 0; s < steps; ++s) {
    fill_normal(g, rng, grad_scale);
    fill_padding(g, std::numeric_limits<float>::quiet_NaN());  // padding must not reach the norm
    copy(gr, g);
    const float lr = 1e-2f * float(s + 1);
    const double n = opt.step(p, g, lr);
    const double nr = ref.step(pr, gr, lr);
    EXPECT_NEAR(n, nr, 1e-9 * nr) << "step " << s;
    expect_close(p, pr, 0.5f, "params");
    // Moments see clipped gradients: their scale is the clipped one.
    const float g_scale = float(grad_scale * (c.clip_norm > 0 && nr > c.clip_norm ? c.clip_norm / nr : 1.0));
    expect_moments_close(opt, ref, g_scale);
  }
  EXPECT_EQ(opt.steps(), steps);
  Params pad(mc);  // marks where the padding floats are: they must still hold 123
  hm::zero(pad);
  fill_padding(pad, 1.0f);
  for (int64_t k = 0; k < p.numel(); ++k)
    if (pad.data()[k] == 1.0f) {
      ASSERT_EQ(p.data()[k], 123.0f) << "padding float " << k << " changed";
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Which tensors decay

TEST(AdamW, DecayRuleCoversEveryTensorOfTinyAndSeed) {
  // Independent table by suffix: exactly one entry must match each tensor name.
  const std::vector<std::pair<std::string, bool>> rules = {
      {"embeddings.weight", false}, {"norm.weight", false}, {"norm_f.weight", false}, {".bias", false},
      {".A_log", false},            {".D", false},          {".gate", false},         {"conv1d.weight", true},
      {"proj.weight", true},  // in/out/x/dt, q/k/v/o, gate/up/down and bridge proj
      {"lm_head.weight", true},
  };
  for (const ModelConfig& mc : {tiny(), tiny_untied(), hm::preset("seed")}) {
    std::vector<int> seen(rules.size(), 0);
    for (const auto& s : hm::param_layout(mc)) {
      int match = -1, count = 0;
      for (size_t r = 0; r < rules.size(); ++r)
        if (ends_with(s.name, rules[r].first)) match = int(r), ++count;
      ASSERT_EQ(count, 1) << s.name << " matches " << count << " rules";
      ++seen[size_t(match)];
      EXPECT_EQ(hm::decays(s.name), rules[size_t(match)].second) << s.name;
    }
    // Every kind of tensor the rule is about actually occurs (bridges included).
    for (size_t r = 0; r < rules.size(); ++r)
      if (rules[r].first != "lm_head.weight") {
        EXPECT_GT(seen[r], 0) << rules[r].first;
      }
  }
  for (const char* name : {"backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.out_proj.weight",
                           "backbone.layers.0.mixer.x_proj.weight", "backbone.layers.0.mixer.dt_proj.weight",
                           "backbone.layers.1.mixer.q_proj.weight", "backbone.layers.1.mixer.k_proj.weight",
                           "backbone.layers.1.mixer.v_proj.weight", "backbone.layers.1.mixer.o_proj.weight",
                           "backbone.layers.1.mlp.gate_proj.weight", "backbone.layers.1.mlp.up_proj.weight",
                           "backbone.layers.1.mlp.down_proj.weight", "backbone.bridges.1.proj.weight",
                           "lm_head.weight"})
    EXPECT_TRUE(hm::decays(name)) << name;
  for (const char* name : {"backbone.embeddings.weight", "backbone.norm_f.weight", "backbone.layers.0.norm.weight",
                           "backbone.layers.1.mlp_norm.weight", "backbone.bridges.1.norm.weight",
                           "backbone.bridges.1.gate", "backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D",
                           "backbone.layers.0.mixer.conv1d.bias", "backbone.layers.0.mixer.dt_proj.bias"})
    EXPECT_FALSE(hm::decays(name)) << name;
}

TEST(AdamW, ZeroGradientMovesOnlyDecayedTensors) {
  // With g = 0 the Adam term is 0 / (0 + eps) = 0, so the step is exactly the decay.
  Params p(tiny()), g(tiny());
  hm::Rng rng(3);
  fill_normal(p, rng, 1.0);
  Params before(tiny());
  copy(before, p);
  hm::zero(g);
  AdamWConfig c;
  c.weight_decay = 0.5f;
  AdamW opt(p, c);
  const float lr = 0.1f;
  EXPECT_EQ(opt.step(p, g, lr), 0.0);
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const bool decay = hm::decays(p.specs()[i].name);
    for (int64_t k = 0; k < p.specs()[i].numel(); ++k) {
      const float w0 = before.at(i)[k];
      if (decay) {
        ASSERT_NEAR(p.at(i)[k], w0 - lr * c.weight_decay * w0, 1e-6f * std::fabs(w0)) << p.specs()[i].name;
      } else {
        ASSERT_EQ(p.at(i)[k], w0) << p.specs()[i].name;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The update against the scalar reference

TEST(AdamW, MatchesScalarReferenceWithDecay) {
  AdamWConfig c;
  c.clip_norm = 0.0f;
  run_against_reference(tiny(), c, 6, 0.3);
}

TEST(AdamW, MatchesScalarReferenceWithoutDecay) {
  AdamWConfig c;
  c.clip_norm = 0.0f;
  c.weight_decay = 0.0f;
  run_against_reference(tiny(), c, 6, 0.3);
}

TEST(AdamW, MatchesScalarReferenceUntiedWithClipping) {
  AdamWConfig c;  // clip_norm 1: every step clips (norm ~ sqrt(numel) * 0.3)
  c.beta2 = 0.999f;
  c.weight_decay = 0.2f;
  run_against_reference(tiny_untied(), c, 5, 0.3);
}

TEST(AdamW, MatchesScalarReferenceOnTensorsLargeEnoughToThread) {
  ModelConfig mc = tiny();
  mc.vocab_size = 8192;  // 256K-float embedding table: the parallel paths of step and norm run
  AdamWConfig c;
  run_against_reference(mc, c, 3, 0.01);
}

// ---------------------------------------------------------------------------------------------
// Clipping and non-finite gradients

TEST(AdamW, ClippingScalesGradientsToExactlyClipNorm) {
  Params p(tiny()), g(tiny());
  hm::Rng rng(11);
  fill_normal(p, rng, 0.1);
  fill_normal(g, rng, 1.0);
  fill_padding(g, 0.0f);
  AdamWConfig c;
  c.clip_norm = 0.75f;
  AdamW opt(p, c);
  const double pre = hm::grad_norm(g);
  ASSERT_GT(pre, 10.0);
  EXPECT_EQ(opt.step(p, g, 1e-3f), pre);  // returns the pre-clip norm
  EXPECT_NEAR(hm::grad_norm(g), 0.75, 0.75 * 1e-6);  // grads now hold what was applied

  // Below the threshold nothing is scaled: the gradient is left bit for bit.
  for (int64_t k = 0; k < g.numel(); ++k) g.data()[k] *= 0.5f;
  Params keep(tiny());
  copy(keep, g);
  EXPECT_NEAR(opt.step(p, g, 1e-3f), 0.375, 1e-6);
  EXPECT_TRUE(same_bits(g, keep));
}

TEST(AdamW, GradNormIsDeterministicAndIgnoresPadding) {
  Params g(tiny());
  hm::Rng rng(5);
  fill_normal(g, rng, 1.0);
  double ss = 0.0;
  for (size_t i = 0; i < g.specs().size(); ++i)
    for (int64_t k = 0; k < g.specs()[i].numel(); ++k) ss += double(g.at(i)[k]) * double(g.at(i)[k]);
  fill_padding(g, std::numeric_limits<float>::infinity());
  const double n = hm::grad_norm(g);
  EXPECT_NEAR(n, std::sqrt(ss), 1e-12 * n);
  EXPECT_EQ(hm::grad_norm(g), n);
}

TEST(AdamW, NonFiniteGradientLeavesEverythingUntouched) {
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity()}) {
    Params p(tiny()), g(tiny());
    hm::Rng rng(13);
    fill_normal(p, rng, 0.5);
    fill_normal(g, rng, 0.1);
    AdamW opt(p, AdamWConfig{});
    opt.step(p, g, 1e-2f);  // non-zero moments first
    Params p0(tiny()), g0(tiny()), m0(tiny()), v0(tiny());
    fill_normal(g, rng, 0.1);
    g.at(5)[3] = bad;
    copy(p0, p);
    copy(g0, g);
    copy(m0, opt.m());
    copy(v0, opt.v());
    const double n = opt.step(p, g, 1e-2f);
    EXPECT_FALSE(std::isfinite(n)) << bad;
    EXPECT_EQ(opt.steps(), 1);
    EXPECT_TRUE(same_bits(p, p0));
    EXPECT_TRUE(same_bits(g, g0));
    EXPECT_TRUE(same_bits(opt.m(), m0));
    EXPECT_TRUE(same_bits(opt.v(), v0));
  }
}

// ---------------------------------------------------------------------------------------------
// Save / load

TEST(AdamW, SaveLoadRoundTripReproducesNextStepBitForBit) {
  OptTempDir dir("roundtrip");
  const std::string path = dir.file("optim.safetensors");
  Params p(tiny()), g(tiny());
  hm::Rng rng(17);
  fill_normal(p, rng, 0.5);
  AdamWConfig c;
  AdamW a(p, c);
  for (int s = 0; s < 3; ++s) {
    fill_normal(g, rng, 0.2);
    a.step(p, g, 1e-2f);
  }
  a.save(path);
  {
    hm::SafetensorsReader r(path);
    EXPECT_EQ(r.metadata().at("step"), "3");
    ASSERT_NE(r.find("m.backbone.layers.0.mixer.A_log"), nullptr);
    EXPECT_EQ(r.find("v.backbone.embeddings.weight")->dtype, hm::DType::F32);
    EXPECT_EQ(r.tensors().size(), 2 * p.specs().size());
  }
  AdamW b(p, c);
  b.load(path);
  EXPECT_EQ(b.steps(), 3);
  EXPECT_TRUE(same_bits(a.m(), b.m()));
  EXPECT_TRUE(same_bits(a.v(), b.v()));

  Params pb(tiny()), gb(tiny());
  copy(pb, p);
  fill_normal(g, rng, 0.2);
  copy(gb, g);
  a.step(p, g, 5e-3f);
  b.step(pb, gb, 5e-3f);
  EXPECT_TRUE(same_bits(p, pb));
  EXPECT_TRUE(same_bits(a.m(), b.m()));
  EXPECT_TRUE(same_bits(a.v(), b.v()));
  EXPECT_EQ(b.steps(), 4);
}

TEST(AdamW, LoadWithDifferentLayoutFailsNamingTheTensor) {
  OptTempDir dir("layout");
  const std::string path = dir.file("optim.safetensors");
  Params p(tiny());
  hm::Rng rng(19);
  fill_normal(p, rng, 0.5);
  AdamW(p, AdamWConfig{}).save(path);

  auto load_error = [&](const ModelConfig& mc) -> std::string {
    Params q(mc);
    AdamW opt(q, AdamWConfig{});
    try {
      opt.load(path);
    } catch (const hm::Error& e) {
      EXPECT_EQ(opt.steps(), 0);
      return e.what();
    }
    ADD_FAILURE() << "load succeeded";
    return "";
  };
  ModelConfig wider_state = tiny();
  wider_state.d_state = 16;  // x_proj and A_log change shape
  EXPECT_NE(load_error(wider_state).find("'m.backbone.layers.0.mixer.x_proj.weight'"), std::string::npos)
      << load_error(wider_state);
  EXPECT_NE(load_error(tiny_untied()).find("missing tensor 'm.lm_head.weight'"), std::string::npos)
      << load_error(tiny_untied());
  ModelConfig fewer = tiny();
  fewer.n_layers = 2;
  fewer.attention_layers = {1};
  // Names are checked in file order (sorted): the first extra one is layer 2's bridge.
  EXPECT_NE(load_error(fewer).find("unexpected tensor 'm.backbone.bridges.2."), std::string::npos)
      << load_error(fewer);

  // Missing step count and wrong dtype are refused too.
  std::vector<hm::F32Tensor> ts;
  const AdamW fresh(p, AdamWConfig{});
  for (size_t i = 0; i < p.specs().size(); ++i) {
    ts.push_back({"m." + p.specs()[i].name, p.specs()[i].shape, fresh.m().at(i)});
    ts.push_back({"v." + p.specs()[i].name, p.specs()[i].shape, fresh.v().at(i)});
  }
  hm::write_safetensors_f32(dir.file("nostep.safetensors"), ts, hm::DType::F32);
  AdamW opt(p, AdamWConfig{});
  EXPECT_THROW(opt.load(dir.file("nostep.safetensors")), hm::Error);
  hm::write_safetensors_f32(dir.file("f16.safetensors"), ts, hm::DType::F16, {{"step", "2"}});
  try {
    opt.load(dir.file("f16.safetensors"));
    ADD_FAILURE() << "F16 state loaded";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected F32"), std::string::npos) << e.what();
  }
  hm::write_safetensors_f32(dir.file("ok.safetensors"), ts, hm::DType::F32, {{"step", "2"}});
  opt.load(dir.file("ok.safetensors"));
  EXPECT_EQ(opt.steps(), 2);
}

// ---------------------------------------------------------------------------------------------
// Convergence

TEST(AdamW, MinimizesQuadraticOverParamsArena) {
  // loss = 1/2 sum a_k (w_k - t_k)^2 with curvatures spread over two decades.
  Params w(tiny()), g(tiny()), a(tiny()), t(tiny());
  hm::Rng rng(23);
  fill_normal(w, rng, 1.0);
  fill_normal(t, rng, 1.0);
  for (int64_t k = 0; k < a.numel(); ++k) a.data()[k] = float(0.1 + 10.0 * rng.uniform());
  auto loss = [&] {
    double l = 0.0;
    for (size_t i = 0; i < w.specs().size(); ++i)
      for (int64_t k = 0; k < w.specs()[i].numel(); ++k) {
        const double d = double(w.at(i)[k]) - double(t.at(i)[k]);
        l += 0.5 * double(a.at(i)[k]) * d * d;
      }
    return l;
  };
  AdamWConfig c;
  c.weight_decay = 0.0f;
  AdamW opt(w, c);
  const double l0 = loss();
  const int total = 400;
  for (int s = 0; s < total; ++s) {
    for (int64_t k = 0; k < g.numel(); ++k) g.data()[k] = a.data()[k] * (w.data()[k] - t.data()[k]);
    opt.step(w, g, hm::lr_at(s, 20, total, 0.1f, 1e-4f));
  }
  EXPECT_LT(loss(), 1e-4 * l0) << "start " << l0;
}

// ---------------------------------------------------------------------------------------------
// Schedule

TEST(Schedule, WarmupThenCosineToMin) {
  const float mx = 1e-3f, mn = 1e-4f;
  EXPECT_EQ(hm::lr_at(0, 10, 110, mx, mn), 0.0f);
  EXPECT_FLOAT_EQ(hm::lr_at(5, 10, 110, mx, mn), 0.5f * mx);
  EXPECT_FLOAT_EQ(hm::lr_at(10, 10, 110, mx, mn), mx);               // end of warmup
  EXPECT_FLOAT_EQ(hm::lr_at(60, 10, 110, mx, mn), 0.5f * (mx + mn));  // halfway through the cosine
  EXPECT_FLOAT_EQ(hm::lr_at(35, 10, 110, mx, mn), mn + 0.5f * (mx - mn) * (1.0f + std::cos(float(M_PI) / 4)));
  EXPECT_EQ(hm::lr_at(110, 10, 110, mx, mn), mn);
  EXPECT_EQ(hm::lr_at(111, 10, 110, mx, mn), mn);
  EXPECT_EQ(hm::lr_at(1000000, 10, 110, mx, mn), mn);
  float prev = mx;
  for (int64_t s = 10; s <= 110; ++s) {  // monotone after warmup, and within [min, max]
    const float lr = hm::lr_at(s, 10, 110, mx, mn);
    EXPECT_LE(lr, prev) << s;
    EXPECT_GE(lr, mn) << s;
    prev = lr;
  }
  for (int64_t s = 1; s <= 10; ++s) EXPECT_GT(hm::lr_at(s, 10, 110, mx, mn), hm::lr_at(s - 1, 10, 110, mx, mn));
}

TEST(Schedule, EdgeCasesAndInvalidArguments) {
  EXPECT_EQ(hm::lr_at(0, 0, 100, 1e-3f, 1e-5f), 1e-3f);  // no warmup: starts at max
  EXPECT_EQ(hm::lr_at(100, 0, 100, 1e-3f, 1e-5f), 1e-5f);
  EXPECT_THROW(hm::lr_at(0, 10, 5, 1e-3f, 0.0f), hm::Error);  // warmup beyond total
  EXPECT_THROW(hm::lr_at(0, -1, 5, 1e-3f, 0.0f), hm::Error);
  EXPECT_THROW(hm::lr_at(-1, 1, 5, 1e-3f, 0.0f), hm::Error);
}
