#include "train/trainer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <tuple>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "core/format.h"
#include "core/interrupt.h"
#include "core/rng.h"
#include "core/threads.h"
#include "data/corpus.h"
#include "io/atomic_file.h"
#include "io/hf_model.h"
#include "runtime/chat_template.h"
#include "io/json_read.h"
#include "model/memory_estimate.h"
#include "model/config.h"
#include "model/model.h"
#include "runtime/tokenizer.h"
#include "train/batch_grad.h"
#include "train/comm.h"
#include "train/device_run.h"
#include "train/layout.h"
#include "train/model_grad.h"
#include "train/optimizer.h"

namespace hm {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// Fixed so that `hm eval` and every training run see the same validation documents.
constexpr double kValidFraction = 0.05;
constexpr uint64_t kSplitSeed = 0x5EED5EEDull;
// Batch order has its own stream, so changing how init uses the seed never moves the data.
constexpr uint64_t kDataSeedSalt = 0xDA7A0F5E7ull;
constexpr const char* kStateFormat = "hm-train-state-1";

double elapsed_s(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string fmt_num(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return detail::cat(v);
}

// ---- data ----

std::vector<int32_t> token_stream(const Tokenizer& tok, const std::vector<std::string_view>& texts) {
  std::vector<int32_t> out;
  for (auto t : texts) {
    auto ids = tok.encode(t, false);
    out.insert(out.end(), ids.begin(), ids.end());
    out.push_back(tok.eos());  // documents stay distinguishable across the concatenation
  }
  return out;
}

struct Corpora {
  Corpus corpus;
  Split split;
};

Corpora load_split(const std::string& path) {
  HM_CHECK(!path.empty(), "no training data given (--data PATH)");
  Corpora c;
  c.corpus = load_corpus(path);
  c.split = split_documents(c.corpus, kValidFraction, kSplitSeed);
  return c;
}

// The mean cross-entropy of nb windows of len tokens (inputs, targets), every target counted.
using WindowLoss = std::function<double(const int32_t* in, const int32_t* tg, int nb, int len)>;

// Mean cross-entropy of the training forward over eval_windows. With data-parallel ranks (comm),
// rank r scores the window batches r, r + size, ... and the sums meet in an allreduce.
EvalResult eval_stream(const WindowLoss& mean_loss, const std::vector<int32_t>& stream, int L, int64_t max_tokens,
                       int B, Comm* comm = nullptr) {
  std::vector<int32_t> in, tg;
  int64_t batch_no = 0;
  double part = 0;  // this rank's windows' sum
  EvalResult r = eval_windows(stream, L, max_tokens, B, [&](int64_t pos, int nb, int len, double&) {
    if (comm && batch_no++ % comm->size() != comm->rank()) return;
    in.resize(size_t(nb) * len);
    tg.resize(size_t(nb) * len);
    for (int b = 0; b < nb; ++b) {
      std::copy_n(stream.begin() + pos + int64_t(b) * len, len, in.begin() + int64_t(b) * len);
      std::copy_n(stream.begin() + pos + int64_t(b) * len + 1, len, tg.begin() + int64_t(b) * len);
    }
    part += mean_loss(in.data(), tg.data(), nb, len) * double(nb) * len;
  });
  if (comm) comm->allreduce_sum(&part, 1);
  r.loss = part / double(r.tokens);
  r.ppl = std::exp(r.loss);
  return r;
}
EvalResult eval_stream(const Params& p, const std::vector<int32_t>& stream, int L, int64_t max_tokens, int B,
                       Comm* comm = nullptr) {
  return eval_stream([&](const int32_t* in, const int32_t* tg, int nb, int len) { return loss_only(p, in, tg, nb, len); },
                     stream, L, max_tokens, B, comm);
}

// Mean cross-entropy over eval_windows, the windows scored on the device.
EvalResult eval_stream(DeviceModel& dm, const std::vector<int32_t>& stream, int L, int64_t max_tokens, int B,
                       Comm* comm = nullptr) {
  return eval_stream([&](const int32_t* in, const int32_t* tg, int nb, int len) { return dm.mean_loss(in, tg, nb, len); },
                     stream, L, max_tokens, B, comm);
}

// The same windows scored by m's forward (its weights in their format); float32 KV as the
// training forward.
EvalResult eval_stream_model(HybridModel& m, const std::vector<int32_t>& stream, int L, int64_t max_tokens, int B) {
  const int V = m.config().vocab_size;
  HybridMemory mem(m.backend(), m.config(), B, L, KvType::F32);
  std::vector<float> logits;
  return eval_windows(stream, L, max_tokens, B, [&](int64_t pos, int nb, int len, double& nll) {
    forward_windows(m, mem, stream, pos, nb, len, logits);
    for (int64_t i = 0; i < int64_t(nb) * len; ++i) {
      const float* row = logits.data() + i * V;
      const double mx = *std::max_element(row, row + V);
      double z = 0;
      for (int v = 0; v < V; ++v) z += std::exp(double(row[v]) - mx);
      nll += mx + std::log(z) - double(row[stream[size_t(pos + i + 1)]]);
    }
  });
}

// ---- trainer state ----

json settings_json(const TrainConfig& c, int64_t warmup, int threads) {
  return {{"preset", c.preset},       {"config_file", c.config_file}, {"init_from", c.init_from},
          {"data_path", c.data_path},
          {"tokenizer", c.tokenizer}, {"vocab", c.vocab},             {"steps", c.steps},
          {"batch", c.batch},         {"seq_len", c.seq_len},         {"grad_accum", c.grad_accum},
          {"lr", c.lr},               {"min_lr_ratio", c.min_lr_ratio},
          {"weight_decay", c.weight_decay}, {"clip_norm", c.clip_norm}, {"warmup", warmup},
          {"seed", c.seed},           {"scan_chunk", c.scan_chunk},   {"eval_tokens", c.eval_tokens},
          {"threads", threads},       {"grad_ckpt", c.grad_ckpt}};
}

json settings_json_all(const TrainConfig& c, int64_t warmup, int threads) {
  json j = settings_json(c, warmup, threads);
  if (c.lr_steps != c.steps) j["lr_steps"] = c.lr_steps;  // a run extended past its schedule
  if (!c.task.name.empty()) {  // corpus runs keep exactly their old state
    j["task"] = task_to_json(c.task);
    j["task_eval"] = c.task_eval;
  }
  return j;
}

json rng_json(const Rng& r) {
  const Rng::State s = r.state();
  uint64_t spare_bits;
  std::memcpy(&spare_bits, &s.spare, sizeof spare_bits);  // exact, unlike a decimal double
  return {{"s", {s.s[0], s.s[1], s.s[2], s.s[3]}}, {"spare_bits", spare_bits}, {"has_spare", s.has_spare}};
}

Rng::State rng_from_json(const json& j) {
  Rng::State s{};
  for (int i = 0; i < 4; ++i) s.s[i] = j.at("s").at(size_t(i)).get<uint64_t>();
  const uint64_t bits = j.at("spare_bits").get<uint64_t>();
  std::memcpy(&s.spare, &bits, sizeof bits);
  s.has_spare = j.at("has_spare").get<bool>();
  return s;
}

// Reads trainer_state.json (parse_json_file: bounded size and depth) and checks the type and
// range of every field it holds before the readers below convert them with nlohmann's get: a
// wrong type then names file and field, and no huge number reaches a narrowing conversion
// (undefined for a double). A missing field is left to the reader that needs it (older states
// lack some).
json read_trainer_state(const fs::path& p) {
  const std::string file = p.string();
  const json st = parse_json_file(file);
  const JsonFields f(st, file);
  auto int_field = [](const JsonFields& o, const char* key, int64_t lo, int64_t hi) {
    if (o.has(key)) o.get_int(key, lo, hi);
  };
  if (f.has("format")) f.get_string("format");
  int_field(f, "step", 0, INT64_MAX);
  int_field(f, "tokens_seen", 0, INT64_MAX);
  int_field(f, "ranks", 1, INT32_MAX);
  if (f.has("rng")) {
    const JsonFields r = f.object("rng");
    const json& words = r.at("s");
    HM_CHECK(words.is_array() && words.size() == 4, file, ": field 'rng.s' must be a list of 4 integers");
    for (size_t i = 0; i < 4; ++i) json_to_uint64(words[i], file, detail::cat("rng.s[", i, "]"));
    r.get_uint64("spare_bits");
    r.get_bool("has_spare");
  }
  if (f.has("settings")) {
    const JsonFields s = f.object("settings");
    for (const char* key : {"preset", "config_file", "init_from", "data_path", "tokenizer"})
      if (s.has(key)) s.get_string(key);
    for (const char* key : {"vocab", "scan_chunk", "threads"}) int_field(s, key, 0, INT32_MAX);
    for (const char* key : {"batch", "seq_len", "grad_accum"}) int_field(s, key, 1, INT32_MAX);
    for (const char* key : {"steps", "eval_tokens", "lr_steps", "task_eval"}) int_field(s, key, 0, INT64_MAX);
    int_field(s, "warmup", INT64_MIN, INT64_MAX);
    if (s.has("seed")) s.get_uint64("seed");
    for (const char* key : {"lr", "min_lr_ratio", "weight_decay", "clip_norm"})
      if (s.has(key)) s.get_float(key);
    if (s.has("grad_ckpt")) s.get_bool("grad_ckpt");
    if (s.has("task")) {
      const JsonFields t = s.object("task");
      if (t.has("name")) t.get_string("name");
      for (const char* key : {"vocab", "seq_len", "kv"}) int_field(t, key, 0, INT32_MAX);
    }
  }
  return st;
}

// ---- checkpoint directory ----

void fsync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

// A fallback swap (below) that crashed between its two renames leaves only checkpoint.old.
void recover_checkpoint(const fs::path& out) {
  const fs::path ck = out / "checkpoint", old = out / "checkpoint.old";
  if (!fs::exists(ck) && fs::exists(old)) fs::rename(old, ck);
  else if (fs::exists(ck) && fs::exists(old)) fs::remove_all(old);
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(out, ec))
    if (e.path().filename().string().rfind("ckpt.tmp-", 0) == 0) fs::remove_all(e.path(), ec);
}

void swap_in(const fs::path& tmp, const fs::path& out) {
  const fs::path ck = out / "checkpoint", old = out / "checkpoint.old";
  if (!fs::exists(ck)) {
    fs::rename(tmp, ck);
  } else if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, ck.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(tmp);  // now holds the previous checkpoint
  } else {
    const int err = errno;
    HM_CHECK(err == EINVAL || err == ENOSYS || err == EOPNOTSUPP, "checkpoint: cannot replace ",
             ck.string(), ": ", std::strerror(err));
    fs::rename(ck, old);
    fs::rename(tmp, ck);
    fs::remove_all(old);
  }
  fsync_dir(out);
}

bool all_finite(const Params& p) {
  const float* d = p.data();
  for (int64_t i = 0; i < p.numel(); ++i)
    if (!std::isfinite(d[i])) return false;
  return true;
}

// ---- log ----

struct Row {
  int64_t step = 0;
  double lr = 0, loss = 0, norm = 0, tps = 0;
  double val_loss = std::numeric_limits<double>::quiet_NaN(), val_ppl = val_loss;
};

std::string csv_text(const std::vector<Row>& rows) {
  std::string s = "step,lr,train_loss,grad_norm,tokens_per_s,val_loss,val_ppl\n";
  char buf[256];
  for (const Row& r : rows) {
    std::snprintf(buf, sizeof buf, "%lld,%.6g,%.6f,%.6g,%.1f,", static_cast<long long>(r.step), r.lr,
                  r.loss, r.norm, r.tps);
    s += buf;
    if (std::isfinite(r.val_loss)) {
      std::snprintf(buf, sizeof buf, "%.6f,%.6g", r.val_loss, r.val_ppl);
      s += buf;
    } else {
      s += ",";
    }
    s += "\n";
  }
  return s;
}

// Rows of an earlier run's CSV up to and including step `upto` (later rows belong to steps the
// resumed run will redo).
std::vector<Row> read_csv(const fs::path& p, int64_t upto) {
  std::vector<Row> rows;
  std::ifstream f(p);
  std::string line;
  if (!f.good() || !std::getline(f, line)) return rows;
  while (std::getline(f, line)) {
    std::vector<std::string> cells;
    std::stringstream ss(line);
    std::string cell;
    while (std::getline(ss, cell, ',')) cells.push_back(cell);
    if (cells.size() < 5) continue;
    auto num = [](const std::string& x) {
      return x.empty() ? std::numeric_limits<double>::quiet_NaN() : std::strtod(x.c_str(), nullptr);
    };
    Row r;
    r.step = std::strtoll(cells[0].c_str(), nullptr, 10);
    if (r.step > upto) break;
    r.lr = num(cells[1]);
    r.loss = num(cells[2]);
    r.norm = num(cells[3]);
    r.tps = num(cells[4]);
    if (cells.size() > 5) r.val_loss = num(cells[5]);
    if (cells.size() > 6) r.val_ppl = num(cells[6]);
    rows.push_back(r);
  }
  return rows;
}

// A plain line chart: axes with 5 ticks each, train loss as one polyline, validation loss as a
// second with dots. Hand-written so the engine needs no plotting library.
std::string svg_text(const std::vector<Row>& rows, int64_t total_steps) {
  const double W = 720, H = 420, ml = 70, mr = 20, mt = 40, mb = 55;
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const Row& r : rows)
    for (double v : {r.loss, r.val_loss})
      if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  if (!std::isfinite(lo)) lo = 0, hi = 1;
  if (hi - lo < 1e-9) lo -= 0.5, hi += 0.5;
  const double pad = 0.05 * (hi - lo);
  lo -= pad;
  hi += pad;
  const double xmax = double(std::max<int64_t>(1, total_steps));
  auto X = [&](double s) { return ml + (W - ml - mr) * s / xmax; };
  auto Y = [&](double v) { return H - mb - (H - mt - mb) * (v - lo) / (hi - lo); };
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(1);
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" viewBox=\"0 0 " << W << ' ' << H << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << W / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Training loss</text>\n"
    << "<line x1=\"" << ml << "\" y1=\"" << H - mb << "\" x2=\"" << W - mr << "\" y2=\"" << H - mb
    << "\" stroke=\"black\"/>\n"
    << "<line x1=\"" << ml << "\" y1=\"" << mt << "\" x2=\"" << ml << "\" y2=\"" << H - mb
    << "\" stroke=\"black\"/>\n";
  char lab[64];
  for (int i = 0; i <= 4; ++i) {
    const double s = xmax * i / 4, v = lo + (hi - lo) * i / 4;
    std::snprintf(lab, sizeof lab, "%lld", static_cast<long long>(std::llround(s)));
    o << "<line x1=\"" << X(s) << "\" y1=\"" << H - mb << "\" x2=\"" << X(s) << "\" y2=\"" << H - mb + 5
      << "\" stroke=\"black\"/><text x=\"" << X(s) << "\" y=\"" << H - mb + 18
      << "\" text-anchor=\"middle\">" << lab << "</text>\n";
    std::snprintf(lab, sizeof lab, "%.3g", v);
    o << "<line x1=\"" << ml - 5 << "\" y1=\"" << Y(v) << "\" x2=\"" << ml << "\" y2=\"" << Y(v)
      << "\" stroke=\"black\"/><text x=\"" << ml - 8 << "\" y=\"" << Y(v) + 4
      << "\" text-anchor=\"end\">" << lab << "</text>\n";
  }
  o << "<text x=\"" << (ml + W - mr) / 2 << "\" y=\"" << H - 12 << "\" text-anchor=\"middle\">step</text>\n"
    << "<text x=\"16\" y=\"" << (mt + H - mb) / 2 << "\" text-anchor=\"middle\" transform=\"rotate(-90 16 "
    << (mt + H - mb) / 2 << ")\">loss (nats/token)</text>\n";
  auto polyline = [&](bool val, const char* color) {
    std::ostringstream pts;
    pts.setf(std::ios::fixed);
    pts.precision(1);
    int n = 0;
    for (const Row& r : rows) {
      const double v = val ? r.val_loss : r.loss;
      if (!std::isfinite(v)) continue;
      pts << (n++ ? " " : "") << X(double(r.step)) << ',' << Y(v);
      if (val)
        o << "<circle cx=\"" << X(double(r.step)) << "\" cy=\"" << Y(v) << "\" r=\"3\" fill=\"" << color
          << "\"/>\n";
    }
    if (n > 0)
      o << "<polyline fill=\"none\" stroke=\"" << color << "\" stroke-width=\"1.5\" points=\""
        << pts.str() << "\"/>\n";
  };
  polyline(false, "#1f77b4");
  polyline(true, "#ff7f0e");
  o << "<line x1=\"" << W - 170 << "\" y1=\"" << mt + 10 << "\" x2=\"" << W - 145 << "\" y2=\"" << mt + 10
    << "\" stroke=\"#1f77b4\" stroke-width=\"2\"/><text x=\"" << W - 140 << "\" y=\"" << mt + 14
    << "\">train loss</text>\n"
    << "<line x1=\"" << W - 170 << "\" y1=\"" << mt + 28 << "\" x2=\"" << W - 145 << "\" y2=\"" << mt + 28
    << "\" stroke=\"#ff7f0e\" stroke-width=\"2\"/><text x=\"" << W - 140 << "\" y=\"" << mt + 32
    << "\">validation loss</text>\n</svg>\n";
  return o.str();
}

void write_logs(const fs::path& out, const std::vector<Row>& rows, int64_t steps) {
  write_file_atomic((out / "train_log.csv").string(), csv_text(rows));
  write_file_atomic((out / "loss.svg").string(), svg_text(rows, steps));
}

void check_settings(const TrainConfig& c) {
  HM_CHECK(!c.out_dir.empty(), "no output directory given (--out DIR)");
  HM_CHECK(c.steps >= 1, "--steps must be >= 1 (got ", c.steps, ")");
  HM_CHECK(c.batch >= 1, "--batch must be >= 1 (got ", c.batch, ")");
  HM_CHECK(c.seq_len >= 1, "--seq-len must be >= 1 (got ", c.seq_len, ")");
  HM_CHECK(c.grad_accum >= 1, "--grad-accum must be >= 1 (got ", c.grad_accum, ")");
  HM_CHECK(std::isfinite(c.dist_timeout_s) && c.dist_timeout_s >= 0, "--dist-timeout must be >= 0 seconds (got ",
           c.dist_timeout_s, ")");
  HM_CHECK(std::isfinite(c.bucket_mb) && c.bucket_mb > 0 && c.bucket_mb <= 1e6, "--bucket-mb must be in (0, 1e6] (got ",
           c.bucket_mb, ")");
  HM_CHECK(std::isfinite(c.lr) && c.lr > 0, "--lr must be a positive number (got ", c.lr, ")");
  HM_CHECK(c.min_lr_ratio >= 0 && c.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]");
  HM_CHECK(c.lr_steps >= 1 && c.lr_steps <= c.steps, "lr schedule length ", c.lr_steps, " not in [1, ", c.steps, "]");
  HM_CHECK(c.warmup <= c.lr_steps, "--warmup (", c.warmup, ") exceeds --steps (", c.lr_steps, ")");
  HM_CHECK(c.tokenizer == "byte" || c.tokenizer == "bpe", "--tokenizer must be byte or bpe (got '",
           c.tokenizer, "')");
  HM_CHECK(c.tokenizer != "bpe" || c.vocab > 260, "--vocab must exceed 260 for BPE (got ", c.vocab, ")");
  HM_CHECK(c.eval_every >= 0 && c.save_every >= 0 && c.stop_after >= 0 && c.eval_tokens >= 0,
           "--eval-every, --save-every, --stop-after and eval tokens must be >= 0");
  HM_CHECK(c.scan_chunk >= 0, "scan_chunk must be >= 0");
}

bool was_given(const TrainConfig& c, const char* flag) {
  return std::find(c.given_flags.begin(), c.given_flags.end(), flag) != c.given_flags.end();
}

// A resume takes these settings from the checkpoint: name each one the command line gave.
void report_ignored(const TrainConfig& given, const TrainConfig& run, const std::function<void(const std::string&)>& say) {
  auto str = [](const auto& v) {
    const std::string s = detail::cat(v);
    return s.empty() ? std::string("(none)") : s;
  };
  const std::pair<const char*, std::pair<std::string, std::string>> table[] = {
      {"--preset", {str(given.preset), str(run.preset)}},
      {"--config", {str(given.config_file), str(run.config_file)}},
      {"--init-from", {str(given.init_from), str(run.init_from)}},
      {"--tokenizer", {str(given.tokenizer), str(run.tokenizer)}},
      {"--vocab", {str(given.vocab), str(run.vocab)}},
      {"--batch", {str(given.batch), str(run.batch)}},
      {"--seq-len", {str(given.seq_len), str(run.seq_len)}},
      {"--grad-accum", {str(given.grad_accum), str(run.grad_accum)}},
      {"--lr", {str(given.lr), str(run.lr)}},
      {"--warmup", {str(given.warmup), str(run.warmup)}},
      {"--seed", {str(given.seed), str(run.seed)}},
      {"--eval-tokens", {str(given.eval_tokens), str(run.eval_tokens)}},
      {"--task", {str(given.task.name), str(run.task.name)}},
      {"--task-vocab", {str(given.task.vocab), str(run.task.vocab)}},
      {"--kv", {str(given.task.kv), str(run.task.kv)}},
      {"--task-eval", {str(given.task_eval), str(run.task_eval)}},
  };
  for (const auto& [flag, v] : table)
    if (was_given(given, flag))
      say(detail::cat("note: --resume ignores ", flag, " ", v.first, " and keeps the run's ", v.second));
}

}  // namespace

// ---- train ----

void train(const TrainConfig& given) {
  TrainConfig c = given;
  const fs::path out = c.out_dir.empty() ? fs::path() : fs::path(c.out_dir);
  const fs::path ck = out / "checkpoint";
  // Data parallelism (trainer.h): rank 0 alone writes and prints.
  Comm* const comm = c.comm && c.comm->size() > 1 ? c.comm : nullptr;
  const int n_ranks = comm ? comm->size() : 1, rank = comm ? comm->rank() : 0;
  const bool writer = rank == 0;
  if (!writer) c.progress = false;
  auto say = [&](const std::string& s) {
    if (c.progress) std::fprintf(stderr, "%s\n", s.c_str());
  };
  // The ranks' command lines first, before any rank reads or writes: a rank started with other
  // flags would otherwise wait in a collective the others never reach.
  if (comm) {
    json g = settings_json_all(given, given.warmup, 0);
    g["out_dir"] = given.out_dir;
    g["resume"] = given.resume;
    g["stop_after"] = given.stop_after;
    g["save_every"] = given.save_every;
    g["eval_every"] = given.eval_every;
    g["device"] = device_name(given.device);
    g["compute"] = compute_dtype_name(given.compute);
    const std::string text = g.dump();
    check_same_on_ranks(comm, bytes_hash(text.data(), text.size()), "hm train settings (its flags)");
  }

  // Settings. On resume the saved ones govern everything that shapes the math; the command
  // line still picks threads (default: the saved count), logging and checkpoint cadence.
  json state;
  int64_t start = 0;
  int saved_threads = 0;
  if (c.resume) {
    HM_CHECK(!c.out_dir.empty(), "no output directory given (--out DIR)");
    if (writer && fs::exists(out)) recover_checkpoint(out);
    if (comm) comm->barrier();  // the others read what rank 0 recovered
    HM_CHECK(fs::exists(ck / "trainer_state.json"), "--resume: no checkpoint in ", out.string(),
             " (expected ", (ck / "trainer_state.json").string(), ")");
    state = read_trainer_state(ck / "trainer_state.json");
    try {
      HM_CHECK(state.at("format").get<std::string>() == kStateFormat, (ck / "trainer_state.json").string(),
               ": unknown format");
      const json& s = state.at("settings");
      c.preset = s.at("preset");
      c.config_file = s.at("config_file");
      c.init_from = s.value("init_from", std::string());  // absent in runs from before stop 29
      const std::string saved_data = s.at("data_path");
      if (c.data_path.empty()) c.data_path = saved_data;
      else if (fs::absolute(c.data_path).lexically_normal().string() != saved_data)
        say("note: --data differs from the run's " + saved_data + "; batches will differ");
      c.tokenizer = s.at("tokenizer");
      c.vocab = s.at("vocab");
      c.steps = s.at("steps");
      c.batch = s.at("batch");
      c.seq_len = s.at("seq_len");
      c.grad_accum = s.at("grad_accum");
      c.lr = s.at("lr");
      c.min_lr_ratio = s.at("min_lr_ratio");
      c.weight_decay = s.at("weight_decay");
      c.clip_norm = s.at("clip_norm");
      c.warmup = s.at("warmup");
      c.seed = s.at("seed");
      c.scan_chunk = s.at("scan_chunk");
      // Memory and time only, never the result: --grad-ckpt may also turn it on at a resume.
      // Older states predate the setting.
      c.grad_ckpt = c.grad_ckpt || s.value("grad_ckpt", false);
      c.eval_tokens = s.at("eval_tokens");
      c.task = s.contains("task") ? task_from_json(s.at("task")) : TaskSpec{};
      c.task_eval = s.value("task_eval", c.task_eval);
      saved_threads = s.at("threads");
      start = state.at("step");
    } catch (const json::exception& e) {
      throw Error(detail::cat((ck / "trainer_state.json").string(), ": ", e.what()));
    }
  }
  if (c.resume) {
    report_ignored(given, c, say);
    try {
      c.lr_steps = state.at("settings").value("lr_steps", c.steps);
    } catch (const json::exception& e) {
      throw Error(detail::cat((ck / "trainer_state.json").string(), ": ", e.what()));
    }
    // --steps on a resume says where to go: past the run's end extends it, short of it stops there.
    if (was_given(given, "--steps") && given.steps != c.steps) {
      HM_CHECK(given.steps >= start, "--steps ", given.steps, ": the checkpoint in ", ck.string(),
               " is already at step ", start, "; give --steps ", start, " or more");
      if (given.steps > c.steps) {
        say(detail::cat("note: --steps ", given.steps, " continues the run to step ", given.steps, " (it was planned for ",
                        c.steps, "); its lr schedule ends at step ", c.lr_steps, ", after which the lr stays at ",
                        c.lr * c.min_lr_ratio));
        c.steps = given.steps;
      } else {
        say(detail::cat("note: --steps ", given.steps, " stops the run there, short of its ", c.steps,
                        " steps; resume again without --steps to finish it"));
        c.stop_after = c.stop_after > 0 ? std::min(c.stop_after, given.steps) : given.steps;
      }
    } else if (start == c.steps) {
      say(detail::cat("note: the run already finished at step ", start, "; give --steps N to continue it to step N"));
    }
  }
  if (c.lr_steps <= 0) c.lr_steps = c.steps;
  const bool task_mode = !c.task.name.empty();
  if (task_mode) {
    HM_CHECK(c.data_path.empty(), "--data and --task exclude each other: train on a corpus or on a task");
    c.task.seq_len = c.seq_len;
    c.task = resolve_task(c.task);
    validate_task(c.task);
    HM_CHECK(c.task_eval >= 0, "task evaluation examples must be >= 0 (got ", c.task_eval, ")");
  }
  // Stored absolute, so a resume from another working directory finds the same text.
  if (!c.data_path.empty()) c.data_path = fs::absolute(c.data_path).lexically_normal().string();
  if (c.warmup < 0) c.warmup = std::min<int64_t>(100, c.lr_steps / 10);
  check_settings(c);
  if (c.resume) {
    HM_CHECK(start <= c.steps, "checkpoint step ", start, " is past the run's ", c.steps, " steps");
    if (c.threads <= 0 && saved_threads > 0) c.threads = saved_threads;
  } else {
    HM_CHECK(!fs::exists(ck) && !fs::exists(out / "checkpoint.old"), out.string(),
             " already holds a checkpoint: pass --resume to continue it, or choose another --out");
  }
  // Ranks on one machine share its cores.
  if (c.threads <= 0 && comm && comm->local_size() > 1)
    c.threads = std::max(1, num_threads() / comm->local_size());
  if (c.threads > 0) set_num_threads(c.threads);
  const int threads = num_threads();
  HM_CHECK(c.batch >= n_ranks, "--batch ", c.batch, " across ", n_ranks, " ranks: each rank computes a part of the "
           "global batch and needs at least one sequence; give --batch ", n_ranks, " or more");
  if (c.resume && saved_threads > 0 && threads != saved_threads)
    say(detail::cat("note: ", threads, " threads instead of the run's ", saved_threads,
                    "; the result will not be bit-identical to an uninterrupted run"));
  if (c.resume && state.value("ranks", 1) != n_ranks)
    say(detail::cat("note: ", n_ranks, " data-parallel rank", n_ranks > 1 ? "s" : "", " instead of the run's ",
                    state.value("ranks", 1), "; the global batch is the same, the sums differ by rounding"));

  // Model config before data, so a bad preset fails fast.
  const bool init = !c.init_from.empty() && !c.resume;
  for (const char* flag : {"--preset", "--config", "--tokenizer", "--vocab"})
    HM_CHECK(!init || !was_given(c, flag), "--init-from ", c.init_from, " gives the model and its tokenizer: ", flag,
             " does not apply");
  HM_CHECK(!init || !task_mode, "--init-from fine-tunes a text model; --task trains on task ids");
  ModelConfig mc = c.resume ? load_config((ck / "config.json").string())
                 : init     ? load_any_config(c.init_from)
                 : c.config_file.empty() ? preset(c.preset)
                                         : load_config(c.config_file);
  const std::string no = training_unsupported(mc);
  HM_CHECK(no.empty(), "train: the model cannot be trained yet: ", no, " (inference only: hm generate, hm bench)");

  // Data: every check on it happens before anything is written. A task needs none of it.
  Corpora data;
  std::vector<std::string_view> train_txt, valid_txt;
  if (!task_mode) {
    data = load_split(c.data_path);
    train_txt = train_texts(data.corpus, data.split);
    valid_txt = valid_texts(data.corpus, data.split);
  }
  std::unique_ptr<Tokenizer> tok;
  if (task_mode) {
    // No tokenizer: task tokens are ids.
  } else if (c.resume) {
    tok = load_tokenizer(ck.string());
  } else if (init) {
    tok = load_tokenizer(c.init_from);
  } else if (c.tokenizer == "byte") {
    tok = std::make_unique<ByteTokenizer>();
  } else {
    // Trained on the training side only, so validation text stays unseen.
    const fs::path tdir = out / "tokenizer";
    if (writer) {
      std::vector<std::string> texts(train_txt.begin(), train_txt.end());
      say(detail::cat("training a ", c.vocab, "-token BPE tokenizer on ", texts.size(), " documents"));
      train_sentencepiece_bpe(texts, c.vocab, tdir.string());
    }
    if (comm) comm->barrier();  // the other ranks load rank 0's (out_dir is shared)
    tok = std::make_unique<SentencePieceTokenizer>((tdir / "tokenizer.model").string());
  }
  const std::vector<int32_t> train_tok = tok ? token_stream(*tok, train_txt) : std::vector<int32_t>();
  const std::vector<int32_t> valid_tok = tok ? token_stream(*tok, valid_txt) : std::vector<int32_t>();
  const int L = c.seq_len;
  HM_CHECK(task_mode || int64_t(train_tok.size()) >= int64_t(L) + 1, "training data ", c.data_path,
           ": the training split holds ", train_tok.size(), " tokens, fewer than one sequence of --seq-len ", L,
           " + 1; give more text or a shorter --seq-len");
  HM_CHECK(task_mode || valid_tok.size() >= 2, "training data ", c.data_path, ": the validation split holds ",
           valid_tok.size(), " tokens; give more text");
  if (comm) {
    const uint64_t h = bytes_hash(valid_tok.data(), valid_tok.size() * sizeof(int32_t),
                                  bytes_hash(train_tok.data(), train_tok.size() * sizeof(int32_t)));
    check_same_on_ranks(comm, h, detail::cat("training data (", c.data_path, ", tokenized)"));
  }

  if (task_mode) {
    if (mc.vocab_size != c.task.vocab) {
      HM_CHECK(!c.resume, ck.string(), ": config vocab_size ", mc.vocab_size, " differs from the task's ",
               c.task.vocab);
      say(detail::cat("model vocab_size ", mc.vocab_size, " -> ", c.task.vocab, " (task ", c.task.name, ")"));
      mc.vocab_size = c.task.vocab;
    }
  } else if (init || (c.resume && !c.init_from.empty())) {
    // The weights fix the vocabulary; a tokenizer may use fewer ids (published models pad it).
    HM_CHECK(tok->vocab_size() <= mc.vocab_size, c.init_from, ": the tokenizer has ", tok->vocab_size(),
             " ids, more than the model's vocab_size ", mc.vocab_size);
  } else if (mc.vocab_size != tok->vocab_size()) {
    if (c.resume) {
      HM_CHECK(false, ck.string(), ": config vocab_size ", mc.vocab_size, " differs from the tokenizer's ",
               tok->vocab_size());
    }
    say(detail::cat("model vocab_size ", mc.vocab_size, " -> ", tok->vocab_size(), " (the ", tok->type(),
                    " tokenizer's)"));
    mc.vocab_size = tok->vocab_size();
  }
  validate(mc);

  const bool on_device = c.device != Device::CPU || c.device_path_on_cpu;
  HM_CHECK(on_device || c.compute == DType::F32, "training computes in ", compute_dtype_name(c.compute),
           " on --device cuda only; the CPU trains in f32");
  HM_CHECK(c.compute != DType::F16, "training in f16 needs loss scaling, which is not implemented (its gradients "
           "underflow); use --dtype bf16");
  HM_CHECK(!on_device || c.scan_chunk == 0, "--scan-chunk applies to the CPU's scan; on CUDA the scan keeps one "
           "state per 64-token chunk and recomputes the rest");
  if (!on_device) {  // Everything the run allocates, before it does (--max-memory, MemAvailable).
    RunShape shape;
    shape.train_batch = c.batch, shape.seq_len = L, shape.threads = threads;
    shape.scan_chunk = c.scan_chunk, shape.grad_ckpt = c.grad_ckpt;
    check_memory(estimate_memory(mc, shape), "hm train");
  }
  auto be = make_cpu_backend();
  HybridModel model(mc, *be);
  Params& P = model.params();
  AdamWConfig oc;
  oc.lr = c.lr;
  oc.weight_decay = c.weight_decay;
  oc.clip_norm = c.clip_norm;
  AdamW opt(P, oc);
  Rng rng(c.seed ^ kDataSeedSalt);
  int64_t tokens_seen = 0;
  std::vector<Row> rows;
  if (c.resume) {
    load_params(P, (ck / "model.safetensors").string());
    opt.load((ck / "optimizer.safetensors").string());
    HM_CHECK(opt.steps() == start, ck.string(), ": optimizer step ", opt.steps(), " != trainer step ", start);
    try {
      rng.set_state(rng_from_json(state.at("rng")));
      tokens_seen = state.at("tokens_seen");
    } catch (const json::exception& e) {
      throw Error(detail::cat((ck / "trainer_state.json").string(), ": ", e.what()));
    }
    rows = read_csv(out / "train_log.csv", start);
  } else if (init) {
    if (is_hf_model_dir(c.init_from))
      load_hf_params(P, c.init_from);
    else
      load_params(P, (fs::path(c.init_from) / "model.safetensors").string());
  } else {
    init_params(P, c.seed);
  }
  if (writer) {
    fs::create_directories(out);
    recover_checkpoint(out);
  }
  // Every rank starts from the same weights and optimizer state (same seed, or the same files).
  auto state_hash = [&] {  // tensor by tensor: the padding between them is not state
    uint64_t h = bytes_hash(nullptr, 0);
    for (const Params* q : {&P, &opt.m(), &opt.v()})
      for (size_t k = 0; k < q->specs().size(); ++k)
        h = bytes_hash(q->at(k), size_t(q->specs()[k].numel()) * sizeof(float), h);
    return h;
  };
  check_same_on_ranks(comm, state_hash(), c.resume ? "checkpoint (weights and optimizer state)" : "initial weights");
  std::optional<Params> grads;  // the CPU path's (a device keeps its own)
  if (!on_device) grads.emplace(mc);
  std::unique_ptr<DeviceRun> dev;
  if (on_device) dev = std::make_unique<DeviceRun>(c.device, c.compute, c.grad_ckpt, P, opt);

  say(detail::cat(c.resume ? "resuming" : "training", " ", count_params(mc), " parameters (",
                  !c.init_from.empty() ? "from " + c.init_from : c.config_file.empty() ? c.preset : c.config_file,
                  "), ",
                  task_mode ? detail::cat("task ", c.task.name, " (vocab ", c.task.vocab, ", kv ", c.task.kv, ")")
                            : detail::cat(tok->type(), " tokenizer, ", train_tok.size(), " train / ",
                                          valid_tok.size(), " validation tokens"),
                  "; ", c.steps,
                  " steps of ", c.batch, "x", L, c.grad_accum > 1 ? detail::cat(" x", c.grad_accum) : "",
                  " tokens, lr ", c.lr, ", ",
                  on_device ? detail::cat(device_name(c.device), " (", compute_dtype_name(c.compute), ")")
                            : detail::cat(threads, " threads"),
                  comm ? detail::cat(" on each of ", n_ranks, " ranks") : "",
                  c.resume ? detail::cat(", from step ", start) : ""));

  int64_t last_ckpt = c.resume ? start : -1;
  auto checkpoint = [&](int64_t step) {  // on a device: after dev->to_host
    // Every rank took the same steps: check that its weights are rank 0's, then rank 0 saves them.
    check_same_on_ranks(comm, state_hash(), detail::cat("weights and optimizer state after step ", step));
    last_ckpt = step;
    if (!writer) return;
    const fs::path tmp = out / detail::cat("ckpt.tmp-", ::getpid(), "-", step);
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    save_model(model, tmp.string());
    if (tok) tok->save(tmp.string());
    // A fine-tuned model keeps its chat template (hm chat, hm serve): from the folder it started
    // from, or, once that has been saved, from the checkpoint this one replaces.
    if (!c.init_from.empty()) copy_chat_template_files(fs::exists(ck / "config.json") ? ck.string() : c.init_from,
                                                       tmp.string());
    opt.save((tmp / "optimizer.safetensors").string());
    json st = {{"format", kStateFormat},
               {"step", step},
               {"tokens_seen", tokens_seen},
               {"rng", rng_json(rng)},
               {"settings", settings_json_all(c, c.warmup, threads)},
               {"ranks", n_ranks}};
    write_file_atomic((tmp / "trainer_state.json").string(), st.dump(2) + "\n");
    fsync_dir(tmp);
    swap_in(tmp, out);
  };

  const bool tty = ::isatty(2) == 1;
  const int64_t print_every = std::max<int64_t>(1, c.steps / 20);
  auto clear_line = [&] {
    if (c.progress && tty) std::fprintf(stderr, "\r%*s\r", 100, "");
  };
  auto fail = [&](int64_t step, const std::string& what) {
    clear_line();
    if (writer) write_logs(out, rows, c.steps);
    throw Error(detail::cat(
        "step ", step, ": ", what, "; training stopped (lower --lr?). ",
        last_ckpt >= 0 ? detail::cat("The last good checkpoint, step ", last_ckpt, ", is in ", ck.string())
                       : std::string("No checkpoint had been written yet")));
  };

  std::vector<int32_t> in(size_t(c.batch) * L), tg(size_t(c.batch) * L);
  const uint64_t n_pos = task_mode ? 0 : uint64_t(train_tok.size()) - uint64_t(L);  // window starts 0..n_pos-1
  const float min_lr = c.lr * c.min_lr_ratio;
  double train_time = 0;
  double comm_time = 0;  // with ranks: summing after the backward (host path: all of the summing)
  int64_t timed_steps = 0, timed_tokens = 0;
  const int64_t end = c.stop_after > 0 ? std::min(c.steps, c.stop_after) : c.steps;
  const int64_t bucket_floats = std::max<int64_t>(1, int64_t(c.bucket_mb * double(1 << 20) / sizeof(float)));
  // This rank's sequences of every global micro-batch.
  const int seq_lo = int(int64_t(c.batch) * rank / n_ranks), seq_hi = int(int64_t(c.batch) * (rank + 1) / n_ranks);
  if (comm)
    say(detail::cat("data parallel: ", n_ranks, " ranks of ", c.batch / n_ranks,
                    c.batch % n_ranks ? detail::cat("-", c.batch / n_ranks + 1) : std::string(),
                    " sequences per micro-batch; gradients summed in ", (P.numel() + bucket_floats - 1) / bucket_floats,
                    " buckets of up to ", c.bucket_mb, " MiB", dev ? ", each as the backward finishes it" : ""));
  auto counted = [&](int lo, int hi) {
    int64_t n = 0;
    for (int64_t i = int64_t(lo) * L; i < int64_t(hi) * L; ++i) n += tg[size_t(i)] >= 0;
    return n;
  };
  std::optional<Watchdog> watchdog;
  if (comm) watchdog.emplace(*comm, c.dist_timeout_s);
  for (int64_t step = start; step < end; ++step) {
    if (watchdog) watchdog->beat(detail::cat("step ", step + 1));
    const auto t0 = Clock::now();
    if (dev)
      dev->zero_grads();
    else
      zero(*grads);
    double loss = 0;
    // With ranks the gradients are summed in buckets; on a device, while the last micro-batch's
    // backward still runs (the buckets it has finished).
    std::optional<GradReducer> reduce;
    if (comm)
      reduce.emplace(*comm, dev ? &dev->be : nullptr, dev ? dev->g.f32() : grads->data(), P.numel(), bucket_floats);
    for (int a = 0; a < c.grad_accum; ++a) {
      if (task_mode) {
        const uint64_t first = (uint64_t(step) * uint64_t(c.grad_accum) + uint64_t(a)) * uint64_t(c.batch);
        task_examples(c.task, TaskSplit::Train, c.seed, first, c.batch, in.data(), tg.data());
      } else {
        for (int b = 0; b < c.batch; ++b) {
          const size_t p = size_t(rng.next_u64() % n_pos);
          std::copy_n(train_tok.begin() + int64_t(p), L, in.begin() + int64_t(b) * L);
          std::copy_n(train_tok.begin() + int64_t(p) + 1, L, tg.begin() + int64_t(b) * L);
        }
      }
      // This rank's part of the micro-batch's mean: its counted targets over the whole batch's
      // (every target of the whole batch when alone).
      const int64_t whole = counted(0, c.batch);
      const int64_t off = int64_t(seq_lo) * L;
      if (dev) {  // each micro-batch's gradient already scaled by 1 / grad_accum
        const int64_t mine = comm ? counted(seq_lo, seq_hi) : whole;
        const double share = whole > 0 ? double(mine) / double(whole) : 0.0;
        if (reduce && a + 1 == c.grad_accum)
          dev->bg->set_grads_done([&](int64_t b, int64_t e) { reduce->done(b, e); });
        if (mine > 0)
          loss += share * dev->bg->loss_and_grad(dev->g.f32(), in.data() + off, tg.data() + off, seq_hi - seq_lo, L,
                                                 share / c.grad_accum);
        dev->bg->set_grads_done(nullptr);
      } else {
        loss += loss_and_grad(P, *grads, in.data() + off, tg.data() + off, seq_hi - seq_lo, L, c.scan_chunk,
                              c.grad_ckpt, nullptr, comm ? whole : 0);
      }
    }
    if (comm) {  // the sum of the ranks' parts: the whole batch's gradient and loss, on every rank
      const auto tc = Clock::now();
      reduce->finish();
      comm->allreduce_sum(&loss, 1);
      comm_time += elapsed_s(tc);
    }
    if (dev) {
      loss /= c.grad_accum;
    } else if (c.grad_accum > 1) {
      // Micro-batches are equal-sized, so the mean of their mean losses is the batch mean.
      loss /= c.grad_accum;
      const float s = 1.0f / float(c.grad_accum);
      float* g = grads->data();
      for (int64_t i = 0; i < grads->numel(); ++i) g[i] *= s;
    }
    if (step + 1 == c.debug_nan_step) loss = std::numeric_limits<double>::quiet_NaN();
    if (!std::isfinite(loss)) fail(step + 1, "training loss is " + fmt_num(loss));
    const float lr = lr_at(step, c.warmup, c.lr_steps, c.lr, min_lr);
    const double norm = dev ? dev->step(opt, lr) : opt.step(P, *grads, lr);
    if (!std::isfinite(norm)) fail(step + 1, "gradient norm is " + fmt_num(norm));
    const int64_t done = step + 1;
    const int64_t step_tokens = int64_t(c.batch) * L * c.grad_accum;
    tokens_seen += step_tokens;
    const double dt = elapsed_s(t0);
    train_time += dt;
    ++timed_steps;
    timed_tokens += step_tokens;
    Row r;
    r.step = done;
    r.lr = lr;
    r.loss = loss;
    r.norm = norm;
    r.tps = dt > 0 ? double(step_tokens) / dt : 0;
    const bool last = done == end;
    if (task_mode && c.task_eval > 0 && ((c.eval_every > 0 && done % c.eval_every == 0) || last)) {
      if (dev) dev->to_host(P, nullptr);
      const TaskScore sc = score_task(model, c.task, c.task_eval);
      r.val_loss = sc.loss;
      r.val_ppl = std::exp(sc.loss);
      clear_line();
      if (c.progress)
        std::fprintf(stderr, "step %lld: test loss %.4f, accuracy %.4f (%lld scored positions of %lld examples)\n",
                     static_cast<long long>(done), sc.loss, sc.accuracy, static_cast<long long>(sc.scored),
                     static_cast<long long>(sc.examples));
    } else if (!task_mode && ((c.eval_every > 0 && done % c.eval_every == 0) || last)) {
      const EvalResult e =
          dev ? eval_stream(*dev, valid_tok, L, c.eval_tokens, c.batch, comm)
              : eval_stream(P, valid_tok, L, c.eval_tokens, c.batch, comm);
      r.val_loss = e.loss;
      r.val_ppl = e.ppl;
      clear_line();
      if (c.progress)
        std::fprintf(stderr, "step %lld: val loss %.4f, ppl %.2f (%lld tokens)\n", static_cast<long long>(done),
                     e.loss, e.ppl, static_cast<long long>(e.tokens));
    }
    rows.push_back(r);
    if (c.on_step) c.on_step(done, c.steps, loss);
    if (c.progress && (tty || done % print_every == 0 || last)) {
      const double tps = train_time > 0 ? double(timed_tokens) / train_time : 0;
      const double eta = double(end - done) * train_time / double(timed_steps);
      std::fprintf(stderr, "%sstep %lld/%lld | loss %.4f | lr %.2e | %.0f tok/s | ETA %s%s", tty ? "\r" : "",
                   static_cast<long long>(done), static_cast<long long>(c.steps), loss, double(lr), tps,
                   fmt_duration(eta).c_str(), tty ? "    " : "\n");
      std::fflush(stderr);
    }
    if ((c.save_every > 0 && done % c.save_every == 0) || last) {
      // A step can leave weights overflowed while its loss and norm were finite: never save those.
      if (dev) dev->to_host(P, &opt);
      if (!all_finite(P)) fail(done, "parameters became non-finite");
      checkpoint(done);
      if (writer) write_logs(out, rows, c.steps);
    }
    // Ctrl-C or SIGTERM: keep this step's work and stop (core/interrupt.h). Ranks may see the
    // signal at different steps: all stop at the first step where any rank has it.
    int sig = interrupt_signal();
    if (comm) {
      for (const uint64_t s : comm->allgather(uint64_t(sig)))
        if (sig == 0) sig = int(s);
    }
    if (sig != 0 && !last) {
      if (last_ckpt != done) {
        if (dev) dev->to_host(P, &opt);
        if (!all_finite(P)) fail(done, "parameters became non-finite");
        checkpoint(done);
        if (writer) write_logs(out, rows, c.steps);
      }
      clear_line();
      throw Interrupted(sig, detail::cat("interrupted by ", signal_name(sig), " after step ", done, " of ", c.steps,
                                         "; checkpoint saved in ", ck.string()));
    }
  }
  if (c.progress && tty) std::fprintf(stderr, "\n");
  if (comm && !dev && train_time > 0) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "data parallel: summing the gradients across ranks took %.3f s of %.3f s of steps "
                  "(%.1f%%)", comm_time, train_time, 100 * comm_time / train_time);
    say(buf);
  }
  if (dev && dev->be.peak_allocated_bytes() > 0)
    say(detail::cat("device memory: peak ", fmt_num(double(dev->be.peak_allocated_bytes()) / (1 << 20)),
                    " MiB allocated (weights, gradients, AdamW, activations, workspaces)"));
  if (end == start && writer) write_logs(out, rows, c.steps);
  say(detail::cat(end < c.steps ? "stopped at step " : "done at step ", end, "; checkpoint in ", ck.string(),
                  ", log in ", (out / "train_log.csv").string()));
}

// ---- eval ----

void eval_window_defaults(const std::string& model_dir, int& seq_len, int64_t& max_tokens, int64_t* step) {
  const fs::path sp = fs::path(checkpoint_dir(model_dir)) / "trainer_state.json";
  if (step) *step = -1;
  if (fs::exists(sp)) {
    const json st = read_trainer_state(sp);
    try {
      if (step) *step = st.at("step");
      if (seq_len <= 0) seq_len = st.at("settings").at("seq_len");
      if (max_tokens < 0) max_tokens = st.at("settings").at("eval_tokens");
    } catch (const json::exception& e) {
      throw Error(detail::cat(sp.string(), ": ", e.what()));
    }
  }
  if (seq_len <= 0) seq_len = 128;
  if (max_tokens < 0) max_tokens = 32768;
}

std::vector<int32_t> validation_tokens(const Tokenizer& tok, const std::string& data_path) {
  const Corpora data = load_split(data_path);
  return token_stream(tok, valid_texts(data.corpus, data.split));
}

EvalResult eval_windows(const std::vector<int32_t>& stream, int L, int64_t max_tokens, int B,
                        const std::function<void(int64_t pos, int nb, int len, double& nll)>& score) {
  const int64_t n = int64_t(stream.size());
  HM_CHECK(n >= 2, "validation split holds ", n, " tokens; at least 2 are needed");
  int64_t budget = n - 1;
  if (max_tokens > 0) budget = std::min(budget, max_tokens);
  double nll = 0;
  int64_t counted = 0;
  while (counted < budget) {
    const int len = int(std::min<int64_t>(L, budget - counted));
    // As many windows of this length as fit in one batch and in the budget.
    const int nb = int(std::min<int64_t>(B, (budget - counted) / len));
    score(counted, nb, len, nll);  // the windows so far end at token counted, where the next begin
    counted += int64_t(nb) * len;
  }
  EvalResult r;
  r.tokens = counted;
  r.loss = nll / double(counted);
  r.ppl = std::exp(r.loss);
  return r;
}

void forward_windows(HybridModel& m, HybridMemory& mem, const std::vector<int32_t>& stream, int64_t pos, int nb,
                     int len, std::vector<float>& logits) {
  Batch b;
  b.logits_all = true;
  for (int w = 0; w < nb; ++w) {
    mem.seq_rm(w);
    const auto first = stream.begin() + pos + int64_t(w) * len;
    b.add(w, std::vector<int32_t>(first, first + len));
  }
  m.forward(b, mem, logits);
}

EvalResult evaluate(const std::string& model_dir, const std::string& data_path, int seq_len, int64_t max_tokens,
                    int batch, std::optional<DType> weights, const EvalDevice& where) {
  const fs::path dir = checkpoint_dir(model_dir);  // a training out_dir stands for its checkpoint
  EvalResult r;
  eval_window_defaults(model_dir, seq_len, max_tokens, &r.step);
  HM_CHECK(batch >= 1, "batch must be >= 1");
  auto be = make_cpu_backend();
  auto model = load_any_model(dir.string(), *be);  // ours or a Hugging Face folder
  if (weights && *weights != model->weight_format()) {
    model->set_weight_format(*weights);
    model->prepare();
  }
  auto tok = load_tokenizer(dir.string());
  HM_CHECK(tok->vocab_size() <= model->config().vocab_size, dir.string(), ": the tokenizer's vocabulary (",
           tok->vocab_size(), ") exceeds the model's vocab_size (", model->config().vocab_size, ")");
  Corpora data = load_split(data_path);
  const std::vector<int32_t> valid = token_stream(*tok, valid_texts(data.corpus, data.split));
  // The training forward scores float32 models it can train; the others (packed weights, layers
  // without a backward pass yet) go through the inference forward.
  const std::string untrainable = training_unsupported(model->config());
  const bool trainable = untrainable.empty();
  EvalResult e;
  if (where.on_device()) {
    const std::string dev = detail::cat("hm eval --device ", device_name(where.device), ": ");
    HM_CHECK(model->weight_format() == DType::F32, dev, dir.string(), " has ",
             compute_dtype_name(model->weight_format()), " weights, which are scored through the model's forward; "
             "that runs on the CPU for evaluation (--device cpu)");
    HM_CHECK(trainable, dev, dir.string(), ": ", untrainable, "; such a model is scored through the inference "
             "forward, on the CPU (--device cpu)");
    DeviceModel dm(where.device, where.compute, false, model->params());
    e = eval_stream(dm, valid, seq_len, max_tokens, batch);
  } else {
    e = model->weight_format() == DType::F32 && trainable
            ? eval_stream(model->params(), valid, seq_len, max_tokens, batch)
            : eval_stream_model(*model, valid, seq_len, max_tokens, batch);
  }
  r.loss = e.loss;
  r.ppl = e.ppl;
  r.tokens = e.tokens;
  // eval_stream scores targets valid[1 .. tokens]; the unigram baseline scores the same ones.
  const std::vector<int32_t> train = token_stream(*tok, train_texts(data.corpus, data.split));
  std::vector<double> count(size_t(tok->vocab_size()), 1.0);
  for (int32_t t : train) count[size_t(t)] += 1.0;
  const double total = double(train.size()) + double(tok->vocab_size());
  double nll = 0;
  for (int64_t i = 1; i <= r.tokens; ++i) nll -= std::log(count[size_t(valid[size_t(i)])] / total);
  r.unigram_loss = nll / double(r.tokens);
  r.unigram_ppl = std::exp(r.unigram_loss);
  return r;
}

}  // namespace hm

namespace hm {

std::string checkpoint_dir(const std::string& model_dir) {
  const fs::path dir = model_dir;
  return fs::exists(dir / "checkpoint" / "config.json") ? (dir / "checkpoint").string() : model_dir;
}

TaskSpec checkpoint_task(const std::string& model_dir, int64_t* step) {
  const fs::path sp = fs::path(checkpoint_dir(model_dir)) / "trainer_state.json";
  TaskSpec saved;
  if (step) *step = -1;
  if (!fs::exists(sp)) return saved;
  const json st = read_trainer_state(sp);
  try {
    if (step) *step = st.at("step");
    const json& s = st.at("settings");
    if (s.contains("task")) saved = task_from_json(s.at("task"));
  } catch (const json::exception& e) {
    throw Error(detail::cat(sp.string(), ": ", e.what()));
  }
  return saved;
}

int64_t trained_seq_len(const std::string& dir) {
  const fs::path sp = fs::path(checkpoint_dir(dir)) / "trainer_state.json";
  if (!fs::exists(sp)) return 0;
  const json st = read_trainer_state(sp);
  try {
    return st.at("settings").at("seq_len").get<int64_t>();
  } catch (const json::exception& e) {
    throw Error(detail::cat(sp.string(), ": ", e.what()));
  }
}

TaskEvalResult evaluate_task(const std::string& model_dir, const TaskSpec& given, int64_t n, int batch) {
  const fs::path dir = checkpoint_dir(model_dir);
  TaskEvalResult r;
  const TaskSpec saved = checkpoint_task(model_dir, &r.step);
  TaskSpec t = given;
  if (t.name.empty()) {
    HM_CHECK(!saved.name.empty(), dir.string(), " was not trained on a task: give --task");
    t.name = saved.name;
  }
  // Settings of the run's own task fill what was not given; another task only takes its L.
  const bool same = t.name == saved.name;
  if (t.seq_len == 0) t.seq_len = saved.seq_len;
  if (same && t.vocab == 0) t.vocab = saved.vocab;
  if (same && t.kv == 0) t.kv = saved.kv;
  HM_CHECK(t.seq_len > 0, dir.string(), " has no training task settings: give --seq-len");
  auto be = make_cpu_backend();
  auto model = load_model(dir.string(), *be);
  if (t.vocab == 0) t.vocab = model->config().vocab_size;
  t = resolve_task(t);
  validate_task(t);
  r.task = t;
  r.score = score_task(*model, t, n, batch);
  r.chance = chance_accuracy(t);
  return r;
}

}  // namespace hm
