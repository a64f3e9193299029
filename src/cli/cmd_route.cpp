// hm route: which path each true-hybrid layer gives each token of a prompt (the seed's
// get_routing_analysis), as text or JSON, and a heatmap SVG.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "backend/backend.h"
#include "backend/counting_backend.h"
#include "cli/commands.h"
#include "cli/device.h"
#include "cli/memory_guard.h"
#include "core/error.h"
#include "io/hf_model.h"
#include "core/threads.h"
#include "eval/tasks.h"
#include "io/atomic_file.h"
#include "model/model.h"
#include "model/routing.h"
#include "runtime/tokenizer.h"
#include "train/trainer.h"

namespace hm::cli {
namespace {

// A printable label per token: its text when that is valid UTF-8, else its bytes in hex (a byte
// tokenizer splits multi-byte characters), and <bos>/<eos> for the specials.
std::string token_label(const Tokenizer& tok, int32_t id) {
  if (id == tok.bos()) return "<bos>";
  if (id == tok.eos()) return "<eos>";
  const std::string piece = tok.decode_piece(id);
  if (!piece.empty() && is_valid_utf8(piece)) return piece;
  std::string hex;
  char buf[8];
  for (unsigned char ch : piece) {
    std::snprintf(buf, sizeof buf, "<%02X>", ch);
    hex += buf;
  }
  return hex;
}

// Escaped for SVG text; spaces shown as a middle dot (U+00B7) so a space token stays visible.
std::string xml_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    switch (ch) {
      case ' ': o += "\u00b7"; break;
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      case '\n': o += "\\n"; break;
      default: o += (static_cast<unsigned char>(ch) < 0x20) ? ' ' : ch;
    }
  }
  return o;
}

const char* route_name(th::Route r) {
  return r == th::Route::Mamba ? "mamba" : r == th::Route::Attention ? "attention" : "both";
}
const char* mode_name(th::Mode m) {
  return m == th::Mode::Both ? "both" : m == th::Mode::Soft ? "soft" : "hard";
}

// Colour of an attention share s in [0, 1]: Mamba blue (s = 0) to attention orange (s = 1).
std::string share_colour(double s) {
  const int a[3] = {49, 104, 196}, b[3] = {240, 140, 30};
  char buf[16];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", int(a[0] + (b[0] - a[0]) * s + 0.5),
                int(a[1] + (b[1] - a[1]) * s + 0.5), int(a[2] + (b[2] - a[2]) * s + 0.5));
  return buf;
}

// Rows = true-hybrid layers, columns = tokens, colour = attention share; token labels on top,
// usage on the right, a legend below.
std::string heatmap_svg(const RoutingAnalysis& r, const std::vector<std::string>& labels) {
  const int T = int(labels.size()), nl = int(r.layers.size());
  const double cw = std::clamp(1200.0 / T, 3.0, 28.0), ch = 24;
  const int label_every = std::max(1, int(std::ceil(11.0 / cw)));  // labels need ~11 px
  const double left = 70, top = 90, right = 150;
  const double W = left + cw * T + right, H = top + ch * nl + 70;
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(1);
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"11\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << left << "\" y=\"16\" font-size=\"13\">Routing per token (" << mode_name(r.mode)
    << " mode): attention share</text>\n";
  for (int t = 0; t < T; t += label_every)
    o << "<text transform=\"translate(" << left + cw * (t + 0.5) + 3.5 << "," << top - 4
      << ") rotate(-60)\">" << xml_escape(labels[size_t(t)]) << "</text>\n";
  for (int i = 0; i < nl; ++i) {
    const LayerRouting& l = r.layers[size_t(i)];
    const double y = top + ch * i;
    o << "<text x=\"" << left - 6 << "\" y=\"" << y + ch / 2 + 4 << "\" text-anchor=\"end\">layer "
      << l.layer << "</text>\n";
    for (int t = 0; t < T; ++t) {
      const double s = l.attention_share[size_t(t)];
      o << "<rect x=\"" << left + cw * t << "\" y=\"" << y << "\" width=\"" << cw << "\" height=\""
        << ch << "\" fill=\"" << share_colour(s) << "\"><title>layer " << l.layer << ", token " << t
        << " " << xml_escape(labels[size_t(t)]) << ": " << route_name(l.route[size_t(t)])
        << ", attention share " << s << ", p " << l.p[size_t(t)] << "</title></rect>\n";
    }
    o << "<text x=\"" << left + cw * T + 6 << "\" y=\"" << y + ch / 2 + 4 << "\">attention "
      << 100.0 * l.usage.attention << "%</text>\n";
  }
  const double ly = top + ch * nl + 20;
  o << "<defs><linearGradient id=\"share\"><stop offset=\"0\" stop-color=\"" << share_colour(0)
    << "\"/><stop offset=\"1\" stop-color=\"" << share_colour(1) << "\"/></linearGradient></defs>\n"
    << "<rect x=\"" << left << "\" y=\"" << ly << "\" width=\"200\" height=\"12\" fill=\"url(#share)\"/>\n"
    << "<text x=\"" << left << "\" y=\"" << ly + 26 << "\">0: Mamba</text>\n"
    << "<text x=\"" << left + 200 << "\" y=\"" << ly + 26 << "\" text-anchor=\"end\">1: attention</text>\n"
    << "<text x=\"" << left + 215 << "\" y=\"" << ly + 10 << "\">overall: Mamba "
    << 100.0 * r.average_usage.mamba << "%, attention " << 100.0 * r.average_usage.attention
    << "%</text>\n</svg>\n";
  return o.str();
}

// Share of the true-hybrid layers' path compute a hard-routed model skips on `ids`, from counted
// FLOPs (CountingBackend), not a formula. With F_both (both paths on every token), F_0 / F_1
// (every token forced onto Mamba / attention) and F_hard (the router's own routes), the work
// outside the paths is F_0 + F_1 - F_both, so the paths' total is 2 F_both - F_0 - F_1 and the
// skipped share is (F_both - F_hard) / (2 F_both - F_0 - F_1).
double path_compute_skipped(const HybridModel& model, const std::vector<int32_t>& ids) {
  auto cpu = make_cpu_backend();
  CountingBackend cb(*cpu);
  auto flops = [&](const std::string& mode, double force) {
    ModelConfig c = model.config();
    c.routing_mode = mode;
    HybridModel m(c, cb);
    std::copy_n(model.params().data(), model.params().numel(), m.params().data());
    m.set_weight_format(model.weight_format());  // the routes the packed model takes
    m.prepare();
    if (force >= 0) m.set_forced_attention_fraction(force);
    HybridMemory mem(cb, c, 1, int(ids.size()), KvType::F32);
    Batch b;
    b.add(0, ids);
    std::vector<float> logits;
    cb.reset();
    m.forward(b, mem, logits);
    return cb.total_flops();
  };
  const double f_hard = flops("hard", -1), f0 = flops("hard", 0), f1 = flops("hard", 1);
  const double f_both = flops("both", -1);
  return (f_both - f_hard) / (2 * f_both - f0 - f1);
}

// `hm route --task-examples N` on a model trained on a task: the attention share of each role
// of the task's test draws, per layer, and a heatmap of the first draw.
int route_task_model(const std::string& dir, HybridModel& model, TaskSpec task, int64_t n, bool json,
                     const std::string& heatmap) {
  if (task.vocab == 0) task.vocab = model.config().vocab_size;
  task = resolve_task(task);
  validate_task(task);
  const TaskRouting tr = route_task(model, task, n);
  if (!heatmap.empty()) {
    std::vector<int32_t> in(size_t(task.seq_len)), tgt(size_t(task.seq_len));
    std::vector<int> role(size_t(task.seq_len));
    task_example(task, TaskSplit::Test, kTaskTestSeed, 0, in.data(), tgt.data());
    task_roles(task, in.data(), role.data());
    std::vector<std::string> labels;
    for (size_t p = 0; p < in.size(); ++p) {
      const std::string& r = tr.roles[size_t(role[p])];
      const bool background = r == "filler" || r == "noise" || r == "other";
      labels.push_back(background ? std::to_string(in[p]) : r + ":" + std::to_string(in[p]));
    }
    write_file_atomic(heatmap, heatmap_svg(get_routing_analysis(model, in), labels));
  }
  const char* mode = mode_name(th::mode_from_config(model.config()));
  if (json) {
    nlohmann::json j;
    j["model"] = dir;
    j["task"] = task_to_json(task);
    j["mode"] = mode;
    j["examples"] = n;
    j["roles"] = tr.roles;
    j["positions"] = tr.positions;
    nlohmann::json layers = nlohmann::json::array();
    for (size_t k = 0; k < tr.layers.size(); ++k) {
      nlohmann::json by_role;
      for (size_t r = 0; r < tr.roles.size(); ++r) by_role[tr.roles[r]] = tr.attention[k][r];
      layers.push_back({{"layer", tr.layers[k]}, {"attention", tr.attention_overall[k]}, {"attention_by_role", by_role}});
    }
    j["per_layer"] = layers;
    j["heatmap"] = heatmap;
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("%s (vocab %d, seq_len %d, kv %d), routing_mode %s: attention share by role over %lld test draws\n",
              task.name.c_str(), task.vocab, task.seq_len, task.kv, mode, static_cast<long long>(n));
  std::printf("%-8s", "layer");
  for (size_t r = 0; r < tr.roles.size(); ++r) std::printf(" %9s", tr.roles[r].c_str());
  std::printf(" %9s\n%-8s", "all", "(count)");
  for (int64_t c : tr.positions) std::printf(" %9lld", static_cast<long long>(c));
  std::printf("\n");
  for (size_t k = 0; k < tr.layers.size(); ++k) {
    std::printf("%-8d", tr.layers[k]);
    for (double a : tr.attention[k]) std::printf(" %8.1f%%", 100.0 * a);
    std::printf(" %8.1f%%\n", 100.0 * tr.attention_overall[k]);
  }
  if (!heatmap.empty()) std::printf("heatmap (test draw 0): %s\n", heatmap.c_str());
  return 0;
}

}  // namespace

Run add_route(CLI::App& app) {
  struct Opts {
    std::string model, prompt, prompt_file, heatmap = "routing.svg";
    bool json = false, no_bos = false;
    int threads = 0;
    int64_t task_examples = 0;
    DeviceOptions dev;
    std::string weights = "auto";
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model,-m", o->model, "Checkpoint directory or training run's folder (a model with true-hybrid "
                 "layers)")->required();
  CLI::Option* prompt = app.add_option("--prompt,-p", o->prompt, "Text to route (a model trained on text); - reads "
                                       "standard input");
  app.add_option("--prompt-file,-f", o->prompt_file, "A file whose text is routed")
      ->check(CLI::ExistingFile)->excludes(prompt);
  app.add_option("--task-examples", o->task_examples,
                 "A model trained on a task (hm train --task): route its first N test draws and report the "
                 "attention share of each role (mqar: key, value, query, filler); default 100")
      ->check(CLI::PositiveNumber);
  app.add_flag("--json", o->json, "Print one JSON object");
  app.add_option("--heatmap", o->heatmap, "SVG heatmap to write (\"\" = none)")->capture_default_str();
  app.add_flag("--no-bos", o->no_bos, "Do not prepend the BOS token");
  app.add_option("--threads,-t", o->threads, "Threads (0 = all cores)")->capture_default_str()->check(non_negative());
  add_device_options(app, o->dev, false);  // routing keeps a float32 KV cache (get_routing_analysis)
  add_weights_option(app, o->weights);
  add_max_memory(app);
  return [o] {
    if (o->threads > 0) set_num_threads(o->threads);
    DeviceSetup dev = open_device(o->dev);
    o->prompt = o->prompt_file.empty() ? prompt_text(o->prompt) : prompt_file_text(o->prompt_file);
    const TaskSpec task = checkpoint_task(o->model);
    if (!task.name.empty()) {
      HM_CHECK(o->prompt.empty(), "route: '", o->model, "' was trained on the task '", task.name,
               "': its tokens are task ids, not text; route its test draws with --task-examples N");
    } else {
      HM_CHECK(o->task_examples == 0, "route: '", o->model, "' was not trained on a task (hm train --task), "
               "so it has no task draws to route; give --prompt TEXT");
      HM_CHECK(!o->prompt.empty(), "route: give --prompt TEXT (it is empty)");
      HM_CHECK(is_valid_utf8(o->prompt), "route: the prompt is not valid UTF-8");
    }
    const std::string dir = checkpoint_dir(o->model);
    check_model_memory(dir, inference_shape(1, task.name.empty() ? int64_t(o->prompt.size()) + 1 : task.seq_len, "f32"),
                       "hm route");
    // Floats kept: path_compute_skipped copies the parameters into its counting models.
    auto model = load_model_on(dir, *dev.be, dev.dtype, o->weights, /*keep_floats=*/true);
    const ModelConfig& c = model->config();
    HM_CHECK(!c.true_layers.empty(), "route: the model in '", o->model, "' has no true-hybrid layers "
             "(\"hybrid\": \"", c.hybrid, "\"); routing exists only in true_layers (e.g. hm init "
             "--preset true-tiny)");
    if (!task.name.empty())
      return route_task_model(dir, *model, task, o->task_examples > 0 ? o->task_examples : 100, o->json, o->heatmap);
    auto tok = load_tokenizer(dir);
    const std::vector<int32_t> ids = tok->encode(o->prompt, !o->no_bos);
    HM_CHECK(!ids.empty(), "route: the prompt encodes to no tokens");
    warn_if_past_trained_context(dir, int64_t(ids.size()));
    const RoutingAnalysis r = get_routing_analysis(*model, ids);
    const double skipped = r.mode == th::Mode::Hard ? path_compute_skipped(*model, ids) : 0.0;
    std::vector<std::string> labels;
    for (int32_t id : ids) labels.push_back(token_label(*tok, id));
    if (!o->heatmap.empty()) write_file_atomic(o->heatmap, heatmap_svg(r, labels));

    if (o->json) {
      nlohmann::json j;
      j["mode"] = mode_name(r.mode);
      j["granularity"] = c.routing_granularity;
      j["n_tokens"] = ids.size();
      j["average_usage"] = {{"mamba", r.average_usage.mamba}, {"attention", r.average_usage.attention}};
      nlohmann::json layers = nlohmann::json::array();
      for (const LayerRouting& l : r.layers) {
        nlohmann::json routes = nlohmann::json::array();
        for (th::Route ro : l.route) routes.push_back(route_name(ro));
        layers.push_back({{"layer", l.layer}, {"mamba", l.usage.mamba}, {"attention", l.usage.attention},
                          {"attention_share", l.attention_share}, {"p", l.p}, {"route", routes}});
      }
      j["per_layer"] = layers;
      j["path_compute_skipped"] = skipped;
      j["tokens"] = labels;
      j["token_ids"] = ids;
      j["heatmap"] = o->heatmap;
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("%zu tokens, routing_mode %s, granularity %s\n", ids.size(), mode_name(r.mode),
                  c.routing_granularity.c_str());
      for (const LayerRouting& l : r.layers)
        std::printf("layer %d: Mamba usage: %.1f%%  Attention usage: %.1f%%\n", l.layer,
                    100.0 * l.usage.mamba, 100.0 * l.usage.attention);
      std::printf("overall: Mamba usage: %.1f%%  Attention usage: %.1f%%\n", 100.0 * r.average_usage.mamba,
                  100.0 * r.average_usage.attention);
      if (r.mode == th::Mode::Hard)
        std::printf("path compute skipped (counted FLOPs of the true layers' paths): %.1f%%\n",
                    100.0 * skipped);
      if (!o->heatmap.empty()) std::printf("heatmap: %s\n", o->heatmap.c_str());
    }
    return 0;
  };
}

}  // namespace hm::cli
