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
#include <mutex>
#include <sstream>
#include <thread>

#include "backend/backend.h"
#include "core/error.h"
#include "core/format.h"
#include "core/interrupt.h"
#include "core/threads.h"
#include "eval/tasks.h"
#include "io/atomic_file.h"
#include "io/json_read.h"
#include "model/model.h"
#include "runtime/memory.h"
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

json run_json(const CompareRun& r) {
  json j = {{"arch", r.arch},       {"d_model", r.d_model}, {"n_layers", r.n_layers},
            {"params", r.params},   {"seq_len", r.seq_len}, {"kv", r.kv},
            {"lr", std::stod(fmt_lr(r.lr))}, {"metric", r.metric},   {"loss", r.loss},
            {"train_s", r.train_s}, {"score_s", r.score_s}, {"steps", r.steps},
            {"batch", r.batch},     {"best", r.best}};
  if (!r.error.empty()) j["error"] = r.error;
  if (r.out_of_memory) j["out_of_memory"] = true;
  return j;
}

std::string csv_text(const CompareConfig& c, const std::vector<CompareRun>& runs) {
  const char* metric = is_task(c.task) ? "accuracy" : "val_ppl";
  std::string s = detail::cat("task,arch,d_model,n_layers,params,seq_len,kv,lr,", metric,
                              ",loss,train_s,steps,batch,best,error\n");
  char buf[512];
  for (const CompareRun& r : runs) {
    std::snprintf(buf, sizeof buf, "%s,%s,%d,%d,%lld,%d,%d,%s,%.6g,%.6g,%.2f,%lld,%d,%d,", c.task.c_str(),
                  r.arch.c_str(), r.d_model, r.n_layers, static_cast<long long>(r.params), r.seq_len, r.kv,
                  fmt_lr(r.lr).c_str(), r.metric, r.loss, r.train_s, static_cast<long long>(r.steps), r.batch,
                  int(r.best));
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

// What the runs trained by one run_compare call took (results.json's "sweep").
struct SweepStats {
  int jobs = 1;
  int64_t trained = 0;  // runs trained (not reused)
  double wall_s = 0;    // from the first of them starting to the last finishing
  double tokens = 0;    // their training tokens (steps x batch x seq_len, summed)
};

void write_outputs(const CompareConfig& c, const std::vector<CompareRun>& runs, const SweepStats* st = nullptr) {
  const fs::path out = c.out_dir;
  json j;
  j["task"] = c.task;
  j["settings"] = {{"sizes", c.sizes},   {"seq_lens", c.seq_lens},   {"lrs", c.lrs},
                   {"archs", c.archs},   {"budget_steps", c.budget}, {"batch", c.batch},
                   {"seed", c.seed},     {"threads", num_threads()}};
  if (!c.batches.empty()) j["settings"]["batch"] = c.batches;
  if (c.budget_examples > 0) j["settings"]["budget_examples"] = c.budget_examples;
  if (c.jobs > 1) j["settings"]["jobs"] = c.jobs;
  if (st)
    j["sweep"] = {{"jobs", st->jobs},     {"trained_runs", st->trained}, {"wall_s", st->wall_s},
                  {"tokens", st->tokens}, {"tokens_per_s", st->wall_s > 0 ? st->tokens / st->wall_s : 0.0}};
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

std::vector<std::string> extra_arch_names() { return {"mamba2", "hybrid-mamba2"}; }

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
  } else if (arch == "mamba2" || arch == "hybrid-mamba2") {
    c.d_state = 64;
    c.mamba2_head_dim = std::min(64, c.d_inner());
    for (int i = 0; i < n_layers; ++i) {
      if (arch == "hybrid-mamba2" && i % 2 == 1)
        c.attention_layers.push_back(i);
      else
        c.mamba2_layers.push_back(i);
    }
  } else if (arch == "true-soft" || arch == "true-hard") {
    HM_CHECK(n_layers >= 2, "arch ", arch, " needs at least 2 layers");
    c.hybrid = "true";
    for (int i = 1; i < n_layers; ++i) c.true_layers.push_back(i);
    c.routing_mode = arch == "true-soft" ? "soft" : "hard";
  } else {
    std::string known;
    for (const auto& a : arch_names()) known += (known.empty() ? "" : ", ") + a;
    for (const auto& a : extra_arch_names()) known += ", " + a;
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

namespace {

// One run of the sweep, as planned before any of them trains.
struct Planned {
  int L = 0, d = 0, batch = 0;
  int64_t steps = 0;
  std::string arch, name, label;
  float lr = 0;
  ModelConfig mc;
  fs::path dir;
  json key;
  size_t cell = 0;  // index of its (seq_len, d_model, arch) cell
};

// What run_compare's runs share while they train, one thread per job: every field below `mu`
// is read and written under it.
struct Sweep {
  Sweep(const CompareConfig& cfg, const std::vector<Planned>& p, std::vector<CompareRun>& r) : c(cfg), plan(p), runs(r) {}
  const CompareConfig& c;
  const std::vector<Planned>& plan;
  std::vector<CompareRun>& runs;
  std::mutex mu;
  std::vector<char> finished;
  std::vector<size_t> cell_left, cell_begin, cell_end;
  size_t next = 0;                      // the next pending run to hand out (index into pending)
  std::vector<size_t> pending;          // the runs to train, in sweep order
  int running = 0;                      // runs training now
  bool alone = false;                   // the retry pass: one run at a time
  std::vector<size_t> retry;            // out of memory beside other runs: trained again alone
  int64_t done = 0;                     // runs finished (trained, failed or reused)
  double work_done = 0, work_left = 0;  // tokens (steps x batch x seq_len) trained here, and to train
  int64_t trained = 0;
  Clock::time_point t_start = Clock::now(), t_train = Clock::now();
  std::exception_ptr failure;           // the first exception that is no run's own failure
  bool interrupted = false;             // a run stopped for a signal (its pending.json is written)
  std::exception_ptr interrupt;
};

double run_tokens(const Planned& p) { return double(p.steps) * p.batch * p.L; }

// The runs of every finished cell, in sweep order: what results.* hold.
std::vector<CompareRun> finished_cells(const Sweep& s) {
  std::vector<CompareRun> out;
  for (size_t k = 0; k < s.cell_left.size(); ++k)
    if (s.cell_left[k] == 0)
      for (size_t i = s.cell_begin[k]; i < s.cell_end[k]; ++i) out.push_back(s.runs[i]);
  return out;
}

// Records run i (under s.mu): progress line, and when its cell is complete the cell's best lr
// and the output files.
void finish_run(Sweep& s, size_t i, bool reused, bool trained_here) {
  const CompareConfig& c = s.c;
  const CompareRun& r = s.runs[i];
  s.finished[i] = 1;
  ++s.done;
  if (trained_here) {
    s.work_done += run_tokens(s.plan[i]);
    s.work_left -= run_tokens(s.plan[i]);
    ++s.trained;
  }
  if (c.progress) {
    // Remaining work in tokens, at the rate this sweep has trained so far (wall clock: with
    // --jobs N the runs overlap).
    const double wall = std::chrono::duration<double>(Clock::now() - s.t_train).count();
    const double eta = s.work_done > 0 ? std::max(0.0, s.work_left) * wall / s.work_done : std::nan("");
    const bool tty = ::isatty(2) == 1;
    const std::string what = r.error.empty() ? detail::cat(is_task(c.task) ? "accuracy " : "val ppl ", r.metric)
                                             : "FAILED: " + r.error.substr(0, 160);
    std::fprintf(stderr, "%s[%lld/%lld] %s: %s%s | %s%s | sweep %s elapsed, ETA %s\n", tty ? "\r" : "",
                 static_cast<long long>(s.done), static_cast<long long>(s.plan.size()), s.plan[i].label.c_str(),
                 what.c_str(), reused ? " (reused)" : "", fmt_duration(r.train_s).c_str(), tty ? "          " : "",
                 fmt_duration(std::chrono::duration<double>(Clock::now() - s.t_start).count()).c_str(),
                 fmt_duration(eta).c_str());
    std::fflush(stderr);
  }
  const size_t k = s.plan[i].cell;
  if (--s.cell_left[k] == 0) {
    size_t best = s.cell_begin[k];
    for (size_t j = s.cell_begin[k]; j < s.cell_end[k]; ++j)
      if (better(c, s.runs[j], s.runs[best])) best = j;
    s.runs[best].best = true;
    write_outputs(c, finished_cells(s));
  }
}


// score_task for a sweep on a device: test examples 0 .. n-1, each run through the model in
// chunks that end at its scored positions (the memory carries the state between them), so each
// forward forms and returns the logits of one position per example ([nb, V]), not of all L.
// score_task's [nb x L, V] logits cost more than the training on a GPU (8 GB through PCIe per
// L 256 run at V 8192); here a run's scoring is kv small forwards per batch of examples.
TaskScore score_task_chunked(HybridModel& model, const TaskSpec& s, int64_t n, int batch) {
  const ModelConfig& mc = model.config();
  HM_CHECK(mc.vocab_size >= s.vocab, "task ", s.name, " uses ", s.vocab, " tokens but the model's vocab_size is ",
           mc.vocab_size);
  model.prepare();
  const int L = s.seq_len, V = mc.vocab_size;
  const int B = int(std::min<int64_t>(batch, n));
  HybridMemory mem(model.backend(), mc, B, L, KvType::F32);
  std::vector<int32_t> in(size_t(B) * L), tgt(size_t(B) * L);
  std::vector<std::vector<int>> pos(static_cast<size_t>(B));  // each example's scored positions, in order
  std::vector<float> logits;
  std::vector<int> who;
  TaskScore sc;
  double nll = 0;
  for (int64_t done = 0; done < n;) {
    const int nb = int(std::min<int64_t>(B, n - done));
    task_examples(s, TaskSplit::Test, kTaskTestSeed, uint64_t(done), nb, in.data(), tgt.data());
    size_t rounds = 0;
    for (int k = 0; k < nb; ++k) {
      pos[size_t(k)].clear();
      for (int t = 0; t < L; ++t)
        if (tgt[size_t(k) * L + size_t(t)] >= 0) pos[size_t(k)].push_back(t);
      rounds = std::max(rounds, pos[size_t(k)].size());
      mem.seq_rm(k);
    }
    for (size_t i = 0; i < rounds; ++i) {
      Batch b;
      who.clear();
      for (int k = 0; k < nb; ++k) {
        const std::vector<int>& p = pos[size_t(k)];
        if (i >= p.size()) continue;
        const int from = i == 0 ? 0 : p[i - 1] + 1, to = p[i] + 1;  // tokens [from, to)
        const auto row = in.begin() + int64_t(k) * L;
        b.add(k, std::vector<int32_t>(row + from, row + to));
        who.push_back(k);
      }
      model.forward(b, mem, logits);  // one row per chunk: its last token's
      HM_ASSERT(logits.size() == who.size() * size_t(V));
      for (size_t j = 0; j < who.size(); ++j) {
        const int k = who[j];
        score_logits_row(logits.data() + j * size_t(V), V, tgt[size_t(k) * L + size_t(pos[size_t(k)][i])], sc, nll);
      }
    }
    done += nb;
    sc.examples = done;
  }
  sc.accuracy = sc.scored ? double(sc.correct) / double(sc.scored) : 0;
  sc.loss = sc.scored ? nll / double(sc.scored) : 0;
  return sc;
}

// Trains (or continues) run i and scores it; a failure of the run itself (hm::Error) is recorded
// in the result, a signal saves its checkpoint and pending.json and rethrows Interrupted.
void train_run(Sweep& s, size_t i, const std::map<int, TaskSpec>& specs, bool print_steps) {
  const CompareConfig& c = s.c;
  const Planned& p = s.plan[i];
  const bool task = is_task(c.task);
  CompareRun r;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    r = s.runs[i];
  }
  const fs::path& dir = p.dir;
  // A run interrupted by a signal left pending.json (its key and time so far) beside its
  // checkpoint: the same run continues from there, exactly.
  const fs::path pending = dir / "pending.json";
  bool resume = false;
  double earlier_s = 0;
  if (fs::exists(pending) && fs::exists(dir / "train" / "checkpoint" / "trainer_state.json")) {
    try {
      std::ifstream f(pending);
      const json j = json::parse(f);
      if (j.at("key") == p.key) {
        earlier_s = j.at("train_s");
        resume = true;
      }
    } catch (const std::exception&) {
      // unreadable: train again
    }
  }
  if (!resume) {
    fs::remove_all(dir);
    fs::create_directories(dir);
    save_config((dir / "model_config.json").string(), p.mc);
  }
  TrainConfig t;
  t.resume = resume;
  t.config_file = (dir / "model_config.json").string();
  t.out_dir = (dir / "train").string();
  t.steps = p.steps;
  t.batch = p.batch;
  t.seq_len = p.L;
  t.lr = p.lr;
  t.seed = c.seed;
  t.threads = c.threads;
  t.device = c.device;
  t.compute = c.compute;
  t.device_path_on_cpu = c.device_path_on_cpu;
  t.eval_every = 0;
  t.save_every = 0;
  t.progress = false;
  if (task) {
    t.task = specs.at(p.L);
    t.task_eval = 0;  // scored below, once
  } else {
    t.data_path = c.data_path;
    t.eval_tokens = c.eval_tokens;
  }
  const int64_t every = std::max<int64_t>(1, p.steps / 10);
  const bool tty = ::isatty(2) == 1;
  if (print_steps)
    t.on_step = [&](int64_t step, int64_t steps, double loss) {
      if (!c.progress || !(tty || step % every == 0)) return;
      std::fprintf(stderr, "%s[%lld/%lld] %s: step %lld/%lld loss %.4f%s", tty ? "\r" : "",
                   static_cast<long long>(s.done + 1), static_cast<long long>(s.plan.size()), p.label.c_str(),
                   static_cast<long long>(step), static_cast<long long>(steps), loss, tty ? "   " : "\n");
      std::fflush(stderr);
    };
  const auto t0 = Clock::now();
  int running_now = 0;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    running_now = ++s.running;
  }
  struct Leave {  // the count drops however train_run leaves
    Sweep& s;
    ~Leave() {
      std::lock_guard<std::mutex> lk(s.mu);
      --s.running;
    }
  } leave{s};
  try {
    if (c.on_run_start) c.on_run_start(p.name, running_now);
    train(t);
    r.train_s = earlier_s + std::chrono::duration<double>(Clock::now() - t0).count();
    const auto t1 = Clock::now();
    if (task && c.on_device()) {
      // On the device the runs train on, through a backend of this run's own.
      auto be = make_backend(c.device);
      auto model = load_model((dir / "train" / "checkpoint").string(), *be);
      const TaskScore sc = score_task_chunked(*model, specs.at(p.L), c.test_examples, 256);
      r.metric = sc.accuracy;
      r.loss = sc.loss;
    } else if (task) {
      auto be = make_cpu_backend();
      auto model = load_model((dir / "train" / "checkpoint").string(), *be);
      const TaskScore sc = score_task(*model, specs.at(p.L), c.test_examples);
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
    r.score_s = std::chrono::duration<double>(Clock::now() - t1).count();
  } catch (const Interrupted&) {
    const json j = {{"key", p.key},
                    {"train_s", earlier_s + std::chrono::duration<double>(Clock::now() - t0).count()}};
    write_file_atomic(pending.string(), j.dump(2) + "\n");
    throw;
  } catch (const OutOfMemory& e) {
    {
      std::lock_guard<std::mutex> lk(s.mu);
      // Beside other runs: their memory, not this run's need, may be what failed it. Trained
      // again from the start, alone, once every other run is done.
      if (!s.alone && (running_now > 1 || s.running > 1)) {
        s.retry.push_back(i);
        return;
      }
    }
    r.train_s = earlier_s + std::chrono::duration<double>(Clock::now() - t0).count();
    r.error = e.what();
    r.out_of_memory = true;
  } catch (const Error& e) {
    r.train_s = earlier_s + std::chrono::duration<double>(Clock::now() - t0).count();
    r.error = e.what();
  }
  json res = run_json(r);
  res["key"] = p.key;
  write_file_atomic((dir / "result.json").string(), res.dump(2) + "\n");
  fs::remove(pending);
  std::lock_guard<std::mutex> lk(s.mu);
  s.runs[i] = r;
  finish_run(s, i, false, true);
}

// One job: takes the next pending run until none is left, a signal arrived or a job failed.
void job(Sweep& s, const std::map<int, TaskSpec>& specs, bool print_steps) {
  for (;;) {
    size_t i;
    {
      std::lock_guard<std::mutex> lk(s.mu);
      if (s.next >= s.pending.size() || s.failure || s.interrupted || interrupt_signal() != 0) return;
      i = s.pending[s.next++];
    }
    try {
      train_run(s, i, specs, print_steps);
    } catch (const Interrupted&) {
      std::lock_guard<std::mutex> lk(s.mu);
      if (!s.interrupted) s.interrupt = std::current_exception();
      s.interrupted = true;
      return;
    } catch (...) {
      std::lock_guard<std::mutex> lk(s.mu);
      if (!s.failure) s.failure = std::current_exception();
      return;
    }
  }
}

}  // namespace

std::vector<CompareRun> run_compare(const CompareConfig& c) {
  HM_CHECK(!c.out_dir.empty(), "hm compare: no output directory given (--out DIR)");
  HM_CHECK(!c.sizes.empty() && !c.seq_lens.empty() && !c.lrs.empty() && !c.archs.empty(),
           "hm compare: --sizes, --seq-lens, --lrs and --archs must each list at least one value");
  HM_CHECK(c.budget >= 1, "hm compare: --budget must be >= 1 step (got ", c.budget, ")");
  HM_CHECK(c.budget_examples >= 0, "hm compare: --examples must be >= 0 (got ", c.budget_examples, ")");
  HM_CHECK(c.batch >= 1, "hm compare: --batch must be >= 1 (got ", c.batch, ")");
  HM_CHECK(c.batches.empty() || c.batches.size() == c.seq_lens.size(), "hm compare: --batch lists ",
           c.batches.size(), " values for ", c.seq_lens.size(), " --seq-lens; give one, or one per sequence length");
  for (int b : c.batches) HM_CHECK(b >= 1, "hm compare: --batch must be >= 1 (got ", b, ")");
  HM_CHECK(c.jobs >= 1, "hm compare: --jobs must be >= 1 (got ", c.jobs, ")");
  HM_CHECK(c.jobs == 1 || c.on_device(), "hm compare --jobs ", c.jobs, ": runs train side by side on a device "
           "only (--device cuda); on the CPU one run already uses every core");
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

  // The plan: every (seq_len, d_model, arch, lr) run in sweep order, with the key its result is
  // reused by.
  std::vector<Planned> plan;
  std::vector<CompareRun> runs;
  std::vector<size_t> cell_begin, cell_end;
  const int64_t total = int64_t(c.seq_lens.size() * c.sizes.size() * c.archs.size() * c.lrs.size());
  for (size_t li = 0; li < c.seq_lens.size(); ++li) {
    const int L = c.seq_lens[li];
    const int batch = c.batch_for(li);
    const int64_t steps = c.steps_for(li);
    for (int d : c.sizes) {
      for (const std::string& arch : c.archs) {
        const ModelConfig mc = matched_config(arch, d, vocab);
        cell_begin.push_back(plan.size());
        for (float lr : c.lrs) {
          Planned p;
          p.L = L, p.d = d, p.batch = batch, p.steps = steps, p.arch = arch, p.lr = lr, p.mc = mc;
          p.cell = cell_begin.size() - 1;
          p.name = detail::cat(c.task, "_L", L, "_d", d, "_", arch, "_lr", fmt_lr(lr));
          p.dir = out / "runs" / p.name;
          p.key = {{"task", task ? task_to_json(specs[L]) : json(c.data_path)},
                   {"config", config_to_json(mc)},
                   {"steps", steps},
                   {"batch", batch},
                   {"lr", lr},
                   {"seed", c.seed},
                   {"test", task ? c.test_examples : c.eval_tokens}};
          if (c.on_device())  // rounding differs from the CPU's: never reuse one for the other
            p.key["device"] = {{"device", device_name(c.device)}, {"dtype", compute_dtype_name(c.compute)},
                               {"path_on_cpu", c.device_path_on_cpu}, {"score", "chunked"}};
          CompareRun r;
          r.arch = arch;
          r.d_model = d;
          r.n_layers = mc.n_layers;
          r.params = count_params(mc);
          r.seq_len = L;
          r.kv = task ? specs[L].kv : 0;
          r.lr = lr;
          r.steps = steps;
          r.batch = batch;
          p.label = detail::cat(c.task, " L=", L, " d=", d, " ", arch, " (", mc.n_layers, " layers, ", r.params,
                                " params) lr ", fmt_lr(lr));
          plan.push_back(std::move(p));
          runs.push_back(r);
        }
        cell_end.push_back(plan.size());
      }
    }
  }
  HM_ASSERT(int64_t(plan.size()) == total);

  Sweep s(c, plan, runs);
  s.finished.assign(plan.size(), 0);
  s.cell_begin = cell_begin;
  s.cell_end = cell_end;
  for (size_t k = 0; k < cell_begin.size(); ++k) s.cell_left.push_back(cell_end[k] - cell_begin[k]);
  // Finished runs with the same key are reused; the others train.
  for (size_t i = 0; i < plan.size(); ++i) {
    const fs::path file_path = plan[i].dir / "result.json";
    bool reused = false;
    if (fs::exists(file_path)) {
      try {
        const std::string file = file_path.string();
        const json old = parse_json_file(file);
        const JsonFields f(old, file);
        // Out of memory is a property of that moment, not of the run: train it again.
        const bool oom = f.has("out_of_memory") && old.at("out_of_memory") == true;
        if (f.at("key") == plan[i].key && !oom) {
          const double inf = std::numeric_limits<double>::max();
          CompareRun& r = runs[i];
          r.metric = f.get_double("metric", 0, inf);
          r.loss = f.get_double("loss", 0, inf);
          r.train_s = f.get_double("train_s", 0, inf);
          r.score_s = f.has("score_s") ? f.get_double("score_s", 0, inf) : 0;
          r.error = f.has("error") ? f.get_string("error") : "";
          reused = true;
        }
      } catch (const std::exception&) {
        // unreadable or out of range: train again
      }
    }
    if (reused) {
      finish_run(s, i, true, false);
    } else {
      s.pending.push_back(i);
      s.work_left += run_tokens(plan[i]);
    }
  }

  // The pending runs: in this thread with one job, else in `jobs` threads, each run with its
  // own backend (a CUDA backend owns its stream, cuBLAS handles and workspace), so the host work
  // and launch latency of one run overlaps the others' kernels. A run computes the same whatever
  // the number of jobs: its math reads nothing another run writes.
  s.t_train = Clock::now();
  const int jobs = int(std::min<size_t>(size_t(c.jobs), s.pending.size()));
  if (jobs <= 1) {
    job(s, specs, true);
  } else {
    // Host threads per job: the runs' own host work (batches, the embedding gradient's plan,
    // True Hybrid routers) is serial; OpenMP regions (the cpu backend of the test hook) share
    // the cores.
    const int per_job = c.threads > 0 ? c.threads : std::max(1, int(std::thread::hardware_concurrency()) / jobs);
    std::vector<std::thread> pool;
    for (int j = 0; j < jobs; ++j)
      pool.emplace_back([&s, &specs, per_job] {
        set_num_threads(per_job);
        job(s, specs, false);
      });
    for (std::thread& t : pool) t.join();
    // Runs that ran out of memory beside others: again, one at a time, in sweep order.
    if (!s.retry.empty() && !s.failure && !s.interrupted && interrupt_signal() == 0) {
      std::sort(s.retry.begin(), s.retry.end());
      if (c.progress)
        std::fprintf(stderr, "%zu runs ran out of device memory beside others: training them again, one at a time\n",
                     s.retry.size());
      s.pending = s.retry;
      s.next = 0;
      s.alone = true;
      job(s, specs, true);
    }
  }
  const double wall = std::chrono::duration<double>(Clock::now() - s.t_train).count();
  if (s.failure) std::rethrow_exception(s.failure);
  if (s.interrupt) std::rethrow_exception(s.interrupt);
  if (const int sig = interrupt_signal(); sig != 0 && s.done < total)
    throw Interrupted(sig, detail::cat("interrupted by ", signal_name(sig), " after ", s.done, " of ", total,
                                       " runs; finished runs are kept in ", (out / "runs").string()));
  if (s.trained > 0) {
    SweepStats st;
    st.jobs = jobs;
    st.trained = s.trained;
    st.wall_s = wall;
    st.tokens = s.work_done;
    write_outputs(c, runs, &st);
    if (c.progress)
      std::fprintf(stderr, "trained %lld runs in %s with %d jobs: %.4g tokens, %.4g tokens/s\n",
                   static_cast<long long>(st.trained), fmt_duration(wall).c_str(), jobs, st.tokens,
                   wall > 0 ? st.tokens / wall : 0.0);
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
      // A best of fewer lrs than asked for says so.
      int lrs = 0, failed = 0;
      for (const CompareRun& x : runs)
        if (x.arch == r.arch && x.d_model == r.d_model && x.seq_len == r.seq_len) ++lrs, failed += !x.error.empty();
      const std::string note = failed > 0 ? detail::cat("  (", failed, " of ", lrs, " lrs failed)") : "";
      std::snprintf(buf, sizeof buf, "%-16s %7d %6d %9lld %7d %4d %8s %9.4f %9.1f%s\n", r.arch.c_str(), r.d_model,
                    r.n_layers, static_cast<long long>(r.params), r.seq_len, r.kv, fmt_lr(r.lr).c_str(), r.metric,
                    r.train_s, note.c_str());
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
