// `hm compare`: train every architecture on one task (or a corpus) at matched parameter count
// and equal budget, keep the best learning rate per cell, and report a table, CSV, JSON and an
// SVG of the metric against d_model with one panel per sequence length (Zoology's Figure 2).
//
// Architectures (arch_names()); no MLPs anywhere, as in Zoology; attention layers have
// max(1, d_model/64) heads:
//   mamba          4 Mamba layers: the reference size every other one is matched to
//   transformer    attention layers only, as many as match the reference
//   hybrid         Simple Hybrid, Mamba and attention alternating (M A M A ...), state bridges
//   hybrid-nobridge  the same without bridges (the bridge ablation)
//   true-soft      True Hybrid: layer 0 Mamba, the rest true-hybrid layers, soft routing
//   true-hard      the same with hard routing
// and, outside the default set (named explicitly with --archs):
//   attention-2l   Zoology's own attention baseline, 2 attention layers at any size (about
//                  40% of the reference's parameters), to set results against its Figure 2
//   mamba2         Mamba-2 (SSD) layers only, d_state 64, heads of min(64, d_inner) channels,
//                  matched like the others (extra_arch_names(); on CUDA their backward is still
//                  the per-(sequence, head) reference kernel: slow, and its scratch grows with
//                  batch x heads, docs/EVALUATION.md)
//   hybrid-mamba2  Mamba-2 and attention alternating (M2 A M2 A ...), without bridges
// The layer count of each non-reference architecture is the one whose parameter count
// (embeddings included) is closest to the reference's; matched_config() reports it.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/dtype.h"
#include "model/config.h"

namespace hm {

// The matched architectures (the default --archs).
std::vector<std::string> arch_names();
// Matched architectures outside the default set (mamba2, hybrid-mamba2).
std::vector<std::string> extra_arch_names();
extern const char* const kZoologyAttention;  // "attention-2l"
// The config of `arch` with n_layers layers (hm::Error for an unknown arch).
ModelConfig arch_config(const std::string& arch, int d_model, int vocab, int n_layers);
// The layer count matching the reference (4-layer mamba) best, and that config.
ModelConfig matched_config(const std::string& arch, int d_model, int vocab);

struct CompareConfig {
  std::string task = "mqar";  // mqar | copy | induction | perplexity
  std::string data_path;      // perplexity: the corpus (byte tokenizer, the trainer's split)
  std::vector<int> sizes = {64, 128, 256};
  std::vector<int> seq_lens = {64, 128, 256};
  std::vector<float> lrs = {1e-4f, 4.6e-4f, 2.2e-3f, 1e-2f};  // Zoology: logspace(-4, -2, 4)
  std::vector<std::string> archs = arch_names();
  int64_t budget = 1000;  // optimizer steps per run, every run (unless budget_examples)
  // > 0: the budget in training examples per run instead (Zoology's is 100,000 x 64 epochs):
  // each run takes ceil(budget_examples / its batch) steps, so runs of every batch see as many.
  int64_t budget_examples = 0;
  int batch = 64;            // examples (or windows) per step, every run
  std::vector<int> batches;  // or one per seq_lens entry (Zoology: 512, 512, 256 at L 64, 128, 256)
  int task_vocab = 512;   // tasks: vocabulary (Zoology: 8192; reduced for CPU)
  int kv = 0;             // mqar pairs / copy tokens (0: the task default, mqar L/16)
  int64_t test_examples = 1000;  // tasks: test draws scored per run
  int64_t eval_tokens = 65536;   // perplexity: validation tokens scored per run
  std::string out_dir;
  int threads = 0;
  uint64_t seed = 0;
  bool progress = true;
  // Where every run trains (TrainConfig::device, compute): on a device a run's key records both,
  // so CPU results are not reused for it nor the other way round. A task run is scored there
  // too (each test example in chunks ending at its scored positions: one row of logits per
  // example and forward, where the CPU's score_task forms all L).
  Device device = Device::CPU;
  DType compute = DType::F32;
  bool device_path_on_cpu = false;  // test hook: TrainConfig::device_path_on_cpu
  // Runs trained at once (device only), each in its own thread with its own backend: small
  // models are bound by launch latency and host work, which other runs' kernels then fill.
  // A run's result does not depend on it.
  int jobs = 1;
  // Test hook: called as each run starts training, with its name and how many runs (itself
  // included) are training at that moment; what it throws is what the run threw.
  std::function<void(const std::string& run, int running)> on_run_start;
  bool on_device() const { return device != Device::CPU || device_path_on_cpu; }
  int batch_for(size_t seq_len_index) const { return batches.empty() ? batch : batches.at(seq_len_index); }
  int64_t steps_for(size_t seq_len_index) const {
    const int64_t b = batch_for(seq_len_index);
    return budget_examples > 0 ? (budget_examples + b - 1) / b : budget;
  }
};

struct CompareRun {
  std::string arch;
  int d_model = 0, n_layers = 0, seq_len = 0, kv = 0;
  int64_t params = 0;
  float lr = 0;
  double metric = 0;  // tasks: test accuracy; perplexity: validation perplexity
  double loss = 0;    // tasks: test loss on the scored positions; perplexity: validation loss
  double train_s = 0;
  double score_s = 0;  // tasks: scoring the test examples after training
  int64_t steps = 0;   // optimizer steps of batch examples
  int batch = 0;
  bool best = false;  // the best lr of its (arch, d_model, seq_len) cell
  std::string error;  // non-empty: the run failed (metric meaningless)
  bool out_of_memory = false;  // it failed allocating (hm::OutOfMemory) even alone: not reused
};

// Runs (or reuses, when out_dir/runs/<name>/result.json exists from an identical run) every
// (seq_len, d_model, arch, lr) combination, `jobs` at a time; writes out_dir/results.csv,
// results.json and results.svg atomically after each cell completes (with the runs of every
// complete cell, in sweep order), so an interrupted sweep keeps what it finished. On a device a
// task run is scored there (each example in chunks ending at its scored positions).
// Failed runs (e.g. an architecture whose training is not built) are recorded and skipped,
// except that a run that ran out of memory while others trained beside it (jobs > 1) is trained
// again alone after them; one that runs out of memory alone is recorded but trained again by
// the next call instead of being reused (the memory was a property of that moment).
// On a signal (core/interrupt.h) the run in progress saves a checkpoint and pending.json, and
// hm::Interrupted is thrown; the same call later continues that run from its checkpoint.
std::vector<CompareRun> run_compare(const CompareConfig& cfg);

// The table printed at the end: best lr per cell.
std::string compare_table(const CompareConfig& cfg, const std::vector<CompareRun>& runs);
std::string compare_svg(const CompareConfig& cfg, const std::vector<CompareRun>& runs);

}  // namespace hm
