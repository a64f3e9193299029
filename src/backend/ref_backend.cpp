// The reference backend: kernels/ref behind the Backend interface. Slow and plain; it is the
// oracle that tests run whole models and every other backend's ops against.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "backend/backend.h"
#include "core/error.h"
#include "kernels/ops.h"

namespace hm {
namespace {

class RefBackend final : public Backend {
 public:
  Device device() const override { return Device::CPU; }
  std::string name() const override { return "ref"; }
  void* alloc(size_t bytes) override {
    void* p = std::malloc(bytes ? bytes : 1);
    HM_CHECK(p != nullptr, "ref: out of memory allocating ", bytes, " bytes");
    return p;
  }
  void free(void* p) override { std::free(p); }
  void to_device(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void to_host(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void rmsnorm(float* out, const float* x, const float* w, int n, int d, float eps) override {
    ref::rmsnorm(out, x, w, n, d, eps);
  }
  void linear(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n, int k,
              bool accumulate) override {
    ref::linear(y, ldy, x, ldx, W, m, n, k, accumulate);
  }
  void conv1d_silu(float* out, int ldo, float* state, const float* x, int ldx, const float* w,
                   const float* b, int L, int E, int K) override {
    ref::conv1d_silu(out, ldo, state, x, ldx, w, b, L, E, K);
  }
  void selective_scan(float* y, int ldy, float* state, const float* x, int ldx, const float* dt,
                      int lddt, const float* dt_bias, const float* A, const float* B, const float* C,
                      int ldbc, const float* Dskip, const float* z, int ldz, int L, int E,
                      int N) override {
    ref::selective_scan(y, ldy, state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z, ldz, L, E, N);
  }
  void rope(float* x, int ldx, int L, int heads, int hd, int pos0, float theta) override {
    ref::rope(x, ldx, L, heads, hd, pos0, theta);
  }
  void attention(float* out, int ldo, const float* q, int ldq, const float* k, const float* v, int L,
                 int pos0, int H, int G, int hd) override {
    ref::attention(out, ldo, q, ldq, k, v, L, pos0, H, G, hd);
  }
  void attention_f16kv(float* out, int ldo, const float* q, int ldq, const uint16_t* k,
                       const uint16_t* v, int L, int pos0, int H, int G, int hd) override {
    ref::attention_f16kv(out, ldo, q, ldq, k, v, L, pos0, H, G, hd);
  }
  void store_f16(uint16_t* dst, int ld_dst, const float* src, int ld_src, int n, int d) override {
    ref::store_f16(dst, ld_dst, src, ld_src, n, d);
  }
  void swiglu(float* out, int ldo, const float* g, const float* u, int ldgu, int n, int f) override {
    ref::swiglu(out, ldo, g, u, ldgu, n, f);
  }
  void embedding(float* out, const float* table, const int32_t* ids, int n, int d) override {
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < d; ++j) out[size_t(i) * d + j] = table[size_t(ids[i]) * d + j];
  }
  void add_scaled_rows(float* y, const float* x, const float* g, int n, int d) override {
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < d; ++j) y[size_t(i) * d + j] += (g ? g[j] : 1.0f) * x[size_t(i) * d + j];
  }
  void copy_rows(float* dst, int ld_dst, const float* src, int ld_src, int n, int d) override {
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < d; ++j) dst[size_t(i) * ld_dst + j] = src[size_t(i) * ld_src + j];
  }
  void neg_exp(float* out, const float* in, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) out[i] = -std::exp(in[i]);
  }
};

}  // namespace

std::unique_ptr<Backend> make_ref_backend() { return std::make_unique<RefBackend>(); }

}  // namespace hm
