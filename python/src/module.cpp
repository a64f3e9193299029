// hybrid_mamba._core: the engine for Python (docs/PYTHON.md). Each function converts its
// arguments, releases the GIL and calls the engine's own code (load_model, forward, generate,
// get_routing_analysis, train, ...); the seed's names and defaults live in hybrid_mamba/*.py.
// hm::Error becomes ValueError with the engine's message.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "core/error.h"
#include "io/hf_model.h"
#include "core/interrupt.h"
#include "core/threads.h"
#include "eval/compare.h"
#include "eval/tasks.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "model/routing.h"
#include "runtime/generate.h"
#include "runtime/tokenizer.h"
#include "train/model_grad.h"
#include "train/optimizer.h"
#include "train/trainer.h"

namespace py = pybind11;

namespace {

using TokenArray = py::array_t<int32_t, py::array::c_style>;

// A model with its backend and, when it came with one, its tokenizer. The workspace and the
// parameters are shared state, so one computation runs at a time (mu is taken with the GIL
// released, so a waiting thread never blocks the interpreter).
struct Model {
  std::unique_ptr<hm::Backend> be;
  std::unique_ptr<hm::HybridModel> m;
  std::shared_ptr<hm::Tokenizer> tok;  // null: made from a config, or a task checkpoint
  std::mutex mu;
};

std::unique_ptr<hm::Backend> backend_for(const std::string& device) {
  HM_CHECK(device == "cpu" || device == "cuda", "device must be \"cpu\" or \"cuda\", got \"", device, "\"");
  if (device == "cuda")
    HM_CHECK(hm::cuda_available(), "device \"cuda\": ",
             hm::compiled_devices().size() > 1 ? "no usable CUDA device is present (or the driver is too old for this build)"
                                                : "this build has no CUDA backend (build with -DHM_CUDA=ON)",
             "; use device=\"cpu\"");
  return hm::make_backend(device == "cpu" ? hm::Device::CPU : hm::Device::CUDA);
}

// dtype "" = the backend's default (f32 on the CPU, bf16 on CUDA); else f32, bf16 or f16.
hm::DType dtype_for(const hm::Backend& be, const std::string& dtype) {
  const hm::DType t = dtype.empty() ? be.default_dtype() : hm::compute_dtype_from_name(dtype);
  HM_CHECK(be.supports(t), "dtype \"", dtype, "\": the ", be.name(), " backend does not compute in it",
           be.device() == hm::Device::CPU ? " (cpu: f32 only)" : "");
  return t;
}

std::string normalized_config(const std::string& json_text) {
  const auto j = nlohmann::json::parse(json_text);  // written by hybrid_mamba, always valid JSON
  return hm::config_to_json(hm::config_from_json(j)).dump();
}

std::unique_ptr<Model> model_from_config(const std::string& json_text, uint64_t seed, const std::string& device,
                                         const std::string& dtype) {
  const hm::ModelConfig c = hm::config_from_json(nlohmann::json::parse(json_text));
  auto r = std::make_unique<Model>();
  r->be = backend_for(device);
  const hm::DType t = dtype_for(*r->be, dtype);
  py::gil_scoped_release nogil;
  r->m = std::make_unique<hm::HybridModel>(c, *r->be, t);
  hm::init_params(r->m->params(), seed);
  r->m->prepare();
  return r;
}

std::unique_ptr<Model> model_from_dir(const std::string& path, const std::string& device, const std::string& dtype) {
  auto r = std::make_unique<Model>();
  r->be = backend_for(device);
  const hm::DType t = dtype_for(*r->be, dtype);
  py::gil_scoped_release nogil;
  const std::string dir = hm::checkpoint_dir(path);
  if (t == r->be->default_dtype()) {
    r->m = hm::load_any_model(dir, *r->be);
  } else {  // load_any_model in another compute type
    const bool hf = hm::is_hf_model_dir(dir);
    r->m = std::make_unique<hm::HybridModel>(
        hf ? hm::load_hf_config(dir) : hm::load_config((std::filesystem::path(dir) / "config.json").string()), *r->be, t);
    if (hf)
      hm::load_hf_params(r->m->params(), dir);
    else
      hm::load_params(r->m->params(), (std::filesystem::path(dir) / "model.safetensors").string());
    r->m->prepare();
  }
  // No tokenizer for a model saved without one (made from a config), nor for a task model:
  // its ids are task symbols, not text.
  if (std::filesystem::exists(std::filesystem::path(dir) / "tokenizer.json") && hm::checkpoint_task(dir).name.empty())
    r->tok = hm::load_tokenizer(dir);
  return r;
}

void save_dir(Model& pm, const std::string& dir, const std::string& dtype) {
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(pm.mu);
  hm::save_model(*pm.m, dir, dtype);
  if (pm.tok) pm.tok->save(dir);
}

// Logits of every position of B sequences of T tokens ([B, T] -> [B, T, V]), each from a fresh
// state, float32 K/V. Prefilled in chunks of 512 tokens per sequence, as generate() does.
py::array_t<float> forward_all(Model& pm, const TokenArray& ids) {
  HM_CHECK(ids.ndim() == 2, "input_ids must be 2-D [batch, tokens], got ", ids.ndim(), " dimensions");
  const int64_t B = ids.shape(0), T = ids.shape(1);
  HM_CHECK(B > 0 && T > 0, "input_ids must hold at least one token per sequence, got shape [", B, ", ", T, "]");
  HM_CHECK(B <= 4096 && T <= (1 << 24), "input_ids shape [", B, ", ", T, "] is too large");
  const int64_t V = pm.m->config().vocab_size;
  py::array_t<float> out({B, T, V});
  float* o = out.mutable_data();
  const int32_t* in = ids.data();
  {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(pm.mu);
    hm::HybridMemory mem(*pm.be, pm.m->config(), int(B), int(T), hm::KvType::F32);
    std::vector<float> logits;
    constexpr int64_t kChunk = 512;
    for (int64_t s = 0; s < T; s += kChunk) {
      const int64_t n = std::min(kChunk, T - s);
      hm::Batch b;
      b.logits_all = true;
      for (int64_t i = 0; i < B; ++i) b.add(int(i), std::vector<int32_t>(in + i * T + s, in + i * T + s + n));
      pm.m->forward(b, mem, logits);
      for (int64_t i = 0; i < B; ++i)
        std::memcpy(o + (i * T + s) * V, logits.data() + i * n * V, size_t(n * V) * sizeof(float));
    }
  }
  return out;
}

// What generate and stream share: the options, the cache type and the context size.
struct GenerateSetup {
  hm::GenerateOptions opt;
  hm::KvType kv;
  int n_ctx;
};

GenerateSetup generate_setup(const std::vector<std::vector<int32_t>>& prompts, int max_new_tokens,
                             const hm::SamplingParams& sp, const std::vector<int>& eos, int n_decodable, const std::string& kv_type,
                             int ctx) {
  GenerateSetup g;
  g.opt.max_new_tokens = max_new_tokens;
  g.opt.sampling = sp;
  // The first stop token is eos, the rest more_eos (a list, as transformers' eos_token_id takes).
  g.opt.eos = eos.empty() ? -1 : eos[0];
  if (eos.size() > 1) g.opt.more_eos.assign(eos.begin() + 1, eos.end());
  g.opt.n_decodable = n_decodable;
  g.kv = hm::kv_type_from_name(kv_type);
  HM_CHECK(!prompts.empty(), "input_ids holds no prompt");
  HM_CHECK(max_new_tokens >= 0, "max_new_tokens must be >= 0, got ", max_new_tokens);
  HM_CHECK(ctx >= 0, "ctx must be >= 0 (0 = longest prompt + max_new_tokens), got ", ctx);
  size_t longest = 0;
  for (const auto& p : prompts) longest = std::max(longest, p.size());
  const int64_t need = int64_t(longest) + max_new_tokens;
  HM_CHECK(need <= (int64_t(1) << 24), "longest prompt plus max_new_tokens (", need, ") is too long");
  g.n_ctx = ctx > 0 ? ctx : int(need);
  return g;
}

py::dict stats_dict(const hm::GenerateStats& st) {
  py::dict stats;
  stats["prefill_ms"] = st.prefill_ms;
  stats["decode_ms"] = st.decode_ms;
  stats["prompt_tokens"] = st.prompt_tokens;
  stats["decoded_tokens"] = st.decoded_tokens;
  return stats;
}

// Runs hm::generate. on_token(seq, token) -> falsy stops that sequence; it and Ctrl-C are seen
// once per generated token (the GIL is taken for that moment only).
py::tuple generate(Model& pm, const std::vector<std::vector<int32_t>>& prompts, int max_new_tokens,
                   const hm::SamplingParams& sp, const std::vector<int>& eos, int n_decodable, const std::string& kv_type,
                   int ctx, const py::object& on_token) {
  const GenerateSetup g = generate_setup(prompts, max_new_tokens, sp, eos, n_decodable, kv_type, ctx);
  auto cb = [&on_token](int seq, int32_t t) {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (on_token.is_none()) return true;
    const py::object r = on_token(seq, t);
    return r.is_none() || r.cast<bool>();
  };
  std::vector<std::vector<int32_t>> out;
  hm::GenerateStats st;
  {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(pm.mu);
    hm::HybridMemory mem(*pm.be, pm.m->config(), int(prompts.size()), g.n_ctx, g.kv);
    out = hm::generate(*pm.m, mem, prompts, g.opt, cb, &st);
  }
  py::list seqs;
  for (const auto& o : out) seqs.append(py::array_t<int32_t>(py::ssize_t(o.size()), o.data()));
  return py::make_tuple(seqs, stats_dict(st));
}

// generate_stream's engine side: a Generator and its memory. next() runs one decode step in the
// caller's thread with the GIL released, so no second thread has to be woken for every token
// (which, on a machine with as many OpenMP threads as cores, halved the decode rate).
struct Stream {
  Model* pm = nullptr;
  std::unique_ptr<hm::HybridMemory> mem;  // before gen: gen refers to it
  std::unique_ptr<hm::Generator> gen;
  hm::GenerateStats st;
};

std::unique_ptr<Stream> start_stream(Model& pm, const std::vector<std::vector<int32_t>>& prompts,
                                     int max_new_tokens, const hm::SamplingParams& sp, const std::vector<int>& eos, int n_decodable,
                                     const std::string& kv_type, int ctx) {
  const GenerateSetup g = generate_setup(prompts, max_new_tokens, sp, eos, n_decodable, kv_type, ctx);
  auto s = std::make_unique<Stream>();
  s->pm = &pm;
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(pm.mu);
  s->mem = std::make_unique<hm::HybridMemory>(*pm.be, pm.m->config(), int(prompts.size()), g.n_ctx, g.kv);
  s->gen = std::make_unique<hm::Generator>(*pm.m, *s->mem, prompts, g.opt, &s->st);
  return s;
}

py::list stream_next(Stream& s) {
  std::vector<std::pair<int, int32_t>> step;
  {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(s.pm->mu);
    step = s.gen->next();
  }
  py::list r;
  for (const auto& [seq, tok] : step) r.append(py::make_tuple(seq, tok));
  return r;
}

const char* route_name(hm::th::Route r) {
  switch (r) {
    case hm::th::Route::Mamba: return "mamba";
    case hm::th::Route::Attention: return "attention";
    case hm::th::Route::Both: return "both";
  }
  return "?";
}
const char* mode_name(hm::th::Mode m) {
  switch (m) {
    case hm::th::Mode::Both: return "both";
    case hm::th::Mode::Soft: return "soft";
    case hm::th::Mode::Hard: return "hard";
  }
  return "?";
}

py::dict usage_dict(const hm::PathUsage& u) {
  py::dict d;
  d["mamba"] = u.mamba;
  d["attention"] = u.attention;
  return d;
}

py::dict routing_analysis(Model& pm, const std::vector<int32_t>& tokens) {
  hm::RoutingAnalysis r;
  {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(pm.mu);
    r = hm::get_routing_analysis(*pm.m, tokens);
  }
  py::dict d;
  d["average_usage"] = usage_dict(r.average_usage);
  d["mode"] = mode_name(r.mode);
  py::list layers;
  for (const auto& l : r.layers) {
    py::dict e;
    e["layer"] = l.layer;
    e["usage"] = usage_dict(l.usage);
    e["attention_share"] = py::array_t<double>(py::ssize_t(l.attention_share.size()), l.attention_share.data());
    e["p"] = py::array_t<double>(py::ssize_t(l.p.size()), l.p.data());
    py::list routes;
    for (auto ro : l.route) routes.append(route_name(ro));
    e["route"] = routes;
    layers.append(e);
  }
  d["layers"] = layers;
  return d;
}

py::dict score_dict(const hm::TaskScore& s) {
  py::dict d;
  d["examples"] = s.examples;
  d["scored"] = s.scored;
  d["correct"] = s.correct;
  d["accuracy"] = s.accuracy;
  d["loss"] = s.loss;
  return d;
}

// AdamW over a model's parameters for a training loop driven from Python on token arrays: one
// step = loss_and_grad (the engine's fast float path) + AdamW.step at the given lr.
struct Optimizer {
  Optimizer(Model& pm, const hm::AdamWConfig& c)
      : pm_(pm), grads_(pm.m->config()), opt_(pm.m->params(), c) {}

  py::tuple step(const TokenArray& tokens, const TokenArray& targets, float lr) {
    HM_CHECK(tokens.ndim() == 2, "tokens must be 2-D [batch, seq_len], got ", tokens.ndim(), " dimensions");
    HM_CHECK(targets.ndim() == 2 && targets.shape(0) == tokens.shape(0) && targets.shape(1) == tokens.shape(1),
             "targets must have the shape of tokens [", tokens.shape(0), ", ", tokens.shape(1), "]");
    HM_CHECK(tokens.shape(0) > 0 && tokens.shape(1) > 0 && tokens.shape(0) <= (1 << 20) && tokens.shape(1) <= (1 << 24),
             "tokens shape [", tokens.shape(0), ", ", tokens.shape(1), "] is empty or too large");
    HM_CHECK(lr >= 0 && std::isfinite(lr), "lr must be a finite number >= 0, got ", lr);
    const int B = int(tokens.shape(0)), L = int(tokens.shape(1));
    double loss = 0, norm = 0;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(pm_.mu);
      hm::zero(grads_);
      loss = hm::loss_and_grad(pm_.m->params(), grads_, tokens.data(), targets.data(), B, L);
      norm = opt_.step(pm_.m->params(), grads_, lr);
      pm_.m->prepare();
    }
    HM_CHECK(std::isfinite(loss) && std::isfinite(norm), "training step: non-finite loss (", loss,
             ") or gradient norm (", norm, "); the parameters were left unchanged");
    return py::make_tuple(loss, norm);
  }
  int64_t steps() const { return opt_.steps(); }

 private:
  Model& pm_;
  hm::Params grads_;
  hm::AdamW opt_;
};

}  // namespace

PYBIND11_MODULE(_core, mod) {
  mod.doc() = "hybrid_mamba's C++ engine (use the hybrid_mamba package, not this module)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const hm::Interrupted& e) {
      PyErr_SetString(PyExc_KeyboardInterrupt, e.what());
    } catch (const hm::Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const nlohmann::json::exception& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  mod.def("set_num_threads", &hm::set_num_threads, py::arg("n"),
          "Threads for OpenMP and OpenBLAS together (n <= 0: every hardware thread).");
  mod.def("num_threads", &hm::num_threads);
  mod.def("normalized_config", &normalized_config, py::arg("json"),
          "Validates a config (JSON text, config.json's rules and messages) and returns it complete.");
  mod.def("default_config", [] {
    // Every field with its default (the seed's model), the true-hybrid ones included.
    hm::ModelConfig c;
    c.hybrid = "true";
    nlohmann::json j = hm::config_to_json(c);
    j["hybrid"] = "simple";
    j.erase("model_type");
    return j.dump();
  });
  mod.def("preset", [](const std::string& n) { return hm::config_to_json(hm::preset(n)).dump(); });
  mod.def("preset_names", &hm::preset_names);
  mod.def("count_params", [](const std::string& j) { return hm::count_params(hm::config_from_json(nlohmann::json::parse(j))); });
  mod.def("load_config", [](const std::string& path) { return hm::config_to_json(hm::load_config(path)).dump(); });

  py::class_<hm::Tokenizer, std::shared_ptr<hm::Tokenizer>>(mod, "Tokenizer")
      .def_static("load", [](const std::string& dir) { return std::shared_ptr<hm::Tokenizer>(hm::load_tokenizer(dir)); },
                  py::arg("dir"))
      .def_static("byte", [] { return std::shared_ptr<hm::Tokenizer>(std::make_shared<hm::ByteTokenizer>()); })
      .def_static("train_bpe",
                  [](const std::vector<std::string>& texts, int vocab_size, const std::string& out_dir) {
                    {
                      py::gil_scoped_release nogil;
                      hm::train_sentencepiece_bpe(texts, vocab_size, out_dir);
                    }
                    return std::shared_ptr<hm::Tokenizer>(hm::load_tokenizer(out_dir));
                  },
                  py::arg("texts"), py::arg("vocab_size"), py::arg("out_dir"))
      .def_property_readonly("type", &hm::Tokenizer::type)
      .def_property_readonly("vocab_size", &hm::Tokenizer::vocab_size)
      .def_property_readonly("bos", &hm::Tokenizer::bos)
      .def_property_readonly("eos", &hm::Tokenizer::eos)
      .def_property_readonly("more_eos", &hm::Tokenizer::more_eos)
      .def_property_readonly("pad", &hm::Tokenizer::pad)
      .def("encode",
           [](const hm::Tokenizer& t, const std::string& text, bool add_bos) {
             HM_CHECK(hm::is_valid_utf8(text), "text is not valid UTF-8");
             const auto ids = t.encode(text, add_bos);
             return py::array_t<int32_t>(py::ssize_t(ids.size()), ids.data());
           },
           py::arg("text"), py::arg("add_bos") = true)
      .def("decode",
           [](const hm::Tokenizer& t, const std::vector<int32_t>& ids) {
             // As hm generate prints: valid UTF-8, U+FFFD for bytes that cannot form a character.
             hm::Utf8StreamDecoder d(t);
             std::string s;
             for (int32_t id : ids) s += d.push(id);
             return s + d.flush();
           },
           py::arg("ids"))
      .def("decode_bytes", [](const hm::Tokenizer& t, const std::vector<int32_t>& ids) { return py::bytes(t.decode(ids)); },
           py::arg("ids"))
      .def("save", &hm::Tokenizer::save, py::arg("dir"));

  py::class_<hm::Utf8StreamDecoder>(mod, "StreamDecoder")
      .def(py::init<const hm::Tokenizer&>(), py::arg("tokenizer"), py::keep_alive<1, 2>())
      .def("push", [](hm::Utf8StreamDecoder& d, int32_t id) { return d.push(id); }, py::arg("id"))
      .def("flush", &hm::Utf8StreamDecoder::flush);

  py::class_<hm::SamplingParams>(mod, "SamplingParams")
      .def(py::init<>())
      .def_readwrite("temperature", &hm::SamplingParams::temperature)
      .def_readwrite("top_k", &hm::SamplingParams::top_k)
      .def_readwrite("top_p", &hm::SamplingParams::top_p)
      .def_readwrite("min_p", &hm::SamplingParams::min_p)
      .def_readwrite("repeat_penalty", &hm::SamplingParams::repeat_penalty)
      .def_readwrite("repeat_last_n", &hm::SamplingParams::repeat_last_n)
      .def_readwrite("seed", &hm::SamplingParams::seed);

  py::class_<Stream>(mod, "Stream")
      .def("next", &stream_next, "One decode step: [(sequence, token), ...], empty when every sequence is done")
      .def("stop", [](Stream& s, int seq) { s.gen->stop(seq); }, py::arg("seq"))
      .def_property_readonly("stats", [](const Stream& s) { return stats_dict(s.st); });

  py::class_<Model>(mod, "Model")
      .def_static("from_config", &model_from_config, py::arg("config_json"), py::arg("seed") = 0,
                  py::arg("device") = "cpu", py::arg("dtype") = "")
      .def_static("from_dir", &model_from_dir, py::arg("path"), py::arg("device") = "cpu", py::arg("dtype") = "")
      .def_property_readonly("device", [](const Model& pm) { return std::string(hm::device_name(pm.be->device())); })
      .def_property_readonly("dtype", [](const Model& pm) { return std::string(hm::compute_dtype_name(pm.m->dtype())); })
      .def("save", &save_dir, py::arg("dir"), py::arg("dtype") = "F32")
      .def_property_readonly("config_json", [](const Model& pm) { return hm::config_to_json(pm.m->config()).dump(); })
      .def_property_readonly("n_params", [](const Model& pm) { return pm.m->params().numel(); })
      .def_property_readonly("tokenizer", [](const Model& pm) { return pm.tok; })
      .def("set_tokenizer", [](Model& pm, std::shared_ptr<hm::Tokenizer> t) { pm.tok = std::move(t); })
      .def("forward", &forward_all, py::arg("input_ids"))
      .def("generate", &generate, py::arg("prompts"), py::arg("max_new_tokens"), py::arg("sampling"),
           py::arg("eos"), py::arg("n_decodable"), py::arg("kv_type"), py::arg("ctx"), py::arg("on_token"))
      .def("stream", &start_stream, py::arg("prompts"), py::arg("max_new_tokens"), py::arg("sampling"),
           py::arg("eos"), py::arg("n_decodable"), py::arg("kv_type"), py::arg("ctx"), py::keep_alive<0, 1>())
      .def("routing_analysis", &routing_analysis, py::arg("tokens"))
      .def("score_task",
           [](Model& pm, const hm::TaskSpec& t, int64_t n, int batch) {
             hm::TaskScore s;
             {
               py::gil_scoped_release nogil;
               std::lock_guard<std::mutex> lock(pm.mu);
               s = hm::score_task(*pm.m, t, n, batch);
             }
             return score_dict(s);
           },
           py::arg("task"), py::arg("n"), py::arg("batch"));

  py::class_<hm::AdamWConfig>(mod, "AdamWConfig")
      .def(py::init<>())
      .def_readwrite("lr", &hm::AdamWConfig::lr)
      .def_readwrite("beta1", &hm::AdamWConfig::beta1)
      .def_readwrite("beta2", &hm::AdamWConfig::beta2)
      .def_readwrite("eps", &hm::AdamWConfig::eps)
      .def_readwrite("weight_decay", &hm::AdamWConfig::weight_decay)
      .def_readwrite("clip_norm", &hm::AdamWConfig::clip_norm);
  py::class_<Optimizer>(mod, "Optimizer")
      .def(py::init<Model&, const hm::AdamWConfig&>(), py::arg("model"), py::arg("config"), py::keep_alive<1, 2>())
      .def("step", &Optimizer::step, py::arg("tokens"), py::arg("targets"), py::arg("lr"))
      .def_property_readonly("steps", &Optimizer::steps);
  mod.def("lr_at", &hm::lr_at, py::arg("step"), py::arg("warmup"), py::arg("total"), py::arg("max_lr"),
          py::arg("min_lr"));

  py::class_<hm::TaskSpec>(mod, "TaskSpec")
      .def(py::init<>())
      .def_readwrite("name", &hm::TaskSpec::name)
      .def_readwrite("vocab", &hm::TaskSpec::vocab)
      .def_readwrite("seq_len", &hm::TaskSpec::seq_len)
      .def_readwrite("kv", &hm::TaskSpec::kv);
  mod.def("resolve_task", [](const hm::TaskSpec& s) {
    hm::TaskSpec r = hm::resolve_task(s);
    hm::validate_task(r);
    return r;
  });
  mod.def("task_names", &hm::task_names);
  mod.def("chance_accuracy", &hm::chance_accuracy);
  mod.def("task_examples", [](const hm::TaskSpec& s, bool test, uint64_t seed, uint64_t first, int n) {
    HM_CHECK(n > 0 && n <= (1 << 20), "n must be in [1, 2^20], got ", n);
    py::array_t<int32_t> in({py::ssize_t(n), py::ssize_t(s.seq_len)}), tgt({py::ssize_t(n), py::ssize_t(s.seq_len)});
    hm::task_examples(s, test ? hm::TaskSplit::Test : hm::TaskSplit::Train, seed, first, n, in.mutable_data(),
                      tgt.mutable_data());
    return py::make_tuple(in, tgt);
  });
  mod.attr("TASK_TEST_SEED") = hm::kTaskTestSeed;

  mod.def("cuda_available", &hm::cuda_available, "whether this build has the CUDA backend and a GPU is present");

  py::class_<hm::TrainConfig>(mod, "TrainConfig")
      .def(py::init<>())
      .def_readwrite("preset", &hm::TrainConfig::preset)
      .def_readwrite("config_file", &hm::TrainConfig::config_file)
      .def_readwrite("data_path", &hm::TrainConfig::data_path)
      .def_readwrite("out_dir", &hm::TrainConfig::out_dir)
      .def_readwrite("tokenizer", &hm::TrainConfig::tokenizer)
      .def_readwrite("vocab", &hm::TrainConfig::vocab)
      .def_readwrite("steps", &hm::TrainConfig::steps)
      .def_readwrite("batch", &hm::TrainConfig::batch)
      .def_readwrite("seq_len", &hm::TrainConfig::seq_len)
      .def_readwrite("grad_accum", &hm::TrainConfig::grad_accum)
      .def_readwrite("lr", &hm::TrainConfig::lr)
      .def_readwrite("min_lr_ratio", &hm::TrainConfig::min_lr_ratio)
      .def_readwrite("weight_decay", &hm::TrainConfig::weight_decay)
      .def_readwrite("clip_norm", &hm::TrainConfig::clip_norm)
      .def_readwrite("warmup", &hm::TrainConfig::warmup)
      .def_readwrite("threads", &hm::TrainConfig::threads)
      .def_readwrite("seed", &hm::TrainConfig::seed)
      .def_readwrite("eval_every", &hm::TrainConfig::eval_every)
      .def_readwrite("save_every", &hm::TrainConfig::save_every)
      .def_readwrite("eval_tokens", &hm::TrainConfig::eval_tokens)
      .def_readwrite("scan_chunk", &hm::TrainConfig::scan_chunk)
      .def_readwrite("grad_ckpt", &hm::TrainConfig::grad_ckpt)
      .def_readwrite("resume", &hm::TrainConfig::resume)
      .def_readwrite("stop_after", &hm::TrainConfig::stop_after)
      .def_readwrite("progress", &hm::TrainConfig::progress)
      .def_readwrite("task", &hm::TrainConfig::task)
      .def_readwrite("task_eval", &hm::TrainConfig::task_eval)
      .def_property(
          "device", [](const hm::TrainConfig& c) { return std::string(hm::device_name(c.device)); },
          [](hm::TrainConfig& c, const std::string& d) { c.device = hm::device_from_name(d); })
      .def_property(
          "dtype", [](const hm::TrainConfig& c) { return std::string(hm::compute_dtype_name(c.compute)); },
          [](hm::TrainConfig& c, const std::string& t) { c.compute = hm::compute_dtype_from_name(t); });

  mod.def("train",
          [](hm::TrainConfig c, const py::object& on_step) {
            // Ctrl-C (or SIGTERM) stops as in hm train: the step finishes, a checkpoint of it is
            // written, and hm::Interrupted arrives as KeyboardInterrupt. A KeyboardInterrupt
            // raised by the callback does the same; any other exception ends the run at once,
            // leaving the last saved checkpoint.
            c.on_step = [&on_step](int64_t step, int64_t steps, double loss) {
              if (on_step.is_none()) return;
              py::gil_scoped_acquire gil;
              try {
                on_step(step, steps, loss);
              } catch (py::error_already_set& e) {
                if (!e.matches(PyExc_KeyboardInterrupt)) throw;
                hm::request_interrupt(SIGINT);
              }
            };
            hm::clear_interrupt();
            py::gil_scoped_release nogil;
            hm::InterruptScope signals;
            hm::train(c);
          },
          py::arg("config"), py::arg("on_step"));
  mod.def("evaluate",
          [](const std::string& model_dir, const std::string& data, int seq_len, int64_t max_tokens, int batch) {
            hm::EvalResult r;
            {
              py::gil_scoped_release nogil;
              r = hm::evaluate(model_dir, data, seq_len, max_tokens, batch);
            }
            py::dict d;
            d["loss"] = r.loss;
            d["perplexity"] = r.ppl;
            d["tokens"] = r.tokens;
            d["step"] = r.step;
            d["unigram_loss"] = r.unigram_loss;
            d["unigram_perplexity"] = r.unigram_ppl;
            return d;
          },
          py::arg("model_dir"), py::arg("data"), py::arg("seq_len"), py::arg("max_tokens"), py::arg("batch"));
  mod.def("evaluate_task",
          [](const std::string& model_dir, const hm::TaskSpec& t, int64_t n, int batch) {
            hm::TaskEvalResult r;
            {
              py::gil_scoped_release nogil;
              r = hm::evaluate_task(model_dir, t, n, batch);
            }
            py::dict d = score_dict(r.score);
            d["task"] = r.task;
            d["chance"] = r.chance;
            d["step"] = r.step;
            return d;
          },
          py::arg("model_dir"), py::arg("task"), py::arg("n"), py::arg("batch"));

  py::class_<hm::CompareConfig>(mod, "CompareConfig")
      .def(py::init<>())
      .def_readwrite("task", &hm::CompareConfig::task)
      .def_readwrite("data_path", &hm::CompareConfig::data_path)
      .def_readwrite("sizes", &hm::CompareConfig::sizes)
      .def_readwrite("seq_lens", &hm::CompareConfig::seq_lens)
      .def_readwrite("lrs", &hm::CompareConfig::lrs)
      .def_readwrite("archs", &hm::CompareConfig::archs)
      .def_readwrite("budget", &hm::CompareConfig::budget)
      .def_readwrite("batch", &hm::CompareConfig::batch)
      .def_readwrite("task_vocab", &hm::CompareConfig::task_vocab)
      .def_readwrite("kv", &hm::CompareConfig::kv)
      .def_readwrite("test_examples", &hm::CompareConfig::test_examples)
      .def_readwrite("eval_tokens", &hm::CompareConfig::eval_tokens)
      .def_readwrite("out_dir", &hm::CompareConfig::out_dir)
      .def_readwrite("threads", &hm::CompareConfig::threads)
      .def_readwrite("seed", &hm::CompareConfig::seed)
      .def_readwrite("progress", &hm::CompareConfig::progress);
  mod.def("arch_names", &hm::arch_names);
  mod.def("compare", [](const hm::CompareConfig& c) {
    std::vector<hm::CompareRun> runs;
    std::string table;
    {
      hm::clear_interrupt();
      py::gil_scoped_release nogil;
      hm::InterruptScope signals;  // Ctrl-C: the run in progress saves and resumes later, as hm compare
      runs = hm::run_compare(c);
      table = hm::compare_table(c, runs);
    }
    py::list rows;
    for (const auto& r : runs) {
      py::dict d;
      d["arch"] = r.arch;
      d["d_model"] = r.d_model;
      d["n_layers"] = r.n_layers;
      d["seq_len"] = r.seq_len;
      d["kv"] = r.kv;
      d["params"] = r.params;
      d["lr"] = r.lr;
      d["metric"] = r.metric;
      d["loss"] = r.loss;
      d["train_s"] = r.train_s;
      d["best"] = r.best;
      d["error"] = r.error;
      rows.append(d);
    }
    return py::make_tuple(rows, table);
  });
}
