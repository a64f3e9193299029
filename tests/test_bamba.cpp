// Bamba (BambaForCausalLM) and Granite 4.0-H (GraniteMoeHybridForCausalLM), src/io/hf_model.cpp:
// Mamba-2 mixers and attention (Bamba's with RoPE on half of each head, Granite's without), an
// MLP after every layer (Granite's: experts plus a shared MLP, and its scalings). The mappings
// field by field, loading under transformers' names, the new model features against references
// written here, refusals, and parity with transformers on the fixtures of
// tests/fixtures/hf/make_fixtures.py (skipped when they are absent).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
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

const fs::path kFixtures = fs::path(HM_SOURCE_DIR) / "tests" / "fixtures" / "hf";
const char* const kBambaFolders[] = {"bamba_f32", "bamba_bf16"};

using test::read_f32_file;
using test::read_json;
using test::write_text;

using test::forward_all;  // float32 KV cache by default, as transformers keeps it
using test::forward_stepwise;

// transformers' name of each of our tensors, written from modeling_bamba.py's module tree
// (independently of src/io/hf_model.cpp's mapping).
std::string bamba_name(const std::string& ours) {
  if (ours == "backbone.embeddings.weight") return "model.embed_tokens.weight";
  if (ours == "backbone.norm_f.weight") return "model.final_layernorm.weight";
  if (ours == "lm_head.weight") return ours;
  const size_t a = std::strlen("backbone.layers."), b = ours.find('.', a);
  const std::string L = "model.layers." + ours.substr(a, b - a) + ".", rest = ours.substr(b + 1);
  const std::pair<const char*, const char*> table[] = {
      {"norm.weight", "input_layernorm.weight"}, {"mlp_norm.weight", "pre_ff_layernorm.weight"},
      {"mixer.q_proj.weight", "self_attn.q_proj.weight"}, {"mixer.k_proj.weight", "self_attn.k_proj.weight"},
      {"mixer.v_proj.weight", "self_attn.v_proj.weight"}, {"mixer.o_proj.weight", "self_attn.o_proj.weight"},
      {"mlp.gate_proj.weight", "feed_forward.gate_proj.weight"}, {"mlp.up_proj.weight", "feed_forward.up_proj.weight"},
      {"mlp.down_proj.weight", "feed_forward.down_proj.weight"},
  };
  for (const auto& [o, h] : table)
    if (rest == o) return L + h;
  EXPECT_EQ(rest.compare(0, 6, "mixer."), 0) << ours;
  return L + "mamba." + rest.substr(6);  // in_proj, conv1d, dt_bias, A_log, D, norm, out_proj
}

// A BambaForCausalLM folder as transformers 5's save_pretrained writes it (BambaConfig's fields,
// RoPE in rope_parameters), with our random weights under its names; `arena` gets them in our
// layout. 4 layers, attention at 2; GQA 4/2 heads of 8; Mamba-2 with 4 heads of 16 in 2 groups.
fs::path write_bamba_folder(const test::TempDir& tmp, const std::string& extra_fields, ModelConfig& c,
                            std::vector<float>& arena) {
  const fs::path d = tmp.path / "bamba";
  fs::create_directories(d);
  write_text(d / "config.json", R"({
  "architectures": ["BambaForCausalLM"], "model_type": "bamba", "vocab_size": 120,
  "tie_word_embeddings": false, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
  "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "initializer_range": 0.02,
  "rms_norm_eps": 1e-06, "use_cache": true, "num_logits_to_keep": 1, "pad_token_id": 0,
  "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 262144, "attention_dropout": 0.0,
  "attention_bias": false, "mlp_bias": false, "attn_layer_indices": [2], "mamba_n_heads": 4,
  "mamba_d_head": 16, "mamba_n_groups": 2, "mamba_d_state": 8, "mamba_d_conv": 3, "mamba_expand": 2,
  "mamba_chunk_size": 8, "mamba_conv_bias": true, "mamba_proj_bias": false, "time_step_min": 0.001,
  "time_step_max": 0.1, "time_step_limit": [0.0, Infinity], "z_loss_coefficient": 0.0,
  "rope_parameters": {"rope_type": "default", "rope_theta": 300.0, "partial_rotary_factor": 0.5},
  "dtype": "float32", "transformers_version": "5.17.0")" +
                                   extra_fields + "}\n");
  c = load_hf_config(d.string());
  Params p(c);
  test::randomize_params(p, 51);
  std::vector<TensorToWrite> ts;
  for (size_t i = 0; i < p.specs().size(); ++i)
    ts.push_back({bamba_name(p.specs()[i].name), DType::F32, p.specs()[i].shape, p.at(i)});
  write_safetensors((d / "model.safetensors").string(), ts);
  arena.assign(p.data(), p.data() + p.numel());
  return d;
}

// A copy of tensor `from` of a safetensors file added under the name `to`.
void add_tensor_copy(const fs::path& path, const std::string& from, const std::string& to) {
  std::deque<std::vector<unsigned char>> bytes;
  std::vector<TensorToWrite> ts;
  {
    SafetensorsReader r(path.string());
    for (const TensorInfo& t : r.tensors()) {
      r.read_raw(t, bytes.emplace_back(t.end - t.begin).data());
      ts.push_back({t.name, t.dtype, t.shape, bytes.back().data()});
      if (t.name == from) ts.push_back({to, t.dtype, t.shape, bytes.back().data()});
    }
  }
  write_safetensors(path.string(), ts);
}

}  // namespace

TEST(HfBamba, ConfigMapsFieldByField) {
  test::TempDir tmp("hf_bamba_cfg");
  ModelConfig c;
  std::vector<float> arena;
  write_bamba_folder(tmp, "", c, arena);
  EXPECT_EQ(c.hybrid, "simple");
  EXPECT_EQ(c.d_model, 32);
  EXPECT_EQ(c.n_layers, 4);
  EXPECT_EQ(c.vocab_size, 120);
  EXPECT_EQ(c.attention_layers, (std::vector<int>{2}));
  EXPECT_EQ(c.mamba2_layers, (std::vector<int>{0, 1, 3}));  // every other layer
  EXPECT_TRUE(c.moe_layers.empty());
  EXPECT_EQ(c.d_ff, 48);  // a SwiGLU MLP after every layer
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim(), 8);
  EXPECT_TRUE(c.rope);
  EXPECT_EQ(c.rope_dim, 4);  // partial_rotary_factor 0.5
  EXPECT_FLOAT_EQ(c.rope_theta, 300.0f);
  EXPECT_EQ(c.d_inner(), 64);
  EXPECT_EQ(c.mamba2_heads(), 4);
  EXPECT_EQ(c.mamba2_head_dim, 16);
  EXPECT_EQ(c.mamba2_groups, 2);
  EXPECT_FALSE(c.mamba2_norm_per_group);  // BambaRMSNormGated = MambaRMSNormGated: all of d_inner
  EXPECT_EQ(c.d_state, 8);
  EXPECT_EQ(c.d_conv, 3);
  EXPECT_EQ(c.mamba2_dt_min, 0.0f);
  EXPECT_TRUE(std::isinf(c.mamba2_dt_max));
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-6f);
  EXPECT_FALSE(c.tie_embeddings);
  EXPECT_FALSE(c.state_bridges);
  EXPECT_FALSE(c.mamba_bcdt_norm);
  EXPECT_TRUE(c.true_layers.empty());
  // Our checkpoint keeps every field, rope_dim included.
  EXPECT_EQ(config_to_json(config_from_json(config_to_json(c))), config_to_json(c));
  EXPECT_EQ(config_from_json(config_to_json(c)).rope_dim, 4);
  EXPECT_EQ(training_unsupported(c), "");  // Mamba-2 and the partial rotary train (BatchGrad.PartialRopeTrains)

  auto mapped = [](const std::function<void(json&)>& edit) {
    test::TempDir t("hf_bamba_cfg2");
    ModelConfig m;
    std::vector<float> a;
    const fs::path d = write_bamba_folder(t, "", m, a);
    edit_config(d, edit);
    return load_hf_config(d.string());
  };
  // BambaConfig's defaults where fields are absent.
  const ModelConfig def = mapped([](json& j) {
    for (const char* k : {"intermediate_size", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                          "mamba_d_head", "mamba_n_groups", "mamba_d_conv", "mamba_expand", "time_step_limit",
                          "rope_parameters", "mamba_conv_bias"})
      j.erase(k);
    j["hidden_size"] = 64;  // 128 Mamba heads (the default) of 1 in 128 channels
    j.erase("mamba_n_heads");
    j["num_attention_heads"] = 8;
    j["mamba_d_state"] = 4;
  });
  EXPECT_EQ(def.d_ff, 14336);
  EXPECT_EQ(def.n_kv_heads, 8);
  EXPECT_FLOAT_EQ(def.norm_eps, 1e-5f);
  EXPECT_FALSE(def.tie_embeddings);
  EXPECT_EQ(def.d_inner(), 128);
  EXPECT_EQ(def.mamba2_heads(), 128);
  EXPECT_EQ(def.mamba2_head_dim, 1);
  EXPECT_EQ(def.mamba2_groups, 1);
  EXPECT_EQ(def.d_conv, 4);
  EXPECT_TRUE(std::isinf(def.mamba2_dt_max));
  EXPECT_FLOAT_EQ(def.rope_theta, 10000.0f);
  EXPECT_EQ(def.rope_dim, 4);
  // Other spellings: transformers 4's top-level rope_theta and partial_rotary_factor, a null
  // rope_scaling, null num_key_value_heads (= heads), "auto" head size, no attention at all.
  const ModelConfig v4 = mapped([](json& j) {
    j.erase("rope_parameters");
    j["rope_theta"] = 2000.0;
    j["partial_rotary_factor"] = 0.5;
    j["rope_scaling"] = nullptr;
    j["num_key_value_heads"] = nullptr;
    j["mamba_d_head"] = "auto";
    j["time_step_limit"] = {0.01, 0.2};
    j["tie_word_embeddings"] = true;
  });
  EXPECT_FLOAT_EQ(v4.rope_theta, 2000.0f);
  EXPECT_EQ(v4.n_kv_heads, 4);
  EXPECT_EQ(v4.mamba2_head_dim, 16);
  EXPECT_FLOAT_EQ(v4.mamba2_dt_min, 0.01f);
  EXPECT_FLOAT_EQ(v4.mamba2_dt_max, 0.2f);
  EXPECT_TRUE(v4.tie_embeddings);
  const ModelConfig none = mapped([](json& j) { j["attn_layer_indices"] = nullptr; });
  EXPECT_TRUE(none.attention_layers.empty());
  EXPECT_EQ(none.mamba2_layers, (std::vector<int>{0, 1, 2, 3}));
  const ModelConfig two = mapped([](json& j) {
    j["attn_layer_indices"] = {3, 0};
    j["layers_block_type"] = {"attention", "mamba", "mamba", "attention"};
    j["layer_types"] = {"full_attention", "linear_attention", "linear_attention", "full_attention"};
  });
  EXPECT_EQ(two.attention_layers, (std::vector<int>{0, 3}));
  const ModelConfig by_types = mapped([](json& j) {  // no indices: the per-layer types say it
    j.erase("attn_layer_indices");
    j["layer_types"] = {"linear_attention", "full_attention", "linear_attention", "linear_attention"};
  });
  EXPECT_EQ(by_types.attention_layers, (std::vector<int>{1}));
  EXPECT_EQ(two.mamba2_layers, (std::vector<int>{1, 2}));
}

TEST(HfBamba, LoadsWeightsUnderTransformersNames) {
  // Our model on the same arena gives the same logits bit for bit: names and shapes map one to
  // one. Prefill = token by token; the reference backend agrees; convert keeps the logits.
  test::TempDir tmp("hf_bamba_load");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_bamba_folder(tmp, "", c, arena);
  EXPECT_TRUE(SafetensorsReader((d / "model.safetensors").string()).find("model.layers.2.self_attn.q_proj.weight"));
  EXPECT_TRUE(SafetensorsReader((d / "model.safetensors").string()).find("model.layers.1.mamba.dt_bias"));
  auto be = make_cpu_backend();
  auto hf = load_any_model(d.string(), *be);
  HybridModel ours(c, *be);
  std::copy(arena.begin(), arena.end(), ours.params().data());
  ours.prepare();
  Rng rng(3);
  const std::vector<int32_t> toks = test::tokens(rng, 23, c.vocab_size);
  const std::vector<float> full = forward_all(*hf, toks);
  EXPECT_EQ(full, forward_all(ours, toks));
  const double e_step = test::rel_err(forward_stepwise(*hf, toks), full);
  std::printf("bamba: prefill vs token by token %.3g\n", e_step);
  EXPECT_LT(e_step, 1e-5);
  auto ref = make_ref_backend();
  const double e_ref = test::rel_err(forward_all(*load_any_model(d.string(), *ref), toks), full);
  std::printf("bamba: reference backend vs cpu %.3g\n", e_ref);
  EXPECT_LT(e_ref, 1e-5);
  convert_hf_model(d.string(), (tmp.path / "conv").string(), "f32");
  auto conv = load_any_model((tmp.path / "conv").string(), *be);
  EXPECT_EQ(conv->config().rope_dim, 4);
  EXPECT_EQ(forward_all(*conv, toks), full);
}

namespace {

// A one-layer attention model (embeddings, RMSNorm, attention, residual, final norm, tied
// head) computed here in double as transformers' BambaAttention does it: RoPE on the first rd
// channels of each head (rotate_half: channel i pairs with i + rd/2, angle pos * theta^(-2i/rd)),
// the rest unrotated; causal GQA softmax(q k / sqrt(hd)) v; o_proj.
std::vector<double> attention_reference(const Params& p, const ModelConfig& c, const std::vector<int32_t>& toks) {
  const int D = c.d_model, H = c.n_heads, G = c.n_kv_heads, hd = c.head_dim(), rd = c.resolved_rope_dim();
  const int T = int(toks.size()), V = c.vocab_size;
  const LayerWeights& w = p.layer(0);
  auto rmsnorm = [&](const double* x, const float* g, double* out) {
    double ss = 0;
    for (int j = 0; j < D; ++j) ss += x[j] * x[j];
    const double r = 1.0 / std::sqrt(ss / D + double(c.norm_eps));
    for (int j = 0; j < D; ++j) out[j] = x[j] * r * g[j];
  };
  auto matvec = [](const float* W, const double* x, int rows, int cols, double* y) {
    for (int r = 0; r < rows; ++r) {
      double s = 0;
      for (int k = 0; k < cols; ++k) s += double(W[size_t(r) * cols + k]) * x[k];
      y[r] = s;
    }
  };
  auto rotate = [&](double* v, int heads, int pos) {
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < rd / 2; ++i) {
        const double ang = pos * std::pow(double(c.rope_theta), -2.0 * i / rd);
        double* a = v + h * hd + i;
        double* b = a + rd / 2;
        const double x1 = *a, x2 = *b;
        *a = x1 * std::cos(ang) - x2 * std::sin(ang);
        *b = x2 * std::cos(ang) + x1 * std::sin(ang);
      }
  };
  std::vector<double> h(size_t(T) * D), q(size_t(T) * H * hd), k(size_t(T) * G * hd), v(size_t(T) * G * hd);
  std::vector<double> u(static_cast<size_t>(D));
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < D; ++j) h[size_t(t) * D + j] = p.embeddings()[size_t(toks[size_t(t)]) * D + j];
    rmsnorm(&h[size_t(t) * D], w.norm, u.data());
    matvec(w.wq, u.data(), H * hd, D, &q[size_t(t) * H * hd]);
    matvec(w.wk, u.data(), G * hd, D, &k[size_t(t) * G * hd]);
    matvec(w.wv, u.data(), G * hd, D, &v[size_t(t) * G * hd]);
    rotate(&q[size_t(t) * H * hd], H, t);
    rotate(&k[size_t(t) * G * hd], G, t);
  }
  std::vector<double> logits(size_t(T) * V), ctx(size_t(H) * hd), o(static_cast<size_t>(D)), hn(static_cast<size_t>(D));
  for (int t = 0; t < T; ++t) {
    for (int hh = 0; hh < H; ++hh) {
      const int g = hh / (H / G);
      std::vector<double> s(size_t(t) + 1);
      double mx = -1e300, z = 0;
      for (int j = 0; j <= t; ++j) {
        double dot = 0;
        for (int e = 0; e < hd; ++e) dot += q[size_t(t) * H * hd + hh * hd + e] * k[size_t(j) * G * hd + g * hd + e];
        s[size_t(j)] = dot / std::sqrt(double(hd));
        mx = std::max(mx, s[size_t(j)]);
      }
      for (double& x : s) z += (x = std::exp(x - mx));
      for (int e = 0; e < hd; ++e) {
        double acc = 0;
        for (int j = 0; j <= t; ++j) acc += s[size_t(j)] / z * v[size_t(j) * G * hd + g * hd + e];
        ctx[size_t(hh) * hd + e] = acc;
      }
    }
    matvec(w.wo, ctx.data(), D, H * hd, o.data());
    for (int j = 0; j < D; ++j) o[size_t(j)] += h[size_t(t) * D + j];
    rmsnorm(o.data(), p.norm_f(), hn.data());
    matvec(p.lm_head(), hn.data(), V, D, &logits[size_t(t) * V]);
  }
  return logits;
}

}  // namespace

TEST(HfBamba, PartialRopeMatchesReference) {
  // Our attention with rope_dim = head_dim / 2 against the double reference above, on both
  // backends, at positions up to 40 (angles well past 2 pi); the full rotation and no rotation
  // of the same weights are far from it, so the check can tell them apart.
  ModelConfig c;
  c.d_model = 48;
  c.n_layers = 1;
  c.attention_layers = {0};
  c.vocab_size = 50;
  c.n_heads = 4;
  c.n_kv_heads = 2;  // head_dim 12: 6 channels rotated, 6 pass
  c.d_ff = 0;
  c.rope_theta = 100.0f;
  c.rope_dim = 6;
  c.state_bridges = false;
  validate(c);
  Rng rng(7);
  const std::vector<int32_t> toks = test::tokens(rng, 41, c.vocab_size);
  Params p(c);
  test::randomize_params(p, 9);
  const std::vector<double> want = attention_reference(p, c, toks);
  const std::vector<float> wantf(want.begin(), want.end());
  auto run = [&](Backend& be, int rope_dim, bool rope) {
    ModelConfig cc = c;
    cc.rope_dim = rope_dim;
    cc.rope = rope;
    HybridModel m(cc, be);
    std::copy_n(p.data(), p.numel(), m.params().data());
    m.prepare();
    return std::pair{forward_all(m, toks), forward_stepwise(m, toks)};
  };
  auto cpu = make_cpu_backend();
  auto ref = make_ref_backend();
  for (Backend* be : {cpu.get(), ref.get()}) {
    const auto [full, step] = run(*be, 6, true);
    const double e_full = test::rel_err(full, wantf), e_step = test::rel_err(step, wantf);
    std::printf("partial RoPE (%s): %.3g full, %.3g token by token against the double reference\n", be->name().c_str(),
                e_full, e_step);
    EXPECT_LT(e_full, 1e-5);
    EXPECT_LT(e_step, 1e-5);
  }
  const double e_whole = test::rel_err(run(*cpu, 0, true).first, wantf);
  const double e_none = test::rel_err(run(*cpu, 0, false).first, wantf);
  std::printf("the whole head rotated: %.3g; no rotation: %.3g\n", e_whole, e_none);
  EXPECT_GT(e_whole, 1e-3);
  EXPECT_GT(e_none, 1e-3);
  // The config: even, at most head_dim; a partial rotation trains like a whole one.
  ModelConfig bad = c;
  bad.rope_dim = 5;
  EXPECT_THROW(validate(bad), Error);
  bad.rope_dim = 14;
  EXPECT_THROW(validate(bad), Error);
  EXPECT_EQ(training_unsupported(c), "");
  c.rope_dim = 12;  // the whole head: an ordinary model
  EXPECT_EQ(training_unsupported(c), "");
}

TEST(HfBamba, RefusesWhatItDoesNotImplement) {
  test::TempDir tmp("hf_bamba_refuse");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_bamba_folder(tmp, "", c, arena);
  const auto with = test::config_refusals(d);
  with([](json& j) { j["model_type"] = "jamba"; }, {"model_type", "bamba"});
  with([](json& j) { j["attention_bias"] = true; }, {"attention_bias"});
  with([](json& j) { j["mlp_bias"] = true; }, {"mlp_bias"});
  with([](json& j) { j["mamba_proj_bias"] = true; }, {"mamba_proj_bias"});
  with([](json& j) { j["hidden_act"] = "gelu"; }, {"hidden_act", "gelu"});
  with([](json& j) { j["rope_parameters"]["partial_rotary_factor"] = 1.0; }, {"partial_rotary_factor", "0.5"});
  with([](json& j) { j["partial_rotary_factor"] = 0.25; }, {"partial_rotary_factor", "0.25"});
  with([](json& j) { j["rope_parameters"]["rope_type"] = "yarn"; }, {"rope_parameters.rope_type", "yarn"});
  with([](json& j) { j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}}; }, {"rope_scaling.type", "linear"});
  with([](json& j) { j["head_dim"] = 16; }, {"head_dim", "16"});
  with([](json& j) { j["num_attention_heads"] = 16; }, {"hidden_size / num_attention_heads", "only an even count"});
  with([](json& j) { j["num_attention_heads"] = 5; }, {"num_attention_heads", "hidden_size"});
  with([](json& j) { j["num_key_value_heads"] = 3; }, {"num_key_value_heads", "3"});
  with([](json& j) { j["attn_layer_indices"] = {4}; }, {"attn_layer_indices[0]", "4"});
  with([](json& j) { j["attn_layer_indices"] = {2, 2}; }, {"attn_layer_indices", "twice"});
  with([](json& j) { j["attn_layer_indices"] = 2; }, {"attn_layer_indices", "list"});
  with([](json& j) { j["layers_block_type"] = {"mamba", "mamba", "mamba", "mamba"}; },
       {"layers_block_type[2]", "attention"});
  with([](json& j) { j["layer_types"] = {"mamba", "mamba", "full_attention", "moe"}; }, {"layer_types[3]", "moe"});
  with([](json& j) { j["mamba_n_heads"] = 5; }, {"mamba_n_heads", "64"});
  with([](json& j) { j["mamba_d_head"] = 8; }, {"mamba_d_head", "64"});
  with([](json& j) { j["mamba_n_groups"] = 3; }, {"mamba_n_groups", "mamba_n_heads"});
  with([](json& j) { j["mamba_expand"] = 1.5; }, {"mamba_expand"});
  with([](json& j) { j["mamba_chunk_size"] = 0; }, {"mamba_chunk_size"});
  with([](json& j) { j["time_step_limit"] = {0.5, 0.1}; }, {"time_step_limit"});
  with([](json& j) { j["rms_norm_eps"] = 0; }, {"rms_norm_eps"});
  // A config that disagrees with the weights: shapes and names are checked, never guessed.
  with([](json& j) { j["mamba_d_state"] = 4; }, {"model.layers.0.mamba.in_proj.weight", "shape"});
  with([](json& j) { j["attn_layer_indices"] = {1}; }, {"missing tensor", "model.layers.1.self_attn.q_proj.weight"});
  with([](json& j) { j["intermediate_size"] = 40; }, {"model.layers.0.feed_forward.gate_proj.weight", "shape"});
  with([](json& j) { j["tie_word_embeddings"] = true; }, {"lm_head.weight", "differs", "model.embed_tokens.weight"});
  with([](json& j) { j["mamba_conv_bias"] = false; }, {"model.layers.0.mamba.conv1d.bias", "mamba_conv_bias"});
}

TEST(HfBamba, LogitsMatchTransformers) {
  for (const char* name : kBambaFolders) {
    SCOPED_TRACE(name);
    const fs::path dir = kFixtures / name;
    if (!test::has_fixture(dir)) continue;
    const json exp = read_json(dir / "expected.json");
    auto be = make_cpu_backend();
    auto m = load_any_model(dir.string(), *be);
    const ModelConfig& c = m->config();
    ASSERT_FALSE(c.attention_layers.empty());
    ASSERT_FALSE(c.mamba2_layers.empty());
    // What the fixture script measured on transformers' modules: a mismatch is a changed library,
    // not noise; the mapping in src/io/hf_model.cpp (and docs/MODELS.md) must follow it.
    ASSERT_EQ(exp["rotary_dim"].get<int>(), c.resolved_rope_dim()) << "transformers' Bamba RoPE rotates another "
                                                                      "number of channels per head";
    ASSERT_EQ(exp["gated_norm_group_size"].get<int>(), c.mamba2_norm_group()) << "BambaRMSNormGated groups differently";
    const json lim = exp["mixer_time_step_limit"];
    ASSERT_FLOAT_EQ(exp["mixer_norm_eps"].get<float>(), c.norm_eps) << "BambaMixer's gated norm uses another eps";
    ASSERT_FLOAT_EQ(lim[0].get<float>(), c.mamba2_dt_min) << "BambaMixer applies another time_step_limit";
    ASSERT_EQ(lim[1].is_null(), std::isinf(c.mamba2_dt_max)) << "BambaMixer applies another time_step_limit";
    if (!lim[1].is_null()) {
      ASSERT_FLOAT_EQ(lim[1].get<float>(), c.mamba2_dt_max);
    }

    test::expect_matches_transformers(dir, *m);
    const std::vector<int32_t> toks = exp["tokens"].get<std::vector<int32_t>>();
    const std::vector<float> want = read_f32_file(dir / "logits.f32");
    const double e16 = test::rel_err(forward_all(*m, toks, KvType::F16), want);
    std::printf("%s with an f16 KV cache: %.3g\n", name, e16);
    EXPECT_LT(e16, 1e-3);
    // One perturbed weight breaks the bound: the comparison can fail.
    m->params().layer(c.mamba2_layers[0]).Dskip[1] += 0.05f;
    m->prepare();
    EXPECT_GT(test::rel_err(forward_all(*m, toks), want), 1e-4);
  }
}

}  // namespace hm

// Granite 4.0-H (GraniteMoeHybridForCausalLM): Bamba's Mamba-2 mixer, attention without
// positional encoding, experts plus a shared MLP after every layer, and Granite's scalings.
namespace hm {

namespace {

const char* const kGraniteFolders[] = {"granite_f32", "granite_bf16", "granite_rope"};

// A GraniteMoeHybridForCausalLM folder as transformers 5's save_pretrained writes it, our random
// weights under its names (written here from modeling_granitemoehybrid.py's module tree): the
// experts' and the shared MLP's gate and up projections fused into input_linear (per slab, the
// gate's rows then the up projection's). in_memory: transformers 5's in-memory expert names.
fs::path write_granite_folder(const test::TempDir& tmp, const std::string& extra_fields, ModelConfig& c,
                              std::vector<float>& arena, bool in_memory = false,
                              const std::function<void(json&)>& edit = nullptr) {
  const fs::path d = tmp.path / "granite";
  fs::create_directories(d);
  write_text(d / "config.json", R"({
  "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": "granitemoehybrid", "vocab_size": 120,
  "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 4, "num_attention_heads": 4,
  "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.1,
  "rms_norm_eps": 1e-05, "use_cache": true, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
  "tie_word_embeddings": true, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
  "attention_bias": false, "attention_dropout": 0.0, "embedding_multiplier": 3.0, "logits_scaling": 2.5,
  "residual_multiplier": 0.5, "attention_multiplier": 0.09, "num_local_experts": 4, "num_experts_per_tok": 2,
  "output_router_logits": false, "router_aux_loss_coef": 0.01, "shared_intermediate_size": 40,
  "position_embedding_type": "nope", "layer_types": ["mamba", "attention", "mamba", "mamba"],
  "mamba_n_heads": 4, "mamba_n_groups": 2, "mamba_d_state": 8, "mamba_d_head": 16, "mamba_d_conv": 3,
  "mamba_expand": 2, "mamba_chunk_size": 8, "mamba_conv_bias": true, "mamba_proj_bias": false,
  "time_step_min": 0.001, "time_step_max": 0.1, "time_step_limit": [0.0, Infinity],
  "dtype": "float32", "transformers_version": "5.17.0")" +
                                   extra_fields + "}\n");
  if (edit) edit_config(d, edit);
  c = load_hf_config(d.string());
  Params p(c);
  test::randomize_params(p, 61);
  std::vector<TensorToWrite> ts;
  std::deque<std::vector<float>> fused;  // storage of the fused input_linear tensors
  auto fuse = [&](const float* gate, const float* up, int64_t slabs, int64_t rows, int64_t cols) {
    std::vector<float>& f = fused.emplace_back(size_t(slabs * 2 * rows * cols));
    for (int64_t k = 0; k < slabs; ++k) {
      std::copy_n(gate + k * rows * cols, rows * cols, f.data() + (2 * k) * rows * cols);
      std::copy_n(up + k * rows * cols, rows * cols, f.data() + (2 * k + 1) * rows * cols);
    }
    return f.data();
  };
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const ParamSpec& s = p.specs()[i];
    const std::string& n = s.name;
    std::string rest, L;
    if (n.compare(0, 16, "backbone.layers.") == 0) {
      const size_t b = n.find('.', 16);
      L = "model.layers." + n.substr(16, b - 16) + ".";
      rest = n.substr(b + 1);
    }
    const std::string moe = L + "block_sparse_moe.", mlp = L + "shared_mlp.";
    auto put = [&](const std::string& name, std::vector<int64_t> shape, const float* data) {
      ts.push_back({name, DType::F32, std::move(shape), data});
    };
    if (n == "backbone.embeddings.weight") put("model.embed_tokens.weight", s.shape, p.at(i));
    else if (n == "backbone.norm_f.weight") put("model.norm.weight", s.shape, p.at(i));
    else if (n == "lm_head.weight") put(n, s.shape, p.at(i));
    else if (rest == "norm.weight") put(L + "input_layernorm.weight", s.shape, p.at(i));
    else if (rest == "mlp_norm.weight") put(L + "post_attention_layernorm.weight", s.shape, p.at(i));
    else if (rest == "mlp.router.weight") put(moe + (in_memory ? "router.weight" : "router.layer.weight"), s.shape, p.at(i));
    else if (rest == "mlp.experts.gate_proj.weight")
      put(moe + (in_memory ? "experts.gate_up_proj" : "input_linear.weight"), {s.shape[0], 2 * s.shape[1], s.shape[2]},
          fuse(p.at(i), p.get(n.substr(0, n.size() - 16) + "up_proj.weight"), s.shape[0], s.shape[1], s.shape[2]));
    else if (rest == "mlp.experts.down_proj.weight") put(moe + (in_memory ? "experts.down_proj" : "output_linear.weight"), s.shape, p.at(i));
    else if (rest == "mlp.shared_gate_proj.weight" || rest == "mlp.gate_proj.weight")
      put(mlp + "input_linear.weight", {2 * s.shape[0], s.shape[1]},
          fuse(p.at(i), p.get(n.substr(0, n.size() - 16) + "up_proj.weight"), 1, s.shape[0], s.shape[1]));
    else if (rest == "mlp.shared_down_proj.weight" || rest == "mlp.down_proj.weight") put(mlp + "output_linear.weight", s.shape, p.at(i));
    else if (rest == "mlp.experts.up_proj.weight" || rest == "mlp.shared_up_proj.weight" || rest == "mlp.up_proj.weight") continue;  // fused above
    else if (rest.compare(0, 6, "mixer.") == 0 && rest.find("_proj.weight") == 7)
      put(L + "self_attn." + rest.substr(6), s.shape, p.at(i));  // q/k/v/o_proj (in_proj, out_proj: Mamba's)
    else if (rest.compare(0, 6, "mixer.") == 0) put(L + "mamba." + rest.substr(6), s.shape, p.at(i));
    else ADD_FAILURE() << "no Granite name for " << n;
  }
  write_safetensors((d / "model.safetensors").string(), ts);
  arena.assign(p.data(), p.data() + p.numel());
  return d;
}

// Copies of `base`'s weights into a model of config c: every tensor of c's layout found in
// base under the same name (the caller sets the others).
std::unique_ptr<HybridModel> model_like(Backend& be, const ModelConfig& c, Params& base) {
  auto m = std::make_unique<HybridModel>(c, be);
  std::map<std::string, const float*> have;
  for (size_t i = 0; i < base.specs().size(); ++i) have[base.specs()[i].name] = base.at(i);
  for (size_t i = 0; i < m->params().specs().size(); ++i) {
    const ParamSpec& s = m->params().specs()[i];
    if (auto it = have.find(s.name); it != have.end()) std::copy_n(it->second, s.numel(), m->params().at(i));
  }
  return m;
}

}  // namespace

TEST(HfGranite, ConfigMapsFieldByField) {
  test::TempDir tmp("hf_granite_cfg");
  ModelConfig c;
  std::vector<float> arena;
  write_granite_folder(tmp, "", c, arena);
  EXPECT_EQ(c.d_model, 32);
  EXPECT_EQ(c.n_layers, 4);
  EXPECT_EQ(c.attention_layers, (std::vector<int>{1}));
  EXPECT_EQ(c.mamba2_layers, (std::vector<int>{0, 2, 3}));
  EXPECT_EQ(c.moe_layers, (std::vector<int>{0, 1, 2, 3}));  // every layer
  EXPECT_EQ(c.moe_experts, 4);
  EXPECT_EQ(c.moe_top_k, 2);
  EXPECT_TRUE(c.moe_renormalize);  // softmax over the top-k logits
  EXPECT_EQ(c.d_ff, 24);
  EXPECT_EQ(c.moe_shared_ff, 40);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_FALSE(c.rope);
  EXPECT_FLOAT_EQ(c.attention_scale, 0.09f);
  EXPECT_FLOAT_EQ(c.embedding_multiplier, 3.0f);
  EXPECT_FLOAT_EQ(c.residual_multiplier, 0.5f);
  EXPECT_FLOAT_EQ(c.logits_scaling, 2.5f);
  EXPECT_EQ(c.mamba2_heads(), 4);
  EXPECT_EQ(c.mamba2_groups, 2);
  EXPECT_FALSE(c.mamba2_norm_per_group);
  EXPECT_EQ(c.d_state, 8);
  EXPECT_EQ(c.d_conv, 3);
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-5f);
  EXPECT_TRUE(c.tie_embeddings);
  EXPECT_FALSE(c.state_bridges);
  EXPECT_EQ(config_to_json(config_from_json(config_to_json(c))), config_to_json(c));
  EXPECT_FLOAT_EQ(config_from_json(config_to_json(c)).attention_scale, 0.09f);
  EXPECT_EQ(config_from_json(config_to_json(c)).moe_shared_ff, 40);
  EXPECT_EQ(training_unsupported(c), "");  // Mamba-2, MoE with a shared expert, the multipliers

  auto mapped = [](const std::function<void(json&)>& edit) {
    test::TempDir t("hf_granite_cfg2");
    ModelConfig m;
    std::vector<float> a;
    const fs::path d = write_granite_folder(t, "", m, a);
    edit_config(d, edit);
    return load_hf_config(d.string());
  };
  // GraniteMoeHybridConfig's defaults where fields are absent: every layer Mamba, 8 experts of
  // 11008, top 2, a shared MLP of 1024, no scaling, untied, eps 1e-6.
  const ModelConfig def = mapped([](json& j) {
    for (const char* k : {"layer_types", "num_local_experts", "num_experts_per_tok", "intermediate_size",
                          "shared_intermediate_size", "embedding_multiplier", "residual_multiplier",
                          "attention_multiplier", "logits_scaling", "tie_word_embeddings", "rms_norm_eps",
                          "position_embedding_type", "num_key_value_heads"})
      j.erase(k);
  });
  EXPECT_TRUE(def.attention_layers.empty());
  EXPECT_EQ(def.mamba2_layers.size(), 4u);
  EXPECT_EQ(def.moe_experts, 8);
  EXPECT_EQ(def.moe_top_k, 2);
  EXPECT_EQ(def.d_ff, 11008);
  EXPECT_EQ(def.moe_shared_ff, 1024);
  EXPECT_EQ(def.embedding_multiplier, 1.0f);
  EXPECT_EQ(def.residual_multiplier, 1.0f);
  EXPECT_EQ(def.logits_scaling, 1.0f);
  EXPECT_FALSE(def.tie_embeddings);
  EXPECT_FLOAT_EQ(def.norm_eps, 1e-6f);
  // With attention and no multiplier given: scores times 1.0 (the config's default), not 1/sqrt(hd).
  const ModelConfig one = mapped([](json& j) { j.erase("attention_multiplier"); j["num_key_value_heads"] = nullptr; });
  EXPECT_FLOAT_EQ(one.attention_scale, 1.0f);
  EXPECT_EQ(one.n_kv_heads, 4);
  // No experts: the shared MLP is the dense FFN. The older name of layer_types.
  const ModelConfig dense = mapped([](json& j) {
    j["num_local_experts"] = 0;
    j["layers_block_type"] = j["layer_types"];
    j.erase("layer_types");
    j["position_embedding_type"] = nullptr;
  });
  EXPECT_TRUE(dense.moe_layers.empty());
  EXPECT_EQ(dense.d_ff, 40);
  EXPECT_EQ(dense.moe_shared_ff, 0);
  EXPECT_EQ(dense.attention_layers, (std::vector<int>{1}));
  // position_embedding_type "rope": the whole head rotated, rope_theta from rope_parameters (the
  // folder's 10000), transformers 4's top-level rope_theta, or the config class's default 10000.
  const ModelConfig rope = mapped([](json& j) {
    j["position_embedding_type"] = "rope";
    j["rope_parameters"]["rope_theta"] = 500.0;
  });
  EXPECT_TRUE(rope.rope);
  EXPECT_EQ(rope.resolved_rope_dim(), rope.head_dim());
  EXPECT_FLOAT_EQ(rope.rope_theta, 500.0f);
  EXPECT_TRUE(config_from_json(config_to_json(rope)).rope);
  const ModelConfig rope4 = mapped([](json& j) {
    j["position_embedding_type"] = "rope";
    j.erase("rope_parameters");
    j["rope_theta"] = 2000.0;
    j["rope_scaling"] = nullptr;
  });
  EXPECT_FLOAT_EQ(rope4.rope_theta, 2000.0f);
  const ModelConfig rope_def = mapped([](json& j) {
    j["position_embedding_type"] = "rope";
    j.erase("rope_parameters");
  });
  EXPECT_FLOAT_EQ(rope_def.rope_theta, 10000.0f);
  EXPECT_EQ(rope_def.resolved_rope_dim(), 8);
}

TEST(HfGranite, LoadsWeightsUnderTransformersNames) {
  // Our model on the same arena gives the same logits bit for bit: names, shapes and the halves
  // of every fused input_linear map one to one. Prefill = token by token; the reference backend
  // agrees; convert keeps the logits; transformers 5's in-memory expert names load the same.
  test::TempDir tmp("hf_granite_load");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_granite_folder(tmp, "", c, arena);
  auto be = make_cpu_backend();
  auto hf = load_any_model(d.string(), *be);
  HybridModel ours(c, *be);
  std::copy(arena.begin(), arena.end(), ours.params().data());
  ours.prepare();
  Rng rng(5);
  const std::vector<int32_t> toks = test::tokens(rng, 23, c.vocab_size);
  const std::vector<float> full = forward_all(*hf, toks);
  EXPECT_EQ(full, forward_all(ours, toks));
  const double e_step = test::rel_err(forward_stepwise(*hf, toks), full);
  std::printf("granite: prefill vs token by token %.3g\n", e_step);
  EXPECT_LT(e_step, 1e-5);
  auto ref = make_ref_backend();
  const double e_ref = test::rel_err(forward_all(*load_any_model(d.string(), *ref), toks), full);
  std::printf("granite: reference backend vs cpu %.3g\n", e_ref);
  EXPECT_LT(e_ref, 1e-5);
  convert_hf_model(d.string(), (tmp.path / "conv").string(), "f32");
  EXPECT_EQ(forward_all(*load_any_model((tmp.path / "conv").string(), *be), toks), full);
  test::TempDir tmp2("hf_granite_mem");
  ModelConfig c2;
  std::vector<float> arena2;
  const fs::path m = write_granite_folder(tmp2, "", c2, arena2, /*in_memory=*/true);
  EXPECT_TRUE(SafetensorsReader((m / "model.safetensors").string()).find("model.layers.0.block_sparse_moe.experts.gate_up_proj"));
  EXPECT_EQ(forward_all(*load_any_model(m.string(), *be), toks), full);
  // The dense variant (no experts): the shared MLP's halves are the MLP's gate and up.
  test::TempDir tmp3("hf_granite_dense");
  ModelConfig c3;
  std::vector<float> arena3;
  const fs::path dn = write_granite_folder(tmp3, "", c3, arena3, false, [](json& j) { j["num_local_experts"] = 0; });
  HybridModel ours3(c3, *be);
  std::copy(arena3.begin(), arena3.end(), ours3.params().data());
  ours3.prepare();
  EXPECT_EQ(forward_all(*load_any_model(dn.string(), *be), toks), forward_all(ours3, toks));
  // With RoPE: our model with rope on the whole head, bit for bit, and the rotation matters.
  test::TempDir tmp4("hf_granite_rope");
  ModelConfig c4;
  std::vector<float> arena4;
  const fs::path rd = write_granite_folder(tmp4, "", c4, arena4, false, [](json& j) {
    j["position_embedding_type"] = "rope";
    j["rope_parameters"]["rope_theta"] = 300.0;
  });
  ASSERT_TRUE(c4.rope);
  HybridModel ours4(c4, *be);
  std::copy(arena4.begin(), arena4.end(), ours4.params().data());
  ours4.prepare();
  auto hf4 = load_any_model(rd.string(), *be);
  const std::vector<float> with_rope = forward_all(*hf4, toks);
  EXPECT_EQ(with_rope, forward_all(ours4, toks));
  EXPECT_LT(test::rel_err(forward_stepwise(*hf4, toks), with_rope), 1e-5);
  ModelConfig c5 = c4;
  c5.rope = false;
  HybridModel nope(c5, *be);
  std::copy(arena4.begin(), arena4.end(), nope.params().data());
  nope.prepare();
  EXPECT_GT(test::rel_err(forward_all(nope, toks), with_rope), 1e-4);
}

TEST(HfGranite, ScalingsAndSharedExpertAreApplied) {
  // Each of Granite's scalings against the same model with the scaling folded into weights
  // (which is what it means), on the cpu and the reference backend: embedding_multiplier = an
  // untied model with the embeddings scaled; residual_multiplier = every output projection
  // (out_proj, o_proj, experts' and shared down) scaled; attention_scale = q_proj scaled by
  // attention_scale * sqrt(head_dim); logits_scaling = the logits divided. And the shared expert
  // beside a one-expert MoE = one dense MLP of both widths (gate/up rows and down columns stacked).
  ModelConfig base;
  base.d_model = 32;
  base.n_layers = 3;
  base.attention_layers = {1};
  base.mamba2_layers = {0, 2};
  base.vocab_size = 60;
  base.n_heads = 4;
  base.n_kv_heads = 2;
  base.rope = false;
  base.d_state = 8;
  base.mamba2_head_dim = 16;
  base.mamba2_groups = 1;
  base.d_ff = 24;
  base.moe_layers = {0, 1, 2};
  base.moe_experts = 3;
  base.moe_top_k = 2;
  base.moe_renormalize = true;
  base.moe_shared_ff = 20;
  base.tie_embeddings = false;
  base.state_bridges = false;
  validate(base);
  Params p(base);
  test::randomize_params(p, 71);
  Rng rng(8);
  const std::vector<int32_t> toks = test::tokens(rng, 19, base.vocab_size);
  auto cpu = make_cpu_backend();
  auto ref = make_ref_backend();
  for (Backend* be : {cpu.get(), ref.get()}) {
    SCOPED_TRACE(be->name());
    auto compare = [&](const char* what, const ModelConfig& scaled, const std::function<void(Params&)>& fold,
                       double divide = 1.0) {
      auto a = model_like(*be, scaled, p);
      a->prepare();
      auto b = model_like(*be, base, p);
      fold(b->params());
      b->prepare();
      std::vector<float> want = forward_all(*b, toks);
      for (float& x : want) x = float(x / divide);
      const double e = test::rel_err(forward_all(*a, toks), want);
      auto unscaled = model_like(*be, base, p);
      unscaled->prepare();
      const double moved = test::rel_err(forward_all(*unscaled, toks), want);
      std::printf("%s (%s): %.3g against the folded model, which is %.3g from the unscaled one\n", what,
                  be->name().c_str(), e, moved);
      EXPECT_LT(e, 1e-5) << what;
      EXPECT_GT(moved, 1e-3) << what;  // the scaling changes the model: the comparison can fail
    };
    auto scale = [](float* w, int64_t n, double s) {
      for (int64_t k = 0; k < n; ++k) w[k] = float(w[k] * s);
    };
    ModelConfig c = base;
    c.embedding_multiplier = 3.0f;
    compare("embedding_multiplier 3", c, [&](Params& q) { scale(q.embeddings(), int64_t(base.vocab_size) * base.d_model, 3.0); });
    c = base;
    c.residual_multiplier = 0.5f;
    compare("residual_multiplier 0.5", c, [&](Params& q) {
      const int64_t D = base.d_model, E = base.d_inner(), F = base.d_ff, S = base.moe_shared_ff, X = base.moe_experts;
      for (int l = 0; l < base.n_layers; ++l) {
        LayerWeights& w = q.layer(l);
        if (base.is_attention(l)) scale(w.wo, D * base.n_heads * base.head_dim(), 0.5);
        else scale(w.out_proj, D * E, 0.5);
        scale(w.e_down, X * D * F, 0.5);
        scale(w.s_down, D * S, 0.5);
      }
    });
    c = base;
    c.attention_scale = 0.3f;
    compare("attention_scale 0.3", c, [&](Params& q) {
      const int hd = base.head_dim();
      scale(q.layer(1).wq, int64_t(base.n_heads) * hd * base.d_model, 0.3 * std::sqrt(double(hd)));
    });
    c = base;
    c.logits_scaling = 4.0f;
    compare("logits_scaling 4", c, [](Params&) {}, 4.0);
  }
  // The shared expert: one expert (its gate is 1) plus a shared MLP of width S = a dense MLP of
  // width F + S.
  ModelConfig moe1 = base;
  moe1.moe_experts = 1;
  moe1.moe_top_k = 1;
  ModelConfig dense = base;
  dense.moe_layers.clear();
  dense.moe_shared_ff = 0;
  dense.d_ff = base.d_ff + base.moe_shared_ff;
  Params p1(moe1);
  test::randomize_params(p1, 72);
  auto a = model_like(*cpu, moe1, p1);
  a->prepare();
  auto b = model_like(*cpu, dense, p1);
  const int64_t D = base.d_model, F = base.d_ff, S = base.moe_shared_ff;
  for (int l = 0; l < base.n_layers; ++l) {
    const LayerWeights& s = p1.layer(l);
    LayerWeights& t = b->params().layer(l);
    std::copy_n(s.e_gate, F * D, t.w_gate);
    std::copy_n(s.s_gate, S * D, t.w_gate + F * D);
    std::copy_n(s.e_up, F * D, t.w_up);
    std::copy_n(s.s_up, S * D, t.w_up + F * D);
    for (int64_t r = 0; r < D; ++r) {
      std::copy_n(s.e_down + r * F, F, t.w_down + r * (F + S));
      std::copy_n(s.s_down + r * S, S, t.w_down + r * (F + S) + F);
    }
  }
  b->prepare();
  const double e = test::rel_err(forward_all(*a, toks), forward_all(*b, toks));
  std::printf("one expert + shared MLP against one dense MLP of both widths: %.3g\n", e);
  EXPECT_LT(e, 1e-5);
  // Validation of the new fields.
  ModelConfig bad = base;
  bad.residual_multiplier = 0;
  EXPECT_THROW(validate(bad), Error);
  bad = base;
  bad.attention_scale = -1;
  EXPECT_THROW(validate(bad), Error);
  bad = base;
  bad.moe_layers.clear();
  EXPECT_THROW(validate(bad), Error);  // a shared expert needs MoE layers
  bad = preset("tiny");
  bad.residual_multiplier = 0.5f;  // tiny has bridges
  EXPECT_THROW(validate(bad), Error);
}

TEST(HfGranite, RefusesWhatItDoesNotImplement) {
  test::TempDir tmp("hf_granite_refuse");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_granite_folder(tmp, "", c, arena);
  const json orig = parse_hf_json_file((d / "config.json").string());
  const auto with = test::config_refusals(d);
  with([](json& j) { j["model_type"] = "bamba"; }, {"model_type", "granitemoehybrid"});
  with([](json& j) { j["position_embedding_type"] = "alibi"; }, {"position_embedding_type", "alibi"});
  with([](json& j) {
    j["position_embedding_type"] = "rope";
    j["rope_parameters"]["rope_type"] = "yarn";
  }, {"rope_parameters.rope_type", "yarn"});
  with([](json& j) {
    j["position_embedding_type"] = "rope";
    j["rope_parameters"]["partial_rotary_factor"] = 0.5;
  }, {"partial_rotary_factor", "0.5"});
  with([](json& j) {
    j["position_embedding_type"] = "rope";
    j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  }, {"rope_scaling.type", "linear"});
  with([](json& j) { j["attention_bias"] = true; }, {"attention_bias"});
  with([](json& j) { j["mamba_proj_bias"] = true; }, {"mamba_proj_bias"});
  with([](json& j) { j["hidden_act"] = "gelu"; }, {"hidden_act", "gelu"});
  with([](json& j) { j["layer_types"] = {"mamba", "attention", "mamba"}; }, {"layer_types", "4"});
  with([](json& j) { j["layer_types"][2] = "moe"; }, {"layer_types[2]", "moe"});
  const ModelConfig spelled = [&] {  // newer transformers' spelling of the layer types
    write_text(d / "config.json", orig.dump());
    edit_config(d, [](json& j) { j["layer_types"] = {"linear_attention", "full_attention", "linear_attention", "linear_attention"}; });
    return load_hf_config(d.string());
  }();
  EXPECT_EQ(spelled.attention_layers, (std::vector<int>{1}));
  with([](json& j) { j["layers_block_type"] = {"mamba", "mamba", "mamba", "mamba"}; },
       {"layer_types", "layers_block_type", "layer 1"});
  with([](json& j) { j["num_experts_per_tok"] = 5; }, {"num_experts_per_tok", "num_local_experts"});
  with([](json& j) { j["num_local_experts"] = 0; j["shared_intermediate_size"] = 0; }, {"shared_intermediate_size"});
  with([](json& j) { j["embedding_multiplier"] = 0; }, {"embedding_multiplier"});
  with([](json& j) { j["logits_scaling"] = -2; }, {"logits_scaling"});
  with([](json& j) { j["attention_multiplier"] = 0; }, {"attention_multiplier"});
  with([](json& j) { j["head_dim"] = 16; }, {"head_dim", "16"});
  with([](json& j) { j["num_key_value_heads"] = 3; }, {"num_key_value_heads", "3"});
  with([](json& j) { j["mamba_n_groups"] = 3; }, {"mamba_n_groups"});
  // A config that disagrees with the weights.
  with([](json& j) { j["num_local_experts"] = 3; }, {"model.layers.0.block_sparse_moe.router.layer.weight", "shape"});
  with([](json& j) { j["intermediate_size"] = 20; }, {"model.layers.0.block_sparse_moe.input_linear.weight", "shape"});
  with([](json& j) { j["shared_intermediate_size"] = 16; }, {"model.layers.0.shared_mlp.input_linear.weight", "shape"});
  with([](json& j) { j["layer_types"] = {"mamba", "mamba", "attention", "mamba"}; },
       {"missing tensor", "model.layers.1.mamba.in_proj.weight"});
  with([](json& j) { j["tie_word_embeddings"] = false; }, {"missing tensor", "lm_head.weight"});
  // Both spellings of one tensor: which one is the model is ambiguous.
  write_text(d / "config.json", orig.dump());
  add_tensor_copy(d / "model.safetensors", "model.layers.2.block_sparse_moe.router.layer.weight",
                  "model.layers.2.block_sparse_moe.router.weight");
  expect_load_error(d, {"unexpected tensor", "model.layers.2.block_sparse_moe.router.weight"});
}

TEST(HfGranite, LogitsMatchTransformers) {
  for (const char* name : kGraniteFolders) {
    SCOPED_TRACE(name);
    const fs::path dir = kFixtures / name;
    if (!test::has_fixture(dir)) continue;
    const json exp = read_json(dir / "expected.json");
    auto be = make_cpu_backend();
    auto m = load_any_model(dir.string(), *be);
    const ModelConfig& c = m->config();
    ASSERT_FALSE(c.mamba2_layers.empty());
    ASSERT_EQ(exp["gated_norm_group_size"].get<int>(), c.mamba2_norm_group()) << "the gated norm groups differently";
    const json lim = exp["mixer_time_step_limit"];
    ASSERT_FLOAT_EQ(lim[0].get<float>(), c.mamba2_dt_min) << "the Mamba layer applies another time_step_limit";
    ASSERT_EQ(lim[1].is_null(), std::isinf(c.mamba2_dt_max)) << "the Mamba layer applies another time_step_limit";
    if (!lim[1].is_null()) {
      ASSERT_FLOAT_EQ(lim[1].get<float>(), c.mamba2_dt_max);
    }
    ASSERT_FLOAT_EQ(exp["mixer_norm_eps"].get<float>(), c.norm_eps) << "the Mamba layer's gated norm uses another eps";
    // Whether transformers' attention applies RoPE, and over how many channels, as measured there.
    ASSERT_EQ(exp.value("attention_uses_rope", false), c.rope) << "transformers' Granite attention and ours "
                                                                  "disagree on RoPE";
    if (c.rope) {
      ASSERT_EQ(exp["rotary_dim"].get<int>(), c.resolved_rope_dim()) << "transformers' Granite RoPE rotates another width";
    }
    test::expect_matches_transformers(dir, *m);
    const std::vector<int32_t> toks = exp["tokens"].get<std::vector<int32_t>>();
    const std::vector<float> want = read_f32_file(dir / "logits.f32");
    m->params().layer(c.mamba2_layers[0]).Dskip[1] += 0.05f;
    m->prepare();
    EXPECT_GT(test::rel_err(forward_all(*m, toks), want), 1e-4);
  }
}

}  // namespace hm
