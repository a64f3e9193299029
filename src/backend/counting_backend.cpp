#include "backend/counting_backend.h"

#include <chrono>

namespace hm {

const char* op_kind_name(OpKind k) {
  static const char* names[] = {"rmsnorm", "linear", "conv1d_silu", "selective_scan", "rope",
                                "kv_write", "attention", "swiglu", "embedding", "copy_rows",
                                "add_rows", "ssd_scan", "gated_rmsnorm"};
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

}  // namespace hm
