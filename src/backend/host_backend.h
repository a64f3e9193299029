// The CPU and reference backends: one implementation of the ragged, typed interface over host
// memory, parameterised by the kernel set (hm::cpu or hm::ref, kernels/ops.h). Each ragged op is
// a loop over the batch's sequences that calls the kernel once per sequence on its rows and its
// slot's state, as the model did before the interface was ragged (same calls, same speed).
// Host backends compute in float32 only; a linear's W may also be packed (bf16, q8_0, q4_0).
#pragma once
#include <omp.h>

#include <cstdlib>
#include <cstring>

#include "backend/backend.h"
#include "core/error.h"
#include "kernels/ops.h"

namespace hm {

template <bool kRef>
class HostBackend : public Backend {
 public:
  Device device() const override { return Device::CPU; }
  std::string name() const override { return kRef ? "ref" : "cpu"; }
  bool supports(DType t) const override { return t == DType::F32; }
  bool supports_kv(DType t) const override { return t == DType::F32 || t == DType::F16; }
  DType default_dtype() const override { return DType::F32; }
  bool supports_weight_format(DType t) const override {
    return t == DType::BF16 || t == DType::Q8_0 || t == DType::Q4_0;
  }

  void* alloc(size_t bytes) override {
    // 64-byte alignment for AVX-512 loads; not zeroed so untouched pages cost no memory.
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    HM_CHECK(p != nullptr || bytes == 0, name(), ": out of memory allocating ", bytes, " bytes");
    return p;
  }
  void free(void* p) override { std::free(p); }
  void to_device(void* dst, const void* src, size_t bytes) override { if (bytes) std::memcpy(dst, src, bytes); }
  void to_host(void* dst, const void* src, size_t bytes) override { if (bytes) std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { if (bytes) std::memmove(dst, src, bytes); }
  void memzero(void* p, size_t bytes) override { if (bytes) std::memset(p, 0, bytes); }

  void rmsnorm(Tensor out, Tensor x, Tensor w, float eps) override {
    check_rows("rmsnorm", out, x);
    HM_CHECK(out.ld == out.cols && x.ld == x.cols && w.cols == x.cols, name(),
             " rmsnorm: needs contiguous rows and w of width ", x.cols, " (got out ld ", out.ld,
             ", x ld ", x.ld, ", w ", w.cols, ")");
    K::rmsnorm(out.f32(), x.f32(), w.f32(), x.rows, x.cols, eps);
  }
  void linear(Tensor y, Tensor x, Tensor W, bool accumulate) override {
    HM_CHECK(y.rows == x.rows && W.cols == x.cols && y.cols == W.rows && W.ld == W.cols, name(),
             " linear: y [", y.rows, ", ", y.cols, "] = x [", x.rows, ", ", x.cols, "] . W [",
             W.rows, ", ", W.cols, "]^T does not fit");
    if (W.dtype == DType::F32) {
      K::linear(y.f32(), int(y.ld), x.f32(), int(x.ld), W.f32(), x.rows, W.rows, x.cols, accumulate);
      return;
    }
    HM_CHECK(supports_weight_format(W.dtype), name(), " linear: W of type ", compute_dtype_name(W.dtype),
             " is not supported (f32, bf16, q8_0 or q4_0)");
    K::linear_packed(y.f32(), int(y.ld), x.f32(), int(x.ld), W.data, weight_type_of(W.dtype), x.rows,
                     W.rows, x.cols, accumulate);
  }
  void swiglu(Tensor out, Tensor g, Tensor u) override {
    check_rows("swiglu", out, g);
    HM_CHECK(g.ld == u.ld && g.rows == u.rows && g.cols == u.cols && out.cols == g.cols, name(),
             " swiglu: g and u must have one shape and row stride");
    K::swiglu(out.f32(), int(out.ld), g.f32(), u.f32(), int(g.ld), g.rows, g.cols);
  }
  void embedding(Tensor out, Tensor table, const int32_t* ids) override {
    HM_CHECK(out.cols == table.cols, name(), " embedding: width ", out.cols, " vs table ", table.cols);
    const float* t = table.f32();
    float* o = out.f32();
    for (int i = 0; i < out.rows; ++i)
      std::memcpy(o + i * out.ld, t + int64_t(ids[i]) * table.ld, sizeof(float) * size_t(out.cols));
  }
  void conv1d_silu(Tensor out, const StatePool& st, Tensor x, Tensor w, Tensor b,
                   const Ragged& rg) override {
    check_rows("conv1d_silu", out, x);
    const int E = x.cols, Kw = w.cols;
    HM_CHECK(out.cols == E && w.rows == E && b.cols == E && x.rows == rg.n_tokens(), name(),
             " conv1d_silu: x [", x.rows, ", ", E, "], w [", w.rows, ", ", Kw, "], batch of ",
             rg.n_tokens(), " tokens do not fit");
    for (int s = 0; s < rg.nseq(); ++s) {
      if (rg.len(s) == 0) continue;
      const int t0 = rg.start(s);
      K::conv1d_silu(row(out, t0), int(out.ld), st.at(rg.slot(s)), row(x, t0), int(x.ld), w.f32(),
                     b.f32(), rg.len(s), E, Kw);
    }
  }
  void selective_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt, Tensor dt_bias,
                      const float* A, Tensor B, Tensor C, Tensor Dskip, Tensor z,
                      const Ragged& rg) override {
    const int E = x.cols, N = B.cols;
    HM_CHECK(y.rows == x.rows && dt.rows == x.rows && z.rows == x.rows && B.rows == x.rows &&
                 C.rows == x.rows && x.rows == rg.n_tokens() && y.cols == E && dt.cols == E &&
                 z.cols == E && C.cols == N && B.ld == C.ld && dt_bias.cols == E && Dskip.cols == E,
             name(), " selective_scan: shapes do not fit (x [", x.rows, ", ", E, "], B [", B.rows,
             ", ", N, "], batch of ", rg.n_tokens(), " tokens)");
    for (int s = 0; s < rg.nseq(); ++s) {
      if (rg.len(s) == 0) continue;
      const int t0 = rg.start(s);
      K::selective_scan(row(y, t0), int(y.ld), st.at(rg.slot(s)), row(x, t0), int(x.ld), row(dt, t0),
                        int(dt.ld), dt_bias.f32(), A, row(B, t0), row(C, t0), int(B.ld), Dskip.f32(),
                        row(z, t0), int(z.ld), rg.len(s), E, N);
    }
  }
  void ssd_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt, Tensor dt_bias, const float* A,
                Tensor B, Tensor C, Tensor Dskip, int H, int G, float dt_min, float dt_max,
                const Ragged& rg) override {
    const int E = x.cols, N = G > 0 ? B.cols / G : 0, P = H > 0 ? E / H : 0;
    HM_CHECK(H > 0 && G > 0 && H % G == 0 && P * H == E && N * G == B.cols && y.rows == x.rows &&
                 dt.rows == x.rows && B.rows == x.rows && C.rows == x.rows && x.rows == rg.n_tokens() &&
                 y.cols == E && dt.cols == H && C.cols == B.cols && B.ld == C.ld && dt_bias.cols == H &&
                 Dskip.cols == H && st.slot_stride == int64_t(E) * N,
             name(), " ssd_scan: shapes do not fit (x [", x.rows, ", ", E, "], ", H, " heads, ", G,
             " groups, B [", B.rows, ", ", B.cols, "], dt [", dt.rows, ", ", dt.cols, "], batch of ",
             rg.n_tokens(), " tokens)");
    for (int s = 0; s < rg.nseq(); ++s) {
      if (rg.len(s) == 0) continue;
      const int t0 = rg.start(s);
      K::ssd_scan(row(y, t0), int(y.ld), st.at(rg.slot(s)), row(x, t0), int(x.ld), row(dt, t0),
                  int(dt.ld), dt_bias.f32(), A, row(B, t0), row(C, t0), int(B.ld), Dskip.f32(),
                  rg.len(s), H, P, G, N, dt_min, dt_max);
    }
  }
  void gated_rmsnorm(Tensor out, Tensor y, Tensor z, Tensor w, int group, float eps) override {
    check_rows("gated_rmsnorm", out, y);
    const int E = y.cols;
    HM_CHECK(z.rows == y.rows && z.cols == E && out.cols == E && w.cols == E && group > 0 && E % group == 0,
             name(), " gated_rmsnorm: y [", y.rows, ", ", E, "], z [", z.rows, ", ", z.cols, "], w ",
             w.cols, ", group ", group, " do not fit");
    K::gated_rmsnorm(out.f32(), int(out.ld), y.f32(), int(y.ld), z.f32(), int(z.ld), w.f32(), y.rows, E,
                     group, eps);
  }
  void rope(Tensor x, int heads, int hd, float theta, const Ragged& rg) override {
    HM_CHECK(x.cols >= heads * hd && x.rows == rg.n_tokens(), name(), " rope: x [", x.rows, ", ",
             x.cols, "] for ", heads, " heads of ", hd);
    for (int s = 0; s < rg.nseq(); ++s)
      if (rg.len(s) > 0) K::rope(row(x, rg.start(s)), int(x.ld), rg.len(s), heads, hd, rg.pos0(s), theta);
  }
  void kv_write(const KvPool& kv, Tensor k, Tensor v, const Ragged& rg) override {
    HM_CHECK(k.cols == kv.row && v.cols == kv.row && k.rows == rg.n_tokens() && v.rows == k.rows,
             name(), " kv_write: k [", k.rows, ", ", k.cols, "] v [", v.rows, ", ", v.cols,
             "] for rows of ", kv.row);
    for (int s = 0; s < rg.nseq(); ++s) {
      const int L = rg.len(s), t0 = rg.start(s), p0 = rg.pos0(s);
      if (L == 0) continue;
      HM_CHECK(p0 >= 0 && p0 + L <= kv.max_ctx, name(), " kv_write: positions ", p0, "..",
               p0 + L, " outside the cache of ", kv.max_ctx);
      const int64_t off = int64_t(p0) * kv.row;
      if (kv.dtype == DType::F16) {
        K::store_f16(static_cast<uint16_t*>(kv.k_at(rg.slot(s))) + off, kv.row, row(k, t0), int(k.ld), L, kv.row);
        K::store_f16(static_cast<uint16_t*>(kv.v_at(rg.slot(s))) + off, kv.row, row(v, t0), int(v.ld), L, kv.row);
      } else {
        HM_CHECK(kv.dtype == DType::F32, name(), " kv_write: KV cache type ", compute_dtype_name(kv.dtype),
                 " is not supported (f32 or f16)");
        copy_block(static_cast<float*>(kv.k_at(rg.slot(s))) + off, kv.row, row(k, t0), k.ld, L, kv.row);
        copy_block(static_cast<float*>(kv.v_at(rg.slot(s))) + off, kv.row, row(v, t0), v.ld, L, kv.row);
      }
    }
  }
  void attention(Tensor out, Tensor q, const KvPool& kv, int H, int G, int hd,
                 const Ragged& rg) override {
    HM_CHECK(q.cols == H * hd && out.cols == H * hd && kv.row == G * hd && q.rows == rg.n_tokens() &&
                 out.rows == q.rows, name(), " attention: q [", q.rows, ", ", q.cols, "] for ", H,
             " heads of ", hd, " over kv rows of ", kv.row);
    for (int s = 0; s < rg.nseq(); ++s) {
      const int L = rg.len(s), t0 = rg.start(s), slot = rg.slot(s);
      if (L == 0) continue;
      if (kv.dtype == DType::F16)
        K::attention_f16kv(row(out, t0), int(out.ld), row(q, t0), int(q.ld),
                           static_cast<const uint16_t*>(kv.k_at(slot)),
                           static_cast<const uint16_t*>(kv.v_at(slot)), L, rg.pos0(s), H, G, hd);
      else
        K::attention(row(out, t0), int(out.ld), row(q, t0), int(q.ld),
                     static_cast<const float*>(kv.k_at(slot)), static_cast<const float*>(kv.v_at(slot)),
                     L, rg.pos0(s), H, G, hd);
    }
  }
  void copy_rows(Tensor dst, const int32_t* di, Tensor src, const int32_t* si, int n) override {
    HM_CHECK(dst.cols <= src.cols, name(), " copy_rows: ", dst.cols, " columns from ", src.cols);
    for (int i = 0; i < n; ++i)
      std::memcpy(row(dst, di ? di[i] : i), row(src, si ? si[i] : i), sizeof(float) * size_t(dst.cols));
  }
  void add_rows(Tensor dst, const int32_t* di, Tensor src, const int32_t* si, int n,
                const float* gate, Tensor scale) override {
    HM_CHECK(dst.cols <= src.cols && (scale.empty() || scale.cols == dst.cols), name(),
             " add_rows: ", dst.cols, " columns from ", src.cols);
    const int d = dst.cols;
    const float* sc = scale.empty() ? nullptr : scale.f32();
#pragma omp parallel for if (int64_t(n) * d > (1 << 16))
    for (int i = 0; i < n; ++i) {
      float* y = row(dst, di ? di[i] : i);
      const float* x = row(src, si ? si[i] : i);
      const float g = gate ? gate[i] : 1.0f;
      if (sc) {
#pragma omp simd
        for (int j = 0; j < d; ++j) y[j] += g * sc[j] * x[j];
      } else {
#pragma omp simd
        for (int j = 0; j < d; ++j) y[j] += g * x[j];
      }
    }
  }

 private:
  // The kernel set, chosen at compile time.
  struct K {
    static constexpr auto rmsnorm = kRef ? &ref::rmsnorm : &cpu::rmsnorm;
    static constexpr auto linear = kRef ? &ref::linear : &cpu::linear;
    static constexpr auto linear_packed = kRef ? &ref::linear_packed : &cpu::linear_packed;
    static constexpr auto swiglu = kRef ? &ref::swiglu : &cpu::swiglu;
    static constexpr auto conv1d_silu = kRef ? &ref::conv1d_silu : &cpu::conv1d_silu;
    static constexpr auto selective_scan = kRef ? &ref::selective_scan : &cpu::selective_scan;
    static constexpr auto ssd_scan = kRef ? &ref::ssd_scan : &cpu::ssd_scan;
    static constexpr auto gated_rmsnorm = kRef ? &ref::gated_rmsnorm : &cpu::gated_rmsnorm;
    static constexpr auto rope = kRef ? &ref::rope : &cpu::rope;
    static constexpr auto store_f16 = kRef ? &ref::store_f16 : &cpu::store_f16;
    static constexpr auto attention = kRef ? &ref::attention : &cpu::attention;
    static constexpr auto attention_f16kv = kRef ? &ref::attention_f16kv : &cpu::attention_f16kv;
  };
  static float* row(const Tensor& t, int r) { return t.f32() + int64_t(r) * t.ld; }
  void check_rows(const char* op, const Tensor& out, const Tensor& in) const {
    HM_CHECK(out.rows == in.rows, name(), " ", op, ": ", out.rows, " output rows for ", in.rows, " input rows");
  }
  static void copy_block(float* dst, int64_t ldd, const float* src, int64_t lds, int n, int d) {
    for (int i = 0; i < n; ++i) std::memcpy(dst + i * ldd, src + i * lds, sizeof(float) * size_t(d));
  }
};

}  // namespace hm
