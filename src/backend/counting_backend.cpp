#include "backend/counting_backend.h"

#include <chrono>

namespace hm {

const char* op_kind_name(OpKind k) {
  static const char* names[] = {"rmsnorm", "linear", "conv1d_silu", "selective_scan", "rope",
                                "kv_write", "attention", "swiglu", "embedding", "copy_rows",
                                "add_rows", "ssd_scan", "gated_rmsnorm", "relu2", "linear_backward",
                                "rmsnorm_backward", "swiglu_backward", "conv1d_silu_train",
                                "conv1d_silu_backward", "selective_scan_train",
                                "selective_scan_backward", "attention_train", "attention_backward",
                                "rope_backward", "embedding_backward", "cross_entropy_head",
                                "scale_cols_backward", "convert", "sum_squares", "adamw_step", "copy",
                                "ssd_scan_train", "ssd_scan_backward", "gated_rmsnorm_backward",
                                "relu2_backward", "row_dots", "router"};
  static_assert(sizeof(names) / sizeof(names[0]) == size_t(OpKind::kCount));
  return names[size_t(k)];
}

void CountingBackend::reset() {
  counts_ = {};
  log_.clear();
}

double CountingBackend::total_flops() const {
  double f = 0;
  for (const OpCount& c : counts_) f += c.flops;
  return f;
}

template <class F>
void CountingBackend::run(OpKind k, const void* tag, int64_t rows, double flops, F&& op) {
  using Clock = std::chrono::steady_clock;
  OpCount& c = counts_[size_t(k)];
  ++c.calls;
  c.rows += rows;
  c.flops += flops;
  if (logging_) log_.push_back({k, tag, rows, flops});
  const auto t0 = Clock::now();
  op();
  in_.synchronize();
  c.seconds += std::chrono::duration<double>(Clock::now() - t0).count();
}

namespace {
// Causal (query, key) pairs of L queries at positions pos0..pos0+L-1.
double causal_pairs(int L, int pos0) { return double(L) * pos0 + double(L) * (L + 1) / 2.0; }
// The same within each sequence of a training batch (every sequence its own keys from 0).
double own_pairs(const Ragged& rg) {
  double p = 0;
  for (int s = 0; s < rg.nseq(); ++s) p += causal_pairs(rg.len(s), 0);
  return p;
}
}  // namespace

void CountingBackend::rmsnorm(Tensor out, Tensor x, Tensor w, float eps) {
  run(OpKind::Rmsnorm, out.data, x.rows, 0, [&] { in_.rmsnorm(out, x, w, eps); });
}
void CountingBackend::linear(Tensor y, Tensor x, Tensor W, bool accumulate) {
  run(OpKind::Linear, W.data, x.rows, 2.0 * x.rows * W.rows * W.cols, [&] { in_.linear(y, x, W, accumulate); });
}
void CountingBackend::swiglu(Tensor out, Tensor g, Tensor u) {
  run(OpKind::Swiglu, out.data, g.rows, 0, [&] { in_.swiglu(out, g, u); });
}

void CountingBackend::relu2(Tensor out, Tensor x) {
  run(OpKind::Relu2, out.data, x.rows, 0, [&] { in_.relu2(out, x); });
}
void CountingBackend::embedding(Tensor out, Tensor table, const int32_t* ids) {
  run(OpKind::Embedding, out.data, out.rows, 0, [&] { in_.embedding(out, table, ids); });
}
void CountingBackend::conv1d_silu(Tensor out, const StatePool& st, Tensor x, Tensor w, Tensor b,
                                  const Ragged& rg) {
  run(OpKind::Conv, w.data, rg.n_tokens(), 2.0 * rg.n_tokens() * x.cols * w.cols,
      [&] { in_.conv1d_silu(out, st, x, w, b, rg); });
}
void CountingBackend::selective_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt,
                                     Tensor dt_bias, const float* A, Tensor B, Tensor C,
                                     Tensor Dskip, Tensor z, const Ragged& rg) {
  run(OpKind::Scan, Dskip.data, rg.n_tokens(), kScanFlops * rg.n_tokens() * x.cols * B.cols,
      [&] { in_.selective_scan(y, st, x, dt, dt_bias, A, B, C, Dskip, z, rg); });
}
void CountingBackend::ssd_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt, Tensor dt_bias,
                               const float* A, Tensor B, Tensor C, Tensor Dskip, int heads, int groups,
                               float dt_min, float dt_max, const Ragged& rg) {
  const double N = groups > 0 ? double(B.cols) / groups : 0;
  run(OpKind::SsdScan, Dskip.data, rg.n_tokens(), kSsdFlops * rg.n_tokens() * x.cols * N,
      [&] { in_.ssd_scan(y, st, x, dt, dt_bias, A, B, C, Dskip, heads, groups, dt_min, dt_max, rg); });
}
void CountingBackend::gated_rmsnorm(Tensor out, Tensor y, Tensor z, Tensor w, int group, float eps) {
  run(OpKind::GatedNorm, out.data, y.rows, 0, [&] { in_.gated_rmsnorm(out, y, z, w, group, eps); });
}
void CountingBackend::rope(Tensor x, int heads, int hd, float theta, const Ragged& rg) {
  run(OpKind::Rope, x.data, rg.n_tokens(), 0, [&] { in_.rope(x, heads, hd, theta, rg); });
}
void CountingBackend::kv_write(const KvPool& kv, Tensor k, Tensor v, const Ragged& rg) {
  run(OpKind::KvWrite, kv.k, rg.n_tokens(), 0, [&] { in_.kv_write(kv, k, v, rg); });
}
void CountingBackend::attention(Tensor out, Tensor q, const KvPool& kv, int H, int G, int hd,
                                const Ragged& rg) {
  double pairs = 0;
  for (int s = 0; s < rg.nseq(); ++s) pairs += causal_pairs(rg.len(s), rg.pos0(s));
  run(OpKind::Attention, kv.k, rg.n_tokens(), 4.0 * H * hd * pairs,
      [&] { in_.attention(out, q, kv, H, G, hd, rg); });
}
void CountingBackend::copy_rows(Tensor dst, const int32_t* dst_idx, Tensor src,
                                const int32_t* src_idx, int n) {
  run(OpKind::CopyRows, dst.data, n, 0, [&] { in_.copy_rows(dst, dst_idx, src, src_idx, n); });
}
void CountingBackend::add_rows(Tensor dst, const int32_t* dst_idx, Tensor src, const int32_t* src_idx,
                               int n, const float* row_gate, Tensor scale) {
  run(OpKind::AddRows, dst.data, n, 0, [&] { in_.add_rows(dst, dst_idx, src, src_idx, n, row_gate, scale); });
}


void CountingBackend::linear_backward(Tensor dx, Tensor dW, Tensor dy, Tensor x, Tensor W, bool accumulate_dx) {
  const double mnk = 2.0 * x.rows * W.rows * W.cols;
  run(OpKind::LinearBackward, W.data, x.rows, dx.empty() ? mnk : 2 * mnk,
      [&] { in_.linear_backward(dx, dW, dy, x, W, accumulate_dx); });
}
void CountingBackend::rmsnorm_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, float eps,
                                       bool accumulate_dx) {
  run(OpKind::RmsnormBackward, dx.data, x.rows, 0,
      [&] { in_.rmsnorm_backward(dx, dw, dout, x, w, eps, accumulate_dx); });
}
void CountingBackend::swiglu_backward(Tensor dg, Tensor du, Tensor dout, Tensor g, Tensor u) {
  run(OpKind::SwigluBackward, dg.data, g.rows, 0, [&] { in_.swiglu_backward(dg, du, dout, g, u); });
}
void CountingBackend::relu2_backward(Tensor dx, Tensor dout, Tensor x) {
  run(OpKind::Relu2Backward, dx.data, x.rows, 0, [&] { in_.relu2_backward(dx, dout, x); });
}
void CountingBackend::conv1d_silu_train(Tensor out, Tensor x, Tensor w, Tensor b, const Ragged& rg) {
  run(OpKind::ConvTrain, w.data, rg.n_tokens(), 2.0 * rg.n_tokens() * x.cols * w.cols,
      [&] { in_.conv1d_silu_train(out, x, w, b, rg); });
}
void CountingBackend::conv1d_silu_backward(Tensor dx, Tensor dw, Tensor db, Tensor dout, Tensor x,
                                           Tensor w, Tensor b, const Ragged& rg) {
  run(OpKind::ConvBackward, w.data, rg.n_tokens(), 4.0 * rg.n_tokens() * x.cols * w.cols,
      [&] { in_.conv1d_silu_backward(dx, dw, db, dout, x, w, b, rg); });
}
void CountingBackend::selective_scan_train(Tensor y, void* saved, Tensor x, Tensor dt, Tensor dt_bias,
                                           Tensor A_log, Tensor B, Tensor C, Tensor Dskip, Tensor z,
                                           int chunk, const Ragged& rg) {
  run(OpKind::ScanTrain, Dskip.data, rg.n_tokens(), kScanFlops * rg.n_tokens() * x.cols * B.cols,
      [&] { in_.selective_scan_train(y, saved, x, dt, dt_bias, A_log, B, C, Dskip, z, chunk, rg); });
}
void CountingBackend::selective_scan_backward(Tensor dx, Tensor ddt, Tensor dB, Tensor dC, Tensor dz,
                                              Tensor ddt_bias, Tensor dA_log, Tensor dDskip, Tensor dy,
                                              const void* saved, Tensor x, Tensor dt, Tensor dt_bias,
                                              Tensor A_log, Tensor B, Tensor C, Tensor Dskip, Tensor z,
                                              int chunk, const Ragged& rg) {
  run(OpKind::ScanBackward, Dskip.data, rg.n_tokens(), 2 * kScanFlops * rg.n_tokens() * x.cols * B.cols, [&] {
    in_.selective_scan_backward(dx, ddt, dB, dC, dz, ddt_bias, dA_log, dDskip, dy, saved, x, dt, dt_bias,
                                A_log, B, C, Dskip, z, chunk, rg);
  });
}
void CountingBackend::ssd_scan_train(Tensor y, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B,
                                     Tensor C, Tensor Dskip, int heads, int groups, float dt_min, float dt_max,
                                     const Ragged& rg) {
  const double N = groups > 0 ? double(B.cols) / groups : 0;
  run(OpKind::SsdScanTrain, Dskip.data, rg.n_tokens(), kSsdFlops * rg.n_tokens() * x.cols * N,
      [&] { in_.ssd_scan_train(y, x, dt, dt_bias, A_log, B, C, Dskip, heads, groups, dt_min, dt_max, rg); });
}
void CountingBackend::ssd_scan_backward(Tensor dx, Tensor ddt, Tensor dB, Tensor dC, Tensor ddt_bias, Tensor dA_log,
                                        Tensor dDskip, Tensor dy, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log,
                                        Tensor B, Tensor C, Tensor Dskip, int heads, int groups, float dt_min,
                                        float dt_max, const Ragged& rg) {
  const double N = groups > 0 ? double(B.cols) / groups : 0;
  run(OpKind::SsdScanBackward, Dskip.data, rg.n_tokens(), 3 * kSsdFlops * rg.n_tokens() * x.cols * N, [&] {
    in_.ssd_scan_backward(dx, ddt, dB, dC, ddt_bias, dA_log, dDskip, dy, x, dt, dt_bias, A_log, B, C, Dskip, heads,
                          groups, dt_min, dt_max, rg);
  });
}
void CountingBackend::gated_rmsnorm_backward(Tensor dy, Tensor dz, Tensor dw, Tensor dout, Tensor y, Tensor z,
                                             Tensor w, int group, float eps) {
  run(OpKind::GatedNormBackward, dout.data, y.rows, 0,
      [&] { in_.gated_rmsnorm_backward(dy, dz, dw, dout, y, z, w, group, eps); });
}
void CountingBackend::attention_train(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, int H, int G,
                                      int hd, const Ragged& rg) {
  run(OpKind::AttentionTrain, q.data, rg.n_tokens(), 4.0 * H * hd * own_pairs(rg),
      [&] { in_.attention_train(out, lse, q, k, v, H, G, hd, rg); });
}
void CountingBackend::attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k,
                                         Tensor v, Tensor out, Tensor lse, int H, int G, int hd,
                                         const Ragged& rg) {
  run(OpKind::AttentionBackward, q.data, rg.n_tokens(), 10.0 * H * hd * own_pairs(rg),
      [&] { in_.attention_backward(dq, dk, dv, dout, q, k, v, out, lse, H, G, hd, rg); });
}
void CountingBackend::rope_backward(Tensor dx, int heads, int hd, float theta, const Ragged& rg) {
  run(OpKind::RopeBackward, dx.data, rg.n_tokens(), 0, [&] { in_.rope_backward(dx, heads, hd, theta, rg); });
}
void CountingBackend::embedding_backward(Tensor dtable, Tensor dout, const int32_t* ids) {
  run(OpKind::EmbeddingBackward, dtable.data, dout.rows, 0, [&] { in_.embedding_backward(dtable, dout, ids); });
}
double CountingBackend::cross_entropy_head(Tensor dhn, Tensor dW, Tensor hn, Tensor W,
                                           const int32_t* targets, double scale) {
  double loss = 0;
  run(OpKind::CrossEntropyHead, W.data, hn.rows, 6.0 * hn.rows * W.rows * W.cols,
      [&] { loss = in_.cross_entropy_head(dhn, dW, hn, W, targets, scale); });
  return loss;
}

void CountingBackend::scale_cols_backward(Tensor dsrc, Tensor dscale, Tensor ddst, Tensor src, Tensor scale) {
  run(OpKind::ScaleColsBackward, dscale.data, src.rows, 0, [&] { in_.scale_cols_backward(dsrc, dscale, ddst, src, scale); });
}
void CountingBackend::row_dots(Tensor out, Tensor a, const int32_t* a_idx, Tensor b) {
  run(OpKind::RowDots, out.data, b.rows, 2.0 * b.rows * b.cols, [&] { in_.row_dots(out, a, a_idx, b); });
}
void CountingBackend::router(Tensor r, Tensor feats, Tensor u, Tensor w, Tensor fw, Tensor b, const Ragged& rg,
                             int chunk, const StatePool* st) {
  run(OpKind::Router, r.data, u.rows, 8.0 * u.rows * u.cols, [&] { in_.router(r, feats, u, w, fw, b, rg, chunk, st); });
}
void CountingBackend::convert(Tensor dst, Tensor src) {
  run(OpKind::Convert, dst.data, src.rows, 0, [&] { in_.convert(dst, src); });
}
double CountingBackend::sum_squares(const float* x, const std::vector<ArenaSpan>& spans) {
  double s = 0;
  run(OpKind::SumSquares, x, int64_t(spans.size()), 0, [&] { s = in_.sum_squares(x, spans); });
  return s;
}
void CountingBackend::adamw_step(float* p, const float* g, float* m, float* v, const std::vector<ArenaSpan>& spans,
                                 const AdamWStep& k) {
  run(OpKind::AdamwStep, p, int64_t(spans.size()), 0, [&] { in_.adamw_step(p, g, m, v, spans, k); });
}
void CountingBackend::copy(void* dst, const void* src, size_t bytes) {
  run(OpKind::Copy, dst, int64_t(bytes), 0, [&] { in_.copy(dst, src, bytes); });
}

void CountingBackend::copy_many(const std::vector<CopySpan>& spans) {
  if (spans.empty()) return;
  int64_t bytes = 0;
  for (const CopySpan& s : spans) bytes += int64_t(s.bytes);
  run(OpKind::Copy, spans[0].dst, bytes, 0, [&] { in_.copy_many(spans); });
}

}  // namespace hm
