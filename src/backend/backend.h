// One backend interface (as ggml): the model calls these ops on pointers that live in the
// backend's memory; the CPU backend is always present and is the reference for every other.
// A CUDA backend (HM_CUDA=ON) implements the same interface; tests/test_backend_ops.cpp runs
// every op of every compiled backend against kernels/ref.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace hm {

enum class Device : uint8_t { CPU, CUDA };
const char* device_name(Device d);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  // Memory. Allocations are not zeroed.
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* p) = 0;
  virtual void to_device(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void synchronize() {}

  // Ops: the contracts of kernels/ops.h, plus the small glue the model needs.
  virtual void rmsnorm(float* out, const float* x, const float* w, int n, int d, float eps) = 0;
  virtual void linear(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n,
                      int k, bool accumulate) = 0;
  virtual void conv1d_silu(float* out, int ldo, float* state, const float* x, int ldx,
                           const float* w, const float* b, int L, int E, int K) = 0;
  virtual void selective_scan(float* y, int ldy, float* state, const float* x, int ldx,
                              const float* dt, int lddt, const float* dt_bias, const float* A,
                              const float* B, const float* C, int ldbc, const float* Dskip,
                              const float* z, int ldz, int L, int E, int N) = 0;
  virtual void rope(float* x, int ldx, int L, int heads, int hd, int pos0, float theta) = 0;
  virtual void attention(float* out, int ldo, const float* q, int ldq, const float* k,
                         const float* v, int L, int pos0, int H, int G, int hd) = 0;
  virtual void attention_f16kv(float* out, int ldo, const float* q, int ldq, const uint16_t* k,
                               const uint16_t* v, int L, int pos0, int H, int G, int hd) = 0;
  virtual void store_f16(uint16_t* dst, int ld_dst, const float* src, int ld_src, int n, int d) = 0;
  virtual void swiglu(float* out, int ldo, const float* g, const float* u, int ldgu, int n,
                      int f) = 0;
  // out[i,:] = table[ids[i],:]
  virtual void embedding(float* out, const float* table, const int32_t* host_ids, int n, int d) = 0;
  // y[i,:] += g[:] * x[i,:]   (g may be null: plain add)
  virtual void add_scaled_rows(float* y, const float* x, const float* g, int n, int d) = 0;
  // dst[i*ld_dst + j] = src[i*ld_src + j] for j < d
  virtual void copy_rows(float* dst, int ld_dst, const float* src, int ld_src, int n, int d) = 0;
  // out[i] = -exp(in[i])
  virtual void neg_exp(float* out, const float* in, int64_t n) = 0;
};

std::unique_ptr<Backend> make_cpu_backend();
// kernels/ref behind the interface: the oracle for tests (slow).
std::unique_ptr<Backend> make_ref_backend();
// CUDA throws hm::Error when the build has no CUDA backend or no device is present.
std::unique_ptr<Backend> make_backend(Device d);
std::vector<Device> compiled_devices();

// A device-tagged allocation owned by a backend.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& be, size_t n_floats) : be_(&be), n_(n_floats) {
    p_ = static_cast<float*>(be.alloc(n_floats * sizeof(float)));
  }
  ~Buffer() { if (p_) be_->free(p_); }
  Buffer(Buffer&& o) noexcept : be_(o.be_), p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      if (p_) be_->free(p_);
      be_ = o.be_; p_ = o.p_; n_ = o.n_;
      o.p_ = nullptr; o.n_ = 0;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* data() const { return p_; }
  size_t size() const { return n_; }
  Device device() const { return be_->device(); }
  // Grows (contents not kept) when fewer than n floats are held.
  void reserve(Backend& be, size_t n) { if (n_ < n || !p_) *this = Buffer(be, n); }

 private:
  Backend* be_ = nullptr;
  float* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace hm
