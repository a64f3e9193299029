// hm compare --jobs, per-length batches, --examples budgets and the device path's chunked task
// scoring (src/eval/compare.h), on the CPU through the device_path_on_cpu hook: the same code a
// --device cuda sweep runs, with the cpu backend in place of CUDA.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "core/error.h"
#include "eval/compare.h"
#include "eval/tasks.h"
#include "model/model.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, sep);) out.push_back(x);
  return out;
}

// results.csv without its train_s column (wall time, the one cell that differs between runs).
std::string csv_without_time(const fs::path& p) {
  const std::vector<std::string> lines = split(slurp(p), '\n');
  const std::vector<std::string> head = split(lines.at(0), ',');
  const size_t t = size_t(std::find(head.begin(), head.end(), "train_s") - head.begin());
  EXPECT_LT(t, head.size());
  std::string out;
  for (const std::string& line : lines) {
    const std::vector<std::string> cells = split(line, ',');
    for (size_t i = 0; i < cells.size(); ++i)
      if (i != t) out += cells[i] + ",";
    out += "\n";
  }
  return out;
}

// The step,train_loss,grad_norm columns of a run's log: its loss curve.
std::string loss_curve(const fs::path& run_dir) {
  std::string out;
  for (const std::string& line : split(slurp(run_dir / "train" / "train_log.csv"), '\n')) {
    const std::vector<std::string> c = split(line, ',');
    if (c.size() >= 4) out += c[0] + "," + c[2] + "," + c[3] + "\n";
  }
  return out;
}

hm::CompareConfig small_sweep(const fs::path& out) {
  hm::CompareConfig c;
  c.task = "mqar";
  c.task_vocab = 20;
  c.kv = 2;
  c.seq_lens = {8, 16};
  c.batches = {4, 2};         // one per length
  c.budget_examples = 14;     // 4 steps at batch 4, 7 at batch 2
  c.sizes = {16};
  c.archs = {"mamba", "hybrid", "true-hard"};
  c.lrs = {1e-2f, 3e-3f};
  c.test_examples = 12;
  c.threads = 1;
  c.progress = false;
  c.device_path_on_cpu = true;
  c.out_dir = out.string();
  return c;
}

// --jobs 3 trains the same runs to the same numbers as --jobs 1: the results rows (all but the
// wall time) and every run's loss curve are identical, and the sweep's stats are recorded.
TEST(CompareJobs, JobsGiveTheSameResultsAsOneJob) {
  hm::test::TempDir d("compare_jobs");
  hm::CompareConfig c = small_sweep(d.path / "one");
  const std::vector<hm::CompareRun> one = hm::run_compare(c);
  c.jobs = 3;
  c.out_dir = (d.path / "three").string();
  const std::vector<hm::CompareRun> three = hm::run_compare(c);
  ASSERT_EQ(one.size(), 12u);
  ASSERT_EQ(three.size(), one.size());
  for (size_t i = 0; i < one.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(one[i].error, "");
    EXPECT_EQ(three[i].error, "");
    EXPECT_EQ(three[i].arch, one[i].arch);
    EXPECT_EQ(three[i].seq_len, one[i].seq_len);
    EXPECT_EQ(three[i].metric, one[i].metric);
    EXPECT_EQ(three[i].loss, one[i].loss);
    EXPECT_EQ(three[i].best, one[i].best);
    EXPECT_EQ(one[i].steps, one[i].seq_len == 8 ? 4 : 7);
    EXPECT_EQ(one[i].batch, one[i].seq_len == 8 ? 4 : 2);
  }
  EXPECT_EQ(csv_without_time(d.path / "one" / "results.csv"), csv_without_time(d.path / "three" / "results.csv"));
  for (const auto& e : fs::directory_iterator(d.path / "one" / "runs")) {
    const fs::path other = d.path / "three" / "runs" / e.path().filename();
    EXPECT_EQ(loss_curve(e.path()), loss_curve(other)) << e.path().filename();
  }
  const auto j = nlohmann::json::parse(slurp(d.path / "three" / "results.json"));
  EXPECT_EQ(j.at("settings").at("jobs"), 3);
  EXPECT_EQ(j.at("settings").at("budget_examples"), 14);
  EXPECT_EQ(j.at("settings").at("batch"), (std::vector<int>{4, 2}));
  EXPECT_EQ(j.at("sweep").at("trained_runs"), 12);
  EXPECT_EQ(j.at("sweep").at("jobs"), 3);
  // tokens: 6 runs x 4 x 4 x 8 + 6 runs x 7 x 2 x 16
  EXPECT_EQ(j.at("sweep").at("tokens"), 6.0 * 4 * 4 * 8 + 6.0 * 7 * 2 * 16);
  EXPECT_GT(j.at("sweep").at("tokens_per_s").get<double>(), 0);
  EXPECT_EQ(j.at("runs").at(0).at("steps"), 4);

  // Run again with --jobs 2: every run is reused, nothing trains.
  c.jobs = 2;
  const std::vector<hm::CompareRun> again = hm::run_compare(c);
  ASSERT_EQ(again.size(), three.size());
  for (size_t i = 0; i < again.size(); ++i) EXPECT_EQ(again[i].train_s, three[i].train_s);
}

// A run that runs out of memory while others train beside it (hm::OutOfMemory, thrown here by
// the test hook as a backend's alloc would) is trained again alone after them: the sweep's
// results equal the one-job sweep's, the run's loss curve included.
TEST(CompareJobs, OutOfMemoryBesideOthersIsRetriedAlone) {
  hm::test::TempDir d("compare_oom_jobs");
  hm::CompareConfig c = small_sweep(d.path / "one");
  const std::vector<hm::CompareRun> one = hm::run_compare(c);
  const std::string target = "mqar_L8_d16_hybrid_lr0.01";
  std::mutex mu;
  std::vector<int> target_running;  // the running count at each start of the target
  std::atomic<int> others{0};
  c.jobs = 3;
  c.out_dir = (d.path / "three").string();
  c.on_run_start = [&](const std::string& run, int running) {
    if (run != target) {
      ++others;
      return;
    }
    bool first = false;
    {
      std::lock_guard<std::mutex> lk(mu);
      target_running.push_back(running);
      first = target_running.size() == 1;
    }
    if (!first) return;
    while (others.load() == 0) std::this_thread::yield();  // another run is training beside it
    throw hm::OutOfMemory("test: out of memory beside other runs");
  };
  const std::vector<hm::CompareRun> three = hm::run_compare(c);
  ASSERT_EQ(target_running.size(), 2u);
  EXPECT_EQ(target_running[1], 1);  // the retry trained alone
  ASSERT_EQ(three.size(), one.size());
  for (size_t i = 0; i < one.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(three[i].error, "");
    EXPECT_FALSE(three[i].out_of_memory);
    EXPECT_EQ(three[i].metric, one[i].metric);
    EXPECT_EQ(three[i].loss, one[i].loss);
    EXPECT_EQ(three[i].best, one[i].best);
  }
  EXPECT_EQ(csv_without_time(d.path / "one" / "results.csv"), csv_without_time(d.path / "three" / "results.csv"));
  EXPECT_EQ(loss_curve(d.path / "one" / "runs" / target), loss_curve(d.path / "three" / "runs" / target));
}

// Out of memory with nothing beside it is the run's failure: recorded (the table says the cell's
// best is of fewer lrs), but a later call trains it again instead of reusing the failure; the
// sweep's other runs are reused.
TEST(CompareJobs, OutOfMemoryAloneIsRecordedAndTrainedAgainNextTime) {
  hm::test::TempDir d("compare_oom_alone");
  hm::CompareConfig c = small_sweep(d.path);
  const std::string target = "mqar_L8_d16_hybrid_lr0.01";
  c.on_run_start = [&](const std::string& run, int) {
    if (run == target) throw hm::OutOfMemory("test: out of memory");
  };
  const std::vector<hm::CompareRun> first = hm::run_compare(c);
  ASSERT_EQ(first.size(), 12u);
  size_t ti = first.size();
  for (size_t i = 0; i < first.size(); ++i)
    if (first[i].arch == "hybrid" && first[i].seq_len == 8 && first[i].lr == 1e-2f) ti = i;
  ASSERT_LT(ti, first.size());
  EXPECT_NE(first[ti].error.find("test: out of memory"), std::string::npos) << first[ti].error;
  EXPECT_TRUE(first[ti].out_of_memory);
  EXPECT_FALSE(first[ti].best);
  const auto saved = nlohmann::json::parse(slurp(d.path / "runs" / target / "result.json"));
  EXPECT_EQ(saved.at("out_of_memory"), true);
  const std::string table = hm::compare_table(c, first);
  EXPECT_NE(table.find("(1 of 2 lrs failed)"), std::string::npos) << table;

  c.on_run_start = nullptr;
  const std::vector<hm::CompareRun> second = hm::run_compare(c);
  ASSERT_EQ(second.size(), first.size());
  EXPECT_EQ(second[ti].error, "");
  EXPECT_FALSE(second[ti].out_of_memory);
  for (size_t i = 0; i < second.size(); ++i) {
    if (i != ti) {
      EXPECT_EQ(second[i].train_s, first[i].train_s) << i;  // reused
    }
  }
  EXPECT_EQ(hm::compare_table(c, second).find("lrs failed"), std::string::npos);
}

// The device path scores a task in chunks that end at the scored positions; that is the full
// forward's score: the same accuracy and the loss to rounding, for mqar (scattered queries)
// and copy (a run of answer positions, one token per chunk).
TEST(CompareJobs, ChunkedScoreMatchesTheFullForward) {
  for (const std::string task : {"mqar", "copy"}) {
    SCOPED_TRACE(task);
    hm::test::TempDir d("compare_score_" + task);
    hm::CompareConfig c = small_sweep(d.path);
    c.task = task;
    c.kv = task == "mqar" ? 3 : 4;
    c.seq_lens = {16};
    c.batches.clear();
    c.batch = 4;
    c.budget_examples = 0;
    c.budget = 5;
    c.archs = {"hybrid", "true-soft"};
    c.lrs = {1e-2f};
    c.test_examples = 24;
    const std::vector<hm::CompareRun> runs = hm::run_compare(c);
    ASSERT_EQ(runs.size(), 2u);
    for (const hm::CompareRun& r : runs) {
      ASSERT_EQ(r.error, "");
      auto be = hm::make_cpu_backend();
      const std::string ck =
          (d.path / "runs" / (task + "_L16_d16_" + r.arch + "_lr0.01") / "train" / "checkpoint").string();
      auto model = hm::load_model(ck, *be);
      hm::TaskSpec s;
      s.name = task;
      s.vocab = 20;
      s.seq_len = 16;
      s.kv = c.kv;
      s = hm::resolve_task(s);
      const hm::TaskScore full = hm::score_task(*model, s, c.test_examples);
      EXPECT_EQ(r.metric, full.accuracy) << r.arch;
      EXPECT_NEAR(r.loss, full.loss, 1e-5 * full.loss) << r.arch;
      EXPECT_GT(full.scored, 0);
    }
  }
}

// --jobs needs the device path: on the CPU one run uses every core, and its rounding depends on
// the thread count. A --batch list must have one value per sequence length.
TEST(CompareJobs, RefusesJobsOnTheCpuAndMismatchedBatchLists) {
  hm::test::TempDir d("compare_refuse");
  hm::CompareConfig c = small_sweep(d.path);
  c.device_path_on_cpu = false;
  c.jobs = 2;
  try {
    hm::run_compare(c);
    ADD_FAILURE() << "no error";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("--jobs 2"), std::string::npos) << e.what();
  }
  c = small_sweep(d.path);
  c.batches = {4, 2, 1};
  try {
    hm::run_compare(c);
    ADD_FAILURE() << "no error";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("3 values for 2 --seq-lens"), std::string::npos) << e.what();
  }
}

}  // namespace
