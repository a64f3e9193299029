// Training loop and evaluation for `hm train` / `hm eval` (docs: this header).
//
// Data: the corpus at data_path is split by document (split_documents, 5% validation, fixed
// seed, so `hm eval` sees the same validation text), each side is tokenized and concatenated
// with EOS between documents. A training batch is B windows of seq_len + 1 tokens at uniformly
// random offsets drawn from an hm::Rng: the RNG state is the whole data position, so a resumed
// run draws exactly the batches the uninterrupted run would have drawn.
//
// Task data (cfg.task.name set, docs/EVALUATION.md): instead of a corpus, batch b of step s
// (micro-batch a) holds train draws (s * grad_accum + a) * batch + b ..., a pure function of the
// step, so resume is exact without any data state; seq_len is the task's L, the model's
// vocab_size becomes the task's vocabulary, and no tokenizer is saved. Validation scores the
// first task_eval test draws (loss in the log's val_loss column; accuracy on stderr).
//
// Output directory layout (out_dir):
//   checkpoint/          the latest complete checkpoint, loadable by `hm generate --model`:
//     config.json, model.safetensors, tokenizer.json (+ tokenizer.model for BPE),
//     optimizer.safetensors, trainer_state.json (step, RNG state, tokens seen, settings)
//   train_log.csv        step,lr,train_loss,grad_norm,tokens_per_s,val_loss,val_ppl
//   loss.svg             train (and validation) loss against step
// A checkpoint is written whole into out_dir/ckpt.tmp-*, then swapped in for checkpoint/ with
// one atomic rename (RENAME_EXCHANGE; where the file system lacks it, checkpoint/ is first moved
// to checkpoint.old/, which resume falls back to), so a crash mid-save never leaves a checkpoint
// whose parts come from different steps.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/dtype.h"
#include "eval/tasks.h"

namespace hm {

class Comm;
class HybridMemory;
class HybridModel;
class Tokenizer;

struct TrainConfig {
  // Model: a preset name, or a config.json (config_file wins when set). The tokenizer's vocab
  // size replaces the config's.
  std::string preset = "tiny", config_file;
  // A model folder to fine-tune (ours, or a Hugging Face one): its config, weights and tokenizer
  // replace preset, config_file and tokenizer, and its vocab_size stays.
  std::string init_from;
  std::string data_path, out_dir;
  std::string tokenizer = "byte";  // byte | bpe (SentencePiece BPE trained on the train split)
  int vocab = 4096;                // BPE only
  int64_t steps = 1000;            // optimizer steps in the whole run
  // Length of the lr schedule (0: steps). A resume with --steps beyond the run's end keeps the
  // schedule it started with: the added steps run at its final lr (lr x min_lr_ratio).
  int64_t lr_steps = 0;
  int batch = 8, seq_len = 128, grad_accum = 1;
  float lr = 1e-3f, min_lr_ratio = 0.1f, weight_decay = 0.1f, clip_norm = 1.0f;
  int64_t warmup = -1;  // < 0: min(100, steps / 10)
  int threads = 0;      // 0: all cores. Results are bit-reproducible for a fixed thread count.
  // Where the steps compute. CUDA: the whole batch at once on the GPU (train/batch_grad.h), the
  // float32 master weights, gradients and AdamW moments kept there; checkpoints are the same
  // files, so a run resumes on either device (the loss curves of the two differ by rounding).
  Device device = Device::CPU;
  // CUDA only: the type activations and GEMM inputs compute in (f32, bf16, f16); master weights,
  // gradients and the optimizer stay float32.
  DType compute = DType::F32;
  // Test hook: a CPU run through the device path (BatchGrad and the optimizer ops on the CPU
  // backend), to check that path where no GPU is.
  bool device_path_on_cpu = false;
  uint64_t seed = 0;    // initialization and batch order
  int64_t eval_every = 100; // 0: only at the end
  int64_t save_every = 200; // 0: only at the end
  int64_t eval_tokens = 32768;  // validation tokens evaluated (0: all)
  int scan_chunk = 0;           // loss_and_grad's selective-scan checkpointing (0: off)
  bool grad_ckpt = false;       // loss_and_grad's per-layer gradient checkpointing
  bool resume = false;
  // Flags the user set explicitly (e.g. "--lr"). On resume, those whose setting comes from the
  // checkpoint are reported as ignored; --steps is honoured (it continues or stops the run
  // there). Empty for callers that are not a command line.
  std::vector<std::string> given_flags;
  // Stop (with a checkpoint) after this step even though the schedule runs to `steps`, as an
  // interruption would; the run can be resumed. 0: run to the end.
  int64_t stop_after = 0;
  bool progress = true;  // progress line and messages on stderr
  // Train on a task's draws instead of data_path (name empty: corpus). seq_len sets its L; the
  // other 0 fields take the task's defaults (resolve_task).
  TaskSpec task;
  int64_t task_eval = 512;  // test examples scored at each validation (0: no validation)
  // Called after every optimizer step (a caller's progress display); may be empty.
  std::function<void(int64_t step, int64_t steps, double loss)> on_step;

  // Data parallelism (docs/DISTRIBUTED.md): this process is rank comm->rank() of comm->size();
  // null: alone. --batch stays the global micro-batch: rank r computes sequences
  // [r * batch / size, (r + 1) * batch / size) of every micro-batch (each rank draws the whole
  // global batch, so the data order, and a resume on another number of ranks, is the
  // single-process run's), weighed by its share of the counted targets; the gradients are summed
  // across ranks before the optimizer step, which every rank then takes alike. Rank 0 alone
  // writes the checkpoint, logs and progress; every rank reads a checkpoint on resume (out_dir on
  // a file system all ranks see). The ranks check that they hold the same settings, data and
  // weights (hm::Error naming what differs).
  Comm* comm = nullptr;
  // With ranks: the gradients are summed in buckets of this many MiB (as PyTorch DDP's
  // bucket_cap_mb); on a device each is sent as soon as the backward has finished it.
  double bucket_mb = 25;
  // With ranks: a step (its compute, collectives and checkpoint) that takes longer than this
  // many seconds on any rank ends the whole job with an error naming the rank and step, where a
  // collective would otherwise wait forever for a rank that is stuck (or gone without mpirun
  // noticing). 0: wait forever. The default is PyTorch's NCCL timeout.
  double dist_timeout_s = 600;

  // Test hook: treat the loss of this step (1-based) as NaN. -1: off.
  int64_t debug_nan_step = -1;
};

// Runs (or, with resume, continues) the training described above. hm::Error, before anything
// is written, for bad settings or bad data (missing, empty, not UTF-8, too short for one
// window); hm::Error after stopping for a non-finite loss or gradient norm (checkpoint/ then
// still holds the last good step). When interrupt_signal() (core/interrupt.h) is set, the
// current step finishes, a checkpoint of it is written and hm::Interrupted is thrown.
void train(const TrainConfig& cfg);

struct EvalResult {
  double loss = 0, ppl = 0;  // mean cross-entropy (nats/token) and exp(loss)
  int64_t tokens = 0;        // targets scored
  int64_t step = -1;         // the checkpoint's training step when known
  // Baseline on the same tokenizer and the same scored tokens: a unigram model of the
  // training split's token frequencies (add-one smoothed over the tokenizer's vocabulary).
  double unigram_loss = 0, unigram_ppl = 0;
};

// Validation loss of a model directory (a training out_dir, its checkpoint/, or any directory
// with config.json + model.safetensors + tokenizer) on the validation split of data_path,
// the same split and windows `hm train` reports. seq_len 0 and max_tokens < 0 take the training
// run's values from trainer_state.json when there is one (else 128 and 32768); max_tokens 0:
// the whole split. weights: the format the linear layers are packed in (HybridModel::
// set_weight_format), F32 to score the float32 weights; absent: as the checkpoint stores them.
// Packed weights are scored through the model's forward (what hm generate computes), float32
// ones through the training forward as hm train does; both over the same windows.
// where: on a device (hm eval --device cuda) the float32 weights go to the backend and each batch
// of windows is scored by BatchGrad::loss_sum, as the trainer's validation on --device cuda;
// hm::Error naming the reason for what only the CPU scores (packed weights, True Hybrid layers,
// layers without a backward pass).
struct EvalDevice {
  Device device = Device::CPU;
  DType compute = DType::F32;  // what activations and GEMM inputs compute in there
  // Test hook: the device path on the CPU backend (as TrainConfig::device_path_on_cpu).
  bool path_on_cpu = false;
  bool on_device() const { return device != Device::CPU || path_on_cpu; }
};
EvalResult evaluate(const std::string& model_dir, const std::string& data_path, int seq_len = 0,
                    int64_t max_tokens = -1, int batch = 8, std::optional<DType> weights = std::nullopt,
                    const EvalDevice& where = {});

// evaluate()'s defaults, for other scorers of the same windows (eval/weight_quality.h): seq_len
// <= 0 and max_tokens < 0 become the training run's values from model_dir's trainer_state.json
// (else 128 and 32768); *step is the checkpoint's step (-1 when unknown).
void eval_window_defaults(const std::string& model_dir, int& seq_len, int64_t& max_tokens, int64_t* step);
// The validation split of data_path as one token stream (each document's tokens, then EOS): what
// hm train validates on and evaluate() scores, window w being tokens [w*L, w*L + L].
std::vector<int32_t> validation_tokens(const Tokenizer& tok, const std::string& data_path);

// The one walk over evaluate()'s windows of a token stream, for every scorer of them (the training
// forward, the inference forward, eval/weight_quality.h): window w covers tokens [w*L, w*L + L]
// (inputs the first L, targets the last L), the last one shorter, until max_tokens targets (0:
// all); equal-length windows go B at a time. score(pos, nb, len) scores the nb windows of len
// tokens from stream[pos] on and adds the cross-entropy summed over their nb * len targets
// (stream[pos + 1 ..]) to nll. Returns the mean over all targets scored (step and unigram unset).
EvalResult eval_windows(const std::vector<int32_t>& stream, int L, int64_t max_tokens, int B,
                        const std::function<void(int64_t pos, int nb, int len, double& nll)>& score);
// Runs the nb windows of len tokens from stream[pos] on through m's forward as one ragged batch
// in slots 0 .. nb-1 of mem (cleared first): every position's logits, [nb * len, V].
void forward_windows(HybridModel& m, HybridMemory& mem, const std::vector<int32_t>& stream, int64_t pos, int nb,
                     int len, std::vector<float>& logits);

// Task accuracy of a model directory (as evaluate()) on test draws 0 .. n-1 of a task. Fields
// of `given` left empty or 0 come from the training run's trainer_state.json (hm::Error when
// there is none and the task is not fully given).
struct TaskEvalResult {
  TaskSpec task;  // as resolved and scored
  TaskScore score;
  double chance = 0;  // chance_accuracy(task)
  int64_t step = -1;  // the checkpoint's training step when known
};
// A training out_dir's checkpoint/ when `model_dir` is one, else model_dir itself.
std::string checkpoint_dir(const std::string& model_dir);
// The task a checkpoint was trained on (name empty if none), from its trainer_state.json; `dir`
// may be a training out_dir or its checkpoint/. step: the checkpoint's step, -1 if unknown.
TaskSpec checkpoint_task(const std::string& dir, int64_t* step = nullptr);
// The sequence length a checkpoint was trained at (its trainer_state.json's seq_len); 0 when it
// has no trainer state (e.g. hm init's random weights). `dir` as for checkpoint_task.
int64_t trained_seq_len(const std::string& dir);
TaskEvalResult evaluate_task(const std::string& model_dir, const TaskSpec& given, int64_t n = 1000,
                             int batch = 16);

}  // namespace hm
