// The CUDA backend's training ops (issue 15; kernels/cuda/grad.h) against the CPU backend, in
// f32, bf16 and f16.
//
// Each case draws fresh random inputs at odd sizes, rounds them to the tested type and gives the
// CPU backend the same values widened to float; inputs and outputs are column (and row) views
// of wider matrices, assigned outputs start as NaN on the device, and the device copy must keep
// every element outside an output's view. Ragged batches mix odd lengths, a sequence of no rows
// and one-row sequences; attention runs GQA groups of 1, 3 and 4 and odd head sizes.
// Bounds on max|got - ref| / max|ref|: 1e-5 for float outputs (f32, and the f32 gradients of
// bf16/f16 inputs, whose products are exact in float), tol(type) (f16 1e-3, bf16 8e-3) for
// outputs stored in the 16-bit type and for the LM head's gradients (its dlogits are rounded to
// the type as the GEMMs' input); the loss and lse within 1e-5 in every type (float math on the
// same inputs). Every failure names the tensor and its worst element.
// Without a GPU every case is GTEST_SKIPped.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/ref/router_ref.h"
#include "cuda_test_util.h"

namespace {

using hm::Backend;
using hm::DType;
using hm::Tensor;
using hm::test::has_gpu;
using hm::test::tol;

constexpr double kFloatTol = 1e-5;

std::vector<float> rounded(std::vector<float> v, DType t) {
  std::vector<char> bytes(v.size() * hm::dtype_size(t));
  hm::convert_from_f32(bytes.data(), t, v.data(), v.size());
  hm::convert_to_f32(v.data(), bytes.data(), t, v.size());
  return v;
}

// A rows x ld matrix held twice with the same values: on the device in `dt` (f, as stored)
// and on the host in float for the CPU backend (h, which the CPU ops update in place). An
// output made by out() starts as NaN on the device and 0 on the host.
struct Both {
  hm::Buffer buf;
  DType dt;
  int rows, ld;
  std::vector<float> f, h;

  Both(Backend& gpu, DType t, int r, int l, std::vector<float> values)
      : buf(gpu, std::max<size_t>(1, size_t(r) * size_t(l) * hm::dtype_size(t))), dt(t), rows(r), ld(l),
        f(rounded(std::move(values), t)), h(f) {
    put(gpu);
  }
  Both(Backend& gpu, DType t, int r, int l, const std::function<double()>& draw)
      : Both(gpu, t, r, l, drawn(size_t(r) * size_t(l), draw)) {}
  static Both out(Backend& gpu, DType t, int r, int l) {
    Both b(gpu, t, r, l, std::vector<float>(size_t(r) * size_t(l), NAN));
    std::fill(b.h.begin(), b.h.end(), 0.0f);
    return b;
  }
  static std::vector<float> drawn(size_t n, const std::function<double()>& draw) {
    std::vector<float> v(n);
    for (auto& x : v) x = float(draw());
    return v;
  }
  void put(Backend& gpu) const {
    std::vector<char> bytes(f.size() * hm::dtype_size(dt));
    hm::convert_from_f32(bytes.data(), dt, f.data(), f.size());
    gpu.to_device(buf.data(), bytes.data(), bytes.size());
  }
  std::vector<float> get(Backend& gpu) const {
    std::vector<char> bytes(f.size() * hm::dtype_size(dt));
    gpu.to_host(bytes.data(), buf.data(), bytes.size());
    std::vector<float> v(f.size());
    hm::convert_to_f32(v.data(), bytes.data(), dt, f.size());
    return v;
  }
  std::vector<char> raw(Backend& gpu) const {
    std::vector<char> bytes(f.size() * hm::dtype_size(dt));
    gpu.to_host(bytes.data(), buf.data(), bytes.size());
    return bytes;
  }
  Tensor dev(int c0, int n) const { return Tensor(buf.data(), dt, rows, ld, ld).cols_view(c0, n); }
  Tensor cpu(int c0, int n) { return Tensor(h.data(), DType::F32, rows, ld, ld).cols_view(c0, n); }
};

std::function<double()> normal(hm::Rng& rng, double scale = 1, double mean = 0) {
  return [&rng, scale, mean] { return mean + scale * rng.normal(); };
}

bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof a) == 0; }

// The device result `got` of b's view [r0, r0 + nr) x [c0, c0 + nc) against the CPU's (b.h):
// max|got - ref| / max(max|ref|, floor) <= bound, naming the tensor and the worst element (row
// and column within the view); every element outside the view must still hold the device's
// initial value.
::testing::AssertionResult matches(const std::string& what, const Both& b, const std::vector<float>& got, int r0,
                                   int nr, int c0, int nc, double bound, double floor = 0) {
  double num = 0, den = 0;
  int wi = 0, wj = 0;
  for (int i = 0; i < b.rows; ++i)
    for (int j = 0; j < b.ld; ++j) {
      const size_t k = size_t(i) * size_t(b.ld) + size_t(j);
      const bool in = i >= r0 && i < r0 + nr && j >= c0 && j < c0 + nc;
      if (!in) {
        if (!same(got[k], b.f[k]))
          return ::testing::AssertionFailure() << what << ": wrote outside its view at [" << i << ", " << j
                                               << "] (got " << got[k] << ", held " << b.f[k] << ")";
        continue;
      }
      if (std::isnan(got[k]) || std::isnan(b.h[k]))
        return ::testing::AssertionFailure() << what << ": NaN at [" << i - r0 << ", " << j - c0 << "] (got "
                                             << got[k] << ", cpu " << b.h[k] << ")";
      const double e = std::fabs(double(got[k]) - b.h[k]);
      if (e > num) {
        num = e;
        wi = i - r0;
        wj = j - c0;
      }
      den = std::max(den, std::fabs(double(b.h[k])));
    }
  den = std::max(den, floor);
  const double err = num / std::max(den, 1e-30);
  if (err <= bound) return ::testing::AssertionSuccess();
  const size_t k = size_t(wi + r0) * size_t(b.ld) + size_t(wj + c0);
  return ::testing::AssertionFailure() << what << ": error " << err << " over " << bound << ", worst at [" << wi
                                       << ", " << wj << "]: got " << got[k] << ", cpu " << b.h[k] << " (max|cpu| "
                                       << den << ")";
}
::testing::AssertionResult matches(const std::string& what, Backend& gpu, const Both& b, int c0, int nc,
                                   double bound) {
  return matches(what, b, b.get(gpu), 0, b.rows, c0, nc, bound);
}

// Several outputs as column views of one matrix, checked one at a time: `got` with the other
// views' columns set back to the device's initial values, so only the checked view may differ.
std::vector<float> only_view(std::vector<float> got, const Both& b, int c0, const std::vector<std::pair<int, int>>& views) {
  for (const auto& [c1, n1] : views)
    if (c1 != c0)
      for (int i = 0; i < b.rows; ++i)
        for (int j = c1; j < c1 + n1; ++j) got[size_t(i) * size_t(b.ld) + size_t(j)] = b.f[size_t(i) * size_t(b.ld) + size_t(j)];
  return got;
}

// An int32 array in device memory.
struct Ints {
  hm::Buffer buf;
  Ints(Backend& be, const std::vector<int32_t>& v) : buf(be, std::max<size_t>(4, v.size() * 4)) {
    be.to_device(buf.data(), v.data(), v.size() * 4);
  }
  const int32_t* p() const { return static_cast<const int32_t*>(buf.data()); }
};

// The same batch for both backends: sequence s of lens[s] rows at position pos0s[s].
void fill(hm::Ragged& rg, Backend& be, const std::vector<int>& lens, const std::vector<int>& pos0s) {
  rg.clear();
  for (size_t s = 0; s < lens.size(); ++s) rg.add(int(s), lens[s], pos0s[s]);
  rg.upload(be);
}

const std::vector<std::vector<int>> kSeqs = {{1}, {37}, {333}, {5, 1, 70, 0, 33}, {1, 1, 1}};

class CudaGradOps : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
    gpu_ = hm::make_backend(hm::Device::CUDA);
    cpu_ = hm::make_cpu_backend();
  }
  Backend& gpu() { return *gpu_; }
  Backend& cpu() { return *cpu_; }
  DType T() const { return GetParam(); }
  // The gradient types of parameters: the compute type, and f32 beside a 16-bit one.
  std::vector<DType> grad_types() const {
    return T() == DType::F32 ? std::vector<DType>{DType::F32} : std::vector<DType>{T(), DType::F32};
  }
  // The bound for an output stored in `t` with no rounding but its own.
  double bound(DType t) const { return t == DType::F32 ? kFloatTol : tol(t); }
  std::unique_ptr<Backend> gpu_, cpu_;
};

// dx (=|+=) dy W and dW += dy^T x through column and row views, dx skipped or not, gradients in
// the type and in f32.
TEST_P(CudaGradOps, LinearBackward) {
  hm::Rng rng(101);
  for (auto [m, n, k] : {std::tuple{37, 129, 333}, std::tuple{1, 67, 130}, std::tuple{300, 5, 1},
                         std::tuple{64, 256, 96}})
    for (DType gt : grad_types())
      for (bool acc : {false, true})
        for (bool with_dx : {true, false}) {
          Both dy(gpu(), T(), m, n + 3, normal(rng)), x(gpu(), T(), m, k + 5, normal(rng)),
              W(gpu(), T(), n, k + 2, normal(rng, 0.1)), dW(gpu(), gt, n + 1, k + 4, normal(rng, 0.1));
          Both dx = acc ? Both(gpu(), gt, m, k + 6, normal(rng)) : Both::out(gpu(), gt, m, k + 6);
          gpu().linear_backward(with_dx ? dx.dev(1, k) : Tensor(), dW.dev(2, k).rows_view(1, n), dy.dev(1, n),
                                x.dev(3, k), W.dev(0, k), acc);
          cpu().linear_backward(with_dx ? dx.cpu(1, k) : Tensor(), dW.cpu(2, k).rows_view(1, n), dy.cpu(1, n),
                                x.cpu(3, k), W.cpu(0, k), acc);
          std::ostringstream what;
          what << "m " << m << " n " << n << " k " << k << " grads " << hm::compute_dtype_name(gt) << " acc " << acc
               << " dx " << with_dx << ": ";
          EXPECT_TRUE(matches(what.str() + "dW", dW, dW.get(gpu()), 1, n, 2, k, bound(gt)));
          if (with_dx) EXPECT_TRUE(matches(what.str() + "dx", gpu(), dx, 1, k, bound(gt)));
          else EXPECT_TRUE(matches(what.str() + "dx (skipped)", dx, dx.get(gpu()), 0, 0, 0, 0, 0.0));
        }
}

// Dense, aligned operands at row counts that are not multiples of 256, as a True Hybrid path's
// compacted rows are, through the default route: cuBLASLt with algorithms per bucketed shape
// (1,100 -> 1,152 rows, 8,213 -> 8,704), which must give the exact shape's result; two counts of
// one bucket share one. (HM_CUDA_TRAIN_GEMM=ex / HM_CUDA_GEMM_BUCKETS=0 are read once a process.)
TEST_P(CudaGradOps, LinearBackwardBucketedRows) {
  hm::Rng rng(111);
  for (auto [m, n, k] : {std::tuple{1100, 96, 256}, std::tuple{1090, 96, 256}, std::tuple{8213, 64, 512}})
    for (DType gt : grad_types()) {
      Both dy(gpu(), T(), m, n, normal(rng)), x(gpu(), T(), m, k, normal(rng)), W(gpu(), T(), n, k, normal(rng, 0.1)),
          dW(gpu(), gt, n, k, normal(rng, 0.1));
      Both dx = Both::out(gpu(), gt, m, k), y = Both::out(gpu(), T(), m, n);
      gpu().linear_backward(dx.dev(0, k), dW.dev(0, k), dy.dev(0, n), x.dev(0, k), W.dev(0, k), false);
      cpu().linear_backward(dx.cpu(0, k), dW.cpu(0, k), dy.cpu(0, n), x.cpu(0, k), W.cpu(0, k), false);
      gpu().linear(y.dev(0, n), x.dev(0, k), W.dev(0, k), false);
      cpu().linear(y.cpu(0, n), x.cpu(0, k), W.cpu(0, k), false);
      std::ostringstream what;
      what << "m " << m << " n " << n << " k " << k << " grads " << hm::compute_dtype_name(gt) << ": ";
      EXPECT_TRUE(matches(what.str() + "dW", gpu(), dW, 0, k, bound(gt)));
      EXPECT_TRUE(matches(what.str() + "dx", gpu(), dx, 0, k, bound(gt)));
      EXPECT_TRUE(matches(what.str() + "y", gpu(), y, 0, n, bound(T())));
    }
}

// dx (=|+=) and dw += over rows, dw in the type and in f32; row counts past one chunk of the dw
// pass (32 rows) and past 1,024 chunks (rows per chunk above 32, a short last chunk). Views at odd
// columns take the two-kernel path; views at 4-aligned columns with d % 4 == 0 and d <= 1024 the
// fused one (one warp a row, K = 1, 2, 4 and 8 vectors of 128 columns, a part-filled last vector).
TEST_P(CudaGradOps, RmsNormBackward) {
  hm::Rng rng(102);
  for (const bool aligned : {false, true})
    for (auto [n, d] : {std::pair{7, 333}, std::pair{1, 31}, std::pair{130, 2049}, std::pair{700, 64},
                        std::pair{33000, 40}, std::pair{5, 1020}, std::pair{2100, 512}, std::pair{33, 200},
                        std::pair{65, 768}})
      for (DType gt : grad_types())
        for (bool acc : {false, true}) {
          // aligned: every view at column 0 or 4 of rows of d + 4 or d + 8
          const int ox = aligned ? 4 : 1, og = 0, odx = aligned ? 4 : 2;
          Both x(gpu(), T(), n, d + (aligned ? 8 : 3), normal(rng, 2)), g(gpu(), T(), n, d + (aligned ? 4 : 1), normal(rng)),
              w(gpu(), T(), 1, d, normal(rng, 0.2, 1)), dw(gpu(), gt, 1, d, normal(rng, 0.1));
          Both dx = acc ? Both(gpu(), T(), n, d + (aligned ? 4 : 2), normal(rng))
                        : Both::out(gpu(), T(), n, d + (aligned ? 4 : 2));
          gpu().rmsnorm_backward(dx.dev(odx, d), dw.dev(0, d), g.dev(og, d), x.dev(ox, d), w.dev(0, d), 1e-5f, acc);
          cpu().rmsnorm_backward(dx.cpu(odx, d), dw.cpu(0, d), g.cpu(og, d), x.cpu(ox, d), w.cpu(0, d), 1e-5f, acc);
          std::ostringstream what;
          what << "n " << n << " d " << d << (aligned ? " aligned" : "") << " dw " << hm::compute_dtype_name(gt)
               << " acc " << acc << ": ";
          EXPECT_TRUE(matches(what.str() + "dx", gpu(), dx, odx, d, bound(T())));
          EXPECT_TRUE(matches(what.str() + "dw", gpu(), dw, 0, d, bound(gt)));
        }
}

// g and u as the halves of one matrix, dg and du as the halves of another.
TEST_P(CudaGradOps, SwigluBackward) {
  hm::Rng rng(103);
  for (auto [n, f] : {std::pair{5, 333}, std::pair{70, 1}, std::pair{1, 1025}}) {
    Both gu(gpu(), T(), n, 2 * f + 3, normal(rng, 2)), dout(gpu(), T(), n, f + 1, normal(rng));
    Both d = Both::out(gpu(), T(), n, 2 * f + 1);
    gpu().swiglu_backward(d.dev(0, f), d.dev(f + 1, f), dout.dev(1, f), gu.dev(0, f), gu.dev(f + 2, f));
    cpu().swiglu_backward(d.cpu(0, f), d.cpu(f + 1, f), dout.cpu(1, f), gu.cpu(0, f), gu.cpu(f + 2, f));
    const std::vector<float> got = d.get(gpu());
    const std::string what = "n " + std::to_string(n) + " f " + std::to_string(f) + ": ";
    const std::vector<std::pair<int, int>> views = {{0, f}, {f + 1, f}};
    EXPECT_TRUE(matches(what + "dg", d, only_view(got, d, 0, views), 0, n, 0, f, bound(T())));
    EXPECT_TRUE(matches(what + "du", d, only_view(got, d, f + 1, views), 0, n, f + 1, f, bound(T())));
  }
}

// Squared ReLU's backward on strided views; x spans both signs.
TEST_P(CudaGradOps, Relu2Backward) {
  hm::Rng rng(104);
  for (auto [n, f] : {std::pair{5, 333}, std::pair{70, 1}, std::pair{1, 1025}}) {
    Both x(gpu(), T(), n, f + 3, normal(rng, 2)), dout(gpu(), T(), n, f + 1, normal(rng));
    Both d = Both::out(gpu(), T(), n, f + 2);
    gpu().relu2_backward(d.dev(1, f), dout.dev(1, f), x.dev(2, f));
    cpu().relu2_backward(d.cpu(1, f), dout.cpu(1, f), x.cpu(2, f));
    EXPECT_TRUE(matches("n " + std::to_string(n) + " f " + std::to_string(f), gpu(), d, 1, f, bound(T())));
  }
}

// An MoE gate's gradient: out[r] = a[idx[r]] . b[r] in float, over column views, with indices
// (repeated, out of order) and without; several blocks of warps; one column and a long row.
TEST_P(CudaGradOps, RowDots) {
  hm::Rng rng(105);
  for (auto [rows, d, na, indexed] : {std::tuple{7, 333, 5, true}, std::tuple{70, 1, 70, false},
                                      std::tuple{1, 1025, 3, true}, std::tuple{33, 64, 40, true}}) {
    Both a(gpu(), T(), na, d + 3, normal(rng)), b(gpu(), T(), rows, d + 2, normal(rng));
    Both out = Both::out(gpu(), DType::F32, 1, rows + 2);
    std::vector<int32_t> idx(static_cast<size_t>(rows));
    for (auto& i : idx) i = int32_t(rng.next_u64() % uint64_t(na));
    const Ints didx(gpu(), idx);
    gpu().row_dots(out.dev(1, rows), a.dev(1, d), indexed ? didx.p() : nullptr, b.dev(2, d));
    cpu().row_dots(out.cpu(1, rows), a.cpu(1, d), indexed ? idx.data() : nullptr, b.cpu(2, d));
    // Products of stored values are exact in float; only the order of the sum differs.
    EXPECT_TRUE(matches("rows " + std::to_string(rows) + " d " + std::to_string(d), gpu(), out, 1, rows, kFloatTol));
  }
}

// The True Hybrid router over ragged batches (a sequence of 333 tokens spans six blocks of 64,
// each warming its EMA up from zero), token and chunk routing, on a strided u in the tested type;
// widths below and above one pass of the block's threads. Features and logits are float math on
// the same inputs, summed in another order: 1e-5 of the largest. Then inference's form: each
// sequence continues a random analyzer state (EMA, chunk logit) at a random position, giving
// the logits and the state after the call.
TEST_P(CudaGradOps, Router) {
  hm::Rng rng(106);
  for (const int D : {77, 1000}) {
    for (const auto& lens : kSeqs) {
      int n = 0;
      for (int l : lens) n += l;
      std::vector<int> zeros(lens.size(), 0), pos0s;
      for (size_t s = 0; s < lens.size(); ++s) pos0s.push_back(int(rng.next_u64() % 5000));
      hm::Ragged rg_gpu, rg_cpu;
      Both u(gpu(), T(), n, D + 3, normal(rng));
      Both w(gpu(), DType::F32, 1, D, normal(rng, 0.1)), fw(gpu(), DType::F32, 1, hm::kRouterFeatures, normal(rng)),
          b(gpu(), DType::F32, 1, 1, normal(rng));
      for (const int chunk : {0, 5}) {
        const std::string what = "D " + std::to_string(D) + " n " + std::to_string(n) + " chunk " +
                                 std::to_string(chunk);
        Both r = Both::out(gpu(), DType::F32, 1, n);
        {  // training's form: whole sequences, features too
          fill(rg_gpu, gpu(), lens, zeros);
          fill(rg_cpu, cpu(), lens, zeros);
          Both f = Both::out(gpu(), DType::F32, n, hm::kRouterFeatures);
          gpu().router(r.dev(0, n), f.dev(0, hm::kRouterFeatures), u.dev(2, D), w.dev(0, D),
                       fw.dev(0, hm::kRouterFeatures), b.dev(0, 1), rg_gpu, chunk, nullptr);
          cpu().router(r.cpu(0, n), f.cpu(0, hm::kRouterFeatures), u.cpu(2, D), w.cpu(0, D),
                       fw.cpu(0, hm::kRouterFeatures), b.cpu(0, 1), rg_cpu, chunk, nullptr);
          EXPECT_TRUE(matches(what + " logits", gpu(), r, 0, n, kFloatTol));
          EXPECT_TRUE(matches(what + " features", gpu(), f, 0, hm::kRouterFeatures, kFloatTol));
        }
        fill(rg_gpu, gpu(), lens, pos0s);
        fill(rg_cpu, cpu(), lens, pos0s);
        const int slots = int(lens.size());
        Both st(gpu(), DType::F32, slots, D + 1, normal(rng, 0.5));
        const hm::StatePool st_gpu{static_cast<float*>(st.buf.data()), slots, D + 1},
            st_cpu{st.h.data(), slots, D + 1};
        r = Both::out(gpu(), DType::F32, 1, n);  // NaN on the device: a row not written shows
        gpu().router(r.dev(0, n), Tensor(), u.dev(2, D), w.dev(0, D), fw.dev(0, hm::kRouterFeatures), b.dev(0, 1),
                     rg_gpu, chunk, &st_gpu);
        cpu().router(r.cpu(0, n), Tensor(), u.cpu(2, D), w.cpu(0, D), fw.cpu(0, hm::kRouterFeatures), b.cpu(0, 1),
                     rg_cpu, chunk, &st_cpu);
        EXPECT_TRUE(matches(what + " logits continuing a state", gpu(), r, 0, n, kFloatTol));
        EXPECT_TRUE(matches(what + " state after", gpu(), st, 0, D + 1, kFloatTol));
      }
    }
  }
}

// Against the CPU's rope_backward at positions up to 9000, and as the transpose of the device's
// own rope: rope then rope_backward gives x back.
TEST_P(CudaGradOps, RopeBackward) {
  hm::Rng rng(104);
  const int heads = 3, hd = 10, ld = heads * hd + 4;
  for (const auto& lens : kSeqs) {
    std::vector<int> pos0s;
    for (size_t s = 0; s < lens.size(); ++s) pos0s.push_back(int(rng.next_u64() % 9001));
    hm::Ragged rg_gpu, rg_cpu;
    fill(rg_gpu, gpu(), lens, pos0s);
    fill(rg_cpu, cpu(), lens, pos0s);
    const int n = rg_gpu.n_tokens();
    Both dx(gpu(), T(), n, ld, normal(rng));
    gpu().rope_backward(dx.dev(1, heads * hd), heads, hd, 10000.0f, rg_gpu);
    cpu().rope_backward(dx.cpu(1, heads * hd), heads, hd, 10000.0f, rg_cpu);
    const std::string what = "rope_backward, lens[0] " + std::to_string(lens[0]);
    EXPECT_TRUE(matches(what, gpu(), dx, 1, heads * hd, bound(T())));

    Both x(gpu(), T(), n, ld, normal(rng));
    gpu().rope(x.dev(1, heads * hd), heads, hd, 10000.0f, rg_gpu);
    gpu().rope_backward(x.dev(1, heads * hd), heads, hd, 10000.0f, rg_gpu);
    // x.h still holds x: the round trip must come back to it (two roundings in 16 bits).
    EXPECT_TRUE(matches(what + " after rope", gpu(), x, 1, heads * hd, T() == DType::F32 ? kFloatTol : 2 * tol(T())));
  }
}

// Repeated ids (30 distinct over 300 rows, so segments of many rows) and a few lone ones;
// dtable a column view, in the type and in f32; out-of-range ids are refused before any write.
TEST_P(CudaGradOps, EmbeddingBackward) {
  hm::Rng rng(105);
  const int V = 1001, d = 77, n = 300;
  for (DType gt : grad_types()) {
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (auto& i : ids) i = int32_t(rng.next_u64() % 30);
    ids[7] = V - 1;
    ids[200] = 500;
    ids[201] = 500;
    Ints dids(gpu(), ids);
    Both table(gpu(), gt, V, d + 3, normal(rng, 0.1)), dout(gpu(), T(), n, d + 2, normal(rng));
    gpu().embedding_backward(table.dev(1, d), dout.dev(0, d), dids.p());
    cpu().embedding_backward(table.cpu(1, d), dout.cpu(0, d), ids.data());
    EXPECT_TRUE(matches(std::string("dtable ") + hm::compute_dtype_name(gt), gpu(), table, 1, d, bound(gt)));

    for (int32_t bad : {V, -1}) {
      std::vector<int32_t> wrong = ids;
      wrong[123] = bad;
      Ints dwrong(gpu(), wrong);
      const std::vector<float> before = table.get(gpu());
      try {
        gpu().embedding_backward(table.dev(1, d), dout.dev(0, d), dwrong.p());
        ADD_FAILURE() << "embedding_backward accepted id " << bad;
      } catch (const hm::Error& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find("embedding_backward"), std::string::npos) << msg;
        EXPECT_NE(msg.find("row 123"), std::string::npos) << msg;
      }
      const std::vector<float> after = table.get(gpu());
      EXPECT_TRUE(std::equal(before.begin(), before.end(), after.begin(), same)) << "a refused call wrote dtable";
    }
  }
}

// The fused LM head: loss, dhn (assigned, 0 on ignored rows) and dW (+=) against the CPU, dW and
// dhn in the type and in f32, with float logits (the default) and with logits of the type
// (HM_CUDA_HEAD_LOGITS=type, as autocast makes them: the loss is then compared at the type's
// tolerance). With float gradients the rows run in many blocks (HM_CUDA_HEAD_BLOCK_BYTES at 4 MB:
// 901 x 40,009 logits take 19 to 57 of them); 16-bit dW, rounded after each block's GEMM, is
// checked in one block (over 19 blocks its rounding reached 1.7e-3 of the largest entry, past
// f16's 1e-3 bound). A 120,011-entry row is over any GPU's shared memory in every type, so it
// takes the three-pass kernel.
TEST_P(CudaGradOps, CrossEntropyHead) {
  hm::Rng rng(106);
  const double scale = 0.37;
  for (const char* logits : {"f32", "type"}) {
    ::setenv("HM_CUDA_HEAD_LOGITS", logits, 1);
    for (auto [n, D, V] : {std::tuple{37, 48, 257}, std::tuple{1, 64, 1000}, std::tuple{901, 48, 40009},
                           std::tuple{5, 16, 120011}})
      for (DType gt : grad_types()) {
        if (gt == DType::F32) ::setenv("HM_CUDA_HEAD_BLOCK_BYTES", "4000000", 1);
        else ::unsetenv("HM_CUDA_HEAD_BLOCK_BYTES");
        std::vector<int32_t> tg(static_cast<size_t>(n));
        for (auto& t : tg) t = rng.next_u64() % 5 == 0 ? -1 : int32_t(rng.next_u64() % uint64_t(V));
        tg[0] = n > 1 ? -1 : tg[0];
        Ints dtg(gpu(), tg);
        Both hn(gpu(), T(), n, D + 1, normal(rng)), W(gpu(), T(), V, D + 2, normal(rng, 0.3)),
            dW(gpu(), gt, V, D, normal(rng, 0.01));
        Both dhn = Both::out(gpu(), gt, n, D + 3);
        const double lg =
            gpu().cross_entropy_head(dhn.dev(2, D), dW.dev(0, D), hn.dev(1, D), W.dev(1, D), dtg.p(), scale);
        const double lc =
            cpu().cross_entropy_head(dhn.cpu(2, D), dW.cpu(0, D), hn.cpu(1, D), W.cpu(1, D), tg.data(), scale);
        std::ostringstream what;
        what << "logits " << logits << " n " << n << " D " << D << " V " << V << " grads "
             << hm::compute_dtype_name(gt) << ": ";
        const double gb = T() == DType::F32 ? kFloatTol : tol(T());  // dlogits rounded to the type
        const double lb = T() == DType::F32 || std::string(logits) == "f32" ? kFloatTol : tol(T());
        EXPECT_LE(std::fabs(lg - lc), lb * std::fabs(lc)) << what.str() << "loss " << lg << " vs cpu " << lc;
        EXPECT_TRUE(matches(what.str() + "dhn", gpu(), dhn, 2, D, gb));
        EXPECT_TRUE(matches(what.str() + "dW", gpu(), dW, 0, D, gb));
        if (n > 1) {
          const std::vector<float> got = dhn.get(gpu());
          for (int j = 0; j < D; ++j)
            EXPECT_EQ(got[size_t(2 + j)], 0.0f) << what.str() << "ignored row 0, dhn col " << j;
        }
      }
  }
  ::unsetenv("HM_CUDA_HEAD_LOGITS");
  ::unsetenv("HM_CUDA_HEAD_BLOCK_BYTES");
  // Every row ignored: loss 0, dhn 0, dW unchanged.
  {
    const int n = 3, D = 5, V = 11;
    Ints dtg(gpu(), std::vector<int32_t>(n, -1));
    Both hn(gpu(), T(), n, D, normal(rng)), W(gpu(), T(), V, D, normal(rng)), dW(gpu(), T(), V, D, normal(rng));
    Both dhn = Both::out(gpu(), T(), n, D);
    EXPECT_EQ(gpu().cross_entropy_head(dhn.dev(0, D), dW.dev(0, D), hn.dev(0, D), W.dev(0, D), dtg.p(), 1.0), 0.0);
    for (float v : dhn.get(gpu())) EXPECT_EQ(v, 0.0f);
    const std::vector<float> got = dW.get(gpu());
    EXPECT_TRUE(std::equal(got.begin(), got.end(), dW.f.begin(), same)) << "dW changed with every row ignored";
  }
  for (int32_t bad : {11, -2}) {
    const int n = 4, D = 5, V = 11;
    std::vector<int32_t> tg = {1, 2, bad, 3};
    Ints dtg(gpu(), tg);
    Both hn(gpu(), T(), n, D, normal(rng)), W(gpu(), T(), V, D, normal(rng)), dW(gpu(), T(), V, D, normal(rng));
    Both dhn = Both::out(gpu(), T(), n, D);
    try {
      gpu().cross_entropy_head(dhn.dev(0, D), dW.dev(0, D), hn.dev(0, D), W.dev(0, D), dtg.p(), 1.0);
      ADD_FAILURE() << "cross_entropy_head accepted target " << bad;
    } catch (const hm::Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("cross_entropy_head"), std::string::npos) << msg;
      EXPECT_NE(msg.find("row 2"), std::string::npos) << msg;
    }
  }
}

// Attention shapes: (H, G, hd) with GQA groups 3, 1 (MHA), 3 (MQA) and 2; odd and large heads.
const std::vector<std::tuple<int, int, int>> kAttn = {{6, 2, 64}, {4, 4, 37}, {3, 1, 128}, {2, 1, 200}, {4, 2, 16}};

// q, k, v as column views of one qkv matrix (as the fused projection leaves them): by default
// one column in and 3 columns wider (rows not 16-byte aligned: the tensor-core kernels' plain
// loads); `packed`, exactly [n, (H + 2G) hd] from column 0 (their asynchronous copies).
struct Qkv {
  int H, G, hd, n, c0;
  Both m;
  Qkv(Backend& gpu, DType t, int H_, int G_, int hd_, int n_, hm::Rng& rng, bool packed = false)
      : H(H_), G(G_), hd(hd_), n(n_), c0(packed ? 0 : 1),
        m(gpu, t, n_, (H_ + 2 * G_) * hd_ + (packed ? 0 : 3), normal(rng)) {}
  int qc() const { return c0; }
  int kc() const { return c0 + H * hd; }
  int vc() const { return c0 + (H + G) * hd; }
};

TEST_P(CudaGradOps, AttentionTrain) {
  hm::Rng rng(107);
  for (const auto& [H, G, hd] : kAttn)
    for (const auto& lens : kSeqs) {
      hm::Ragged rg_gpu, rg_cpu;
      fill(rg_gpu, gpu(), lens, std::vector<int>(lens.size(), 0));
      fill(rg_cpu, cpu(), lens, std::vector<int>(lens.size(), 0));
      const int n = rg_gpu.n_tokens();
      Qkv x(gpu(), T(), H, G, hd, n, rng);
      Both out = Both::out(gpu(), T(), n, H * hd + 5), lse = Both::out(gpu(), DType::F32, n, H + 1);
      gpu().attention_train(out.dev(2, H * hd), lse.dev(1, H), x.m.dev(x.qc(), H * hd), x.m.dev(x.kc(), G * hd),
                            x.m.dev(x.vc(), G * hd), H, G, hd, rg_gpu);
      cpu().attention_train(out.cpu(2, H * hd), lse.cpu(1, H), x.m.cpu(x.qc(), H * hd), x.m.cpu(x.kc(), G * hd),
                            x.m.cpu(x.vc(), G * hd), H, G, hd, rg_cpu);
      std::ostringstream what;
      what << "H " << H << " G " << G << " hd " << hd << " lens[0] " << lens[0] << " of " << lens.size() << ": ";
      EXPECT_TRUE(matches(what.str() + "out", gpu(), out, 2, H * hd, bound(T())));
      EXPECT_TRUE(matches(what.str() + "lse", gpu(), lse, 1, H, kFloatTol));
    }
}

// The backward on the CPU forward's out and lse (out rounded to the type for both), so only the
// backward is measured; dq, dk, dv as column views of one matrix. In a batch of one-row
// sequences dq and dk are exactly zero (P = 1, dS = dP - D = 0) and both backends leave float
// noise there: errors are measured against at least 1, the scale of the inputs and of dv.
TEST_P(CudaGradOps, AttentionBackward) {
  hm::Rng rng(108);
  for (const auto& [H, G, hd] : kAttn)
    for (const auto& lens : kSeqs) {
      hm::Ragged rg_gpu, rg_cpu;
      fill(rg_gpu, gpu(), lens, std::vector<int>(lens.size(), 0));
      fill(rg_cpu, cpu(), lens, std::vector<int>(lens.size(), 0));
      const int n = rg_gpu.n_tokens(), Q = H * hd, KV = G * hd;
      Qkv x(gpu(), T(), H, G, hd, n, rng);
      std::vector<float> o(size_t(n) * size_t(Q)), l(size_t(n) * size_t(H));
      cpu().attention_train(Tensor(o.data(), DType::F32, n, Q), Tensor(l.data(), DType::F32, n, H),
                            x.m.cpu(x.qc(), Q), x.m.cpu(x.kc(), KV), x.m.cpu(x.vc(), KV), H, G, hd, rg_cpu);
      Both out(gpu(), T(), n, Q, o), lse(gpu(), DType::F32, n, H, l), dout(gpu(), T(), n, Q + 1, normal(rng));
      Both d = Both::out(gpu(), T(), n, Q + 2 * KV + 2);
      const int dqc = 0, dkc = Q + 1, dvc = Q + KV + 2;
      gpu().attention_backward(d.dev(dqc, Q), d.dev(dkc, KV), d.dev(dvc, KV), dout.dev(1, Q), x.m.dev(x.qc(), Q),
                               x.m.dev(x.kc(), KV), x.m.dev(x.vc(), KV), out.dev(0, Q), lse.dev(0, H), H, G, hd,
                               rg_gpu);
      cpu().attention_backward(d.cpu(dqc, Q), d.cpu(dkc, KV), d.cpu(dvc, KV), dout.cpu(1, Q), x.m.cpu(x.qc(), Q),
                               x.m.cpu(x.kc(), KV), x.m.cpu(x.vc(), KV), out.cpu(0, Q), lse.cpu(0, H), H, G, hd,
                               rg_cpu);
      std::ostringstream what;
      what << "H " << H << " G " << G << " hd " << hd << " lens[0] " << lens[0] << " of " << lens.size() << ": ";
      const std::vector<float> got = d.get(gpu());
      const std::vector<std::pair<int, int>> views = {{dqc, Q}, {dkc, KV}, {dvc, KV}};
      for (const auto& [name, c0, nc] : {std::tuple{"dq", dqc, Q}, std::tuple{"dk", dkc, KV}, std::tuple{"dv", dvc, KV}})
        EXPECT_TRUE(matches(what.str() + name, d, only_view(got, d, c0, views), 0, n, c0, nc, bound(T()), 1.0));
    }
}

// The tensor-core kernels (bf16 / f16 at hd 64 and 128; f32 runs its float kernels here) on
// aligned, packed q/k/v and dense outputs, over sequences of many 64-row tiles whose lengths are
// not multiples of the tile (and 1, 0, 64, 65), GQA groups 1, 3 and 4: the forward (out, lse)
// and the backward (on the CPU forward's out and lse) against the CPU backend.
TEST_P(CudaGradOps, AttentionTensorCoreTiles) {
  hm::Rng rng(111);
  const std::vector<std::vector<int>> seqs = {{300}, {129, 64, 1, 0, 65, 190}};
  for (const auto& [H, G, hd] : {std::tuple{4, 4, 64}, std::tuple{6, 2, 64}, std::tuple{4, 1, 128},
                                 std::tuple{2, 2, 128}})
    for (const auto& lens : seqs) {
      hm::Ragged rg_gpu, rg_cpu;
      fill(rg_gpu, gpu(), lens, std::vector<int>(lens.size(), 0));
      fill(rg_cpu, cpu(), lens, std::vector<int>(lens.size(), 0));
      const int n = rg_gpu.n_tokens(), Q = H * hd, KV = G * hd;
      Qkv x(gpu(), T(), H, G, hd, n, rng, true);
      std::ostringstream what;
      what << "packed H " << H << " G " << G << " hd " << hd << " lens[0] " << lens[0] << " of " << lens.size() << ": ";
      Both out = Both::out(gpu(), T(), n, Q), lse = Both::out(gpu(), DType::F32, n, H);
      gpu().attention_train(out.dev(0, Q), lse.dev(0, H), x.m.dev(x.qc(), Q), x.m.dev(x.kc(), KV),
                            x.m.dev(x.vc(), KV), H, G, hd, rg_gpu);
      cpu().attention_train(out.cpu(0, Q), lse.cpu(0, H), x.m.cpu(x.qc(), Q), x.m.cpu(x.kc(), KV),
                            x.m.cpu(x.vc(), KV), H, G, hd, rg_cpu);
      EXPECT_TRUE(matches(what.str() + "out", gpu(), out, 0, Q, bound(T())));
      EXPECT_TRUE(matches(what.str() + "lse", gpu(), lse, 0, H, kFloatTol));

      std::vector<float> o(size_t(n) * size_t(Q)), l(size_t(n) * size_t(H));
      cpu().attention_train(Tensor(o.data(), DType::F32, n, Q), Tensor(l.data(), DType::F32, n, H),
                            x.m.cpu(x.qc(), Q), x.m.cpu(x.kc(), KV), x.m.cpu(x.vc(), KV), H, G, hd, rg_cpu);
      Both out2(gpu(), T(), n, Q, o), lse2(gpu(), DType::F32, n, H, l), dout(gpu(), T(), n, Q, normal(rng));
      Both dq = Both::out(gpu(), T(), n, Q), dk = Both::out(gpu(), T(), n, KV), dv = Both::out(gpu(), T(), n, KV);
      gpu().attention_backward(dq.dev(0, Q), dk.dev(0, KV), dv.dev(0, KV), dout.dev(0, Q), x.m.dev(x.qc(), Q),
                               x.m.dev(x.kc(), KV), x.m.dev(x.vc(), KV), out2.dev(0, Q), lse2.dev(0, H), H, G, hd,
                               rg_gpu);
      cpu().attention_backward(dq.cpu(0, Q), dk.cpu(0, KV), dv.cpu(0, KV), dout.cpu(0, Q), x.m.cpu(x.qc(), Q),
                               x.m.cpu(x.kc(), KV), x.m.cpu(x.vc(), KV), out2.cpu(0, Q), lse2.cpu(0, H), H, G, hd,
                               rg_cpu);
      for (const auto& [name, b, nc] : {std::tuple{"dq", &dq, Q}, std::tuple{"dk", &dk, KV}, std::tuple{"dv", &dv, KV}})
        EXPECT_TRUE(matches(what.str() + name, *b, b->get(gpu()), 0, n, 0, nc, bound(T()), 1.0));
    }
}

// Determinism (issue 15): every op with a reduction gives the same bits when rerun on the same
// inputs (no atomics; fixed orders).
// Mamba-2's training ops (kernels/cuda/ssd_grad.cu) against the cpu backend's (the inference
// scan from zero, the vectorized reference backward): every sequence from a zero state, B | C as
// column views of one matrix and dB | dC of another, groups of heads, a time_step_limit that
// clamps, odd d_state and head sizes; the parameter gradients float32, accumulated into. Both
// backward kernels (chunked and token-serial) run every case, multi-chunk sequences included.
TEST_P(CudaGradOps, SsdScanTrainAndBackward) {
  hm::Rng rng(131);
  struct Shape {
    int H, P, G, N;
    float dt_min, dt_max;
  };
  for (const Shape& k : {Shape{3, 7, 1, 16, 0.0f, INFINITY}, Shape{4, 5, 2, 5, 0.02f, 0.4f},
                        Shape{2, 16, 2, 64, 0.0f, INFINITY}, Shape{2, 64, 1, 64, 0.0f, INFINITY},
                        Shape{1, 33, 1, 128, 0.0f, INFINITY}})
    for (const auto& lens : kSeqs) {
      hm::Ragged rg, rc;
      fill(rg, gpu(), lens, std::vector<int>(lens.size(), 0));
      fill(rc, cpu(), lens, std::vector<int>(lens.size(), 0));
      const int T_ = rg.n_tokens(), E = k.H * k.P, GN = k.G * k.N;
      if (T_ == 0) continue;
      Both x(gpu(), T(), T_, E + 1, normal(rng)), dt(gpu(), T(), T_, k.H + 2, normal(rng, 1, -1.5)),
          bc(gpu(), T(), T_, 2 * GN + 3, normal(rng)), bias(gpu(), T(), 1, k.H, normal(rng, 0.5)),
          Dk(gpu(), T(), 1, k.H, normal(rng)), alog(gpu(), DType::F32, 1, k.H, normal(rng, 0.5, 0.5)),
          dy(gpu(), T(), T_, E + 2, normal(rng));
      Both y = Both::out(gpu(), T(), T_, E + 2);
      cpu().ssd_scan_train(y.cpu(1, E), x.cpu(0, E), dt.cpu(1, k.H), bias.cpu(0, k.H), alog.cpu(0, k.H),
                           bc.cpu(1, GN), bc.cpu(1 + GN, GN), Dk.cpu(0, k.H), k.H, k.G, k.dt_min, k.dt_max, rc);
      std::ostringstream what;
      what << "H " << k.H << " P " << k.P << " G " << k.G << " N " << k.N << ", " << lens.size() << " seqs of " << T_
           << " rows: ";
      // Both backward kernels, each against the cpu backend; the chunked one with its own choice of
      // segments (these small batches get several per sequence), segments of one chunk, and one
      // segment a sequence; and in each form: 256 and 512 threads a block, with the float FMA
      // products (bf16 and f16 data take the tensor cores by default).
      struct Variant {
        hm::cuda::SsdBackward kernel;
        int seg_chunks, threads;
        bool tensor_cores;
        const char* name;
      };
      for (const Variant& v : {Variant{hm::cuda::SsdBackward::Chunked, 0, 0, true, "chunked "},
                               Variant{hm::cuda::SsdBackward::Chunked, 1, 0, true, "chunked, segments of 1 chunk, "},
                               Variant{hm::cuda::SsdBackward::Chunked, 1 << 20, 0, true, "chunked, one segment, "},
                               Variant{hm::cuda::SsdBackward::Chunked, 0, 256, true, "chunked, 256 threads, "},
                               Variant{hm::cuda::SsdBackward::Chunked, 0, 512, true, "chunked, 512 threads, "},
                               Variant{hm::cuda::SsdBackward::Chunked, 0, 0, false, "chunked, FMA products, "},
                               Variant{hm::cuda::SsdBackward::Chunked, 1, 512, false,
                                       "chunked, FMA products, 512 threads, segments of 1 chunk, "},
                               Variant{hm::cuda::SsdBackward::Reference, 0, 0, true, "reference "}}) {
        const hm::cuda::SsdBackward kernel = v.kernel;
        hm::cuda::set_ssd_backward_kernel(kernel);
        hm::cuda::set_ssd_backward_segment_chunks(v.seg_chunks);
        hm::cuda::set_ssd_backward_threads(v.threads);
        hm::cuda::set_ssd_backward_tensor_cores(v.tensor_cores);
        const std::string kw = what.str() + v.name;
        // The forward under the same setting: chunked (its tensor-core form for 16-bit data) or,
        // with the reference kernel, the token-serial scan.
        y.put(gpu());
        gpu().ssd_scan_train(y.dev(1, E), x.dev(0, E), dt.dev(1, k.H), bias.dev(0, k.H), alog.dev(0, k.H),
                             bc.dev(1, GN), bc.dev(1 + GN, GN), Dk.dev(0, k.H), k.H, k.G, k.dt_min, k.dt_max, rg);
        EXPECT_TRUE(matches(kw + "y", gpu(), y, 1, E, 2 * bound(T())));
        Both dx = Both::out(gpu(), T(), T_, E + 3), ddt = Both::out(gpu(), T(), T_, k.H + 1),
             dbc = Both::out(gpu(), T(), T_, 2 * GN + 2);
        Both dbias(gpu(), DType::F32, 1, k.H, normal(rng)), dalog(gpu(), DType::F32, 1, k.H, normal(rng)),
            dD(gpu(), DType::F32, 1, k.H, normal(rng));
        auto backward_on_gpu = [&] {
          gpu().ssd_scan_backward(dx.dev(2, E), ddt.dev(1, k.H), dbc.dev(0, GN), dbc.dev(GN, GN), dbias.dev(0, k.H),
                                  dalog.dev(0, k.H), dD.dev(0, k.H), dy.dev(1, E), x.dev(0, E), dt.dev(1, k.H),
                                  bias.dev(0, k.H), alog.dev(0, k.H), bc.dev(1, GN), bc.dev(1 + GN, GN),
                                  Dk.dev(0, k.H), k.H, k.G, k.dt_min, k.dt_max, rg);
        };
        backward_on_gpu();
        cpu().ssd_scan_backward(dx.cpu(2, E), ddt.cpu(1, k.H), dbc.cpu(0, GN), dbc.cpu(GN, GN), dbias.cpu(0, k.H),
                                dalog.cpu(0, k.H), dD.cpu(0, k.H), dy.cpu(1, E), x.cpu(0, E), dt.cpu(1, k.H),
                                bias.cpu(0, k.H), alog.cpu(0, k.H), bc.cpu(1, GN), bc.cpu(1 + GN, GN), Dk.cpu(0, k.H),
                                k.H, k.G, k.dt_min, k.dt_max, rc);
        EXPECT_TRUE(matches(kw + "dx", gpu(), dx, 2, E, bound(T())));
        EXPECT_TRUE(matches(kw + "ddt", gpu(), ddt, 1, k.H, bound(T())));
        EXPECT_TRUE(matches(kw + "dB|dC", gpu(), dbc, 0, 2 * GN, bound(T())));
        // The parameter sums add a sequence's per-token terms; the chunked kernel forms those in
        // float (the token-serial one in double), so a sum over 333 tokens with cancellation
        // carries their rounding: 2-6.6e-5 in stop 49's first run, up to 1.9e-4 (f32) and 2.4e-4
        // (bf16) on stop 51's draws. The tensor-core products are held to the same bound (their
        // float operands go in as two tf32 parts; one part alone measured up to 0.14 here).
        const double ptol = kernel == hm::cuda::SsdBackward::Chunked ? 5e-4 : kFloatTol;
        EXPECT_TRUE(matches(kw + "ddt_bias", gpu(), dbias, 0, k.H, ptol));
        EXPECT_TRUE(matches(kw + "dA_log", gpu(), dalog, 0, k.H, ptol));
        EXPECT_TRUE(matches(kw + "dD", gpu(), dD, 0, k.H, ptol));
        // A scratch cap of one sequence runs the blocks one sequence a launch: the same bits.
        const std::vector<const Both*> outs = {&dx, &ddt, &dbc, &dbias, &dalog, &dD};
        std::vector<std::vector<char>> whole;
        for (const Both* b : outs) whole.push_back(b->raw(gpu()));
        for (const Both* b : outs) b->put(gpu());
        const size_t cap = hm::cuda::ssd_backward_scratch_cap();
        hm::cuda::set_ssd_backward_scratch_cap(1);
        backward_on_gpu();
        hm::cuda::set_ssd_backward_scratch_cap(cap);
        for (size_t i = 0; i < outs.size(); ++i)
          EXPECT_TRUE(outs[i]->raw(gpu()) == whole[i]) << kw << "in slices of one sequence, output " << i;
      }
      hm::cuda::set_ssd_backward_kernel(hm::cuda::SsdBackward::Auto);
      hm::cuda::set_ssd_backward_segment_chunks(0);
      hm::cuda::set_ssd_backward_threads(0);
      hm::cuda::set_ssd_backward_tensor_cores(true);
    }
}

// rmsnorm(y silu(z)) w per group: dy and dz assigned, dw (float) accumulated.
TEST_P(CudaGradOps, GatedRmsnormBackward) {
  hm::Rng rng(132);
  for (auto [n, E, group] : {std::tuple{7, 96, 96}, std::tuple{33, 96, 32}, std::tuple{1, 30, 10},
                             std::tuple{700, 1000, 500}}) {
    Both y(gpu(), T(), n, E + 1, normal(rng)), z(gpu(), T(), n, E + 2, normal(rng, 1.5)),
        w(gpu(), T(), 1, E, normal(rng, 0.2, 1)), g(gpu(), T(), n, E, normal(rng)),
        dw(gpu(), DType::F32, 1, E, normal(rng, 0.1));
    Both dy = Both::out(gpu(), T(), n, E + 3), dz = Both::out(gpu(), T(), n, E + 1);
    gpu().gated_rmsnorm_backward(dy.dev(3, E), dz.dev(0, E), dw.dev(0, E), g.dev(0, E), y.dev(1, E), z.dev(2, E),
                                 w.dev(0, E), group, 1e-5f);
    cpu().gated_rmsnorm_backward(dy.cpu(3, E), dz.cpu(0, E), dw.cpu(0, E), g.cpu(0, E), y.cpu(1, E), z.cpu(2, E),
                                 w.cpu(0, E), group, 1e-5f);
    std::ostringstream what;
    what << "n " << n << " E " << E << " group " << group << ": ";
    EXPECT_TRUE(matches(what.str() + "dy", gpu(), dy, 3, E, bound(T())));
    EXPECT_TRUE(matches(what.str() + "dz", gpu(), dz, 0, E, bound(T())));
    EXPECT_TRUE(matches(what.str() + "dw", gpu(), dw, 0, E, kFloatTol));
  }
}

TEST_P(CudaGradOps, RerunsAreBitIdentical) {
  hm::Rng rng(109);
  auto twice = [&](const char* what, const std::vector<const Both*>& outs, const std::function<void()>& run) {
    std::vector<std::vector<char>> first;
    for (const Both* b : outs) b->put(gpu());
    run();
    for (const Both* b : outs) first.push_back(b->raw(gpu()));
    for (const Both* b : outs) b->put(gpu());
    run();
    for (size_t i = 0; i < outs.size(); ++i) EXPECT_TRUE(outs[i]->raw(gpu()) == first[i]) << what << ", output " << i;
  };
  const DType gt = grad_types().back();
  {
    const int n = 3000, d = 96;
    Both x(gpu(), T(), n, d, normal(rng)), g(gpu(), T(), n, d, normal(rng)), w(gpu(), T(), 1, d, normal(rng, 0.2, 1));
    Both dx = Both::out(gpu(), T(), n, d), dw(gpu(), gt, 1, d, normal(rng));
    twice("rmsnorm_backward", {&dx, &dw},
          [&] { gpu().rmsnorm_backward(dx.dev(0, d), dw.dev(0, d), g.dev(0, d), x.dev(0, d), w.dev(0, d), 1e-5f, false); });
  }
  {
    const int n = 2000, d = 64, V = 50;
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (auto& i : ids) i = int32_t(rng.next_u64() % V);
    Ints dids(gpu(), ids);
    Both table(gpu(), gt, V, d, normal(rng)), dout(gpu(), T(), n, d, normal(rng));
    twice("embedding_backward", {&table}, [&] { gpu().embedding_backward(table.dev(0, d), dout.dev(0, d), dids.p()); });
  }
  {
    const int n = 300, D = 64, V = 5003;
    std::vector<int32_t> tg(static_cast<size_t>(n));
    for (auto& t : tg) t = int32_t(rng.next_u64() % V);
    Ints dtg(gpu(), tg);
    Both hn(gpu(), T(), n, D, normal(rng)), W(gpu(), T(), V, D, normal(rng, 0.3)), dW(gpu(), gt, V, D, normal(rng));
    Both dhn = Both::out(gpu(), T(), n, D);
    twice("cross_entropy_head", {&dhn, &dW},
          [&] { gpu().cross_entropy_head(dhn.dev(0, D), dW.dev(0, D), hn.dev(0, D), W.dev(0, D), dtg.p(), 0.01); });
  }
  for (bool packed : {false, true}) {  // the tensor-core kernels' plain loads and async copies
    const int H = 6, G = 2, hd = 64;
    hm::Ragged rg;
    fill(rg, gpu(), {300, 77}, {0, 0});
    const int n = rg.n_tokens(), Q = H * hd, KV = G * hd;
    Qkv x(gpu(), T(), H, G, hd, n, rng, packed);
    Both out = Both::out(gpu(), T(), n, Q), lse = Both::out(gpu(), DType::F32, n, H);
    twice("attention_train", {&out, &lse}, [&] {
      gpu().attention_train(out.dev(0, Q), lse.dev(0, H), x.m.dev(x.qc(), Q), x.m.dev(x.kc(), KV),
                            x.m.dev(x.vc(), KV), H, G, hd, rg);
    });
    Both dout(gpu(), T(), n, Q, normal(rng)), dq = Both::out(gpu(), T(), n, Q), dk = Both::out(gpu(), T(), n, KV),
        dv = Both::out(gpu(), T(), n, KV);
    twice("attention_backward", {&dq, &dk, &dv}, [&] {
      gpu().attention_backward(dq.dev(0, Q), dk.dev(0, KV), dv.dev(0, KV), dout.dev(0, Q), x.m.dev(x.qc(), Q),
                               x.m.dev(x.kc(), KV), x.m.dev(x.vc(), KV), out.dev(0, Q), lse.dev(0, H), H, G, hd, rg);
    });
  }
}

// Calls the op cannot run name it and what is wrong.
TEST_P(CudaGradOps, RefusalsNameTheProblem) {
  hm::Rng rng(110);
  auto refuses = [](const char* what, const std::function<void()>& f, const char* needle) {
    try {
      f();
      ADD_FAILURE() << what << " was accepted";
    } catch (const hm::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << what << ": " << e.what();
    }
  };
  hm::Ragged rg;
  fill(rg, gpu(), {5}, {0});
  Both a(gpu(), T(), 5, 8, normal(rng)), lse16(gpu(), T(), 5, 2, normal(rng)), big(gpu(), T(), 5, 2 * 257, normal(rng));
  if (T() != DType::F32)
    refuses("a 16-bit lse", [&] {
      gpu().attention_train(a.dev(0, 8), lse16.dev(0, 2), a.dev(0, 8), a.dev(0, 8), a.dev(0, 8), 2, 2, 4, rg);
    }, "lse");
  refuses("head_dim 257", [&] {
    gpu().attention_train(big.dev(0, 257), Both::out(gpu(), DType::F32, 5, 1).dev(0, 1), big.dev(0, 257),
                          big.dev(257, 257), big.dev(0, 257), 1, 1, 257, rg);
  }, "head_dim");
  Both half_type(gpu(), T() == DType::F16 ? DType::BF16 : DType::F16, 5, 8, normal(rng));
  refuses("mixed activation types", [&] {
    gpu().swiglu_backward(a.dev(0, 8), a.dev(0, 8), a.dev(0, 8), a.dev(0, 8), half_type.dev(0, 8));
  }, "swiglu_backward");
  refuses("a mis-shaped dW", [&] {
    gpu().linear_backward(Tensor(), a.dev(0, 7), a.dev(0, 8), a.dev(0, 8), a.dev(0, 8).rows_view(0, 5), false);
  }, "linear_backward");
}

INSTANTIATE_TEST_SUITE_P(Types, CudaGradOps, ::testing::Values(DType::F32, DType::BF16, DType::F16),
                         [](const ::testing::TestParamInfo<DType>& i) { return std::string(hm::compute_dtype_name(i.param)); });

}  // namespace
