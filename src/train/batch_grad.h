// Loss and gradients of a whole batch on one backend (docs/TRAINING.md, "Training on a device"):
// the B sequences run as one ragged batch through the backend's training ops, with parameters,
// gradients and activations in the backend's memory. This is how `hm train --device cuda`
// computes; on a host backend it computes what loss_and_grad (model_grad.h) does, which the
// tests use to check it.
//
// Weights: a float32 master arena in the layout of a Params (element offsets of model_grad's
// Layout). The ops compute in `compute` (f32, or bf16 / f16 on a backend that supports them):
// in a 16-bit type the master arena is converted once per set_weights into a compute copy, and
// every parameter gradient still accumulates in float32 (mixed precision as practitioners run
// it: 16-bit activations and GEMM inputs, float32 master weights, gradients and optimizer).
//
// grad_ckpt (per-layer activation checkpointing, as loss_and_grad's): the forward keeps, per
// layer, only the stream entering it (after its bridge, [n, D]) and computes every layer in one
// slot; the backward re-runs layer i-1's forward into the slot once layer i's mixer backward is
// done, which also rebuilds the inner output layer i's bridge needs. The same ops on the same
// inputs, so loss and gradients are bit-identical to grad_ckpt off, for about one more forward.
//
// True Hybrid layers train on cross-entropy + budget loss as model_grad.h describes: the router,
// the route decisions and the gates' dot products run on the host (as inference's router does),
// the two paths over their compacted tokens and the fusion as backend ops.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "model/params.h"

namespace hm {

class BatchGrad {
 public:
  // layout: the model's Params (its config and offsets; values are not read).
  // scan_chunk: the selective scan keeps the state entering every scan_chunk tokens and
  // recomputes the rest in the backward (0: the backend's choice; Backend::scan_saved_bytes).
  BatchGrad(Backend& be, const Params& layout, DType compute, bool grad_ckpt = false, int scan_chunk = 0);
  ~BatchGrad();
  BatchGrad(const BatchGrad&) = delete;
  BatchGrad& operator=(const BatchGrad&) = delete;

  // The weights the next calls compute with: master, layout.numel() floats in the backend's
  // memory (kept by pointer: set it again after the values change, e.g. after an optimizer step).
  void set_weights(const float* master);

  // Mean cross-entropy over the positions whose target is >= 0 of B sequences of L tokens
  // (tokens, targets: host arrays [B, L], checked as loss_and_grad checks them); adds
  // grad_scale x its gradient into grads (layout.numel() floats in the backend's memory).
  // Returns 0 without touching grads when no target counts. Not in f16: without loss scaling its
  // gradients underflow (hm::Error; bf16 has float32's range).
  double loss_and_grad(float* grads, const int32_t* tokens, const int32_t* targets, int B, int L,
                       double grad_scale = 1.0);
  // The forward alone: the sum of the cross-entropies of the counted positions (*counted gets
  // their number).
  double loss_sum(const int32_t* tokens, const int32_t* targets, int B, int L, int64_t* counted);

  // Bytes of backend memory the activations and scratch buffers hold now (they are kept and
  // reused between calls, grown when a batch needs more). Without grad_ckpt: per layer the
  // stream entering it and everything its backward reads (a Mamba layer's x, z, xc, dt, yg
  // [n, d_inner], dt_r|B|C, scan states; an attention layer's q, k, v, contexts, lse; the MLP's);
  // with it: per layer the stream, plus one slot as large as the largest layer.
  size_t activation_bytes() const;
  // The objective's budget term of the last call (True Hybrid models; 0 otherwise), weighted as
  // loss_and_grad's *aux_loss; loss_and_grad and loss_sum return the cross-entropy alone.
  double budget_loss() const;
  // The routing logits r_t of the last forward: sequence by sequence, then true layer, then t
  // (model_grad.h's LossAux::logits order). Empty without True Hybrid layers.
  std::vector<double> route_logits() const;
  DType compute() const;
  bool grad_ckpt() const;
  // Called during loss_and_grad's backward each time a span of the gradient arena is final for
  // the call: [begin, end) in elements, from the end of the arena down (final norm and an untied
  // head, the last layer, ..., the first, the embedding), together [0, layout.numel()) once.
  // The backend's work for the span is enqueued, not necessarily done. Data parallelism sums
  // each span across ranks meanwhile (GradReducer, train/comm.h). Empty: no calls.
  void set_grads_done(std::function<void(int64_t begin, int64_t end)> fn);
  // On: every MoE layer chooses the experts its last forward chose for each token (the gates
  // still follow the scores), so the loss is smooth in the weights and central differences
  // measure the gradient, which holds the choice fixed. For the tests; the next batch must have
  // the last one's shape.
  void freeze_routing(bool on);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hm
