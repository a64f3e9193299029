// The decode-step kernels (kernels/cuda/decode.h) against kernels/ref on fresh random inputs:
// both GEMV kernels at the row counts they take (to 32) and odd column counts, with and without the fused
// RMSNorm, accumulation and a float output; the Mamba input stage (norm + in_proj + conv step)
// and the dt-projecting scan step through the backend, on decode batches in shuffled slots of a
// pool with unused slots, the norm + linear (+ scaled add) of a bridge or the LM head, and
// Mamba-2's gated norm + out_proj, against the plain ops in order. Inputs are rounded to the tested
// type and the reference gets the same values widened; bounds on max|got - ref| / max|ref| as
// in test_cuda_backend.cpp (f32 1e-5, f16 1e-3, bf16 8e-3; float states 1e-5 except where
// a rounded input feeds them). Skipped without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "core/rng.h"
#include "cuda_test_util.h"
#include "kernels/cuda/decode.h"
#include "kernels/ops.h"

namespace {

using hm::DType;
using hm::Tensor;

using hm::test::has_gpu;
using hm::test::rel_err;
using hm::test::tol;

// A rows x ld matrix of `dt` on the device; `f` holds its values (rounded to dt) as floats.
struct DevMat {
  hm::Buffer buf;
  Tensor t;
  std::vector<float> f;
  DevMat(hm::Backend& be, DType dt, int rows, int ld, hm::Rng& rng, double scale, double mean = 0)
      : buf(be, std::max<size_t>(16, size_t(rows) * size_t(ld) * hm::dtype_size(dt))),
        t(buf.data(), dt, rows, ld, ld), f(size_t(rows) * size_t(ld)) {
    for (auto& v : f) v = float(mean + scale * rng.normal());
    std::vector<char> bytes(f.size() * hm::dtype_size(dt));
    hm::convert_from_f32(bytes.data(), dt, f.data(), f.size());
    hm::convert_to_f32(f.data(), bytes.data(), dt, f.size());
    be.to_device(buf.data(), bytes.data(), bytes.size());
  }
  std::vector<float> get(hm::Backend& be) const {
    std::vector<char> bytes(f.size() * t.elem_size());
    be.to_host(bytes.data(), buf.data(), bytes.size());
    std::vector<float> out(f.size());
    hm::convert_to_f32(out.data(), bytes.data(), t.dtype, f.size());
    return out;
  }
  // Rows x n from column c0, as the kernels see it.
  Tensor cols(int c0, int n) const { return t.cols_view(c0, n); }
};

// The row-major [rows, cols] block of f at stride ld from column c0, dense.
std::vector<float> dense(const std::vector<float>& f, int rows, int cols, int ld, int c0) {
  std::vector<float> d(size_t(rows) * size_t(cols));
  for (int i = 0; i < rows; ++i) std::copy_n(f.begin() + ptrdiff_t(i) * ld + c0, cols, d.begin() + ptrdiff_t(i) * cols);
  return d;
}

// nseq one-token sequences in distinct shuffled slots of a pool of nseq + 3 (decode batch).
int decode_batch(hm::Ragged& rg, hm::Rng& rng, int nseq) {
  const int n_slots = nseq + 3;
  std::vector<int> all(static_cast<size_t>(n_slots));
  std::iota(all.begin(), all.end(), 0);
  for (int i = n_slots - 1; i > 0; --i) std::swap(all[size_t(i)], all[rng.next_u64() % uint64_t(i + 1)]);
  rg.clear();
  for (int s = 0; s < nseq; ++s) rg.add(all[size_t(s)], 1, 5 + s);
  return n_slots;
}

class CudaDecode : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
    be_ = hm::make_cuda_backend();
    cuda_ = dynamic_cast<hm::CudaBackend*>(be_.get());
    ASSERT_NE(cuda_, nullptr);
  }
  hm::Backend& be() { return *be_; }
  DType T() const { return GetParam(); }
  std::unique_ptr<hm::Backend> be_;
  hm::CudaBackend* cuda_ = nullptr;
};

template <class F>
void with_type(DType t, F&& f) {
  if (t == DType::F32) f(static_cast<float*>(nullptr));
  else if (t == DType::BF16) f(static_cast<__nv_bfloat16*>(nullptr));
  else f(static_cast<__half*>(nullptr));
}

// cuda::gemv directly, both kernels (tensor cores on and off): row counts 1 to 32 (two mma
// tiles; the CUDA-core kernel to 8), column counts from 1 to past two waves of blocks (groups
// of 8 cut at odd n), k from one vector to 4096 (so 1 to 8 warps per column) with k % 32 != 0
// for the CUDA-core kernel only, views at aligned offsets of wider matrices, y a view at an odd
// offset whose neighbours must stay untouched. Shapes a kernel does not take are skipped, and
// counted so the test fails if the tensor-core kernel never ran.
TEST_P(CudaDecode, GemvMatchesRef) {
  hm::Rng rng(301);
  const std::vector<DType> outs = T() == DType::F32 ? std::vector<DType>{DType::F32}
                                                    : std::vector<DType>{T(), DType::F32};
  int ran_mma = 0, ran_core = 0, ran_row = 0;
  const bool tc_default = hm::cuda::gemv_tensor_cores(), row_default = hm::cuda::gemv_row_kernel();
  for (auto [n, k] : {std::pair{1, 8}, std::pair{67, 136}, std::pair{1001, 1048}, std::pair{160, 4096},
                      std::pair{3001, 512}, std::pair{77, 160}, std::pair{8, 96}})
    for (int m : {1, 2, 3, 5, 8, 9, 16, 17, 32})
      for (int kernel = 0; kernel < 3; ++kernel)  // 0 tensor cores allowed, 1 CUDA cores, 2 row kernel
        for (DType ty : outs)
          for (int variant = 0; variant < 3; ++variant) {  // 0 plain, 1 accumulate, 2 fused norm
            const bool acc = variant == 1, norm = variant == 2;
            const bool tc = kernel == 0;
            hm::cuda::set_gemv_tensor_cores(tc);
            hm::cuda::set_gemv_row_kernel(kernel == 2);
            const int ldx = k + 16, ldw = k + 8, ldy = n + 5;
            DevMat x(be(), T(), m, ldx, rng, 1.0), W(be(), T(), n, ldw, rng, 0.1);
            DevMat g(be(), T(), 1, k + 8, rng, 0.3, 1.0), y(be(), ty, m, ldy, rng, 1.0);
            const float eps = 1e-5f;
            bool ran = false;
            with_type(T(), [&](auto tag) {
              using E = std::remove_pointer_t<decltype(tag)>;
              const E* xp = static_cast<const E*>(x.cols(8, k).data);
              const E* gp = norm ? static_cast<const E*>(g.cols(8, k).data) : nullptr;
              if (!hm::cuda::gemv_fits(m, k, xp, ldx, W.buf.data(), ldw, gp, sizeof(E))) return;
              ran = true;
              if (ty == DType::F32)
                hm::cuda::gemv<E, float>(static_cast<float*>(y.cols(1, n).data), ldy, xp, ldx,
                                         static_cast<const E*>(W.buf.data()), ldw, m, n, k, acc, gp, eps, nullptr,
                                         cuda_->stream());
              else
                hm::cuda::gemv<E, E>(static_cast<E*>(y.cols(1, n).data), ldy, xp, ldx,
                                     static_cast<const E*>(W.buf.data()), ldw, m, n, k, acc, gp, eps, nullptr,
                                     cuda_->stream());
            });
            if (!ran) continue;
            const bool row = kernel == 2 && (m == 1 ? size_t(k) * 4 <= 48 * 1024
                                                    : hm::cuda::gemv_rows_fits(m, k, hm::dtype_size(T())));
            const bool mma = !row && tc && T() != DType::F32 && k % 32 == 0;
            (row ? ran_row : mma ? ran_mma : ran_core) += 1;
            std::vector<float> xin = dense(x.f, m, k, ldx, 8);
            if (norm) {
              std::vector<float> gd = dense(g.f, 1, k, k + 8, 8), xn(xin.size());
              hm::ref::rmsnorm(xn.data(), xin.data(), gd.data(), m, k, eps);
              // The tensor cores take the normed row as stored in T, as the unfused path does.
              if (mma) {
                std::vector<char> bytes(xn.size() * hm::dtype_size(T()));
                hm::convert_from_f32(bytes.data(), T(), xn.data(), xn.size());
                hm::convert_to_f32(xn.data(), bytes.data(), T(), xn.size());
              }
              xin = xn;
            }
            std::vector<float> ref = y.f;
            hm::ref::linear(ref.data() + 1, ldy, xin.data(), k, dense(W.f, n, k, ldw, 0).data(), m, n, k, acc);
            const std::vector<float> got = y.get(be());
            // Float output: only the sums' order differs, unless the tensor cores took a normed
            // row rounded to T, where one element can round the other way than the reference's.
            const double bound = ty != DType::F32 ? tol(ty) : mma && norm ? tol(T()) : 1e-5;
            EXPECT_LE(rel_err(got, ref, m, n, ldy, 1), bound)
                << "gemv m " << m << " n " << n << " k " << k << " out " << hm::compute_dtype_name(ty) << " variant "
                << variant << (row ? " row kernel" : mma ? " tensor cores" : " cuda cores");
            for (int i = 0; i < m; ++i)
              for (int j : {0, n + 1, n + 4}) EXPECT_EQ(got[size_t(i) * ldy + j], y.f[size_t(i) * ldy + j]);
          }
  hm::cuda::set_gemv_tensor_cores(tc_default);
  hm::cuda::set_gemv_row_kernel(row_default);
  EXPECT_GT(ran_core, 50);
  EXPECT_GE(ran_row, 7 * int(outs.size()) * 3);  // every shape at one row, every output type and variant
  if (T() != DType::F32) {
    EXPECT_GT(ran_mma, 100);
  }
  // What it does not take: too many rows (9 with the norm; with the row kernel on, 17, or 16 whose
  // float rows exceed its 96 KB), k not whole vectors, a misaligned x.
  const DevMat x(be(), T(), 33, 64, rng, 1.0);
  hm::cuda::set_gemv_row_kernel(false);
  EXPECT_FALSE(hm::cuda::gemv_fits(T() == DType::F32 ? 9 : 33, 32, x.buf.data(), 64, x.buf.data(), 64, nullptr,
                                   hm::dtype_size(T())));
  EXPECT_FALSE(hm::cuda::gemv_fits(9, 32, x.buf.data(), 64, x.buf.data(), 64, x.buf.data(), hm::dtype_size(T())));
  hm::cuda::set_gemv_row_kernel(true);
  EXPECT_TRUE(hm::cuda::gemv_fits(16, 32, x.buf.data(), 64, x.buf.data(), 64, x.buf.data(), hm::dtype_size(T())));
  EXPECT_FALSE(hm::cuda::gemv_fits(17, 32, x.buf.data(), 64, x.buf.data(), 64, x.buf.data(), hm::dtype_size(T())));
  EXPECT_FALSE(hm::cuda::gemv_rows_fits(16, 2048, hm::dtype_size(T())));
  hm::cuda::set_gemv_row_kernel(row_default);
  EXPECT_FALSE(hm::cuda::gemv_fits(1, 12, x.buf.data(), 64, x.buf.data(), 64, nullptr, 2));
  EXPECT_FALSE(hm::cuda::gemv_fits(1, 32, x.cols(1, 32).data, 64, x.buf.data(), 64, nullptr, hm::dtype_size(T())));
}

// Backend::mamba_in on CUDA (fused at <= 8 one-token sequences; beyond, with a unit norm weight
// (unit_norm), in_proj over x then 1 / rms inside the conv step; the plain ops otherwise)
// against rmsnorm -> linear -> conv1d_silu of kernels/ref per sequence. Two layouts: Mamba-1's
// x | z (the conv on the first E of 2E columns) and Mamba-2's z | xBC | dt (the conv on E
// columns from column 48 of 2E + 8; unit_norm there takes the plain ops).
TEST_P(CudaDecode, MambaInMatchesPlainOps) {
  hm::Rng rng(302);
  const int D = 136, E = 72, K = 4;
  const bool row_default = hm::cuda::gemv_row_kernel();
  for (int c0 : {0, 48})
    for (int nseq : {1, 3, 8, 9, 16, 33, 70})
      for (int mode = 0; mode < 3; ++mode)  // 0 no norm, 1 norm, 2 norm with a unit weight (unit_norm)
        for (int fused = 0; fused < 3; ++fused) {  // 0 plain ops, 1 fused, 2 fused on the row kernel
          const bool norm = mode > 0, unit = mode == 2;
          cuda_->set_decode_kernels(fused > 0);
          hm::cuda::set_gemv_row_kernel(fused == 2);
          hm::Ragged rg;
          const int n_slots = decode_batch(rg, rng, nseq);
          rg.upload(be());
          const int n = c0 == 0 ? 2 * E : 2 * E + 8, ldxz = n + 8, ldxc = E + 3;
          DevMat x(be(), T(), nseq, D, rng, 2.0), normed(be(), T(), nseq, D, rng, 0.0);
          DevMat g(be(), T(), 1, D, rng, unit ? 0.0 : 0.3, 1.0), W(be(), T(), n, D, rng, 0.1);
          DevMat w(be(), T(), E, K, rng, 0.4), b(be(), T(), 1, E, rng, 0.3);
          DevMat xz(be(), T(), nseq, ldxz, rng, 1.0), xc(be(), T(), nseq, ldxc, rng, 1.0);
          DevMat st(be(), DType::F32, n_slots, E * (K - 1), rng, 1.0);
          const hm::StatePool pool{static_cast<float*>(st.buf.data()), n_slots, int64_t(E) * (K - 1)};
          be().mamba_in(xz.cols(0, n), xc.cols(0, E), c0, pool, x.t, normed.t, norm ? g.t : Tensor(), 1e-5f, W.t, w.t,
                        b.t, rg, unit);
          std::vector<float> u = x.f;
          if (norm) hm::ref::rmsnorm(u.data(), x.f.data(), g.f.data(), nseq, D, 1e-5f);
          std::vector<float> rxz = xz.f, rxc = xc.f, rst = st.f;
          hm::ref::linear(rxz.data(), ldxz, u.data(), D, W.f.data(), nseq, n, D, false);
          // The conv reads xz as stored in T (rounded), as the kernels do.
          std::vector<float> xr = dense(rxz, nseq, E, ldxz, c0);
          std::vector<char> bytes(xr.size() * hm::dtype_size(T()));
          hm::convert_from_f32(bytes.data(), T(), xr.data(), xr.size());
          hm::convert_to_f32(xr.data(), bytes.data(), T(), xr.size());
          for (int s = 0; s < nseq; ++s)
            hm::ref::conv1d_silu(rxc.data() + size_t(s) * ldxc, ldxc, rst.data() + size_t(rg.slot(s)) * E * (K - 1),
                                 xr.data() + size_t(s) * E, E, w.f.data(), b.f.data(), 1, E, K);
          const std::string what = std::string("mamba_in conv from ") + std::to_string(c0) + " nseq " +
                                   std::to_string(nseq) + (unit ? " unit norm" : norm ? " norm" : "") +
                                   (fused == 2 ? " fused, row kernel" : fused ? " fused" : " plain");
          EXPECT_LE(rel_err(xz.get(be()), rxz, nseq, n, ldxz), tol(T())) << what << " xz";
          EXPECT_LE(rel_err(xc.get(be()), rxc, nseq, E, ldxc), tol(T())) << what << " xc";
          // The window holds the stored x, which a last-bit difference in xz can flip.
          EXPECT_LE(rel_err(st.get(be()), rst, n_slots, E * (K - 1), E * (K - 1)), T() == DType::F32 ? 1e-5 : tol(T()))
              << what << " conv state";
        }
  cuda_->set_decode_kernels(true);
  hm::cuda::set_gemv_row_kernel(row_default);
}

// Backend::norm_linear on CUDA (one GEMV with the norm, and a bridge's column scale, inside at
// 1..8 rows; the plain ops otherwise) against rmsnorm -> linear (-> add_rows) of kernels/ref:
// rows 1, 3, 8 (the row kernel's one-row and multi-row forms) and 16 (plain), odd sizes, y a
// strided view, assigned or accumulated, y in the input type or float (the LM head's logits),
// with and without a scale.
TEST_P(CudaDecode, NormLinearMatchesPlainOps) {
  hm::Rng rng(305);
  const bool row_default = hm::cuda::gemv_row_kernel();
  struct Shape {
    int k, n;
  };
  for (Shape s : {Shape{136, 77}, Shape{512, 1001}, Shape{1024, 40}})
    for (int m : {1, 3, 8, 16})
      for (int variant = 0; variant < 4; ++variant)  // 0 assign, 1 accumulate, 2 scale (+=), 3 float y
        for (int fused = 0; fused < 3; ++fused) {  // 0 plain ops, 1 fused, 2 fused on the row kernel
          if (variant == 3 && T() == DType::F32) continue;  // float y is the input type there
          cuda_->set_decode_kernels(fused > 0);
          hm::cuda::set_gemv_row_kernel(fused == 2);
          const int k = s.k, n = s.n, ldy = n + 5;
          const bool acc = variant == 1 || variant == 2, scaled = variant == 2;
          const DType ty = variant == 3 ? DType::F32 : T();
          DevMat x(be(), T(), m, k, rng, 2.0), normed(be(), T(), m, k, rng, 0.0), tmp(be(), T(), m, n, rng, 0.0);
          DevMat g(be(), T(), 1, k, rng, 0.3, 1.0), W(be(), T(), n, k, rng, 0.1), sc(be(), T(), 1, n, rng, 0.5);
          DevMat y(be(), ty, m, ldy, rng, 1.0);
          be().norm_linear(y.cols(1, n), x.t, normed.t, g.t, 1e-5f, W.t, acc, scaled ? sc.t : Tensor(), tmp.t);
          std::vector<float> u(size_t(m) * k), ref = y.f;
          hm::ref::rmsnorm(u.data(), x.f.data(), g.f.data(), m, k, 1e-5f);
          if (!scaled) {
            hm::ref::linear(ref.data() + 1, ldy, u.data(), k, W.f.data(), m, n, k, acc);
          } else {
            std::vector<float> t(size_t(m) * n);
            hm::ref::linear(t.data(), n, u.data(), k, W.f.data(), m, n, k, false);
            for (int i = 0; i < m; ++i)
              for (int j = 0; j < n; ++j) ref[size_t(i) * ldy + 1 + j] += sc.f[size_t(j)] * t[size_t(i) * n + j];
          }
          const std::vector<float> got = y.get(be());
          const std::string what = "norm_linear m " + std::to_string(m) + " k " + std::to_string(k) + " n " +
                                   std::to_string(n) + " variant " + std::to_string(variant) +
                                   (fused == 2 ? " fused, row kernel" : fused ? " fused" : " plain");
          // x' is rounded to T before the products (the plain rmsnorm stores it): T's bound even
          // for float y.
          EXPECT_LE(rel_err(got, ref, m, n, ldy, 1), tol(T())) << what;
          for (int i = 0; i < m; ++i)
            for (int j : {0, n + 1, n + 4})
              EXPECT_EQ(got[size_t(i) * ldy + j], y.f[size_t(i) * ldy + j]) << what << ": row " << i << " column " << j
                                                                          << " outside y was written";
        }
  cuda_->set_decode_kernels(true);
  hm::cuda::set_gemv_row_kernel(row_default);
}

// Backend::gated_norm_linear on CUDA (Mamba-2's gated norm inside the output projection's row
// GEMV where it takes the rows and one norm group spans the row; the plain ops otherwise) against
// ref::gated_rmsnorm -> ref::linear: rows 1, 3, 8 and 16, odd sizes and the 130M's 1536 -> 768,
// one group a row or two (plain), z a view inside a wider z | xBC | dt row, out a strided view,
// assigned or accumulated. The fused GEMV keeps the normed row in float where the plain ops
// store it in T: T's bound.
TEST_P(CudaDecode, GatedNormLinearMatchesPlainOps) {
  hm::Rng rng(307);
  int fused_runs = 0;
  for (auto [k, n] : {std::pair{136, 77}, std::pair{1536, 768}, std::pair{512, 1001}})
    for (int m : {1, 3, 8, 16})
      for (int groups : {1, 2})
        for (int acc = 0; acc < 2; ++acc)
          for (int fused = 0; fused < 2; ++fused) {
            cuda_->set_decode_kernels(fused > 0);
            const int ldy = k + 8, ldz = 2 * k + 24, ldo = n + 5, group = k / groups;
            DevMat y(be(), T(), m, ldy, rng, 1.0), z(be(), T(), m, ldz, rng, 1.5), normed(be(), T(), m, k, rng, 0.0);
            DevMat g(be(), T(), 1, k, rng, 0.3, 1.0), W(be(), T(), n, k, rng, 0.1), out(be(), T(), m, ldo, rng, 1.0);
            const Tensor yv = y.cols(0, k), zv = z.cols(8, k);
            fused_runs += fused && groups == 1 &&
                          hm::cuda::gemv_gate_fits(m, k, yv.data, ldy, W.t.data, k, g.t.data, zv.data, ldz,
                                                   hm::dtype_size(T()));
            be().gated_norm_linear(out.cols(1, n), yv, zv, g.t, group, 1e-5f, W.t, acc != 0, normed.t);
            const std::vector<float> yd = dense(y.f, m, k, ldy, 0), zd = dense(z.f, m, k, ldz, 8);
            std::vector<float> xn(size_t(m) * k), ref = out.f;
            hm::ref::gated_rmsnorm(xn.data(), k, yd.data(), k, zd.data(), k, g.f.data(), m, k, group, 1e-5f);
            hm::ref::linear(ref.data() + 1, ldo, xn.data(), k, W.f.data(), m, n, k, acc != 0);
            const std::vector<float> got = out.get(be());
            const std::string what = "gated_norm_linear m " + std::to_string(m) + " k " + std::to_string(k) + " n " +
                                     std::to_string(n) + " groups " + std::to_string(groups) +
                                     (acc ? " accumulate" : "") + (fused ? " fused" : " plain");
            EXPECT_LE(rel_err(got, ref, m, n, ldo, 1), tol(T())) << what;
            for (int i = 0; i < m; ++i)
              for (int j : {0, n + 1, n + 4})
                EXPECT_EQ(got[size_t(i) * ldo + j], out.f[size_t(i) * ldo + j]) << what << ": row " << i
                                                                               << " column " << j << " written";
          }
  cuda_->set_decode_kernels(true);
  if (hm::cuda::gemv_row_kernel()) {
    EXPECT_GE(fused_runs, 3 * 3 * 2);  // rows 1, 3 and 8 of every shape, assigned and accumulated
  }
}

// Backend::linear_bridge on CUDA against kernels/ref: y += x . W^T, then y += scale ⊙ (rmsnorm(x) *
// g . bW^T). One row: one GEMV for both. Rows the bridge's GEMV does not take, with `folded`
// ([W ; diag(scale) bW diag(g)], rounded once): one GEMM and bridge_add, which also writes the
// next layer's normed input rmsnorm(y) * next_w of the y it stored. Otherwise,
// or with the decode kernels off, the plain ops.
TEST_P(CudaDecode, LinearBridgeMatchesPlainOps) {
  hm::Rng rng(306);
  const bool row_default = hm::cuda::gemv_row_kernel();
  struct Shape {
    int k, n;
  };
  for (Shape s : {Shape{136, 77}, Shape{512, 1001}, Shape{1024, 40}, Shape{1024, 512}})
    for (int m : {1, 3, 9, 16, 37})
      for (int fused = 0; fused < 3; ++fused) {  // 0 plain ops, 1 decode kernels with the row kernel off, 2 fused
        cuda_->set_decode_kernels(fused > 0);
        hm::cuda::set_gemv_row_kernel(fused == 2);
        const int k = s.k, n = s.n, ldy = n + 5;
        DevMat x(be(), T(), m, k, rng, 2.0), normed(be(), T(), m, k, rng, 0.0), tmp(be(), T(), m, 2 * n, rng, 0.0);
        DevMat g(be(), T(), 1, k, rng, 0.3, 1.0), W(be(), T(), n, k, rng, 0.1), bW(be(), T(), n, k, rng, 0.1);
        DevMat sc(be(), T(), 1, n, rng, 0.5), y(be(), T(), m, ldy, rng, 1.0), nw(be(), T(), 1, n, rng, 0.3, 1.0);
        DevMat next(be(), T(), m, ldy, rng, 1.0);
        // The folded weight from the rounded operands, rounded once to T.
        DevMat folded(be(), T(), 2 * n, k, rng, 0.0);
        {
          std::vector<float> f(size_t(2) * n * k);
          std::copy(W.f.begin(), W.f.end(), f.begin());
          for (int j = 0; j < n; ++j)
            for (int c = 0; c < k; ++c)
              f[size_t(n + j) * k + c] = sc.f[size_t(j)] * bW.f[size_t(j) * k + c] * g.f[size_t(c)];
          std::vector<char> bytes(f.size() * hm::dtype_size(T()));
          hm::convert_from_f32(bytes.data(), T(), f.data(), f.size());
          be().to_device(folded.buf.data(), bytes.data(), bytes.size());
        }
        const bool wrote = be().linear_bridge(y.cols(1, n), x.t, W.t, normed.t, g.t, 1e-5f, bW.t, sc.t, tmp.t,
                                              folded.t, nw.t, next.cols(2, n));
        std::vector<float> u(size_t(m) * k), t(size_t(m) * n), ref = y.f;
        hm::ref::linear(ref.data() + 1, ldy, x.f.data(), k, W.f.data(), m, n, k, true);
        hm::ref::rmsnorm(u.data(), x.f.data(), g.f.data(), m, k, 1e-5f);
        hm::ref::linear(t.data(), n, u.data(), k, bW.f.data(), m, n, k, false);
        for (int i = 0; i < m; ++i)
          for (int j = 0; j < n; ++j) ref[size_t(i) * ldy + 1 + j] += sc.f[size_t(j)] * t[size_t(i) * n + j];
        const std::vector<float> got = y.get(be());
        const std::string what = "linear_bridge m " + std::to_string(m) + " k " + std::to_string(k) + " n " +
                                 std::to_string(n) + (fused == 2 ? " fused" : fused ? " row kernel off" : " plain");
        EXPECT_LE(rel_err(got, ref, m, n, ldy, 1), tol(T())) << what;
        for (int i = 0; i < m; ++i)
          for (int j : {0, n + 1, n + 4})
            EXPECT_EQ(got[size_t(i) * ldy + j], y.f[size_t(i) * ldy + j]) << what << ": row " << i << " column " << j
                                                                        << " outside y was written";
        // The folded form is taken exactly where the bridge's GEMV is not.
        const bool gemv = m <= 8 && (m == 1 || fused == 2);
        EXPECT_EQ(wrote, fused > 0 && m > 1 && !gemv) << what;
        const std::vector<float> got_next = next.get(be());
        if (wrote) {
          // next is the norm of the y that was stored (y itself was checked above).
          std::vector<float> ys = dense(got, m, n, ldy, 1), nref(size_t(m) * n), full = next.f;
          hm::ref::rmsnorm(nref.data(), ys.data(), nw.f.data(), m, n, 1e-5f);
          for (int i = 0; i < m; ++i) std::copy_n(nref.begin() + ptrdiff_t(i) * n, n, full.begin() + ptrdiff_t(i) * ldy + 2);
          EXPECT_LE(rel_err(got_next, full, m, n, ldy, 2), tol(T())) << what << ": next";
        }
        for (int i = 0; i < m; ++i)
          for (int j : {0, 1, n + 2, n + 4})
            EXPECT_EQ(got_next[size_t(i) * ldy + j], next.f[size_t(i) * ldy + j])
                << what << ": row " << i << " column " << j << " outside next was written";
        if (!wrote) {
          EXPECT_EQ(got_next, next.f) << what << ": next written where linear_bridge returned false";
        }
      }
  cuda_->set_decode_kernels(true);
  hm::cuda::set_gemv_row_kernel(row_default);
}

// Backend::dt_scan on CUDA (dt_proj inside the scan step for decode batches) against
// linear (dt rounded to T, as a stored dt is) -> selective_scan of kernels/ref.
TEST_P(CudaDecode, DtScanMatchesPlainOps) {
  hm::Rng rng(303);
  for (int nseq : {1, 5})
    // R 128 and 32: the 16-byte loads of the dt_w quarters (1.4B, seed); 160: past the registers.
    for (auto [E, N, R] : {std::tuple{67, 16, 5}, std::tuple{40, 5, 48}, std::tuple{130, 33, 17},
                           std::tuple{72, 16, 128}, std::tuple{33, 16, 32}, std::tuple{41, 16, 160}})
      for (bool fused : {true, false}) {
        cuda_->set_decode_kernels(fused);
        cuda_->set_dt_scan_seqs(fused ? nseq : 0);  // the fused kernel at every batch size, whatever the policy
        hm::Ragged rg;
        const int n_slots = decode_batch(rg, rng, nseq);
        rg.upload(be());
        const int ldbc = R + 2 * N + 3, ldy = E + 1;
        DevMat xz(be(), T(), nseq, 2 * E, rng, 1.0), dbc(be(), T(), nseq, ldbc, rng, 1.0);
        DevMat dtw(be(), T(), E, R, rng, 0.3), dt(be(), T(), nseq, E, rng, 0.0);
        DevMat dt_bias(be(), T(), 1, E, rng, 0.4, -0.5), Dm(be(), T(), 1, E, rng, 1.0), y(be(), T(), nseq, ldy, rng, 1.0);
        DevMat A(be(), DType::F32, E, N, rng, 0.0);
        for (auto& v : A.f) v = -std::exp(-1 + 2.5 * rng.uniform());
        be().to_device(A.buf.data(), A.f.data(), A.f.size() * 4);
        DevMat st(be(), DType::F32, n_slots, E * N, rng, 0.5);
        const hm::StatePool pool{static_cast<float*>(st.buf.data()), n_slots, int64_t(E) * N};
        be().dt_scan(y.cols(0, E), pool, xz.cols(0, E), dbc.cols(0, R), dtw.t, dt.t, dt_bias.t,
                     static_cast<const float*>(A.buf.data()), dbc.cols(R, N), dbc.cols(R + N, N), Dm.t, xz.cols(E, E),
                     rg);
        std::vector<float> rdt(size_t(nseq) * E);
        hm::ref::linear(rdt.data(), E, dense(dbc.f, nseq, R, ldbc, 0).data(), R, dtw.f.data(), nseq, E, R, false);
        std::vector<char> bytes(rdt.size() * hm::dtype_size(T()));
        hm::convert_from_f32(bytes.data(), T(), rdt.data(), rdt.size());
        hm::convert_to_f32(rdt.data(), bytes.data(), T(), rdt.size());
        std::vector<float> ref = y.f, rst = st.f;
        for (int s = 0; s < nseq; ++s)
          hm::ref::selective_scan(ref.data() + size_t(s) * ldy, ldy, rst.data() + size_t(rg.slot(s)) * E * N,
                                  xz.f.data() + size_t(s) * 2 * E, 2 * E, rdt.data() + size_t(s) * E, E, dt_bias.f.data(),
                                  A.f.data(), dbc.f.data() + size_t(s) * ldbc + R, dbc.f.data() + size_t(s) * ldbc + R + N,
                                  ldbc, Dm.f.data(), xz.f.data() + size_t(s) * 2 * E + E, 2 * E, 1, E, N);
        const std::string what = "dt_scan nseq " + std::to_string(nseq) + " E " + std::to_string(E) + " N " +
                                 std::to_string(N) + " R " + std::to_string(R) + (fused ? " fused" : " plain");
        EXPECT_LE(rel_err(y.get(be()), ref, nseq, E, ldy), tol(T())) << what;
        // A dt one rounding step apart moves the state by about that step.
        EXPECT_LE(rel_err(st.get(be()), rst, n_slots, E * N, E * N), T() == DType::F32 ? 1e-5 : tol(T())) << what << " state";
      }
  cuda_->set_decode_kernels(true);
  cuda_->set_dt_scan_seqs(-1);
}

INSTANTIATE_TEST_SUITE_P(Types, CudaDecode, ::testing::Values(DType::F32, DType::BF16, DType::F16),
                         [](const ::testing::TestParamInfo<DType>& p) { return std::string(hm::compute_dtype_name(p.param)); });

}  // namespace
