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
  Rmsnorm, Linear, Conv, Scan, Rope, Attention, StoreF16, Swiglu, Embedding, AddScaledRows,
  CopyRows, NegExp, kCount
};
const char* op_kind_name(OpKind k);

// FLOPs counted per op (only the ops that dominate a forward; the rest count calls and rows):
//   linear          2 m n k
//   conv1d_silu     2 L E K                  (the depthwise taps; bias and SiLU left out)
//   selective_scan  kScanFlops L E N         (per token, channel and state: exp(delta A) 2,
//                                             delta B x 1, s = dA s + dBx 2, y += C s 2)
//   attention       4 H hd per (query, key) pair attended (causal: query i at position
//                   pos0 + i sees pos0 + i + 1 keys): Q.K and P.V, 2 FLOPs per multiply-add
struct OpCount {
  int64_t calls = 0;
  int64_t rows = 0;   // m for linear, L for sequence ops, n for row ops
  double flops = 0;
  double seconds = 0; // wall time inside the wrapped op (after synchronize)
};

class CountingBackend final : public Backend {
 public:
  static constexpr double kScanFlops = 7.0;

  // One call, when logging is on: `tag` identifies what the call worked on, so a test can tell
  // one layer's or one path's calls from another's: the weight for linear (W) and conv1d_silu
  // (w), Dskip for selective_scan, the K cache for attention, the output otherwise.
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
  void* alloc(size_t bytes) override { return in_.alloc(bytes); }
  void free(void* p) override { in_.free(p); }
  void to_device(void* dst, const void* src, size_t bytes) override { in_.to_device(dst, src, bytes); }
  void to_host(void* dst, const void* src, size_t bytes) override { in_.to_host(dst, src, bytes); }
  void synchronize() override { in_.synchronize(); }

  void rmsnorm(float* out, const float* x, const float* w, int n, int d, float eps) override;
  void linear(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n, int k,
              bool accumulate) override;
  void conv1d_silu(float* out, int ldo, float* state, const float* x, int ldx, const float* w,
                   const float* b, int L, int E, int K) override;
  void selective_scan(float* y, int ldy, float* state, const float* x, int ldx, const float* dt,
                      int lddt, const float* dt_bias, const float* A, const float* B,
                      const float* C, int ldbc, const float* Dskip, const float* z, int ldz,
                      int L, int E, int N) override;
  void rope(float* x, int ldx, int L, int heads, int hd, int pos0, float theta) override;
  void attention(float* out, int ldo, const float* q, int ldq, const float* k, const float* v,
                 int L, int pos0, int H, int G, int hd) override;
  void attention_f16kv(float* out, int ldo, const float* q, int ldq, const uint16_t* k,
                       const uint16_t* v, int L, int pos0, int H, int G, int hd) override;
  void store_f16(uint16_t* dst, int ld_dst, const float* src, int ld_src, int n, int d) override;
  void swiglu(float* out, int ldo, const float* g, const float* u, int ldgu, int n, int f) override;
  void embedding(float* out, const float* table, const int32_t* host_ids, int n, int d) override;
  void add_scaled_rows(float* y, const float* x, const float* g, int n, int d) override;
  void copy_rows(float* dst, int ld_dst, const float* src, int ld_src, int n, int d) override;
  void neg_exp(float* out, const float* in, int64_t n) override;

 private:
  // Counts the call, runs it and adds its wall time.
  template <class F> void run(OpKind k, const void* tag, int64_t rows, double flops, F&& op);
  Backend& in_;
  std::array<OpCount, size_t(OpKind::kCount)> counts_{};
  bool logging_ = false;
  std::vector<Call> log_;
};

}  // namespace hm
