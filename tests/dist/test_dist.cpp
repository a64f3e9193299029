// Data-parallel training with CPU ranks (docs/DISTRIBUTED.md): `mpirun -np 2 hm train` against
// the single-process run with the same global batch, resume on another number of ranks, and the
// failures that must end the job with an error instead of a hang. The binaries come from CMake:
// HM_BIN (hm) and HM_MPIEXEC (mpirun).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "model/config.h"
#include "model/params.h"

namespace fs = std::filesystem;
namespace {

// A fresh directory per test.
fs::path scratch(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("hm_dist_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::string mpirun(int np) {
  std::string s = std::string(HM_MPIEXEC) + " -np " + std::to_string(np) + " --oversubscribe";
  if (::geteuid() == 0) s += " --allow-run-as-root";  // CI runs as root
  return s;
}

std::string read_text(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs a shell command (stdout and stderr into log), bounded so that a hang fails the test
// instead of stalling CI. Returns the exit status (124: timed out).
int sh(const std::string& cmd, const fs::path& log, int timeout_s = 120) {
  const std::string full = "timeout -k 5 " + std::to_string(timeout_s) + " " + cmd + " > '" + log.string() + "' 2>&1";
  const int rc = std::system(full.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
}

std::unique_ptr<hm::Params> load_weights(const fs::path& run) {
  const hm::ModelConfig mc = hm::load_config((run / "checkpoint" / "config.json").string());
  auto p = std::make_unique<hm::Params>(mc);
  hm::load_params(*p, (run / "checkpoint" / "model.safetensors").string());
  return p;
}

// Largest |a - b| over every weight, relative to the largest |a|.
double rel_diff(const std::unique_ptr<hm::Params>& pa, const std::unique_ptr<hm::Params>& pb) {
  const hm::Params &a = *pa, &b = *pb;
  EXPECT_EQ(a.numel(), b.numel());
  double d = 0, m = 0;
  for (size_t k = 0; k < a.specs().size(); ++k)  // tensor by tensor: the arena's padding is not weights
    for (int64_t i = 0; i < a.specs()[k].numel(); ++i) {
      d = std::max(d, double(std::fabs(a.at(k)[i] - b.at(k)[i])));
      m = std::max(m, double(std::fabs(a.at(k)[i])));
    }
  return d / m;
}

// A column of train_log.csv (3: train loss, 6: validation loss), one value per step; NaN where
// the cell is empty (no validation at that step).
std::vector<double> log_column(const fs::path& run, int col) {
  std::vector<double> out;
  std::istringstream in(read_text(run / "train_log.csv"));
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::istringstream row(line);
    std::string cell;
    for (int k = 0; k < col; ++k)
      if (!std::getline(row, cell, ',')) cell.clear();
    out.push_back(cell.empty() ? std::numeric_limits<double>::quiet_NaN() : std::stod(cell));
  }
  return out;
}
std::vector<double> losses(const fs::path& run) { return log_column(run, 3); }

const std::string kHm = HM_BIN;
// MQAR draws: targets only at the queries, so the ranks' parts count different numbers of
// targets and the weighting by counted targets matters. Batch 5 splits 2 + 3.
const std::string kTaskRun = " train --task mqar --task-vocab 64 --seq-len 32 --kv 4 --preset tiny --batch 5 "
                             "--threads 1 --device cpu --seed 7";
const std::string kTask = kTaskRun + " --eval-every 3 --task-eval 16";

TEST(DataParallel, TwoRanksMatchOneProcess) {
  const fs::path d = scratch("match");
  ASSERT_EQ(sh(kHm + kTask + " --steps 6 --out " + (d / "one").string(), d / "one.log"), 0) << read_text(d / "one.log");
  ASSERT_EQ(sh(mpirun(2) + " " + kHm + kTask + " --steps 6 --out " + (d / "two").string(), d / "two.log"), 0)
      << read_text(d / "two.log");
  const std::vector<double> l1 = losses(d / "one"), l2 = losses(d / "two");
  ASSERT_EQ(l1.size(), 6u);
  ASSERT_EQ(l2.size(), 6u);
  for (size_t i = 0; i < l1.size(); ++i) EXPECT_NEAR(l1[i], l2[i], 2e-5) << "step " << i + 1;
  // The same global batch, so the same step up to the order of the sums.
  EXPECT_LT(rel_diff(load_weights(d / "one"), load_weights(d / "two")), 1e-5);
  // Rank 0 alone wrote: the checkpoint, the log and the plot, nothing else.
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(d / "two")) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"checkpoint", "loss.svg", "train_log.csv"}));
  EXPECT_NE(read_text(d / "two" / "checkpoint" / "trainer_state.json").find("\"ranks\": 2"), std::string::npos);
  fs::remove_all(d);
}

// The device path (BatchGrad with the optimizer as backend ops) on the CPU backend: the gradient
// buckets are summed from BatchGrad's grads-done callback during the last micro-batch's backward.
// Buckets of 10 KiB (about 20 for the tiny model), gradient accumulation, and a True Hybrid model
// (its router on the host, its budget loss weighed by each rank's share).
TEST(DataParallel, DevicePathBucketsDuringBackward) {
  const fs::path d = scratch("buckets");
  for (const std::string preset : {"tiny", "true-tiny"}) {
    const std::string run = " train --task mqar --task-vocab 64 --seq-len 32 --kv 4 --preset " + preset +
                            " --batch 5 --grad-accum 2 --threads 1 --device cpu --device-path-on-cpu --seed 3 "
                            "--steps 4 --eval-every 0 --task-eval 0";
    const fs::path one = d / (preset + "_one"), two = d / (preset + "_two");
    ASSERT_EQ(sh(kHm + run + " --out " + one.string(), d / "one.log"), 0) << read_text(d / "one.log");
    ASSERT_EQ(sh(mpirun(2) + " " + kHm + run + " --bucket-mb 0.01 --out " + two.string(), d / "two.log"), 0)
        << read_text(d / "two.log");
    EXPECT_NE(read_text(d / "two.log").find("buckets of up to 0.01 MiB, each as the backward finishes it"),
              std::string::npos) << read_text(d / "two.log");
    const std::vector<double> l1 = losses(one), l2 = losses(two);
    ASSERT_EQ(l1.size(), 4u);
    ASSERT_EQ(l2.size(), 4u);
    for (size_t i = 0; i < l1.size(); ++i) EXPECT_NEAR(l1[i], l2[i], 2e-5) << preset << ", step " << i + 1;
    EXPECT_LT(rel_diff(load_weights(one), load_weights(two)), 1e-5) << preset;
  }
  fs::remove_all(d);
}

// A corpus run stopped on 2 ranks and resumed on 1 (and the other way round) ends where the
// uninterrupted single-process run does.
TEST(DataParallel, ResumeOnAnotherNumberOfRanks) {
  const fs::path d = scratch("resume");
  {
    std::ofstream f(d / "corpus.txt");
    for (int i = 0; i < 400; ++i)
      f << "Document " << i << " says that the " << (i % 7) << " quick foxes jumped over " << (i % 13)
        << " lazy dogs, and then rested.\n\n";
  }
  const std::string run = " train --data " + (d / "corpus.txt").string() +
                          " --preset tiny --batch 4 --seq-len 48 --threads 1 --eval-every 2 --eval-tokens 1024 "
                          "--device cpu --steps 4";
  ASSERT_EQ(sh(kHm + run + " --out " + (d / "ref").string(), d / "ref.log"), 0) << read_text(d / "ref.log");
  // 2 ranks, then 1.
  ASSERT_EQ(sh(mpirun(2) + " " + kHm + run + " --stop-after 2 --out " + (d / "a").string(), d / "a1.log"), 0)
      << read_text(d / "a1.log");
  ASSERT_EQ(sh(kHm + " train --resume --threads 1 --out " + (d / "a").string(), d / "a2.log"), 0)
      << read_text(d / "a2.log");
  EXPECT_NE(read_text(d / "a2.log").find("instead of the run's 2"), std::string::npos) << read_text(d / "a2.log");
  // 1 rank, then 2.
  ASSERT_EQ(sh(kHm + run + " --stop-after 2 --out " + (d / "b").string(), d / "b1.log"), 0) << read_text(d / "b1.log");
  ASSERT_EQ(sh(mpirun(2) + " " + kHm + " train --resume --threads 1 --out " + (d / "b").string(), d / "b2.log"), 0)
      << read_text(d / "b2.log");
  const auto ref = load_weights(d / "ref");
  EXPECT_LT(rel_diff(ref, load_weights(d / "a")), 1e-5);
  EXPECT_LT(rel_diff(ref, load_weights(d / "b")), 1e-5);
  const std::vector<double> lr = losses(d / "ref"), la = losses(d / "a"), lb = losses(d / "b");
  ASSERT_EQ(la.size(), lr.size());
  ASSERT_EQ(lb.size(), lr.size());
  for (size_t i = 0; i < lr.size(); ++i) {
    EXPECT_NEAR(la[i], lr[i], 2e-5) << "step " << i + 1;
    EXPECT_NEAR(lb[i], lr[i], 2e-5) << "step " << i + 1;
  }
  // Validation (steps 2 and 4): on 2 ranks its windows are dealt out and summed in an
  // allreduce; the same loss as one process scoring them all.
  const std::vector<double> vr = log_column(d / "ref", 6), va = log_column(d / "a", 6), vb = log_column(d / "b", 6);
  int validated = 0;
  for (size_t i = 0; i < vr.size(); ++i) {
    if (std::isnan(vr[i])) continue;
    ++validated;
    EXPECT_NEAR(va[i], vr[i], 2e-5) << "validation at step " << i + 1;
    EXPECT_NEAR(vb[i], vr[i], 2e-5) << "validation at step " << i + 1;
  }
  EXPECT_EQ(validated, 2);
  // Rank 0 alone reports: one final line in the 2-rank run's output.
  const std::string two = read_text(d / "b2.log");
  EXPECT_EQ(two.find("done at step 4"), two.rfind("done at step 4")) << two;
  EXPECT_NE(two.find("done at step 4"), std::string::npos) << two;
  fs::remove_all(d);
}

// Ranks started with different flags stop at once with an error naming the disagreement.
TEST(DataParallel, RanksWithDifferentSettingsFail) {
  const fs::path d = scratch("settings");
  const auto t0 = std::chrono::steady_clock::now();
  const std::string cmd = mpirun(2) + " sh -c 'exec " + kHm + kTask + " --steps 3 --lr 0.00$((OMPI_COMM_WORLD_RANK + 1)) --out " +
                          (d / "x").string() + "'";
  EXPECT_NE(sh(cmd, d / "log", 60), 0);
  const std::string log = read_text(d / "log");
  EXPECT_NE(log.find("data-parallel ranks disagree: rank 1's hm train settings"), std::string::npos) << log;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(50));
  EXPECT_FALSE(fs::exists(d / "x" / "checkpoint"));
  fs::remove_all(d);
}

TEST(DataParallel, BatchSmallerThanRanksFails) {
  const fs::path d = scratch("batch");
  const std::string cmd = mpirun(2) + " " + kHm +
                          " train --task mqar --task-vocab 64 --seq-len 32 --kv 4 --preset tiny --batch 1 --steps 2 "
                          "--threads 1 --device cpu --out " + (d / "x").string();
  EXPECT_NE(sh(cmd, d / "log", 60), 0);
  const std::string log = read_text(d / "log");
  EXPECT_NE(log.find("--batch 1 across 2 ranks"), std::string::npos) << log;
  fs::remove_all(d);
}

// Starts a 2-rank run with `flags`, waits until both ranks train, sends rank 1 `sig`, and checks
// that the job ends with a failure within `bound` seconds and leaves no rank behind. Returns the
// job's output.
std::string fault(const std::string& name, int sig, const std::string& flags, int bound) {
  const fs::path d = scratch(name);
  const fs::path out = d / "x";
  const pid_t launcher = ::fork();
  if (launcher < 0) {
    ADD_FAILURE() << "fork";
    return "";
  }
  if (launcher == 0) {
    ::setpgid(0, 0);
    const std::string cmd = mpirun(2) + " " + kHm + kTaskRun + " --steps 100000 --save-every 0 --eval-every 0 " +
                            flags + " --out " + out.string() + " > '" + (d / "log").string() + "' 2>&1";
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait until both ranks are training (rank 0 has said so).
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<pid_t> ranks;
  int status = 0;
  while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    if (::waitpid(launcher, &status, WNOHANG) != 0) {
      ADD_FAILURE() << "the job ended before the fault\n" << read_text(d / "log");
      return "";
    }
    ranks.clear();
    for (const auto& e : fs::directory_iterator("/proc")) {
      const std::string pid = e.path().filename().string();
      if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
      const std::string cmdline = read_text(e.path() / "cmdline");
      if (cmdline.rfind(kHm, 0) == 0 && cmdline.find(out.string()) != std::string::npos)
        ranks.push_back(pid_t(std::stoi(pid)));
    }
    if (ranks.size() == 2 && read_text(d / "log").find("training ") != std::string::npos) break;
  }
  std::sort(ranks.begin(), ranks.end());
  if (ranks.size() != 2) {
    ::kill(-launcher, SIGKILL);
    ::waitpid(launcher, &status, 0);
    ADD_FAILURE() << "found " << ranks.size() << " rank processes\n" << read_text(d / "log");
    return "";
  }
  std::this_thread::sleep_for(std::chrono::seconds(1));
  EXPECT_EQ(::kill(ranks[1], sig), 0);
  // The launcher must end, with a failure, within the bound.
  pid_t done = 0;
  const auto t1 = std::chrono::steady_clock::now();
  while ((done = ::waitpid(launcher, &status, WNOHANG)) == 0 &&
         std::chrono::steady_clock::now() - t1 < std::chrono::seconds(bound))
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const std::string log = read_text(d / "log");
  if (done == 0) {  // hung: clean up, then fail
    ::kill(-launcher, SIGKILL);
    for (pid_t p : ranks) ::kill(p, SIGKILL);
    ::waitpid(launcher, &status, 0);
    ADD_FAILURE() << "the job still ran " << bound << " s after the fault\n" << log;
    return log;
  }
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0) << log;
  // Neither rank is left behind (a zombie waiting to be reaped counts as gone).
  auto alive = [](pid_t p) {
    const std::string st = read_text("/proc/" + std::to_string(p) + "/stat");
    const size_t paren = st.rfind(')');
    return paren != std::string::npos && paren + 2 < st.size() && st[paren + 2] != 'Z';
  };
  const auto t2 = std::chrono::steady_clock::now();
  for (pid_t p : ranks) {
    while (alive(p) && std::chrono::steady_clock::now() - t2 < std::chrono::seconds(20))
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_FALSE(alive(p)) << "rank process " << p << " still runs 20 s after the job ended";
    if (alive(p)) ::kill(p, SIGKILL);
  }
  std::fprintf(stderr, "%s: the job ended %.1f s after the fault; its ranks %.1f s after that\n", name.c_str(),
               std::chrono::duration<double>(t2 - t1).count(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t2).count());
  fs::remove_all(d);
  return log;
}

// A rank killed mid-run (SIGKILL: no handler, no message) ends the job instead of leaving the
// other waiting in an allreduce: mpirun notices.
TEST(DataParallel, KilledRankEndsTheJob) { fault("kill", SIGKILL, "", 60); }

// A rank that stops (SIGSTOP: alive, so mpirun sees nothing wrong) leaves the other waiting in
// an allreduce; --dist-timeout's watchdog ends the job with an error naming the rank and step.
TEST(DataParallel, StuckRankEndsTheJobAfterTheTimeout) {
  const std::string log = fault("stop", SIGSTOP, "--dist-timeout 3", 40);
  EXPECT_NE(log.find("hm: error on rank 0 of 2: step "), std::string::npos) << log;
  EXPECT_NE(log.find("made no progress for 3 s"), std::string::npos) << log;
}

}  // namespace
