// The CUDA backend (backend/cuda/) op by op against kernels/ref, in f32, bf16 and f16.
//
// Each case draws fresh random inputs at odd sizes, rounds them to the tested type and gives the
// reference the same values widened, reads inputs through column views of wider matrices
// (ld > cols), poisons outputs with NaN, and runs ragged batches (prefill mixes, a sequence of
// no rows, decode batches of one row each) in shuffled slots of a pool with unused slots.
// Bounds on max|got - ref| / max|ref|: f32 1e-5, f16 1e-3, bf16 8e-3 (outputs stored in the
// type), 1e-5 on the float recurrent state; copies and the conv state exact.
// Without a GPU the cases that need one are GTEST_SKIPped; the no-device error runs.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "cuda_test_util.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/ops.h"

namespace {

using hm::DType;
using hm::Tensor;

using hm::test::has_gpu;
using hm::test::rel_err;
using hm::test::tol;

constexpr double kStateTol = 1e-5;

#define EXPECT_CLOSE(err, bound, what) EXPECT_TRUE((err) <= (bound)) << what << ": error " << (err) << " over " << (bound)

// Values as stored in `t` (rounded to nearest even), widened back to float.
std::vector<float> rounded(std::vector<float> v, DType t) {
  std::vector<char> bytes(v.size() * hm::dtype_size(t));
  hm::convert_from_f32(bytes.data(), t, v.data(), v.size());
  hm::convert_to_f32(v.data(), bytes.data(), t, v.size());
  return v;
}

// A rows x ld matrix of `dtype` in the backend's memory; `f` holds its values widened to float.
struct Mat {
  hm::Buffer buf;
  Tensor t;
  std::vector<float> f;
  Mat(hm::Backend& be, DType dt, int rows, int ld, const std::function<double()>& draw)
      : buf(be, std::max<size_t>(1, size_t(rows) * size_t(ld) * hm::dtype_size(dt))),
        t(buf.data(), dt, rows, ld, ld), f(size_t(rows) * size_t(ld)) {
    for (auto& v : f) v = float(draw());
    f = rounded(f, dt);
    put(be);
  }
  void put(hm::Backend& be) {
    std::vector<char> bytes(f.size() * t.elem_size());
    hm::convert_from_f32(bytes.data(), t.dtype, f.data(), f.size());
    be.to_device(buf.data(), bytes.data(), bytes.size());
  }
  std::vector<float> get(hm::Backend& be) const {
    std::vector<char> bytes(f.size() * t.elem_size());
    be.to_host(bytes.data(), buf.data(), bytes.size());
    std::vector<float> out(f.size());
    hm::convert_to_f32(out.data(), bytes.data(), t.dtype, f.size());
    return out;
  }
  Tensor cols(int c0, int n) const { return t.cols_view(c0, n); }
};
std::function<double()> normal(hm::Rng& rng, double scale = 1, double mean = 0) {
  return [&rng, scale, mean] { return mean + scale * rng.normal(); };
}
std::function<double()> uniform(hm::Rng& rng, double lo, double hi) {
  return [&rng, lo, hi] { return lo + (hi - lo) * rng.uniform(); };
}
std::function<double()> poison() { return [] { return double(NAN); }; }

// An int32 array in the backend's memory.
struct Ints {
  hm::Buffer buf;
  Ints(hm::Backend& be, const std::vector<int32_t>& v) : buf(be, std::max<size_t>(4, v.size() * 4)) {
    be.to_device(buf.data(), v.data(), v.size() * 4);
  }
  const int32_t* p() const { return static_cast<const int32_t*>(buf.data()); }
};

// Sequence s gets lens[s] rows and a distinct shuffled slot of a pool of nseq + 3.
int fill_ragged(hm::Ragged& rg, hm::Rng& rng, const std::vector<int>& lens, int max_pos0) {
  const int n_slots = int(lens.size()) + 3;
  std::vector<int> all(size_t(n_slots), 0);
  std::iota(all.begin(), all.end(), 0);
  for (int i = n_slots - 1; i > 0; --i) std::swap(all[size_t(i)], all[rng.next_u64() % uint64_t(i + 1)]);
  rg.clear();
  for (size_t s = 0; s < lens.size(); ++s)
    rg.add(all[s], lens[s], max_pos0 > 0 ? int(rng.next_u64() % uint64_t(max_pos0 + 1)) : 0);
  return n_slots;
}

// Prefill mixes, a sequence of no rows, and decode batches (every sequence one row).
const std::vector<std::vector<int>> kBatches = {{1}, {7}, {333}, {5, 1, 333, 7, 64}, {2, 0, 130},
                                                {1, 1, 1, 1, 1}};

class CudaBackendOps : public ::testing::TestWithParam<DType> {
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

TEST_P(CudaBackendOps, RmsNorm) {
  hm::Rng rng(21);
  for (auto [n, d] : {std::pair{7, 333}, std::pair{1, 31}, std::pair{3, 2049}}) {
    Mat x(be(), T(), n, d, normal(rng, 2)), w(be(), T(), 1, d, normal(rng, 0.2, 1)), out(be(), T(), n, d, poison());
    be().rmsnorm(out.t, x.t, w.t, 1e-5f);
    std::vector<float> ref(out.f.size());
    hm::ref::rmsnorm(ref.data(), x.f.data(), w.f.data(), n, d, 1e-5f);
    EXPECT_CLOSE(rel_err(out.get(be()), ref, n, d, d), tol(T()), "rmsnorm n " << n << " d " << d);
  }
}

// y = x W^T through column views (odd offsets, so pointers are not 16-byte aligned), with and
// without accumulate, in the type and (bf16/f16) into float; cuBLASLt and its fallback.
TEST_P(CudaBackendOps, Linear) {
  hm::Rng rng(22);
  const std::vector<DType> outs = T() == DType::F32 ? std::vector<DType>{DType::F32}
                                                    : std::vector<DType>{T(), DType::F32};
  for (auto [m, n, k] : {std::tuple{1, 67, 130}, std::tuple{37, 129, 333}, std::tuple{5, 1000, 64},
                         std::tuple{64, 256, 512}, std::tuple{3, 5, 1}})
    for (DType ty : outs)
      for (bool acc : {false, true})
        for (bool fallback : {false, true}) {
          cuda_->set_linear_fallback_only(fallback);
          Mat x(be(), T(), m, k + 5, normal(rng)), W(be(), T(), n, k + 3, normal(rng, 0.1));
          Mat y(be(), ty, m, n + 7, normal(rng));
          be().linear(y.cols(2, n), x.cols(3, k), W.cols(1, k), acc);
          std::vector<float> Wd(size_t(n) * k), ref = y.f;
          for (int i = 0; i < n; ++i)
            std::copy_n(W.f.begin() + ptrdiff_t(i) * (k + 3) + 1, k, Wd.begin() + ptrdiff_t(i) * k);
          hm::ref::linear(ref.data() + 2, n + 7, x.f.data() + 3, k + 5, Wd.data(), m, n, k, acc);
          const std::vector<float> got = y.get(be());
          const double bound = ty == DType::F32 ? 1e-5 : tol(ty);
          EXPECT_CLOSE(rel_err(got, ref, m, n, n + 7, 2), bound,
                       "linear m " << m << " n " << n << " k " << k << " out " << hm::compute_dtype_name(ty)
                                   << " acc " << acc << " fallback " << fallback);
          for (int i = 0; i < m; ++i)  // the columns around the view are untouched
            for (int j : {0, 1, n + 2, n + 6}) EXPECT_EQ(got[size_t(i) * (n + 7) + j], y.f[size_t(i) * (n + 7) + j]);
        }
  cuda_->set_linear_fallback_only(false);
  // k = 0: an empty sum writes zeros (or leaves y when accumulating).
  Mat x(be(), T(), 4, 1, normal(rng)), W(be(), T(), 6, 1, normal(rng)), y(be(), T(), 4, 6, poison());
  be().linear(y.t, x.cols(0, 0), W.cols(0, 0), false);
  for (float v : y.get(be())) EXPECT_EQ(v, 0.0f);
}

// Batch-invariant mode: row i of y = x W^T has the same bits whatever m (1 to 2048) is, and is
// within the type's bound of the reference; also with odd n and k and the float-logits output.
// The default mode's differences are printed, not asserted.
TEST_P(CudaBackendOps, LinearBatchInvariant) {
  hm::Rng rng(29);
  const int M = 2048;
  const std::vector<int> ms = {1, 2, 7, 64, 65, 300, 1000, M};
  for (auto [n, k] : {std::pair{1536, 512}, std::pair{512, 1536}, std::pair{32000, 256}, std::pair{97, 333}})
    for (DType ty : T() == DType::F32 ? std::vector<DType>{DType::F32} : std::vector<DType>{T(), DType::F32}) {
      Mat x(be(), T(), M, k, normal(rng)), W(be(), T(), n, k, normal(rng, 0.05));
      for (bool inv : {false, true}) {
        be().set_batch_invariant(inv);
        std::vector<float> full;
        int differ = 0;
        for (auto it = ms.rbegin(); it != ms.rend(); ++it) {
          const int m = *it;
          Mat y(be(), ty, m, n, poison());
          be().linear(y.t, x.t.rows_view(0, m), W.t, false);
          std::vector<float> got = y.get(be());
          if (m == M) {
            full = got;
            if (inv) {  // the first 64 rows against the reference (all 2048 on the host: minutes)
              const int R = 64;
              std::vector<float> ref(size_t(R) * n);
              hm::ref::linear(ref.data(), n, x.f.data(), k, W.f.data(), R, n, k, false);
              EXPECT_CLOSE(rel_err(got, ref, R, n, n), ty == DType::F32 ? 1e-5 : tol(ty),
                           "invariant linear n " << n << " k " << k);
            }
            continue;
          }
          const bool same = std::memcmp(got.data(), full.data(), got.size() * sizeof(float)) == 0;
          differ += !same;
          if (inv) {
            EXPECT_TRUE(same) << "n " << n << " k " << k << " m " << m << " out " << hm::compute_dtype_name(ty);
          }
        }
        if (!inv)
          std::printf("linear %s -> %s n %d k %d, default mode: %d of %zu row counts differ from m %d\n",
                      hm::compute_dtype_name(T()), hm::compute_dtype_name(ty), n, k, differ, ms.size() - 1, M);
      }
      be().set_batch_invariant(false);
    }
}

TEST_P(CudaBackendOps, SwiGlu) {
  hm::Rng rng(23);
  const int n = 5, f = 333, ldgu = 2 * f + 3, ldo = f + 7;
  Mat gu(be(), T(), n, ldgu, normal(rng, 2)), out(be(), T(), n, ldo, poison());
  be().swiglu(out.cols(0, f), gu.cols(0, f), gu.cols(f, f));
  std::vector<float> ref(out.f.size());
  hm::ref::swiglu(ref.data(), ldo, gu.f.data(), gu.f.data() + f, ldgu, n, f);
  EXPECT_CLOSE(rel_err(out.get(be()), ref, n, f, ldo), tol(T()), "swiglu");
}

TEST_P(CudaBackendOps, Relu2) {
  hm::Rng rng(29);
  const int n = 5, f = 333, ldx = f + 3, ldo = f + 7;  // half the inputs negative
  Mat x(be(), T(), n, ldx, normal(rng, 2)), out(be(), T(), n, ldo, poison());
  be().relu2(out.cols(0, f), x.cols(0, f));
  std::vector<float> ref(out.f.size());
  hm::ref::relu2(ref.data(), ldo, x.f.data(), ldx, n, f);
  EXPECT_CLOSE(rel_err(out.get(be()), ref, n, f, ldo), tol(T()), "relu2");
}

TEST_P(CudaBackendOps, Embedding) {
  hm::Rng rng(24);
  const int V = 101, d = 77, n = 13;
  Mat table(be(), T(), V, d, normal(rng)), out(be(), T(), n, d, poison());
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& i : ids) i = int32_t(rng.next_u64() % V);
  Ints dids(be(), ids);
  be().embedding(out.t, table.t, dids.p());
  std::vector<float> ref(out.f.size());
  for (int i = 0; i < n; ++i)
    std::copy_n(table.f.begin() + ptrdiff_t(ids[size_t(i)]) * d, d, ref.begin() + ptrdiff_t(i) * d);
  EXPECT_EQ(rel_err(out.get(be()), ref, n, d, d), 0.0);
}

TEST_P(CudaBackendOps, Rope) {
  hm::Rng rng(25);
  const int heads = 3, hd = 10, ldx = heads * hd + 4;
  for (const auto& lens : kBatches) {
    hm::Ragged rg;
    fill_ragged(rg, rng, lens, 9000);
    rg.upload(be());
    Mat x(be(), T(), rg.n_tokens(), ldx, normal(rng));
    be().rope(x.cols(0, heads * hd), heads, hd, 10000.0f, rg);
    std::vector<float> ref = x.f;
    for (int s = 0; s < rg.nseq(); ++s)
      hm::ref::rope(ref.data() + size_t(rg.start(s)) * ldx, ldx, rg.len(s), heads, hd, rg.pos0(s), 10000.0f);
    const std::vector<float> got = x.get(be());
    EXPECT_CLOSE(rel_err(got, ref, rg.n_tokens(), heads * hd, ldx), tol(T()), "rope, lens[0] " << lens[0]);
    EXPECT_EQ(rel_err(got, ref, rg.n_tokens(), 4, ldx, heads * hd), 0.0) << "rope wrote the padding";
  }
}

// kBatches take the short tiles (fewer blocks of 32 rows than SMs); 3,033 tokens at E 600 take
// the tiles of 32 rows (282 or more blocks).
TEST_P(CudaBackendOps, Conv1dSilu) {
  hm::Rng rng(26);
  struct Case { std::vector<int> lens; int E, K; };
  std::vector<Case> cases;
  for (const auto& lens : kBatches)
    for (auto [E, K] : {std::pair{67, 4}, std::pair{100, 3}}) cases.push_back({lens, E, K});
  cases.push_back({{2900, 3, 130}, 600, 4});
  for (const auto& [lens, E, K] : cases) {
      hm::Ragged rg;
      const int n_slots = fill_ragged(rg, rng, lens, 0), Tn = rg.n_tokens();
      rg.upload(be());
      Mat xz(be(), T(), Tn, 2 * E, normal(rng)), w(be(), T(), E, K, uniform(rng, -0.5, 0.5));
      Mat b(be(), T(), 1, E, uniform(rng, -0.5, 0.5)), out(be(), T(), Tn, E + 3, poison());
      Mat st(be(), DType::F32, n_slots, E * (K - 1), normal(rng));
      const hm::StatePool pool{static_cast<float*>(st.buf.data()), n_slots, int64_t(E) * (K - 1)};
      be().conv1d_silu(out.cols(0, E), pool, xz.cols(0, E), w.t, b.t, rg);
      std::vector<float> ref(out.f.size()), ref_st = st.f;
      for (int s = 0; s < rg.nseq(); ++s)
        hm::ref::conv1d_silu(ref.data() + size_t(rg.start(s)) * (E + 3), E + 3,
                             ref_st.data() + size_t(rg.slot(s)) * E * (K - 1), xz.f.data() + size_t(rg.start(s)) * 2 * E,
                             2 * E, w.f.data(), b.f.data(), rg.len(s), E, K);
      EXPECT_CLOSE(rel_err(out.get(be()), ref, Tn, E, E + 3), tol(T()), "conv1d_silu E " << E << ", lens[0] " << lens[0]);
      EXPECT_EQ(rel_err(st.get(be()), ref_st, n_slots, E * (K - 1), E * (K - 1)), 0.0) << "conv state";
    }
}

// Batches of at most 256 tokens whose sequences are all <= 64 tokens take the short path at
// N <= 16 (selective_scan_short): its 16-token kernel ({7}, {1, 1, 1, 1, 1}, {16, 3}) and its
// 64-token one ({2, 0, 37, 64, 5}, {63}); the others, and N 33, the chunked passes.
TEST_P(CudaBackendOps, SelectiveScan) {
  hm::Rng rng(27);
  std::vector<std::vector<int>> batches = kBatches;
  batches.push_back({2, 0, 37, 64, 5});
  batches.push_back({63});
  batches.push_back({16, 3});
  for (const auto& lens : batches)
    for (auto [E, N] : {std::pair{67, 16}, std::pair{40, 5}, std::pair{130, 33}}) {
      hm::Ragged rg;
      const int n_slots = fill_ragged(rg, rng, lens, 0), Tn = rg.n_tokens();
      rg.upload(be());
      const int lddt = E + 2, ldbc = 2 * N + 3, ldy = E + 1;
      Mat xz(be(), T(), Tn, 2 * E, normal(rng)), dt(be(), T(), Tn, lddt, normal(rng, 0.5, -1));
      Mat dbc(be(), T(), Tn, ldbc, normal(rng)), dt_bias(be(), T(), 1, E, uniform(rng, -1, 0.5));
      Mat D(be(), T(), 1, E, normal(rng)), y(be(), T(), Tn, ldy, poison());
      Mat A(be(), DType::F32, E, N, [&rng] { return -std::exp(-1 + 2.5 * rng.uniform()); });
      Mat st(be(), DType::F32, n_slots, E * N, normal(rng, 0.5));
      const hm::StatePool pool{static_cast<float*>(st.buf.data()), n_slots, int64_t(E) * N};
      be().selective_scan(y.cols(0, E), pool, xz.cols(0, E), dt.cols(0, E), dt_bias.t,
                          static_cast<const float*>(A.buf.data()), dbc.cols(1, N), dbc.cols(1 + N, N), D.t,
                          xz.cols(E, E), rg);
      std::vector<float> ref(y.f.size()), ref_st = st.f;
      for (int s = 0; s < rg.nseq(); ++s) {
        const size_t t0 = size_t(rg.start(s));
        hm::ref::selective_scan(ref.data() + t0 * ldy, ldy, ref_st.data() + size_t(rg.slot(s)) * E * N,
                                xz.f.data() + t0 * 2 * E, 2 * E, dt.f.data() + t0 * lddt, lddt, dt_bias.f.data(),
                                A.f.data(), dbc.f.data() + t0 * ldbc + 1, dbc.f.data() + t0 * ldbc + 1 + N, ldbc,
                                D.f.data(), xz.f.data() + t0 * 2 * E + E, 2 * E, rg.len(s), E, N);
      }
      const std::string what = "selective_scan E " + std::to_string(E) + " N " + std::to_string(N) +
                               ", lens[0] " + std::to_string(lens[0]);
      EXPECT_CLOSE(rel_err(y.get(be()), ref, Tn, E, ldy), tol(T()), what);
      EXPECT_CLOSE(rel_err(st.get(be()), ref_st, n_slots, E * N, E * N), kStateTol, what << " state");
    }
}

// Mamba-2's scan: x | B | C as column views of one wide matrix (as the conv writes them), dt a
// column view, nonzero starting states in shuffled slots (the unused ones must stay as they
// were). Heads not a power of two, odd head_dim and d_state, groups 1 to 3, every d_state
// branch of the kernel (32, 64, 128, 256 states per channel), channel tiles of 16 cut inside a
// head (P 17), and time_step_limits that bind (dt_max 0.3 cuts about half of delta; dt_min 0.2
// lifts some) or are absent.
TEST_P(CudaBackendOps, SsdScan) {
  hm::Rng rng(32);
  struct Case { int H, P, G, N; float dt_min, dt_max; };
  const std::vector<Case> cases = {{6, 5, 2, 7, 0.0f, 0.3f}, {3, 16, 1, 33, 0.0f, INFINITY},
                                   {5, 17, 1, 128, 0.2f, 0.3f}, {6, 3, 3, 200, 0.0f, INFINITY}};
  for (const auto& lens : kBatches)
    for (const Case& c : cases) {
      hm::Ragged rg;
      const int n_slots = fill_ragged(rg, rng, lens, 0), Tn = rg.n_tokens();
      rg.upload(be());
      const int E = c.H * c.P, GN = c.G * c.N, ld = E + 2 * GN + 3, lddt = c.H + 2, ldy = E + 1;
      Mat xbc(be(), T(), Tn, ld, normal(rng)), dt(be(), T(), Tn, lddt, normal(rng, 0.5, -1));
      Mat dt_bias(be(), T(), 1, c.H, uniform(rng, -1, 0.5)), D(be(), T(), 1, c.H, normal(rng));
      Mat y(be(), T(), Tn, ldy, poison());
      Mat A(be(), DType::F32, 1, c.H, [&rng] { return -std::exp(-1 + 2.5 * rng.uniform()); });
      Mat st(be(), DType::F32, n_slots, E * c.N, normal(rng, 0.5));
      const hm::StatePool pool{static_cast<float*>(st.buf.data()), n_slots, int64_t(E) * c.N};
      be().ssd_scan(y.cols(0, E), pool, xbc.cols(1, E), dt.cols(1, c.H), dt_bias.t,
                    static_cast<const float*>(A.buf.data()), xbc.cols(1 + E, GN), xbc.cols(1 + E + GN, GN), D.t, c.H,
                    c.G, c.dt_min, c.dt_max, rg);
      std::vector<float> ref(y.f.size()), ref_st = st.f;
      for (int s = 0; s < rg.nseq(); ++s) {
        if (rg.len(s) == 0) continue;
        const size_t t0 = size_t(rg.start(s));
        const float* row = xbc.f.data() + t0 * ld;
        hm::ref::ssd_scan(ref.data() + t0 * ldy, ldy, ref_st.data() + size_t(rg.slot(s)) * E * c.N, row + 1, ld,
                          dt.f.data() + t0 * lddt + 1, lddt, dt_bias.f.data(), A.f.data(), row + 1 + E,
                          row + 1 + E + GN, ld, D.f.data(), rg.len(s), c.H, c.P, c.G, c.N, c.dt_min, c.dt_max);
      }
      const std::string what = "ssd_scan H " + std::to_string(c.H) + " P " + std::to_string(c.P) + " G " +
                               std::to_string(c.G) + " N " + std::to_string(c.N) + ", lens[0] " +
                               std::to_string(lens[0]);
      EXPECT_CLOSE(rel_err(y.get(be()), ref, Tn, E, ldy), tol(T()), what);
      EXPECT_CLOSE(rel_err(st.get(be()), ref_st, n_slots, E * c.N, E * c.N), kStateTol, what << " state");
    }
}

// The decode step continues a prefill: two sequences of L tokens at once equal `cut` prefilled
// and then one decode batch of one row per sequence for each token left, in every output and
// the final states, and the reference. At L 40 every call is the token kernel (the same float
// recurrence, so equal to rounding); at L 100 the whole prefill and the first 70 take the
// chunked form (ssd.cu: a sequence of 64+ tokens) and the steps the token kernel, so outputs
// agree to the dtype's rounding and states to float's.
TEST_P(CudaBackendOps, SsdScanPrefillThenDecode) {
  for (const auto& [L, cut] : {std::pair{40, 17}, std::pair{100, 70}}) {
    hm::Rng rng(33);
    const int H = 5, P = 9, G = 1, N = 24, E = H * P;
    const double same = L < 64 ? 1e-6 : tol(T()), same_state = L < 64 ? 1e-6 : kStateTol;
    // Sequence s's token t is row s * L + t of these.
    Mat x(be(), T(), 2 * L, E, normal(rng)), bc(be(), T(), 2 * L, 2 * G * N, normal(rng));
    Mat dt(be(), T(), 2 * L, H, normal(rng, 0.5, -1)), v(be(), T(), 1, H, uniform(rng, -1, 0.5));
    Mat A(be(), DType::F32, 1, H, [&rng] { return -std::exp(-1 + 2.5 * rng.uniform()); });
    const std::vector<float> st0 = Mat(be(), DType::F32, 2, E * N, normal(rng, 0.5)).f;
    // Tokens [t_begin, t_end) of both sequences in one call, from the state in st; y gets them.
    auto run = [&](Mat& st, std::vector<float>& y, int t_begin, int t_end) {
      const int n = t_end - t_begin;
      hm::Ragged rg;
      for (int s = 0; s < 2; ++s) rg.add(s, n, 0);
      rg.upload(be());
      Mat xb(be(), T(), 2 * n, E, poison()), bcb(be(), T(), 2 * n, 2 * G * N, poison());
      Mat dtb(be(), T(), 2 * n, H, poison()), yb(be(), T(), 2 * n, E, poison());
      for (int s = 0; s < 2; ++s) {
        const ptrdiff_t from = s * L + t_begin, to = s * n;
        std::copy_n(x.f.begin() + from * E, n * E, xb.f.begin() + to * E);
        std::copy_n(bc.f.begin() + from * 2 * G * N, n * 2 * G * N, bcb.f.begin() + to * 2 * G * N);
        std::copy_n(dt.f.begin() + from * H, n * H, dtb.f.begin() + to * H);
      }
      xb.put(be());
      bcb.put(be());
      dtb.put(be());
      const hm::StatePool pool{static_cast<float*>(st.buf.data()), 2, int64_t(E) * N};
      be().ssd_scan(yb.t, pool, xb.t, dtb.t, v.t, static_cast<const float*>(A.buf.data()), bcb.cols(0, G * N),
                    bcb.cols(G * N, G * N), v.t, H, G, 0.0f, 0.5f, rg);
      const std::vector<float> got = yb.get(be());
      for (int s = 0; s < 2; ++s)
        std::copy_n(got.begin() + ptrdiff_t(s) * n * E, n * E, y.begin() + (ptrdiff_t(s) * L + t_begin) * E);
    };
    Mat st_whole(be(), DType::F32, 2, E * N, poison()), st_steps(be(), DType::F32, 2, E * N, poison());
    st_whole.f = st_steps.f = st0;
    st_whole.put(be());
    st_steps.put(be());
    std::vector<float> y_whole(size_t(2 * L) * E, NAN), y_steps = y_whole;
    run(st_whole, y_whole, 0, L);
    run(st_steps, y_steps, 0, cut);
    for (int t = cut; t < L; ++t) run(st_steps, y_steps, t, t + 1);
    const std::vector<float> s_whole = st_whole.get(be());
    EXPECT_CLOSE(rel_err(y_steps, y_whole, 2 * L, E, E), same, "L " << L << " outputs, steps vs whole");
    EXPECT_CLOSE(rel_err(st_steps.get(be()), s_whole, 2, E * N, E * N), same_state,
                 "L " << L << " state, steps vs whole");
    std::vector<float> ref(size_t(2 * L) * E), ref_st = st0;
    for (int s = 0; s < 2; ++s) {
      const size_t r0 = size_t(s) * L;
      hm::ref::ssd_scan(ref.data() + r0 * E, E, ref_st.data() + size_t(s) * E * N, x.f.data() + r0 * E, E,
                        dt.f.data() + r0 * H, H, v.f.data(), A.f.data(), bc.f.data() + r0 * 2 * G * N,
                        bc.f.data() + r0 * 2 * G * N + G * N, 2 * G * N, v.f.data(), L, H, P, G, N, 0.0f, 0.5f);
    }
    EXPECT_CLOSE(rel_err(y_whole, ref, 2 * L, E, E), tol(T()), "L " << L << " whole vs ref");
    EXPECT_CLOSE(rel_err(s_whole, ref_st, 2, E * N, E * N), kStateTol, "L " << L << " state vs ref");
  }
}

// out = rmsnorm_per_group(y * silu(z)) * w, y and z column views of wider matrices (z from the
// same matrix, as in_proj's output holds it), groups smaller and larger than a block.
TEST_P(CudaBackendOps, GatedRmsNorm) {
  hm::Rng rng(34);
  for (auto [n, E, group] : {std::tuple{7, 48, 48}, std::tuple{5, 333, 111}, std::tuple{1, 2048, 256},
                             std::tuple{3, 1536, 1536}, std::tuple{4, 30, 3}}) {
    const int ld = 2 * E + 5, ldo = E + 3;
    Mat zy(be(), T(), n, ld, normal(rng, 1.5)), w(be(), T(), 1, E, normal(rng, 0.2, 1)), out(be(), T(), n, ldo, poison());
    be().gated_rmsnorm(out.cols(0, E), zy.cols(2 + E, E), zy.cols(1, E), w.t, group, 1e-5f);
    std::vector<float> ref(out.f.size());
    hm::ref::gated_rmsnorm(ref.data(), ldo, zy.f.data() + 2 + E, ld, zy.f.data() + 1, ld, w.f.data(), n, E, group,
                           1e-5f);
    const std::vector<float> got = out.get(be());
    EXPECT_CLOSE(rel_err(got, ref, n, E, ldo), tol(T()),
                 "gated_rmsnorm n " << n << " E " << E << " group " << group);
    for (int i = 0; i < n; ++i)  // the padding columns are untouched
      for (int j = E; j < ldo; ++j) EXPECT_TRUE(std::isnan(got[size_t(i) * ldo + j])) << "wrote padding";
  }
}

// kv_write then attention: prefill mixes continuing a cache, and decode batches over long caches.
// Each case twice: the two ops, then kv_attention (on a decode step with a bf16/f16 cache of
// the input type, the attention kernel reads the new rows and stores them itself); the pools
// and the output must come out the same way.
TEST_P(CudaBackendOps, KvWriteAttention) {
  hm::Rng rng(28);
  struct Case { std::vector<int> lens; int H, G, hd, max_ctx, max_pos0; };
  const std::vector<Case> cases = {{{5, 1, 70, 7}, 4, 2, 64, 256, 100}, {{33}, 2, 1, 32, 64, 0},
                                   {{2, 0, 65}, 8, 8, 128, 512, 300}, {{1, 1, 1}, 8, 1, 128, 3000, 2900},
                                   {{1, 0, 1, 1}, 4, 2, 64, 1200, 1100}, {{1}, 2, 2, 32, 16, 10},
                                   // head sizes the fast kernels do not take: prefill and decode
                                   {{5, 1, 40}, 4, 1, 48, 128, 60}, {{1, 1}, 6, 3, 80, 600, 500},
                                   {{3, 1}, 2, 1, 20, 64, 30}, {{2, 1}, 2, 2, 256, 48, 40}};
  int fused_runs = 0;
  for (DType kvt : {DType::F32, DType::BF16, DType::F16})
    for (const Case& c : cases)
      for (const bool composite : {false, true}) {
      hm::Ragged rg;
      const int n_slots = fill_ragged(rg, rng, c.lens, c.max_pos0), Tn = rg.n_tokens();
      rg.upload(be());
      const int row = c.G * c.hd, qw = c.H * c.hd, ld = qw + 2 * row + 8;
      // q, k, v inside one [T, (H + 2G) hd] matrix, as the projection writes them; values
      // representable in both types (the prefill kernel rounds q to the KV type).
      Mat qkv(be(), T(), Tn, ld, [&rng, kvt] { return rounded({float(rng.normal())}, kvt)[0]; });
      Mat kc(be(), kvt, n_slots, c.max_ctx * row, normal(rng)), vc(be(), kvt, n_slots, c.max_ctx * row, normal(rng));
      Mat out(be(), T(), Tn, qw + 5, poison());
      const hm::KvPool pool{kc.buf.data(), vc.buf.data(), kvt, n_slots, c.max_ctx, row, int64_t(c.max_ctx) * row};
      if (composite) {
        be().kv_attention(out.cols(0, qw), qkv.cols(0, qw), qkv.cols(qw, row), qkv.cols(qw + row, row), pool, c.H, c.G,
                          c.hd, rg);
        hm::cuda::RaggedBatch rb;
        rb.nseq = rg.nseq();
        rb.n_tokens = Tn;
        rb.max_len = rg.max_len();
        // The backend's rule: a 16-bit cache of the input type (f32 caches keep their exact kernel).
        fused_runs += kvt == T() && kvt != DType::F32 && hm::cuda::attention_writes_kv(rb, c.hd, true, true);
      } else {
        be().kv_write(pool, qkv.cols(qw, row), qkv.cols(qw + row, row), rg);
        be().attention(out.cols(0, qw), qkv.cols(0, qw), pool, c.H, c.G, c.hd, rg);
      }
      // What kv_write stores: the rows rounded to the KV type.
      const std::vector<float> kvals = rounded(qkv.f, kvt);
      std::vector<float> ek = kc.f, ev = vc.f, ref(out.f.size());
      for (int s = 0; s < rg.nseq(); ++s)
        for (int t = 0; t < rg.len(s); ++t)
          for (int j = 0; j < row; ++j) {
            const size_t at = size_t(rg.slot(s)) * c.max_ctx * row + size_t(rg.pos0(s) + t) * row + j;
            const size_t src = size_t(rg.start(s) + t) * ld + j;
            ek[at] = kvals[src + size_t(qw)];
            ev[at] = kvals[src + size_t(qw + row)];
          }
      const std::string what = std::string(composite ? "kv_attention " : "attention ") + hm::compute_dtype_name(kvt) + " KV, H " +
                               std::to_string(c.H) + " G " + std::to_string(c.G) + " hd " + std::to_string(c.hd) +
                               " lens[0] " + std::to_string(c.lens[0]);
      EXPECT_EQ(rel_err(kc.get(be()), ek, 1, int(ek.size()), 0), 0.0) << what << ": K pool";
      EXPECT_EQ(rel_err(vc.get(be()), ev, 1, int(ev.size()), 0), 0.0) << what << ": V pool";
      for (int s = 0; s < rg.nseq(); ++s) {
        const size_t base = size_t(rg.slot(s)) * c.max_ctx * row;
        hm::ref::attention(ref.data() + size_t(rg.start(s)) * (qw + 5), qw + 5, qkv.f.data() + size_t(rg.start(s)) * ld,
                           ld, ek.data() + base, ev.data() + base, rg.len(s), rg.pos0(s), c.H, c.G, c.hd);
      }
      EXPECT_CLOSE(rel_err(out.get(be()), ref, Tn, qw, qw + 5), std::max(tol(T()), tol(kvt)), what);
    }
  // bf16 and f16 inputs met their own cache type on the two decode cases of fast head sizes
  // ({1, 1, 1} at 128, {1} at 32): the fused kernel ran there.
  EXPECT_EQ(fused_runs, T() == DType::F32 ? 0 : 2);
}

// Views at odd columns (one element a thread) and at 4-aligned columns of a multiple of 4
// (4 elements a thread, 8- or 16-byte accesses).
TEST_P(CudaBackendOps, CopyAndAddRows) {
  hm::Rng rng(29);
  for (const bool vec : {false, true}) {
    const int cols = vec ? 516 : 21, n = 5, od = vec ? 4 : 1, os = vec ? 8 : 3, wd = vec ? 8 : 2, ws = vec ? 12 : 4;
    const std::vector<int32_t> di = {7, 0, 10, 3, 4}, si = {8, 8, 0, 2, 5};  // dst distinct, src repeats
    const std::vector<float> gate = {0.5f, -1.25f, 2.0f, 0.0f, 1.0f};
    Ints ddi(be(), di), dsi(be(), si);
    hm::Buffer dgate(be(), gate.size() * 4);
    be().to_device(dgate.data(), gate.data(), gate.size() * 4);
    for (bool use_di : {false, true})
      for (bool use_si : {false, true})
        for (int mode = 0; mode < 4; ++mode) {  // 0 copy, 1 add, 2 add with gates, 3 add with gates and scale
          Mat src(be(), T(), 9, cols + ws, normal(rng)), dst(be(), T(), 11, cols + wd, normal(rng));
          Mat scale(be(), T(), 1, cols, normal(rng, 0.3, 1));
          const int32_t* pd = use_di ? ddi.p() : nullptr;
          const int32_t* ps = use_si ? dsi.p() : nullptr;
          if (mode == 0)
            be().copy_rows(dst.cols(od, cols), pd, src.cols(os, cols), ps, n);
          else
            be().add_rows(dst.cols(od, cols), pd, src.cols(os, cols), ps, n,
                          mode >= 2 ? static_cast<const float*>(dgate.data()) : nullptr, mode == 3 ? scale.t : Tensor());
          std::vector<float> ref = dst.f;
          for (int i = 0; i < n; ++i) {
            const int d = use_di ? di[size_t(i)] : i, s = use_si ? si[size_t(i)] : i;
            for (int j = 0; j < cols; ++j) {
              float& r = ref[size_t(d) * (cols + wd) + od + j];
              const float v = src.f[size_t(s) * (cols + ws) + os + j];
              r = mode == 0 ? v : r + v * (mode == 3 ? scale.f[size_t(j)] : 1.0f) * (mode >= 2 ? gate[size_t(i)] : 1.0f);
            }
          }
          ref = rounded(ref, T());
          const double bound = mode == 0 ? 0.0 : tol(T());
          EXPECT_CLOSE(rel_err(dst.get(be()), ref, 11, cols + wd, cols + wd), bound,
                       "rows cols " << cols << " mode " << mode << " dst_idx " << use_di << " src_idx " << use_si);
        }
  }
}

// Bad shapes and types are hm::Errors naming the op and the value, before anything is enqueued.
TEST_P(CudaBackendOps, Errors) {
  hm::Rng rng(30);
  auto expect_error = [](const std::function<void()>& f, const std::string& part) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one containing '" << part << "'";
    } catch (const hm::Error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  const DType other = T() == DType::F32 ? DType::BF16 : DType::F32;
  Mat a(be(), T(), 4, 8, normal(rng)), b(be(), T(), 4, 8, normal(rng)), o(be(), other, 4, 8, normal(rng));
  Mat c(be(), T(), 4, 9, normal(rng)), w84(be(), T(), 8, 4, normal(rng));
  expect_error([&] { be().linear(a.t, a.t, b.cols(0, 7), false); }, "cuda linear: W is [4, 7], expected [4, 8]");
  if (T() == DType::F32)
    expect_error([&] { be().linear(o.cols(0, 4), a.t, b.t, false); }, "cuda linear: y is bf16, expected f32");
  expect_error([&] { be().rmsnorm(a.cols(0, 4), a.cols(0, 4), Tensor::vec(b.t.data, T(), 4), 1e-5f); },
               "must be dense");
  expect_error([&] { be().swiglu(a.cols(0, 4), a.cols(0, 4), c.cols(0, 4)); }, "share a row stride");
  expect_error([&] { be().swiglu(o.cols(0, 4), a.cols(0, 4), a.cols(4, 4)); }, "cuda swiglu: out is");
  hm::Ragged rg;
  rg.add(0, 4, 0);
  rg.upload(be());
  Mat st(be(), DType::F32, 1, 8 * 64, normal(rng));
  const hm::StatePool pool{static_cast<float*>(st.buf.data()), 1, 8 * 8};
  Mat wide(be(), T(), 8, 9, normal(rng));
  expect_error([&] { be().conv1d_silu(a.t, pool, a.t, wide.t, Tensor::vec(b.t.data, T(), 8), rg); },
               "d_conv must be in [2, 8], got 9");
  Mat big(be(), T(), 4, 2 * 65, normal(rng));
  expect_error([&] {
    be().selective_scan(a.t, pool, a.t, a.t, Tensor::vec(b.t.data, T(), 8), static_cast<const float*>(st.buf.data()),
                        big.cols(0, 65), big.cols(65, 65), Tensor::vec(b.t.data, T(), 8), a.t, rg);
  }, "d_state must be in [1, 64], got 65");
  expect_error([&] {
    be().selective_scan(a.t, pool, a.t, a.t, Tensor::vec(b.t.data, T(), 8), static_cast<const float*>(st.buf.data()),
                        a.cols(0, 4), c.cols(0, 4), Tensor::vec(b.t.data, T(), 8), a.t, rg);
  }, "B and C must share a row stride");
  hm::Ragged bad_slot;
  bad_slot.add(3, 4, 0);
  bad_slot.upload(be());
  const hm::StatePool pool16{static_cast<float*>(st.buf.data()), 1, 8 * 3};
  // ssd_scan: 8 columns in 3 heads; B and C with different strides; d_state past the kernels'.
  Mat dt2(be(), T(), 4, 2, normal(rng)), wide2(be(), T(), 4, 2 * 257, normal(rng));
  const float* fA = static_cast<const float*>(st.buf.data());
  const Tensor h2 = Tensor::vec(b.t.data, T(), 2);
  expect_error([&] { be().ssd_scan(a.t, pool, a.t, dt2.t, h2, fA, a.cols(0, 4), a.cols(4, 4), h2, 3, 1, 0, 1, rg); },
               "cuda ssd_scan: 3 heads in 1 groups do not fit x's 8 columns");
  expect_error([&] { be().ssd_scan(a.t, pool, a.t, dt2.t, h2, fA, a.cols(0, 4), c.cols(0, 4), h2, 2, 1, 0, 1, rg); },
               "cuda ssd_scan: B and C must share a row stride");
  expect_error([&] {
    be().ssd_scan(a.t, pool, a.t, dt2.t, h2, fA, wide2.cols(0, 257), wide2.cols(257, 257), h2, 2, 1, 0, 1, rg);
  }, "cuda ssd_scan: d_state must be in [1, 256], got 257");
  expect_error([&] { be().ssd_scan(a.t, pool16, a.t, dt2.t, h2, fA, a.cols(0, 4), a.cols(4, 4), h2, 2, 1, 0, 1, rg); },
               "cuda ssd_scan: the state pool's slot stride is 24, the kernels need 32");
  expect_error([&] { be().gated_rmsnorm(a.t, a.t, b.t, Tensor::vec(b.t.data, T(), 8), 3, 1e-5f); },
               "cuda gated_rmsnorm: group 3 does not divide y's 8 columns");
  expect_error([&] { be().gated_rmsnorm(o.t, a.t, b.t, Tensor::vec(b.t.data, T(), 8), 4, 1e-5f); },
               "cuda gated_rmsnorm: out is");
  expect_error([&] { be().conv1d_silu(a.t, pool16, a.t, w84.t, Tensor::vec(b.t.data, T(), 8), bad_slot); },
               "sequence 0 has slot 3, the pool has 1");
  // Attention: the KV pool's type, head_dim, positions past the cache.
  hm::Buffer kv(be(), 2 * 16 * 64 * 2);
  const hm::KvPool i32kv{kv.data(), kv.data(), DType::I32, 1, 4, 64, 4 * 64};
  const hm::KvPool p16{kv.data(), static_cast<char*>(kv.data()) + 16 * 64 * 2, DType::F16, 1, 16, 64, 16 * 64};
  Mat q(be(), T(), 4, 64, normal(rng));
  expect_error([&] { be().kv_write(i32kv, q.t, q.t, rg); }, "the KV cache must be f32, bf16 or f16, got");
  expect_error([&] { be().attention(q.t, q.t, p16, 1, 1, 300, rg); }, "head_dim must be in [1, 256], got 300");
  hm::Ragged late;
  late.add(0, 4, 14);
  late.upload(be());
  expect_error([&] { be().kv_write(p16, q.t, q.t, late); }, "writes positions 14..17 outside the cache of 16");
  expect_error([&] { be().attention(q.t, q.t, p16, 1, 1, 64, late); }, "reads positions up to 17 of a cache of 16");
  be().synchronize();
}

// Growing the op workspace inside a stream capture is an error (a captured graph would name
// memory that is then replaced); reserved beforehand, the same op captures.
TEST_P(CudaBackendOps, WorkspaceUnderCapture) {
  hm::Rng rng(31);
  const int E = 67, N = 16, L = 2049;
  hm::Ragged rg;
  rg.add(0, L, 0);
  rg.upload(be());
  Mat x(be(), T(), L, E, normal(rng)), dt(be(), T(), L, E, normal(rng, 0.5, -1)), bc(be(), T(), L, 2 * N, normal(rng));
  Mat v(be(), T(), 1, E, normal(rng)), y(be(), T(), L, E, poison());
  Mat A(be(), DType::F32, E, N, [] { return -1.0; }), st(be(), DType::F32, 1, E * N, normal(rng));
  const hm::StatePool pool{static_cast<float*>(st.buf.data()), 1, int64_t(E) * N};
  auto scan = [&] {
    be().selective_scan(y.t, pool, x.t, dt.t, v.t, static_cast<const float*>(A.buf.data()), bc.cols(0, N),
                        bc.cols(N, N), v.t, x.t, rg);
  };
  be().synchronize();
  ASSERT_EQ(cuda_->workspace_bytes(), 0u);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(cuda_->stream(), cudaStreamCaptureModeRelaxed), cudaSuccess);
  EXPECT_THROW(scan(), hm::Error);
  ASSERT_EQ(cudaStreamEndCapture(cuda_->stream(), &graph), cudaSuccess);
  if (graph) cudaGraphDestroy(graph);
  scan();  // outside a capture it grows the workspace itself
  be().synchronize();
  const size_t grown = cuda_->workspace_bytes();
  EXPECT_GT(grown, 0u);
  ASSERT_EQ(cudaStreamBeginCapture(cuda_->stream(), cudaStreamCaptureModeRelaxed), cudaSuccess);
  scan();
  ASSERT_EQ(cudaStreamEndCapture(cuda_->stream(), &graph), cudaSuccess);
  ASSERT_NE(graph, nullptr);
  cudaGraphDestroy(graph);
  EXPECT_EQ(cuda_->workspace_bytes(), grown);
}

INSTANTIATE_TEST_SUITE_P(Types, CudaBackendOps, ::testing::Values(DType::F32, DType::BF16, DType::F16),
                         [](const ::testing::TestParamInfo<DType>& i) { return std::string(hm::compute_dtype_name(i.param)); });

TEST(CudaBackend, DeviceOrClearError) {
  if (!has_gpu()) {
    EXPECT_FALSE(hm::cuda_available_impl());
    try {
      hm::make_cuda_backend();
      ADD_FAILURE() << "make_cuda_backend without a device did not throw";
    } catch (const hm::Error& e) {
      EXPECT_NE(std::string(e.what()).find("cudaGetDeviceCount"), std::string::npos) << e.what();
    }
    return;
  }
  EXPECT_TRUE(hm::cuda_available_impl());
  auto be = hm::make_cuda_backend();
  EXPECT_EQ(be->device(), hm::Device::CUDA);
  EXPECT_EQ(be->default_dtype(), DType::BF16);
  for (DType t : {DType::F32, DType::BF16, DType::F16}) EXPECT_TRUE(be->supports(t));
  EXPECT_FALSE(be->supports(DType::I32));
  EXPECT_TRUE(be->supports_kv(DType::F32) && be->supports_kv(DType::BF16) && be->supports_kv(DType::F16));
  EXPECT_FALSE(be->supports_kv(DType::I32));
  // Memory round trip through copy and memzero on the stream.
  std::vector<int32_t> h(1000), back(1000, -1);
  std::iota(h.begin(), h.end(), 7);
  hm::Buffer a(*be, 4000), b(*be, 4000);
  be->to_device(a.data(), h.data(), 4000);
  be->copy(b.data(), a.data(), 4000);
  be->memzero(a.data(), 2000);
  be->to_host(back.data(), b.data(), 4000);
  EXPECT_EQ(back, h);
  be->to_host(back.data(), a.data(), 4000);
  EXPECT_EQ(std::count(back.begin(), back.begin() + 500, 0), 500);
  EXPECT_EQ(back[500], 507);
  // An allocation past the device's memory names the size.
  try {
    be->alloc(size_t(1) << 50);
    ADD_FAILURE() << "a 1 PiB cudaMalloc succeeded";
  } catch (const hm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("1125899906842624 bytes"), std::string::npos) << e.what();
  }
}

// copy_many (the copy_spans kernel, 128 spans a launch) gives what one copy per span gives:
// spans of odd sizes and offsets (byte copies), 4-byte ones, and 16-byte aligned ones up to 40 KB
// (several blocks a span), some empty, from two sources into disjoint places of a buffer, one
// source zeroed by an op queued just before (stream order: the copies must see it), on fresh
// random bytes.
TEST(CudaBackend, CopyManyEqualsOneCopyPerSpan) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  auto be = hm::make_cuda_backend();
  std::mt19937 rng(1234);
  const size_t n = 3000003;
  std::vector<uint8_t> h0(n), h1(n), want(n), got(n);
  for (auto* v : {&h0, &h1, &want})
    for (auto& x : *v) x = uint8_t(rng());
  hm::Buffer s0(*be, n), s1(*be, n), dst(*be, n), ref(*be, n);
  be->to_device(s0.data(), h0.data(), n);
  be->to_device(s1.data(), h1.data(), n);
  be->to_device(dst.data(), want.data(), n);
  be->to_device(ref.data(), want.data(), n);
  be->memzero(s1.data(), 13);  // queued before the copies: they read the zeros
  std::fill(h1.begin(), h1.begin() + 13, uint8_t(0));
  std::vector<hm::Backend::CopySpan> spans;
  size_t at = 0;
  for (int i = 0; at < n; ++i) {
    const size_t align = i % 3 == 0 ? 16 : i % 3 == 1 ? 4 : 1;  // the kernel's three word sizes
    at = (at + align - 1) / align * align;
    if (at >= n) break;
    const size_t most = align == 16 ? 40000 : 997;
    size_t len = std::min<size_t>(i % 7 == 3 ? 0 : 1 + rng() % most, n - at) / align * align;
    const size_t from = (rng() % (n - len + 1)) / align * align;
    const uint8_t* src = static_cast<const uint8_t*>(i % 2 ? s1.data() : s0.data()) + from;
    spans.push_back({static_cast<uint8_t*>(dst.data()) + at, src, len});
    std::memcpy(want.data() + at, (i % 2 ? h1.data() : h0.data()) + from, len);
    be->copy(static_cast<uint8_t*>(ref.data()) + at, src, len);
    at += len + rng() % 5;  // gaps keep the bytes between spans
  }
  ASSERT_GT(spans.size(), 300u);  // three launches
  be->copy_many(spans);
  be->to_host(got.data(), dst.data(), n);
  EXPECT_EQ(got, want);
  be->to_host(got.data(), ref.data(), n);
  EXPECT_EQ(got, want);
  be->copy_many({});  // nothing to do
}

// Blocks come from a stream-ordered pool: a free does not wait for the stream, a freed block is
// reused, a free during a capture is held until the capture ends, an alloc during one is an
// error (it would become a graph node), and the accounting follows.
TEST(CudaBackend, PooledAllocFreeAndCapture) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  auto be = hm::make_cuda_backend();
  const size_t base = be->allocated_bytes();
  std::vector<float> h(4096), back(4096);
  for (size_t i = 0; i < h.size(); ++i) h[i] = float(i) * 0.5f;
  void* a = be->alloc(h.size() * 4);
  be->to_device(a, h.data(), h.size() * 4);
  void* b = be->alloc(h.size() * 4);
  be->copy(b, a, h.size() * 4);
  be->free(a);  // queued after the copy that reads it
  void* c = be->alloc(h.size() * 4);
  be->memzero(c, h.size() * 4);
  be->to_host(back.data(), b, h.size() * 4);
  EXPECT_EQ(back, h);
  EXPECT_EQ(be->allocated_bytes(), base + 2 * h.size() * 4);
  be->begin_capture();
  be->memzero(b, 16);  // one node, so the graph is not empty (not replayed)
  be->free(c);         // deferred
  bool threw = false;
  try {
    be->alloc(64);
  } catch (const hm::Error& e) {
    threw = true;
    EXPECT_NE(std::string(e.what()).find("captured"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(threw) << "alloc during a capture did not throw";
  auto g = be->end_capture();
  EXPECT_EQ(be->allocated_bytes(), base + h.size() * 4);
  be->free(b);
  be->synchronize();
  EXPECT_EQ(be->allocated_bytes(), base);
}

}  // namespace
