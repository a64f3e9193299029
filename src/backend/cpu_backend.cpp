// CPU backend: the fast kernels of kernels/cpu behind the Backend interface.
#include <omp.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "backend/backend.h"
#include "core/error.h"
#include "kernels/ops.h"

namespace hm {

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

namespace {

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::CPU; }
  std::string name() const override { return "cpu"; }

  void* alloc(size_t bytes) override {
    // 64-byte alignment for AVX-512 loads; not zeroed so untouched pages cost no memory.
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    HM_CHECK(p != nullptr || bytes == 0, "cpu: out of memory allocating ", bytes, " bytes");
    return p;
  }
  void free(void* p) override { std::free(p); }
  void to_device(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void to_host(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }

  void rmsnorm(float* out, const float* x, const float* w, int n, int d, float eps) override {
    cpu::rmsnorm(out, x, w, n, d, eps);
  }
  void linear(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n, int k,
              bool accumulate) override {
    cpu::linear(y, ldy, x, ldx, W, m, n, k, accumulate);
  }
  void conv1d_silu(float* out, int ldo, float* state, const float* x, int ldx, const float* w,
                   const float* b, int L, int E, int K) override {
    cpu::conv1d_silu(out, ldo, state, x, ldx, w, b, L, E, K);
  }
  void selective_scan(float* y, int ldy, float* state, const float* x, int ldx, const float* dt,
                      int lddt, const float* dt_bias, const float* A, const float* B, const float* C,
                      int ldbc, const float* Dskip, const float* z, int ldz, int L, int E,
                      int N) override {
    cpu::selective_scan(y, ldy, state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z, ldz, L, E, N);
  }
  void rope(float* x, int ldx, int L, int heads, int hd, int pos0, float theta) override {
    cpu::rope(x, ldx, L, heads, hd, pos0, theta);
  }
  void attention(float* out, int ldo, const float* q, int ldq, const float* k, const float* v, int L,
                 int pos0, int H, int G, int hd) override {
    cpu::attention(out, ldo, q, ldq, k, v, L, pos0, H, G, hd);
  }
  void attention_f16kv(float* out, int ldo, const float* q, int ldq, const uint16_t* k,
                       const uint16_t* v, int L, int pos0, int H, int G, int hd) override {
    cpu::attention_f16kv(out, ldo, q, ldq, k, v, L, pos0, H, G, hd);
  }
  void store_f16(uint16_t* dst, int ld_dst, const float* src, int ld_src, int n, int d) override {
    cpu::store_f16(dst, ld_dst, src, ld_src, n, d);
  }
  void swiglu(float* out, int ldo, const float* g, const float* u, int ldgu, int n, int f) override {
    cpu::swiglu(out, ldo, g, u, ldgu, n, f);
  }
  void embedding(float* out, const float* table, const int32_t* ids, int n, int d) override {
    for (int i = 0; i < n; ++i)
      std::memcpy(out + size_t(i) * d, table + size_t(ids[i]) * d, sizeof(float) * size_t(d));
  }
  void add_scaled_rows(float* y, const float* x, const float* g, int n, int d) override {
#pragma omp parallel for if (int64_t(n) * d > (1 << 16))
    for (int i = 0; i < n; ++i) {
      float* yi = y + size_t(i) * d;
      const float* xi = x + size_t(i) * d;
      if (g) {
#pragma omp simd
        for (int j = 0; j < d; ++j) yi[j] += g[j] * xi[j];
      } else {
#pragma omp simd
        for (int j = 0; j < d; ++j) yi[j] += xi[j];
      }
    }
  }
  void copy_rows(float* dst, int ld_dst, const float* src, int ld_src, int n, int d) override {
    for (int i = 0; i < n; ++i)
      std::memcpy(dst + size_t(i) * ld_dst, src + size_t(i) * ld_src, sizeof(float) * size_t(d));
  }
  void neg_exp(float* out, const float* in, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) out[i] = -std::exp(in[i]);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

#ifdef HM_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend();  // backend/cuda/
#endif

std::unique_ptr<Backend> make_backend(Device d) {
  if (d == Device::CPU) return make_cpu_backend();
#ifdef HM_HAVE_CUDA
  return make_cuda_backend();
#else
  throw Error("cuda: this build has no CUDA backend (configure with -DHM_CUDA=ON)");
#endif
}

std::vector<Device> compiled_devices() {
#ifdef HM_HAVE_CUDA
  return {Device::CPU, Device::CUDA};
#else
  return {Device::CPU};
#endif
}

}  // namespace hm
