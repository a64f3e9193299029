// Bamba (BambaForCausalLM, src/io/hf_model.cpp): Mamba-2 mixers and attention with RoPE on half
// of each head, a SwiGLU MLP after every layer. The mapping field by field, loading under
// transformers' names, the partial rotation against a reference written here, refusals, and
// parity with transformers on the fixtures of tests/fixtures/hf/make_fixtures.py (skipped when
// they are absent).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "core/error.h"
#include "io/hf_model.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "runtime/memory.h"
#include "test_util.h"

namespace hm {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const fs::path kFixtures = fs::path(HM_SOURCE_DIR) / "tests" / "fixtures" / "hf";
const char* const kBambaFolders[] = {"bamba_f32", "bamba_bf16"};

json read_json(const fs::path& p) {
  std::ifstream f(p);
  return json::parse(f);
}

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}

std::vector<float> read_f32_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::vector<float> v(size_t(fs::file_size(p)) / sizeof(float));
  f.read(reinterpret_cast<char*>(v.data()), std::streamsize(v.size() * sizeof(float)));
  return v;
}

// Every position's logits, one prefill; the KV cache float32 as transformers keeps it.
std::vector<float> logits_all(HybridModel& m, const std::vector<int32_t>& toks, KvType kv = KvType::F32) {
  HybridMemory mem(m.backend(), m.config(), 1, int(toks.size()) + 16, kv);
  Batch b;
  b.logits_all = true;
  b.add(0, toks);
  std::vector<float> logits;
  m.forward(b, mem, logits);
  return logits;
}

// The same token by token: the decode path.
std::vector<float> logits_stepwise(HybridModel& m, const std::vector<int32_t>& toks) {
  HybridMemory mem(m.backend(), m.config(), 1, int(toks.size()) + 16, KvType::F32);
  std::vector<float> all, logits;
  for (int32_t t : toks) {
    Batch b;
    b.add(0, {t});
    m.forward(b, mem, logits);
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

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

// config.json through the mapping's own reader: Python's Infinity becomes the string "Infinity",
// which the mapping reads back the same.
void edit_config(const fs::path& dir, const std::function<void(json&)>& edit) {
  json j = parse_hf_json_file((dir / "config.json").string());
  edit(j);
  write_text(dir / "config.json", j.dump(2));
}

// hm::Error whose message contains every one of `parts`.
void expect_load_error(const fs::path& dir, std::initializer_list<std::string> parts) {
  auto be = make_cpu_backend();
  try {
    load_any_model(dir.string(), *be);
    ADD_FAILURE() << "loading " << dir << " did not fail";
  } catch (const Error& e) {
    for (const std::string& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
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
  EXPECT_EQ(training_unsupported(c), "it has Mamba-2 layers (config 'mamba2_layers')");

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
  });
  EXPECT_EQ(two.attention_layers, (std::vector<int>{0, 3}));
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
  const std::vector<float> full = logits_all(*hf, toks);
  EXPECT_EQ(full, logits_all(ours, toks));
  const double e_step = test::rel_err(logits_stepwise(*hf, toks), full);
  std::printf("bamba: prefill vs token by token %.3g\n", e_step);
  EXPECT_LT(e_step, 1e-5);
  auto ref = make_ref_backend();
  const double e_ref = test::rel_err(logits_all(*load_any_model(d.string(), *ref), toks), full);
  std::printf("bamba: reference backend vs cpu %.3g\n", e_ref);
  EXPECT_LT(e_ref, 1e-5);
  convert_hf_model(d.string(), (tmp.path / "conv").string(), "f32");
  auto conv = load_any_model((tmp.path / "conv").string(), *be);
  EXPECT_EQ(conv->config().rope_dim, 4);
  EXPECT_EQ(logits_all(*conv, toks), full);
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
    return std::pair{logits_all(m, toks), logits_stepwise(m, toks)};
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
  // The config: even, at most head_dim; a partial rotation has no backward pass yet.
  ModelConfig bad = c;
  bad.rope_dim = 5;
  EXPECT_THROW(validate(bad), Error);
  bad.rope_dim = 14;
  EXPECT_THROW(validate(bad), Error);
  EXPECT_NE(training_unsupported(c).find("rope_dim"), std::string::npos);
  c.rope_dim = 12;  // the whole head: an ordinary model
  EXPECT_EQ(training_unsupported(c), "");
}

TEST(HfBamba, RefusesWhatItDoesNotImplement) {
  test::TempDir tmp("hf_bamba_refuse");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_bamba_folder(tmp, "", c, arena);
  const json orig = parse_hf_json_file((d / "config.json").string());
  auto with = [&](const std::function<void(json&)>& edit, std::initializer_list<std::string> parts) {
    write_text(d / "config.json", orig.dump());
    edit_config(d, edit);
    expect_load_error(d, parts);
  };
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
  int found = 0;
  for (const char* name : kBambaFolders) {
    SCOPED_TRACE(name);
    const fs::path dir = kFixtures / name;
    if (!fs::exists(dir / "expected.json")) continue;
    ++found;
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
    ASSERT_FLOAT_EQ(lim[0].get<float>(), c.mamba2_dt_min) << "BambaMixer applies another time_step_limit";
    ASSERT_EQ(lim[1].is_null(), std::isinf(c.mamba2_dt_max)) << "BambaMixer applies another time_step_limit";
    if (!lim[1].is_null()) {
      ASSERT_FLOAT_EQ(lim[1].get<float>(), c.mamba2_dt_max);
    }

    const std::vector<int32_t> toks = exp["tokens"].get<std::vector<int32_t>>();
    const std::vector<float> want = read_f32_file(dir / "logits.f32");
    const int V = c.vocab_size;
    ASSERT_EQ(want.size(), toks.size() * size_t(V));
    const double e_full = test::rel_err(logits_all(*m, toks), want);
    const double e_step = test::rel_err(logits_stepwise(*m, toks), want);
    const double e16 = test::rel_err(logits_all(*m, toks, KvType::F16), want);
    std::printf("%s (stored %s): max|ours - transformers| / max|transformers| = %.3g full forward, %.3g token "
                "by token, %.3g with an f16 KV cache\n",
                name, exp["stored_dtype"].get<std::string>().c_str(), e_full, e_step, e16);
    EXPECT_LT(e_full, 1e-4);
    EXPECT_LT(e_step, 1e-4);
    EXPECT_LT(e16, 1e-3);
    if (!exp["greedy"].is_null()) {  // transformers' greedy continuation, through our decode path
      HybridMemory mem(m->backend(), c, 1, int(toks.size()) + 16, KvType::F32);
      std::vector<float> logits;
      Batch b;
      b.add(0, toks);
      m->forward(b, mem, logits);
      std::vector<int> got;
      for (size_t i = 0; i < exp["greedy"].size(); ++i) {
        got.push_back(int(std::max_element(logits.begin(), logits.end()) - logits.begin()));
        Batch step;
        step.add(0, {got.back()});
        m->forward(step, mem, logits);
      }
      EXPECT_EQ(got, exp["greedy"].get<std::vector<int>>());
    }
    // One perturbed weight breaks the bound: the comparison can fail.
    m->params().layer(c.mamba2_layers[0]).Dskip[1] += 0.05f;
    m->prepare();
    EXPECT_GT(test::rel_err(logits_all(*m, toks), want), 1e-4);
  }
  if (found == 0)
    GTEST_SKIP() << "no Bamba fixtures in " << kFixtures.string()
                 << ": run `python3 tests/fixtures/hf/make_fixtures.py tests/fixtures/hf bamba` where torch and "
                    "transformers are installed (the H200 device machine) and commit the bamba_* folders";
}

}  // namespace hm
