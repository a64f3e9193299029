// Nemotron-H (NemotronHForCausalLM), src/io/hf_model.cpp: a pattern of pre-norm residual blocks,
// each Mamba-2 (M), attention without positional encoding (*), or a squared-ReLU MLP (-); our layer
// is a mixer block with the MLP block that follows it (ffn_layers, mlp_act relu2). The mapping,
// loading under transformers' names, the relu2 op and MLP against references written here,
// refusals, and parity with transformers on make_fixtures.py's fixtures (skipped when absent).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
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

// The synthetic folder's pattern "M-*M-": our layers are (M, -), (*), (M, -).
const int kMixBlock[] = {0, 2, 3};
const int kMlpBlock[] = {1, -1, 4};

// transformers' name of each of our tensors (written from modeling_nemotron_h.py's module tree:
// P.layers.{block}.norm / .mixer.*, independently of hf_model.cpp's mapping).
std::string nemotron_name(const std::string& ours, const std::string& P) {
  if (ours == "backbone.embeddings.weight") return P + "embeddings.weight";
  if (ours == "backbone.norm_f.weight") return P + "norm_f.weight";
  if (ours == "lm_head.weight") return ours;
  const size_t a = std::strlen("backbone.layers."), b = ours.find('.', a);
  const int i = std::stoi(ours.substr(a, b - a));
  const std::string rest = ours.substr(b + 1);
  const std::string M = P + "layers." + std::to_string(kMixBlock[i]) + ".";
  const std::string F = P + "layers." + std::to_string(kMlpBlock[i]) + ".";
  if (rest == "mlp_norm.weight") return F + "norm.weight";
  if (rest == "mlp.up_proj.weight") return F + "mixer.up_proj.weight";
  if (rest == "mlp.down_proj.weight") return F + "mixer.down_proj.weight";
  return M + rest;  // norm.weight, mixer.{in_proj, conv1d, dt_bias, A_log, D, norm, out_proj, q/k/v/o_proj}
}

// A NemotronHForCausalLM folder (NemotronHConfig's fields, pattern "M-*M-") with our random weights
// under its names (prefix P); `arena` gets them in our layout. hidden 32; attention 4 heads (2 KV)
// of head_dim 12 (not 32 / 4); Mamba-2 with 4 heads of 12 (width 48) in 2 groups, d_state 8, conv 3.
fs::path write_nemotron_folder(const test::TempDir& tmp, const std::string& extra, ModelConfig& c,
                               std::vector<float>& arena, const std::string& P = "backbone.") {
  const fs::path d = tmp.path / "nemotron_h";
  fs::create_directories(d);
  write_text(d / "config.json", R"({
  "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "vocab_size": 90,
  "hidden_size": 32, "hybrid_override_pattern": "M-*M-", "num_hidden_layers": 5,
  "tie_word_embeddings": false, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
  "max_position_embeddings": 4096, "attention_bias": false, "attention_dropout": 0.0, "sliding_window": null,
  "intermediate_size": 40, "mlp_hidden_act": "relu2", "mlp_bias": false, "use_mamba_kernels": false,
  "ssm_state_size": 8, "mamba_num_heads": 4, "mamba_head_dim": 12, "mamba_hidden_act": "silu", "n_groups": 2,
  "conv_kernel": 3, "expand": 2, "time_step_min": 0.02, "time_step_max": 0.1, "time_step_limit": [0.0, Infinity],
  "time_step_floor": 0.0001, "use_conv_bias": true, "chunk_size": 8, "mamba_proj_bias": false,
  "use_bias": false, "initializer_range": 0.02, "layer_norm_epsilon": 1e-06, "residual_in_fp32": false,
  "rescale_prenorm_residual": true, "num_logits_to_keep": 1, "pad_token_id": 0, "bos_token_id": 1,
  "eos_token_id": 2, "dtype": "float32", "transformers_version": "5.17.0")" +
                                   extra + "}\n");
  c = load_hf_config(d.string());
  Params p(c);
  test::randomize_params(p, 61);
  std::vector<TensorToWrite> ts;
  for (size_t i = 0; i < p.specs().size(); ++i)
    ts.push_back({nemotron_name(p.specs()[i].name, P), DType::F32, p.specs()[i].shape, p.at(i)});
  write_safetensors((d / "model.safetensors").string(), ts);
  arena.assign(p.data(), p.data() + p.numel());
  return d;
}

// transformers' name of one of our tensors in a folder whose layer i is made of blocks mix[i] (its
// mixer) and ff[i] (its "-" or "E" block), written from modeling_nemotron_h.py's module tree
// (NemotronHMoE: gate.weight, gate.e_score_correction_bias, experts.{e}.{up,down}_proj.weight or
// transformers 5's stacked experts.{up,down}_proj, shared_experts.{up,down}_proj.weight). An expert
// stack yields one name per expert (per_expert) or the stacked one.
std::vector<std::string> moe_folder_names(const std::string& ours, const std::vector<int>& mix,
                                          const std::vector<int>& ff, const std::string& P, int experts,
                                          bool per_expert) {
  if (ours == "backbone.embeddings.weight") return {P + "embeddings.weight"};
  if (ours == "backbone.norm_f.weight") return {P + "norm_f.weight"};
  if (ours == "lm_head.weight") return {ours};
  const size_t a = std::strlen("backbone.layers."), b = ours.find('.', a);
  const int i = std::stoi(ours.substr(a, b - a));
  const std::string rest = ours.substr(b + 1);
  const std::string M = P + "layers." + std::to_string(mix[size_t(i)]) + ".";
  const std::string F = P + "layers." + std::to_string(ff[size_t(i)]) + ".mixer.";
  if (rest == "mlp_norm.weight") return {P + "layers." + std::to_string(ff[size_t(i)]) + ".norm.weight"};
  if (rest == "mlp.router.weight") return {F + "gate.weight"};
  if (rest == "mlp.router.correction_bias") return {F + "gate.e_score_correction_bias"};
  if (rest == "mlp.shared_up_proj.weight") return {F + "shared_experts.up_proj.weight"};
  if (rest == "mlp.shared_down_proj.weight") return {F + "shared_experts.down_proj.weight"};
  for (const char* proj : {"up_proj", "down_proj"})
    if (rest == std::string("mlp.experts.") + proj + ".weight") {
      if (!per_expert) return {F + "experts." + proj};
      std::vector<std::string> v;
      for (int e = 0; e < experts; ++e) v.push_back(F + "experts." + std::to_string(e) + "." + proj + ".weight");
      return v;
    }
  if (rest == "mlp.up_proj.weight" || rest == "mlp.down_proj.weight") return {F + rest.substr(4)};
  return {M + rest};
}

// A NemotronHForCausalLM folder with MoE blocks: `pattern` (its blocks), hidden 32, MLP 40; 6
// experts of 24 in 3 groups, 2 groups kept, top 3, routed_scaling_factor 2.5, a shared expert of 20;
// attention 4 heads (2 KV) of head_dim 12; Mamba-2 as write_nemotron_folder's. Our random weights
// (router scaled so scores spread, choice biases of +-0.3) under its names; `arena` gets them in our
// layout. `fields` edits config.json before it is mapped.
fs::path write_moe_folder(const test::TempDir& tmp, const std::string& pattern, ModelConfig& c,
                          std::vector<float>& arena, const std::function<void(json&)>& fields = nullptr,
                          const std::string& P = "backbone.", bool per_expert = true) {
  const fs::path d = tmp.path / "nemotron_h_moe";
  fs::create_directories(d);
  json j = parse_hf_json_file([&] {
    write_text(d / "config.json", R"({
  "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "vocab_size": 90,
  "hidden_size": 32, "tie_word_embeddings": false, "num_attention_heads": 4, "num_key_value_heads": 2,
  "head_dim": 12, "attention_bias": false, "sliding_window": null, "intermediate_size": 40,
  "mlp_hidden_act": "relu2", "mlp_bias": false, "use_mamba_kernels": false, "ssm_state_size": 8,
  "mamba_num_heads": 4, "mamba_head_dim": 12, "mamba_hidden_act": "silu", "n_groups": 2, "conv_kernel": 3,
  "time_step_min": 0.02, "time_step_limit": [0.0, Infinity], "use_conv_bias": true, "chunk_size": 8,
  "mamba_proj_bias": false, "use_bias": false, "layer_norm_epsilon": 1e-06, "n_routed_experts": 6,
  "n_shared_experts": 1, "moe_intermediate_size": 24, "moe_shared_expert_intermediate_size": 20,
  "moe_latent_size": null, "moe_shared_expert_overlap": true, "num_experts_per_tok": 3,
  "routed_scaling_factor": 2.5, "n_group": 3, "topk_group": 2, "norm_topk_prob": true,
  "num_nextn_predict_layers": 0, "dtype": "float32", "transformers_version": "5.17.0"})");
    return (d / "config.json").string();
  }());
  j["hybrid_override_pattern"] = pattern;
  j["num_hidden_layers"] = pattern.size();
  if (fields) fields(j);
  write_text(d / "config.json", j.dump(2));
  c = load_hf_config(d.string());
  std::vector<int> mix, ff;
  for (size_t k = 0; k < pattern.size(); ++k) {
    if (pattern[k] == '-' || pattern[k] == 'E') {
      ff.back() = int(k);
    } else {
      mix.push_back(int(k));
      ff.push_back(-1);
    }
  }
  Params p(c);
  test::randomize_params(p, 91);
  Rng rng(92);
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const ParamSpec& s = p.specs()[i];
    float* w = p.at(i);
    if (s.name.find("mlp.router.weight") != std::string::npos)
      for (int64_t k = 0; k < s.numel(); ++k) w[k] = float(2.0 * rng.normal() / std::sqrt(double(c.d_model)));
    if (s.name.find("router.correction_bias") != std::string::npos)
      for (int64_t k = 0; k < s.numel(); ++k) w[k] = float(0.3 * (2 * rng.uniform() - 1));
  }
  std::vector<TensorToWrite> ts;
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const ParamSpec& s = p.specs()[i];
    const std::vector<std::string> names = moe_folder_names(s.name, mix, ff, P, c.moe_experts, per_expert);
    if (names.size() == 1) {
      ts.push_back({names[0], DType::F32, s.shape, p.at(i)});
      continue;
    }
    const int64_t one = s.shape[1] * s.shape[2];
    for (size_t e = 0; e < names.size(); ++e)
      ts.push_back({names[e], DType::F32, {s.shape[1], s.shape[2]}, p.at(i) + int64_t(e) * one});
  }
  write_safetensors((d / "model.safetensors").string(), ts);
  arena.assign(p.data(), p.data() + p.numel());
  return d;
}
}  // namespace

TEST(HfNemotronH, ConfigMapsFieldByField) {
  test::TempDir tmp("hf_nemotron_cfg");
  ModelConfig c;
  std::vector<float> arena;
  write_nemotron_folder(tmp, "", c, arena);
  EXPECT_EQ(c.n_layers, 3);  // M-, *, M-
  EXPECT_EQ(c.mamba2_layers, (std::vector<int>{0, 2}));
  EXPECT_EQ(c.attention_layers, (std::vector<int>{1}));
  EXPECT_EQ(c.ffn_layers, (std::vector<int>{0, 2}));
  EXPECT_TRUE(c.has_ffn(0));
  EXPECT_FALSE(c.has_ffn(1));
  EXPECT_EQ(c.d_ff, 40);
  EXPECT_EQ(c.mlp_act, "relu2");
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim(), 12);
  EXPECT_FALSE(c.rope);
  EXPECT_EQ(c.d_inner(), 48);  // mamba_num_heads x mamba_head_dim, not expand x hidden_size
  EXPECT_EQ(c.mamba2_heads(), 4);
  EXPECT_EQ(c.mamba2_groups, 2);
  EXPECT_TRUE(c.mamba2_norm_per_group);
  EXPECT_EQ(c.mamba2_norm_group(), 24);
  EXPECT_FLOAT_EQ(c.mamba2_dt_min, 0.02f);  // time_step_min: the CPU path's clamp
  EXPECT_TRUE(std::isinf(c.mamba2_dt_max));
  EXPECT_EQ(c.d_state, 8);
  EXPECT_EQ(c.d_conv, 3);
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-6f);
  EXPECT_FALSE(c.tie_embeddings);
  EXPECT_EQ(config_to_json(config_from_json(config_to_json(c))), config_to_json(c));
  EXPECT_EQ(training_unsupported(c), "");  // Mamba-2, relu2 MLPs, head_dim, ffn_layers train (BatchGrad)

  auto mapped = [](const std::function<void(json&)>& edit) {
    test::TempDir t("hf_nemotron_cfg2");
    ModelConfig m;
    std::vector<float> a;
    const fs::path d = write_nemotron_folder(t, "", m, a);
    edit_config(d, edit);
    return load_hf_config(d.string());
  };
  // The list spellings of the pattern, old and new, and the older mamba_* field names.
  const ModelConfig listed = mapped([](json& j) {
    j.erase("hybrid_override_pattern");
    j["layers_block_type"] = {"mamba", "mlp", "attention", "mamba", "mlp"};
    j["layer_types"] = {"linear_attention", "mlp", "full_attention", "linear_attention", "mlp"};
    j.erase("n_groups");
    j["mamba_n_groups"] = 4;
  });
  EXPECT_EQ(config_to_json(listed).dump(), [&] {
    ModelConfig w = c;
    w.mamba2_groups = 4;
    return config_to_json(w).dump();
  }());
  // Defaults: head_dim 128, time_step_min 0.001; every mixer followed by an MLP: ffn_layers empty.
  const ModelConfig def = mapped([](json& j) {
    j.erase("head_dim");
    j.erase("time_step_min");
    j["hybrid_override_pattern"] = "M-*-";
    j.erase("num_hidden_layers");
  });
  EXPECT_EQ(def.head_dim(), 128);
  EXPECT_FLOAT_EQ(def.mamba2_dt_min, 0.001f);
  EXPECT_TRUE(def.ffn_layers.empty());
  EXPECT_TRUE(def.has_ffn(1));
  // head_dim equal to hidden_size / heads is not stored.
  EXPECT_EQ(mapped([](json& j) { j["head_dim"] = 8; }).attn_head_dim, 0);
}

TEST(HfNemotronH, LoadsWeightsUnderTransformersNames) {
  auto be = make_cpu_backend();
  auto ref = make_ref_backend();
  for (const char* prefix : {"backbone.", "model."}) {
    SCOPED_TRACE(prefix);
    test::TempDir tmp("hf_nemotron_load");
    ModelConfig c;
    std::vector<float> arena;
    const fs::path d = write_nemotron_folder(tmp, "", c, arena, prefix);
    auto hf = load_any_model(d.string(), *be);
    HybridModel ours(c, *be);
    std::copy(arena.begin(), arena.end(), ours.params().data());
    ours.prepare();
    Rng rng(5);
    const std::vector<int32_t> toks = test::tokens(rng, 19, c.vocab_size);
    const std::vector<float> full = forward_all(*hf, toks);
    EXPECT_EQ(full, forward_all(ours, toks));
    const double e_step = test::rel_err(forward_stepwise(*hf, toks), full);
    EXPECT_LT(e_step, 1e-5);
    const double e_ref = test::rel_err(forward_all(*load_any_model(d.string(), *ref), toks), full);
    EXPECT_LT(e_ref, 1e-5);
    std::printf("nemotron-h synthetic (%s): prefill = token by token within %.2g, ref backend within %.2g\n", prefix,
                e_step, e_ref);
    convert_hf_model(d.string(), (tmp.path / "conv").string(), "f32");
    EXPECT_EQ(forward_all(*load_any_model((tmp.path / "conv").string(), *be), toks), full);
  }
}

TEST(HfNemotronH, Relu2OpMatchesReference) {
  // Squared ReLU on both host backends: strided rows, negatives, zeros, odd widths; against the
  // formula itself.
  auto cpu = make_cpu_backend();
  auto ref = make_ref_backend();
  Rng rng(3);
  for (int f : {1, 7, 16, 33, 100}) {
    const int n = 5, ld = f + 3;
    std::vector<float> x(size_t(n) * ld), want(size_t(n) * f);
    for (size_t k = 0; k < x.size(); ++k) x[k] = float(rng.normal());
    x[0] = 0.0f;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < f; ++j) {
        const double v = std::max(0.0, double(x[size_t(i) * ld + j]));
        want[size_t(i) * f + j] = float(v * v);
      }
    for (Backend* be : {cpu.get(), ref.get()}) {
      std::vector<float> out(size_t(n) * f, -1.0f);
      be->relu2(Tensor(out.data(), DType::F32, n, f), Tensor(x.data(), DType::F32, n, f, ld));
      for (size_t k = 0; k < out.size(); ++k) ASSERT_FLOAT_EQ(out[k], want[k]) << be->name() << " f=" << f << " k=" << k;
    }
  }
}

TEST(HfNemotronH, AttentionAndRelu2MlpMatchReference) {
  // One "*-" pair (attention with head_dim 12 of a 32-wide model, then the squared-ReLU MLP) and
  // the head, for a single token (attention then returns o_proj(v)), against a double reference of
  // NemotronHBlock written here; cpu and ref backends.
  test::TempDir tmp("hf_nemotron_ref");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_nemotron_folder(tmp, "", c, arena);
  edit_config(d, [](json& j) {
    j["hybrid_override_pattern"] = "*-";
    j["num_hidden_layers"] = 2;
  });
  c = load_hf_config(d.string());
  Params p(c);
  test::randomize_params(p, 71);
  std::vector<TensorToWrite> ts;
  for (size_t i = 0; i < p.specs().size(); ++i) {
    std::string n = p.specs()[i].name;
    n = n == "backbone.layers.0.mlp_norm.weight"     ? "backbone.layers.1.norm.weight"
        : n == "backbone.layers.0.mlp.up_proj.weight"  ? "backbone.layers.1.mixer.up_proj.weight"
        : n == "backbone.layers.0.mlp.down_proj.weight" ? "backbone.layers.1.mixer.down_proj.weight"
                                                        : n;
    ts.push_back({n, DType::F32, p.specs()[i].shape, p.at(i)});
  }
  write_safetensors((d / "model.safetensors").string(), ts);
  const int D = c.d_model, V = c.vocab_size, F = c.d_ff, QW = c.n_heads * 12, KW = c.n_kv_heads * 12;
  ASSERT_EQ(c.head_dim(), 12);
  const LayerWeights& w = p.layer(0);
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
  const int tok = 7;
  // square: relu(x)^2 (Nemotron-H's relu2); false: plain relu, a different MLP for the check below.
  const auto reference = [&](bool square) {
    std::vector<double> h(p.embeddings() + size_t(tok) * D, p.embeddings() + size_t(tok) * D + D);
    const std::vector<double> v = matvec(w.wv, rmsnorm(h, w.norm), KW);
    std::vector<double> ctx(static_cast<size_t>(QW));  // one key: query head j reads kv head j / (H / G)
    for (int hh = 0; hh < c.n_heads; ++hh)
      for (int e = 0; e < 12; ++e) ctx[size_t(hh) * 12 + e] = v[size_t(hh / (c.n_heads / c.n_kv_heads)) * 12 + e];
    const std::vector<double> o = matvec(w.wo, ctx, D);
    for (int j = 0; j < D; ++j) h[size_t(j)] += o[size_t(j)];
    std::vector<double> up = matvec(w.w_up, rmsnorm(h, w.mlp_norm), F);
    for (double& x : up) x = x > 0 ? (square ? x * x : x) : 0.0;
    const std::vector<double> down = matvec(w.w_down, up, D);
    for (int j = 0; j < D; ++j) h[size_t(j)] += down[size_t(j)];
    const std::vector<double> lg = matvec(p.lm_head(), rmsnorm(h, p.norm_f()), V);
    return std::vector<float>(lg.begin(), lg.end());
  };
  const std::vector<float> want = reference(true);
  auto cpu = make_cpu_backend();
  auto ref = make_ref_backend();
  for (Backend* be : {cpu.get(), ref.get()}) {
    const double e = test::rel_err(forward_all(*load_any_model(d.string(), *be), {tok}), want);
    std::printf("nemotron-h '*-' vs double reference (%s): %.2g\n", be->name().c_str(), e);
    EXPECT_LT(e, 2e-6);
  }
  // An unsquared ReLU of the same weights is far from it: the check tells them apart.
  EXPECT_GT(test::rel_err(forward_all(*load_any_model(d.string(), *cpu), {tok}), reference(false)), 1e-3);
}

TEST(HfNemotronH, RefusesWhatItDoesNotImplement) {
  auto with = [](const std::function<void(json&)>& edit, std::initializer_list<std::string> parts) {
    test::TempDir tmp("hf_nemotron_refuse");
    ModelConfig c;
    std::vector<float> arena;
    const fs::path d = write_nemotron_folder(tmp, "", c, arena);
    edit_config(d, edit);
    expect_load_error(d, parts);
  };
  with([](json& j) { j["hybrid_override_pattern"] = "M-E-M"; j["num_hidden_layers"] = 5; },
       {"hybrid_override_pattern", "mixture-of-experts", "block 2"});
  with([](json& j) { j["hybrid_override_pattern"] = "-M*M-"; }, {"MLP block (-) at block 0"});
  with([](json& j) { j["hybrid_override_pattern"] = "M--M-"; }, {"MLP block (-) at block 2"});
  with([](json& j) { j["hybrid_override_pattern"] = "M-*X-"; }, {"hybrid_override_pattern", "'X'"});
  with([](json& j) { j["num_hidden_layers"] = 6; }, {"num_hidden_layers", "5 blocks"});
  with([](json& j) { j["layers_block_type"] = {"mamba", "mlp", "mamba", "mamba", "mlp"}; },
       {"hybrid_override_pattern", "layers_block_type", "disagree"});
  with([](json& j) { j.erase("hybrid_override_pattern"); }, {"no block pattern"});
  with([](json& j) { j["mlp_hidden_act"] = "silu"; }, {"mlp_hidden_act", "relu2"});
  with([](json& j) { j["mamba_hidden_act"] = "gelu"; }, {"mamba_hidden_act"});
  for (const char* k : {"attention_bias", "mlp_bias", "mamba_proj_bias", "use_bias"})
    with([k](json& j) { j[k] = true; }, {k, "biases"});
  with([](json& j) { j["sliding_window"] = 64; }, {"sliding_window"});
  with([](json& j) { j["num_nextn_predict_layers"] = 1; }, {"num_nextn_predict_layers"});
  with([](json& j) { j["n_groups"] = 3; }, {"n_groups", "mamba_num_heads"});
  with([](json& j) { j["mamba_n_groups"] = 2; }, {"n_groups", "mamba_n_groups", "both"});
  with([](json& j) { j["num_key_value_heads"] = 3; }, {"num_key_value_heads"});
  with([](json& j) { j["layer_norm_epsilon"] = 0; }, {"layer_norm_epsilon"});
  // Configs that disagree with the weights.
  with([](json& j) { j["use_conv_bias"] = false; }, {"conv1d.bias", "use_conv_bias"});
  with([](json& j) { j["intermediate_size"] = 41; }, {"backbone.layers.1.mixer.up_proj.weight"});
  with([](json& j) { j["hybrid_override_pattern"] = "M-M*-"; }, {"backbone.layers."});
  with([](json& j) { j["head_dim"] = 16; }, {"q_proj"});
}

TEST(HfNemotronH, MoeConfigMapsFieldByField) {
  test::TempDir tmp("hf_nemotron_moe_cfg");
  ModelConfig c;
  std::vector<float> arena;
  write_moe_folder(tmp, "M-*E", c, arena);
  EXPECT_EQ(c.n_layers, 2);  // (M, -), (*, E)
  EXPECT_EQ(c.moe_layers, (std::vector<int>{1}));
  EXPECT_TRUE(c.ffn_layers.empty());  // every layer has an FFN
  EXPECT_EQ(c.d_ff, 40);              // the "-" blocks'
  EXPECT_EQ(c.moe_ff, 24);            // the experts'
  EXPECT_EQ(c.moe_width(), 24);
  EXPECT_EQ(c.moe_shared_ff, 20);
  EXPECT_EQ(c.mlp_act, "relu2");
  EXPECT_EQ(c.moe_experts, 6);
  EXPECT_EQ(c.moe_top_k, 3);
  EXPECT_EQ(c.moe_router, "sigmoid");
  EXPECT_EQ(c.moe_groups, 3);
  EXPECT_EQ(c.moe_topk_groups, 2);
  EXPECT_TRUE(c.moe_renormalize);
  EXPECT_FLOAT_EQ(c.moe_scaling, 2.5f);
  EXPECT_EQ(config_to_json(config_from_json(config_to_json(c))), config_to_json(c));
  EXPECT_EQ(training_unsupported(c), "");  // and relu2 experts behind a sigmoid router
  // NemotronHConfig's defaults for absent fields; only E blocks: the experts' width is d_ff itself;
  // a shared size of 0 falls back to intermediate_size (NemotronHMLP's `or`).
  test::TempDir t2("hf_nemotron_moe_cfg2");
  ModelConfig d;
  write_moe_folder(t2, "ME*E", d, arena, [](json& j) {
    for (const char* k : {"n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "num_experts_per_tok",
                          "n_shared_experts", "moe_latent_size"})
      j.erase(k);
    j["moe_shared_expert_intermediate_size"] = 0;
  });
  EXPECT_EQ(d.moe_layers, (std::vector<int>{0, 1}));
  EXPECT_EQ(d.d_ff, 24);
  EXPECT_EQ(d.moe_ff, 0);
  EXPECT_EQ(d.moe_shared_ff, 40);
  EXPECT_EQ(d.moe_groups, 1);
  EXPECT_EQ(d.moe_topk_groups, 1);
  EXPECT_EQ(d.moe_top_k, 2);
  EXPECT_TRUE(d.moe_renormalize);
  EXPECT_FLOAT_EQ(d.moe_scaling, 1.0f);
  EXPECT_EQ(config_to_json(config_from_json(config_to_json(d))), config_to_json(d));
}

TEST(HfNemotronH, MoeLoadsWeightsUnderTransformersNames) {
  // Pattern "M-*EM-ME": MLP and MoE blocks after both kinds of mixer; experts one tensor each (the
  // published form, what save_pretrained writes) or stacked (transformers 5's in-memory form), under
  // both prefixes; the same logits bit for bit as our model on the same arena.
  auto be = make_cpu_backend();
  auto ref = make_ref_backend();
  for (const char* prefix : {"backbone.", "model."})
    for (bool per_expert : {true, false}) {
      SCOPED_TRACE(std::string(prefix) + (per_expert ? " per expert" : " stacked"));
      test::TempDir tmp("hf_nemotron_moe_load");
      ModelConfig c;
      std::vector<float> arena;
      const fs::path d = write_moe_folder(tmp, "M-*EM-ME", c, arena, nullptr, prefix, per_expert);
      ASSERT_EQ(c.moe_layers, (std::vector<int>{1, 3}));
      auto hf = load_any_model(d.string(), *be);
      HybridModel ours(c, *be);
      std::copy(arena.begin(), arena.end(), ours.params().data());
      ours.prepare();
      Rng rng(5);
      const std::vector<int32_t> toks = test::tokens(rng, 19, c.vocab_size);
      const std::vector<float> full = forward_all(*hf, toks);
      EXPECT_EQ(full, forward_all(ours, toks));
      const double e_step = test::rel_err(forward_stepwise(*hf, toks), full);
      EXPECT_LT(e_step, 1e-5);
      const double e_ref = test::rel_err(forward_all(*load_any_model(d.string(), *ref), toks), full);
      EXPECT_LT(e_ref, 1e-5);
      std::printf("nemotron-h MoE synthetic: prefill = token by token within %.2g, ref backend within %.2g\n", e_step,
                  e_ref);
      convert_hf_model(d.string(), (tmp.path / "conv").string(), "f32");
      EXPECT_EQ(forward_all(*load_any_model((tmp.path / "conv").string(), *be), toks), full);
    }
}

TEST(HfNemotronH, MoeBlockMatchesReference) {
  // One "*E" pair (attention, then NemotronHMoE) and the head, one token at a time from an empty
  // state (attention returns o_proj(v)), against a double reference written here from
  // NemotronHMoE.route_tokens_to_experts and forward: sigmoid scores, choice = score + correction
  // bias, each of 3 groups scored by its two best choices, the best 2 groups kept, the top 3
  // experts among them, weights = their scores / sum * 2.5, squared-ReLU experts, plus the shared
  // expert. cpu and ref backends. References that drop the correction bias, the group limit or
  // the scaling differ on these tokens, so each part is checked.
  test::TempDir tmp("hf_nemotron_moe_ref");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_moe_folder(tmp, "*E", c, arena);
  Params p(c);
  std::copy(arena.begin(), arena.end(), p.data());
  const LayerWeights& w = p.layer(0);
  const int D = c.d_model, V = c.vocab_size, X = c.moe_experts, Fe = c.moe_width(), S = c.moe_shared_ff;
  const int hd = c.head_dim(), QW = c.n_heads * hd, KW = c.n_kv_heads * hd;
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
  const auto relu2_mlp = [&](const float* up, const float* down, int F, const std::vector<double>& x) {
    std::vector<double> a = matvec(up, x, F);
    for (double& v : a) v = v > 0 ? v * v : 0.0;
    return matvec(down, a, D);
  };
  // use_bias / use_groups / scale: the router's parts, to drop one at a time.
  const auto reference = [&](int tok, bool use_bias, bool use_groups, double scale) {
    std::vector<double> h(p.embeddings() + size_t(tok) * D, p.embeddings() + size_t(tok) * D + D);
    const std::vector<double> v = matvec(w.wv, rmsnorm(h, w.norm), KW);
    std::vector<double> ctx(static_cast<size_t>(QW));
    for (int hh = 0; hh < c.n_heads; ++hh)
      for (int e = 0; e < hd; ++e) ctx[size_t(hh) * hd + e] = v[size_t(hh / (c.n_heads / c.n_kv_heads)) * hd + e];
    const std::vector<double> o = matvec(w.wo, ctx, D);
    for (int j = 0; j < D; ++j) h[size_t(j)] += o[size_t(j)];
    const std::vector<double> u = rmsnorm(h, w.mlp_norm);
    const std::vector<double> logit = matvec(w.moe_router, u, X);
    std::vector<double> score(static_cast<size_t>(X)), choice(static_cast<size_t>(X));
    for (int e = 0; e < X; ++e) {
      score[size_t(e)] = 1.0 / (1.0 + std::exp(-logit[size_t(e)]));
      choice[size_t(e)] = score[size_t(e)] + (use_bias ? double(w.moe_bias[e]) : 0.0);
    }
    const int G = c.moe_groups, per = X / G;
    if (use_groups) {
      std::vector<std::pair<double, int>> gs;
      for (int g = 0; g < G; ++g) {
        std::vector<double> in(choice.begin() + g * per, choice.begin() + (g + 1) * per);
        std::sort(in.rbegin(), in.rend());
        gs.push_back({in[0] + in[1], g});
      }
      std::sort(gs.begin(), gs.end(), [](auto a, auto b) { return a.first > b.first; });
      for (size_t r = size_t(c.moe_topk_groups); r < gs.size(); ++r)
        for (int e = gs[r].second * per; e < (gs[r].second + 1) * per; ++e) choice[size_t(e)] = -1e30;
    }
    std::vector<int> order(static_cast<size_t>(X));
    for (int e = 0; e < X; ++e) order[size_t(e)] = e;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return choice[size_t(a)] > choice[size_t(b)]; });
    double sum = 0;
    for (int k = 0; k < c.moe_top_k; ++k) sum += score[size_t(order[size_t(k)])];
    std::vector<double> y = relu2_mlp(w.s_up, w.s_down, S, u);  // the shared expert
    for (int k = 0; k < c.moe_top_k; ++k) {
      const int e = order[size_t(k)];
      const std::vector<double> ye =
          relu2_mlp(w.e_up + size_t(e) * Fe * D, w.e_down + size_t(e) * D * Fe, Fe, u);
      const double g = score[size_t(e)] / (sum + 1e-20) * scale;
      for (int j = 0; j < D; ++j) y[size_t(j)] += g * ye[size_t(j)];
    }
    for (int j = 0; j < D; ++j) h[size_t(j)] += y[size_t(j)];
    const std::vector<double> lg = matvec(p.lm_head(), rmsnorm(h, p.norm_f()), V);
    return std::vector<float>(lg.begin(), lg.end());
  };
  auto cpu = make_cpu_backend();
  auto ref = make_ref_backend();
  auto mc = load_any_model(d.string(), *cpu), mr = load_any_model(d.string(), *ref);
  double worst = 0, no_bias = 0, no_groups = 0, no_scale = 0;
  for (int tok = 0; tok < 40; ++tok) {
    const std::vector<float> want = reference(tok, true, true, c.moe_scaling);
    const std::vector<float> got = forward_all(*mc, {tok});
    worst = std::max({worst, test::rel_err(got, want), test::rel_err(forward_all(*mr, {tok}), want)});
    no_bias = std::max(no_bias, test::rel_err(got, reference(tok, false, true, c.moe_scaling)));
    no_groups = std::max(no_groups, test::rel_err(got, reference(tok, true, false, c.moe_scaling)));
    no_scale = std::max(no_scale, test::rel_err(got, reference(tok, true, true, 1.0)));
  }
  std::printf("nemotron-h '*E' vs double reference, 40 tokens (cpu, ref): %.2g; without the choice bias %.2g, "
              "the group limit %.2g, the scaling %.2g\n", worst, no_bias, no_groups, no_scale);
  EXPECT_LT(worst, 2e-6);
  EXPECT_GT(no_bias, 1e-3);
  EXPECT_GT(no_groups, 1e-3);
  EXPECT_GT(no_scale, 1e-3);
}

TEST(HfNemotronH, MoeRefusesWhatItDoesNotImplement) {
  auto with = [](const std::string& pattern, const std::function<void(json&)>& edit,
                 std::initializer_list<std::string> parts) {
    test::TempDir tmp("hf_nemotron_moe_refuse");
    ModelConfig c;
    std::vector<float> arena;
    const fs::path d = write_moe_folder(tmp, "M-*E", c, arena);
    edit_config(d, [&](json& j) {
      j["hybrid_override_pattern"] = pattern;
      j["num_hidden_layers"] = pattern.size();
      edit(j);
    });
    expect_load_error(d, parts);
  };
  const auto none = [](json&) {};
  with("EM-*E", none, {"hybrid_override_pattern", "mixture-of-experts block (E) at block 0", "follows no"});
  with("M-E*E", none, {"mixture-of-experts block (E) at block 2", "follows no"});
  with("M-*E", [](json& j) { j["moe_latent_size"] = 16; }, {"moe_latent_size", "latent"});
  with("M-*E", [](json& j) { j["n_shared_experts"] = 2; }, {"n_shared_experts"});
  with("M-*E", [](json& j) { j["n_group"] = 4; }, {"n_group", "n_routed_experts"});
  with("M-*E", [](json& j) { j["topk_group"] = 4; }, {"topk_group", "n_group"});
  with("M-*E", [](json& j) { j["n_group"] = 6; j["topk_group"] = 1; }, {"n_group", "at least 2"});
  with("M-*E", [](json& j) { j["num_experts_per_tok"] = 5; }, {"num_experts_per_tok", "topk_group"});
  with("M-*E", [](json& j) { j["num_experts_per_tok"] = 7; }, {"num_experts_per_tok", "n_routed_experts"});
  with("M-*E", [](json& j) { j["num_local_experts"] = 6; }, {"n_routed_experts", "num_local_experts", "both"});
  with("M-*E", [](json& j) { j["n_routed_experts"] = 1; j["n_group"] = 1; j["topk_group"] = 1;
                              j["num_experts_per_tok"] = 1; }, {"n_routed_experts", "at least 2"});
  with("M-*E", [](json& j) { j["routed_scaling_factor"] = 0; }, {"routed_scaling_factor"});
  with("M-*E", [](json& j) { j["mlp_hidden_act"] = "silu"; }, {"mlp_hidden_act", "relu2"});
  // Configs that disagree with the weights.
  with("M-*E", [](json& j) { j["moe_intermediate_size"] = 25; }, {"backbone.layers.3.mixer.experts.0.up_proj.weight"});
  with("M-*E", [](json& j) { j["moe_shared_expert_intermediate_size"] = 21; },
       {"backbone.layers.3.mixer.shared_experts.up_proj.weight"});
  with("M-*E", [](json& j) { j["n_routed_experts"] = 8; j["n_group"] = 4; }, {"backbone.layers.3.mixer.gate.weight"});
  with("M-*-", none, {"missing tensor", "backbone.layers.3.mixer.up_proj.weight"});
}

TEST(HfNemotronH, MoeLogitsMatchTransformers) {
  const fs::path dir = kFixtures / "nemotron_h_moe";
  ASSERT_TRUE(test::has_fixture(dir));
  const json exp = read_json(dir / "expected.json");
  auto be = make_cpu_backend();
  auto m = load_any_model(dir.string(), *be);
  const ModelConfig& c = m->config();
  ASSERT_FALSE(c.moe_layers.empty());
  // What the fixture script read off transformers: the routing margin its tokens leave (a choice
  // closer than rounding could flip, and the comparison would test luck).
  ASSERT_GT(exp["router_min_margin"].get<double>(), 1e-4) << "the fixture's routing has a near tie";
  test::expect_matches_transformers(dir, *m);
  const std::vector<int32_t> toks = exp["tokens"].get<std::vector<int32_t>>();
  const std::vector<float> want = read_f32_file(dir / "logits.f32");
  // The correction bias is part of what matches: moving one expert's breaks the bound.
  m->params().layer(c.moe_layers[0]).moe_bias[0] += 0.5f;
  m->prepare();
  EXPECT_GT(test::rel_err(forward_all(*m, toks), want), 1e-4);
}

TEST(HfNemotronH, LogitsMatchTransformers) {
  for (const char* name : {"nemotron_h_f32", "nemotron_h_bf16"}) {
    SCOPED_TRACE(name);
    const fs::path dir = kFixtures / name;
    if (!test::has_fixture(dir)) continue;
    const json exp = read_json(dir / "expected.json");
    auto be = make_cpu_backend();
    auto m = load_any_model(dir.string(), *be);
    const ModelConfig& c = m->config();
    ASSERT_FALSE(c.attention_layers.empty());
    ASSERT_FALSE(c.mamba2_layers.empty());
    // What the fixture script read off transformers' modules: a mismatch is a changed library, not
    // noise; the mapping in src/io/hf_model.cpp (and docs/MODELS.md) must follow it.
    ASSERT_EQ(exp["gated_norm_group_size"].get<int>(), c.mamba2_norm_group()) << "the gated norm groups differently";
    ASSERT_FLOAT_EQ(exp["mixer_norm_eps"].get<float>(), c.norm_eps) << "the gated norm uses another eps";
    const json clamp = exp["mixer_dt_clamp"];
    ASSERT_FALSE(clamp.is_null()) << "the fixture script could not read how NemotronHMamba2Mixer.torch_forward clamps "
                                     "dt: read it and fix the mapping of time_step_min / time_step_limit";
    ASSERT_FLOAT_EQ(clamp[0].get<float>(), c.mamba2_dt_min) << "NemotronHMamba2Mixer's CPU path clamps dt otherwise";
    ASSERT_EQ(clamp[1].is_null(), std::isinf(c.mamba2_dt_max)) << "NemotronHMamba2Mixer's CPU path clamps dt otherwise";
    ASSERT_EQ(exp["attention_head_dim"].get<int>(), c.head_dim());
    ASSERT_FALSE(exp["attention_uses_rope"].get<bool>()) << "NemotronHAttention now applies RoPE";

    test::expect_matches_transformers(dir, *m);
    const std::vector<int32_t> toks = exp["tokens"].get<std::vector<int32_t>>();
    const std::vector<float> want = read_f32_file(dir / "logits.f32");
    m->params().layer(c.mamba2_layers[0]).Dskip[1] += 0.05f;
    m->prepare();
    EXPECT_GT(test::rel_err(forward_all(*m, toks), want), 1e-4);
  }
}

}  // namespace hm
