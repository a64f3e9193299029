#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "core/interrupt.h"
#include "core/rng.h"
#include "eval/compare.h"
#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "runtime/tokenizer.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace {

struct TrainerTempDir {
  fs::path path;
  explicit TrainerTempDir(const std::string& tag)
      : path(fs::temp_directory_path() / ("hm_trainer_" + tag + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TrainerTempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

void write(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f << bytes;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// A few KB of repetitive English-like lines: enough structure for a tiny model to learn fast.
std::string small_corpus() {
  const char* subj[] = {"the cat", "a dog", "the bird", "my friend", "the old man"};
  const char* verb[] = {"sees", "likes", "finds", "wants", "follows"};
  const char* obj[] = {"the ball", "a red hat", "the river", "some bread", "the little house"};
  hm::Rng r(7);
  std::string s;
  for (int i = 0; i < 110; ++i)
    s += std::string(subj[r.next_u64() % 5]) + " " + verb[r.next_u64() % 5] + " " + obj[r.next_u64() % 5] + ".\n";
  return s;
}

hm::TrainConfig base_config(const TrainerTempDir& d, const std::string& out) {
  hm::TrainConfig c;
  c.preset = "tiny";
  c.data_path = d.file("corpus.txt");
  c.out_dir = d.file(out);
  c.batch = 4;
  c.seq_len = 32;
  c.lr = 3e-3f;
  c.warmup = 2;
  c.eval_every = 0;
  c.save_every = 0;
  c.eval_tokens = 512;
  c.progress = false;
  return c;
}

void load_weights(const std::string& ckpt, std::vector<float>& out) {
  auto be = hm::make_cpu_backend();
  auto m = hm::load_model(ckpt, *be);
  out.assign(m->params().data(), m->params().data() + m->params().numel());
}

// Resumes the run in part_dir from its directory alone (the saved settings govern) and expects
// its final weights to equal, bit for bit, those of the uninterrupted run in full_dir.
void resume_and_expect_same_weights(const std::string& full_dir, const std::string& part_dir) {
  hm::TrainConfig again;
  again.out_dir = part_dir;
  again.resume = true;
  again.progress = false;
  hm::train(again);
  std::vector<float> a, b;
  load_weights(full_dir + "/checkpoint", a);
  load_weights(part_dir + "/checkpoint", b);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
}

std::vector<std::vector<std::string>> read_csv(const std::string& path) {
  std::vector<std::vector<std::string>> rows;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    std::vector<std::string> cells;
    std::stringstream ss(line);
    std::string cell;
    while (std::getline(ss, cell, ',')) cells.push_back(cell);
    if (!line.empty() && line.back() == ',') cells.push_back("");
    rows.push_back(cells);
  }
  return rows;
}

}  // namespace

TEST(Trainer, LossDecreasesAndWritesLogCheckpointAndEval) {
  TrainerTempDir d("loss");
  write(d.file("corpus.txt"), small_corpus());
  hm::TrainConfig c = base_config(d, "run");
  c.steps = 30;
  c.eval_every = 15;
  hm::train(c);

  const auto rows = read_csv(d.file("run/train_log.csv"));
  ASSERT_EQ(rows.size(), 31u);
  EXPECT_EQ(rows[0], (std::vector<std::string>{"step", "lr", "train_loss", "grad_norm", "tokens_per_s",
                                                "val_loss", "val_ppl"}));
  double first = 0, last = 0;
  for (size_t i = 1; i < rows.size(); ++i) {
    ASSERT_EQ(rows[i].size(), 7u) << "row " << i;
    EXPECT_EQ(std::stoll(rows[i][0]), int64_t(i));
    const double loss = std::stod(rows[i][2]);
    ASSERT_TRUE(std::isfinite(loss));
    if (i <= 3) first += loss / 3;
    if (i > rows.size() - 4) last += loss / 3;
    EXPECT_EQ(rows[i][5].empty(), i != 15 && i != 30) << "validation only at steps 15 and 30";
  }
  // Random init over 259 tokens starts near ln(259) = 5.56; the repetitive text is far easier.
  EXPECT_GT(first, 4.5);
  EXPECT_LT(last, first - 1.0) << "loss " << first << " -> " << last;
  std::printf("[ trainer ] train loss (mean of 3 steps) %.3f -> %.3f\n", first, last);
  const double val = std::stod(rows[30][5]);
  EXPECT_NEAR(std::stod(rows[30][6]), std::exp(val), 1e-3 * std::exp(val));

  const std::string svg = slurp(d.file("run/loss.svg"));
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  EXPECT_NE(svg.find(">step</text>"), std::string::npos);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);

  // The checkpoint is a model directory `hm generate` can load.
  const std::string ck = d.file("run/checkpoint");
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors",
                        "trainer_state.json"})
    EXPECT_TRUE(fs::exists(fs::path(ck) / f)) << f;
  auto be = hm::make_cpu_backend();
  auto m = hm::load_model(ck, *be);
  EXPECT_EQ(m->config().vocab_size, hm::ByteTokenizer::kVocab);
  EXPECT_EQ(hm::load_tokenizer(ck)->type(), "byte");

  // eval on the out dir sees the same split and windows as the run's last validation.
  const hm::EvalResult e = hm::evaluate(c.out_dir, c.data_path);
  EXPECT_TRUE(std::isfinite(e.loss));
  EXPECT_DOUBLE_EQ(e.ppl, std::exp(e.loss));
  EXPECT_EQ(e.step, 30);
  EXPECT_GT(e.tokens, 100);  // the whole (short) validation split: under eval_tokens
  EXPECT_LE(e.tokens, 512);
  EXPECT_NEAR(e.loss, val, 1e-5);
}

TEST(Trainer, ResumeIsBitIdentical) {
  TrainerTempDir d("resume");
  write(d.file("corpus.txt"), small_corpus());
  hm::TrainConfig full = base_config(d, "full");
  full.steps = 8;
  full.grad_accum = 2;  // resume must also reproduce accumulation and the schedule
  hm::train(full);

  hm::TrainConfig part = base_config(d, "part");
  part.steps = 8;
  part.grad_accum = 2;
  part.stop_after = 4;
  hm::train(part);
  {
    std::ifstream f(d.file("part/checkpoint/trainer_state.json"));
    EXPECT_EQ(nlohmann::json::parse(f).at("step"), 4);
  }
  resume_and_expect_same_weights(d.file("full"), part.out_dir);
  if (HasFatalFailure()) return;
  EXPECT_EQ(slurp(d.file("full/checkpoint/optimizer.safetensors")),
            slurp(d.file("part/checkpoint/optimizer.safetensors")));
  EXPECT_EQ(read_csv(d.file("part/train_log.csv")).size(), 9u);  // header + 8 steps, none twice
}

// Ctrl-C (here requested from the step callback, as the signal handler would) finishes the step,
// saves it and throws Interrupted; the resumed run ends exactly where the uninterrupted one does.
TEST(Trainer, InterruptSavesTheStepAndResumesExactly) {
  TrainerTempDir d("interrupt");
  write(d.file("corpus.txt"), small_corpus());
  hm::TrainConfig full = base_config(d, "full");
  full.steps = 8;
  hm::train(full);

  hm::TrainConfig part = base_config(d, "part");
  part.steps = 8;
  part.on_step = [](int64_t step, int64_t, double) {
    if (step == 3) hm::request_interrupt(SIGINT);
  };
  try {
    hm::train(part);
    hm::clear_interrupt();
    FAIL() << "no Interrupted";
  } catch (const hm::Interrupted& e) {
    hm::clear_interrupt();
    EXPECT_EQ(e.signal(), SIGINT);
    EXPECT_EQ(e.exit_code(), 130);
    EXPECT_NE(std::string(e.what()).find("SIGINT after step 3 of 8"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(d.file("part/checkpoint")), std::string::npos) << e.what();
  }
  {
    std::ifstream f(d.file("part/checkpoint/trainer_state.json"));
    EXPECT_EQ(nlohmann::json::parse(f).at("step"), 3);
  }
  EXPECT_EQ(read_csv(d.file("part/train_log.csv")).size(), 4u);
  resume_and_expect_same_weights(d.file("full"), part.out_dir);
  if (HasFatalFailure()) return;
  auto last_row = [&](const std::string& run) {
    auto row = read_csv(d.file(run + "/train_log.csv")).back();
    row.at(4).clear();  // tokens_per_s: a timing
    return row;
  };
  EXPECT_EQ(last_row("full"), last_row("part"));
}

// --resume --steps N past a finished run continues it to N at the schedule's final lr; the
// extended schedule is saved, so an interrupted extension resumes exactly too.
TEST(Trainer, ResumeWithMoreStepsExtendsTheRun) {
  TrainerTempDir d("extend");
  write(d.file("corpus.txt"), small_corpus());
  auto extend = [&](const std::string& out, int64_t steps) {
    hm::TrainConfig c;
    c.out_dir = d.file(out);
    c.resume = true;
    c.progress = false;
    c.steps = steps;
    c.given_flags = {"--steps"};
    return c;
  };
  hm::TrainConfig a = base_config(d, "a");
  a.steps = 6;
  hm::train(a);
  const auto before = read_csv(d.file("a/train_log.csv"));
  hm::train(extend("a", 10));
  const auto rows = read_csv(d.file("a/train_log.csv"));
  ASSERT_EQ(rows.size(), 11u);
  for (size_t i = 1; i <= 6; ++i) EXPECT_EQ(rows[i][2], before[i][2]) << "step " << i << " changed";
  for (size_t i = 7; i <= 10; ++i)
    EXPECT_FLOAT_EQ(std::stof(rows[i][1]), a.lr * a.min_lr_ratio) << "step " << i << " lr";
  {
    std::ifstream f(d.file("a/checkpoint/trainer_state.json"));
    const auto st = nlohmann::json::parse(f);
    EXPECT_EQ(st.at("step"), 10);
    EXPECT_EQ(st.at("settings").at("steps"), 10);
    EXPECT_EQ(st.at("settings").at("lr_steps"), 6);
  }
  // The same extension in two parts: interrupted at step 8, then resumed without --steps.
  hm::TrainConfig b = base_config(d, "b");
  b.steps = 6;
  hm::train(b);
  hm::TrainConfig b2 = extend("b", 10);
  b2.on_step = [](int64_t step, int64_t, double) {
    if (step == 8) hm::request_interrupt(SIGTERM);
  };
  EXPECT_THROW(hm::train(b2), hm::Interrupted);
  hm::clear_interrupt();
  hm::TrainConfig b3 = extend("b", 0);
  b3.given_flags.clear();
  hm::train(b3);
  std::vector<float> wa, wb;
  load_weights(d.file("a/checkpoint"), wa);
  load_weights(d.file("b/checkpoint"), wb);
  ASSERT_EQ(wa.size(), wb.size());
  EXPECT_EQ(std::memcmp(wa.data(), wb.data(), wa.size() * sizeof(float)), 0);

  // --steps short of the run's end stops there (resumable); behind the checkpoint is an error.
  hm::TrainConfig c = base_config(d, "c");
  c.steps = 6;
  c.stop_after = 2;
  hm::train(c);
  hm::train(extend("c", 4));
  {
    std::ifstream f(d.file("c/checkpoint/trainer_state.json"));
    const auto st = nlohmann::json::parse(f);
    EXPECT_EQ(st.at("step"), 4);
    EXPECT_EQ(st.at("settings").at("steps"), 6);
  }
  try {
    hm::train(extend("c", 3));
    FAIL() << "--steps behind the checkpoint was accepted";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("already at step 4"), std::string::npos) << e.what();
  }
}

TEST(Trainer, BadDataIsNamedBeforeAnythingIsWritten) {
  TrainerTempDir d("bad");
  write(d.file("empty.txt"), "");
  write(d.file("latin1.txt"), "caf\xe9 au lait\nand more text here\n");
  write(d.file("short.txt"), "one line\nanother line\nand a third\n");
  struct Case { std::string path, want; };
  const Case cases[] = {{d.file("missing.txt"), "no such file"},
                        {d.file("empty.txt"), "empty"},
                        {d.file("latin1.txt"), "UTF-8"},
                        {d.file("short.txt"), "fewer than one sequence"}};
  for (const Case& k : cases) {
    hm::TrainConfig c = base_config(d, "out");
    c.data_path = k.path;
    c.seq_len = 64;
    try {
      hm::train(c);
      ADD_FAILURE() << k.path << ": no error";
    } catch (const hm::Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(k.want), std::string::npos) << msg;
      EXPECT_NE(msg.find(k.path), std::string::npos) << msg;
    }
    EXPECT_FALSE(fs::exists(d.file("out"))) << k.path;
  }
}

TEST(Trainer, NonFiniteLossStopsAndKeepsLastCheckpoint) {
  TrainerTempDir d("nan");
  write(d.file("corpus.txt"), small_corpus());
  hm::TrainConfig c = base_config(d, "run");
  c.steps = 8;
  c.save_every = 2;
  c.debug_nan_step = 5;
  try {
    hm::train(c);
    ADD_FAILURE() << "no error";
  } catch (const hm::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("step 5: training loss is NaN"), std::string::npos) << msg;
    EXPECT_NE(msg.find("checkpoint, step 4"), std::string::npos) << msg;
  }
  std::ifstream f(d.file("run/checkpoint/trainer_state.json"));
  EXPECT_EQ(nlohmann::json::parse(f).at("step"), 4);
  std::vector<float> w;
  load_weights(d.file("run/checkpoint"), w);
  for (float x : w) ASSERT_TRUE(std::isfinite(x));
  EXPECT_EQ(read_csv(d.file("run/train_log.csv")).size(), 5u);  // header + steps 1..4

  // A real divergence: an absurd learning rate overflows the weights after the first step.
  hm::TrainConfig wild = base_config(d, "wild");
  wild.steps = 4;
  wild.warmup = 0;
  wild.lr = 1e30f;
  try {
    hm::train(wild);
    ADD_FAILURE() << "no error";
  } catch (const hm::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("training stopped"), std::string::npos) << msg;
  }
  EXPECT_FALSE(fs::exists(d.file("wild/checkpoint")));
}

TEST(Trainer, RefusesToOverwriteARunWithoutResume) {
  TrainerTempDir d("again");
  write(d.file("corpus.txt"), small_corpus());
  hm::TrainConfig c = base_config(d, "run");
  c.steps = 2;
  hm::train(c);
  try {
    hm::train(c);
    ADD_FAILURE() << "no error";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("--resume"), std::string::npos) << e.what();
  }
}

TEST(Trainer, BpeTokenizerIsSavedWithTheCheckpoint) {
  TrainerTempDir d("bpe");
  write(d.file("corpus.txt"), small_corpus());
  hm::TrainConfig c = base_config(d, "run");
  c.tokenizer = "bpe";
  c.vocab = 300;
  c.steps = 2;
  hm::train(c);
  const std::string ck = d.file("run/checkpoint");
  EXPECT_TRUE(fs::exists(fs::path(ck) / "tokenizer.model"));
  auto tok = hm::load_tokenizer(ck);
  EXPECT_EQ(tok->type(), "sentencepiece");
  EXPECT_EQ(tok->vocab_size(), 300);
  EXPECT_EQ(hm::load_config(ck + "/config.json").vocab_size, 300);
  const hm::EvalResult e = hm::evaluate(c.out_dir, c.data_path);
  EXPECT_TRUE(std::isfinite(e.loss));
}

// Task data: the batch of a step is a function of the step, so an interrupted run resumes to the
// same bytes; the task settings come back from the checkpoint.
TEST(Trainer, TaskTrainingResumesBitIdentically) {
  TrainerTempDir d("task");
  auto task_config = [&](const std::string& out) {
    hm::TrainConfig c = base_config(d, out);
    c.data_path.clear();
    c.task.name = "mqar";
    c.task.vocab = 40;
    c.seq_len = 16;
    c.steps = 6;
    c.grad_accum = 2;
    c.task_eval = 8;
    c.eval_every = 3;
    return c;
  };
  hm::train(task_config("full"));
  hm::TrainConfig part = task_config("part");
  part.stop_after = 3;
  hm::train(part);
  resume_and_expect_same_weights(d.file("full"), part.out_dir);
  if (HasFatalFailure()) return;
  const auto full_rows = read_csv(d.file("full/train_log.csv")), part_rows = read_csv(d.file("part/train_log.csv"));
  ASSERT_EQ(full_rows.size(), part_rows.size());
  for (size_t i = 1; i < full_rows.size(); ++i) {
    EXPECT_EQ(full_rows[i][2], part_rows[i][2]) << "train loss, step " << i;
    EXPECT_EQ(full_rows[i][5], part_rows[i][5]) << "test loss, step " << i;
  }
  std::ifstream f(d.file("part/checkpoint/trainer_state.json"));
  const auto st = nlohmann::json::parse(f);
  EXPECT_EQ(st.at("settings").at("task").at("name"), "mqar");
  EXPECT_EQ(st.at("settings").at("task").at("kv"), 1);  // 16 / 16
  EXPECT_EQ(hm::load_config(d.file("part/checkpoint/config.json")).vocab_size, 40);
  // Validation on test draws is in the log (val_loss at steps 3 and 6).
  ASSERT_EQ(full_rows.size(), 7u);
  EXPECT_FALSE(full_rows[3][5].empty());
  EXPECT_TRUE(full_rows[2][5].empty());
}

TEST(Trainer, TaskSettingsAreChecked) {
  TrainerTempDir d("taskbad");
  write(d.file("corpus.txt"), small_corpus());
  hm::TrainConfig c = base_config(d, "run");
  c.task.name = "mqar";
  try {
    hm::train(c);
    ADD_FAILURE() << "no error";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("--data and --task"), std::string::npos) << e.what();
  }
  c.data_path.clear();
  c.task.vocab = 20;  // not above seq_len 32
  try {
    hm::train(c);
    ADD_FAILURE() << "no error";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("must exceed --seq-len"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(d.file("run")));
}

// The device path (BatchGrad over the whole batch, Backend::adamw_step, weights and moments in
// the backend's memory), run here on the CPU backend, follows the CPU path's loss curve to float
// rounding, with gradient accumulation and validation; and a run stopped on one path resumes on
// the other (checkpoints are the same files), ending where the uninterrupted run does to rounding.
TEST(Trainer, DevicePathFollowsTheCpuRun) {
  TrainerTempDir d("devpath");
  write(d.file("corpus.txt"), small_corpus());
  auto run = [&](const std::string& out, bool device_path, int64_t stop_after, bool grad_ckpt = false) {
    hm::TrainConfig c = base_config(d, out);
    c.steps = 8;
    c.grad_accum = 2;
    c.eval_every = 4;
    c.stop_after = stop_after;
    c.device_path_on_cpu = device_path;
    c.grad_ckpt = grad_ckpt;
    hm::train(c);
  };
  run("cpu", false, 0);
  run("dev", true, 0);
  // --grad-ckpt on the device path (BatchGrad's per-layer recompute): the same curve, bitwise.
  run("devckpt", true, 0, true);
  {
    const auto p = read_csv(d.file("dev/train_log.csv")), q = read_csv(d.file("devckpt/train_log.csv"));
    ASSERT_EQ(p.size(), q.size());
    for (size_t r = 1; r < p.size(); ++r)
      for (size_t col : {size_t(1), size_t(2), size_t(3), size_t(5), size_t(6)})  // all but tokens/s
        EXPECT_EQ(q[r][col], p[r][col]) << "step " << r << " column " << p[0][col];
    std::vector<float> wp, wq;
    load_weights(d.file("dev/checkpoint"), wp);
    load_weights(d.file("devckpt/checkpoint"), wq);
    ASSERT_EQ(wp.size(), wq.size());
    EXPECT_EQ(std::memcmp(wp.data(), wq.data(), wp.size() * sizeof(float)), 0);
  }
  const auto a = read_csv(d.file("cpu/train_log.csv")), b = read_csv(d.file("dev/train_log.csv"));
  ASSERT_EQ(a.size(), 9u);
  ASSERT_EQ(b.size(), 9u);
  double rel = 0;
  for (size_t r = 1; r < a.size(); ++r)
    for (size_t col : {size_t(2), size_t(3)}) {  // train_loss, grad_norm
      const double x = std::stod(a[r][col]), y = std::stod(b[r][col]);
      EXPECT_NEAR(y, x, 1e-4 * std::fabs(x)) << "step " << r << " column " << a[0][col];
      rel = std::max(rel, std::fabs(y - x) / std::fabs(x));
    }
  std::printf("  device path vs cpu path: worst relative loss / norm difference %.2e over 8 steps\n", rel);
  EXPECT_NEAR(std::stod(b[8][5]), std::stod(a[8][5]), 1e-4 * std::stod(a[8][5]));  // val_loss
  std::vector<float> wa, wb;
  load_weights(d.file("cpu/checkpoint"), wa);
  load_weights(d.file("dev/checkpoint"), wb);
  ASSERT_EQ(wa.size(), wb.size());
  double worst = 0;
  for (size_t i = 0; i < wa.size(); ++i) worst = std::max(worst, double(std::fabs(wa[i] - wb[i])));
  EXPECT_LE(worst, 1e-4);
  EXPECT_GT(worst, 0.0);  // two computations, not one path twice

  // Stopped on the device path at step 4, resumed on the CPU path.
  run("mixed", true, 4);
  hm::TrainConfig again;
  again.out_dir = d.file("mixed");
  again.resume = true;
  again.progress = false;
  hm::train(again);
  std::vector<float> wm;
  load_weights(d.file("mixed/checkpoint"), wm);
  ASSERT_EQ(wm.size(), wa.size());
  worst = 0;
  for (size_t i = 0; i < wa.size(); ++i) worst = std::max(worst, double(std::fabs(wa[i] - wm[i])));
  EXPECT_LE(worst, 1e-4);
}

// hm eval --device: evaluate() scores the windows with BatchGrad::loss_sum on a backend (the
// code the device path validates with), here the CPU backend through the test hook: the same
// loss as the CPU's training forward to 1e-6 relative, on the same windows and tokens, and the
// device run's own last validation. What only the CPU scores is refused by name.
TEST(Trainer, EvalOnTheDevicePathMatchesTheCpu) {
  TrainerTempDir d("deveval");
  write(d.file("corpus.txt"), small_corpus());
  hm::TrainConfig c = base_config(d, "dev");
  c.steps = 4;
  c.device_path_on_cpu = true;
  hm::train(c);
  hm::EvalDevice where;
  where.path_on_cpu = true;
  const hm::EvalResult cpu = hm::evaluate(c.out_dir, c.data_path, 0, -1, c.batch);
  const hm::EvalResult dev = hm::evaluate(c.out_dir, c.data_path, 0, -1, c.batch, std::nullopt, where);
  std::printf("  eval: cpu %.9f, device path %.9f (%lld tokens)\n", cpu.loss, dev.loss,
              static_cast<long long>(dev.tokens));
  EXPECT_NEAR(dev.loss, cpu.loss, 1e-6 * cpu.loss);
  EXPECT_DOUBLE_EQ(dev.ppl, std::exp(dev.loss));
  EXPECT_EQ(dev.tokens, cpu.tokens);
  EXPECT_EQ(dev.step, 4);
  EXPECT_EQ(dev.unigram_loss, cpu.unigram_loss);
  const auto log = read_csv(d.file("dev/train_log.csv"));
  ASSERT_EQ(log.size(), 5u);
  EXPECT_NEAR(std::stod(log[4][5]), dev.loss, 1e-5 * dev.loss);  // the run's validation, same windows

  auto refused = [&](const std::string& dir, std::optional<hm::DType> weights, const std::string& text) {
    try {
      hm::evaluate(dir, c.data_path, 0, -1, c.batch, weights, where);
      ADD_FAILURE() << "no error for " << dir;
    } catch (const hm::Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  refused(c.out_dir, hm::DType::Q8_0, "q8_0 weights, which are scored through the model's forward");
  // A True Hybrid model scores on the device path too (its router on the host), as on the CPU.
  hm::TrainConfig t = base_config(d, "true");
  t.preset = "true-tiny";
  t.steps = 2;
  hm::train(t);
  const hm::EvalResult tc = hm::evaluate(t.out_dir, c.data_path, 0, -1, c.batch);
  const hm::EvalResult td = hm::evaluate(t.out_dir, c.data_path, 0, -1, c.batch, std::nullopt, where);
  EXPECT_NEAR(td.loss, tc.loss, 1e-6 * tc.loss);
}

// hm compare --device: every run's TrainConfig gets the device and compute type; the run keys
// record them, so a device sweep into the same folder trains again rather than reusing the CPU's
// results (and reuses its own). Here the device path on the CPU backend: the loss follows the
// CPU's to rounding, for a Mamba and a True Hybrid arch.
TEST(Trainer, CompareTrainsOnTheDevicePath) {
  TrainerTempDir d("cmpdev");
  hm::CompareConfig c;
  c.task = "mqar";
  c.task_vocab = 20;
  c.kv = 2;
  c.seq_lens = {8};
  c.sizes = {16};
  c.archs = {"mamba", "true-soft"};
  c.lrs = {1e-2f};
  c.budget = 6;
  c.batch = 4;
  c.test_examples = 20;
  c.threads = 1;
  c.progress = false;
  c.out_dir = d.file("cmp");
  const std::vector<hm::CompareRun> cpu = hm::run_compare(c);
  c.device_path_on_cpu = true;
  const std::vector<hm::CompareRun> dev = hm::run_compare(c);
  ASSERT_EQ(cpu.size(), 2u);
  ASSERT_EQ(dev.size(), 2u);
  EXPECT_EQ(cpu[0].error, "");
  EXPECT_EQ(cpu[1].error, "");
  EXPECT_EQ(dev[0].error, "");
  EXPECT_NEAR(dev[0].loss, cpu[0].loss, 1e-3 * cpu[0].loss);
  EXPECT_NE(dev[0].loss, cpu[0].loss);  // trained again on the device path, not reused
  EXPECT_EQ(dev[1].error, "");
  EXPECT_NEAR(dev[1].loss, cpu[1].loss, 1e-3 * cpu[1].loss);
  const std::string results = slurp(d.file("cmp/results.json"));
  EXPECT_NE(results.find("\"device\": \"cpu\""), std::string::npos);
  const std::vector<hm::CompareRun> again = hm::run_compare(c);  // reused: the same numbers
  ASSERT_EQ(again.size(), 2u);
  EXPECT_EQ(again[0].loss, dev[0].loss);
  EXPECT_EQ(again[0].train_s, dev[0].train_s);
}
