#include "backend/counting_backend.h"

#include <chrono>

namespace hm {

const char* op_kind_name(OpKind k) {
  static const char* names[] = {"rmsnorm", "linear", "conv1d_silu", "selective_scan", "rope",
                                "attention", "store_f16", "swiglu", "embedding",
                                "add_scaled_rows", "copy_rows", "neg_exp"};
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

void CountingBackend::rmsnorm(float* out, const float* x, const float* w, int n, int d, float eps) {
  run(OpKind::Rmsnorm, out, n, 0, [&] { in_.rmsnorm(out, x, w, n, d, eps); });
}
void CountingBackend::linear(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n,
                             int k, bool accumulate) {
  run(OpKind::Linear, W, m, 2.0 * m * n * k, [&] { in_.linear(y, ldy, x, ldx, W, m, n, k, accumulate); });
}
void CountingBackend::conv1d_silu(float* out, int ldo, float* state, const float* x, int ldx,
                                  const float* w, const float* b, int L, int E, int K) {
  run(OpKind::Conv, w, L, 2.0 * L * E * K, [&] { in_.conv1d_silu(out, ldo, state, x, ldx, w, b, L, E, K); });
}
void CountingBackend::selective_scan(float* y, int ldy, float* state, const float* x, int ldx,
                                     const float* dt, int lddt, const float* dt_bias, const float* A,
                                     const float* B, const float* C, int ldbc, const float* Dskip,
                                     const float* z, int ldz, int L, int E, int N) {
  run(OpKind::Scan, Dskip, L, kScanFlops * L * E * N, [&] {
    in_.selective_scan(y, ldy, state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z, ldz, L, E, N);
  });
}
void CountingBackend::rope(float* x, int ldx, int L, int heads, int hd, int pos0, float theta) {
  run(OpKind::Rope, x, L, 0, [&] { in_.rope(x, ldx, L, heads, hd, pos0, theta); });
}
void CountingBackend::attention(float* out, int ldo, const float* q, int ldq, const float* k,
                                const float* v, int L, int pos0, int H, int G, int hd) {
  run(OpKind::Attention, k, L, 4.0 * H * hd * causal_pairs(L, pos0), [&] { in_.attention(out, ldo, q, ldq, k, v, L, pos0, H, G, hd); });
}
void CountingBackend::attention_f16kv(float* out, int ldo, const float* q, int ldq, const uint16_t* k,
                                      const uint16_t* v, int L, int pos0, int H, int G, int hd) {
  run(OpKind::Attention, k, L, 4.0 * H * hd * causal_pairs(L, pos0), [&] { in_.attention_f16kv(out, ldo, q, ldq, k, v, L, pos0, H, G, hd); });
}
void CountingBackend::store_f16(uint16_t* dst, int ld_dst, const float* src, int ld_src, int n, int d) {
  run(OpKind::StoreF16, dst, n, 0, [&] { in_.store_f16(dst, ld_dst, src, ld_src, n, d); });
}
void CountingBackend::swiglu(float* out, int ldo, const float* g, const float* u, int ldgu, int n, int f) {
  run(OpKind::Swiglu, out, n, 0, [&] { in_.swiglu(out, ldo, g, u, ldgu, n, f); });
}
void CountingBackend::embedding(float* out, const float* table, const int32_t* ids, int n, int d) {
  run(OpKind::Embedding, out, n, 0, [&] { in_.embedding(out, table, ids, n, d); });
}
void CountingBackend::add_scaled_rows(float* y, const float* x, const float* g, int n, int d) {
  run(OpKind::AddScaledRows, y, n, 0, [&] { in_.add_scaled_rows(y, x, g, n, d); });
}
void CountingBackend::copy_rows(float* dst, int ld_dst, const float* src, int ld_src, int n, int d) {
  run(OpKind::CopyRows, dst, n, 0, [&] { in_.copy_rows(dst, ld_dst, src, ld_src, n, d); });
}
void CountingBackend::neg_exp(float* out, const float* in, int64_t n) {
  run(OpKind::NegExp, out, n, 0, [&] { in_.neg_exp(out, in, n); });
}

}  // namespace hm
