#include "train/device_run.h"

#include <cmath>
#include <tuple>

namespace hm {

DeviceModel::DeviceModel(Device d, DType compute, bool grad_ckpt, const Params& P)
    : owned(make_backend(d)), be(*owned) {
  upload(grad_ckpt, compute, P);
}

DeviceModel::DeviceModel(Backend& backend, DType compute, bool grad_ckpt, const Params& P) : be(backend) {
  upload(grad_ckpt, compute, P);
}

void DeviceModel::upload(bool grad_ckpt, DType compute, const Params& P) {
  const size_t bytes = sizeof(float) * size_t(P.numel());
  p = Buffer(be, bytes);
  be.to_device(p.data(), P.data(), bytes);
  bg = std::make_unique<BatchGrad>(be, P, compute, grad_ckpt);
  bg->set_weights(p.f32());
}

double DeviceModel::mean_loss(const int32_t* in, const int32_t* tg, int nb, int len) {
  int64_t counted = 0;
  const double sum = bg->loss_sum(in, tg, nb, len, &counted);
  return counted > 0 ? sum / double(counted) : 0.0;
}

DeviceRun::DeviceRun(Device d, DType compute, bool grad_ckpt, const Params& P, const AdamW& opt)
    : DeviceModel(d, compute, grad_ckpt, P), oc(opt.config()) {
  init(P, opt);
}

DeviceRun::DeviceRun(Backend& backend, DType compute, bool grad_ckpt, const Params& P, const AdamW& opt)
    : DeviceModel(backend, compute, grad_ckpt, P), oc(opt.config()) {
  init(P, opt);
}

void DeviceRun::init(const Params& P, const AdamW& opt) {
  const size_t bytes = sizeof(float) * size_t(P.numel());
  g = Buffer(be, bytes);
  m = Buffer(be, bytes);
  v = Buffer(be, bytes);
  be.to_device(m.data(), opt.m().data(), bytes);
  be.to_device(v.data(), opt.v().data(), bytes);
  be.memzero(g.data(), bytes);  // the padding between tensors stays 0
  for (size_t k = 0; k < P.specs().size(); ++k)
    spans.push_back({P.at(k) - P.data(), P.specs()[k].numel(), decays(P.specs()[k].name) ? oc.weight_decay : 0.0f});
}

double DeviceRun::step(AdamW& opt, float lr) {
  const double norm = std::sqrt(be.sum_squares(g.f32(), spans));
  if (!std::isfinite(norm)) return norm;
  const bool clip = oc.clip_norm > 0.0f && norm > double(oc.clip_norm);
  Backend::AdamWStep k;
  k.lr = lr;
  k.beta1 = oc.beta1;
  k.beta2 = oc.beta2;
  k.eps = oc.eps;
  std::tie(k.inv_bc1, k.inv_bc2) = opt.count_step();
  k.grad_scale = clip ? float(double(oc.clip_norm) / norm) : 1.0f;
  be.adamw_step(p.f32(), g.f32(), m.f32(), v.f32(), spans, k);
  bg->set_weights(p.f32());  // the compute copy follows the new master weights
  return norm;
}

void DeviceRun::to_host(Params& P, AdamW* opt) {
  be.to_host(P.data(), p.data(), p.bytes());
  if (!opt) return;
  be.to_host(opt->m().data(), m.data(), m.bytes());
  be.to_host(opt->v().data(), v.data(), v.bytes());
}

}  // namespace hm
