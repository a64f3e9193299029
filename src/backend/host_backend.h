// The CPU and reference backends: one implementation of the ragged, typed interface over host
// memory, parameterised by the kernel set (hm::cpu or hm::ref, kernels/ops.h). Each ragged op is
// a loop over the batch's sequences that calls the kernel once per sequence on its rows and its
// slot's state, as the model did before the interface was ragged (same calls, same speed).
// Host backends compute in float32 only; a linear's W may also be packed (bf16, f16, q8_0, q4_0).
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <cstring>

#include <cmath>
#include <limits>
#include <vector>

#include "backend/backend.h"
#include "backend/train_checks.h"
#include "core/error.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/grad_cpu.h"
#include "kernels/ops.h"
#include "kernels/ref/attention_grad_ref.h"
#include "kernels/ref/mamba_grad_ref.h"
#include "kernels/ref/router_ref.h"
#include "kernels/ref/ssd_grad_ref.h"

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
    return t == DType::BF16 || t == DType::F16 || t == DType::Q8_0 || t == DType::Q4_0;
  }

  void* alloc(size_t bytes) override {
    // 64-byte alignment for AVX-512 loads; not zeroed so untouched pages cost no memory.
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p == nullptr && bytes != 0) throw OutOfMemory(detail::cat(name(), ": out of memory allocating ", bytes, " bytes"));
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
    HM_CHECK(W.dtype == DType::F32 || supports_weight_format(W.dtype), name(), " linear: W of type ",
             compute_dtype_name(W.dtype), " is not supported (f32, bf16, f16, q8_0 or q4_0)");
    // Batch-invariant mode: rows in blocks the per-row kernel takes (linear_rows, whose outputs do
    // not depend on the other rows: KernelsLinear.RowsDoNotDependOnTheBatch), never sgemm, whose
    // kernels change with m; packed weights a row at a time. The reference's loops already are.
    const int block = kRef || !inv_ ? x.rows : W.dtype == DType::F32 ? cpu::kernels().linear_rows_max : 1;
    for (int r0 = 0; r0 < x.rows; r0 += std::max(block, 1)) {
      const int m = std::min(std::max(block, 1), x.rows - r0);
      float* yr = y.f32() + int64_t(r0) * y.ld;
      const float* xr = x.f32() + int64_t(r0) * x.ld;
      if (W.dtype == DType::F32)
        K::linear(yr, int(y.ld), xr, int(x.ld), W.f32(), m, W.rows, x.cols, accumulate);
      else
        K::linear_packed(yr, int(y.ld), xr, int(x.ld), W.data, weight_type_of(W.dtype), m, W.rows, x.cols,
                         accumulate);
    }
  }
  // See Backend::set_batch_invariant: here only the linear layers change (the other ops compute
  // each sequence on its own, in token order).
  void set_batch_invariant(bool on) override { inv_ = on; }
  bool batch_invariant() const override { return inv_ || kRef; }
  void swiglu(Tensor out, Tensor g, Tensor u) override {
    check_rows("swiglu", out, g);
    HM_CHECK(g.ld == u.ld && g.rows == u.rows && g.cols == u.cols && out.cols == g.cols, name(),
             " swiglu: g and u must have one shape and row stride");
    K::swiglu(out.f32(), int(out.ld), g.f32(), u.f32(), int(g.ld), g.rows, g.cols);
  }
  void relu2(Tensor out, Tensor x) override {
    check_rows("relu2", out, x);
    HM_CHECK(out.cols == x.cols, name(), " relu2: out [", out.rows, ", ", out.cols, "] vs x [", x.rows, ", ",
             x.cols, "]");
    K::relu2(out.f32(), int(out.ld), x.f32(), int(x.ld), x.rows, x.cols);
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
    for_seqs(rg, [&](int s) {
      const int t0 = rg.start(s);
      K::conv1d_silu(row(out, t0), int(out.ld), st.at(rg.slot(s)), row(x, t0), int(x.ld), w.f32(),
                     b.f32(), rg.len(s), E, Kw);
    });
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
    for_seqs(rg, [&](int s) {
      const int t0 = rg.start(s);
      K::selective_scan(row(y, t0), int(y.ld), st.at(rg.slot(s)), row(x, t0), int(x.ld), row(dt, t0),
                        int(dt.ld), dt_bias.f32(), A, row(B, t0), row(C, t0), int(B.ld), Dskip.f32(),
                        row(z, t0), int(z.ld), rg.len(s), E, N);
    });
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
    for_seqs(rg, [&](int s) {
      const int t0 = rg.start(s);
      K::ssd_scan(row(y, t0), int(y.ld), st.at(rg.slot(s)), row(x, t0), int(x.ld), row(dt, t0),
                  int(dt.ld), dt_bias.f32(), A, row(B, t0), row(C, t0), int(B.ld), Dskip.f32(),
                  rg.len(s), H, P, G, N, dt_min, dt_max);
    });
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
    for_seqs(rg, [&](int s) {
      const int L = rg.len(s), t0 = rg.start(s), slot = rg.slot(s);
      if (kv.dtype == DType::F16)
        K::attention_f16kv(row(out, t0), int(out.ld), row(q, t0), int(q.ld),
                           static_cast<const uint16_t*>(kv.k_at(slot)),
                           static_cast<const uint16_t*>(kv.v_at(slot)), L, rg.pos0(s), H, G, hd);
      else
        K::attention(row(out, t0), int(out.ld), row(q, t0), int(q.ld),
                     static_cast<const float*>(kv.k_at(slot)), static_cast<const float*>(kv.v_at(slot)),
                     L, rg.pos0(s), H, G, hd);
    });
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

  // ---- Training ops: per sequence, kernels/cpu/grad_cpu's float blocks (cpu) or the reference
  // pairs of kernels/ref/*_grad_ref.h in float with double sums (ref). The kernels take
  // contiguous rows: a strided view is copied into a block and back (Block).

  void linear_backward(Tensor dx, Tensor dW, Tensor dy, Tensor x, Tensor W, bool accumulate_dx) override {
    train_check::linear_backward(name(), dx, dW, dy, x, W);
    const int m = x.rows, n = W.rows, k = W.cols;
    if constexpr (kRef) {
      const float *Y = dy.f32(), *X = x.f32(), *Wp = W.f32();
      if (!dx.empty())
        for (int i = 0; i < m; ++i)
          for (int c = 0; c < k; ++c) {
            float* d = row(dx, i) + c;
            double acc = accumulate_dx ? double(*d) : 0.0;
            for (int o = 0; o < n; ++o) acc += double(Y[i * dy.ld + o]) * Wp[o * W.ld + c];
            *d = float(acc);
          }
      for (int o = 0; o < n; ++o)
        for (int c = 0; c < k; ++c) {
          double acc = 0;
          for (int i = 0; i < m; ++i) acc += double(Y[i * dy.ld + o]) * X[i * x.ld + c];
          row(dW, o)[c] += float(acc);
        }
    } else {
      if (!dx.empty())
        cpu::grad::gemm_dyW(dx.f32(), dy.f32(), W.f32(), m, n, k, accumulate_dx, int(dx.ld), int(dy.ld), int(W.ld));
      cpu::grad::gemm_dyTx(dW.f32(), dy.f32(), x.f32(), m, n, k, int(dW.ld), int(dy.ld), int(x.ld));
    }
  }
  void rmsnorm_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, float eps,
                        bool accumulate_dx) override {
    train_check::rmsnorm_backward(name(), dx, dw, dout, x, w);
    const int n = x.rows, d = x.cols;
    const float* wp = w.f32();
    std::vector<double> dw_acc(size_t(d), 0.0);
    for (int i = 0; i < n; ++i) {  // ref::grad::rmsnorm_backward, rstd recomputed in double
      const float *xi = row(x, i), *gi = row(dout, i);
      float* di = row(dx, i);
      double ss = 0, dot = 0;
      for (int j = 0; j < d; ++j) {
        ss += double(xi[j]) * xi[j];
        dot += double(gi[j]) * wp[j] * xi[j];
      }
      const double r = 1.0 / std::sqrt(ss / d + double(eps)), c = r * r * r * dot / d;
      for (int j = 0; j < d; ++j) {
        const float v = float(double(gi[j]) * wp[j] * r - c * xi[j]);
        di[j] = accumulate_dx ? di[j] + v : v;
        dw_acc[size_t(j)] += double(gi[j]) * xi[j] * r;
      }
    }
    float* dwp = dw.f32();
    for (int j = 0; j < d; ++j) dwp[j] += float(dw_acc[size_t(j)]);
  }
  void swiglu_backward(Tensor dg, Tensor du, Tensor dout, Tensor g, Tensor u) override {
    train_check::swiglu_backward(name(), dg, du, dout, g, u);
    for (int i = 0; i < g.rows; ++i)
      ref::grad::swiglu_backward(row(dg, i), row(du, i), row(dout, i), row(g, i), row(u, i), 1, g.cols);
  }
  void relu2_backward(Tensor dx, Tensor dout, Tensor x) override {
    train_check::relu2_backward(name(), dx, dout, x);
    for (int i = 0; i < x.rows; ++i) ref::grad::relu2_backward(row(dx, i), row(dout, i), row(x, i), 1, x.cols);
  }
  void conv1d_silu_train(Tensor out, Tensor x, Tensor w, Tensor b, const Ragged& rg) override {
    train_check::conv1d_silu(name(), "conv1d_silu_train", out, x, w, b, rg);
    const int E = x.cols, Kw = w.cols;
    std::vector<float> window(size_t(E) * size_t(Kw - 1));
    for (int s = 0; s < rg.nseq(); ++s) {
      if (rg.len(s) == 0) continue;
      std::fill(window.begin(), window.end(), 0.0f);  // every sequence starts from zero
      const int t0 = rg.start(s);
      K::conv1d_silu(row(out, t0), int(out.ld), window.data(), row(x, t0), int(x.ld), w.f32(),
                     b.f32(), rg.len(s), E, Kw);
    }
  }
  void conv1d_silu_backward(Tensor dx, Tensor dw, Tensor db, Tensor dout, Tensor x, Tensor w,
                            Tensor b, const Ragged& rg) override {
    train_check::conv1d_silu(name(), "conv1d_silu_backward", dout, x, w, b, rg);
    train_check::same_shape(name(), "conv1d_silu_backward", "dx", dx, x);
    train_check::same_shape(name(), "conv1d_silu_backward", "dw", dw, w);
    train_check::same_shape(name(), "conv1d_silu_backward", "db", db, b);
    const int E = x.cols, Kw = w.cols;
    Block wb(w, 0, E, true, false), dwb(dw, 0, E, true, true);
    for (int s = 0; s < rg.nseq(); ++s) {
      const int L = rg.len(s), t0 = rg.start(s);
      if (L == 0) continue;
      Block dxb(dx, t0, L, false, true), gb(dout, t0, L, true, false), xb(x, t0, L, true, false);
      if constexpr (kRef)
        ref::grad::conv1d_silu_backward(dxb.p, dwb.p, db.f32(), gb.p, xb.p, wb.p, b.f32(), L, E, Kw);
      else
        cpu::grad::conv1d_silu_backward(dxb.p, dwb.p, db.f32(), gb.p, xb.p, wb.p, b.f32(), L, E, Kw);
    }
  }
  size_t scan_saved_bytes(const Ragged& rg, int E, int N, int chunk) const override {
    return sizeof(double) * size_t(scan_chunks(rg, chunk_or_default(chunk))) * size_t(E) * size_t(N);
  }
  void selective_scan_train(Tensor y, void* saved, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log,
                            Tensor B, Tensor C, Tensor Dskip, Tensor z, int chunk,
                            const Ragged& rg) override {
    train_check::selective_scan(name(), "selective_scan_train", y, x, dt, dt_bias, A_log, B, C, Dskip, z, rg);
    const int E = x.cols, N = B.cols;
    chunk = chunk_or_default(chunk);
    const std::vector<float> A = neg_exp(A_log);
    auto* states = static_cast<double*>(saved);
    for (int s = 0; s < rg.nseq(); ++s) {
      const int L = rg.len(s), t0 = rg.start(s);
      if (L == 0) continue;
      Block yb(y, t0, L, false, true), xb(x, t0, L, true, false), dtb(dt, t0, L, true, false),
          Bb(B, t0, L, true, false), Cb(C, t0, L, true, false), zb(z, t0, L, true, false);
      if (!kRef && N % cpu::kScanGradLanes == 0)
        cpu::kernels().grad.scan_forward(yb.p, cpu::ScanGradArgs{xb.p, dtb.p, dt_bias.f32(), A.data(), Bb.p,
                                                                  Cb.p, Dskip.f32(), zb.p, L, E, N},
                                         states, chunk);
      else
        ref::grad::selective_scan_forward(yb.p, xb.p, dtb.p, dt_bias.f32(), A.data(), Bb.p, Cb.p,
                                          Dskip.f32(), zb.p, L, E, N, states, chunk);
      states += size_t(ref::grad::scan_num_chunks(L, chunk)) * size_t(E) * size_t(N);
    }
  }
  void selective_scan_backward(Tensor dx, Tensor ddt, Tensor dB, Tensor dC, Tensor dz,
                               Tensor ddt_bias, Tensor dA_log, Tensor dDskip, Tensor dy,
                               const void* saved, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log,
                               Tensor B, Tensor C, Tensor Dskip, Tensor z, int chunk,
                               const Ragged& rg) override {
    const char* op = "selective_scan_backward";
    train_check::selective_scan(name(), op, dy, x, dt, dt_bias, A_log, B, C, Dskip, z, rg);
    const std::pair<const char*, std::pair<Tensor, Tensor>> pairs[] = {
        {"dx", {dx, x}}, {"ddt", {ddt, dt}}, {"dB", {dB, B}}, {"dC", {dC, C}}, {"dz", {dz, z}},
        {"ddt_bias", {ddt_bias, dt_bias}}, {"dA_log", {dA_log, A_log}}, {"dDskip", {dDskip, Dskip}}};
    for (const auto& [nm, gt] : pairs) train_check::same_shape(name(), op, nm, gt.first, gt.second);
    const int E = x.cols, N = B.cols;
    chunk = chunk_or_default(chunk);
    const std::vector<float> A = neg_exp(A_log);
    std::vector<float> dA(size_t(E) * size_t(N), 0.0f);
    const auto* states = static_cast<const double*>(saved);
    for (int s = 0; s < rg.nseq(); ++s) {
      const int L = rg.len(s), t0 = rg.start(s);
      if (L == 0) continue;
      Block dxb(dx, t0, L, false, true), ddtb(ddt, t0, L, false, true), dBb(dB, t0, L, false, true),
          dCb(dC, t0, L, false, true), dzb(dz, t0, L, false, true), dyb(dy, t0, L, true, false),
          xb(x, t0, L, true, false), dtb(dt, t0, L, true, false), Bb(B, t0, L, true, false),
          Cb(C, t0, L, true, false), zb(z, t0, L, true, false);
      if (!kRef && N % cpu::kScanGradLanes == 0)
        cpu::kernels().grad.scan_backward(dxb.p, ddtb.p, ddt_bias.f32(), dA.data(), dBb.p, dCb.p, dDskip.f32(),
                                          dzb.p, dyb.p,
                                          cpu::ScanGradArgs{xb.p, dtb.p, dt_bias.f32(), A.data(), Bb.p, Cb.p,
                                                            Dskip.f32(), zb.p, L, E, N},
                                          states, chunk);
      else
        ref::grad::selective_scan_backward_chunked(dxb.p, ddtb.p, ddt_bias.f32(), dA.data(), dBb.p, dCb.p,
                                                   dDskip.f32(), dzb.p, dyb.p, xb.p, dtb.p, dt_bias.f32(),
                                                   A.data(), Bb.p, Cb.p, Dskip.f32(), zb.p, L, E, N,
                                                   states, chunk);
      states += size_t(ref::grad::scan_num_chunks(L, chunk)) * size_t(E) * size_t(N);
    }
    for (int e = 0; e < E; ++e)  // A = -exp(A_log): dA_log += dA A
      for (int n = 0; n < N; ++n) row(dA_log, e)[n] += dA[size_t(e) * N + n] * A[size_t(e) * N + n];
  }
  // Mamba-2's training ops, sequence by sequence, strides passed through: the forward is the
  // inference scan from a zero state; the backward the reference loops (ref) or their
  // vectorized, chunk-recomputing copy (cpu, kernels/cpu/grad_simd.cpp).
  void ssd_scan_train(Tensor y, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B, Tensor C, Tensor Dskip,
                      int heads, int groups, float dt_min, float dt_max, const Ragged& rg) override {
    train_check::ssd_scan(name(), "ssd_scan_train", y, x, dt, dt_bias, A_log, B, C, Dskip, heads, groups, rg);
    const int P = x.cols / heads, N = B.cols / groups;
    // The inference scan (the cpu backend's chunked one) from a zero state, A = -exp(A_log).
    std::vector<float> A(static_cast<size_t>(heads)), state;
    for (int h = 0; h < heads; ++h) A[size_t(h)] = -std::exp(A_log.f32()[h]);
    for (int s = 0; s < rg.nseq(); ++s) {
      const int L = rg.len(s), t0 = rg.start(s);
      if (L == 0) continue;
      state.assign(size_t(heads) * size_t(P) * size_t(N), 0.0f);
      K::ssd_scan(row(y, t0), int(y.ld), state.data(), row(x, t0), int(x.ld), row(dt, t0), int(dt.ld), dt_bias.f32(),
                  A.data(), row(B, t0), row(C, t0), int(B.ld), Dskip.f32(), L, heads, P, groups, N, dt_min, dt_max);
    }
  }
  void ssd_scan_backward(Tensor dx, Tensor ddt, Tensor dB, Tensor dC, Tensor ddt_bias, Tensor dA_log, Tensor dDskip,
                         Tensor dy, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B, Tensor C,
                         Tensor Dskip, int heads, int groups, float dt_min, float dt_max, const Ragged& rg) override {
    const char* op = "ssd_scan_backward";
    train_check::ssd_scan(name(), op, dy, x, dt, dt_bias, A_log, B, C, Dskip, heads, groups, rg);
    const std::pair<const char*, std::pair<Tensor, Tensor>> pairs[] = {
        {"dx", {dx, x}}, {"ddt", {ddt, dt}}, {"dB", {dB, B}}, {"dC", {dC, C}},
        {"ddt_bias", {ddt_bias, dt_bias}}, {"dA_log", {dA_log, A_log}}, {"dDskip", {dDskip, Dskip}}};
    for (const auto& [nm, gt] : pairs) train_check::same_shape(name(), op, nm, gt.first, gt.second);
    HM_CHECK(dB.ld == dC.ld, name(), " ", op, ": dB and dC must share one row stride (got ", dB.ld, " and ", dC.ld, ")");
    const int P = x.cols / heads, N = B.cols / groups;
    for (int s = 0; s < rg.nseq(); ++s) {
      const int L = rg.len(s), t0 = rg.start(s);
      if (L == 0) continue;
      if constexpr (kRef)
        ref::grad::ssd_scan_backward<float>(row(dx, t0), int(dx.ld), row(ddt, t0), int(ddt.ld), row(dB, t0),
                                            row(dC, t0), int(dB.ld), ddt_bias.f32(), dA_log.f32(), dDskip.f32(),
                                            row(dy, t0), int(dy.ld), row(x, t0), int(x.ld), row(dt, t0), int(dt.ld),
                                            dt_bias.f32(), A_log.f32(), row(B, t0), row(C, t0), int(B.ld),
                                            Dskip.f32(), L, heads, P, groups, N, dt_min, dt_max);
      else
        cpu::kernels().grad.ssd_backward(row(dx, t0), int(dx.ld), row(ddt, t0), int(ddt.ld), row(dB, t0), row(dC, t0),
                                         int(dB.ld), ddt_bias.f32(), dA_log.f32(), dDskip.f32(), row(dy, t0),
                                         int(dy.ld),
                                         cpu::SsdGradArgs{row(x, t0), int(x.ld), row(dt, t0), int(dt.ld),
                                                          dt_bias.f32(), A_log.f32(), row(B, t0), row(C, t0),
                                                          int(B.ld), Dskip.f32(), L, heads, P, groups, N, dt_min,
                                                          dt_max});
    }
  }
  void gated_rmsnorm_backward(Tensor dy, Tensor dz, Tensor dw, Tensor dout, Tensor y, Tensor z, Tensor w, int group,
                              float eps) override {
    const char* op = "gated_rmsnorm_backward";
    train_check::gated_rmsnorm(name(), op, dout, y, z, w, group);
    train_check::same_shape(name(), op, "dy", dy, y);
    train_check::same_shape(name(), op, "dz", dz, z);
    train_check::same_shape(name(), op, "dw", dw, w);
    ref::grad::gated_rmsnorm_backward<float>(dy.f32(), int(dy.ld), dz.f32(), int(dz.ld), dw.f32(), dout.f32(),
                                             int(dout.ld), y.f32(), int(y.ld), z.f32(), int(z.ld), w.f32(), y.rows,
                                             y.cols, group, eps);
  }
  void attention_train(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, int H, int G, int hd,
                       const Ragged& rg) override {
    train_check::attention(name(), "attention_train", out, lse, q, k, v, H, G, hd, rg);
    for (int s = 0; s < rg.nseq(); ++s) {
      const int L = rg.len(s), t0 = rg.start(s);
      if (L == 0) continue;
      Block ob(out, t0, L, false, true), lb(lse, t0, L, false, true), qb(q, t0, L, true, false),
          kb(k, t0, L, true, false), vb(v, t0, L, true, false);
      if constexpr (kRef)
        ref::grad::attention_forward(ob.p, lb.p, qb.p, kb.p, vb.p, L, H, G, hd);
      else
        cpu::grad::attention_core_forward(ob.p, lb.p, qb.p, kb.p, vb.p, L, H, G, hd);
    }
  }
  void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k, Tensor v,
                          Tensor out, Tensor lse, int H, int G, int hd, const Ragged& rg) override {
    const char* op = "attention_backward";
    train_check::attention(name(), op, out, lse, q, k, v, H, G, hd, rg);
    train_check::same_shape(name(), op, "dq", dq, q);
    train_check::same_shape(name(), op, "dk", dk, k);
    train_check::same_shape(name(), op, "dv", dv, v);
    train_check::same_shape(name(), op, "dout", dout, out);
    for (int s = 0; s < rg.nseq(); ++s) {
      const int L = rg.len(s), t0 = rg.start(s);
      if (L == 0) continue;
      Block dqb(dq, t0, L, false, true), dkb(dk, t0, L, false, true), dvb(dv, t0, L, false, true),
          gb(dout, t0, L, true, false), qb(q, t0, L, true, false), kb(k, t0, L, true, false),
          vb(v, t0, L, true, false), ob(out, t0, L, true, false), lb(lse, t0, L, true, false);
      if constexpr (kRef)
        ref::grad::attention_backward(dqb.p, dkb.p, dvb.p, gb.p, qb.p, kb.p, vb.p, ob.p, lb.p, L, H, G, hd);
      else
        cpu::grad::attention_core_backward(dqb.p, dkb.p, dvb.p, gb.p, qb.p, kb.p, vb.p, ob.p, lb.p, L, H,
                                           G, hd);
    }
  }
  void rope_backward(Tensor dx, int heads, int hd, float theta, const Ragged& rg) override {
    train_check::rope(name(), "rope_backward", dx, heads, hd, rg);
    const int half = hd / 2;
    for (int s = 0; s < rg.nseq(); ++s) {
      const int L = rg.len(s), t0 = rg.start(s);
      if (L == 0) continue;
      if constexpr (kRef) {
        Block b(dx.cols_view(0, heads * hd), t0, L, true, true);
        ref::grad::rope_backward(b.p, L, heads, hd, rg.pos0(s), double(theta));
      } else {
        // The transpose is the rotation by -angle: with the second halves negated before and
        // after, the forward kernel's (a c - b s, b c + a s) becomes (a c + b s, b c - a s).
        auto negate = [&] {
          for (int t = t0; t < t0 + L; ++t)
            for (int h = 0; h < heads; ++h)
              for (int i = half; i < hd; ++i) row(dx, t)[h * hd + i] = -row(dx, t)[h * hd + i];
        };
        negate();
        K::rope(row(dx, t0), int(dx.ld), L, heads, hd, rg.pos0(s), theta);
        negate();
      }
    }
  }
  void embedding_backward(Tensor dtable, Tensor dout, const int32_t* ids) override {
    train_check::embedding_backward(name(), dtable, dout);
    for (int i = 0; i < dout.rows; ++i) {
      HM_CHECK(ids[i] >= 0 && ids[i] < dtable.rows, name(), " embedding_backward: id ", ids[i],
               " at row ", i, " is outside the table of ", dtable.rows);
      float* d = row(dtable, ids[i]);
      const float* g = row(dout, i);
      for (int j = 0; j < dout.cols; ++j) d[j] += g[j];
    }
  }
  double cross_entropy_head(Tensor dhn, Tensor dW, Tensor hn, Tensor W, const int32_t* targets,
                            double scale) override {
    train_check::cross_entropy_head(name(), dhn, dW, hn, W);
    const int n = hn.rows, D = hn.cols, V = W.rows;
    for (int i = 0; i < n; ++i)
      HM_CHECK(targets[i] >= -1 && targets[i] < V, name(), " cross_entropy_head: target ", targets[i],
               " at row ", i, " is outside [-1, ", V, ")");
    Block hb(hn, 0, n, true, false), Wb(W, 0, V, true, false), dhb(dhn, 0, n, false, true),
        dWb(dW, 0, V, true, true);
    if constexpr (!kRef) {
      return cpu::grad::cross_entropy_forward_backward(dhb.p, dWb.p, hb.p, Wb.p, targets, n, D, V, scale);
    } else {  // one row of logits at a time, in double
      std::vector<double> z(static_cast<size_t>(V));
      double loss = 0;
      for (int i = 0; i < n; ++i) {
        const float* h = hb.p + size_t(i) * D;
        float* dh = dhb.p + size_t(i) * D;
        std::fill(dh, dh + D, 0.0f);
        const int tg = targets[i];
        if (tg < 0) continue;
        double mx = -std::numeric_limits<double>::infinity();
        for (int c = 0; c < V; ++c) {
          double acc = 0;
          for (int j = 0; j < D; ++j) acc += double(h[j]) * Wb.p[size_t(c) * D + j];
          mx = std::max(mx, z[size_t(c)] = acc);
        }
        double se = 0;
        for (int c = 0; c < V; ++c) se += std::exp(z[size_t(c)] - mx);
        const double lse = mx + std::log(se);
        loss += lse - z[size_t(tg)];
        for (int c = 0; c < V; ++c) z[size_t(c)] = (std::exp(z[size_t(c)] - lse) - (c == tg)) * scale;
        for (int j = 0; j < D; ++j) {
          double acc = 0;
          for (int c = 0; c < V; ++c) acc += z[size_t(c)] * Wb.p[size_t(c) * D + j];
          dh[j] = float(acc);
        }
        for (int c = 0; c < V; ++c)
          for (int j = 0; j < D; ++j) dWb.p[size_t(c) * D + j] += float(z[size_t(c)] * h[j]);
      }
      return loss;
    }
  }
  void scale_cols_backward(Tensor dsrc, Tensor dscale, Tensor ddst, Tensor src, Tensor scale) override {
    train_check::scale_cols_backward(name(), dsrc, dscale, ddst, src, scale);
    const int n = src.rows, d = src.cols;
    std::vector<double> acc(size_t(d), 0.0);  // rows in order: one fixed sum per column
    const float* sc = scale.f32();
    for (int i = 0; i < n; ++i) {
      const float *dd = row(ddst, i), *x = row(src, i);
      float* dx = row(dsrc, i);
      for (int j = 0; j < d; ++j) {
        acc[size_t(j)] += double(dd[j]) * double(x[j]);
        dx[j] = dd[j] * sc[j];
      }
    }
    float* ds = dscale.f32();
    for (int j = 0; j < d; ++j) ds[j] += float(acc[size_t(j)]);
  }
  void row_dots(Tensor out, Tensor a, const int32_t* a_idx, Tensor b) override {
    train_check::row_dots(name(), out, a, b);
    for (int r = 0; r < b.rows; ++r) {
      const int ar = a_idx ? a_idx[r] : r;
      HM_CHECK(ar >= 0 && ar < a.rows, name(), " row_dots: index ", ar, " of row ", r, " outside a's ", a.rows, " rows");
      const float *x = row(a, ar), *y = row(b, r);
      double acc = 0;
      for (int q = 0; q < b.cols; ++q) acc += double(x[q]) * double(y[q]);
      out.f32()[r] = float(acc);
    }
  }
  void router(Tensor r, Tensor feats, Tensor u, Tensor w, Tensor fw, Tensor b, const Ragged& rg, int chunk,
              const StatePool* st) override {
    train_check::router(name(), r, feats, u, w, fw, b, rg, chunk, st);
    HM_CHECK(!feats.data || feats.ld == feats.cols, name(), " router: feats must be dense");
    const int D = u.cols;
    std::vector<float> ema, dense, scratch;  // router_forward reads rows of D: a strided u is copied
    for (int s = 0; s < rg.nseq(); ++s) {
      const int t0 = rg.start(s), L = rg.len(s);
      const float* us = row(u, t0);
      if (u.ld != D) {
        dense.resize(size_t(L) * D);
        for (int t = 0; t < L; ++t) std::memcpy(dense.data() + size_t(t) * D, row(u, t0 + t), sizeof(float) * size_t(D));
        us = dense.data();
      }
      float* f = feats.data ? row(feats, t0) : (scratch.resize(size_t(L) * kRouterFeatures), scratch.data());
      if (st) {
        float* state = st->at(rg.slot(s));
        th::router_forward(r.f32() + t0, f, state, state[D], us, L, D, int64_t(rg.pos0(s)), w.f32(), fw.f32(),
                           b.f32(), chunk > 0, chunk);
      } else {
        ema.assign(size_t(D), 0.0f);
        float chunk_logit = 0;
        th::router_forward(r.f32() + t0, f, ema.data(), chunk_logit, us, L, D, int64_t(0), w.f32(), fw.f32(), b.f32(),
                           chunk > 0, chunk);
      }
    }
  }
  void convert(Tensor dst, Tensor src) override {
    train_check::convert(name(), dst, src);
    HM_CHECK(dst.dtype == DType::F32 && src.dtype == DType::F32, name(), " convert: float32 only on this backend");
    for (int i = 0; i < src.rows; ++i) std::memmove(row(dst, i), row(src, i), sizeof(float) * size_t(src.cols));
  }
  double sum_squares(const float* x, const std::vector<ArenaSpan>& spans) override {
    train_check::spans(name(), "sum_squares", spans);
    double s = 0;
    for (const ArenaSpan& sp : spans)
      for (int64_t k = 0; k < sp.n; ++k) s += double(x[sp.offset + k]) * double(x[sp.offset + k]);
    return s;
  }
  void adamw_step(float* p, const float* g, float* m, float* v, const std::vector<ArenaSpan>& spans,
                  const AdamWStep& k) override {
    train_check::spans(name(), "adamw_step", spans);
    for (const ArenaSpan& sp : spans)
      for (int64_t j = sp.offset; j < sp.offset + sp.n; ++j) {
        const float gi = g[j] * k.grad_scale;
        m[j] = k.beta1 * m[j] + (1.0f - k.beta1) * gi;
        v[j] = k.beta2 * v[j] + (1.0f - k.beta2) * (gi * gi);
        p[j] -= k.lr * (m[j] * k.inv_bc1 / (std::sqrt(v[j] * k.inv_bc2) + k.eps) + sp.weight_decay * p[j]);
      }
  }

 private:
  // Rows [r0, r0 + n) of t as one contiguous float block: t's own memory when its rows are
  // contiguous, else a copy (read: filled from t; write: copied back into t at the end of scope).
  class Block {
   public:
    Block(Tensor t, int r0, int n, bool read, bool write) : t_(t), r0_(r0), n_(n), write_(write) {
      if (t.empty()) return;
      if (t.ld == t.cols || n <= 1) {
        p = static_cast<float*>(t.row(r0));
        write_ = false;
        return;
      }
      buf_.resize(size_t(n) * size_t(t.cols));
      p = buf_.data();
      if (read) copy_block(p, t.cols, static_cast<float*>(t.row(r0)), t.ld, n, t.cols);
    }
    ~Block() {
      if (write_) copy_block(static_cast<float*>(t_.row(r0_)), t_.ld, p, t_.cols, n_, t_.cols);
    }
    Block(const Block&) = delete;
    Block& operator=(const Block&) = delete;
    float* p = nullptr;

   private:
    Tensor t_;
    int r0_, n_;
    bool write_;
    std::vector<float> buf_;
  };
  static constexpr int kScanChunk = 128;  // as grad_cpu's: states every 128 tokens by default
  static int chunk_or_default(int chunk) { return chunk > 0 ? chunk : kScanChunk; }
  static int64_t scan_chunks(const Ragged& rg, int chunk) {
    int64_t n = 0;
    for (int s = 0; s < rg.nseq(); ++s) n += ref::grad::scan_num_chunks(rg.len(s), chunk);
    return n;
  }
  static std::vector<float> neg_exp(Tensor A_log) {  // A = -exp(A_log), as the model's forward
    std::vector<float> A(size_t(A_log.rows) * size_t(A_log.cols));
    for (int e = 0; e < A_log.rows; ++e)
      for (int n = 0; n < A_log.cols; ++n) A[size_t(e) * A_log.cols + n] = -std::exp(row(A_log, e)[n]);
    return A;
  }
  // fn(s) for each sequence of rg with tokens. Those of one token (a decode step) are spread over
  // the threads, one sequence to a thread: each alone is too small for its kernel to split, so a
  // step of many would otherwise run them one by one on one core. Longer ones run one after
  // another, each kernel using the threads itself. A kernel computes a sequence the same way
  // on any thread (its splits follow omp_get_max_threads(), which a region leaves unchanged, and
  // its scratch is per thread), so the results do not change. The reference runs in order.
  template <class Fn>
  static void for_seqs(const Ragged& rg, Fn&& fn) {
    int ones = 0;
    for (int s = 0; s < rg.nseq(); ++s) {
      if (rg.len(s) > 1) fn(s);
      ones += rg.len(s) == 1;
    }
    if (kRef || ones < 2 || omp_get_max_threads() < 2) {
      for (int s = 0; s < rg.nseq(); ++s)
        if (rg.len(s) == 1) fn(s);
      return;
    }
    std::exception_ptr err;  // an exception must not leave the region
#pragma omp parallel for schedule(static)
    for (int s = 0; s < rg.nseq(); ++s) {
      if (rg.len(s) != 1) continue;
      try {
        fn(s);
      } catch (...) {
#pragma omp critical(hm_for_seqs)
        if (!err) err = std::current_exception();
      }
    }
    if (err) std::rethrow_exception(err);
  }

  bool inv_ = false;  // set_batch_invariant

  // The kernel set, chosen at compile time.
  struct K {
    static constexpr auto rmsnorm = kRef ? &ref::rmsnorm : &cpu::rmsnorm;
    static constexpr auto linear = kRef ? &ref::linear : &cpu::linear;
    static constexpr auto linear_packed = kRef ? &ref::linear_packed : &cpu::linear_packed;
    static constexpr auto swiglu = kRef ? &ref::swiglu : &cpu::swiglu;
    static constexpr auto relu2 = kRef ? &ref::relu2 : &cpu::relu2;
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
