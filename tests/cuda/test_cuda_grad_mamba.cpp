// The CUDA backend's Mamba training ops (conv1d_silu_train / _backward, selective_scan_train /
// _backward; kernels/cuda/mamba_grad.h) against the CPU backend on the same values.
//
// Each case draws fresh random inputs, rounds them to the tested type and gives the CPU backend
// (float) the same values widened. Ragged batches of odd lengths (a sequence of no rows, ones
// shorter than the conv window, ones that cross the conv's 64-row tiles and the scan's chunks and
// 64-token groups, or end just past one), E odd and wider than one thread block, the scan with
// N 16 (4 lanes per channel), 5 (padded states) and 23 (16 lanes per channel) and chunks 16, 37,
// 100 (two groups per chunk) and the default. Activations go through strided views (ld > cols),
// dB and dC are column views of one matrix (its other columns must stay NaN); activation
// gradients start NaN (must be assigned), parameter gradients 0.5 (must add), in the tested type
// or f32. Bound on max|got - ref| / max|ref| per tensor: f32 1e-5 (float states and sums land
// near 2e-7 of the exact gradients at these lengths), f16 1e-3, bf16 8e-3; a failure names the
// tensor and its worst element. The scan's backward runs twice and must give the same bits.
// Without a GPU the cases that need one are GTEST_SKIPped; the host-side checks run.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "cuda_test_util.h"
#include "kernels/cuda/mamba_grad.h"

namespace {

using hm::DType;
using hm::Tensor;
using hm::test::has_gpu;
using hm::test::tol;
using Vec = std::vector<float>;

constexpr float kParamStart = 0.5f;
constexpr int kPad = 3;  // extra columns of every strided view

// Values as stored in t (round to nearest even), widened back.
Vec rounded(Vec v, DType t) {
  std::vector<char> bytes(v.size() * hm::dtype_size(t));
  hm::convert_from_f32(bytes.data(), t, v.data(), v.size());
  hm::convert_to_f32(v.data(), bytes.data(), t, v.size());
  return v;
}

// A rows x cols matrix at row stride ld (NaN padding), on the host (f) and, of type t, on the
// device; `host()` is the same values as a float Tensor for the CPU backend.
struct Mat {
  int rows, cols, ld;
  DType t;
  Vec f;
  hm::Buffer dev;
  Mat(hm::Backend& gpu, DType type, int r, int c, bool strided, const Vec& dense)
      : rows(r), cols(c), ld(c + (strided ? kPad : 0)), t(type), f(size_t(r) * size_t(ld), NAN),
        dev(gpu, std::max<size_t>(16, f.size() * hm::dtype_size(type))) {
    for (int i = 0; i < r; ++i)
      for (int j = 0; j < c; ++j) f[size_t(i) * ld + j] = dense[size_t(i) * c + j];
    f = rounded(f, t);
    std::vector<char> bytes(f.size() * hm::dtype_size(t));
    hm::convert_from_f32(bytes.data(), t, f.data(), f.size());
    gpu.to_device(dev.data(), bytes.data(), bytes.size());
  }
  Tensor d() const { return {dev.data(), t, rows, cols, ld}; }
  Tensor host() { return {f.data(), DType::F32, rows, cols, ld}; }
  Vec get(hm::Backend& gpu) const {
    std::vector<char> bytes(f.size() * hm::dtype_size(t));
    gpu.to_host(bytes.data(), dev.data(), bytes.size());
    Vec out(f.size());
    hm::convert_to_f32(out.data(), bytes.data(), t, f.size());
    return out;
  }
};

Vec randv(hm::Rng& rng, size_t n, double lo, double hi) {
  Vec v(n);
  for (float& x : v) x = float(lo + (hi - lo) * rng.uniform());
  return v;
}
Vec filled(size_t n, float v) { return Vec(n, v); }
// A float view of host values for the CPU backend.
Tensor host(Vec& v, int rows, int cols, int ld) { return {v.data(), DType::F32, rows, cols, ld}; }

// max|got - ref| / max|ref| over the rows x cols of a view at stride ld, minus `start` on both
// (a parameter gradient's initial value); names the worst element on failure. NaN fails.
::testing::AssertionResult close(const char* what, const Vec& got, const Vec& ref, int rows, int cols, int ld,
                                 double bound, float start = 0.0f) {
  double num = 0, den = 0;
  int wi = 0, wj = 0;
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      const size_t k = size_t(i) * ld + j;
      const double g = double(got[k]) - start, r = double(ref[k]) - start;
      if (std::isnan(g) || std::isnan(r))
        return ::testing::AssertionFailure() << what << ": NaN at [" << i << ", " << j << "] (got " << got[k]
                                             << ", ref " << ref[k] << ")";
      if (std::fabs(g - r) > num) {
        num = std::fabs(g - r);
        wi = i;
        wj = j;
      }
      den = std::max(den, std::fabs(r));
    }
  const double err = num / std::max(den, 1e-30);
  if (err <= bound) return ::testing::AssertionSuccess();
  const size_t k = size_t(wi) * ld + wj;
  return ::testing::AssertionFailure() << what << ": error " << err << " over " << bound << ", worst at [" << wi
                                       << ", " << wj << "]: got " << got[k] << ", ref " << ref[k] << " (max|ref| "
                                       << den << ")";
}
// Nothing was written past a row (the padding of a strided view is still NaN).
::testing::AssertionResult padding_nan(const char* what, const Vec& v, int rows, int cols, int ld) {
  for (int i = 0; i < rows; ++i)
    for (int j = cols; j < ld; ++j)
      if (!std::isnan(v[size_t(i) * ld + j]))
        return ::testing::AssertionFailure() << what << ": padding written at [" << i << ", " << j << "]";
  return ::testing::AssertionSuccess();
}

void fill(hm::Ragged& rg, const std::vector<int>& lens) {
  rg.clear();
  for (size_t s = 0; s < lens.size(); ++s) rg.add(int(s), lens[s], 0);
}
int total(const std::vector<int>& lens) {
  int n = 0;
  for (int L : lens) n += L;
  return n;
}

struct Types {
  DType t, g;  // activations, parameter gradients
};
std::string types_name(const ::testing::TestParamInfo<Types>& i) {
  return std::string(hm::compute_dtype_name(i.param.t)) + "_grad_" + hm::compute_dtype_name(i.param.g);
}

class CudaGradMamba : public ::testing::TestWithParam<Types> {
 protected:
  void SetUp() override {
    if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
    gpu_ = hm::make_backend(hm::Device::CUDA);
    cpu_ = hm::make_cpu_backend();
  }
  DType T() const { return GetParam().t; }
  DType G() const { return GetParam().g; }
  std::unique_ptr<hm::Backend> gpu_, cpu_;
};

// ---------------------------------------------------------------- conv

void run_conv(hm::Backend& gpu, hm::Backend& cpu, DType T, DType G, const std::vector<int>& lens, int E, int K,
              uint64_t seed) {
  SCOPED_TRACE("conv E " + std::to_string(E) + " K " + std::to_string(K));
  hm::Rng rng(seed);
  const int n = total(lens);
  hm::Ragged rg;
  fill(rg, lens);
  rg.upload(gpu);
  hm::Ragged rc;
  fill(rc, lens);
  const size_t nE = size_t(n) * E;
  Mat x(gpu, T, n, E, true, randv(rng, nE, -1, 1)), w(gpu, T, E, K, false, randv(rng, size_t(E) * K, -1, 1));
  Mat b(gpu, T, 1, E, false, randv(rng, size_t(E), -0.5, 0.5)), dy(gpu, T, n, E, true, randv(rng, nE, -1, 1));
  Mat y(gpu, T, n, E, true, filled(nE, NAN)), dx(gpu, T, n, E, true, filled(nE, NAN));
  Mat dw(gpu, G, E, K, true, filled(size_t(E) * K, kParamStart)), db(gpu, G, 1, E, false, filled(size_t(E), kParamStart));
  gpu.conv1d_silu_train(y.d(), x.d(), w.d(), b.d(), rg);
  gpu.conv1d_silu_backward(dx.d(), dw.d(), db.d(), dy.d(), x.d(), w.d(), b.d(), rg);
  // The CPU backend on the same (rounded) values; its outputs start as the device's did.
  Vec ry = y.f, rdx = dx.f, rdw = dw.f, rdb = db.f;
  cpu.conv1d_silu_train(host(ry, n, E, y.ld), x.host(), w.host(), b.host(), rc);
  cpu.conv1d_silu_backward(host(rdx, n, E, dx.ld), host(rdw, E, K, dw.ld), host(rdb, 1, E, E), dy.host(), x.host(),
                           w.host(), b.host(), rc);
  const Vec gy = y.get(gpu), gdx = dx.get(gpu), gdw = dw.get(gpu), gdb = db.get(gpu);
  const float st = G == DType::F32 ? kParamStart : 0.0f;
  EXPECT_TRUE(close("conv out", gy, ry, n, E, y.ld, tol(T)));
  EXPECT_TRUE(close("conv dx", gdx, rdx, n, E, dx.ld, tol(T)));
  EXPECT_TRUE(close("conv dw", gdw, rdw, E, K, dw.ld, tol(G), st));
  EXPECT_TRUE(close("conv db", gdb, rdb, 1, E, E, tol(G), st));
  EXPECT_TRUE(padding_nan("conv out", gy, n, E, y.ld));
  EXPECT_TRUE(padding_nan("conv dx", gdx, n, E, dx.ld));
}

TEST_P(CudaGradMamba, ConvMatchesCpu) {
  // Tiles of 64 rows: sequences cross them, end on them (64), are shorter than the window.
  const std::vector<int> lens = {5, 1, 0, 67, 130, 2, 64, 29};
  int seed = 1;
  for (int K : {2, 4, 5})
    for (int E : {133, 7}) run_conv(*gpu_, *cpu_, T(), G(), lens, E, K, uint64_t(seed++));
  run_conv(*gpu_, *cpu_, T(), G(), {1}, 33, 4, 99);  // one row, no window
}

// ---------------------------------------------------------------- selective scan

struct ScanOut {
  Vec y, dx, ddt, dz, dbc, ddtb, dA, dD;
};

void run_scan(hm::Backend& gpu, hm::Backend& cpu, DType T, DType G, const std::vector<int>& lens, int E, int N,
              int chunk, uint64_t seed) {
  SCOPED_TRACE("scan E " + std::to_string(E) + " N " + std::to_string(N) + " chunk " + std::to_string(chunk));
  hm::Rng rng(seed);
  const int n = total(lens), R = 3, P = R + 2 * N;  // B, C: columns R.. of a [n, R + 2N] matrix (x_proj's)
  hm::Ragged rg;
  fill(rg, lens);
  rg.upload(gpu);
  hm::Ragged rc;
  fill(rc, lens);
  const size_t nE = size_t(n) * E, EN = size_t(E) * N;
  Vec bc = randv(rng, size_t(n) * P, -1, 1);
  Mat x(gpu, T, n, E, true, randv(rng, nE, -1, 1)), dt(gpu, T, n, E, true, randv(rng, nE, -3, 0));
  Mat z(gpu, T, n, E, true, randv(rng, nE, -2, 2)), dy(gpu, T, n, E, true, randv(rng, nE, -1, 1));
  Mat dtb(gpu, T, 1, E, false, randv(rng, size_t(E), -1, 0.5)), D(gpu, T, 1, E, false, randv(rng, size_t(E), 0.5, 1.5));
  // A_log in f32 when the parameter gradients are (f32 master weights), else in T.
  Mat Al(gpu, G == DType::F32 ? DType::F32 : T, E, N, true, randv(rng, EN, -0.5, 1.5));
  Mat dbc(gpu, T, n, P, false, bc);
  const Tensor B = dbc.d().cols_view(R, N), C = dbc.d().cols_view(R + N, N);
  const Tensor hB = dbc.host().cols_view(R, N), hC = dbc.host().cols_view(R + N, N);

  auto gpu_run = [&](ScanOut& o) {
    Mat y(gpu, T, n, E, true, filled(nE, NAN)), dx(gpu, T, n, E, true, filled(nE, NAN));
    Mat ddt(gpu, T, n, E, true, filled(nE, NAN)), dz(gpu, T, n, E, true, filled(nE, NAN));
    Mat ddbc(gpu, T, n, P, false, filled(size_t(n) * P, NAN));
    Mat ddtb(gpu, G, 1, E, false, filled(size_t(E), kParamStart)), dD(gpu, G, 1, E, false, filled(size_t(E), kParamStart));
    Mat dA(gpu, G, E, N, true, filled(EN, kParamStart));
    hm::Buffer saved(gpu, std::max<size_t>(16, gpu.scan_saved_bytes(rg, E, N, chunk)));
    gpu.selective_scan_train(y.d(), saved.data(), x.d(), dt.d(), dtb.d(), Al.d(), B, C, D.d(), z.d(), chunk, rg);
    gpu.selective_scan_backward(dx.d(), ddt.d(), ddbc.d().cols_view(R, N), ddbc.d().cols_view(R + N, N), dz.d(),
                                ddtb.d(), dA.d(), dD.d(), dy.d(), saved.data(), x.d(), dt.d(), dtb.d(), Al.d(), B, C,
                                D.d(), z.d(), chunk, rg);
    o = {y.get(gpu), dx.get(gpu), ddt.get(gpu), dz.get(gpu), ddbc.get(gpu), ddtb.get(gpu), dA.get(gpu), dD.get(gpu)};
  };
  ScanOut got, again;
  gpu_run(got);
  gpu_run(again);

  // The CPU backend on the same values (A_log widened like the rest), outputs at the device's strides.
  const int ldE = E + kPad, ldA = N + kPad;
  ScanOut ref{filled(size_t(n) * ldE, NAN), {}, {}, {}, filled(size_t(n) * P, NAN), filled(size_t(E), kParamStart),
              filled(size_t(E) * ldA, kParamStart), filled(size_t(E), kParamStart)};
  ref.dx = ref.ddt = ref.dz = ref.y;
  hm::Buffer csaved(cpu, std::max<size_t>(16, cpu.scan_saved_bytes(rc, E, N, chunk)));
  cpu.selective_scan_train(host(ref.y, n, E, ldE), csaved.data(), x.host(), dt.host(), dtb.host(), Al.host(), hB,
                           hC, D.host(), z.host(), chunk, rc);
  const Tensor rdbc = host(ref.dbc, n, P, P);
  cpu.selective_scan_backward(host(ref.dx, n, E, ldE), host(ref.ddt, n, E, ldE), rdbc.cols_view(R, N),
                              rdbc.cols_view(R + N, N), host(ref.dz, n, E, ldE), host(ref.ddtb, 1, E, E),
                              host(ref.dA, E, N, ldA), host(ref.dD, 1, E, E), dy.host(), csaved.data(), x.host(),
                              dt.host(), dtb.host(), Al.host(), hB, hC, D.host(), z.host(), chunk, rc);

  const double ba = tol(T), bp = tol(G);
  const float st = G == DType::F32 ? kParamStart : 0.0f;
  EXPECT_TRUE(close("scan y", got.y, ref.y, n, E, ldE, ba));
  EXPECT_TRUE(close("scan dx", got.dx, ref.dx, n, E, ldE, ba));
  EXPECT_TRUE(close("scan ddt", got.ddt, ref.ddt, n, E, ldE, ba));
  EXPECT_TRUE(close("scan dz", got.dz, ref.dz, n, E, ldE, ba));
  // dB then dC: columns R.. and R+N.. of the [n, P] matrix.
  const Vec gB(got.dbc.begin() + R, got.dbc.end()), rB(ref.dbc.begin() + R, ref.dbc.end());
  EXPECT_TRUE(close("scan dB", gB, rB, n, N, P, ba));
  const Vec gC(got.dbc.begin() + R + N, got.dbc.end()), rC(ref.dbc.begin() + R + N, ref.dbc.end());
  EXPECT_TRUE(close("scan dC", gC, rC, n, N, P, ba));
  EXPECT_TRUE(close("scan ddt_bias", got.ddtb, ref.ddtb, 1, E, E, bp, st));
  EXPECT_TRUE(close("scan dA_log", got.dA, ref.dA, E, N, ldA, bp, st));
  EXPECT_TRUE(close("scan dDskip", got.dD, ref.dD, 1, E, E, bp, st));
  for (int t = 0; t < n; ++t)
    for (int j = 0; j < R; ++j)
      ASSERT_TRUE(std::isnan(got.dbc[size_t(t) * P + j])) << "scan: column " << j << " of dB's matrix written at row " << t;
  EXPECT_TRUE(padding_nan("scan y", got.y, n, E, ldE));
  EXPECT_TRUE(padding_nan("scan dx", got.dx, n, E, ldE));
  EXPECT_TRUE(padding_nan("scan ddt", got.ddt, n, E, ldE));
  EXPECT_TRUE(padding_nan("scan dz", got.dz, n, E, ldE));
  // A rerun gives the same bits (fixed reduction orders, no atomics).
  const std::pair<const char*, std::pair<const Vec*, const Vec*>> same[] = {
      {"y", {&got.y, &again.y}},       {"dx", {&got.dx, &again.dx}},       {"ddt", {&got.ddt, &again.ddt}},
      {"dz", {&got.dz, &again.dz}},    {"dB dC", {&got.dbc, &again.dbc}},  {"ddt_bias", {&got.ddtb, &again.ddtb}},
      {"dA_log", {&got.dA, &again.dA}}, {"dDskip", {&got.dD, &again.dD}}};
  for (const auto& [nm, p] : same)
    EXPECT_EQ(std::memcmp(p.first->data(), p.second->data(), p.first->size() * sizeof(float)), 0)
        << "scan " << nm << " differs between two identical runs";
}

// Lengths around the groups of 64 tokens and the chunks: 0, 1, shorter than a chunk, a chunk
// exactly (64), one token past it (65), several (130, 200).
const std::vector<int> kScanLens = {5, 1, 0, 37, 130, 64, 65, 200};

TEST_P(CudaGradMamba, ScanN16MatchesCpu) {
  int seed = 10;
  for (int chunk : {0, 16, 37, 100}) run_scan(*gpu_, *cpu_, T(), G(), kScanLens, 67, 16, chunk, uint64_t(seed++));
}

// Several chunks and groups per sequence, E past two blocks of 64 channels and not a multiple
// of them, a 1-token sequence and one ending one token into its last sub-chunk of 8.
TEST_P(CudaGradMamba, ScanLongSequencesMatchCpu) {
  run_scan(*gpu_, *cpu_, T(), G(), {700, 1, 129, 321}, 130, 16, 0, 30);
  run_scan(*gpu_, *cpu_, T(), G(), {700, 1, 129}, 130, 12, 200, 31);
  // ld = E + 3 = 136 makes every row 16-byte aligned in each type: the forward's 16-byte copies,
  // over a last block of channels 5 wide.
  run_scan(*gpu_, *cpu_, T(), G(), {300, 1, 129}, 133, 16, 0, 32);
}

TEST_P(CudaGradMamba, ScanOddNMatchesCpu) {
  run_scan(*gpu_, *cpu_, T(), G(), kScanLens, 67, 5, 0, 20);   // 4 lanes, states past N padded
  run_scan(*gpu_, *cpu_, T(), G(), kScanLens, 19, 23, 37, 21);  // 16 lanes per channel
  run_scan(*gpu_, *cpu_, T(), G(), {3, 129}, 9, 1, 100, 22);    // one state
}

INSTANTIATE_TEST_SUITE_P(Types, CudaGradMamba,
                         ::testing::Values(Types{DType::F32, DType::F32}, Types{DType::BF16, DType::F32},
                                           Types{DType::BF16, DType::BF16}, Types{DType::F16, DType::F32}),
                         types_name);

// ---------------------------------------------------------------- shapes and errors

// Errors the backend raises before any launch; skipped without a GPU (the backend needs one).
TEST(CudaGradMambaErrors, BadShapesNameTheTensor) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  auto gpu = hm::make_backend(hm::Device::CUDA);
  const int n = 9, E = 5, N = 4, K = 4;
  hm::Ragged rg;
  fill(rg, {4, 5});
  rg.upload(*gpu);
  hm::Buffer buf(*gpu, 1 << 16);
  auto t = [&](DType d, int r, int c) { return Tensor(buf.data(), d, r, c); };
  const DType f = DType::F32, b = DType::BF16;
  auto expect_error = [](const std::function<void()>& fn, const std::string& want) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected one containing '" << want << "'";
    } catch (const hm::Error& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  };
  // conv: d_conv past kMaxConv, a bias of the wrong type, dw of the wrong shape.
  expect_error([&] { gpu->conv1d_silu_train(t(f, n, E), t(f, n, E), t(f, E, 9), t(f, 1, E), rg); }, "d_conv");
  expect_error([&] { gpu->conv1d_silu_train(t(b, n, E), t(b, n, E), t(b, E, K), t(f, 1, E), rg); }, "b is f32");
  expect_error([&] {
    gpu->conv1d_silu_backward(t(f, n, E), t(f, E, K + 1), t(f, 1, E), t(f, n, E), t(f, n, E), t(f, E, K),
                              t(f, 1, E), rg);
  }, "dw");
  // scan: d_state past kMaxState, dB of the wrong type, dA_log of the wrong shape.
  expect_error([&] {
    gpu->selective_scan_train(t(f, n, E), buf.data(), t(f, n, E), t(f, n, E), t(f, 1, E), t(f, E, 65),
                              t(f, n, 65), t(f, n, 65), t(f, 1, E), t(f, n, E), 0, rg);
  }, "d_state");
  expect_error([&] {
    gpu->selective_scan_backward(t(b, n, E), t(b, n, E), t(f, n, N), t(b, n, N), t(b, n, E), t(f, 1, E),
                                 t(f, E, N), t(f, 1, E), t(b, n, E), buf.data(), t(b, n, E), t(b, n, E), t(b, 1, E),
                                 t(b, E, N), t(b, n, N), t(b, n, N), t(b, 1, E), t(b, n, E), 0, rg);
  }, "dB is f32");
  expect_error([&] {
    gpu->selective_scan_backward(t(f, n, E), t(f, n, E), t(f, n, N), t(f, n, N), t(f, n, E), t(f, 1, E),
                                 t(f, E, N + 1), t(f, 1, E), t(f, n, E), buf.data(), t(f, n, E), t(f, n, E),
                                 t(f, 1, E), t(f, E, N), t(f, n, N), t(f, n, N), t(f, 1, E), t(f, n, E), 0, rg);
  }, "dA_log");
}

// The kernels' own checks run on the host before any launch: no GPU needed.
TEST(CudaGradMambaErrors, KernelChecksRunWithoutDevice) {
  hm::cuda::RaggedBatch rb;
  rb.nseq = 1;
  rb.n_tokens = 4;
  rb.max_len = 4;
  try {
    hm::cuda::conv1d_silu_train<float>(nullptr, 8, nullptr, 8, nullptr, 9, nullptr, rb, 8, 9, nullptr);
    ADD_FAILURE() << "conv1d_silu_train took d_conv 9";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("d_conv must be in [2, 8], got 9"), std::string::npos) << e.what();
  }
  const int32_t cu[] = {0, 4};
  const hm::cuda::ScanTrainShape wide = hm::cuda::scan_train_shape(cu, 1, 8, 65, 0);
  try {
    hm::cuda::selective_scan_train<float>(nullptr, 8, nullptr, {}, rb, wide, nullptr, nullptr);
    ADD_FAILURE() << "selective_scan_train took d_state 65";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("d_state must be in [1, 64], got 65"), std::string::npos) << e.what();
  }
  hm::cuda::ScanTrainShape other = hm::cuda::scan_train_shape(cu, 1, 8, 16, 0);
  other.n_tokens = 5;  // a shape of another batch
  try {
    hm::cuda::selective_scan_backward<float, float>({}, nullptr, 8, nullptr, {}, rb, other, nullptr, nullptr);
    ADD_FAILURE() << "selective_scan_backward took the shape of another batch";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("another batch"), std::string::npos) << e.what();
  }
}

// The saved states are one float state per chunk of each sequence: sum ceil(L / chunk) E N
// floats, 64 tokens a chunk by default; far less than a state per token.
TEST(CudaGradMambaErrors, SavedBytesAreOneStatePerChunk) {
  const int32_t cu[] = {0, 5, 6, 6, 43, 173};  // lengths 5, 1, 0, 37, 130
  const int E = 7, N = 16;
  auto bytes = [&](int chunk) {
    return hm::cuda::scan_train_saved_bytes(hm::cuda::scan_train_shape(cu, 5, E, N, chunk));
  };
  EXPECT_EQ(bytes(16), size_t(1 + 1 + 0 + 3 + 9) * E * N * sizeof(float));
  EXPECT_EQ(bytes(0), size_t(1 + 1 + 0 + 1 + 3) * E * N * sizeof(float));  // chunk 64
  EXPECT_EQ(bytes(100), size_t(1 + 1 + 0 + 1 + 2) * E * N * sizeof(float));
  EXPECT_EQ(bytes(1), size_t(173) * E * N * sizeof(float));
  const hm::cuda::ScanTrainShape sh = hm::cuda::scan_train_shape(cu, 5, E, N, 100);
  EXPECT_EQ(sh.groups, 1 + 1 + 0 + 1 + 3);  // 130: chunk [0, 100) as groups of 64 and 36, then 30
}

}  // namespace
