#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/device.h"
#include "cli/memory_guard.h"
#include "core/error.h"
#include "core/interrupt.h"
#include "core/threads.h"
#include "dist/mpi_comm.h"
#include "eval/weight_quality.h"
#include "io/hf_model.h"
#include "train/trainer.h"

namespace hm::cli {

Run add_train(CLI::App& app) {
  auto o = std::make_shared<TrainConfig>();
  app.add_option("--preset", o->preset, "Model preset: seed, mamba, transformer, demo, tiny")->capture_default_str();
  app.add_option("--config", o->config_file, "A config.json to use instead of a preset");
  app.add_option("--init-from", o->init_from, "Fine-tune a model folder (ours or a Hugging Face one): start from its "
                 "config, weights and tokenizer instead of --preset/--config/--tokenizer");
  app.add_option("--data", o->data_path, "Training text: a UTF-8 file or a folder of them (required unless --resume or --task)");
  app.add_option("--task", o->task.name, "Train on a synthetic task's draws instead of --data: mqar, copy, induction "
                 "(docs/EVALUATION.md)");
  app.add_option("--task-vocab", o->task.vocab, "Task vocabulary (0: mqar 8192, copy/induction 16)")->capture_default_str();
  app.add_option("--kv", o->task.kv, "mqar: key-value pairs (0: seq-len/16); copy: tokens to copy (0: min(16, seq-len/4))")
      ->capture_default_str();
  app.add_option("--task-eval", o->task_eval, "Task test examples scored at each validation (0: none)")
      ->capture_default_str();
  app.add_option("--out", o->out_dir, "Output directory: checkpoint/, train_log.csv, loss.svg")->required();
  app.add_option("--steps", o->steps, "Optimizer steps (the length of the lr schedule)")->capture_default_str();
  app.add_option("--batch", o->batch, "Sequences per micro-batch")->capture_default_str();
  app.add_option("--seq-len", o->seq_len, "Tokens per sequence")->capture_default_str();
  app.add_option("--lr", o->lr, "Peak learning rate (cosine decay to lr/10)")->capture_default_str();
  app.add_option("--warmup", o->warmup, "Warmup steps (-1: min(100, steps/10))")->capture_default_str();
  app.add_option("--grad-accum", o->grad_accum, "Micro-batches per optimizer step")->capture_default_str();
  app.add_option("--threads,-t", o->threads, "Threads (0 = all cores; on --resume, the run's count)")
      ->capture_default_str()->check(non_negative());
  app.add_option("--seed,-s", o->seed, "Initialization and batch-order seed")->capture_default_str();
  app.add_flag("--grad-ckpt", o->grad_ckpt,
               "Gradient checkpointing: recompute each layer's activations in the backward "
               "(less memory, ~1 more forward of time; same results)");
  app.add_flag("--resume", o->resume, "Continue the run in --out from its checkpoint, exactly");
  auto device = std::make_shared<std::string>("auto");
  app.add_option("--device", *device, "cpu, cuda or auto (cuda when a GPU is present): where the steps compute; "
                 "checkpoints are the same files on either")->capture_default_str();
  auto dtype = std::make_shared<std::string>("auto");
  app.add_option("--dtype", *dtype, "What activations and GEMM inputs compute in: f32, bf16 or auto (bf16 on "
                 "cuda, f32 on cpu); master weights, gradients and AdamW stay f32")->capture_default_str();
  app.add_option("--bucket-mb", o->bucket_mb, "Under mpirun: gradients are summed across ranks in buckets of this "
                 "many MiB, on a GPU while the backward goes on (docs/DISTRIBUTED.md)")->capture_default_str();
  app.add_option("--dist-timeout", o->dist_timeout_s, "Under mpirun: a step that takes longer than this many seconds "
                 "on any rank ends the job with an error, instead of waiting forever on a stuck rank (0: wait)")
      ->capture_default_str();
  // Hidden test hook (tests/dist): the device path (BatchGrad, the optimizer as backend ops, the
  // gradient buckets summed during the backward) on the CPU backend, where no GPU is.
  app.add_flag("--device-path-on-cpu", o->device_path_on_cpu)->group("");
  app.add_option("--tokenizer", o->tokenizer, "byte or bpe (trained on the training split)")->capture_default_str();
  app.add_option("--vocab", o->vocab, "BPE vocabulary size")->capture_default_str();
  app.add_option("--eval-every", o->eval_every, "Validation every N steps (0: only at the end)")->capture_default_str();
  app.add_option("--save-every", o->save_every, "Checkpoint every N steps (0: only at the end)")->capture_default_str();
  app.add_option("--eval-tokens", o->eval_tokens, "Validation tokens scored (0: all)")->capture_default_str();
  app.add_option("--stop-after", o->stop_after, "Stop after this step, resumable, as an interruption would (0: off)")
      ->capture_default_str();
  app.footer(
      "Writes DIR/checkpoint (config.json, model.safetensors, tokenizer.json, optimizer and trainer state; "
      "load it with `hm generate --model DIR/checkpoint`), DIR/train_log.csv and DIR/loss.svg. "
      "--resume takes every setting that shapes the result from the checkpoint (and names each flag it "
      "ignores); --steps N with --resume continues the run to step N. Ctrl-C (or SIGTERM) finishes the "
      "current step, saves a checkpoint and exits with 130 (143); a second Ctrl-C exits at once.");
  add_max_memory(app);
  return [o, device, dtype, &app] {
    o->device = resolve_device(*device);
    if (*dtype == "auto") {
      o->compute = o->device == Device::CUDA ? DType::BF16 : DType::F32;
    } else {
      try {
        o->compute = compute_dtype_from_name(*dtype);
      } catch (const Error&) {
        throw Error(detail::cat("--dtype must be f32, bf16, f16 or auto, got '", *dtype, "'"));
      }
    }
    HM_CHECK(o->resume || !o->data_path.empty() || !o->task.name.empty(),
             "--data or --task is required (unless --resume)");
    for (const CLI::Option* opt : app.get_options())
      if (opt->count() > 0) o->given_flags.push_back(opt->get_name());
    // Started by mpirun: one data-parallel rank of the job (docs/DISTRIBUTED.md).
    std::unique_ptr<Comm> comm;
    if (launcher_world_size() > 0) comm = mpi_world();
    o->comm = comm.get();
    const bool ranks = comm && comm->size() > 1;
    InterruptScope scope;
    try {
      train(*o);
    } catch (const Interrupted& e) {
      if (ranks && comm->rank() != 0) return e.exit_code();  // rank 0 says it
      throw Interrupted(e.signal(), detail::cat(e.what(), "\nresume with: ", ranks ? "mpirun -np N " : "",
                                                program_name(), " train --out ", shell_quote(o->out_dir), " --resume"));
    } catch (const std::exception& e) {
      if (!ranks) throw;
      // The others may be waiting for this rank in a collective: end the whole job.
      std::fflush(stdout);
      std::fprintf(stderr, "hm: error on rank %d of %d: %s\n", comm->rank(), comm->size(), e.what());
      mpi_abort(1);
    }
    return 0;
  };
}

namespace {

// hm eval --weights LIST: evaluate_weights's table (or JSON), after a memory check that counts a
// model per format and the reference, each with its forward's workspace.
int eval_weights(const std::string& model, const std::string& data, const std::vector<DType>& formats, int seq_len,
                 int64_t max_tokens, int batch, bool json) {
  int64_t L = seq_len > 0 ? seq_len : trained_seq_len(model);
  if (L <= 0) L = 128;
  RunShape shape = inference_shape(batch, L, "f32");
  shape.forward_tokens = shape.logit_rows = int64_t(batch) * L;
  const ModelConfig cfg = load_any_config(checkpoint_dir(model));
  MemoryEstimate e = estimate_memory(cfg, shape);
  const int64_t models = int64_t(formats.size()) + 1;
  e.weights *= models;
  e.workspace *= models;
  // Host logits of the reference and of one format, and the reference's log-probabilities.
  e.workspace += int64_t(batch) * L * cfg.vocab_size * int64_t(2 * sizeof(float) + sizeof(double));
  check_memory(e, detail::cat("hm eval --weights (", models, " models)"));
  const WeightQualityResult r = evaluate_weights(model, data, formats, seq_len, max_tokens, batch);
  const char* ref = compute_dtype_name(r.stored);
  if (json) {
    nlohmann::json j = {{"tokens", r.tokens}, {"seq_len", r.seq_len}, {"stored", ref},
                        {"reference", {{"loss", r.ref_loss}, {"ppl", r.ref_ppl}, {"seconds", r.ref_seconds}}}};
    if (r.step >= 0) j["step"] = r.step;
    j["weights"] = nlohmann::json::array();
    for (const WeightQuality& q : r.formats)
      j["weights"].push_back({{"format", compute_dtype_name(q.format)}, {"loss", q.loss}, {"ppl", q.ppl},
                              {"ppl_ratio", q.ppl_ratio}, {"kl_mean", q.kl_mean}, {"kl_p99", q.kl_p99},
                              {"kl_max", q.kl_max}, {"top1_agree", q.top1_agree}, {"seconds", q.seconds}});
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("%lld validation tokens in windows of %d%s; reference: f32 weights%s (perplexity %.3f), the inference "
              "forward\n",
              static_cast<long long>(r.tokens), r.seq_len, r.step >= 0 ? (", step " + std::to_string(r.step)).c_str() : "",
              r.stored == DType::F32 ? "" : (std::string(" dequantized from the stored ") + ref).c_str(), r.ref_ppl);
  std::printf("%-7s %10s %9s %10s %10s %10s %9s %8s\n", "weights", "perplexity", "/ f32", "KL mean", "KL p99",
              "KL max", "top-1 =", "seconds");
  for (const WeightQuality& q : r.formats)
    std::printf("%-7s %10.3f %9.5f %10.3e %10.3e %10.3e %9.5f %8.1f\n", compute_dtype_name(q.format), q.ppl,
                q.ppl_ratio, q.kl_mean, q.kl_p99, q.kl_max, q.top1_agree, q.seconds);
  return 0;
}

}  // namespace

Run add_eval(CLI::App& app) {
  struct Opts {
    std::string model, data;
    int seq_len = 0, batch = 8, threads = 0;
    int64_t max_tokens = -1, examples = 1000;
    bool json = false;
    TaskSpec task;
    DeviceOptions dev;
    std::string weights = "auto";
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model,-m", o->model, "A training --out directory or a checkpoint directory")->required();
  app.add_option("--data", o->data, "The training data; its validation split is scored (perplexity)");
  app.add_option("--task", o->task.name, "Score accuracy on a task's test draws instead: mqar, copy, induction "
                 "(settings not given come from the run)");
  app.add_option("--task-vocab", o->task.vocab, "Task vocabulary (0: the run's, else the model's)");
  app.add_option("--kv", o->task.kv, "Task mqar pairs / copy tokens (0: the run's, else the default)");
  app.add_option("--examples", o->examples, "Task test examples scored")->capture_default_str();
  app.add_option("--seq-len", o->seq_len, "Window length (0: the training run's, else 128)")->capture_default_str();
  app.add_option("--max-tokens", o->max_tokens, "Tokens scored (-1: the training run's count, 0: all)")
      ->capture_default_str();
  app.add_option("--batch", o->batch, "Windows per forward")->capture_default_str();
  app.add_option("--threads,-t", o->threads, "Threads (0 = all cores)")->capture_default_str()->check(non_negative());
  app.add_flag("--json", o->json, "Print one JSON object");
  // Evaluation computes on the CPU unless asked (--device cuda scores --data perplexity through
  // the training forward on the GPU, as hm train --device cuda validates), so the default here is
  // cpu whatever the machine has.
  o->dev.device = "cpu";
  add_device_options(app, o->dev, false);
  app.get_option("--dtype")->description("What activations and GEMM inputs compute in on --device cuda: f32, bf16 "
                                         "or f16 (auto: f32, the CPU's scores to rounding); the CPU evaluates in f32");
  app.add_option("--weights", o->weights, "Weight formats to score against f32, e.g. f32,bf16,f16,q8_0,q4_0: per "
                 "format perplexity, its ratio to f32's and KL(f32 || format) of the next-token distributions, "
                 "all through the inference forward (cpu; auto: the float32 training forward, a packed "
                 "checkpoint as stored)")->capture_default_str();
  add_max_memory(app);
  return [o] {
    if (o->threads > 0) set_num_threads(o->threads);
    const bool weights_given = o->weights != "auto";
    HM_CHECK(!weights_given || o->task.name.empty(), "hm eval --weights: scores --data only for now (task "
             "accuracy runs the float32 training forward)");
    EvalDevice where;
    where.device = resolve_device(o->dev.device);
    const bool on_cpu = where.device == Device::CPU;
    if (o->dev.dtype != "auto") {
      try {
        where.compute = compute_dtype_from_name(o->dev.dtype);
      } catch (const Error&) {
        throw Error(detail::cat("hm eval --dtype must be f32, bf16, f16 or auto, got '", o->dev.dtype, "'"));
      }
    }
    HM_CHECK(!on_cpu || where.compute == DType::F32, "hm eval --dtype ", o->dev.dtype,
             ": the CPU evaluates in f32 only (bf16 and f16 compute on --device cuda)");
    HM_CHECK(o->data.empty() != o->task.name.empty(), "give exactly one of --data (perplexity) and --task (accuracy)");
    HM_CHECK(on_cpu || !weights_given, "hm eval --weights runs the inference forward of each format on the CPU "
             "only for now; use --device cpu");
    HM_CHECK(on_cpu || o->task.name.empty(), "hm eval --task: task accuracy is scored through the model's forward "
             "on the CPU only for now; use --device cpu (--data perplexity runs on --device ",
             device_name(where.device), ")");
    if (weights_given) return eval_weights(o->model, o->data, weight_formats_option(o->weights), o->seq_len,
                                           o->max_tokens, o->batch, o->json);
    // On a device the activations are the device's: the host holds the model alone.
    if (on_cpu)
      check_model_memory(o->model, eval_shape(o->model, o->seq_len, o->batch, !o->task.name.empty()), "hm eval");
    if (!o->task.name.empty()) {
      TaskSpec given = o->task;
      given.seq_len = o->seq_len;
      const TaskEvalResult r = evaluate_task(o->model, given, o->examples, o->batch);
      const TaskSpec& t = r.task;
      if (o->json) {
        nlohmann::json j = {{"task", task_to_json(t)}, {"accuracy", r.score.accuracy},
                            {"correct", r.score.correct}, {"scored", r.score.scored},
                            {"examples", r.score.examples}, {"loss", r.score.loss}, {"chance", r.chance}};
        if (r.step >= 0) j["step"] = r.step;
        std::printf("%s\n", j.dump().c_str());
      } else {
        std::printf("task %s (vocab %d, seq_len %d%s): accuracy %.4f (%lld of %lld scored positions, %lld test "
                    "examples%s)\n",
                    t.name.c_str(), t.vocab, t.seq_len, t.kv > 0 ? (", kv " + std::to_string(t.kv)).c_str() : "",
                    r.score.accuracy, static_cast<long long>(r.score.correct), static_cast<long long>(r.score.scored),
                    static_cast<long long>(r.score.examples),
                    r.step >= 0 ? (", step " + std::to_string(r.step)).c_str() : "");
        std::printf("loss on the scored positions %.4f; chance accuracy %.4f\n", r.score.loss, r.chance);
      }
      return 0;
    }
    const EvalResult r = evaluate(o->model, o->data, o->seq_len, o->max_tokens, o->batch, std::nullopt, where);
    if (o->json) {
      nlohmann::json j = {{"loss", r.loss}, {"ppl", r.ppl}, {"tokens", r.tokens},
                          {"unigram_loss", r.unigram_loss}, {"unigram_ppl", r.unigram_ppl}};
      if (r.step >= 0) j["step"] = r.step;
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("validation loss %.4f, perplexity %.2f (%lld tokens%s)\n", r.loss, r.ppl,
                  static_cast<long long>(r.tokens),
                  r.step >= 0 ? (", step " + std::to_string(r.step)).c_str() : "");
      // The ratio is always >= 1, said as lower or higher, so a worse model never reads "0.00x lower".
      const bool lower = r.ppl <= r.unigram_ppl;
      std::printf("unigram baseline on the same tokens: loss %.4f, perplexity %.2f (the model's is %.2fx %s)\n",
                  r.unigram_loss, r.unigram_ppl, lower ? r.unigram_ppl / r.ppl : r.ppl / r.unigram_ppl,
                  lower ? "lower" : "higher");
    }
    return 0;
  };
}

}  // namespace hm::cli
