// The composite ops' default: the plain ops in order (backend.h). Backends that fuse them
// override; this sequence is what an override must equal.
#include "backend/backend.h"

namespace hm {

void Backend::mamba_in(Tensor xz, Tensor xc, int conv_col0, const StatePool& conv, Tensor x, Tensor normed,
                       Tensor norm_w, float eps, Tensor in_proj, Tensor conv_w, Tensor conv_b, const Ragged& rg,
                       bool /*unit_norm*/) {
  // Checked before anything runs: a bad column range must not leave xz half written.
  HM_CHECK(conv_col0 >= 0 && int64_t(conv_col0) + xc.cols <= xz.cols, name(), " mamba_in: conv columns ", conv_col0,
           "..", int64_t(conv_col0) + xc.cols, " outside xz's ", xz.cols);
  Tensor src = x;
  if (norm_w.data != nullptr) {
    rmsnorm(normed, x, norm_w, eps);
    src = normed;
  }
  linear(xz, src, in_proj, false);
  conv1d_silu(xc, conv, xz.cols_view(conv_col0, xc.cols), conv_w, conv_b, rg);
}

void Backend::mamba_mixer(Tensor out, bool accumulate, Tensor x, Tensor normed, Tensor norm_w, float eps,
                          bool unit_norm, const MambaWeights& w, const StatePool& conv, const StatePool& ssm,
                          Tensor xz, Tensor xc, Tensor dbc, Tensor dt, Tensor y, const Ragged& rg) {
  const int E = xc.cols, R = w.dt_w.cols, N = (dbc.cols - R) / 2;
  HM_CHECK(R >= 1 && dbc.cols == R + 2 * N && N >= 1 && xz.cols == 2 * E, name(), " mamba_mixer: dbc has ", dbc.cols,
           " columns for dt rank ", R, ", xz ", xz.cols, " for d_inner ", E);
  mamba_in(xz, xc, 0, conv, x, normed, norm_w, eps, w.in_proj, w.conv_w, w.conv_b, rg, unit_norm);
  linear(dbc, xc, w.x_proj, false);
  dt_scan(y, ssm, xc, dbc.cols_view(0, R), w.dt_w, dt, w.dt_b, w.A, dbc.cols_view(R, N), dbc.cols_view(R + N, N),
          w.Dskip, xz.cols_view(E, E), rg);
  linear(out, y, w.out_proj, accumulate);
}

void Backend::gated_norm_linear(Tensor out, Tensor y, Tensor z, Tensor norm_w, int group, float eps, Tensor W,
                                bool accumulate, Tensor normed) {
  gated_rmsnorm(normed, y, z, norm_w, group, eps);
  linear(out, normed, W, accumulate);
}

void Backend::norm_linear(Tensor y, Tensor x, Tensor normed, Tensor norm_w, float eps, Tensor W, bool accumulate,
                          Tensor scale, Tensor tmp) {
  rmsnorm(normed, x, norm_w, eps);
  if (scale.data == nullptr) {
    linear(y, normed, W, accumulate);
    return;
  }
  HM_CHECK(accumulate, "norm_linear: a scale adds to y (accumulate), it does not assign");
  linear(tmp, normed, W, false);
  add_rows(y, nullptr, tmp, nullptr, y.rows, nullptr, scale);
}

void Backend::kv_attention(Tensor out, Tensor q, Tensor k, Tensor v, const KvPool& kv, int H, int G, int hd,
                           const Ragged& rg) {
  kv_write(kv, k, v, rg);
  attention(out, q, kv, H, G, hd, rg);
}

bool Backend::linear_bridge(Tensor y, Tensor x, Tensor W, Tensor normed, Tensor norm_w, float eps, Tensor bW,
                            Tensor scale, Tensor tmp, Tensor /*folded*/, Tensor /*next_w*/, Tensor /*next*/) {
  linear(y, x, W, true);
  norm_linear(y, x, normed, norm_w, eps, bW, true, scale, tmp.cols > y.cols ? tmp.cols_view(0, y.cols) : tmp);
  return false;
}

void Backend::dt_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt_r, Tensor dt_w, Tensor dt,
                      Tensor dt_bias, const float* A, Tensor B, Tensor C, Tensor Dskip, Tensor z,
                      const Ragged& rg) {
  linear(dt, dt_r, dt_w, false);
  selective_scan(y, st, x, dt, dt_bias, A, B, C, Dskip, z, rg);
}

}  // namespace hm
