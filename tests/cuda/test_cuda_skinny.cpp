// The skinny GEMM (kernels/cuda/skinny.h), f32, bf16 and f16:
//  - MatchesRef: against kernels/ref's linear on fresh random inputs at odd sizes: m 1 to 64
//    (every x-tile count the kernel is instantiated for), n odd and not multiples of any tile,
//    k from one vector to 4096 and odd (k % 8 != 0 and a misaligned x run the element-by-element
//    staging), x and W views of wider matrices (ld > cols), y a view at an odd column offset
//    whose neighbours must stay untouched, accumulate on and off, y in the input type and in
//    float; the automatic tiling and forced ones (32, 64, 128 rows per block; 1, 3 and 8
//    k-splits; 16-bit chunks of 32, 64 and 128 elements). Bounds on max|got - ref| / max|ref|:
//    y in bf16 8e-3, f16 1e-3; float y 1e-5 from float inputs, 2e-5 from 16-bit ones (the
//    tensor cores' float sums in another order).
//  - BatchInvariant: output rows computed alone, in batches of 7, 33 and 64 (rows shuffled, so
//    each lands at another position of its mma tile) have the same bits as in the batch of 64,
//    on the 1.4B model's x_proj, dt_proj and out_proj shapes and odd ones; and a call repeated
//    gives the same bits (issue 16's batch invariance, skinny.h says why it holds).
//  - BackendRoutesDecodeRows: Backend::linear at 2, 17 and 64 rows is the skinny kernel (the
//    same bits as calling it directly).
// Skipped without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "core/rng.h"
#include "cuda_test_util.h"
#include "kernels/cuda/skinny.h"
#include "kernels/ops.h"

namespace {

using hm::DType;
using hm::Tensor;

using hm::test::has_gpu;
using hm::test::rel_err;
using hm::test::tol;

// A rows x ld matrix of `dt` on the device; `f` holds its values (rounded to dt) as floats.
struct Mat {
  hm::Buffer buf;
  Tensor t;
  std::vector<float> f;
  Mat(hm::Backend& be, DType dt, int rows, int ld, hm::Rng& rng, double scale)
      : buf(be, std::max<size_t>(16, size_t(rows) * size_t(ld) * hm::dtype_size(dt))),
        t(buf.data(), dt, rows, ld, ld), f(size_t(rows) * size_t(ld)) {
    for (auto& v : f) v = float(scale * rng.normal());
    put(be);
  }
  // Uploads f (rounded to the type; f keeps the rounded values).
  void put(hm::Backend& be) {
    std::vector<char> bytes(f.size() * hm::dtype_size(t.dtype));
    hm::convert_from_f32(bytes.data(), t.dtype, f.data(), f.size());
    hm::convert_to_f32(f.data(), bytes.data(), t.dtype, f.size());
    be.to_device(buf.data(), bytes.data(), bytes.size());
  }
  std::vector<float> get(hm::Backend& be) const {
    std::vector<char> bytes(f.size() * hm::dtype_size(t.dtype));
    be.to_host(bytes.data(), buf.data(), bytes.size());
    std::vector<float> out(f.size());
    hm::convert_to_f32(out.data(), bytes.data(), t.dtype, f.size());
    return out;
  }
  // The element at (r, c) as a device address.
  void* at(int r, int c) const {
    return static_cast<char*>(buf.data()) + (size_t(r) * size_t(t.ld) + size_t(c)) * hm::dtype_size(t.dtype);
  }
};

// The row-major [rows, cols] block of f at stride ld from column c0, dense.
std::vector<float> dense(const std::vector<float>& f, int rows, int cols, int ld, int c0) {
  std::vector<float> d(size_t(rows) * size_t(cols));
  for (int i = 0; i < rows; ++i)
    std::copy_n(f.begin() + ptrdiff_t(i) * ld + c0, cols, d.begin() + ptrdiff_t(i) * cols);
  return d;
}

template <class F>
void with_type(DType t, F&& f) {
  if (t == DType::F32) f(static_cast<float*>(nullptr));
  else if (t == DType::BF16) f(static_cast<__nv_bfloat16*>(nullptr));
  else f(static_cast<__half*>(nullptr));
}

// cuda::skinny on Mat views: y (type ty) at column yc0, x at column xc0, W from column 0.
void run_skinny(hm::Backend& be, DType T, DType ty, const Mat& y, int yc0, const Mat& x, int xc0, const Mat& W, int m,
                int n, int k, bool acc, const hm::cuda::SkinnyPlan* plan) {
  auto* cb = dynamic_cast<hm::CudaBackend*>(&be);
  with_type(T, [&](auto tag) {
    using E = std::remove_pointer_t<decltype(tag)>;
    const E* xp = static_cast<const E*>(x.at(0, xc0));
    const E* wp = static_cast<const E*>(W.buf.data());
    if (ty == DType::F32)
      hm::cuda::skinny<E, float>(static_cast<float*>(y.at(0, yc0)), y.t.ld, xp, x.t.ld, wp, W.t.ld, m, n, k, acc,
                                 cb->stream(), plan);
    else
      hm::cuda::skinny<E, E>(static_cast<E*>(y.at(0, yc0)), y.t.ld, xp, x.t.ld, wp, W.t.ld, m, n, k, acc, cb->stream(),
                             plan);
  });
}

class CudaSkinny : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
    be_ = hm::make_cuda_backend();
  }
  hm::Backend& be() { return *be_; }
  DType T() const { return GetParam(); }
  std::unique_ptr<hm::Backend> be_;
};

TEST_P(CudaSkinny, MatchesRef) {
  hm::Rng rng(401);
  const size_t es = hm::dtype_size(T());
  const std::vector<DType> outs = T() == DType::F32 ? std::vector<DType>{DType::F32}
                                                    : std::vector<DType>{T(), DType::F32};
  struct Shape {
    int n, k, xc0;  // xc0: x's first column in its wider matrix (1: misaligned, the element path)
  };
  const Shape shapes[] = {{1, 8, 8}, {37, 136, 8}, {67, 1048, 8}, {160, 4096, 8}, {1001, 520, 8},
                          {77, 161, 8}, {129, 37, 8}, {45, 136, 1}};
  int ran_vec = 0, ran_elem = 0;
  for (const Shape& s : shapes)
    for (int m : {1, 2, 3, 7, 16, 24, 33, 64}) {
      const int n = s.n, k = s.k, ldx = k + 16, ldw = k + 8, ldy = n + 5;
      Mat x(be(), T(), m, ldx, rng, 1.0), W(be(), T(), n, ldw, rng, 0.1);
      const std::vector<float> xd = dense(x.f, m, k, ldx, s.xc0), wd = dense(W.f, n, k, ldw, 0);
      // The plans: automatic, then every chunk width and tile height with 1, 3 and 8 splits
      // (those the chunk count allows).
      std::vector<hm::cuda::SkinnyPlan> plans{hm::cuda::skinny_plan(n, k, es)};
      const std::vector<int> widths = T() == DType::F32 ? std::vector<int>{32} : std::vector<int>{32, 64, 128};
      for (int ch : widths)
        for (int bn : T() == DType::F32 ? std::vector<int>{32} : std::vector<int>{32, 64, 128})
          for (int sp : {1, 3, 8})
            if (sp <= (k + ch - 1) / ch) plans.push_back({bn, sp, ch});
      const bool vec = hm::cuda::skinny_vectorized(k, x.at(0, s.xc0), ldx, W.buf.data(), ldw, es);
      for (DType ty : outs)
        for (bool acc : {false, true}) {
          Mat y0(be(), ty, m, ldy, rng, 1.0);  // the initial y (and its untouched neighbours)
          std::vector<float> ref = y0.f;
          hm::ref::linear(ref.data() + 1, ldy, xd.data(), k, wd.data(), m, n, k, acc);
          const double bound = ty != DType::F32 ? tol(ty) : T() == DType::F32 ? 1e-5 : 2e-5;
          for (size_t pi = 0; pi < plans.size(); ++pi) {
            const hm::cuda::SkinnyPlan& p = plans[pi];
            y0.put(be());
            run_skinny(be(), T(), ty, y0, 1, x, s.xc0, W, m, n, k, acc, pi == 0 ? nullptr : &p);
            const std::vector<float> got = y0.get(be());
            ++(vec ? ran_vec : ran_elem);
            EXPECT_LE(rel_err(got, ref, m, n, ldy, 1), bound)
                << "skinny m " << m << " n " << n << " k " << k << " x column " << s.xc0 << " out "
                << hm::compute_dtype_name(ty) << (acc ? " accumulate" : "") << " bn " << p.bn << " splits " << p.splits
                << " chunk " << p.chunk
                << (pi == 0 ? " (auto)" : "") << (vec ? " 16-byte path" : " element path");
            for (int i = 0; i < m; ++i)
              for (int j : {0, n + 1, n + 4})
                EXPECT_EQ(got[size_t(i) * ldy + j], y0.f[size_t(i) * ldy + j]) << "row " << i << " column " << j
                                                                               << " outside y was written";
          }
        }
    }
  EXPECT_GT(ran_vec, 200);
  EXPECT_GT(ran_elem, 50);
  // What it refuses: no rows, more than 64, no columns.
  EXPECT_FALSE(hm::cuda::skinny_fits(0, 8, 8));
  EXPECT_FALSE(hm::cuda::skinny_fits(65, 8, 8));
  EXPECT_FALSE(hm::cuda::skinny_fits(1, 0, 8));
  EXPECT_TRUE(hm::cuda::skinny_fits(64, 50280, 2048));
}

// Row i's bits depend on nothing but row i (skinny.h): rows computed alone, in a batch of 7, of
// 33 and of 64 (in shuffled order) against the batch of 64 in order.
TEST_P(CudaSkinny, BatchInvariant) {
  hm::Rng rng(402);
  const size_t es = hm::dtype_size(T());
  const std::vector<DType> outs = T() == DType::F32 ? std::vector<DType>{DType::F32}
                                                    : std::vector<DType>{T(), DType::F32};
  // x_proj, dt_proj and out_proj of the 1.4B shape, odd shapes, an odd k (element path).
  const std::pair<int, int> shapes[] = {{160, 4096}, {4096, 128}, {2048, 4096}, {1001, 520}, {3001, 2056}, {77, 161}};
  const int M = 64;
  const std::vector<int> widths = T() == DType::F32 ? std::vector<int>{32} : std::vector<int>{32, 64, 128};
  for (auto [n, k] : shapes)
    for (DType ty : outs)
      for (bool acc : {false, true})
        for (int ch : widths) {
          const int ldx = k + 16, ldy = n + 5;
          Mat x(be(), T(), M, ldx, rng, 1.0), W(be(), T(), n, k, rng, 0.1), y0(be(), ty, M, ldy, rng, 1.0);
          // The automatic tiling at each chunk width (splits within its chunk count).
          hm::cuda::SkinnyPlan plan = hm::cuda::skinny_plan(n, k, es);
          plan.chunk = ch;
          plan.splits = std::min(plan.splits, (k + ch - 1) / ch);
          const hm::cuda::SkinnyPlan* pp = &plan;
          // The batch of 64 in order, twice (a call is deterministic).
          Mat full(be(), ty, M, ldy, rng, 0.0);
          full.f = y0.f;
          full.put(be());
          run_skinny(be(), T(), ty, full, 1, x, 8, W, M, n, k, acc, pp);
          const std::vector<float> want = full.get(be());
          full.f = y0.f;
          full.put(be());
          run_skinny(be(), T(), ty, full, 1, x, 8, W, M, n, k, acc, pp);
          EXPECT_EQ(std::memcmp(full.get(be()).data(), want.data(), want.size() * sizeof(float)), 0)
              << "skinny n " << n << " k " << k << ": two calls differ";
          for (int b : {1, 1, 7, 33, 64}) {
            // b distinct rows of the 64 in random order: row perm[p] of the batch sits at
            // position p.
            std::vector<int> perm(M);
            std::iota(perm.begin(), perm.end(), 0);
            for (int i = M - 1; i > 0; --i) std::swap(perm[size_t(i)], perm[rng.next_u64() % uint64_t(i + 1)]);
            Mat xb(be(), T(), b, ldx, rng, 0.0), yb(be(), ty, b, ldy, rng, 0.0);
            for (int p = 0; p < b; ++p) {
              std::copy_n(x.f.begin() + ptrdiff_t(perm[size_t(p)]) * ldx, ldx, xb.f.begin() + ptrdiff_t(p) * ldx);
              std::copy_n(y0.f.begin() + ptrdiff_t(perm[size_t(p)]) * ldy, ldy, yb.f.begin() + ptrdiff_t(p) * ldy);
            }
            xb.put(be());  // already rounded to the type: uploaded unchanged
            yb.put(be());
            run_skinny(be(), T(), ty, yb, 1, xb, 8, W, b, n, k, acc, pp);
            const std::vector<float> got = yb.get(be());
            int differ = 0;
            for (int p = 0; p < b; ++p)
              differ += std::memcmp(got.data() + size_t(p) * ldy, want.data() + size_t(perm[size_t(p)]) * ldy,
                                    size_t(ldy) * sizeof(float)) != 0;
            EXPECT_EQ(differ, 0) << "skinny n " << n << " k " << k << " out " << hm::compute_dtype_name(ty)
                                 << (acc ? " accumulate" : "") << " (bn " << plan.bn << ", " << plan.splits
                                 << " splits, chunk " << plan.chunk << "): " << differ << " of " << b
                                 << " rows differ from the batch of 64";
          }
        }
}

// Backend::linear at 2-64 rows is the skinny kernel: the same bits as calling it directly.
TEST_P(CudaSkinny, BackendRoutesDecodeRows) {
  const char* gemv = std::getenv("HM_CUDA_GEMV");
  if (gemv != nullptr && std::string(gemv) == "0") GTEST_SKIP() << "HM_CUDA_GEMV=0: no decode kernels";
  dynamic_cast<hm::CudaBackend&>(be()).set_skinny_min_rows(2);
  if (T() == DType::F32) GTEST_SKIP() << "f32 linears stay on cuBLASLt (cuda_backend.cu, kSkinnyMaxWeightBytes)";
  hm::Rng rng(403);
  const int n = 160, k = 4096;  // W of 1.3 MB in 16 bits: within the backend's bound
  for (int m : {2, 17, 64}) {
    Mat x(be(), T(), m, k, rng, 1.0), W(be(), T(), n, k, rng, 0.1);
    Mat y1(be(), T(), m, n, rng, 0.0), y2(be(), T(), m, n, rng, 0.0);
    be().linear(y1.t, x.t, W.t, false);
    run_skinny(be(), T(), T(), y2, 0, x, 0, W, m, n, k, false, nullptr);
    const std::vector<float> a = y1.get(be()), b = y2.get(be());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "linear m " << m;
  }
}

// The tiling of the 1.4B model's decode shapes (printed for the record; docs/CUDA.md).
TEST(CudaSkinnyPlan, DecodeShapes) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  const struct { const char* name; int n, k; } shapes[] = {
      {"in_proj", 8192, 2048}, {"x_proj", 160, 4096}, {"dt_proj", 4096, 128}, {"out_proj", 2048, 4096},
      {"lm_head", 50280, 2048}};
  for (const auto& s : shapes) {
    const hm::cuda::SkinnyPlan p = hm::cuda::skinny_plan(s.n, s.k, 2);
    std::printf("skinny plan %-8s n %-5d k %-4d: %3d rows per block, %d splits, %d blocks\n", s.name, s.n, s.k, p.bn,
                p.splits, (s.n + p.bn - 1) / p.bn * p.splits);
    EXPECT_TRUE(p.bn == 32 || p.bn == 64 || p.bn == 128) << s.name;
    EXPECT_GE(p.splits, 1) << s.name;
    EXPECT_LE(p.splits, std::max(1, (s.k + 31) / 32 / 4)) << s.name;
    const hm::cuda::SkinnyPlan f = hm::cuda::skinny_plan(s.n, s.k, 4);
    EXPECT_EQ(f.bn, 32) << s.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Types, CudaSkinny, ::testing::Values(DType::F32, DType::BF16, DType::F16),
                         [](const ::testing::TestParamInfo<DType>& p) { return std::string(hm::compute_dtype_name(p.param)); });

}  // namespace
