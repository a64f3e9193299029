// A Backend decorator that forwards every op to a wrapped backend and counts calls, rows, FLOPs
// and wall time per op kind. Tests use it to check that a skipped path does no work; hm bench uses it
// for the FLOPs a forward actually performs (not a formula's estimate).
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace hm {

enum class OpKind : uint8_t {
  Rmsnorm, Linear, Conv, Scan, Rope, KvWrite, Attention, Swiglu, Embedding, CopyRows, AddRows,
  SsdScan, GatedNorm, Relu2,
  // training (backend.h)
  LinearBackward, RmsnormBackward, SwigluBackward, ConvTrain, ConvBackward, ScanTrain, ScanBackward,
  AttentionTrain, AttentionBackward, RopeBackward, EmbeddingBackward, CrossEntropyHead,
  ScaleColsBackward, Convert, SumSquares, AdamwStep, Copy, SsdScanTrain, SsdScanBackward, GatedNormBackward,
  Relu2Backward, RowDots, Router,
  kCount
};
const char* op_kind_name(OpKind k);

// FLOPs counted per op (only the ops that dominate a forward; the rest count calls and rows):
//   linear          2 m n k
//   conv1d_silu     2 L E K                  (the depthwise taps; bias and SiLU left out)
//   selective_scan  kScanFlops L E N         (per token, channel and state: exp(delta A) 2,
//                                             delta B x 1, s = dA s + dBx 2, y += C s 2)
//   ssd_scan        kSsdFlops L H P N           (per token, head, channel and state: s = a s + dx B
//                                             3, y += C s 2; the per-head decay is amortized)
//   attention       4 H hd per (query, key) pair attended (causal: query i at position
//                   pos0 + i sees pos0 + i + 1 keys): Q.K and P.V, 2 FLOPs per multiply-add
// and for training: linear_backward 2 m n k per product (dW, and dx when asked); the training
// conv and scan as their inference ops, their backwards 2x that; attention_train as attention
// (pairs within each sequence), attention_backward 10 H hd per pair (S recomputed, dP, dQ, dK,
// dV); cross_entropy_head 6 n V D (logits, dhn, dW).
struct OpCount {
  int64_t calls = 0;
  int64_t rows = 0;   // m for linear, the batch's tokens for ragged ops, n for row ops
  double flops = 0;
  double seconds = 0; // wall time inside the wrapped op (after synchronize)
};

class CountingBackend final : public Backend {
 public:
  static constexpr double kScanFlops = 7.0;
  static constexpr double kSsdFlops = 5.0;

  // One call, when logging is on: `tag` identifies what the call worked on, so a test can tell
  // one layer's or one path's calls from another's: the weight for linear (W) and conv1d_silu
  // (w), Dskip for selective_scan, the K pool for kv_write and attention, the output otherwise.
  // rows: m for linear, the batch's tokens for ragged ops, n for row ops.
  struct Call {
    OpKind op;
    const void* tag;
    int64_t rows;
    double flops;
  };

  explicit CountingBackend(Backend& inner) : in_(inner) {}
  void reset();
  const OpCount& count(OpKind k) const { return counts_[size_t(k)]; }
  double total_flops() const;
  void set_logging(bool on) { logging_ = on; }
  const std::vector<Call>& calls() const { return log_; }

  Device device() const override { return in_.device(); }
  std::string name() const override { return "counting(" + in_.name() + ")"; }
  bool supports(DType t) const override { return in_.supports(t); }
  bool supports_kv(DType t) const override { return in_.supports_kv(t); }
  DType default_dtype() const override { return in_.default_dtype(); }
  bool supports_weight_format(DType t) const override { return in_.supports_weight_format(t); }
  void* alloc(size_t bytes) override { return in_.alloc(bytes); }
  void free(void* p) override { in_.free(p); }
  void to_device(void* dst, const void* src, size_t bytes) override { in_.to_device(dst, src, bytes); }
  void to_host(void* dst, const void* src, size_t bytes) override { in_.to_host(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override;
  void copy_many(const std::vector<CopySpan>& spans) override;
  void memzero(void* p, size_t bytes) override { in_.memzero(p, bytes); }
  void set_batch_invariant(bool on) override { in_.set_batch_invariant(on); }
  bool batch_invariant() const override { return in_.batch_invariant(); }
  void synchronize() override { in_.synchronize(); }
  size_t allocated_bytes() const override { return in_.allocated_bytes(); }
  size_t peak_allocated_bytes() const override { return in_.peak_allocated_bytes(); }
  void reset_peak() override { in_.reset_peak(); }

  void rmsnorm(Tensor out, Tensor x, Tensor w, float eps) override;
  void linear(Tensor y, Tensor x, Tensor W, bool accumulate) override;
  void swiglu(Tensor out, Tensor g, Tensor u) override;
  void relu2(Tensor out, Tensor x) override;
  void embedding(Tensor out, Tensor table, const int32_t* ids) override;
  void conv1d_silu(Tensor out, const StatePool& st, Tensor x, Tensor w, Tensor b,
                   const Ragged& rg) override;
  void selective_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt, Tensor dt_bias,
                      const float* A, Tensor B, Tensor C, Tensor Dskip, Tensor z,
                      const Ragged& rg) override;
  void ssd_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt, Tensor dt_bias, const float* A,
                Tensor B, Tensor C, Tensor Dskip, int heads, int groups, float dt_min, float dt_max,
                const Ragged& rg) override;
  void gated_rmsnorm(Tensor out, Tensor y, Tensor z, Tensor w, int group, float eps) override;
  void rope(Tensor x, int heads, int hd, float theta, const Ragged& rg) override;
  void kv_write(const KvPool& kv, Tensor k, Tensor v, const Ragged& rg) override;
  void attention(Tensor out, Tensor q, const KvPool& kv, int H, int G, int hd,
                 const Ragged& rg) override;
  void copy_rows(Tensor dst, const int32_t* dst_idx, Tensor src, const int32_t* src_idx,
                 int n) override;
  void add_rows(Tensor dst, const int32_t* dst_idx, Tensor src, const int32_t* src_idx, int n,
                const float* row_gate, Tensor scale) override;

  // Training ops; tags: W for linear_backward, w for the conv ops, Dskip for the scan ops, q for
  // the attention ops, W for cross_entropy_head, the gradient written otherwise.
  void linear_backward(Tensor dx, Tensor dW, Tensor dy, Tensor x, Tensor W, bool accumulate_dx) override;
  void rmsnorm_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, float eps,
                        bool accumulate_dx) override;
  void swiglu_backward(Tensor dg, Tensor du, Tensor dout, Tensor g, Tensor u) override;
  void relu2_backward(Tensor dx, Tensor dout, Tensor x) override;
  void conv1d_silu_train(Tensor out, Tensor x, Tensor w, Tensor b, const Ragged& rg) override;
  void conv1d_silu_backward(Tensor dx, Tensor dw, Tensor db, Tensor dout, Tensor x, Tensor w,
                            Tensor b, const Ragged& rg) override;
  size_t scan_saved_bytes(const Ragged& rg, int E, int N, int chunk) const override {
    return in_.scan_saved_bytes(rg, E, N, chunk);
  }
  void selective_scan_train(Tensor y, void* saved, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log,
                            Tensor B, Tensor C, Tensor Dskip, Tensor z, int chunk,
                            const Ragged& rg) override;
  void selective_scan_backward(Tensor dx, Tensor ddt, Tensor dB, Tensor dC, Tensor dz,
                               Tensor ddt_bias, Tensor dA_log, Tensor dDskip, Tensor dy,
                               const void* saved, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log,
                               Tensor B, Tensor C, Tensor Dskip, Tensor z, int chunk,
                               const Ragged& rg) override;
  void ssd_scan_train(Tensor y, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B, Tensor C, Tensor Dskip,
                      int heads, int groups, float dt_min, float dt_max, const Ragged& rg) override;
  void ssd_scan_backward(Tensor dx, Tensor ddt, Tensor dB, Tensor dC, Tensor ddt_bias, Tensor dA_log, Tensor dDskip,
                         Tensor dy, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B, Tensor C,
                         Tensor Dskip, int heads, int groups, float dt_min, float dt_max, const Ragged& rg) override;
  void gated_rmsnorm_backward(Tensor dy, Tensor dz, Tensor dw, Tensor dout, Tensor y, Tensor z, Tensor w, int group,
                              float eps) override;
  void attention_train(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, int H, int G, int hd,
                       const Ragged& rg) override;
  void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k, Tensor v,
                          Tensor out, Tensor lse, int H, int G, int hd, const Ragged& rg) override;
  void rope_backward(Tensor dx, int heads, int hd, float theta, const Ragged& rg) override;
  void embedding_backward(Tensor dtable, Tensor dout, const int32_t* ids) override;
  double cross_entropy_head(Tensor dhn, Tensor dW, Tensor hn, Tensor W, const int32_t* targets,
                            double scale) override;
  void scale_cols_backward(Tensor dsrc, Tensor dscale, Tensor ddst, Tensor src, Tensor scale) override;
  void row_dots(Tensor out, Tensor a, const int32_t* a_idx, Tensor b) override;
  void router(Tensor r, Tensor feats, Tensor u, Tensor w, Tensor fw, Tensor b, const Ragged& rg, int chunk,
              const StatePool* st) override;
  void convert(Tensor dst, Tensor src) override;
  double sum_squares(const float* x, const std::vector<ArenaSpan>& spans) override;
  void adamw_step(float* p, const float* g, float* m, float* v, const std::vector<ArenaSpan>& spans,
                  const AdamWStep& k) override;

 private:
  // Counts the call, runs it and adds its wall time.
  template <class F> void run(OpKind k, const void* tag, int64_t rows, double flops, F&& op);
  Backend& in_;
  std::array<OpCount, size_t(OpKind::kCount)> counts_{};
  bool logging_ = false;
  std::vector<Call> log_;
};

}  // namespace hm
