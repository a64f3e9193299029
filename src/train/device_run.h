// Training and scoring with the model's weights in a backend's memory (docs/TRAINING.md,
// "Training on a device"): what `hm train --device cuda`, `hm eval --device cuda` and
// `hm bench --train --device cuda` run.
#pragma once
#include <memory>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "model/params.h"
#include "train/batch_grad.h"
#include "train/optimizer.h"

namespace hm {

// A model's float32 weights in a backend's memory with a BatchGrad over them: what the device
// path trains, validates and scores with (BatchGrad::loss_sum).
struct DeviceModel {
  std::unique_ptr<Backend> owned;  // when it made its own backend
  Backend& be;
  Buffer p;
  std::unique_ptr<BatchGrad> bg;

  // On a new backend of device d, or on `backend` (kept by reference: a caller may wrap one, as
  // hm bench --profile does with a CountingBackend).
  DeviceModel(Device d, DType compute, bool grad_ckpt, const Params& P);
  DeviceModel(Backend& backend, DType compute, bool grad_ckpt, const Params& P);
  // The mean cross-entropy of nb windows of len tokens (every target counted).
  double mean_loss(const int32_t* in, const int32_t* tg, int nb, int len);

 private:
  void upload(bool grad_ckpt, DType compute, const Params& P);
};

// hm train on a device: the float32 master weights, gradients and AdamW moments live in the
// backend's memory; BatchGrad computes each micro-batch there and Backend::adamw_step updates
// them in one pass. The host Params and AdamW get copies when a checkpoint or a task score needs
// them (to_host), so checkpoints are the CPU run's files.
struct DeviceRun : DeviceModel {
  Buffer g, m, v;
  std::vector<Backend::ArenaSpan> spans;
  AdamWConfig oc;

  DeviceRun(Device d, DType compute, bool grad_ckpt, const Params& P, const AdamW& opt);
  DeviceRun(Backend& backend, DType compute, bool grad_ckpt, const Params& P, const AdamW& opt);
  void zero_grads() { be.memzero(g.data(), g.bytes()); }
  // As AdamW::step: clip by the global norm, one step; a non-finite norm touches nothing.
  // Returns the norm before clipping.
  double step(AdamW& opt, float lr);
  void to_host(Params& P, AdamW* opt);

 private:
  void init(const Params& P, const AdamW& opt);
};

}  // namespace hm
