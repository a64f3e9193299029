// Falcon-H1 (FalconH1ForCausalLM), src/io/hf_model.cpp: every layer runs a Mamba-2 mixer and
// attention on the same normed input and adds both (our True Hybrid layer in "both" mode with a
// Mamba-2 path), then a SwiGLU MLP; a dozen constant multipliers. The mapping, loading under
// transformers' names, each multiplier against its meaning written into the weights instead, the
// parallel layer against a double reference written here, a true layer's Mamba-2 path under every
// routing mode, refusals, and parity with transformers on make_fixtures.py's fixtures (skipped
// when absent).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "core/error.h"
#include "io/hf_model.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "runtime/memory.h"
#include "hf_test_util.h"
#include "test_util.h"

namespace hm {
namespace {

using test::edit_config;
using test::expect_load_error;

namespace fs = std::filesystem;
using nlohmann::json;
using test::forward_all;
using test::forward_stepwise;
using test::read_f32_file;
using test::read_json;
using test::write_text;

const fs::path kFixtures = fs::path(HM_SOURCE_DIR) / "tests" / "fixtures" / "hf";

// transformers' name of each of our tensors (modeling_falcon_h1.py's module tree), or "" for the
// true layer's own tensors, which a Falcon-H1 checkpoint does not have.
std::string falcon_name(const std::string& ours) {
  if (ours == "backbone.embeddings.weight") return "model.embed_tokens.weight";
  if (ours == "backbone.norm_f.weight") return "model.final_layernorm.weight";
  if (ours == "lm_head.weight") return ours;
  const size_t a = std::strlen("backbone.layers."), b = ours.find('.', a);
  const std::string L = "model.layers." + ours.substr(a, b - a) + ".", rest = ours.substr(b + 1);
  if (rest == "mixer.fuse_mamba" || rest == "mixer.fuse_attn" || rest == "mixer.exchange" ||
      rest.compare(0, 13, "mixer.router.") == 0)
    return "";
  if (rest == "norm.weight") return L + "input_layernorm.weight";
  if (rest == "mlp_norm.weight") return L + "pre_ff_layernorm.weight";
  if (rest.compare(0, 4, "mlp.") == 0) return L + "feed_forward." + rest.substr(4);
  for (const char* p : {"q_proj", "k_proj", "v_proj", "o_proj"})
    if (rest == std::string("mixer.") + p + ".weight") return L + "self_attn." + p + ".weight";
  return L + "mamba." + rest.substr(6);
}

// Changes a tensor (transformers' name, its data) before it is written.
using Tweak = std::function<void(const std::string&, float*, const std::vector<int64_t>&)>;

// A FalconH1ForCausalLM folder (FalconH1Config's fields as transformers 5 saves them) with random
// weights under its names; `arena` gets them in our layout, the true layers' fusion scales 1,
// exchange and router 0 (the loader's values when the out multipliers are 1). hidden 32, 3 layers;
// attention 4 heads (2 KV) of head_dim 12, RoPE theta 500; Mamba-2 of width 48: 6 heads of 8 in 2
// groups, d_state 8, conv 3, no gated norm; MLP 40. `fields` edits config.json.
fs::path write_falcon_folder(const test::TempDir& tmp, const std::function<void(json&)>& fields, ModelConfig& c,
                             std::vector<float>& arena, const Tweak& tweak = nullptr, const char* sub = "falcon_h1") {
  const fs::path d = tmp.path / sub;
  fs::create_directories(d);
  json j = parse_hf_json_file([&] {
    write_text(d / "config.json", R"({
  "architectures": ["FalconH1ForCausalLM"], "model_type": "falcon_h1", "vocab_size": 100,
  "tie_word_embeddings": false, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 3,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12, "hidden_act": "silu",
  "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": true, "num_logits_to_keep": 1,
  "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 8192,
  "attention_dropout": 0.0, "mamba_d_ssm": 48, "mamba_n_heads": 6, "mamba_d_head": 8, "mamba_n_groups": 2,
  "mamba_d_state": 8, "mamba_d_conv": 3, "mamba_expand": 2, "mamba_chunk_size": 8, "mamba_conv_bias": true,
  "mamba_proj_bias": false, "mamba_norm_before_gate": true, "mamba_rms_norm": false, "time_step_min": 0.001,
  "time_step_max": 0.1, "time_step_limit": [0.0, Infinity], "projectors_bias": false,
  "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "lm_head_multiplier": 1.0,
  "embedding_multiplier": 1.0, "mlp_multipliers": [1.0, 1.0], "key_multiplier": 1.0,
  "attention_out_multiplier": 1.0, "attention_in_multiplier": 1.0, "ssm_multipliers": [1.0, 1.0, 1.0, 1.0, 1.0],
  "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0, "attention_bias": false, "mlp_bias": false,
  "dtype": "float32", "transformers_version": "5.17.0"}
)");
    return (d / "config.json").string();
  }());
  if (fields) fields(j);
  write_text(d / "config.json", j.dump(2));
  c = load_hf_config(d.string());
  Params p(c);
  test::randomize_params(p, 81);
  std::vector<std::vector<float>> copies;
  std::vector<TensorToWrite> ts;
  copies.reserve(p.specs().size());
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const ParamSpec& s = p.specs()[i];
    const std::string n = falcon_name(s.name);
    float* w = p.at(i);
    if (n.empty()) {  // fusion 1, exchange and router 0
      std::fill(w, w + s.numel(), s.name.find("fuse_") != std::string::npos ? 1.0f : 0.0f);
      continue;
    }
    copies.emplace_back(w, w + s.numel());
    if (tweak) tweak(n, copies.back().data(), s.shape);
    ts.push_back({n, DType::F32, s.shape, copies.back().data()});
  }
  write_safetensors((d / "model.safetensors").string(), ts);
  arena.assign(p.data(), p.data() + p.numel());
  return d;
}

}  // namespace

TEST(HfFalconH1, ConfigMapsFieldByField) {
  test::TempDir tmp("hf_falcon_cfg");
  ModelConfig c;
  std::vector<float> arena;
  write_falcon_folder(tmp, nullptr, c, arena);
  EXPECT_EQ(c.hybrid, "true");
  EXPECT_EQ(c.routing_mode, "both");
  EXPECT_EQ(c.true_layers, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(c.mamba2_layers, (std::vector<int>{0, 1, 2}));
  EXPECT_TRUE(c.attention_layers.empty());
  EXPECT_FALSE(c.state_bridges);
  EXPECT_EQ(c.d_ff, 40);
  EXPECT_EQ(c.mlp_act, "swiglu");
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim(), 12);
  EXPECT_TRUE(c.rope);
  EXPECT_EQ(c.resolved_rope_dim(), 12);
  EXPECT_FLOAT_EQ(c.rope_theta, 500.0f);
  EXPECT_EQ(c.d_inner(), 48);  // mamba_d_ssm
  EXPECT_EQ(c.mamba2_heads(), 6);
  EXPECT_EQ(c.mamba2_groups, 2);
  EXPECT_FALSE(c.mamba2_gated_norm);  // mamba_rms_norm false: y * silu(z)
  EXPECT_EQ(c.d_state, 8);
  EXPECT_EQ(c.d_conv, 3);
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-6f);
  EXPECT_FALSE(c.tie_embeddings);
  EXPECT_EQ(config_to_json(config_from_json(config_to_json(c))), config_to_json(c));
  EXPECT_EQ(training_unsupported(c), "");  // both-mode true layers with Mamba-2 paths train (BatchGrad)

  auto mapped = [](const std::function<void(json&)>& edit) {
    test::TempDir t("hf_falcon_cfg2");
    ModelConfig m;
    std::vector<float> a;
    write_falcon_folder(t, edit, m, a);
    return m;
  };
  // mamba_d_ssm null: mamba_expand x hidden_size; rope_theta at the top level (transformers 4);
  // the gated norm when asked for with norm_before_gate false (per group).
  const ModelConfig m2 = mapped([](json& j) {
    j["mamba_d_ssm"] = nullptr;
    j["mamba_n_heads"] = 8;
    j["mamba_d_head"] = "auto";
    j.erase("rope_parameters");
    j["rope_theta"] = 1e4;
    j["mamba_rms_norm"] = true;
    j["mamba_norm_before_gate"] = false;
    j["embedding_multiplier"] = 2.5;
    j.erase("head_dim");
  });
  EXPECT_EQ(m2.d_inner(), 64);
  EXPECT_EQ(m2.mamba2_head_dim, 8);
  EXPECT_FLOAT_EQ(m2.rope_theta, 1e4f);
  EXPECT_TRUE(m2.mamba2_gated_norm);
  EXPECT_TRUE(m2.mamba2_norm_per_group);
  EXPECT_FLOAT_EQ(m2.embedding_multiplier, 2.5f);
  EXPECT_EQ(m2.head_dim(), 8);  // hidden_size / heads
  EXPECT_EQ(m2.attn_head_dim, 0);
}

TEST(HfFalconH1, LoadsWeightsUnderTransformersNames) {
  auto be = make_cpu_backend();
  auto ref = make_ref_backend();
  const std::function<void(json&)> gated = [](json& j) {
    j["mamba_rms_norm"] = true;
    j["mamba_norm_before_gate"] = false;
  };
  for (const auto& fields : {std::function<void(json&)>(), gated}) {
    test::TempDir tmp("hf_falcon_load");
    ModelConfig c;
    std::vector<float> arena;
    const fs::path d = write_falcon_folder(tmp, fields, c, arena);
    SCOPED_TRACE(c.mamba2_gated_norm ? "gated norm" : "no norm");
    auto hf = load_any_model(d.string(), *be);
    HybridModel ours(c, *be);
    std::copy(arena.begin(), arena.end(), ours.params().data());
    ours.prepare();
    Rng rng(9);
    const std::vector<int32_t> toks = test::tokens(rng, 23, c.vocab_size);
    const std::vector<float> full = forward_all(*hf, toks);
    EXPECT_EQ(full, forward_all(ours, toks));
    const double e_step = test::rel_err(forward_stepwise(*hf, toks), full);
    EXPECT_LT(e_step, 1e-5);
    const double e_ref = test::rel_err(forward_all(*load_any_model(d.string(), *ref), toks), full);
    EXPECT_LT(e_ref, 1e-5);
    std::printf("falcon-h1 synthetic (%s): prefill = token by token within %.2g, ref backend within %.2g\n",
                c.mamba2_gated_norm ? "gated norm" : "no norm", e_step, e_ref);
    convert_hf_model(d.string(), (tmp.path / "conv").string(), "f32");
    EXPECT_EQ(forward_all(*load_any_model((tmp.path / "conv").string(), *be), toks), full);
  }
}

TEST(HfFalconH1, EachMultiplierMeansWhatItSays) {
  // A folder with one multiplier m against a folder with every multiplier 1 and m written into the
  // weights as transformers' forward applies it (identities of modeling_falcon_h1.py, written here):
  // the logits agree, and the multiplier moves them (it is not ignored).
  struct Case {
    const char* field;
    int index;  // into a list field, or -1
    double m;
    std::function<bool(const std::string&)> tensor;  // the tensors m scales
    int64_t row0 = 0, rows = -1;                      // rows of in_proj: z | x | B | C | dt
  };
  const auto is = [](const char* suffix) {
    return [suffix](const std::string& n) {
      return n.size() >= std::strlen(suffix) && n.compare(n.size() - std::strlen(suffix), std::string::npos, suffix) == 0;
    };
  };
  const int64_t E = 48, GN = 16, H = 6;
  const Case cases[] = {
      {"embedding_multiplier", -1, 2.5, is("embed_tokens.weight")},
      {"lm_head_multiplier", -1, 0.4, is("lm_head.weight")},
      {"ssm_in_multiplier", -1, 1.7, is("mamba.in_proj.weight")},
      {"ssm_multipliers", 0, 0.6, is("mamba.in_proj.weight"), 0, E},
      {"ssm_multipliers", 1, 1.9, is("mamba.in_proj.weight"), E, E},
      {"ssm_multipliers", 2, 0.5, is("mamba.in_proj.weight"), 2 * E, GN},
      {"ssm_multipliers", 3, 2.2, is("mamba.in_proj.weight"), 2 * E + GN, GN},
      {"ssm_multipliers", 4, 0.3, is("mamba.in_proj.weight"), 2 * E + 2 * GN, H},
      {"ssm_out_multiplier", -1, 1.6, is("mamba.out_proj.weight")},
      {"attention_in_multiplier", -1, 1.8,
       [](const std::string& n) {
         return n.find("self_attn.q_proj") != std::string::npos || n.find("self_attn.k_proj") != std::string::npos ||
                n.find("self_attn.v_proj") != std::string::npos;
       }},
      {"key_multiplier", -1, 2.4, is("self_attn.k_proj.weight")},
      {"attention_out_multiplier", -1, 0.45, is("self_attn.o_proj.weight")},
      {"mlp_multipliers", 0, 1.5, is("feed_forward.gate_proj.weight")},
      {"mlp_multipliers", 1, 0.7, is("feed_forward.down_proj.weight")},
  };
  auto be = make_cpu_backend();
  Rng rng(4);
  const std::vector<int32_t> toks = test::tokens(rng, 17, 100);
  test::TempDir tmp("hf_falcon_mult");
  ModelConfig c;
  std::vector<float> arena;
  const std::vector<float> plain = forward_all(*load_any_model(write_falcon_folder(tmp, nullptr, c, arena, nullptr, "plain").string(), *be), toks);
  for (const Case& k : cases) {
    SCOPED_TRACE(std::string(k.field) + "[" + std::to_string(k.index) + "]");
    const fs::path a = write_falcon_folder(tmp, [&](json& j) {
      if (k.index < 0) j[k.field] = k.m;
      else j[k.field][size_t(k.index)] = k.m;
    }, c, arena, nullptr, "a");
    const fs::path b = write_falcon_folder(tmp, nullptr, c, arena, [&](const std::string& n, float* w, const std::vector<int64_t>& shape) {
      if (!k.tensor(n)) return;
      const int64_t cols = shape.back(), rows = k.rows < 0 ? shape[0] : k.rows;
      for (int64_t r = k.row0; r < k.row0 + rows; ++r)
        for (int64_t q = 0; q < cols; ++q) w[r * cols + q] = float(double(w[r * cols + q]) * k.m);
    }, "b");
    const std::vector<float> got = forward_all(*load_any_model(a.string(), *be), toks);
    const double e = test::rel_err(got, forward_all(*load_any_model(b.string(), *be), toks));
    const double moved = test::rel_err(plain, got);
    EXPECT_LT(e, 2e-6);
    EXPECT_GT(moved, 1e-3);
    std::printf("falcon-h1 %s[%d] = %g: %.2g from the weight-scaled folder, moves the logits by %.2g\n", k.field,
                k.index, k.m, e, moved);
  }
}

TEST(HfFalconH1, ParallelLayerMatchesReference) {
  // One Falcon-H1 layer with every multiplier away from 1 and no gated norm, for one token (the
  // conv then sees only that token, the scan state starts at 0, attention returns o_proj(v)),
  // against a double reference of FalconH1DecoderLayer written here; cpu and ref backends.
  test::TempDir tmp("hf_falcon_ref");
  ModelConfig c;
  std::vector<float> arena;
  const double emb = 1.3, lmm = 0.8, ssm_in = 1.2, ssm_out = 0.7, att_in = 0.9, att_out = 1.4, gm = 1.1, dm = 0.6;
  const double ssm[5] = {0.8, 1.3, 0.9, 1.2, 1.5};
  const fs::path d = write_falcon_folder(tmp, [&](json& j) {
    j["num_hidden_layers"] = 1;
    j["embedding_multiplier"] = emb;
    j["lm_head_multiplier"] = lmm;
    j["ssm_in_multiplier"] = ssm_in;
    j["ssm_out_multiplier"] = ssm_out;
    j["attention_in_multiplier"] = att_in;
    j["attention_out_multiplier"] = att_out;
    j["mlp_multipliers"] = {gm, dm};
    j["ssm_multipliers"] = {ssm[0], ssm[1], ssm[2], ssm[3], ssm[4]};
    j["time_step_limit"] = {0.05, 0.6};
  }, c, arena);
  Params p(c);
  std::copy(arena.begin(), arena.end(), p.data());
  const LayerWeights& w = p.layer(0);
  const int D = c.d_model, V = c.vocab_size, F = c.d_ff, E = c.d_inner(), N = c.d_state, G = c.mamba2_groups;
  const int Hm = c.mamba2_heads(), P = c.mamba2_head_dim, K = c.d_conv, hd = c.head_dim(), KW = c.n_kv_heads * hd;
  const auto rmsnorm = [&](const std::vector<double>& x, const float* wt) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double r = 1.0 / std::sqrt(ss / double(x.size()) + double(c.norm_eps));
    std::vector<double> y(x.size());
    for (size_t j = 0; j < x.size(); ++j) y[j] = x[j] * r * wt[j];
    return y;
  };
  const auto matvec = [](const float* W, const std::vector<double>& x, int rows) {
    std::vector<double> y(static_cast<size_t>(rows));
    for (int r = 0; r < rows; ++r)
      for (size_t k = 0; k < x.size(); ++k) y[size_t(r)] += double(W[size_t(r) * x.size() + k]) * x[k];
    return y;
  };
  const auto silu = [](double x) { return x / (1 + std::exp(-x)); };
  const int tok = 11;
  std::vector<double> h(static_cast<size_t>(D));
  for (int j = 0; j < D; ++j) h[size_t(j)] = emb * p.embeddings()[size_t(tok) * D + j];
  const std::vector<double> u = rmsnorm(h, w.norm);
  // Mamba-2: in_proj(ssm_in * u) * mup; conv tap K-1 on the one token; dt clamped to the limit.
  std::vector<double> us = u;
  for (double& x : us) x *= ssm_in;
  std::vector<double> zxd = matvec(w.in_proj, us, 2 * E + 2 * G * N + Hm);
  const int bounds[6] = {0, E, 2 * E, 2 * E + G * N, 2 * E + 2 * G * N, 2 * E + 2 * G * N + Hm};
  for (int part = 0; part < 5; ++part)
    for (int r = bounds[part]; r < bounds[part + 1]; ++r) zxd[size_t(r)] *= ssm[part];
  std::vector<double> xbc(static_cast<size_t>(E + 2 * G * N));
  for (size_t ch = 0; ch < xbc.size(); ++ch)
    xbc[ch] = silu(double(w.conv_w[ch * size_t(K) + size_t(K - 1)]) * zxd[size_t(E) + ch] + w.conv_b[ch]);
  std::vector<double> y(static_cast<size_t>(E));
  for (int hh = 0; hh < Hm; ++hh) {
    const int g = hh / (Hm / G);
    double dt = zxd[size_t(2 * E + 2 * G * N + hh)] + w.dt_b[hh];
    dt = dt > 20 ? dt : std::log1p(std::exp(dt));
    dt = std::min(std::max(dt, 0.05), 0.6);
    double bc = 0;
    for (int n = 0; n < N; ++n) bc += xbc[size_t(E + g * N + n)] * xbc[size_t(E + G * N + g * N + n)];
    for (int q = 0; q < P; ++q) {
      const double x = xbc[size_t(hh * P + q)];
      y[size_t(hh * P + q)] = (dt * bc + w.Dskip[hh]) * x * silu(zxd[size_t(hh * P + q)]);
    }
  }
  const std::vector<double> mo = matvec(w.out_proj, y, D);
  // Attention on attn_in * u: one key.
  std::vector<double> ua = u;
  for (double& x : ua) x *= att_in;
  const std::vector<double> v = matvec(w.wv, ua, KW);
  std::vector<double> ctx(size_t(c.n_heads) * hd);
  for (int hh = 0; hh < c.n_heads; ++hh)
    for (int e = 0; e < hd; ++e) ctx[size_t(hh * hd + e)] = v[size_t((hh / (c.n_heads / c.n_kv_heads)) * hd + e)];
  const std::vector<double> ao = matvec(w.wo, ctx, D);
  for (int j = 0; j < D; ++j) h[size_t(j)] += ssm_out * mo[size_t(j)] + att_out * ao[size_t(j)];
  // MLP with its multipliers.
  const std::vector<double> um = rmsnorm(h, w.mlp_norm);
  const std::vector<double> gt = matvec(w.w_gate, um, F), upv = matvec(w.w_up, um, F);
  std::vector<double> act(static_cast<size_t>(F));
  for (int f = 0; f < F; ++f) act[size_t(f)] = upv[size_t(f)] * silu(gt[size_t(f)] * gm);
  const std::vector<double> down = matvec(w.w_down, act, D);
  for (int j = 0; j < D; ++j) h[size_t(j)] += dm * down[size_t(j)];
  const std::vector<double> lg = matvec(p.lm_head(), rmsnorm(h, p.norm_f()), V);
  std::vector<float> want(static_cast<size_t>(V));
  for (int t = 0; t < V; ++t) want[size_t(t)] = float(lmm * lg[size_t(t)]);
  auto cpu = make_cpu_backend();
  auto ref = make_ref_backend();
  for (Backend* be : {cpu.get(), ref.get()}) {
    const double e = test::rel_err(forward_all(*load_any_model(d.string(), *be), {tok}), want);
    std::printf("falcon-h1 layer vs double reference (%s): %.2g\n", be->name().c_str(), e);
    EXPECT_LT(e, 2e-6);
  }
}

TEST(HfFalconH1, NormBeforeGateMatchesReference) {
  // mamba_rms_norm with mamba_norm_before_gate true (FalconH1RMSNormGated's default): the scan
  // output is normalized per group of width / mamba_n_groups, times the weight, then gated by
  // silu(z). One layer, one token, every multiplier 1, against a double reference written here
  // (the reference's other parts as ParallelLayerMatchesReference's); 2 groups and 1; cpu and ref
  // backends. The gate-first norm of the same weights is far from it, so the check tells them apart.
  for (int groups : {2, 1}) {
    SCOPED_TRACE(groups);
    test::TempDir tmp("hf_falcon_nbg");
    ModelConfig c;
    std::vector<float> arena;
    const fs::path d = write_falcon_folder(tmp, [&](json& j) {
      j["num_hidden_layers"] = 1;
      j["mamba_rms_norm"] = true;
      j["mamba_norm_before_gate"] = true;
      j["mamba_n_groups"] = groups;
    }, c, arena);
    ASSERT_TRUE(c.mamba2_gated_norm);
    ASSERT_TRUE(c.mamba2_norm_before_gate);
    ASSERT_EQ(c.mamba2_norm_group(), c.d_inner() / groups);
    EXPECT_EQ(config_to_json(config_from_json(config_to_json(c))), config_to_json(c));
    Params p(c);
    std::copy(arena.begin(), arena.end(), p.data());
    const LayerWeights& w = p.layer(0);
    const int D = c.d_model, V = c.vocab_size, F = c.d_ff, E = c.d_inner(), N = c.d_state, G = c.mamba2_groups;
    const int Hm = c.mamba2_heads(), P = c.mamba2_head_dim, K = c.d_conv, hd = c.head_dim(), KW = c.n_kv_heads * hd;
    const auto rmsnorm = [&](const std::vector<double>& x, const float* wt) {
      double ss = 0;
      for (double v : x) ss += v * v;
      const double r = 1.0 / std::sqrt(ss / double(x.size()) + double(c.norm_eps));
      std::vector<double> y(x.size());
      for (size_t j = 0; j < x.size(); ++j) y[j] = x[j] * r * wt[j];
      return y;
    };
    const auto matvec = [](const float* W, const std::vector<double>& x, int rows) {
      std::vector<double> y(static_cast<size_t>(rows));
      for (int r = 0; r < rows; ++r)
        for (size_t k = 0; k < x.size(); ++k) y[size_t(r)] += double(W[size_t(r) * x.size() + k]) * x[k];
      return y;
    };
    const auto silu = [](double x) { return x / (1 + std::exp(-x)); };
    const int tok = 13;
    const auto reference = [&](bool norm_before_gate) {
      std::vector<double> h(p.embeddings() + size_t(tok) * D, p.embeddings() + size_t(tok) * D + D);
      const std::vector<double> u = rmsnorm(h, w.norm);
      const std::vector<double> zxd = matvec(w.in_proj, u, 2 * E + 2 * G * N + Hm);
      std::vector<double> xbc(static_cast<size_t>(E + 2 * G * N));
      for (size_t ch = 0; ch < xbc.size(); ++ch)
        xbc[ch] = silu(double(w.conv_w[ch * size_t(K) + size_t(K - 1)]) * zxd[size_t(E) + ch] + w.conv_b[ch]);
      std::vector<double> y(static_cast<size_t>(E));  // the scan of one token from state 0, D skip
      for (int hh = 0; hh < Hm; ++hh) {
        const int g = hh / (Hm / G);
        double dt = zxd[size_t(2 * E + 2 * G * N + hh)] + w.dt_b[hh];
        dt = dt > 20 ? dt : std::log1p(std::exp(dt));
        double bc = 0;
        for (int n = 0; n < N; ++n) bc += xbc[size_t(E + g * N + n)] * xbc[size_t(E + G * N + g * N + n)];
        for (int q = 0; q < P; ++q) y[size_t(hh * P + q)] = (dt * bc + w.Dskip[hh]) * xbc[size_t(hh * P + q)];
      }
      // FalconH1RMSNormGated: gate before (norm_before_gate false) or after the per-group norm.
      if (!norm_before_gate)
        for (int e = 0; e < E; ++e) y[size_t(e)] *= silu(zxd[size_t(e)]);
      const int gw = E / G;
      for (int g = 0; g < G; ++g) {
        double ss = 0;
        for (int e = g * gw; e < (g + 1) * gw; ++e) ss += y[size_t(e)] * y[size_t(e)];
        const double r = 1.0 / std::sqrt(ss / gw + double(c.norm_eps));
        for (int e = g * gw; e < (g + 1) * gw; ++e) y[size_t(e)] *= r * double(w.ssm_norm[e]);
      }
      if (norm_before_gate)
        for (int e = 0; e < E; ++e) y[size_t(e)] *= silu(zxd[size_t(e)]);
      const std::vector<double> mo = matvec(w.out_proj, y, D);
      const std::vector<double> v = matvec(w.wv, u, KW);  // attention over one key: o_proj(v)
      std::vector<double> ctx(size_t(c.n_heads) * hd);
      for (int hh = 0; hh < c.n_heads; ++hh)
        for (int e = 0; e < hd; ++e) ctx[size_t(hh * hd + e)] = v[size_t((hh / (c.n_heads / c.n_kv_heads)) * hd + e)];
      const std::vector<double> ao = matvec(w.wo, ctx, D);
      for (int j = 0; j < D; ++j) h[size_t(j)] += mo[size_t(j)] + ao[size_t(j)];
      const std::vector<double> um = rmsnorm(h, w.mlp_norm);
      const std::vector<double> gt = matvec(w.w_gate, um, F), upv = matvec(w.w_up, um, F);
      std::vector<double> act(static_cast<size_t>(F));
      for (int f = 0; f < F; ++f) act[size_t(f)] = upv[size_t(f)] * silu(gt[size_t(f)]);
      const std::vector<double> down = matvec(w.w_down, act, D);
      for (int j = 0; j < D; ++j) h[size_t(j)] += down[size_t(j)];
      const std::vector<double> lg = matvec(p.lm_head(), rmsnorm(h, p.norm_f()), V);
      return std::vector<float>(lg.begin(), lg.end());
    };
    const std::vector<float> want = reference(true);
    auto cpu = make_cpu_backend();
    auto ref = make_ref_backend();
    for (Backend* be : {cpu.get(), ref.get()}) {
      const double e = test::rel_err(forward_all(*load_any_model(d.string(), *be), {tok}), want);
      std::printf("falcon-h1 norm before gate, %d group(s), vs double reference (%s): %.2g\n", groups,
                  be->name().c_str(), e);
      EXPECT_LT(e, 2e-6);
    }
    EXPECT_GT(test::rel_err(forward_all(*load_any_model(d.string(), *cpu), {tok}), reference(false)), 1e-3);
    // Several tokens: prefill = token by token, and the ref backend agrees.
    auto m = load_any_model(d.string(), *cpu);
    Rng rng(9);
    const std::vector<int32_t> toks = test::tokens(rng, 17, c.vocab_size);
    const std::vector<float> full = forward_all(*m, toks);
    EXPECT_LT(test::rel_err(forward_stepwise(*m, toks), full), 1e-5);
    EXPECT_LT(test::rel_err(forward_all(*load_any_model(d.string(), *ref), toks), full), 1e-5);
  }
}

TEST(HfFalconH1, TrueLayerWithMamba2PathDecodesAsItPrefills) {
  // Our own true-hybrid config with Mamba-2 paths in every routing mode: prefill equals token by
  // token decoding (hard routing compacts the Mamba-2 path's tokens: skipped ones leave its conv
  // window and SSD state untouched), and the reference backend agrees.
  auto cpu = make_cpu_backend();
  auto ref = make_ref_backend();
  for (const char* mode : {"both", "soft", "hard"}) {
    SCOPED_TRACE(mode);
    ModelConfig c = preset("true-tiny");
    c.routing_mode = mode;
    c.state_bridges = false;
    c.mamba2_layers = {0, 1, 2, 4};  // the Mamba layer and both true layers
    c.mamba2_head_dim = 16;
    c.mamba2_groups = 2;
    c.mamba2_gated_norm = std::string(mode) != "soft";
    HybridModel a(c, *cpu), b(c, *ref);
    test::randomize_params(a, 17);
    std::copy(a.params().data(), a.params().data() + a.params().numel(), b.params().data());
    b.prepare();
    Rng rng(2);
    const std::vector<int32_t> toks = test::tokens(rng, 29, c.vocab_size);
    const std::vector<float> full = forward_all(a, toks);
    const double e_step = test::rel_err(forward_stepwise(a, toks), full);
    const double e_ref = test::rel_err(forward_all(b, toks), full);
    EXPECT_LT(e_step, 1e-5);
    EXPECT_LT(e_ref, 1e-5);
    if (std::string(mode) == "hard") {
      for (double f : {0.0, 0.4, 1.0}) {
        a.set_forced_attention_fraction(f);
        EXPECT_LT(test::rel_err(forward_stepwise(a, toks), forward_all(a, toks)), 1e-5) << "forced " << f;
      }
    }
  }
}

TEST(HfFalconH1, RefusesWhatItDoesNotImplement) {
  auto with = [](const std::function<void(json&)>& edit, std::initializer_list<std::string> parts) {
    test::TempDir tmp("hf_falcon_refuse");
    ModelConfig c;
    std::vector<float> arena;
    const fs::path d = write_falcon_folder(tmp, nullptr, c, arena);
    json j = parse_hf_json_file((d / "config.json").string());
    edit(j);
    write_text(d / "config.json", j.dump(2));
    expect_load_error(d, parts);
  };
  for (const char* k : {"attention_bias", "mlp_bias", "mamba_proj_bias", "projectors_bias"})
    with([k](json& j) { j[k] = true; }, {k, "biases"});
  // The gated norm (norm before gate, FalconH1Config's default) needs its weight.
  with([](json& j) { j["mamba_rms_norm"] = true; }, {"missing tensor", "mamba.norm.weight"});
  with([](json& j) { j["rope_parameters"]["rope_type"] = "linear"; }, {"rope_type", "default"});
  with([](json& j) { j["rope_parameters"]["partial_rotary_factor"] = 0.5; }, {"partial_rotary_factor"});
  with([](json& j) { j.erase("rope_parameters"); }, {"rope_theta"});
  with([](json& j) { j["hidden_act"] = "gelu"; }, {"hidden_act"});
  with([](json& j) { j["mamba_n_heads"] = 5; }, {"mamba_n_heads"});
  with([](json& j) { j["mamba_d_head"] = 16; }, {"mamba_d_head"});
  with([](json& j) { j["mamba_n_groups"] = 4; }, {"mamba_n_groups"});
  with([](json& j) { j["ssm_multipliers"] = {1.0, 1.0}; }, {"ssm_multipliers", "5"});
  with([](json& j) { j["mlp_multipliers"] = 2.0; }, {"mlp_multipliers"});
  with([](json& j) { j["embedding_multiplier"] = -1.0; }, {"embedding_multiplier"});
  with([](json& j) { j["layers_block_type"] = {"hybrid", "attention", "hybrid"}; }, {"layers_block_type[1]"});
  with([](json& j) { j["num_key_value_heads"] = 3; }, {"num_key_value_heads"});
  // Configs that disagree with the weights.
  with([](json& j) { j["head_dim"] = 8; }, {"q_proj"});
  with([](json& j) { j["mamba_conv_bias"] = false; }, {"conv1d.bias", "mamba_conv_bias"});
  with([](json& j) { j["mamba_rms_norm"] = true; j["mamba_norm_before_gate"] = false; }, {"mamba.norm.weight"});
  with([](json& j) { j["tie_word_embeddings"] = true; }, {"lm_head.weight"});
}

namespace {

// One Falcon-H1 fixture of make_fixtures.py against transformers' logits (whole sequence, token by
// token, greedy continuation), after checking what the script read off transformers' modules;
// false when the fixture is absent.
void check_falcon_fixture(const char* name) {
  SCOPED_TRACE(name);
  const fs::path dir = kFixtures / name;
  if (!test::has_fixture(dir)) return;
  const json exp = read_json(dir / "expected.json");
  auto be = make_cpu_backend();
  auto m = load_any_model(dir.string(), *be);
  const ModelConfig& c = m->config();
  // What the fixture script read off transformers' modules (a mismatch is a changed library).
  EXPECT_EQ(exp["attention_head_dim"].get<int>(), c.head_dim());
  EXPECT_EQ(exp["rotary_dim"].get<int>(), c.resolved_rope_dim()) << "FalconH1's RoPE rotates another width";
  EXPECT_EQ(exp["mixer_gated_norm"].get<bool>(), c.mamba2_gated_norm);
  if (exp.contains("gated_norm_group_size")) {
    EXPECT_EQ(exp["gated_norm_group_size"].get<int>(), c.mamba2_norm_group()) << "FalconH1RMSNormGated groups differently";
  }
  if (exp.contains("mixer_norm_before_gate")) {
    EXPECT_EQ(exp["mixer_norm_before_gate"].get<bool>(), c.mamba2_norm_before_gate)
        << "FalconH1RMSNormGated gates on the other side of the norm";
  }
  const json lim = exp["mixer_time_step_limit"];
  EXPECT_FLOAT_EQ(lim[0].get<float>(), c.mamba2_dt_min) << "FalconH1Mixer applies another time_step_limit";
  EXPECT_EQ(lim[1].is_null(), std::isinf(c.mamba2_dt_max)) << "FalconH1Mixer applies another time_step_limit";
  if (!lim[1].is_null()) {
    EXPECT_FLOAT_EQ(lim[1].get<float>(), c.mamba2_dt_max);
  }

  test::expect_matches_transformers(dir, *m);
  const std::vector<int32_t> toks = exp["tokens"].get<std::vector<int32_t>>();
  const std::vector<float> want = read_f32_file(dir / "logits.f32");
  m->params().layer(0).Dskip[1] += 0.05f;
  m->prepare();
  EXPECT_GT(test::rel_err(forward_all(*m, toks), want), 1e-4);
}

}  // namespace

TEST(HfFalconH1, LogitsMatchTransformers) {
  for (const char* name : {"falcon_h1_f32", "falcon_h1_bf16"}) check_falcon_fixture(name);
}

TEST(HfFalconH1, NormBeforeGateLogitsMatchTransformers) {
  // mamba_rms_norm with mamba_norm_before_gate true: rmsnorm(y) * w * silu(z) per group.
  check_falcon_fixture("falcon_h1_nbg");
}

}  // namespace hm
