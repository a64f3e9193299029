// Loss and gradient of every parameter of the model (docs/MODEL.md; True Hybrid layers:
// docs/TRUE_HYBRID.md) on a batch of token sequences, built from the reference forward/backward
// pairs of kernels/ref/mamba_grad_ref.h and kernels/ref/attention_grad_ref.h.
//
// Each sequence starts from zero state at position 0 and is independent of the others; the loss
// is the mean cross-entropy over every position (of every sequence) whose target is >= 0.
// Sequences run in parallel (OpenMP): each thread keeps its activations and a private gradient
// buffer, and the buffers are summed in thread order at the end (deterministic for a given thread
// count). float runs each sequence through BatchGrad (batch_grad.h: every layer as the backend
// interface's training ops, the same code hm train --device cuda runs; on the CPU backend:
// kernels/cpu/grad_cpu.h's sgemm products and vectorised scan); double and long double run the
// plain reference loops, the oracle for the checks.
#pragma once
#include <cstdint>
#include <vector>

#include "model/params.h"

namespace hm {

class Backend;

// Checks a training batch as every loss function here does (B, L >= 1, scan_chunk >= 0, a model
// that can train, tokens in [0, vocab), targets in [-1, vocab): hm::Error naming the position
// otherwise); returns the number of counted positions (targets >= 0).
int64_t check_train_batch(const ModelConfig& c, const int32_t* tokens, const int32_t* targets, int B, int L,
                          int scan_chunk);
// The backend the float path's layers compute on: the CPU backend unless set_train_backend gave
// another (a host backend: the activations are host memory; null restores the CPU's). Its ops
// are called from every OpenMP thread at once, so a backend that is not thread-safe (a
// CountingBackend) needs one thread. For tests.
Backend& train_backend();
void set_train_backend(Backend* be);

// Mean cross-entropy over positions whose target >= 0 for B sequences of length L (tokens and
// targets [B, L], row-major; targets in [-1, vocab)). Adds (+=) every parameter's gradient into
// grads (same config as params), so gradients accumulate over calls; the caller zeroes. With a
// tied head the embedding gradient gets both the lookup and the head contributions.
// scan_chunk > 0 keeps only every scan_chunk-th selective-scan state in the forward and recomputes
// the rest in the backward (same gradients, less memory). Returns 0 (grads untouched) when no
// target counts. Token or target out of range, B or L < 1, scan_chunk < 0: hm::Error.
// grad_ckpt (gradient checkpointing) keeps only each layer's input stream [L, D] in the forward
// and re-runs the layer's forward just before its backward: bit-identical results, one layer's
// activations held instead of all of them, about one more forward of time.
// Memory: per thread one gradient arena (params.numel() values) and one sequence's activations.
//
// True Hybrid models (soft and hard routing) train on cross-entropy + budget loss: each
// sequence's budget term, sum over true layers of budget_loss_weight * (mean_t p_t -
// attention_budget)^2, is weighted like its cross-entropy, by cnt_b / total (cnt_b: its counted
// positions), so the objective is sum_b cnt_b / total * (mean CE_b + budget_b), the plain mean
// over sequences when every sequence counts the same number of positions. The gradients are
// those of that objective; the returned loss is the cross-entropy alone (perplexity stays
// meaningful) and the budget part goes to *aux_loss when given (0 for other models).
//
// total > 0: these B sequences are one part of a larger batch (a data-parallel rank's shard,
// TrainConfig::comm) whose counted positions number `total`; every share above is cnt_b / total,
// so the returned loss, *aux_loss and the gradients are this part's terms of the whole batch's
// mean, and the parts' sums are the whole batch's values.
double loss_and_grad(const Params& params, Params& grads, const int32_t* tokens,
                     const int32_t* targets, int B, int L, int scan_chunk = 0,
                     bool grad_ckpt = false, double* aux_loss = nullptr, int64_t total = 0);

// The same in double precision, on double copies of the float parameters; the double gradients
// are rounded once when added into grads. For checks.
double loss_and_grad_f64(const Params& params, Params& grads, const int32_t* tokens,
                         const int32_t* targets, int B, int L, int scan_chunk = 0,
                         bool grad_ckpt = false, double* aux_loss = nullptr);

// Measurement: the largest number of bytes the saved-activation buffers of all threads held
// together at the end of a loss_and_grad* call since the last reset (buffers are reused and never
// shrink within a call, so that is the call's peak). Process-wide.
int64_t grad_activation_peak_bytes();
void reset_grad_activation_peak_bytes();

// The loss alone (evaluation): the same forward, no backward; 0 when no target counts. The
// cross-entropy; the budget loss of a True Hybrid model goes to *aux_loss when given.
double loss_only(const Params& params, const int32_t* tokens, const int32_t* targets, int B, int L,
                 double* aux_loss = nullptr);

// What loss_only_arena reports besides the cross-entropy, for checks.
struct LossAux {
  long double budget_loss = 0;  // the objective's budget term, as loss_and_grad's *aux_loss
  // Every true layer's routing logits r_t, sequence-major, then layer, then t (sequences without
  // a counted target are skipped, as in the loss). Filled only when want_logits is set.
  bool want_logits = false;
  std::vector<double> logits;
};

// The computations above on flat arrays of another precision laid out as the Params arena: tensor
// k of layout.specs() starts at element layout.at(k) - layout.data(), and both arrays hold
// layout.numel() elements (layout only supplies the config and the offsets; its values are not
// read). The checks use these: double gradients for the PyTorch comparison, double and long double
// losses for finite differences. loss_and_grad_arena is instantiated for float and double,
// loss_only_arena also for long double.
template <class T>
double loss_and_grad_arena(const Params& layout, const T* params, T* grads, const int32_t* tokens,
                           const int32_t* targets, int B, int L, int scan_chunk = 0,
                           bool grad_ckpt = false, double* aux_loss = nullptr);
template <class T>
long double loss_only_arena(const Params& layout, const T* params, const int32_t* tokens,
                            const int32_t* targets, int B, int L, LossAux* aux = nullptr);

extern template double loss_and_grad_arena<float>(const Params&, const float*, float*,
                                                  const int32_t*, const int32_t*, int, int, int,
                                                  bool, double*);
extern template double loss_and_grad_arena<double>(const Params&, const double*, double*,
                                                   const int32_t*, const int32_t*, int, int, int,
                                                   bool, double*);
extern template long double loss_only_arena<float>(const Params&, const float*, const int32_t*,
                                                   const int32_t*, int, int, LossAux*);
extern template long double loss_only_arena<double>(const Params&, const double*, const int32_t*,
                                                    const int32_t*, int, int, LossAux*);
extern template long double loss_only_arena<long double>(const Params&, const long double*,
                                                         const int32_t*, const int32_t*, int, int,
                                                         LossAux*);

}  // namespace hm
