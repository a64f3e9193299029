// Mamba-2 (SSD) layers: the chunked CPU scan and the gated RMSNorm against kernels/ref at odd
// sizes, with state carried across ragged calls; whole models against a from-scratch double
// reference written here from the paper's recurrence (no code shared with kernels/ref); prefill
// = chunks = token by token; mixed Mamba / Mamba-2 / attention stacks; config and training refusals.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/counting_backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "kernels/ops.h"
#include "model/config.h"
#include "model/memory_estimate.h"
#include "model/model.h"
#include "runtime/memory.h"
#include "test_util.h"
#include "train/model_grad.h"

namespace hm {
namespace {

std::vector<float> randv(Rng& rng, size_t n, double scale, double shift = 0) {
  std::vector<float> v(n);
  for (float& x : v) x = float(shift + scale * rng.normal());
  return v;
}

double max_rel(const std::vector<float>& a, const std::vector<float>& b) { return test::rel_err(a, b); }

// One SSD problem: x [L, H*P] (row stride ldx), dt [L, H], B|C [L, 2*G*N] (one row stride).
struct Ssd {
  int L, H, P, G, N, ldx, lddt, ldbc, ldy;
  std::vector<float> x, dt, bc, dt_bias, A, D, state;
  Ssd(Rng& rng, int L_, int H_, int P_, int G_, int N_) : L(L_), H(H_), P(P_), G(G_), N(N_) {
    ldx = H * P + 3;
    lddt = H + 2;
    ldbc = 2 * G * N + 1;
    ldy = H * P + 5;
    x = randv(rng, size_t(L) * ldx, 1.0);
    dt = randv(rng, size_t(L) * lddt, 1.0, -1.0);
    bc = randv(rng, size_t(L) * ldbc, 0.5);
    dt_bias = randv(rng, size_t(H), 0.5);
    A.resize(size_t(H));
    for (float& a : A) a = -float(std::exp(0.2 + 2.5 * rng.uniform()));  // -exp(A_log), A_log in [0.2, 2.7]
    D = randv(rng, size_t(H), 0.5, 1.0);
    state = randv(rng, size_t(H) * P * N, 0.3);
  }
  // Runs tokens [t0, t0 + n) through `scan` on state s, writing y rows t0.. of out.
  template <class F>
  void run(F scan, std::vector<float>& out, std::vector<float>& s, int t0, int n, float lo, float hi) const {
    scan(out.data() + size_t(t0) * ldy, ldy, s.data(), x.data() + size_t(t0) * ldx, ldx,
         dt.data() + size_t(t0) * lddt, lddt, dt_bias.data(), A.data(), bc.data() + size_t(t0) * ldbc,
         bc.data() + size_t(t0) * ldbc + G * N, ldbc, D.data(), n, H, P, G, N, lo, hi);
  }
};

}  // namespace

TEST(KernelsSsdScan, ChunkedMatchesRecurrence) {
  Rng rng(11);
  // Odd sizes; lengths below, at and across the CPU kernel's 64-token chunks and its switch to
  // the one-step recurrence; one group and several; a clamp that binds and none.
  for (int L : {1, 2, 5, 31, 64, 65, 130, 203})
    for (auto [H, P, G, N] : {std::array<int, 4>{1, 1, 1, 1}, {6, 5, 3, 7}, {4, 16, 1, 16}, {8, 3, 2, 33}})
      for (bool clamp : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "L " << L << " H " << H << " P " << P << " G " << G << " N " << N);
        const Ssd p(rng, L, H, P, G, N);
        const float lo = clamp ? 0.2f : 0.0f, hi = clamp ? 0.9f : INFINITY;
        std::vector<float> y_ref(size_t(L) * p.ldy, 7.0f), y_cpu = y_ref, s_ref = p.state, s_cpu = p.state;
        p.run(ref::ssd_scan, y_ref, s_ref, 0, L, lo, hi);
        p.run(cpu::ssd_scan, y_cpu, s_cpu, 0, L, lo, hi);
        EXPECT_LT(max_rel(y_cpu, y_ref), 2e-5);
        EXPECT_LT(max_rel(s_cpu, s_ref), 2e-5);
        // Padding columns of y are untouched.
        for (int t = 0; t < L; ++t) EXPECT_EQ(y_cpu[size_t(t) * p.ldy + H * P], 7.0f);
      }
}

TEST(KernelsSsdScan, ClampChangesTheResult) {
  // The clamp is applied (a kernel that ignored time_step_limit would pass the test above only
  // through its reference; here the clamped and unclamped answers must differ).
  Rng rng(12);
  const Ssd p(rng, 40, 4, 4, 2, 8);
  std::vector<float> a(size_t(40) * p.ldy), b = a, sa = p.state, sb = p.state;
  p.run(cpu::ssd_scan, a, sa, 0, 40, 0.0f, INFINITY);
  p.run(cpu::ssd_scan, b, sb, 0, 40, 0.3f, 0.5f);
  EXPECT_GT(max_rel(a, b), 1e-2);
}

TEST(KernelsSsdScan, StateCarriesAcrossRaggedCalls) {
  // One call = pieces of ragged lengths (chunk boundaries falling anywhere) = token by token.
  Rng rng(13);
  const int L = 157;
  const Ssd p(rng, L, 6, 8, 3, 12);
  std::vector<float> y_one(size_t(L) * p.ldy), s_one = p.state;
  p.run(cpu::ssd_scan, y_one, s_one, 0, L, 0.0f, INFINITY);
  std::vector<float> y_ref(size_t(L) * p.ldy), s_ref = p.state;
  p.run(ref::ssd_scan, y_ref, s_ref, 0, L, 0.0f, INFINITY);
  std::vector<float> y_pieces(size_t(L) * p.ldy), s_pieces = p.state;
  int t = 0;
  for (int n : {3, 70, 1, 64, 19}) {
    p.run(cpu::ssd_scan, y_pieces, s_pieces, t, n, 0.0f, INFINITY);
    t += n;
  }
  ASSERT_EQ(t, L);
  std::vector<float> y_steps(size_t(L) * p.ldy), s_steps = p.state;
  for (int i = 0; i < L; ++i) p.run(cpu::ssd_scan, y_steps, s_steps, i, 1, 0.0f, INFINITY);
  EXPECT_LT(max_rel(y_pieces, y_ref), 2e-5);
  EXPECT_LT(max_rel(s_pieces, s_ref), 2e-5);
  EXPECT_LT(max_rel(y_steps, y_ref), 2e-5);
  EXPECT_LT(max_rel(s_steps, s_ref), 2e-5);
  EXPECT_LT(max_rel(y_one, y_ref), 2e-5);
}

TEST(KernelsGatedRmsnorm, MatchesReference) {
  Rng rng(14);
  for (auto [n, E, group] : {std::array<int, 3>{1, 1, 1}, {3, 12, 12}, {5, 12, 4}, {7, 96, 32}, {300, 64, 16}}) {
    const int ldy = E + 3, ldz = E + 1, ldo = E + 2;
    const auto y = randv(rng, size_t(n) * ldy, 1.0), z = randv(rng, size_t(n) * ldz, 1.5);
    const auto w = randv(rng, size_t(E), 0.2, 1.0);
    std::vector<float> o_ref(size_t(n) * ldo, 3.0f), o_cpu = o_ref;
    ref::gated_rmsnorm(o_ref.data(), ldo, y.data(), ldy, z.data(), ldz, w.data(), n, E, group, 1e-5f);
    cpu::gated_rmsnorm(o_cpu.data(), ldo, y.data(), ldy, z.data(), ldz, w.data(), n, E, group, 1e-5f);
    EXPECT_LT(max_rel(o_cpu, o_ref), 1e-6) << n << " " << E << " " << group;
    // Each group is normalized on its own: a group's output has RMS 1 before w.
    for (int j0 = 0; j0 < E; j0 += group) {
      double ss = 0;
      for (int j = j0; j < j0 + group; ++j) ss += std::pow(double(o_ref[size_t(j)]) / w[size_t(j)], 2);
      double yz = 0;  // (a plain loop: clang 14 cannot capture a structured binding in a lambda)
      for (int j = j0; j < j0 + group; ++j) yz += std::fabs(y[size_t(j)] * z[size_t(j)]);
      if (yz > 1e-3) {
        EXPECT_NEAR(ss / group, 1.0, 1e-2);
      }
    }
  }
}

namespace {

// ---- A whole Mamba-2 model from scratch, in double: the paper's recurrence per head ----------
// h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t + D x_t, with dt_t =
// clamp(softplus(dt_raw + dt_bias)); B_t, C_t of the head's group; x, B, C from a causal
// depthwise conv + SiLU over in_proj's xBC; then g = y * silu(z), RMS-normalized per group.
using Mat = std::vector<double>;

double silu(double v) { return v / (1 + std::exp(-v)); }

Mat rms(const Mat& x, int T, int D, const float* w, double eps) {
  Mat o(x.size());
  for (int t = 0; t < T; ++t) {
    double ss = 0;
    for (int j = 0; j < D; ++j) ss += x[size_t(t) * D + j] * x[size_t(t) * D + j];
    const double r = 1 / std::sqrt(ss / D + eps);
    for (int j = 0; j < D; ++j) o[size_t(t) * D + j] = x[size_t(t) * D + j] * r * w[j];
  }
  return o;
}

Mat matmul_t(const Mat& x, int T, int in, const float* W, int out) {  // x [T, in] . W[out, in]^T
  Mat y(size_t(T) * out, 0.0);
  for (int t = 0; t < T; ++t)
    for (int o = 0; o < out; ++o) {
      double a = 0;
      for (int i = 0; i < in; ++i) a += x[size_t(t) * in + i] * W[size_t(o) * in + i];
      y[size_t(t) * out + o] = a;
    }
  return y;
}

// Logits [T, V] of one sequence from position 0.
Mat reference_logits(const ModelConfig& c, const Params& p, const std::vector<int32_t>& toks) {
  const int T = int(toks.size()), D = c.d_model, E = c.d_inner(), N = c.d_state, K = c.d_conv;
  const int G = c.mamba2_groups, Pd = c.mamba2_head_dim, H = E / Pd, CD = E + 2 * G * N;
  const int group = c.mamba2_norm_per_group ? E / G : E;
  Mat h(size_t(T) * D);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < D; ++j) h[size_t(t) * D + j] = p.embeddings()[size_t(toks[size_t(t)]) * D + j];
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& w = p.layer(l);
    EXPECT_TRUE(c.is_mamba2(l));
    const Mat u = rms(h, T, D, w.norm, c.norm_eps);
    const int R = 2 * E + 2 * G * N + H;
    const Mat proj = matmul_t(u, T, D, w.in_proj, R);  // z | x B C | dt
    Mat xbc(size_t(T) * CD);
    for (int ch = 0; ch < CD; ++ch)
      for (int t = 0; t < T; ++t) {
        double a = w.conv_b[ch];
        for (int k = 0; k < K; ++k) {  // tap k sees input t - (K-1) + k; zero before the sequence
          const int s = t - (K - 1) + k;
          if (s >= 0) a += w.conv_w[size_t(ch) * K + k] * proj[size_t(s) * R + E + ch];
        }
        xbc[size_t(t) * CD + ch] = silu(a);
      }
    Mat y(size_t(T) * E);
    for (int hd = 0; hd < H; ++hd) {
      const int g = hd / (H / G);
      const double A = -std::exp(double(w.A_log[hd]));
      Mat st(size_t(Pd) * N, 0.0);
      for (int t = 0; t < T; ++t) {
        double dt = proj[size_t(t) * R + E + CD + hd] + w.dt_b[hd];
        dt = dt > 20 ? dt : std::log1p(std::exp(dt));
        dt = std::min(std::max(dt, double(c.mamba2_dt_min)), double(c.mamba2_dt_max));
        for (int pp = 0; pp < Pd; ++pp) {
          const double xv = xbc[size_t(t) * CD + hd * Pd + pp];
          double acc = 0;
          for (int n = 0; n < N; ++n) {
            const double Bn = xbc[size_t(t) * CD + E + g * N + n], Cn = xbc[size_t(t) * CD + E + G * N + g * N + n];
            double& s = st[size_t(pp) * N + n];
            s = std::exp(dt * A) * s + dt * xv * Bn;
            acc += s * Cn;
          }
          y[size_t(t) * E + hd * Pd + pp] = acc + w.Dskip[hd] * xv;
        }
      }
    }
    Mat gn(size_t(T) * E);
    for (int t = 0; t < T; ++t)
      for (int j0 = 0; j0 < E; j0 += group) {
        double ss = 0;
        for (int j = j0; j < j0 + group; ++j) {
          const double v = y[size_t(t) * E + j] * silu(proj[size_t(t) * R + j]);
          gn[size_t(t) * E + j] = v;
          ss += v * v;
        }
        const double r = 1 / std::sqrt(ss / group + c.norm_eps);
        for (int j = j0; j < j0 + group; ++j) gn[size_t(t) * E + j] *= r * w.ssm_norm[j];
      }
    const Mat out = matmul_t(gn, T, E, w.out_proj, D);
    for (size_t i = 0; i < h.size(); ++i) h[i] += out[i];
  }
  return matmul_t(rms(h, T, D, p.norm_f(), c.norm_eps), T, D, p.lm_head(), c.vocab_size);
}

ModelConfig mamba2_config(int groups, bool per_group) {
  ModelConfig c;
  c.d_model = 24;
  c.n_layers = 3;
  c.attention_layers = {};
  c.mamba2_layers = {0, 1, 2};
  c.vocab_size = 97;
  c.d_state = 6;
  c.d_conv = 4;
  c.expand = 2;           // d_inner 48
  c.mamba2_head_dim = 8;  // 6 heads
  c.mamba2_groups = groups;
  c.mamba2_norm_per_group = per_group;
  c.state_bridges = false;
  c.d_ff = 0;
  c.n_heads = 4;
  c.n_kv_heads = 4;
  return c;
}

using test::forward_all;

std::vector<float> to_float(const Mat& m) { return std::vector<float>(m.begin(), m.end()); }

}  // namespace

TEST(Mamba2Model, MatchesFromScratchReference) {
  // Random weights off their init (norms, A_log, D perturbed); 150 tokens cross the CPU scan's
  // 64-token chunks. Groups 1 and 3 (6 heads: 2 per group), norm per group and over all d_inner,
  // a time_step_limit that binds.
  Rng rng(21);
  const std::vector<int32_t> toks = test::tokens(rng, 150, 97);
  for (int G : {1, 3})
    for (bool per_group : {true, false}) {
      SCOPED_TRACE(::testing::Message() << "groups " << G << " norm per group " << per_group);
      ModelConfig c = mamba2_config(G, per_group);
      if (G == 3) {
        c.mamba2_dt_min = 0.01f;
        c.mamba2_dt_max = 0.08f;
      }
      auto cpu = make_cpu_backend();
      HybridModel m(c, *cpu);
      test::randomize_params(m, 5 + uint64_t(G));
      const Mat want = reference_logits(c, m.params(), toks);
      const double e = max_rel(forward_all(m, toks), to_float(want));
      std::printf("mamba2 G=%d norm_per_group=%d: max|cpu - double reference| / max|ref| = %.3g\n", G,
                  int(per_group), e);
      EXPECT_LT(e, 1e-5);
      // The ref backend (kernels/ref) agrees as well.
      auto rb = make_ref_backend();
      HybridModel mr(c, *rb);
      std::copy(m.params().data(), m.params().data() + m.params().numel(), mr.params().data());
      mr.prepare();
      EXPECT_LT(max_rel(forward_all(mr, toks), to_float(want)), 1e-5);
    }
}

TEST(Mamba2Model, PerturbedWeightIsCaught) {
  // The reference comparison can fail: one head's D, one dt_bias, the norm's grouping.
  Rng rng(22);
  const std::vector<int32_t> toks = test::tokens(rng, 40, 97);
  const ModelConfig c = mamba2_config(3, true);
  auto cpu = make_cpu_backend();
  HybridModel m(c, *cpu);
  test::randomize_params(m, 9);
  const std::vector<float> want = to_float(reference_logits(c, m.params(), toks));
  ASSERT_LT(max_rel(forward_all(m, toks), want), 1e-5);
  m.params().layer(1).Dskip[4] += 0.01f;
  m.prepare();
  EXPECT_GT(max_rel(forward_all(m, toks), want), 1e-4);
  m.params().layer(1).Dskip[4] -= 0.01f;
  m.params().layer(2).dt_b[5] += 0.5f;
  m.prepare();
  EXPECT_GT(max_rel(forward_all(m, toks), want), 1e-4);
  m.params().layer(2).dt_b[5] -= 0.5f;
  ModelConfig whole = c;
  whole.mamba2_norm_per_group = false;
  HybridModel mw(whole, *cpu);
  std::copy(m.params().data(), m.params().data() + m.params().numel(), mw.params().data());
  mw.prepare();
  EXPECT_GT(max_rel(forward_all(mw, toks), want), 1e-4);
}

TEST(Mamba2Model, PrefillChunksAndDecodeAgree) {
  // One prefill = chunked prefill = token by token, with two sequences in one ragged batch.
  Rng rng(23);
  const ModelConfig c = mamba2_config(3, true);
  auto cpu = make_cpu_backend();
  HybridModel m(c, *cpu);
  test::randomize_params(m, 13);
  const std::vector<int32_t> a = test::tokens(rng, 90, 97), b = test::tokens(rng, 71, 97);
  const std::vector<float> fa = forward_all(m, a), fb = forward_all(m, b);
  const int V = c.vocab_size;
  HybridMemory mem(*cpu, c, 2, 100, KvType::F32);
  std::vector<float> got_a, got_b, logits;
  size_t ia = 0, ib = 0;
  const int pieces[] = {1, 66, 5, 1, 17, 30};
  for (int k = 0; ia < a.size() || ib < b.size(); ++k) {
    const size_t n = size_t(pieces[k % 6]);
    Batch batch;
    batch.logits_all = true;
    const size_t na = std::min(n, a.size() - ia), nb = std::min(n + 2, b.size() - ib);
    if (na) batch.add(0, std::vector<int32_t>(a.begin() + long(ia), a.begin() + long(ia + na)));
    if (nb) batch.add(1, std::vector<int32_t>(b.begin() + long(ib), b.begin() + long(ib + nb)));
    m.forward(batch, mem, logits);
    got_a.insert(got_a.end(), logits.begin(), logits.begin() + long(na * V));
    got_b.insert(got_b.end(), logits.begin() + long(na * V), logits.begin() + long((na + nb) * V));
    ia += na;
    ib += nb;
  }
  EXPECT_LT(max_rel(got_a, fa), 1e-5);
  EXPECT_LT(max_rel(got_b, fb), 1e-5);
  // Token by token from a copied state (seq_cp) continues exactly.
  HybridMemory m2(*cpu, c, 2, 100, KvType::F32);
  std::vector<float> steps;
  for (size_t i = 0; i < a.size(); ++i) {
    Batch s;
    s.add(i < 40 ? 0 : 1, {a[i]});
    if (i == 40) m2.seq_cp(0, 1);
    m.forward(s, m2, logits);
    steps.insert(steps.end(), logits.begin(), logits.end());
  }
  EXPECT_LT(max_rel(steps, fa), 1e-5);
}

TEST(Mamba2Model, MixedStackRunsEachKind) {
  // Mamba-2, Mamba, attention (with bridges) and an MLP in one model: the CPU backend against the
  // ref backend, and each layer kind's ops counted.
  ModelConfig c = preset("tiny");
  c.n_layers = 5;
  c.attention_layers = {2};
  c.mamba2_layers = {0, 3};
  c.mamba2_head_dim = 16;
  c.mamba2_groups = 2;
  Rng rng(24);
  const std::vector<int32_t> toks = test::tokens(rng, 70, c.vocab_size);
  auto cpu = make_cpu_backend();
  CountingBackend counting(*cpu);
  HybridModel m(c, counting);
  test::randomize_params(m, 17);
  const std::vector<float> got = forward_all(m, toks);
  EXPECT_EQ(counting.count(OpKind::SsdScan).calls, 2);
  EXPECT_EQ(counting.count(OpKind::GatedNorm).calls, 2);
  EXPECT_EQ(counting.count(OpKind::Scan).calls, 2);       // layers 1 and 4
  EXPECT_EQ(counting.count(OpKind::Attention).calls, 1);
  EXPECT_EQ(counting.count(OpKind::Conv).calls, 4);
  auto rb = make_ref_backend();
  HybridModel mr(c, *rb);
  std::copy(m.params().data(), m.params().data() + m.params().numel(), mr.params().data());
  mr.prepare();
  EXPECT_LT(max_rel(got, forward_all(mr, toks)), 1e-5);
  // The memory a Mamba-2 layer holds: conv window over x | B | C, state [heads, head_dim, N].
  HybridMemory mem(*cpu, c, 3, 16, KvType::F32);
  const int64_t E = c.d_inner(), N = c.d_state, K = c.d_conv;
  EXPECT_EQ(mem.recurrent().conv_pool(0).slot_stride, (E + 2 * 2 * N) * (K - 1));
  EXPECT_EQ(mem.recurrent().conv_pool(1).slot_stride, E * (K - 1));
  EXPECT_EQ(mem.recurrent().ssm_pool(0).slot_stride, E * N);
  RunShape rs;
  rs.slots = 3;
  rs.ctx = 16;
  rs.kv_bytes = 4;
  EXPECT_EQ(size_t(estimate_memory(c, rs).state), mem.recurrent().bytes_reserved());
}

TEST(Mamba2Config, ValidatesAndRoundTrips) {
  const ModelConfig p = preset("mamba2");
  EXPECT_EQ(int(p.mamba2_layers.size()), p.n_layers);
  EXPECT_NO_THROW(validate(p));
  ModelConfig c = mamba2_config(3, false);
  c.mamba2_dt_min = 0.001f;
  c.mamba2_dt_max = 0.5f;
  const ModelConfig back = config_from_json(config_to_json(c));
  EXPECT_EQ(back.mamba2_layers, c.mamba2_layers);
  EXPECT_EQ(back.mamba2_groups, 3);
  EXPECT_FALSE(back.mamba2_norm_per_group);
  EXPECT_FLOAT_EQ(back.mamba2_dt_max, 0.5f);
  EXPECT_TRUE(std::isinf(config_from_json(config_to_json(mamba2_config(1, true))).mamba2_dt_max));
  auto expect_error = [](ModelConfig bad, const std::string& part) {
    try {
      validate(bad);
      ADD_FAILURE() << "no error for " << part;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  ModelConfig bad = c;
  bad.mamba2_head_dim = 7;
  expect_error(bad, "mamba2_head_dim");
  bad = c;
  bad.mamba2_groups = 4;
  expect_error(bad, "mamba2_groups");
  bad = c;
  bad.attention_layers = {1};
  expect_error(bad, "mamba2_layers");
  bad = c;
  bad.mamba2_layers = {0, 0};
  expect_error(bad, "twice");
  bad = c;
  bad.mamba2_dt_max = 0.0005f;
  expect_error(bad, "mamba2_dt_min");
  // A true layer may have a Mamba-2 path (Falcon-H1; tests/test_falcon_h1.cpp runs it).
  ModelConfig both = preset("true-tiny");
  both.mamba2_layers = {1};
  both.mamba2_head_dim = 16;
  EXPECT_NO_THROW(validate(both));
}

// Mamba-2 layers with the gated RMSNorm train (float, through BatchGrad: the gradients are
// checked in test_batch_grad.cpp and test_grad_ssd.cpp), and so does the double reference model.
TEST(Mamba2Config, TrainingRunsMamba2Layers) {
  const ModelConfig c = mamba2_config(1, true);
  Params p(c), g(c);
  init_params(p, 1);
  std::fill(g.data(), g.data() + g.numel(), 0.0f);
  const std::vector<int32_t> toks = {1, 2, 3, 4}, targets = {2, 3, 4, 5};
  const double loss = loss_and_grad(p, g, toks.data(), targets.data(), 1, 4);
  EXPECT_TRUE(std::isfinite(loss));
  EXPECT_GT(loss, 0.0);
  double in_proj = 0;
  for (size_t k = 0; k < g.specs().size(); ++k)
    if (g.specs()[k].name.find("mixer.in_proj") != std::string::npos)
      for (int64_t i = 0; i < g.specs()[k].numel(); ++i) in_proj += std::fabs(g.at(k)[i]);
  EXPECT_GT(in_proj, 0.0);
  // The double reference model runs Mamba-2 layers too (test_batch_grad.cpp holds it to BatchGrad).
  Params gd(c);
  std::fill(gd.data(), gd.data() + gd.numel(), 0.0f);
  EXPECT_NEAR(loss_and_grad_f64(p, gd, toks.data(), targets.data(), 1, 4), loss, 1e-5 * loss);
  // Falcon-H1's gate variants train too (BatchGrad.Mamba2GateVariantsAndTrueLayersTrain).
  ModelConfig nbg = c;
  nbg.mamba2_norm_before_gate = true;
  EXPECT_EQ(training_unsupported(nbg), "");
  ModelConfig ungated = c;
  ungated.mamba2_gated_norm = false;
  EXPECT_EQ(training_unsupported(ungated), "");
}

}  // namespace hm
