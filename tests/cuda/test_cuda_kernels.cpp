// The CUDA kernels (src/kernels/cuda/) against kernels/ref, in f32, bf16 and f16.
//
// Every case draws fresh random inputs at odd sizes, rounds them to the tested type, and gives
// the reference the rounded values widened to float, so the only differences are the kernels'
// float arithmetic and the rounding of their outputs. Ragged batches of 1-5 sequences with
// different lengths use non-contiguous slots; the reference loops over the sequences. Outputs
// are poisoned (NaN) before each run, so an unwritten element fails.
// Without a GPU every case that needs one is skipped (GTEST_SKIP: counted as SKIPPED).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "cuda_test_util.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/ops.h"

namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;

using hm::test::has_gpu;
#define REQUIRE_GPU() \
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device"

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

template <class T> T to_t(float v);
template <> float to_t<float>(float v) { return v; }
template <> bf16 to_t<bf16>(float v) { return __float2bfloat16_rn(v); }
template <> f16 to_t<f16>(float v) { return __float2half_rn(v); }
float to_f(float v) { return v; }
float to_f(bf16 v) { return __bfloat162float(v); }
float to_f(f16 v) { return __half2float(v); }

template <class T> const char* type_name();
template <> const char* type_name<float>() { return "f32"; }
template <> const char* type_name<bf16>() { return "bf16"; }
template <> const char* type_name<f16>() { return "f16"; }

// Bound on max|got - ref| / max|ref| for outputs stored as T: a few float ulps for f32, about
// two roundings of the type otherwise (bf16 keeps 8 bits, f16 11).
template <class T> double tol();
template <> double tol<float>() { return 1e-5; }
template <> double tol<bf16>() { return 8e-3; }
template <> double tol<f16>() { return 1e-3; }
// The recurrent state is float whatever T is, and both sides read the same rounded inputs.
constexpr double kStateTol = 1e-5;

// A device array, poisoned with 0xff bytes (NaN in all three types) until written.
template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    ck(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    ck(cudaMemset(p, 0xff, std::max<size_t>(n, 1) * sizeof(T)), "cudaMemset");
  }
  explicit Dev(const std::vector<T>& h) : Dev(h.size()) {
    ck(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  std::vector<T> get() const {
    ck(cudaDeviceSynchronize(), "kernel");
    std::vector<T> h(n);
    ck(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return h;
  }
};

// Random values rounded to T: `t` goes to the GPU, `f` (the same values widened) to the reference.
template <class T>
struct Input {
  std::vector<T> t;
  std::vector<float> f;
};
template <class T, class Draw>
Input<T> draw(size_t n, Draw d) {
  Input<T> in;
  in.t.resize(n);
  in.f.resize(n);
  for (size_t i = 0; i < n; ++i) {
    in.t[i] = to_t<T>(float(d()));
    in.f[i] = to_f(in.t[i]);
  }
  return in;
}
template <class T>
Input<T> normal(hm::Rng& rng, size_t n, double scale = 1.0, double mean = 0.0) {
  return draw<T>(n, [&] { return mean + scale * rng.normal(); });
}
template <class T>
Input<T> uniform(hm::Rng& rng, size_t n, double lo, double hi) {
  return draw<T>(n, [&] { return lo + (hi - lo) * rng.uniform(); });
}

template <class T>
std::vector<float> widen(const std::vector<T>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = to_f(v[i]);
  return f;
}

// The largest error seen per (op, type), printed at the end of the run.
std::map<std::string, double>& worst() {
  static std::map<std::string, double> m;
  return m;
}
struct ErrorSummary : ::testing::Environment {
  void TearDown() override {
    if (worst().empty()) return;
    std::printf("max error (max|got-ref| / max|ref|) per op and type:\n");
    for (const auto& [k, v] : worst()) std::printf("  %-28s %.3g\n", k.c_str(), v);
  }
};
const auto* const kSummary = ::testing::AddGlobalTestEnvironment(new ErrorSummary);

// max|got - ref| / max|ref| over the elements picked by `rows` x `cols` with row stride ld
// (a NaN anywhere gives NaN, which fails every bound).
double rel_err(const std::vector<float>& got, const std::vector<float>& ref, int rows, int cols, int ld) {
  double num = 0, den = 0;
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      const size_t k = size_t(i) * ld + j;
      const double d = std::fabs(double(got[k]) - ref[k]);
      if (std::isnan(got[k])) return NAN;
      num = std::max(num, d);
      den = std::max(den, std::fabs(double(ref[k])));
    }
  return num / std::max(den, 1e-30);
}
double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  return rel_err(got, ref, 1, int(ref.size()), 0);
}
void expect_close(const std::string& op, const char* type, double err, double bound) {
  EXPECT_TRUE(err <= bound) << op << " " << type << ": error " << err << " over " << bound;
  double& w = worst()[op + " " + type];
  w = std::isnan(err) ? err : std::max(w, err);
}

// A ragged batch: sequence s has lens[s] rows, slot slots[s] (distinct, shuffled, some slots
// of the pool unused), first position pos0[s].
struct Ragged {
  std::vector<int32_t> cu, slots, pos0;
  int n_slots = 0, max_len = 0;
  Ragged(hm::Rng& rng, const std::vector<int>& lens) {
    const int nseq = int(lens.size());
    n_slots = nseq + 3;
    std::vector<int32_t> all(static_cast<size_t>(n_slots));
    std::iota(all.begin(), all.end(), 0);
    for (int i = n_slots - 1; i > 0; --i) std::swap(all[size_t(i)], all[rng.next_u64() % uint64_t(i + 1)]);
    cu.push_back(0);
    for (int s = 0; s < nseq; ++s) {
      cu.push_back(cu.back() + lens[size_t(s)]);
      slots.push_back(all[size_t(s)]);
      pos0.push_back(int32_t(rng.next_u64() % 9000));
      max_len = std::max(max_len, lens[size_t(s)]);
    }
  }
  int nseq() const { return int(slots.size()); }
  int tokens() const { return cu.back(); }
  int len(int s) const { return cu[size_t(s) + 1] - cu[size_t(s)]; }
};
struct DevRagged {
  Dev<int32_t> cu, slots, pos0;
  hm::cuda::RaggedBatch rb;
  explicit DevRagged(const Ragged& r) : cu(r.cu), slots(r.slots), pos0(r.pos0) {
    rb.cu_seqlens = cu.p;
    rb.slots = slots.p;
    rb.pos0 = pos0.p;
    rb.nseq = r.nseq();
    rb.n_tokens = r.tokens();
    rb.max_len = r.max_len;
  }
};

// Batches of 1-5 sequences; 2049 crosses every power-of-two chunk boundary, 1 and 2 are
// shorter than the conv window.
const std::vector<std::vector<int>> kBatches = {{1}, {7}, {333}, {2049}, {5, 1, 333, 7, 64}, {2, 300, 1}};

template <class T>
class CudaOps : public ::testing::Test {};
struct TypeNames {
  template <class T>
  static std::string GetName(int) { return type_name<T>(); }
};
using Types = ::testing::Types<float, bf16, f16>;
TYPED_TEST_SUITE(CudaOps, Types, TypeNames);

TYPED_TEST(CudaOps, RmsNorm) {
  using T = TypeParam;
  REQUIRE_GPU();
  hm::Rng rng(11);
  // 2,500 and 2,049 rows of d % 4 == 0 take the warp-a-row kernel, the others a block a row.
  for (auto [n, d] : {std::pair{7, 333}, std::pair{3, 2049}, std::pair{1, 31}, std::pair{2500, 512},
                      std::pair{2049, 1028}, std::pair{2100, 333}}) {
    const auto x = normal<T>(rng, size_t(n) * d, 2.0), w = normal<T>(rng, size_t(d), 0.2, 1.0);
    Dev<T> dx(x.t), dw(w.t), out(size_t(n) * d);
    hm::cuda::rmsnorm<T>(out.p, dx.p, dw.p, n, d, 1e-5f, nullptr);
    std::vector<float> ref(size_t(n) * d);
    hm::ref::rmsnorm(ref.data(), x.f.data(), w.f.data(), n, d, 1e-5f);
    expect_close("rmsnorm", type_name<T>(), rel_err(widen(out.get()), ref), tol<T>());
    EXPECT_EQ(rel_err(widen(dx.get()), x.f), 0.0) << "rmsnorm wrote its input";
  }
}

TYPED_TEST(CudaOps, AddRmsNorm) {
  using T = TypeParam;
  REQUIRE_GPU();
  hm::Rng rng(12);
  for (auto [n, d] : {std::pair{5, 333}, std::pair{2, 2049}, std::pair{2500, 512}, std::pair{2049, 100}}) {
    const auto h = normal<T>(rng, size_t(n) * d), delta = normal<T>(rng, size_t(n) * d, 0.5);
    const auto w = normal<T>(rng, size_t(d), 0.2, 1.0);
    Dev<T> dh(h.t), ddelta(delta.t), dw(w.t), out(size_t(n) * d);
    hm::cuda::add_rmsnorm<T>(out.p, dh.p, ddelta.p, dw.p, n, d, 1e-5f, nullptr);
    std::vector<float> hsum(size_t(n) * d), ref(size_t(n) * d);
    for (size_t i = 0; i < hsum.size(); ++i) hsum[i] = to_f(to_t<T>(h.f[i] + delta.f[i]));
    hm::ref::rmsnorm(ref.data(), hsum.data(), w.f.data(), n, d, 1e-5f);
    expect_close("add_rmsnorm h", type_name<T>(), rel_err(widen(dh.get()), hsum), 1e-7);
    expect_close("add_rmsnorm out", type_name<T>(), rel_err(widen(out.get()), ref), tol<T>());
  }
}

TYPED_TEST(CudaOps, Embedding) {
  using T = TypeParam;
  REQUIRE_GPU();
  hm::Rng rng(13);
  const int V = 101, d = 77, n = 13;
  const auto table = normal<T>(rng, size_t(V) * d);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& i : ids) i = int32_t(rng.next_u64() % V);
  Dev<T> dt(table.t), out(size_t(n) * d);
  Dev<int32_t> did(ids);
  hm::cuda::embedding<T>(out.p, dt.p, did.p, n, d, nullptr);
  std::vector<float> ref(size_t(n) * d);
  for (int i = 0; i < n; ++i)
    std::copy_n(table.f.begin() + ptrdiff_t(ids[size_t(i)]) * d, d, ref.begin() + ptrdiff_t(i) * d);
  expect_close("embedding", type_name<T>(), rel_err(widen(out.get()), ref), 0.0);
}

TYPED_TEST(CudaOps, SwiGlu) {
  using T = TypeParam;
  REQUIRE_GPU();
  hm::Rng rng(14);
  const int n = 5, f = 333, ldgu = 2 * f + 3, ldo = f + 7;  // g, u: halves of a wider matrix
  const auto gu = normal<T>(rng, size_t(n) * ldgu, 2.0);
  Dev<T> dgu(gu.t), out(size_t(n) * ldo);
  hm::cuda::swiglu<T>(out.p, ldo, dgu.p, dgu.p + f, ldgu, n, f, nullptr);
  std::vector<float> ref(size_t(n) * ldo);
  hm::ref::swiglu(ref.data(), ldo, gu.f.data(), gu.f.data() + f, ldgu, n, f);
  expect_close("swiglu", type_name<T>(), rel_err(widen(out.get()), ref, n, f, ldo), tol<T>());
}

TYPED_TEST(CudaOps, RopeRagged) {
  using T = TypeParam;
  REQUIRE_GPU();
  hm::Rng rng(15);
  const int heads = 3, hd = 10, ldx = heads * hd + 4;
  for (const auto& lens : {std::vector<int>{1, 7, 333}, std::vector<int>{64}}) {
    const Ragged r(rng, lens);
    DevRagged dr(r);
    const auto x = normal<T>(rng, size_t(r.tokens()) * ldx);
    Dev<T> dx(x.t);
    hm::cuda::rope<T>(dx.p, ldx, heads, hd, dr.rb, 10000.0f, nullptr);
    std::vector<float> ref = x.f;
    for (int s = 0; s < r.nseq(); ++s)
      hm::ref::rope(ref.data() + size_t(r.cu[size_t(s)]) * ldx, ldx, r.len(s), heads, hd, r.pos0[size_t(s)], 10000.0f);
    const std::vector<float> got = widen(dx.get());
    expect_close("rope", type_name<T>(), rel_err(got, ref, r.tokens(), heads * hd, ldx), tol<T>());
    for (int t = 0; t < r.tokens(); ++t)  // the row padding is left alone
      for (int j = heads * hd; j < ldx; ++j) EXPECT_EQ(got[size_t(t) * ldx + j], x.f[size_t(t) * ldx + j]);
  }
}

// The conv's inputs: x as the first half of xz [T, 2E], as in_proj writes it.
template <class T>
struct ConvCase {
  int E, K;
  Input<T> xz, w, b;
  std::vector<float> state;  // [n_slots, E, K-1]
  ConvCase(hm::Rng& rng, int tokens, int n_slots, int E_, int K_)
      : E(E_), K(K_), xz(normal<T>(rng, size_t(tokens) * 2 * E_)),
        w(uniform<T>(rng, size_t(E_) * K_, -0.5, 0.5)), b(uniform<T>(rng, size_t(E_), -0.5, 0.5)),
        state(normal<float>(rng, size_t(n_slots) * E_ * (K_ - 1)).f) {}
};

TYPED_TEST(CudaOps, ConvPrefillRagged) {
  using T = TypeParam;
  REQUIRE_GPU();
  hm::Rng rng(16);
  for (const auto& lens : kBatches)
    // E 67: scalar loads and stores; E 100: vector loads, scalar stores (ldo = E + 3);
    // E 256, ldo = E: the all-vector path of the tiled kernel.
    for (auto [E, K] : {std::pair{67, 4}, std::pair{100, 3}, std::pair{256, 4}}) {
      const Ragged r(rng, lens);
      DevRagged dr(r);
      const ConvCase<T> c(rng, r.tokens(), r.n_slots, E, K);
      const int ldx = 2 * E, ldo = E % 8 == 0 ? E : E + 3;
      Dev<T> dxz(c.xz.t), dw(c.w.t), db(c.b.t), out(size_t(r.tokens()) * ldo);
      Dev<float> dstate(c.state);
      hm::cuda::conv1d_silu<T>(out.p, ldo, dstate.p, dxz.p, ldx, dw.p, db.p, dr.rb, E, K, nullptr);
      std::vector<float> ref(size_t(r.tokens()) * ldo), ref_state = c.state;
      for (int s = 0; s < r.nseq(); ++s) {
        const size_t t0 = size_t(r.cu[size_t(s)]);
        hm::ref::conv1d_silu(ref.data() + t0 * ldo, ldo, ref_state.data() + size_t(r.slots[size_t(s)]) * E * (K - 1),
                             c.xz.f.data() + t0 * ldx, ldx, c.w.f.data(), c.b.f.data(), r.len(s), E, K);
      }
      expect_close("conv1d_silu", type_name<T>(), rel_err(widen(out.get()), ref, r.tokens(), E, ldo), tol<T>());
      // The state is a copy of inputs (or of the old state): exact, and other slots untouched.
      EXPECT_EQ(rel_err(dstate.get(), ref_state), 0.0) << "conv state, lens[0] " << lens[0];
    }
}

TYPED_TEST(CudaOps, ConvStep) {
  using T = TypeParam;
  REQUIRE_GPU();
  hm::Rng rng(17);
  for (auto [E, K] : {std::pair{131, 4}, std::pair{67, 2}}) {
    const Ragged r(rng, {1, 1, 1, 1, 1});
    DevRagged dr(r);
    const ConvCase<T> c(rng, r.tokens(), r.n_slots, E, K);
    const int ldx = 2 * E;
    Dev<T> dxz(c.xz.t), dw(c.w.t), db(c.b.t), out(size_t(r.tokens()) * E);
    Dev<float> dstate(c.state);
    hm::cuda::conv1d_silu_step<T>(out.p, E, dstate.p, dr.slots.p, dxz.p, ldx, dw.p, db.p, r.nseq(), E, K, nullptr);
    std::vector<float> ref(size_t(r.tokens()) * E), ref_state = c.state;
    for (int s = 0; s < r.nseq(); ++s)
      hm::ref::conv1d_silu(ref.data() + size_t(s) * E, E, ref_state.data() + size_t(r.slots[size_t(s)]) * E * (K - 1),
                           c.xz.f.data() + size_t(s) * ldx, ldx, c.w.f.data(), c.b.f.data(), 1, E, K);
    expect_close("conv1d_silu_step", type_name<T>(), rel_err(widen(out.get()), ref), tol<T>());
    EXPECT_EQ(rel_err(dstate.get(), ref_state), 0.0) << "conv step state";
  }
}

// The scan's inputs laid out as the model has them: x and z the halves of xz [T, 2E], B and C
// inside dbc [T, R + 2N] after R dt_rank columns, dt [T, E].
template <class T>
struct ScanCase {
  static constexpr int R = 3;
  int E, N, ldbc;
  Input<T> xz, dt, dbc, dt_bias, Dskip;
  std::vector<float> A, state;  // A = -exp(A_log) [E, N]; state [n_slots, E, N]
  ScanCase(hm::Rng& rng, int tokens, int n_slots, int E_, int N_)
      : E(E_), N(N_), ldbc(R + 2 * N_), xz(normal<T>(rng, size_t(tokens) * 2 * E_)),
        dt(normal<T>(rng, size_t(tokens) * E_)), dbc(normal<T>(rng, size_t(tokens) * ldbc)),
        dt_bias(uniform<T>(rng, size_t(E_), -4.0, -1.0)), Dskip(uniform<T>(rng, size_t(E_), 0.5, 1.5)),
        A(size_t(E_) * N_), state(normal<float>(rng, size_t(n_slots) * E_ * N_).f) {
    for (int e = 0; e < E; ++e)  // A_log = log(n + 1), +-1 per channel (docs/MODEL.md's init, varied)
      for (int n = 0; n < N; ++n)
        A[size_t(e) * N + n] = -float(std::exp(std::log(n + 1.0) + 2.0 * (rng.uniform() - 0.5)));
  }
};

// The scan on the GPU over a ragged batch whose rows are `rows0 + [cu[s], cu[s+1])`.
template <class T>
struct ScanDev {
  Dev<T> xz, dt, dbc, dt_bias, Dskip, y;
  Dev<float> A, state;
  ScanDev(const ScanCase<T>& c, int tokens)
      : xz(c.xz.t), dt(c.dt.t), dbc(c.dbc.t), dt_bias(c.dt_bias.t), Dskip(c.Dskip.t),
        y(size_t(tokens) * c.E), A(c.A), state(c.state) {}
  void run(const ScanCase<T>& c, const hm::cuda::RaggedBatch& rb, int row0, int chunk) {
    const int E = c.E, N = c.N, R = ScanCase<T>::R;
    const size_t ws_bytes = hm::cuda::selective_scan_workspace_bytes(rb, E, N, chunk);
    Dev<char> ws(ws_bytes);
    const size_t r0 = size_t(row0);
    hm::cuda::selective_scan<T>(y.p + r0 * E, E, state.p, xz.p + r0 * 2 * E, 2 * E, dt.p + r0 * E, E, dt_bias.p,
                                A.p, dbc.p + r0 * c.ldbc + R, dbc.p + r0 * c.ldbc + R + N, c.ldbc, Dskip.p,
                                xz.p + r0 * 2 * E + E, 2 * E, rb, E, N, chunk, ws_bytes ? ws.p : nullptr,
                                nullptr);
    ck(cudaDeviceSynchronize(), "selective_scan");
  }
};

// ref::selective_scan per sequence; rows of sequence s start at row0 + cu[s].
template <class T>
void scan_ref(const ScanCase<T>& c, const Ragged& r, int row0, std::vector<float>& y, std::vector<float>& state) {
  const int E = c.E, N = c.N, R = ScanCase<T>::R;
  for (int s = 0; s < r.nseq(); ++s) {
    const size_t t0 = size_t(row0 + r.cu[size_t(s)]);
    hm::ref::selective_scan(y.data() + t0 * E, E, state.data() + size_t(r.slots[size_t(s)]) * E * N,
                            c.xz.f.data() + t0 * 2 * E, 2 * E, c.dt.f.data() + t0 * E, E, c.dt_bias.f.data(),
                            c.A.data(), c.dbc.f.data() + t0 * c.ldbc + R, c.dbc.f.data() + t0 * c.ldbc + R + N,
                            c.ldbc, c.Dskip.f.data(), c.xz.f.data() + t0 * 2 * E + E, 2 * E, r.len(s), E, N);
  }
}

TYPED_TEST(CudaOps, ScanPrefillRagged) {
  using T = TypeParam;
  REQUIRE_GPU();
  hm::Rng rng(18);
  // chunk 0: the automatic length; 32 and 100: several chunks (100 not a multiple of the
  // 32-token tile); 1 << 20: the whole sequence as one chunk (no carry pass).
  for (const auto& lens : kBatches)
    // E 67, 130, 40: rows not 16-byte aligned (element-wise staging); 136, 264: 16-byte copies,
    // with a partial last block of channels.
    for (auto [E, N] : {std::pair{67, 16}, std::pair{130, 5}, std::pair{40, 33}, std::pair{136, 16}, std::pair{264, 5}})
      for (int chunk : {0, 32, 100, 1 << 20}) {
        if (N == 33 && chunk == 100) continue;  // the wide-state path once per chunking is enough
        const Ragged r(rng, lens);
        DevRagged dr(r);
        const ScanCase<T> c(rng, r.tokens(), r.n_slots, E, N);
        ScanDev<T> d(c, r.tokens());
        d.run(c, dr.rb, 0, chunk);
        std::vector<float> ref(size_t(r.tokens()) * E), ref_state = c.state;
        scan_ref(c, r, 0, ref, ref_state);
        const std::string what = "selective_scan N" + std::to_string(N);
        expect_close(what, type_name<T>(), rel_err(widen(d.y.get()), ref), tol<T>());
        expect_close(what + " state", type_name<T>(), rel_err(d.state.get(), ref_state), kStateTol);
        if (this->HasFailure()) {
          ADD_FAILURE() << "lens[0] " << lens[0] << " nseq " << lens.size() << " E " << E << " N " << N << " chunk " << chunk;
          return;
        }
      }
}

// Prefill in two calls (each sequence cut at a random point, pieces of zero rows included)
// equals one call, and both equal the reference.
TYPED_TEST(CudaOps, ScanPrefillContinues) {
  using T = TypeParam;
  REQUIRE_GPU();
  hm::Rng rng(19);
  const int N = 16;
  for (auto [E, chunk] : {std::pair{75, 0}, std::pair{75, 32}, std::pair{200, 0}, std::pair{200, 64}}) {
    const std::vector<int> lens = {333, 1, 2049, 64};
    const Ragged whole(rng, lens);
    const ScanCase<T> c(rng, whole.tokens(), whole.n_slots, E, N);
    // Two ragged batches over the same slots: first the heads, then the tails, rows packed
    // as heads then tails, so the inputs are permuted accordingly.
    std::vector<int> head(lens.size()), tail(lens.size());
    for (size_t s = 0; s < lens.size(); ++s) {
      head[s] = int(rng.next_u64() % uint64_t(lens[s] + 1));
      tail[s] = lens[s] - head[s];
    }
    Ragged r1 = whole, r2 = whole;
    r1.cu = {0};
    r2.cu = {0};
    for (size_t s = 0; s < lens.size(); ++s) {
      r1.cu.push_back(r1.cu.back() + head[s]);
      r2.cu.push_back(r2.cu.back() + tail[s]);
    }
    r1.max_len = *std::max_element(head.begin(), head.end());
    r2.max_len = *std::max_element(tail.begin(), tail.end());
    // Split inputs: row i of sequence s goes to the head block or the tail block.
    ScanCase<T> split = c;
    std::vector<int> src;  // split row -> whole row
    for (int pass = 0; pass < 2; ++pass)
      for (size_t s = 0; s < lens.size(); ++s)
        for (int i = pass == 0 ? 0 : head[s]; i < (pass == 0 ? head[s] : lens[s]); ++i)
          src.push_back(whole.cu[s] + i);
    auto permute = [&](Input<T>& in, const Input<T>& from, int width) {
      for (size_t k = 0; k < src.size(); ++k)
        for (int j = 0; j < width; ++j) {
          in.t[k * width + j] = from.t[size_t(src[k]) * width + j];
          in.f[k * width + j] = from.f[size_t(src[k]) * width + j];
        }
    };
    permute(split.xz, c.xz, 2 * E);
    permute(split.dt, c.dt, E);
    permute(split.dbc, c.dbc, c.ldbc);

    ScanDev<T> one(c, whole.tokens()), two(split, whole.tokens());
    DevRagged dw(whole), d1(r1), d2(r2);
    one.run(c, dw.rb, 0, chunk);
    two.run(split, d1.rb, 0, chunk);
    two.run(split, d2.rb, r1.tokens(), chunk);
    const std::vector<float> y1 = widen(one.y.get()), y2s = widen(two.y.get());
    std::vector<float> y2(y1.size());
    for (size_t k = 0; k < src.size(); ++k)
      std::copy_n(y2s.begin() + ptrdiff_t(k) * E, E, y2.begin() + ptrdiff_t(src[k]) * E);
    std::vector<float> ref(size_t(whole.tokens()) * E), ref_state = c.state;
    scan_ref(c, whole, 0, ref, ref_state);
    expect_close("scan two calls vs one", type_name<T>(), rel_err(y2, y1), tol<T>());
    expect_close("scan two calls vs one state", type_name<T>(), rel_err(two.state.get(), one.state.get()), kStateTol);
    expect_close("scan two calls vs ref", type_name<T>(), rel_err(y2, ref), tol<T>());
    expect_close("scan two calls vs ref state", type_name<T>(), rel_err(two.state.get(), ref_state), kStateTol);
  }
}

TYPED_TEST(CudaOps, ScanStep) {
  using T = TypeParam;
  REQUIRE_GPU();
  hm::Rng rng(20);
  // N 16, 32, 64: the float4 state path; N 5, 33: the scalar one.
  for (auto [E, N] : {std::pair{130, 16}, std::pair{67, 5}, std::pair{40, 33}, std::pair{64, 32}, std::pair{24, 64}}) {
    const Ragged r(rng, {1, 1, 1, 1, 1});
    const ScanCase<T> c(rng, r.tokens(), r.n_slots, E, N);
    ScanDev<T> d(c, r.tokens());
    Dev<int32_t> slots(r.slots);
    const int R = ScanCase<T>::R;
    hm::cuda::selective_scan_step<T>(d.y.p, E, d.state.p, slots.p, d.xz.p, 2 * E, d.dt.p, E, d.dt_bias.p, d.A.p,
                                     d.dbc.p + R, d.dbc.p + R + N, c.ldbc, d.Dskip.p, d.xz.p + E, 2 * E,
                                     r.nseq(), E, N, nullptr);
    std::vector<float> ref(size_t(r.tokens()) * E), ref_state = c.state;
    scan_ref(c, r, 0, ref, ref_state);
    const std::string what = "selective_scan_step N" + std::to_string(N);
    expect_close(what, type_name<T>(), rel_err(widen(d.y.get()), ref), tol<T>());
    expect_close(what + " state", type_name<T>(), rel_err(d.state.get(), ref_state), kStateTol);
  }
}

// Bad sizes are errors that name the op and the value, checked before any launch (no GPU needed).
TEST(CudaOpsErrors, SizesOutsideTheKernelsLimits) {
  hm::cuda::RaggedBatch rb;
  rb.nseq = 1;
  rb.n_tokens = rb.max_len = 4;
  try {
    hm::cuda::conv1d_silu<float>(nullptr, 8, nullptr, nullptr, 8, nullptr, nullptr, rb, 8, hm::cuda::kMaxConv + 1, nullptr);
    FAIL() << "conv with d_conv " << hm::cuda::kMaxConv + 1 << " was accepted";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("d_conv"), std::string::npos) << e.what();
  }
  try {
    hm::cuda::selective_scan_step<bf16>(nullptr, 8, nullptr, nullptr, nullptr, 8, nullptr, 8, nullptr, nullptr,
                                        nullptr, nullptr, 8, nullptr, nullptr, 8, 1, 8, hm::cuda::kMaxState + 1, nullptr);
    FAIL() << "scan with d_state " << hm::cuda::kMaxState + 1 << " was accepted";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("d_state"), std::string::npos) << e.what();
  }
  try {
    hm::cuda::rope<f16>(nullptr, 8, 1, 7, rb, 10000.0f, nullptr);
    FAIL() << "rope with an odd head_dim was accepted";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("head_dim"), std::string::npos) << e.what();
  }
}


// ---- Attention: kv_write, flash prefill, split-KV decode ----------------------------------------

// Activation type T with cache type KV.
template <class T_, class KV_>
struct TK {
  using T = T_;
  using KV = KV_;
};
template <class P>
class CudaAttention : public ::testing::Test {};
struct PairNames {
  template <class P>
  static std::string GetName(int) {
    return std::string(type_name<typename P::T>()) + "_" + type_name<typename P::KV>() + "kv";
  }
};
using Pairs = ::testing::Types<TK<float, bf16>, TK<float, f16>, TK<bf16, bf16>, TK<f16, f16>, TK<bf16, f16>>;
TYPED_TEST_SUITE(CudaAttention, Pairs, PairNames);

// The looser of the two types' bounds: outputs are T, and the prefill's mma rounds the softmax
// weights to KV.
template <class T, class KV>
double attn_tol() {
  return std::max(tol<T>(), tol<KV>());
}

// One attention layer's state and inputs: a pool of n_slots x max_ctx cache rows filled with
// random history (rounded to KV), new q, k, v rows laid out inside one qkv matrix
// [tokens, (H + 2G) hd], as the model's projection writes them.
template <class T, class KV>
struct AttnCase {
  int H, G, hd, max_ctx, ldq;
  Input<KV> kc, vc;  // the pools
  Input<T> qkv;
  AttnCase(hm::Rng& rng, const Ragged& r, int H_, int G_, int hd_, int max_ctx_)
      : H(H_), G(G_), hd(hd_), max_ctx(max_ctx_), ldq((H_ + 2 * G_) * hd_),
        kc(normal<KV>(rng, size_t(r.n_slots) * max_ctx_ * G_ * hd_)),
        vc(normal<KV>(rng, size_t(r.n_slots) * max_ctx_ * G_ * hd_)),
        qkv(normal<T>(rng, size_t(r.tokens()) * (H_ + 2 * G_) * hd_, 1.5)) {
    // The prefill rounds q to KV for the tensor cores: give f32 a q that KV holds exactly,
    // so the bound measures the kernel's own rounding (softmax weights, output).
    for (size_t i = 0; i < qkv.t.size(); ++i) {
      qkv.f[i] = to_f(to_t<KV>(qkv.f[i]));
      qkv.t[i] = to_t<T>(qkv.f[i]);
    }
  }
  int width() const { return G * hd; }
  size_t slot_stride() const { return size_t(max_ctx) * width(); }
  // The pools after kv_write, on the host: new rows rounded T -> KV.
  void write_ref(const Ragged& r, std::vector<float>& kref, std::vector<float>& vref) const {
    kref = kc.f;
    vref = vc.f;
    for (int s = 0; s < r.nseq(); ++s)
      for (int t = 0; t < r.len(s); ++t) {
        const size_t row = size_t(r.cu[size_t(s)] + t) * ldq;
        const size_t at = size_t(r.slots[size_t(s)]) * slot_stride() + size_t(r.pos0[size_t(s)] + t) * width();
        for (int j = 0; j < width(); ++j) {
          kref[at + j] = to_f(to_t<KV>(qkv.f[row + size_t(H) * hd + j]));
          vref[at + j] = to_f(to_t<KV>(qkv.f[row + size_t(H + G) * hd + j]));
        }
      }
  }
  // ref::attention per sequence over its slot's rows 0..pos0 + len - 1.
  std::vector<float> attention_ref(const Ragged& r, const std::vector<float>& kref, const std::vector<float>& vref,
                                   int ldo) const {
    std::vector<float> out(size_t(r.tokens()) * ldo, 0.f);
    for (int s = 0; s < r.nseq(); ++s) {
      if (r.len(s) == 0) continue;
      const size_t at = size_t(r.slots[size_t(s)]) * slot_stride();
      const size_t t0 = size_t(r.cu[size_t(s)]);
      hm::ref::attention(out.data() + t0 * ldo, ldo, qkv.f.data() + t0 * ldq, ldq, kref.data() + at, vref.data() + at,
                         r.len(s), r.pos0[size_t(s)], H, G, hd);
    }
    return out;
  }
};

// kv_write then attention on the GPU against the host: the pools exactly (other slots and
// positions untouched), the outputs within the bound, NaN-poisoned outputs all written.
template <class T, class KV>
void check_attention(hm::Rng& rng, const std::vector<int>& lens, int H, int G, int hd, int max_pos0, const char* op,
                     bool split_kv = true) {
  Ragged r(rng, lens);
  for (auto& p : r.pos0) p = int32_t(rng.next_u64() % uint64_t(max_pos0 + 1));
  int max_keys = 1;
  for (int s = 0; s < r.nseq(); ++s) max_keys = std::max(max_keys, r.pos0[size_t(s)] + r.len(s));
  const int max_ctx = max_keys + 5;
  DevRagged dr(r);
  const AttnCase<T, KV> c(rng, r, H, G, hd, max_ctx);
  const int ldo = H * hd + 8;
  Dev<KV> dk(c.kc.t), dv(c.vc.t);
  Dev<T> dqkv(c.qkv.t), out(size_t(r.tokens()) * ldo);
  const hm::cuda::KvPool<KV> pool{dk.p, dv.p, max_ctx, int64_t(c.slot_stride())};
  hm::cuda::kv_write<T, KV>(pool, dqkv.p + size_t(H) * hd, c.ldq, dqkv.p + size_t(H + G) * hd, c.ldq, dr.rb, G, hd,
                            nullptr);
  const size_t ws_bytes = hm::cuda::attention_workspace_bytes(dr.rb, H, G, hd, max_keys, split_kv);
  Dev<char> ws(ws_bytes);
  hm::cuda::attention<T, KV>(out.p, ldo, dqkv.p, c.ldq, pool, dr.rb, H, G, hd, max_keys, ws_bytes ? ws.p : nullptr,
                             nullptr, split_kv);
  std::vector<float> kref, vref;
  c.write_ref(r, kref, vref);
  EXPECT_EQ(rel_err(widen(dk.get()), kref), 0.0) << "kv_write K";
  EXPECT_EQ(rel_err(widen(dv.get()), vref), 0.0) << "kv_write V";
  const std::vector<float> ref = c.attention_ref(r, kref, vref, ldo);
  const std::string what = std::string(op) + " hd" + std::to_string(hd);
  const double err = rel_err(widen(out.get()), ref, r.tokens(), H * hd, ldo);
  expect_close(what, (std::string(type_name<T>()) + "/" + type_name<KV>()).c_str(), err, attn_tol<T, KV>());
  if (!(err <= attn_tol<T, KV>()))
    ADD_FAILURE() << op << " lens[0] " << lens[0] << " nseq " << lens.size() << " H " << H << " G " << G << " hd " << hd
                  << (split_kv ? "" : " (flash kernel)");
}

// Prefill: single sequences of 1, 7, 333 rows and ragged mixes, continuing from a cache
// (pos0 up to 400; 0 too) or not; GQA ratios 1, 2, 4; hd 32, 64, 128.
TYPED_TEST(CudaAttention, PrefillRagged) {
  using T = typename TypeParam::T;
  using KV = typename TypeParam::KV;
  REQUIRE_GPU();
  hm::Rng rng(21);
  struct Case { std::vector<int> lens; int H, G, hd, max_pos0; };
  const std::vector<Case> cases = {
      {{1}, 4, 4, 64, 0},          {{7}, 4, 2, 64, 0},          {{333}, 4, 1, 64, 0},
      {{7}, 8, 2, 128, 300},       {{333}, 2, 2, 128, 400},     {{5, 1, 333, 7, 64}, 4, 1, 64, 300},
      {{2, 130, 1}, 8, 2, 128, 200}, {{65, 3}, 2, 1, 32, 100},  {{1, 1, 200}, 4, 4, 32, 50}};
  for (const Case& k : cases) {
    check_attention<T, KV>(rng, k.lens, k.H, k.G, k.hd, k.max_pos0, "attention prefill");
    if (this->HasFailure()) return;
  }
}

// Decode: one row per sequence over caches up to ~5000 long (many chunks per sequence), a
// sequence with no row in the batch, GQA ratios 1, 2, 4, 8.
TYPED_TEST(CudaAttention, DecodeSplitKv) {
  using T = typename TypeParam::T;
  using KV = typename TypeParam::KV;
  REQUIRE_GPU();
  hm::Rng rng(22);
  struct Case { std::vector<int> lens; int H, G, hd, max_pos0; };
  const std::vector<Case> cases = {{{1}, 4, 4, 64, 0},          {{1, 1, 1, 1, 1}, 8, 2, 64, 5000},
                                   {{1, 0, 1}, 8, 1, 128, 3000}, {{1, 1}, 4, 2, 32, 700},
                                   {{1, 1, 1}, 16, 2, 128, 2000},
                                   // groups of 3 and 5 run the next template up (4, 8)
                                   {{1, 1}, 6, 2, 64, 900},      {{1}, 5, 1, 32, 300}};
  for (const Case& k : cases) {
    check_attention<T, KV>(rng, k.lens, k.H, k.G, k.hd, k.max_pos0, "attention decode");
    // The same decode rows on the flash kernel (split_kv false: batch-invariant mode).
    check_attention<T, KV>(rng, k.lens, k.H, k.G, k.hd, k.max_pos0, "attention decode", false);
    if (this->HasFailure()) return;
  }
}

TEST(CudaOpsErrors, AttentionShapes) {
  hm::cuda::RaggedBatch rb;
  rb.nseq = 1;
  rb.n_tokens = rb.max_len = 4;
  const hm::cuda::KvPool<bf16> pool{nullptr, nullptr, 64, 64 * 128};
  auto message = [&](int H, int G, int hd, int max_keys) -> std::string {
    try {
      hm::cuda::attention<bf16, bf16>(nullptr, 8, nullptr, 8, pool, rb, H, G, hd, max_keys, nullptr, nullptr);
    } catch (const hm::Error& e) {
      return e.what();
    }
    return "accepted";
  };
  // Every head_dim in [1, kMaxAnyHd] runs (48 on the plain float kernel); outside it is an error.
  EXPECT_NE(message(4, 2, 264, 10).find("head_dim"), std::string::npos) << message(4, 2, 264, 10);
  EXPECT_NE(message(4, 2, 0, 10).find("head_dim"), std::string::npos) << message(4, 2, 0, 10);
  EXPECT_NE(message(6, 4, 64, 10).find("n_kv_heads"), std::string::npos) << message(6, 4, 64, 10);
  EXPECT_NE(message(4, 2, 64, 65).find("max_keys"), std::string::npos) << message(4, 2, 64, 65);
  rb.max_len = 1;
  EXPECT_NE(message(32, 2, 64, 10).find("query heads per kv head"), std::string::npos) << message(32, 2, 64, 10);
}

}  // namespace
