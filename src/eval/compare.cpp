#include "eval/compare.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "backend/backend.h"
#include "core/error.h"
#include "core/interrupt.h"
#include "core/threads.h"
#include "eval/tasks.h"
#include "io/atomic_file.h"
#include "io/json_read.h"
#include "model/model.h"
#include "runtime/tokenizer.h"
#include "train/trainer.h"

namespace hm {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr int kReferenceLayers = 4;  // Zoology's recurrent depth

bool is_task(const std::string& t) { return t != "perplexity"; }

std::string fmt_lr(float lr) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3g", double(lr));
  return b;
}

std::string fmt_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const long long t = static_cast<long long>(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%lldh%02lldm", t / 3600, (t / 60) % 60);
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%lldm%02llds", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%llds", t);
  return buf;
}

json run_json(const CompareRun& r) {
  json j = {{"arch", r.arch},       {"d_model", r.d_model}, {"n_layers", r.n_layers},
            {"params", r.params},   {"seq_len", r.seq_len}, {"kv", r.kv},
            {"lr", std::stod(fmt_lr(r.lr))}, {"metric", r.metric},   {"loss", r.loss},
            {"train_s", r.train_s}, {"best", r.best}};
  if (!r.error.empty()) j["error"] = r.error;
  return j;
}

std::string csv_text(const CompareConfig& c, const std::vector<CompareRun>& runs) {
  const char* metric = is_task(c.task) ? "accuracy" : "val_ppl";
  std::string s = detail::cat("task,arch,d_model,n_layers,params,seq_len,kv,lr,", metric,
                              ",loss,train_s,best,error\n");
  char buf[512];
  for (const CompareRun& r : runs) {
    std::snprintf(buf, sizeof buf, "%s,%s,%d,%d,%lld,%d,%d,%s,%.6g,%.6g,%.2f,%d,", c.task.c_str(),
                  r.arch.c_str(), r.d_model, r.n_layers, static_cast<long long>(r.params), r.seq_len, r.kv,
                  fmt_lr(r.lr).c_str(), r.metric, r.loss, r.train_s, int(r.best));
    std::string err = r.error;
    std::replace(err.begin(), err.end(), ',', ';');  // one cell
    std::replace(err.begin(), err.end(), '\n', ' ');
    s += buf + err + "\n";
  }
  return s;
}

// Better metric first: accuracy up (ties: lower loss), perplexity down.
bool better(const CompareConfig& c, const CompareRun& a, const CompareRun& b) {
  if (!a.error.empty() || !b.error.empty()) return a.error.empty() && !b.error.empty();
  if (is_task(c.task)) {
    if (a.metric != b.metric) return a.metric > b.metric;
    return a.loss < b.loss;
  }
  return a.metric < b.metric;
}

void write_outputs(const CompareConfig& c, const std::vector<CompareRun>& runs) {
  const fs::path out = c.out_dir;
  json j;
  j["task"] = c.task;
  j["settings"] = {{"sizes", c.sizes},   {"seq_lens", c.seq_lens},   {"lrs", c.lrs},
                   {"archs", c.archs},   {"budget_steps", c.budget}, {"batch", c.batch},
                   {"seed", c.seed},     {"threads", num_threads()}};
  if (c.on_device()) {
    j["settings"]["device"] = device_name(c.device);
    j["settings"]["dtype"] = compute_dtype_name(c.compute);
  }
  if (is_task(c.task)) {
    j["settings"]["task_vocab"] = c.task_vocab;
    j["settings"]["kv"] = c.kv;
    j["settings"]["test_examples"] = c.test_examples;
  } else {
    j["settings"]["data"] = c.data_path;
    j["settings"]["eval_tokens"] = c.eval_tokens;
  }
  j["metric"] = is_task(c.task) ? "accuracy" : "val_ppl";
  j["runs"] = json::array();
  for (const CompareRun& r : runs) j["runs"].push_back(run_json(r));
  write_file_atomic((out / "results.json").string(), j.dump(2) + "\n");
  write_file_atomic((out / "results.csv").string(), csv_text(c, runs));
  write_file_atomic((out / "results.svg").string(), compare_svg(c, runs));
}

}  // namespace

std::vector<std::string> arch_names() {
  return {"mamba", "transformer", "hybrid", "hybrid-nobridge", "true-soft", "true-hard"};
}

const char* const kZoologyAttention = "attention-2l";

ModelConfig arch_config(const std::string& arch, int d_model, int vocab, int n_layers) {
  ModelConfig c;
  c.d_model = d_model;
  c.n_layers = n_layers;
  c.vocab_size = vocab;
  c.d_ff = 0;  // no MLPs (Zoology)
  c.n_heads = c.n_kv_heads = std::max(1, d_model / 64);
  c.attention_layers.clear();
  if (arch == "mamba") {
  } else if (arch == "transformer" || arch == kZoologyAttention) {
    for (int i = 0; i < n_layers; ++i) c.attention_layers.push_back(i);
  } else if (arch == "hybrid" || arch == "hybrid-nobridge") {
    for (int i = 1; i < n_layers; i += 2) c.attention_layers.push_back(i);
    c.state_bridges = arch == "hybrid";
  } else if (arch == "true-soft" || arch == "true-hard") {
    HM_CHECK(n_layers >= 2, "arch ", arch, " needs at least 2 layers");
    c.hybrid = "true";
    for (int i = 1; i < n_layers; ++i) c.true_layers.push_back(i);
    c.routing_mode = arch == "true-soft" ? "soft" : "hard";
  } else {
    std::string known;
    for (const auto& a : arch_names()) known += (known.empty() ? "" : ", ") + a;
    known += std::string(", ") + kZoologyAttention;
    throw Error(detail::cat("unknown architecture '", arch, "' (known: ", known, ")"));
  }
  validate(c);
  return c;
}

ModelConfig matched_config(const std::string& arch, int d_model, int vocab) {
  const int64_t ref = count_params(arch_config("mamba", d_model, vocab, kReferenceLayers));
  if (arch == "mamba") return arch_config(arch, d_model, vocab, kReferenceLayers);
  if (arch == kZoologyAttention) return arch_config(arch, d_model, vocab, 2);  // unmatched by design
  ModelConfig best;
  int64_t best_gap = std::numeric_limits<int64_t>::max();
  for (int n = 2; n <= 24; ++n) {
    const ModelConfig c = arch_config(arch, d_model, vocab, n);
    const int64_t gap = std::llabs(count_params(c) - ref);
    if (gap < best_gap) best_gap = gap, best = c;
  }
  return best;
}

std::vector<CompareRun> run_compare(const CompareConfig& c) {
  HM_CHECK(!c.out_dir.empty(), "hm compare: no output directory given (--out DIR)");
  HM_CHECK(!c.sizes.empty() && !c.seq_lens.empty() && !c.lrs.empty() && !c.archs.empty(),
           "hm compare: --sizes, --seq-lens, --lrs and --archs must each list at least one value");
  HM_CHECK(c.budget >= 1, "hm compare: --budget must be >= 1 step (got ", c.budget, ")");
  HM_CHECK(c.batch >= 1, "hm compare: --batch must be >= 1 (got ", c.batch, ")");
  for (float lr : c.lrs) HM_CHECK(std::isfinite(lr) && lr > 0, "hm compare: learning rate ", lr, " is not positive");
  for (int d : c.sizes) HM_CHECK(d >= 16 && d % 16 == 0, "hm compare: d_model ", d, " must be a multiple of 16, >= 16");
  for (const auto& a : c.archs) arch_config(a, 64, 512, 4);  // names checked before any work
  const bool task = is_task(c.task);
  // Every task setting is checked before the first run, for every sequence length.
  std::map<int, TaskSpec> specs;
  if (task) {
    for (int L : c.seq_lens) {
      TaskSpec s;
      s.name = c.task;
      s.vocab = c.task_vocab;
      s.seq_len = L;
      s.kv = c.kv;
      s = resolve_task(s);
      validate_task(s);
      specs[L] = s;
    }
  } else {
    HM_CHECK(!c.data_path.empty(), "hm compare --task perplexity needs --data PATH");
    HM_CHECK(fs::exists(c.data_path), "hm compare: no such file or folder: ", c.data_path);
  }
  if (c.threads > 0) set_num_threads(c.threads);
  const int vocab = task ? c.task_vocab : ByteTokenizer::kVocab;
  const fs::path out = c.out_dir;
  fs::create_directories(out / "runs");

  const int64_t total = int64_t(c.seq_lens.size() * c.sizes.size() * c.archs.size() * c.lrs.size());
  int64_t done = 0;
  double spent = 0, work_done = 0;  // seconds and (steps x seq_len) of the runs trained here
  const bool tty = ::isatty(2) == 1;
  std::vector<CompareRun> runs;
  const auto t_start = Clock::now();
  for (int L : c.seq_lens) {
    for (int d : c.sizes) {
      for (const std::string& arch : c.archs) {
        const ModelConfig mc = matched_config(arch, d, vocab);
        const size_t cell_begin = runs.size();
        for (float lr : c.lrs) {
          ++done;
          CompareRun r;
          r.arch = arch;
          r.d_model = d;
          r.n_layers = mc.n_layers;
          r.params = count_params(mc);
          r.seq_len = L;
          r.kv = task ? specs[L].kv : 0;
          r.lr = lr;
          const std::string name = detail::cat(c.task, "_L", L, "_d", d, "_", arch, "_lr", fmt_lr(lr));
          const fs::path dir = out / "runs" / name;
          json key = {{"task", task ? task_to_json(specs[L]) : json(c.data_path)},
                      {"config", config_to_json(mc)},
                      {"steps", c.budget},
                      {"batch", c.batch},
                      {"lr", lr},
                      {"seed", c.seed},
                      {"test", task ? c.test_examples : c.eval_tokens}};
          if (c.on_device())  // rounding differs from the CPU's: never reuse one for the other
            key["device"] = {{"device", device_name(c.device)}, {"dtype", compute_dtype_name(c.compute)},
                             {"path_on_cpu", c.device_path_on_cpu}};
          const std::string label = detail::cat("[", done, "/", total, "] ", c.task, " L=", L, " d=", d, " ",
                                                arch, " (", mc.n_layers, " layers, ", r.params, " params) lr ",
                                                fmt_lr(lr));
          bool reused = false;
          if (fs::exists(dir / "result.json")) {
            try {
              const std::string file = (dir / "result.json").string();
              const json old = parse_json_file(file);
              const JsonFields f(old, file);
              if (f.at("key") == key) {
                const double inf = std::numeric_limits<double>::max();
                r.metric = f.get_double("metric", 0, inf);
                r.loss = f.get_double("loss", 0, inf);
                r.train_s = f.get_double("train_s", 0, inf);
                r.error = f.has("error") ? f.get_string("error") : "";
                reused = true;
              }
            } catch (const std::exception&) {
              // unreadable or out of range: train again
            }
          }
          // A run interrupted by a signal left pending.json (its key and time so far) beside its
          // checkpoint: the same run continues from there, exactly.
          const fs::path pending = dir / "pending.json";
          bool resume = false;
          double earlier_s = 0;
          if (!reused && fs::exists(pending) && fs::exists(dir / "train" / "checkpoint" / "trainer_state.json")) {
            try {
              std::ifstream f(pending);
              const json p = json::parse(f);
              if (p.at("key") == key) {
                earlier_s = p.at("train_s");
                resume = true;
              }
            } catch (const std::exception&) {
              // unreadable: train again
            }
          }
          if (!reused) {
            if (!resume) {
              fs::remove_all(dir);
              fs::create_directories(dir);
              save_config((dir / "model_config.json").string(), mc);
            }
            TrainConfig t;
            t.resume = resume;
            t.config_file = (dir / "model_config.json").string();
            t.out_dir = (dir / "train").string();
            t.steps = c.budget;
            t.batch = c.batch;
            t.seq_len = L;
            t.lr = lr;
            t.seed = c.seed;
            t.threads = c.threads;
            t.device = c.device;
            t.compute = c.compute;
            t.device_path_on_cpu = c.device_path_on_cpu;
            t.eval_every = 0;
            t.save_every = 0;
            t.progress = false;
            if (task) {
              t.task = specs[L];
              t.task_eval = 0;  // scored below, once
            } else {
              t.data_path = c.data_path;
              t.eval_tokens = c.eval_tokens;
            }
            const int64_t every = std::max<int64_t>(1, c.budget / 10);
            t.on_step = [&](int64_t step, int64_t steps, double loss) {
              if (!c.progress || !(tty || step % every == 0)) return;
              std::fprintf(stderr, "%s%s: step %lld/%lld loss %.4f%s", tty ? "\r" : "", label.c_str(),
                           static_cast<long long>(step), static_cast<long long>(steps), loss, tty ? "   " : "\n");
              std::fflush(stderr);
            };
            const auto t0 = Clock::now();
            try {
              train(t);
              r.train_s = earlier_s + std::chrono::duration<double>(Clock::now() - t0).count();
              if (task) {
                auto be = make_cpu_backend();
                auto model = load_model((dir / "train" / "checkpoint").string(), *be);
                const TaskScore sc = score_task(*model, specs[L], c.test_examples);
                r.metric = sc.accuracy;
                r.loss = sc.loss;
              } else {
                // The run's last row already holds the validation loss of the final weights
                // (the same split and windows evaluate() scores): no second pass.
                std::ifstream f(dir / "train" / "train_log.csv");
                std::string line, last;
                while (std::getline(f, line))
                  if (!line.empty()) last = line;
                std::vector<std::string> cells;
                std::stringstream ss(last);
                for (std::string cell; std::getline(ss, cell, ',');) cells.push_back(cell);
                HM_CHECK(cells.size() >= 7 && !cells[5].empty(), (dir / "train" / "train_log.csv").string(),
                         ": no validation loss in the last row");
                r.loss = std::stod(cells[5]);
                r.metric = std::exp(r.loss);
              }
            } catch (const Interrupted&) {
              const json p = {{"key", key},
                              {"train_s", earlier_s + std::chrono::duration<double>(Clock::now() - t0).count()}};
              write_file_atomic(pending.string(), p.dump(2) + "\n");
              throw;
            } catch (const Error& e) {
              r.train_s = earlier_s + std::chrono::duration<double>(Clock::now() - t0).count();
              r.error = e.what();
            }
            spent += r.train_s;
            work_done += double(c.budget) * L;
            json res = run_json(r);
            res["key"] = key;
            write_file_atomic((dir / "result.json").string(), res.dump(2) + "\n");
            fs::remove(pending);
          }
          runs.push_back(r);
          if (c.progress) {
            // Remaining work in steps x seq_len, at the rate measured so far in this sweep.
            double left = 0;
            {
              int64_t k = 0;
              for (int L2 : c.seq_lens)
                for (size_t i = 0; i < c.sizes.size() * c.archs.size() * c.lrs.size(); ++i)
                  if (++k > done) left += double(c.budget) * L2;
            }
            const double eta = work_done > 0 ? left * spent / work_done : std::nan("");
            std::fprintf(stderr, "%s%s: %s%s | %s%s | sweep %s elapsed, ETA %s\n", tty ? "\r" : "", label.c_str(),
                         r.error.empty()
                             ? detail::cat(task ? "accuracy " : "val ppl ", r.metric).c_str()
                             : ("FAILED: " + r.error.substr(0, 160)).c_str(),
                         reused ? " (reused)" : "", fmt_duration(r.train_s).c_str(), tty ? "          " : "",
                         fmt_duration(std::chrono::duration<double>(Clock::now() - t_start).count()).c_str(),
                         fmt_duration(eta).c_str());
            std::fflush(stderr);
          }
          // Ctrl-C or SIGTERM between runs: every finished run is saved (result.json).
          if (const int sig = interrupt_signal(); sig != 0 && done < total)
            throw Interrupted(sig, detail::cat("interrupted by ", signal_name(sig), " after run ", done, " of ", total,
                                               "; finished runs are kept in ", (out / "runs").string()));
        }
        size_t best = cell_begin;
        for (size_t i = cell_begin; i < runs.size(); ++i)
          if (better(c, runs[i], runs[best])) best = i;
        runs[best].best = true;
        write_outputs(c, runs);
      }
    }
  }
  return runs;
}

std::string compare_table(const CompareConfig& c, const std::vector<CompareRun>& runs) {
  const bool task = is_task(c.task);
  std::ostringstream o;
  char buf[256];
  std::snprintf(buf, sizeof buf, "%-16s %7s %6s %9s %7s %4s %8s %9s %9s\n", "architecture", "d_model", "layers",
                "params", "seq_len", "kv", "best_lr", task ? "accuracy" : "val_ppl", "train_s");
  o << buf;
  for (const CompareRun& r : runs) {
    if (!r.best) continue;
    if (!r.error.empty()) {
      std::snprintf(buf, sizeof buf, "%-16s %7d %6d %9lld %7d %4d %8s %9s %9.1f  (%s)\n", r.arch.c_str(), r.d_model,
                    r.n_layers, static_cast<long long>(r.params), r.seq_len, r.kv, "-", "failed", r.train_s,
                    r.error.substr(0, 60).c_str());
    } else {
      std::snprintf(buf, sizeof buf, "%-16s %7d %6d %9lld %7d %4d %8s %9.4f %9.1f\n", r.arch.c_str(), r.d_model,
                    r.n_layers, static_cast<long long>(r.params), r.seq_len, r.kv, fmt_lr(r.lr).c_str(), r.metric,
                    r.train_s);
    }
    o << buf;
  }
  return o.str();
}

// One panel per sequence length, d_model on a log2 axis, one polyline per architecture (best lr
// of each cell). Hand-written SVG, like the trainer's loss plot.
std::string compare_svg(const CompareConfig& c, const std::vector<CompareRun>& runs) {
  const bool task = is_task(c.task);
  std::vector<int> sizes = c.sizes, lens = c.seq_lens;
  std::sort(sizes.begin(), sizes.end());
  std::sort(lens.begin(), lens.end());
  const double pw = 300, ph = 260, ml = 60, mt = 50, gap = 40, legend = 170, mb = 50;
  const double W = ml + double(lens.size()) * (pw + gap) + legend, H = mt + ph + mb;
  double lo = 0, hi = 1;
  if (!task) {
    lo = std::numeric_limits<double>::infinity(), hi = -lo;
    for (const auto& r : runs)
      if (r.best && r.error.empty()) lo = std::min(lo, r.metric), hi = std::max(hi, r.metric);
    if (!std::isfinite(lo)) lo = 1, hi = 2;
    if (hi - lo < 1e-9) hi = lo + 1;
    const double pad = 0.05 * (hi - lo);
    lo -= pad, hi += pad;
  }
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#98df8a", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"};
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(1);
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
    << ' ' << H << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o << "<text x=\"" << (W - legend) / 2 << "\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">" << c.task << ": "
    << (task ? "test accuracy" : "validation perplexity") << " vs d_model (best lr per point)</text>\n";
  auto xr = [&](size_t i) { return sizes.size() == 1 ? 0.5 : double(i) / double(sizes.size() - 1); };
  for (size_t p = 0; p < lens.size(); ++p) {
    const double x0 = ml + double(p) * (pw + gap), y0 = mt;
    auto X = [&](size_t i) { return x0 + 15 + (pw - 30) * xr(i); };
    auto Y = [&](double v) { return y0 + ph - ph * (v - lo) / (hi - lo); };
    o << "<rect x=\"" << x0 << "\" y=\"" << y0 << "\" width=\"" << pw << "\" height=\"" << ph
      << "\" fill=\"none\" stroke=\"black\"/>\n";
    o << "<text x=\"" << x0 + pw / 2 << "\" y=\"" << y0 - 8 << "\" text-anchor=\"middle\">seq_len " << lens[p]
      << "</text>\n";
    for (int k = 0; k <= 4; ++k) {
      const double v = lo + (hi - lo) * k / 4;
      char lab[32];
      std::snprintf(lab, sizeof lab, task ? "%.2f" : "%.3g", v);
      o << "<line x1=\"" << x0 << "\" y1=\"" << Y(v) << "\" x2=\"" << x0 + pw << "\" y2=\"" << Y(v)
        << "\" stroke=\"#ddd\"/>";
      if (p == 0) o << "<text x=\"" << x0 - 5 << "\" y=\"" << Y(v) + 4 << "\" text-anchor=\"end\">" << lab << "</text>";
      o << "\n";
    }
    for (size_t i = 0; i < sizes.size(); ++i)
      o << "<text x=\"" << X(i) << "\" y=\"" << y0 + ph + 16 << "\" text-anchor=\"middle\">" << sizes[i]
        << "</text>\n";
    o << "<text x=\"" << x0 + pw / 2 << "\" y=\"" << y0 + ph + 34 << "\" text-anchor=\"middle\">d_model</text>\n";
    for (size_t a = 0; a < c.archs.size(); ++a) {
      std::string pts;
      std::ostringstream dots;
      dots.setf(std::ios::fixed);
      dots.precision(1);
      for (size_t i = 0; i < sizes.size(); ++i)
        for (const auto& r : runs)
          if (r.best && r.error.empty() && r.arch == c.archs[a] && r.d_model == sizes[i] && r.seq_len == lens[p]) {
            std::ostringstream pt;
            pt.setf(std::ios::fixed);
            pt.precision(1);
            pt << X(i) << ',' << Y(r.metric) << ' ';
            pts += pt.str();
            dots << "<circle cx=\"" << X(i) << "\" cy=\"" << Y(r.metric) << "\" r=\"3\" fill=\"" << colors[a % 8]
                 << "\"/>";
          }
      if (!pts.empty())
        o << "<polyline fill=\"none\" stroke=\"" << colors[a % 8] << "\" stroke-width=\"2\" points=\"" << pts
          << "\"/>" << dots.str() << "\n";
    }
  }
  const double lx = ml + double(lens.size()) * (pw + gap);
  for (size_t a = 0; a < c.archs.size(); ++a) {
    const double ly = mt + 10 + 20 * double(a);
    o << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 24 << "\" y2=\"" << ly << "\" stroke=\""
      << colors[a % 8] << "\" stroke-width=\"2\"/><text x=\"" << lx + 30 << "\" y=\"" << ly + 4 << "\">"
      << c.archs[a] << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

}  // namespace hm
