// hm compare: every architecture on one task at matched size and budget (src/eval/compare.h).
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "cli/device.h"
#include "cli/memory_guard.h"
#include "core/error.h"
#include "core/interrupt.h"
#include "eval/compare.h"

namespace hm::cli {

Run add_compare(CLI::App& app) {
  auto o = std::make_shared<CompareConfig>();
  app.add_option("--task", o->task, "mqar, copy, induction, or perplexity (with --data)")->capture_default_str();
  app.add_option("--data", o->data_path, "perplexity: the corpus (byte tokenizer, the trainer's 5% validation split)");
  app.add_option("--sizes", o->sizes, "d_model values")->delimiter(',')->capture_default_str();
  app.add_option("--seq-lens", o->seq_lens, "Sequence lengths (mqar: kv = seq_len/16 unless --kv)")
      ->delimiter(',')->capture_default_str();
  app.add_option("--lrs", o->lrs, "Learning rates tried per cell; the best is kept")->delimiter(',')->capture_default_str();
  app.add_option("--archs", o->archs, "Architectures: mamba, transformer, hybrid, hybrid-nobridge, true-soft, true-hard (matched to the 4-layer mamba; the default); mamba2, hybrid-mamba2 (matched, CPU only so far); attention-2l (Zoology's 2-layer attention, unmatched)")
      ->delimiter(',')->capture_default_str();
  app.add_option("--budget", o->budget, "Optimizer steps per run (equal for every run)")->capture_default_str();
  app.add_option("--examples", o->budget_examples, "Training examples per run instead of --budget steps: each run "
                 "takes ceil(examples / its batch) steps (Zoology: 6400000, 100,000 examples x 64 epochs)")
      ->check(non_negative());
  auto batches = std::make_shared<std::vector<int>>(std::vector<int>{o->batch});
  app.add_option("--batch", *batches, "Examples (or windows) per step: one value, or one per --seq-lens value "
                 "(Zoology: 512,512,256 at 64,128,256)")
      ->delimiter(',')->capture_default_str();
  app.add_option("--jobs,-j", o->jobs, "Runs trained at once, each in its own thread with its own device backend "
                 "(--device cuda); results do not depend on it")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--task-vocab", o->task_vocab, "Task vocabulary (Zoology uses 8192)")->capture_default_str();
  app.add_option("--kv", o->kv, "mqar pairs / copy tokens (0: task default)")->capture_default_str();
  app.add_option("--test-examples", o->test_examples, "Task test examples scored per run")->capture_default_str();
  app.add_option("--eval-tokens", o->eval_tokens, "perplexity: validation tokens scored per run")->capture_default_str();
  app.add_option("--out", o->out_dir, "Output directory: results.csv, results.json, results.svg, runs/")->required();
  app.add_option("--threads,-t", o->threads, "Threads (0 = all cores)")->capture_default_str()->check(non_negative());
  app.add_option("--seed,-s", o->seed, "Initialization and training-draw seed (the test draws are fixed)")
      ->capture_default_str();
  auto device = std::make_shared<std::string>("cpu");
  app.add_option("--device", *device, "cpu, cuda or auto (cuda when a GPU is present): where every run trains, as "
                 "hm train --device")
      ->capture_default_str();
  auto dtype = std::make_shared<std::string>("auto");
  app.add_option("--dtype", *dtype, "cuda: what activations and GEMM inputs compute in, f32, bf16, f16 or auto "
                 "(bf16 on cuda, f32 on cpu), as hm train --dtype")->capture_default_str();
  app.footer(
      "Each architecture's layer count is chosen to match the 4-layer Mamba's parameter count; finished runs in "
      "--out are reused when their settings match, so an interrupted sweep continues. Ctrl-C (or SIGTERM) "
      "finishes the current step, saves that run's checkpoint and exits with 130 (143); the same command "
      "continues it. docs/EVALUATION.md.");
  add_max_memory(app);  // each run's train() checks its own estimate
  return [o, device, dtype, batches] {
    o->device = resolve_device(*device);
    HM_CHECK(!batches->empty(), "--batch needs a value");
    if (batches->size() == 1) o->batch = batches->front();
    else o->batches = *batches;
    if (*dtype == "auto") {
      o->compute = o->device == Device::CUDA ? DType::BF16 : DType::F32;
    } else {
      try {
        o->compute = compute_dtype_from_name(*dtype);
      } catch (const Error&) {
        throw Error(detail::cat("--dtype must be f32, bf16, f16 or auto, got '", *dtype, "'"));
      }
    }
    HM_CHECK(o->device != Device::CPU || o->compute == DType::F32, "hm compare --dtype ", *dtype,
             ": the CPU trains in f32 only (bf16 and f16 compute on --device cuda)");
    InterruptScope scope;
    std::vector<CompareRun> runs;
    try {
      runs = run_compare(*o);
    } catch (const Interrupted& e) {
      throw Interrupted(e.signal(), detail::cat(e.what(), "\nresume with the same command: ", command_line()));
    }
    std::printf("%s", compare_table(*o, runs).c_str());
    std::printf("results: %s/results.csv, results.json, results.svg\n", o->out_dir.c_str());
    return 0;
  };
}

}  // namespace hm::cli
