// Hugging Face checkpoints (src/io/hf_model.h) and tokenizers: our CPU logits and token ids
// against what transformers and tokenizers gave on the same folders (tests/fixtures/hf, written
// by make_fixtures.py), and every kind of bad folder refused with a message naming the fault.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
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
#include "runtime/tokenizer.h"
#include "hf_test_util.h"
#include "test_util.h"

namespace hm {
namespace {

using test::edit_config;
using test::expect_load_error;

namespace fs = std::filesystem;
using nlohmann::json;

const fs::path kFixtures = fs::path(HM_SOURCE_DIR) / "tests" / "fixtures" / "hf";
const char* const kFolders[] = {"mamba_f32", "mamba_bf16", "mamba_sharded"};

using test::read_f32_file;
using test::read_json;
using test::write_text;

// Float32 KV cache unless asked otherwise, as transformers' reference keeps K and V.
using test::forward_all;
using test::forward_stepwise;
using test::expect_matches_transformers;
using test::has_fixture;

// Copy of a fixture folder (files, not links) to mutate.
fs::path copy_fixture(const test::TempDir& tmp, const std::string& name) {
  const fs::path dst = tmp.path / name;
  fs::copy(kFixtures / name, dst, fs::copy_options::recursive);
  return dst;
}

// Rewrites a safetensors file after `edit` changed its tensor list.
struct RawTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<unsigned char> bytes;
};
void rewrite_safetensors(const fs::path& path, const std::function<void(std::vector<RawTensor>&)>& edit) {
  std::vector<RawTensor> ts;
  {
    SafetensorsReader r(path.string());
    for (const TensorInfo& t : r.tensors()) {
      RawTensor x{t.name, t.dtype, t.shape, std::vector<unsigned char>(t.end - t.begin)};
      r.read_raw(t, x.bytes.data());
      ts.push_back(std::move(x));
    }
  }
  edit(ts);
  std::vector<TensorToWrite> w;
  for (const RawTensor& t : ts) w.push_back({t.name, t.dtype, t.shape, t.bytes.data()});
  write_safetensors(path.string(), w);
}

// A fixture folder of make_fixtures.py against our model m loaded from it: transformers' logits
// over the whole sequence and token by token, then its greedy continuation (generate with its
// cache) token for token.
}  // namespace

TEST(HfModel, LogitsMatchTransformers) {
  for (const char* name : kFolders) {
    SCOPED_TRACE(name);
    const fs::path dir = kFixtures / name;
    auto be = make_cpu_backend();
    ASSERT_TRUE(is_hf_model_dir(dir.string()));
    auto m = load_any_model(dir.string(), *be);
    expect_matches_transformers(dir, *m);
  }
}

// transformers' logits for a batch of 3 sequences in one forward (make_fixtures.py's
// batch_logits.f32, every fixture folder of every family): ours as one ragged batch in slots 0-2,
// and as batched decode steps (one token of each sequence per step).
TEST(HfModel, BatchLogitsMatchTransformers) {
  int checked = 0;
  for (const auto& entry : fs::directory_iterator(kFixtures)) {
    const fs::path dir = entry.path();
    if (!fs::exists(dir / "batch_logits.f32")) continue;
    SCOPED_TRACE(dir.filename().string());
    const json exp = read_json(dir / "expected.json");
    const auto seqs = exp["batch_tokens"].get<std::vector<std::vector<int32_t>>>();
    auto be = make_cpu_backend();
    auto m = load_any_model(dir.string(), *be);
    const int V = m->config().vocab_size, B = int(seqs.size()), T = int(seqs[0].size());
    const std::vector<float> want = read_f32_file(dir / "batch_logits.f32");
    ASSERT_EQ(want.size(), size_t(B) * size_t(T) * size_t(V));
    std::vector<float> full;
    {
      HybridMemory mem(*be, m->config(), B, T, KvType::F32);
      Batch b;
      b.logits_all = true;
      for (int s = 0; s < B; ++s) b.add(s, seqs[size_t(s)]);
      m->forward(b, mem, full);
    }
    std::vector<float> steps(want.size());
    {
      HybridMemory mem(*be, m->config(), B, T, KvType::F32);
      std::vector<float> logits;
      for (int t = 0; t < T; ++t) {
        Batch b;
        for (int s = 0; s < B; ++s) b.add(s, {seqs[size_t(s)][size_t(t)]});
        m->forward(b, mem, logits);
        for (int s = 0; s < B; ++s)
          std::copy_n(logits.begin() + int64_t(s) * V, V, steps.begin() + (int64_t(s) * T + t) * V);
      }
    }
    const double e_full = test::rel_err(full, want), e_step = test::rel_err(steps, want);
    std::printf("%s: batch of %d x %d, max|ours - transformers| / max|transformers| = %.3g one forward, %.3g "
                "batched decode\n", dir.filename().c_str(), B, T, e_full, e_step);
    EXPECT_LT(e_full, 1e-4);
    EXPECT_LT(e_step, 1e-4);
    ++checked;
  }
  std::printf("%d fixture folders with a batch\n", checked);
  // Every fixture folder carries one (make_fixtures.py writes it; --add-batch adds it to old ones).
  int folders = 0;
  for (const auto& entry : fs::directory_iterator(kFixtures)) folders += fs::exists(entry.path() / "expected.json");
  EXPECT_EQ(checked, folders);
}

TEST(HfModel, BiasLogitsMatchTransformers) {
  // use_bias true: in_proj and out_proj biases (make_fixtures.py's mamba_bias fixture).
  const fs::path dir = kFixtures / "mamba_bias";
  ASSERT_TRUE(has_fixture(dir));
  auto be = make_cpu_backend();
  auto m = load_any_model(dir.string(), *be);
  ASSERT_TRUE(m->config().mamba_proj_bias);
  expect_matches_transformers(dir, *m);
  // The biases are part of what matches: one bias element moved breaks the bound.
  const json exp = read_json(dir / "expected.json");
  const std::vector<int32_t> toks = exp["tokens"].get<std::vector<int32_t>>();
  m->params().layer(0).in_proj_b[3] += 0.05f;
  m->prepare();
  EXPECT_GT(test::rel_err(forward_all(*m, toks), read_f32_file(dir / "logits.f32")), 1e-4);
}

TEST(HfModel, PerturbedWeightIsCaught) {
  // The parity bound is tight enough to see one weight move: the test above can fail.
  const fs::path dir = kFixtures / "mamba_f32";
  const json exp = read_json(dir / "expected.json");
  const std::vector<int32_t> toks = exp["tokens"].get<std::vector<int32_t>>();
  auto be = make_cpu_backend();
  auto m = load_any_model(dir.string(), *be);
  m->params().layer(1).Dskip[5] += 0.01f;
  m->prepare();
  EXPECT_GT(test::rel_err(forward_all(*m, toks), read_f32_file(dir / "logits.f32")), 1e-4);
}

TEST(HfModel, ConfigMapping) {
  const ModelConfig a = load_hf_config((kFixtures / "mamba_f32").string());
  EXPECT_EQ(a.d_model, 32);
  EXPECT_EQ(a.n_layers, 2);
  EXPECT_EQ(a.d_inner(), 64);
  EXPECT_EQ(a.resolved_dt_rank(), 2);
  EXPECT_EQ(a.d_conv, 4);
  EXPECT_TRUE(a.tie_embeddings);
  EXPECT_TRUE(a.attention_layers.empty());
  const ModelConfig b = load_hf_config((kFixtures / "mamba_bf16").string());
  EXPECT_EQ(b.resolved_dt_rank(), 5);
  EXPECT_EQ(b.d_state, 8);
  EXPECT_FALSE(b.tie_embeddings);
  EXPECT_FLOAT_EQ(b.norm_eps, 1e-6f);
  const ModelConfig c = load_hf_config((kFixtures / "mamba_sharded").string());
  EXPECT_EQ(c.d_inner(), 48);  // intermediate_size, not expand * hidden_size
  EXPECT_EQ(c.inner_size, 48);
  EXPECT_EQ(hf_weight_files((kFixtures / "mamba_sharded").string()).size(), 5u);
  // Our own config.json is not an HF one.
  test::TempDir tmp("hf_ours");
  save_config((tmp.path / "config.json").string(), c);
  EXPECT_FALSE(is_hf_model_dir(tmp.str()));
  EXPECT_EQ(load_config((tmp.path / "config.json").string()).d_inner(), 48);
}

TEST(HfModel, ConvertWritesOurCheckpoint) {
  test::TempDir tmp("hf_convert");
  for (const char* name : kFolders) {
    SCOPED_TRACE(name);
    const fs::path dir = kFixtures / name, out = tmp.path / name;
    convert_hf_model(dir.string(), out.string(), "f32");
    EXPECT_FALSE(is_hf_model_dir(out.string()));
    auto be = make_cpu_backend();
    auto hf = load_any_model(dir.string(), *be);
    auto ours = load_any_model(out.string(), *be);
    const auto toks = read_json(dir / "expected.json")["tokens"].get<std::vector<int32_t>>();
    EXPECT_EQ(forward_all(*hf, toks), forward_all(*ours, toks));  // f32: the same weights exactly
    EXPECT_TRUE(fs::exists(out / "tokenizer.json"));
    // A second convert into the same folder is refused rather than overwriting a model.
    EXPECT_THROW(convert_hf_model(dir.string(), out.string(), "f32"), Error);
  }
  convert_hf_model((kFixtures / "mamba_f32").string(), (tmp.path / "bf16").string(), "bf16");
  EXPECT_EQ(SafetensorsReader((tmp.path / "bf16" / "model.safetensors").string())
                .find("backbone.embeddings.weight")->dtype, DType::BF16);
  EXPECT_THROW(convert_hf_model((kFixtures / "mamba_f32").string(), (tmp.path / "x").string(), "f8"), Error);
}

TEST(HfModel, RefusesWhatItDoesNotImplement) {
  test::TempDir tmp("hf_refuse");
  const fs::path d = copy_fixture(tmp, "mamba_f32");
  const auto with = test::config_refusals(d);
  with([](json& j) { j["architectures"] = {"LlamaForCausalLM"}; }, {"architectures", "LlamaForCausalLM"});
  with([](json& j) { j["architectures"] = {"FalconMambaForCausalLM"}; }, {"model_type", "falcon_mamba"});
  with([](json& j) { j["architectures"] = {"FalconMambaForCausalLM"}; j["model_type"] = "falcon_mamba";
         j["mixer_rms_eps"] = 0; }, {"mixer_rms_eps"});
  // use_bias maps to in_proj / out_proj biases, which the file must then hold.
  with([](json& j) { j["use_bias"] = true; }, {"missing tensor", "backbone.layers.0.mixer.in_proj.bias"});
  with([](json& j) { j["hidden_act"] = "gelu"; }, {"hidden_act", "gelu"});
  with([](json& j) { j["model_type"] = "mamba2"; }, {"model_type", "mamba2"});
  with([](json& j) { j["rms_norm"] = false; }, {"rms_norm"});
  with([](json& j) { j["d_model"] = 64; }, {"d_model", "hidden_size"});
  with([](json& j) { j["time_step_rank"] = "big"; }, {"time_step_rank", "big"});
  with([](json& j) { j["hidden_size"] = -1; }, {"hidden_size"});
  with([](json& j) { j["architectures"] = "MambaForCausalLM"; }, {"architectures"});
  // A config that disagrees with the weights: shapes are checked, never guessed.
  with([](json& j) { j["state_size"] = 8; }, {"x_proj.weight", "shape"});
  with([](json& j) { j["tie_word_embeddings"] = false; }, {"missing tensor", "lm_head.weight"});
  // use_conv_bias false maps exactly (a zero bias), but then the file must not hold one.
  with([](json& j) { j["use_conv_bias"] = false; }, {"conv1d.bias", "use_conv_bias"});
}

TEST(HfModel, ProjBiasesMatchReference) {
  // use_bias true (MambaForCausalLM, FalconMambaForCausalLM): in_proj and out_proj carry biases
  // (mamba_proj_bias). The mamba_f32 fixture's weights plus random biases under transformers' names,
  // against a double reference of MambaMixer.slow_forward written here (13 tokens, both layers);
  // cpu and ref backends, prefill = token by token, hm convert keeps the logits; zeroing either bias
  // moves the logits, so the check sees each.
  test::TempDir tmp("hf_bias");
  const fs::path d = copy_fixture(tmp, "mamba_f32");
  edit_config(d, [](json& j) { j["use_bias"] = true; });
  const ModelConfig c = load_hf_config(d.string());
  ASSERT_TRUE(c.mamba_proj_bias);
  EXPECT_EQ(config_to_json(config_from_json(config_to_json(c))), config_to_json(c));
  EXPECT_EQ(training_unsupported(c), "");  // the biases train (BatchGrad.ProjBiasesTrain)
  const int D = c.d_model, E = c.d_inner(), N = c.d_state, K = c.d_conv, R = c.resolved_dt_rank(), V = c.vocab_size;
  Rng rng(17);
  rewrite_safetensors(d / "model.safetensors", [&](std::vector<RawTensor>& ts) {
    for (int i = 0; i < c.n_layers; ++i)
      for (const auto& [name, n] : {std::pair{std::string("in_proj.bias"), 2 * E}, std::pair{std::string("out_proj.bias"), D}}) {
        std::vector<float> b(static_cast<size_t>(n));
        for (float& x : b) x = float(0.3 * rng.normal());
        RawTensor t{"backbone.layers." + std::to_string(i) + ".mixer." + name, DType::F32, {n},
                    std::vector<unsigned char>(b.size() * sizeof(float))};
        std::memcpy(t.bytes.data(), b.data(), t.bytes.size());
        ts.push_back(std::move(t));
      }
  });
  auto cpu = make_cpu_backend();
  auto ref = make_ref_backend();
  auto m = load_any_model(d.string(), *cpu);
  const Params& p = m->params();
  const std::vector<int32_t> toks = test::tokens(rng, 13, V);
  const auto silu = [](double x) { return x / (1 + std::exp(-x)); };
  // use_in / use_out: whether the reference adds in_proj's / out_proj's bias.
  const auto reference = [&](bool use_in, bool use_out) {
    const int T = int(toks.size());
    std::vector<std::vector<double>> h(static_cast<size_t>(T), std::vector<double>(static_cast<size_t>(D)));
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < D; ++j) h[size_t(t)][size_t(j)] = p.embeddings()[size_t(toks[size_t(t)]) * D + j];
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
    for (int i = 0; i < c.n_layers; ++i) {
      const LayerWeights& w = p.layer(i);
      std::vector<std::vector<double>> xs(static_cast<size_t>(T));  // in_proj's x half, per token
      std::vector<double> s(size_t(E) * N, 0.0);       // the scan state
      for (int t = 0; t < T; ++t) {
        std::vector<double> xz = matvec(w.in_proj, rmsnorm(h[size_t(t)], w.norm), 2 * E);  // in_proj(u) (+ b)
        if (use_in)
          for (int r = 0; r < 2 * E; ++r) xz[size_t(r)] += w.in_proj_b[r];
        xs[size_t(t)].assign(xz.begin(), xz.begin() + E);
        std::vector<double> xc(static_cast<size_t>(E));  // causal conv over zero-padded history + bias, SiLU
        for (int e = 0; e < E; ++e) {
          double a = w.conv_b[e];
          for (int k = 0; k < K; ++k) {
            const int src = t - (K - 1) + k;
            if (src >= 0) a += double(w.conv_w[size_t(e) * K + k]) * xs[size_t(src)][size_t(e)];
          }
          xc[size_t(e)] = silu(a);
        }
        const std::vector<double> dbc = matvec(w.x_proj, xc, R + 2 * N);  // dt_r | B | C
        std::vector<double> y(static_cast<size_t>(E));
        for (int e = 0; e < E; ++e) {
          double dt = w.dt_b[e];
          for (int r = 0; r < R; ++r) dt += double(w.dt_w[size_t(e) * R + r]) * dbc[size_t(r)];
          dt = dt > 20 ? dt : std::log1p(std::exp(dt));  // softplus
          double acc = 0;
          for (int n = 0; n < N; ++n) {
            double& sn = s[size_t(e) * N + n];
            sn = std::exp(-dt * std::exp(double(w.A_log[size_t(e) * N + n]))) * sn + dt * dbc[size_t(R + n)] * xc[size_t(e)];
            acc += sn * dbc[size_t(R + N + n)];
          }
          y[size_t(e)] = (acc + w.Dskip[e] * xc[size_t(e)]) * silu(xz[size_t(E + e)]);
        }
        const std::vector<double> o = matvec(w.out_proj, y, D);  // out_proj(y) (+ b)
        for (int j = 0; j < D; ++j) h[size_t(t)][size_t(j)] += o[size_t(j)] + (use_out ? double(w.out_proj_b[j]) : 0.0);
      }
    }
    std::vector<float> logits;
    for (int t = 0; t < T; ++t) {
      const std::vector<double> lg = matvec(p.lm_head(), rmsnorm(h[size_t(t)], p.norm_f()), V);
      logits.insert(logits.end(), lg.begin(), lg.end());
    }
    return logits;
  };
  const std::vector<float> want = reference(true, true);
  const std::vector<float> full = forward_all(*m, toks);
  for (Backend* be : {cpu.get(), ref.get()}) {
    const double e = test::rel_err(forward_all(*load_any_model(d.string(), *be), toks), want);
    std::printf("mamba with in_proj/out_proj biases vs double reference (%s): %.2g\n", be->name().c_str(), e);
    EXPECT_LT(e, 2e-6);
  }
  EXPECT_LT(test::rel_err(forward_stepwise(*m, toks), full), 1e-5);
  EXPECT_GT(test::rel_err(full, reference(false, true)), 1e-3);
  EXPECT_GT(test::rel_err(full, reference(true, false)), 1e-3);
  convert_hf_model(d.string(), (tmp.path / "conv").string(), "f32");
  EXPECT_EQ(forward_all(*load_any_model((tmp.path / "conv").string(), *cpu), toks), full);
  // Falcon-Mamba reads use_bias the same way.
  edit_config(d, [](json& j) {
    j["architectures"] = {"FalconMambaForCausalLM"};
    j["model_type"] = "falcon_mamba";
  });
  const ModelConfig fc = load_hf_config(d.string());
  EXPECT_TRUE(fc.mamba_proj_bias);
  EXPECT_TRUE(fc.mamba_bcdt_norm);
  auto fm = load_any_model(d.string(), *cpu);
  EXPECT_LT(test::rel_err(forward_stepwise(*fm, toks), forward_all(*fm, toks)), 1e-5);
  // Mamba-2 still refuses biases, naming the field.
  edit_config(d, [](json& j) {
    j["architectures"] = {"Mamba2ForCausalLM"};
    j["model_type"] = "mamba2";
  });
  expect_load_error(d, {"use_bias", "Mamba2ForCausalLM"});
}

TEST(HfModel, ConvBiasFalseLoadsAsZero) {
  test::TempDir tmp("hf_convbias");
  const fs::path d = copy_fixture(tmp, "mamba_f32");
  edit_config(d, [](json& j) { j["use_conv_bias"] = false; });
  rewrite_safetensors(d / "model.safetensors", [](std::vector<RawTensor>& ts) {
    std::erase_if(ts, [](const RawTensor& t) { return t.name.find("conv1d.bias") != std::string::npos; });
  });
  auto be = make_cpu_backend();
  auto m = load_any_model(d.string(), *be);
  for (int l = 0; l < 2; ++l)
    for (int k = 0; k < m->config().d_inner(); ++k) EXPECT_EQ(m->params().layer(l).conv_b[k], 0.0f);
}

TEST(HfModel, RefusesBadWeights) {
  test::TempDir tmp("hf_weights");
  const fs::path d = copy_fixture(tmp, "mamba_f32");
  const fs::path st = d / "model.safetensors";
  const fs::path keep = tmp.path / "orig.safetensors";
  fs::copy_file(st, keep);
  auto with = [&](const std::function<void(std::vector<RawTensor>&)>& edit, std::initializer_list<std::string> parts) {
    fs::copy_file(keep, st, fs::copy_options::overwrite_existing);
    rewrite_safetensors(st, edit);
    expect_load_error(d, parts);
  };
  auto find = [](std::vector<RawTensor>& ts, const std::string& n) -> RawTensor& {
    for (RawTensor& t : ts)
      if (t.name == n) return t;
    throw std::runtime_error("no tensor " + n);
  };
  with([](std::vector<RawTensor>& ts) { std::erase_if(ts, [](const RawTensor& t) { return t.name == "backbone.layers.1.mixer.D"; }); },
       {"missing tensor", "backbone.layers.1.mixer.D"});
  with([&](std::vector<RawTensor>& ts) {
    RawTensor& t = find(ts, "backbone.layers.0.mixer.x_proj.weight");
    t.shape = {t.shape[1], t.shape[0]};
  }, {"backbone.layers.0.mixer.x_proj.weight", "shape", "[34, 64]"});
  with([&](std::vector<RawTensor>& ts) {
    RawTensor b = find(ts, "backbone.layers.0.mixer.D");
    b.name = "backbone.layers.0.mixer.in_proj.bias";
    ts.push_back(b);
  }, {"unexpected tensor", "in_proj.bias"});
  with([&](std::vector<RawTensor>& ts) {
    RawTensor h = find(ts, "backbone.embeddings.weight");
    h.name = "lm_head.weight";
    reinterpret_cast<float*>(h.bytes.data())[7] += 1.0f;
    ts.push_back(h);
  }, {"lm_head.weight", "differs"});
  with([&](std::vector<RawTensor>& ts) {
    reinterpret_cast<float*>(find(ts, "backbone.norm_f.weight").bytes.data())[3] = NAN;
  }, {"backbone.norm_f.weight", "non-finite"});
  with([&](std::vector<RawTensor>& ts) { find(ts, "backbone.layers.0.mixer.D").dtype = DType::I32; },
       {"backbone.layers.0.mixer.D", "I32"});
  // A tied head stored anyway (older transformers did) is fine when it is the embeddings.
  fs::copy_file(keep, st, fs::copy_options::overwrite_existing);
  rewrite_safetensors(st, [&](std::vector<RawTensor>& ts) {
    RawTensor h = find(ts, "backbone.embeddings.weight");
    h.name = "lm_head.weight";
    ts.push_back(h);
  });
  auto be = make_cpu_backend();
  EXPECT_NO_THROW(load_any_model(d.string(), *be));
  // No weights at all, and both kinds at once.
  fs::remove(st);
  expect_load_error(d, {"no weights", "model.safetensors"});
  fs::copy_file(keep, st);
  write_text(d / "model.safetensors.index.json", R"({"weight_map": {}})");
  expect_load_error(d, {"ambiguous"});
}

TEST(HfModel, RefusesCorruptIndex) {
  test::TempDir tmp("hf_index");
  const fs::path d = copy_fixture(tmp, "mamba_sharded");
  const fs::path idx = d / "model.safetensors.index.json";
  const json orig = read_json(idx);
  auto with = [&](const std::string& text, std::initializer_list<std::string> parts) {
    write_text(idx, text);
    expect_load_error(d, parts);
  };
  with("{not json", {"model.safetensors.index.json", "invalid JSON"});
  with(R"({"metadata": {}})", {"weight_map"});
  with(R"({"weight_map": []})", {"weight_map"});
  {
    json j = orig;
    j["weight_map"]["backbone.norm_f.weight"] = 3;
    with(j.dump(), {"weight_map.backbone.norm_f.weight"});
  }
  {
    json j = orig;
    j["weight_map"]["backbone.norm_f.weight"] = "../../etc/passwd";
    with(j.dump(), {"weight_map.backbone.norm_f.weight", ".."});
  }
  {  // a tensor said to be in the wrong shard
    json j = orig;
    const std::string f = j["weight_map"]["backbone.norm_f.weight"];
    const std::string other = f == "model-00001-of-00005.safetensors" ? "model-00002-of-00005.safetensors"
                                                                        : "model-00001-of-00005.safetensors";
    j["weight_map"]["backbone.norm_f.weight"] = other;
    with(j.dump(), {"backbone.norm_f.weight", other});
  }
  {  // a shard's tensor missing from the index
    json j = orig;
    j["weight_map"].erase("backbone.layers.0.mixer.D");
    with(j.dump(), {"backbone.layers.0.mixer.D", "not listed"});
  }
  {  // a shard that is gone
    write_text(idx, orig.dump());
    fs::remove(d / "model-00005-of-00005.safetensors");
    expect_load_error(d, {"model-00005-of-00005.safetensors"});
  }
}

TEST(HfModel, CacheSnapshotSymlinksLoad) {
  // huggingface_hub's cache: snapshots/REV/FILE -> ../../blobs/HASH.
  test::TempDir tmp("hf_cache");
  const fs::path blobs = tmp.path / "blobs", snap = tmp.path / "snapshots" / "abc123";
  fs::create_directories(blobs);
  fs::create_directories(snap);
  int n = 0;
  for (const auto& e : fs::directory_iterator(kFixtures / "mamba_sharded")) {
    const std::string blob = "blob" + std::to_string(n++);
    fs::copy_file(e.path(), blobs / blob);
    fs::create_symlink(fs::path("../..") / "blobs" / blob, snap / e.path().filename());
  }
  auto be = make_cpu_backend();
  auto m = load_any_model(snap.string(), *be);
  const fs::path ref = kFixtures / "mamba_sharded";
  const auto toks = read_json(ref / "expected.json")["tokens"].get<std::vector<int32_t>>();
  EXPECT_LT(test::rel_err(forward_all(*m, toks), read_f32_file(ref / "logits.f32")), 1e-4);
  EXPECT_NO_THROW(load_tokenizer(snap.string()));
  // A link to a folder is not a weight file.
  const fs::path shard = snap / "model-00005-of-00005.safetensors";
  fs::remove(shard);
  fs::create_directory_symlink(blobs, shard);
  expect_load_error(snap, {"model-00005-of-00005.safetensors", "regular file"});
}

}  // namespace hm

namespace hm {

// Token ids of tokenizers (the Rust library transformers uses) on whitespace runs, digits,
// contractions, accents (one decomposed, which NFC composes), CJK, emoji and special tokens.
TEST(HfTokenizer, IdsMatchTokenizers) {
  for (const char* name : kFolders) {
    SCOPED_TRACE(name);
    const fs::path dir = kFixtures / name;
    auto tok = load_tokenizer(dir.string());
    EXPECT_EQ(tok->type(), "hf-bpe");
    EXPECT_EQ(tok->eos(), 0);  // config.json's eos_token_id
    int n = 0;
    const json exp = read_json(dir / "expected.json");
    for (const json& c : exp["tokenizer_cases"]) {
      const std::string text = c["text"];
      SCOPED_TRACE(text);
      const auto want = c["ids"].get<std::vector<int32_t>>();
      EXPECT_EQ(tok->encode(text, false), want);
      // Decoding: tokenizers' text, less the special tokens (decode_piece gives "" for them).
      std::string dec = c["decoded"];
      for (const char* special : {"<|endoftext|>", "<|padding|>"})
        for (size_t p; (p = dec.find(special)) != std::string::npos;) dec.erase(p, std::strlen(special));
      EXPECT_EQ(tok->decode(want), dec);
      ++n;
    }
    EXPECT_EQ(n, 11);
  }
}

TEST(HfTokenizer, Gpt2SplitMatchesTokenizers) {
  // Pieces from tokenizers' ByteLevel pre-tokenizer (make_fixtures.py's device run), in plain text.
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"a  b   c", {"a", " ", " b", "  ", " c"}},
      {"  \n\n  y\t\tz ", {"  \n\n ", " y", "\t", "\t", "z", " "}},
      {"I'll 've 'S 're's", {"I", "'ll", " '", "ve", " '", "S", " '", "re", "'s"}},
      {"12345abc", {"12345", "abc"}},
      {"a1b2", {"a", "1", "b", "2"}},
      {"!!! ...,;", {"!!!", " ...,;"}},
      {"x\u00a0y", {"x", "\u00a0", "y"}},
      {"\u01c5 \u01c8 \u02b0 \u1f88", {"\u01c5", " \u01c8", " \u02b0", " \u1f88"}},
      {"\u216b \u00bd \u00b2", {"\u216b", " \u00bd", " \u00b2"}},
      {"a\u200bb", {"a", "\u200b", "b"}},
      {"\r\n", {"\r\n"}},
      {"  \u3000a", {"  ", "\u3000", "a"}},
      {"ab'CD", {"ab", "'", "CD"}},
  };
  for (const auto& [text, want] : cases) {
    std::vector<std::string> got;
    for (std::string_view p : gpt2_split(text)) got.emplace_back(p);
    EXPECT_EQ(got, want) << text;
  }
}

TEST(HfTokenizer, Nfc) {
  EXPECT_EQ(nfc("re\u0301sume\u0301"), "r\u00e9sum\u00e9");
  EXPECT_EQ(nfc("\u1100\u1161\u11a8"), "\uac01");          // Hangul L V T -> one syllable
  EXPECT_EQ(nfc("\u212b"), "\u00c5");                       // Angstrom sign: a singleton
  EXPECT_EQ(nfc("a\u0323\u0302"), "\u1ead");                // reordered marks compose in turn
  EXPECT_EQ(nfc("a\u0302\u0323"), "\u1ead");
  EXPECT_EQ(nfc("\u0301a"), "\u0301a");                     // a leading mark stays
  EXPECT_EQ(nfc("plain ASCII"), "plain ASCII");
}

TEST(HfTokenizer, BosAndInvalidUtf8) {
  auto tok = load_tokenizer((kFixtures / "mamba_f32").string());
  const auto ids = tok->encode("Hello", true);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 0);  // config.json's bos_token_id
  EXPECT_EQ(std::vector<int32_t>(ids.begin() + 1, ids.end()), tok->encode("Hello", false));
  EXPECT_THROW(tok->encode("bad \xff byte", false), Error);
  EXPECT_THROW(tok->decode_piece(tok->vocab_size()), Error);
}

// eos_token_id as a list (config.json) and generation_config.json's: the first is eos, every one
// stops generation (is_eos); an id outside the tokenizer is an error naming it.
TEST(HfTokenizer, EosListsFromConfigAndGenerationConfig) {
  test::TempDir tmp("hf_tok_eos");
  for (const char* f : {"config.json", "tokenizer.json"})
    fs::copy_file(kFixtures / "mamba_f32" / f, tmp.path / f);
  json cfg = read_json(tmp.path / "config.json");
  cfg["eos_token_id"] = json::array({3, 5});
  write_text(tmp.path / "config.json", cfg.dump());
  write_text(tmp.path / "generation_config.json", R"({"eos_token_id": [3, 7], "do_sample": false})");
  auto tok = load_tokenizer(tmp.str());
  EXPECT_EQ(tok->eos(), 3);
  EXPECT_EQ(tok->more_eos(), (std::vector<int32_t>{5, 7}));
  for (int id : {3, 5, 7}) EXPECT_TRUE(tok->is_eos(id)) << id;
  for (int id : {0, 6}) EXPECT_FALSE(tok->is_eos(id)) << id;
  write_text(tmp.path / "generation_config.json", R"({"eos_token_id": 100000})");
  try {
    load_tokenizer(tmp.str());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("100000"), std::string::npos) << e.what();
  }
}

TEST(HfTokenizer, SaveWritesTheFileAsRead) {
  const fs::path dir = kFixtures / "mamba_bf16";
  test::TempDir tmp("hf_tok_save");
  load_tokenizer(dir.string())->save(tmp.str());
  std::ifstream a(dir / "tokenizer.json", std::ios::binary), b(tmp.path / "tokenizer.json", std::ios::binary);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(a), {}), std::string(std::istreambuf_iterator<char>(b), {}));
}

TEST(HfTokenizer, RefusesWhatItDoesNotImplement) {
  test::TempDir tmp("hf_tok_bad");
  const json orig = read_json(kFixtures / "mamba_f32" / "tokenizer.json");
  const auto with = test::tokenizer_refusals(tmp.path, orig);
  with([](json& j) { j["normalizer"] = {{"type", "NFKC"}}; }, {"normalizer", "NFKC"});
  with([](json& j) { j["pre_tokenizer"] = {{"type", "BertPreTokenizer"}}; }, {"pre_tokenizer", "BertPreTokenizer"});
  with([](json& j) { j["decoder"] = nullptr; }, {"decoder"});
  with([](json& j) { j["model"]["type"] = "Unigram"; }, {"model.type", "Unigram"});
  with([](json& j) { j["model"]["dropout"] = 0.1; }, {"model.dropout"});
  with([](json& j) { j["truncation"] = {{"max_length", 8}}; }, {"truncation"});
  with([](json& j) { j["added_tokens"][0]["lstrip"] = true; }, {"added_tokens[0].lstrip"});
  with([](json& j) { j["model"]["merges"][3] = "nospace"; }, {"model.merges[3]", "nospace"});
  with([](json& j) { j["model"]["merges"][3] = json::array({"zz", "qq"}); }, {"model.merges[3]", "zz"});
  with([](json& j) { j["model"]["vocab"].erase("A"); }, {"byte-level symbol", "byte 65"});
  with([](json& j) { j["post_processor"] = {{"type", "TemplateProcessing"}}; }, {"post_processor"});
}

}  // namespace hm

namespace hm {

namespace {

const char* const kMamba2Folders[] = {"mamba2_f32", "mamba2_groups", "mamba2_bf16"};

// A Mamba2ForCausalLM folder written here, as transformers' save_pretrained would: its config
// fields (time_step_limit with Python's Infinity) and our random weights under its tensor names.
fs::path write_mamba2_folder(const test::TempDir& tmp, const std::string& extra_fields, ModelConfig& c,
                             std::vector<float>& arena) {
  const fs::path d = tmp.path / "m2";
  fs::create_directories(d);
  write_text(d / "config.json", R"({
  "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": 32,
  "num_hidden_layers": 2, "vocab_size": 120, "state_size": 8, "expand": 2, "num_heads": 4,
  "head_dim": 16, "n_groups": 2, "conv_kernel": 3, "chunk_size": 8, "layer_norm_epsilon": 1e-05,
  "use_bias": false, "use_conv_bias": true, "hidden_act": "silu", "rms_norm": true,
  "residual_in_fp32": true, "time_step_rank": 2, "time_step_min": 0.001, "time_step_max": 0.1,
  "time_step_floor": 0.0001, "initializer_range": 0.1, "rescale_prenorm_residual": false,
  "use_cache": true, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
  "tie_word_embeddings": false, "dtype": "float32", "transformers_version": "5.17.0")" +
                                   extra_fields + "}\n");
  c = load_hf_config(d.string());
  Params p(c);
  test::randomize_params(p, 31);
  std::vector<TensorToWrite> ts;
  for (size_t i = 0; i < p.specs().size(); ++i)
    ts.push_back({p.specs()[i].name, DType::F32, p.specs()[i].shape, p.at(i)});
  write_safetensors((d / "model.safetensors").string(), ts);
  arena.assign(p.data(), p.data() + p.numel());
  return d;
}

}  // namespace

TEST(HfMamba2, ConfigMapsFieldByField) {
  test::TempDir tmp("hf_m2_cfg");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_mamba2_folder(tmp, R"(, "time_step_limit": [0.0, Infinity])", c, arena);
  EXPECT_EQ(c.d_model, 32);
  EXPECT_EQ(c.d_inner(), 64);
  EXPECT_EQ(c.mamba2_layers, (std::vector<int>{0, 1}));
  EXPECT_EQ(c.mamba2_heads(), 4);
  EXPECT_EQ(c.mamba2_head_dim, 16);
  EXPECT_EQ(c.mamba2_groups, 2);
  EXPECT_FALSE(c.mamba2_norm_per_group);  // transformers' MambaRMSNormGated: all of d_inner
  EXPECT_EQ(c.d_state, 8);
  EXPECT_EQ(c.d_conv, 3);
  EXPECT_FALSE(c.tie_embeddings);
  EXPECT_EQ(c.mamba2_dt_min, 0.0f);
  EXPECT_TRUE(std::isinf(c.mamba2_dt_max));
  // The tokenizer's reader of config.json accepts the same file (ids only).
  EXPECT_TRUE(is_hf_model_dir(d.string()));
  EXPECT_EQ(parse_hf_json_file((d / "config.json").string())["time_step_limit"][1], "Infinity");
  // A binding limit maps; our checkpoint keeps it.
  test::TempDir tmp2("hf_m2_cfg_lim");
  ModelConfig lim;
  write_mamba2_folder(tmp2, R"(, "time_step_limit": [0.01, 0.2])", lim, arena);
  EXPECT_FLOAT_EQ(lim.mamba2_dt_min, 0.01f);
  EXPECT_FLOAT_EQ(lim.mamba2_dt_max, 0.2f);
  EXPECT_FLOAT_EQ(config_from_json(config_to_json(lim)).mamba2_dt_max, 0.2f);
  // transformers 5 writes a non-finite float as {"__float__": "Infinity"}.
  test::TempDir tmp3("hf_m2_cfg_obj");
  ModelConfig obj;
  write_mamba2_folder(tmp3, R"(, "time_step_limit": [0.0, {"__float__": "Infinity"}])", obj, arena);
  EXPECT_TRUE(std::isinf(obj.mamba2_dt_max));
}

TEST(HfMamba2, LoadsWeightsUnderTransformersNames) {
  // Our model built from the mapped config on the same arena gives the same logits bit for bit
  // (names and shapes map one to one), token by token too; convert keeps them.
  test::TempDir tmp("hf_m2_load");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_mamba2_folder(tmp, "", c, arena);
  auto be = make_cpu_backend();
  auto hf = load_any_model(d.string(), *be);
  HybridModel ours(c, *be);
  std::copy(arena.begin(), arena.end(), ours.params().data());
  ours.prepare();
  Rng rng(3);
  const std::vector<int32_t> toks = test::tokens(rng, 21, c.vocab_size);
  const std::vector<float> full = forward_all(*hf, toks);
  EXPECT_EQ(full, forward_all(ours, toks));
  EXPECT_LT(test::rel_err(forward_stepwise(*hf, toks), full), 1e-5);
  convert_hf_model(d.string(), (tmp.path / "conv").string(), "f32");
  auto conv = load_any_model((tmp.path / "conv").string(), *be);
  EXPECT_EQ(forward_all(*conv, toks), full);
}

TEST(HfMamba2, RefusesWhatItDoesNotImplement) {
  test::TempDir tmp("hf_m2_refuse");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_mamba2_folder(tmp, "", c, arena);
  const auto with = test::config_refusals(d);
  with([](json& j) { j["use_bias"] = true; }, {"use_bias"});
  with([](json& j) { j["rms_norm"] = false; }, {"rms_norm"});
  with([](json& j) { j["norm_before_gate"] = true; }, {"norm_before_gate"});
  with([](json& j) { j["hidden_act"] = "gelu"; }, {"hidden_act", "gelu"});
  with([](json& j) { j["num_heads"] = 3; }, {"num_heads", "head_dim", "64"});
  with([](json& j) { j["n_groups"] = 3; }, {"n_groups", "num_heads"});
  with([](json& j) { j["model_type"] = "mamba"; }, {"model_type", "mamba2"});
  with([](json& j) { j["intermediate_size"] = 96; }, {"intermediate_size", "64"});
  with([](json& j) { j["time_step_limit"] = {0.5, 0.1}; }, {"time_step_limit"});
  with([](json& j) { j["time_step_limit"] = {0.0, "big"}; }, {"time_step_limit[1]"});
  with([](json& j) { j["time_step_limit"] = json::array({0.0, json{{"__float__", "NaN"}}}); }, {"time_step_limit[1]"});
  with([](json& j) { j["chunk_size"] = 0; }, {"chunk_size"});
  // Shapes are checked against the weights, never guessed: a d_mlp split (a wider in_proj, which
  // transformers' Mamba2Mixer cannot load either) or another state size.
  with([](json& j) { j["state_size"] = 4; }, {"in_proj.weight", "shape"});
  with([](json& j) { j["tie_word_embeddings"] = true; }, {"lm_head.weight"});
  with([](json& j) { j["use_conv_bias"] = false; }, {"conv1d.bias", "use_conv_bias"});
  // Python's NaN is read, then refused where a number is needed.
  write_text(d / "config.json", R"({"architectures": ["Mamba2ForCausalLM"], "hidden_size": NaN})");
  expect_load_error(d, {"hidden_size"});
}

TEST(HfMamba2, LogitsMatchTransformers) {
  for (const char* name : kMamba2Folders) {
    SCOPED_TRACE(name);
    const fs::path dir = kFixtures / name;
    if (!has_fixture(dir)) continue;
    const json exp = read_json(dir / "expected.json");
    auto be = make_cpu_backend();
    auto m = load_any_model(dir.string(), *be);
    // Which columns transformers' gated norm normalizes together, as the fixture script measured it.
    ASSERT_EQ(exp["gated_norm_group_size"].get<int>(), m->config().mamba2_norm_group())
        << "transformers' MambaRMSNormGated groups differently from the mapping in "
           "src/io/hf_model.cpp (mamba2_norm_per_group): update the mapping and docs/MODELS.md";
    expect_matches_transformers(dir, *m);
    // One perturbed weight breaks the bound: the comparison can fail.
    m->params().layer(0).Dskip[1] += 0.01f;
    m->prepare();
    EXPECT_GT(test::rel_err(forward_all(*m, exp["tokens"].get<std::vector<int32_t>>()),
                            read_f32_file(dir / "logits.f32")), 1e-4);
  }
}

// Falcon-Mamba: MambaForCausalLM's tensors, plus a weightless RMSNorm on dt_r, B and C.
namespace {
const char* const kFalconFolders[] = {"falcon_mamba_f32", "falcon_mamba_bf16"};

// The mamba_f32 fixture relabelled as a Falcon-Mamba folder (same tensor names and shapes).
fs::path falcon_copy(const test::TempDir& tmp, double eps) {
  const fs::path d = copy_fixture(tmp, "mamba_f32");
  edit_config(d, [eps](json& j) {
    j["architectures"] = {"FalconMambaForCausalLM"};
    j["model_type"] = "falcon_mamba";
    j["mixer_rms_eps"] = eps;
  });
  return d;
}
}  // namespace

TEST(HfFalconMamba, ConfigMapsAndTheNormRuns) {
  test::TempDir tmp("hf_falcon");
  const fs::path d = falcon_copy(tmp, 1e-5);
  auto be = make_cpu_backend();
  auto falcon = load_any_model(d.string(), *be);
  auto plain = load_any_model((kFixtures / "mamba_f32").string(), *be);
  const ModelConfig& c = falcon->config();
  EXPECT_TRUE(c.mamba_bcdt_norm);
  EXPECT_FLOAT_EQ(c.mamba_bcdt_norm_eps, 1e-5f);
  EXPECT_FALSE(plain->config().mamba_bcdt_norm);
  // Our checkpoint keeps both fields.
  const ModelConfig back = config_from_json(config_to_json(c));
  EXPECT_TRUE(back.mamba_bcdt_norm);
  EXPECT_FLOAT_EQ(back.mamba_bcdt_norm_eps, 1e-5f);
  Rng rng(5);
  const std::vector<int32_t> toks = test::tokens(rng, 19, c.vocab_size);
  const std::vector<float> full = forward_all(*falcon, toks);
  // The same weights without the norm compute something else; prefill and decode agree.
  EXPECT_GT(test::rel_err(full, forward_all(*plain, toks)), 1e-2);
  EXPECT_LT(test::rel_err(forward_stepwise(*falcon, toks), full), 1e-5);
  // Default eps when the field is absent: transformers' FalconMambaConfig, 1e-6.
  edit_config(d, [](json& j) { j.erase("mixer_rms_eps"); });
  EXPECT_FLOAT_EQ(load_any_model(d.string(), *be)->config().mamba_bcdt_norm_eps, 1e-6f);
}

TEST(HfFalconMamba, NormMakesDtBAndCScaleFree) {
  // rmsnorm(a * v) = rmsnorm(v) for a > 0 (up to eps): scaling x_proj's dt_r, B or C rows leaves
  // a Falcon-Mamba model's logits unchanged and changes a plain Mamba model's. Checks that each
  // of the three slices is normalized on its own, over the right columns.
  test::TempDir tmp("hf_falcon_scale");
  const fs::path d = falcon_copy(tmp, 1e-12);
  auto be = make_cpu_backend();
  for (bool falcon : {true, false}) {
    SCOPED_TRACE(falcon ? "falcon" : "plain");
    auto m = load_any_model(falcon ? d.string() : (kFixtures / "mamba_f32").string(), *be);
    const ModelConfig& c = m->config();
    Rng rng(6);
    const std::vector<int32_t> toks = test::tokens(rng, 11, c.vocab_size);
    const std::vector<float> base = forward_all(*m, toks);
    const int R = c.resolved_dt_rank(), N = c.d_state, E = c.d_inner();
    const int lo[3] = {0, R, R + N}, hi[3] = {R, R + N, R + 2 * N};
    const float scale[3] = {3.0f, 0.25f, 8.0f};
    for (int part = 0; part < 3; ++part) {
      SCOPED_TRACE(part);
      for (int layer = 0; layer < c.n_layers; ++layer)
        for (int r = lo[part]; r < hi[part]; ++r)
          for (int k = 0; k < E; ++k) m->params().layer(layer).x_proj[int64_t(r) * E + k] *= scale[part];
      m->prepare();
      const double e = test::rel_err(forward_all(*m, toks), base);
      std::printf("%s, x_proj part %d scaled by %g: logits moved by %.3g\n", falcon ? "falcon" : "plain", part,
                  double(scale[part]), e);
      if (falcon) EXPECT_LT(e, 1e-6); else EXPECT_GT(e, 2e-5);
      for (int layer = 0; layer < c.n_layers; ++layer)
        for (int r = lo[part]; r < hi[part]; ++r)
          for (int k = 0; k < E; ++k) m->params().layer(layer).x_proj[int64_t(r) * E + k] /= scale[part];
      m->prepare();
    }
  }
}

TEST(HfFalconMamba, LogitsMatchTransformers) {
  for (const char* name : kFalconFolders) {
    SCOPED_TRACE(name);
    const fs::path dir = kFixtures / name;
    if (!has_fixture(dir)) continue;
    auto be = make_cpu_backend();
    auto m = load_any_model(dir.string(), *be);
    ASSERT_TRUE(m->config().mamba_bcdt_norm);
    expect_matches_transformers(dir, *m);
  }
}

}  // namespace hm

// Jamba: Mamba-1 mixers with weighted RMSNorms on dt_r, B and C, attention without positional
// encoding (GQA), and after every layer a dense SwiGLU MLP or a mixture of experts.
namespace hm {

namespace {

// jamba_bias: Jamba's mamba_proj_bias (in_proj and out_proj biases).
const char* const kJambaFolders[] = {"jamba_f32", "jamba_bf16", "jamba_bias"};

// transformers' name of each of our tensors, written here from modeling_jamba.py's module tree
// (independently of src/io/hf_model.cpp's mapping). Expert stacks are handled by the caller.
std::string jamba_name(const std::string& ours) {
  if (ours == "backbone.embeddings.weight") return "model.embed_tokens.weight";
  if (ours == "backbone.norm_f.weight") return "model.final_layernorm.weight";
  if (ours == "lm_head.weight") return ours;
  const size_t a = std::strlen("backbone.layers."), b = ours.find('.', a);
  const std::string L = "model.layers." + ours.substr(a, b - a) + ".", rest = ours.substr(b + 1);
  const std::pair<const char*, const char*> table[] = {
      {"norm.weight", "input_layernorm.weight"}, {"mlp_norm.weight", "pre_ff_layernorm.weight"},
      {"mixer.q_proj.weight", "self_attn.q_proj.weight"}, {"mixer.k_proj.weight", "self_attn.k_proj.weight"},
      {"mixer.v_proj.weight", "self_attn.v_proj.weight"}, {"mixer.o_proj.weight", "self_attn.o_proj.weight"},
      {"mlp.router.weight", "feed_forward.router.weight"}, {"mlp.gate_proj.weight", "feed_forward.gate_proj.weight"},
      {"mlp.up_proj.weight", "feed_forward.up_proj.weight"}, {"mlp.down_proj.weight", "feed_forward.down_proj.weight"},
  };
  for (const auto& [o, h] : table)
    if (rest == o) return L + h;
  EXPECT_EQ(rest.compare(0, 6, "mixer."), 0) << ours;
  return L + "mamba." + rest.substr(6);  // in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj, *_layernorm
}

// A JambaForCausalLM folder as transformers 5's save_pretrained writes it (JambaConfig's fields;
// experts one tensor each, or fused as transformers holds them in memory), with our random
// weights; `arena` gets them in our layout.
fs::path write_jamba_folder(const test::TempDir& tmp, const std::string& extra_fields, ModelConfig& c,
                            std::vector<float>& arena, bool fused_experts = false, bool proj_bias = false) {
  const fs::path d = tmp.path / "jamba";
  fs::create_directories(d);
  write_text(d / "config.json", R"({
  "architectures": ["JambaForCausalLM"], "model_type": "jamba", "vocab_size": 120,
  "tie_word_embeddings": false, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
  "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "initializer_range": 0.02,
  "rms_norm_eps": 1e-06, "use_cache": true, "num_logits_to_keep": 1, "output_router_logits": false,
  "router_aux_loss_coef": 0.001, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
  "sliding_window": null, "max_position_embeddings": 262144, "attention_dropout": 0.0,
  "num_experts_per_tok": 2, "num_experts": 4, "expert_layer_period": 2, "expert_layer_offset": 1,
  "attn_layer_period": 4, "attn_layer_offset": 2, "use_mamba_kernels": false, "mamba_d_state": 8,
  "mamba_d_conv": 3, "mamba_expand": 2, "mamba_dt_rank": 5, "mamba_conv_bias": true,
  "mamba_proj_bias": )" + std::string(proj_bias ? "true" : "false") +
                                   R"(, "dtype": "float32", "transformers_version": "5.17.0")" + extra_fields + "}\n");
  c = load_hf_config(d.string());
  Params p(c);
  test::randomize_params(p, 41);
  std::vector<TensorToWrite> ts;
  std::deque<std::vector<float>> fused;  // storage of the fused gate_up stacks
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const ParamSpec& s = p.specs()[i];
    if (s.name.find(".mlp.experts.") == std::string::npos) {
      ts.push_back({jamba_name(s.name), DType::F32, s.shape, p.at(i)});
      continue;
    }
    // backbone.layers.N.mlp.experts.P.weight -> model.layers.N.feed_forward.experts.E.P.weight
    const std::string L = jamba_name(s.name.substr(0, s.name.find(".mlp.")) + ".norm.weight");
    const std::string stem = L.substr(0, L.rfind("input_layernorm")) + "feed_forward.experts.";
    const std::string proj = s.name.substr(s.name.rfind("experts.") + 8);
    const int64_t X = s.shape[0], R = s.shape[1], C = s.shape[2];
    if (!fused_experts) {
      for (int64_t e = 0; e < X; ++e)
        ts.push_back({stem + std::to_string(e) + "." + proj, DType::F32, {R, C}, p.at(i) + e * R * C});
    } else if (proj == "down_proj.weight") {
      ts.push_back({stem + "down_proj", DType::F32, s.shape, p.at(i)});
    } else if (proj == "gate_proj.weight") {  // gate_up_proj[e] = gate_e rows then up_e rows
      const float* up = p.get(s.name.substr(0, s.name.rfind("gate_proj")) + "up_proj.weight");
      std::vector<float>& g = fused.emplace_back(size_t(X * 2 * R * C));
      for (int64_t e = 0; e < X; ++e) {
        std::copy_n(p.at(i) + e * R * C, R * C, g.data() + e * 2 * R * C);
        std::copy_n(up + e * R * C, R * C, g.data() + e * 2 * R * C + R * C);
      }
      ts.push_back({stem + "gate_up_proj", DType::F32, {X, 2 * R, C}, g.data()});
    }
  }
  write_safetensors((d / "model.safetensors").string(), ts);
  arena.assign(p.data(), p.data() + p.numel());
  return d;
}

}  // namespace

TEST(HfJamba, ConfigMapsFieldByField) {
  test::TempDir tmp("hf_jamba_cfg");
  ModelConfig c;
  std::vector<float> arena;
  write_jamba_folder(tmp, "", c, arena);
  EXPECT_EQ(c.hybrid, "simple");
  EXPECT_EQ(c.d_model, 32);
  EXPECT_EQ(c.n_layers, 4);
  EXPECT_EQ(c.vocab_size, 120);
  EXPECT_EQ(c.attention_layers, (std::vector<int>{2}));  // i % attn_layer_period == attn_layer_offset
  EXPECT_EQ(c.moe_layers, (std::vector<int>{1, 3}));     // i % expert_layer_period == expert_layer_offset
  EXPECT_EQ(c.moe_experts, 4);
  EXPECT_EQ(c.moe_top_k, 2);
  EXPECT_FALSE(c.moe_renormalize);  // JambaSparseMoeBlock keeps the softmax probabilities of the top k
  EXPECT_EQ(c.d_ff, 48);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim(), 8);
  EXPECT_FALSE(c.rope);
  EXPECT_EQ(c.d_state, 8);
  EXPECT_EQ(c.d_conv, 3);
  EXPECT_EQ(c.d_inner(), 64);
  EXPECT_EQ(c.resolved_dt_rank(), 5);
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-6f);
  EXPECT_TRUE(c.mamba_bcdt_norm);
  EXPECT_TRUE(c.mamba_bcdt_norm_weight);
  EXPECT_FLOAT_EQ(c.mamba_bcdt_norm_eps, 1e-6f);  // the dt/B/C norms use rms_norm_eps
  EXPECT_FALSE(c.tie_embeddings);
  EXPECT_FALSE(c.state_bridges);
  EXPECT_TRUE(c.true_layers.empty());
  EXPECT_TRUE(c.mamba2_layers.empty());
  // Our checkpoint keeps every field.
  EXPECT_EQ(config_to_json(config_from_json(config_to_json(c))), config_to_json(c));
  EXPECT_TRUE(config_from_json(config_to_json(c)).mamba_bcdt_norm_weight);
  // JambaConfig's defaults where fields are absent, and the other spellings.
  auto mapped = [](const std::function<void(json&)>& edit) {
    test::TempDir t("hf_jamba_cfg2");
    ModelConfig m;
    std::vector<float> a;
    const fs::path d = write_jamba_folder(t, "", m, a);
    edit_config(d, edit);
    return load_hf_config(d.string());
  };
  const ModelConfig def = mapped([](json& j) {
    for (const char* k : {"attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset",
                          "rms_norm_eps", "tie_word_embeddings", "mamba_d_state", "mamba_d_conv", "mamba_expand"})
      j.erase(k);
    j["num_hidden_layers"] = 9;
    j["mamba_dt_rank"] = "auto";
  });
  EXPECT_EQ(def.attention_layers, (std::vector<int>{4}));             // period 8, offset 4
  EXPECT_EQ(def.moe_layers, (std::vector<int>{1, 3, 5, 7}));          // period 2, offset 1
  EXPECT_FLOAT_EQ(def.norm_eps, 1e-6f);
  EXPECT_FALSE(def.tie_embeddings);
  EXPECT_EQ(def.d_state, 16);
  EXPECT_EQ(def.d_conv, 4);
  EXPECT_EQ(def.d_inner(), 64);
  EXPECT_EQ(def.resolved_dt_rank(), 2);  // "auto": ceil(32 / 16)
  const ModelConfig dense = mapped([](json& j) { j["num_experts"] = 1; });
  EXPECT_TRUE(dense.moe_layers.empty());  // one expert: every FFN is the dense MLP
  const ModelConfig mha = mapped([](json& j) { j["num_key_value_heads"] = nullptr; });
  EXPECT_EQ(mha.n_kv_heads, 4);
  const ModelConfig tied = mapped([](json& j) { j["tie_word_embeddings"] = true; j["rms_norm_eps"] = 1e-5; });
  EXPECT_TRUE(tied.tie_embeddings);
  EXPECT_FLOAT_EQ(tied.mamba_bcdt_norm_eps, 1e-5f);
}

TEST(HfJamba, LoadsWeightsUnderTransformersNames) {
  // Our model on the same arena gives the same logits bit for bit: names and shapes map one to
  // one, experts stored one tensor each or fused. Prefill = token by token; convert keeps them.
  test::TempDir tmp("hf_jamba_load");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_jamba_folder(tmp, "", c, arena);
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
  std::printf("jamba: prefill vs token by token %.3g\n", e_step);
  EXPECT_LT(e_step, 1e-5);
  convert_hf_model(d.string(), (tmp.path / "conv").string(), "f32");
  auto conv = load_any_model((tmp.path / "conv").string(), *be);
  EXPECT_EQ(forward_all(*conv, toks), full);
  // The fused expert layout (gate_up_proj [experts, 2F, D], down_proj [experts, D, F]).
  test::TempDir tmp2("hf_jamba_fused");
  ModelConfig c2;
  std::vector<float> arena2;
  const fs::path f = write_jamba_folder(tmp2, "", c2, arena2, /*fused_experts=*/true);
  EXPECT_TRUE(SafetensorsReader((f / "model.safetensors").string()).find("model.layers.1.feed_forward.experts.gate_up_proj"));
  EXPECT_EQ(forward_all(*load_any_model(f.string(), *be), toks), full);
  // The reference backend (plain loops) computes the same model.
  auto ref = make_ref_backend();
  EXPECT_LT(test::rel_err(forward_all(*load_any_model(d.string(), *ref), toks), full), 1e-5);
}

// mamba_proj_bias: in_proj's and out_proj's biases under JambaMambaMixer's names (the same math
// as Mamba's use_bias, which matches transformers on the mamba_bias fixture): our model on the
// same arena gives the same logits, and the biases matter.
TEST(HfJamba, ProjBiasesLoad) {
  test::TempDir tmp("hf_jamba_bias");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_jamba_folder(tmp, "", c, arena, false, /*proj_bias=*/true);
  ASSERT_TRUE(c.mamba_proj_bias);
  EXPECT_TRUE(SafetensorsReader((d / "model.safetensors").string()).find("model.layers.0.mamba.in_proj.bias"));
  auto be = make_cpu_backend();
  auto hf = load_any_model(d.string(), *be);
  HybridModel ours(c, *be);
  std::copy(arena.begin(), arena.end(), ours.params().data());
  ours.prepare();
  Rng rng(5);
  const std::vector<int32_t> toks = test::tokens(rng, 19, c.vocab_size);
  const std::vector<float> full = forward_all(*hf, toks);
  EXPECT_EQ(full, forward_all(ours, toks));
  float* b = ours.params().get("backbone.layers.0.mixer.out_proj.bias");
  std::fill(b, b + c.d_model, 0.0f);
  ours.prepare();
  EXPECT_GT(test::rel_err(forward_all(ours, toks), full), 1e-4);
  EXPECT_EQ(training_unsupported(c), "");
}

TEST(HfJamba, DtBAndCNormWeightsAreApplied) {
  test::TempDir tmp("hf_jamba_norms");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_jamba_folder(tmp, "", c, arena);
  auto be = make_cpu_backend();
  auto m = load_any_model(d.string(), *be);
  Rng rng(4);
  const std::vector<int32_t> toks = test::tokens(rng, 17, c.vocab_size);
  const std::vector<float> base = forward_all(*m, toks);
  auto scaled = [&](float sd, float sb, float sc) {
    for (int l = 0; l < c.n_layers; ++l) {
      if (c.is_attention(l)) continue;
      LayerWeights& w = m->params().layer(l);
      for (int k = 0; k < c.resolved_dt_rank(); ++k) w.dt_norm[k] *= sd;
      for (int k = 0; k < c.d_state; ++k) w.b_norm[k] *= sb, w.c_norm[k] *= sc;
    }
    m->prepare();
    const double e = test::rel_err(forward_all(*m, toks), base);
    std::printf("norm weights dt x %g, B x %g, C x %g: logits moved by %.3g\n", double(sd), double(sb), double(sc), e);
    for (int l = 0; l < c.n_layers; ++l) {
      if (c.is_attention(l)) continue;
      LayerWeights& w = m->params().layer(l);
      for (int k = 0; k < c.resolved_dt_rank(); ++k) w.dt_norm[k] /= sd;
      for (int k = 0; k < c.d_state; ++k) w.b_norm[k] /= sb, w.c_norm[k] /= sc;
    }
    m->prepare();
    return e;
  };
  // y depends on the B and C norm weights only through their product per state channel (the
  // scan is bilinear in B and C): B's x 4 with C's / 4 is the same model (exactly: powers of
  // two), either alone is not; dt's weights move delta.
  EXPECT_LT(scaled(1, 4, 0.25f), 1e-5);
  EXPECT_GT(scaled(1, 4, 1), 1e-3);
  EXPECT_GT(scaled(1, 1, 0.25f), 1e-3);
  EXPECT_GT(scaled(3, 1, 1), 1e-3);
  // All-one weights are Falcon-Mamba's weightless norm, bit for bit.
  for (int l = 0; l < c.n_layers; ++l) {
    if (c.is_attention(l)) continue;
    LayerWeights& w = m->params().layer(l);
    std::fill_n(w.dt_norm, c.resolved_dt_rank(), 1.0f);
    std::fill_n(w.b_norm, c.d_state, 1.0f);
    std::fill_n(w.c_norm, c.d_state, 1.0f);
  }
  m->prepare();
  ModelConfig plain_cfg = c;
  plain_cfg.mamba_bcdt_norm_weight = false;
  HybridModel plain(plain_cfg, *be);
  for (size_t i = 0; i < plain.params().specs().size(); ++i) {
    const ParamSpec& s = plain.params().specs()[i];
    std::copy_n(m->params().get(s.name), s.numel(), plain.params().at(i));
  }
  plain.prepare();
  EXPECT_EQ(forward_all(plain, toks), forward_all(*m, toks));
}

TEST(HfJamba, RefusesWhatItDoesNotImplement) {
  test::TempDir tmp("hf_jamba_refuse");
  ModelConfig c;
  std::vector<float> arena;
  const fs::path d = write_jamba_folder(tmp, "", c, arena);
  const json orig = read_json(d / "config.json");
  const auto with = test::config_refusals(d);
  with([](json& j) { j["model_type"] = "mamba"; }, {"model_type", "jamba"});
  with([](json& j) { j["sliding_window"] = 4096; }, {"sliding_window", "4096"});
  with([](json& j) { j["hidden_act"] = "gelu"; }, {"hidden_act", "gelu"});
  with([](json& j) { j["head_dim"] = 16; }, {"head_dim", "16"});
  with([](json& j) { j["num_attention_heads"] = 5; }, {"num_attention_heads", "hidden_size"});
  with([](json& j) { j["num_key_value_heads"] = 3; }, {"num_key_value_heads", "3"});
  with([](json& j) { j["attn_layer_offset"] = 4; }, {"attn_layer_offset", "attn_layer_period"});
  with([](json& j) { j["expert_layer_offset"] = 2; }, {"expert_layer_offset", "expert_layer_period"});
  with([](json& j) { j["num_experts_per_tok"] = 5; }, {"num_experts_per_tok", "num_experts"});
  with([](json& j) { j["mamba_dt_rank"] = "big"; }, {"mamba_dt_rank", "big"});
  with([](json& j) { j["mamba_expand"] = 1.5; }, {"mamba_expand"});
  with([](json& j) { j["rms_norm_eps"] = 0; }, {"rms_norm_eps"});
  // A config that disagrees with the weights: shapes and names are checked, never guessed.
  with([](json& j) { j["mamba_d_state"] = 4; }, {"model.layers.0.mamba.x_proj.weight", "shape"});
  with([](json& j) { j["num_experts"] = 3; }, {"model.layers.1.feed_forward.router.weight", "shape"});
  with([](json& j) { j["expert_layer_offset"] = 0; }, {"missing tensor", "model.layers.0.feed_forward.router.weight"});
  with([](json& j) { j["attn_layer_offset"] = 1; }, {"missing tensor", "model.layers.1.self_attn.q_proj.weight"});
  with([](json& j) { j["tie_word_embeddings"] = true; }, {"lm_head.weight", "differs", "model.embed_tokens.weight"});
  with([](json& j) { j["mamba_conv_bias"] = false; }, {"model.layers.0.mamba.conv1d.bias", "mamba_conv_bias"});
  // One expert's tensor missing.
  write_text(d / "config.json", orig.dump());
  rewrite_safetensors(d / "model.safetensors", [](std::vector<RawTensor>& ts) {
    std::erase_if(ts, [](const RawTensor& t) { return t.name == "model.layers.3.feed_forward.experts.2.up_proj.weight"; });
  });
  expect_load_error(d, {"missing tensor", "model.layers.3.feed_forward.experts.2.up_proj.weight"});
  // A fifth expert beyond num_experts.
  write_jamba_folder(tmp, "", c, arena);
  rewrite_safetensors(d / "model.safetensors", [](std::vector<RawTensor>& ts) {
    for (const RawTensor& t : ts)
      if (t.name == "model.layers.1.feed_forward.experts.0.down_proj.weight") {
        RawTensor extra = t;
        extra.name = "model.layers.1.feed_forward.experts.4.down_proj.weight";
        ts.push_back(extra);
        break;
      }
  });
  expect_load_error(d, {"unexpected tensor", "model.layers.1.feed_forward.experts.4.down_proj.weight"});
}

TEST(HfJamba, LogitsMatchTransformers) {
  for (const char* name : kJambaFolders) {
    SCOPED_TRACE(name);
    const fs::path dir = kFixtures / name;
    if (!has_fixture(dir)) continue;
    const json exp = read_json(dir / "expected.json");
    auto be = make_cpu_backend();
    auto m = load_any_model(dir.string(), *be);
    ASSERT_TRUE(m->config().mamba_bcdt_norm_weight);
    ASSERT_FALSE(m->config().attention_layers.empty());
    ASSERT_FALSE(m->config().moe_layers.empty());
    expect_matches_transformers(dir, *m);
    // The default f16 KV cache costs about 1e-4 against float32 transformers, no more.
    const std::vector<int32_t> toks = exp["tokens"].get<std::vector<int32_t>>();
    const double e16 = test::rel_err(forward_all(*m, toks, KvType::F16), read_f32_file(dir / "logits.f32"));
    std::printf("%s with an f16 KV cache: %.3g\n", name, e16);
    EXPECT_LT(e16, 1e-3);
    // One perturbed weight breaks the bound: the comparison can fail. (The first Mamba layer's:
    // jamba_bf16's layer 0 is attention, which has no B norm.)
    int mamba_layer = 0;
    while (m->params().layer(mamba_layer).b_norm == nullptr) ++mamba_layer;
    m->params().layer(mamba_layer).b_norm[1] += 1.0f;
    m->prepare();
    EXPECT_GT(test::rel_err(forward_all(*m, exp["tokens"].get<std::vector<int32_t>>()),
                            read_f32_file(dir / "logits.f32")), 1e-4);
  }
}

}  // namespace hm
