// True-hybrid inference (docs/TRUE_HYBRID.md): prefill and decoding make the same routes and
// outputs in every routing mode and granularity, batches and pieces change nothing, the skipped
// path does no work (counted by the counting backend), routes are causal, and the routing
// analysis adds up.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "backend/backend.h"
#include "backend/counting_backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/model.h"
#include "model/routing.h"
#include "test_util.h"

using namespace hm;

namespace {

ModelConfig true_tiny(const std::string& mode, const std::string& granularity = "token") {
  ModelConfig c = preset("true-tiny");
  c.routing_mode = mode;
  c.routing_granularity = granularity;
  return c;
}

using test::randomize_params;

using test::tokens;
using test::rel_err;

std::vector<float> full_logits(HybridModel& m, const std::vector<int32_t>& toks, RouteTrace* tr = nullptr) {
  m.set_route_trace(tr);
  std::vector<float> logits = test::forward_all(m, toks);
  m.set_route_trace(nullptr);
  return logits;
}

// Logits of `toks` fed in pieces of the given sizes (cycled), logits of every token.
std::vector<float> piecewise_logits(HybridModel& m, const std::vector<int32_t>& toks,
                                    const std::vector<int>& sizes) {
  HybridMemory mem(m.backend(), m.config(), 1, int(toks.size()), KvType::F32);
  std::vector<float> all, logits;
  size_t at = 0;
  for (size_t k = 0; at < toks.size(); ++k) {
    const size_t n = std::min(toks.size() - at, size_t(sizes[k % sizes.size()]));
    Batch b;
    b.add(0, std::vector<int32_t>(toks.begin() + long(at), toks.begin() + long(at + n)));
    b.logits_all = true;
    m.forward(b, mem, logits);
    all.insert(all.end(), logits.begin(), logits.end());
    at += n;
  }
  return all;
}

int count_routes(const RouteTrace& tr, th::Route r) {
  int n = 0;
  for (const auto& l : tr.route) n += int(std::count(l.begin(), l.end(), r));
  return n;
}

struct Variant {
  std::string mode, granularity;
  double force;
};

const std::vector<Variant> kVariants = {
    {"both", "token", -1}, {"soft", "token", -1}, {"hard", "token", -1}, {"both", "chunk", -1},
    {"soft", "chunk", -1}, {"hard", "chunk", -1}, {"hard", "token", 0.0}, {"hard", "token", 0.3},
    {"hard", "token", 1.0}};

std::string name(const Variant& v) {
  return v.mode + "/" + v.granularity + (v.force >= 0 ? " forced " + std::to_string(v.force) : "");
}

}  // namespace

TEST(TrueHybrid, DecodingEqualsPrefillInEveryMode) {
  auto be = make_cpu_backend();
  for (const Variant& v : kVariants) {
    HybridModel m(true_tiny(v.mode, v.granularity), *be);
    randomize_params(m, 41);
    m.set_forced_attention_fraction(v.force);
    Rng rng(42);
    const auto toks = tokens(rng, 29, m.config().vocab_size);
    RouteTrace tr;
    const auto want = full_logits(m, toks, &tr);
    EXPECT_LT(rel_err(piecewise_logits(m, toks, {1}), want), 1e-5) << name(v);
    if (v.mode == "hard" && v.force < 0) {  // the router really splits the tokens
      EXPECT_GT(count_routes(tr, th::Route::Attention), 5) << name(v);
      EXPECT_GT(count_routes(tr, th::Route::Mamba), 5) << name(v);
    }
  }
}

TEST(TrueHybrid, PiecesOfOddSizesEqualOnePrefill) {
  auto be = make_cpu_backend();
  for (const Variant& v : kVariants) {
    HybridModel m(true_tiny(v.mode, v.granularity), *be);
    randomize_params(m, 43);
    m.set_forced_attention_fraction(v.force);
    Rng rng(44);
    const auto toks = tokens(rng, 41, m.config().vocab_size);
    // Pieces start inside and at the ends of routing chunks (routing_chunk is 3).
    EXPECT_LT(rel_err(piecewise_logits(m, toks, {7, 1, 5, 2, 11}), full_logits(m, toks)), 1e-5) << name(v);
  }
}

TEST(TrueHybrid, RaggedBatchEqualsSequencesOneByOne) {
  auto be = make_cpu_backend();
  for (const Variant& v : {kVariants[1], kVariants[2], kVariants[5], kVariants[7]}) {
    HybridModel m(true_tiny(v.mode, v.granularity), *be);
    randomize_params(m, 45);
    m.set_forced_attention_fraction(v.force);
    const int V = m.config().vocab_size;
    Rng rng(46);
    // Two rounds: the second continues sequences that are at different positions.
    std::vector<std::vector<int32_t>> first = {tokens(rng, 6, V), tokens(rng, 17, V), tokens(rng, 1, V)};
    std::vector<std::vector<int32_t>> second = {tokens(rng, 4, V), tokens(rng, 1, V), tokens(rng, 9, V)};
    const std::vector<int> slots = {2, 0, 3};
    HybridMemory mem(*be, m.config(), 4, 32, KvType::F32);
    std::vector<float> logits;
    for (const auto* round : {&first, &second}) {
      Batch b;
      for (size_t s = 0; s < slots.size(); ++s) b.add(slots[s], (*round)[s]);
      m.forward(b, mem, logits);
    }
    for (size_t s = 0; s < slots.size(); ++s) {
      std::vector<int32_t> whole = first[s];
      whole.insert(whole.end(), second[s].begin(), second[s].end());
      const auto full = full_logits(m, whole);
      std::vector<float> last(full.end() - V, full.end());
      std::vector<float> got(logits.begin() + long(s * V), logits.begin() + long((s + 1) * V));
      EXPECT_LT(rel_err(got, last), 1e-5) << name(v) << " sequence " << s;
    }
  }
}

TEST(TrueHybrid, SeqCopyContinuesAsUninterrupted) {
  auto be = make_cpu_backend();
  for (const Variant& v : {kVariants[2], kVariants[4], kVariants[5]}) {
    HybridModel m(true_tiny(v.mode, v.granularity), *be);
    randomize_params(m, 47);
    Rng rng(48);
    const auto prefix = tokens(rng, 13, m.config().vocab_size);
    const auto rest = tokens(rng, 8, m.config().vocab_size);
    HybridMemory mem(*be, m.config(), 3, 32, KvType::F32);
    std::vector<float> la, lb;
    Batch p;
    p.add(0, prefix);
    m.forward(p, mem, la);
    // Slot 2 holds another, longer sequence first: seq_cp must overwrite all of its state.
    Batch junk;
    junk.add(2, tokens(rng, 20, m.config().vocab_size));
    m.forward(junk, mem, lb);
    mem.seq_cp(0, 2);
    for (int i = 0; i < m.config().n_layers; ++i)
      if (m.config().has_attention_path(i)) {
        EXPECT_EQ(mem.kv().len(i, 2), mem.kv().len(i, 0)) << i;
      }
    Batch a, b;
    a.add(0, rest);
    b.add(2, rest);
    a.logits_all = b.logits_all = true;
    m.forward(a, mem, la);
    m.forward(b, mem, lb);
    EXPECT_EQ(la, lb) << name(v);
    std::vector<int32_t> whole = prefix;
    whole.insert(whole.end(), rest.begin(), rest.end());
    const auto full = full_logits(m, whole);
    EXPECT_LT(rel_err(lb, std::vector<float>(full.end() - long(lb.size()), full.end())), 1e-5) << name(v);
    // seq_rm forgets everything: the slot then runs like a fresh one.
    mem.seq_rm(2);
    for (int i = 0; i < m.config().n_layers; ++i)
      if (m.config().has_attention_path(i)) {
        EXPECT_EQ(mem.kv().len(i, 2), 0) << i;
      }
    Batch again;
    again.add(2, whole);
    again.logits_all = true;
    m.forward(again, mem, lb);
    EXPECT_LT(rel_err(lb, full), 1e-5) << name(v);
  }
}

TEST(TrueHybrid, CpuBackendMatchesReferenceBackend) {
  for (const Variant& v : {kVariants[0], kVariants[1], kVariants[2], kVariants[5], kVariants[7]}) {
    auto cpu = make_cpu_backend();
    auto ref = make_ref_backend();
    HybridModel a(true_tiny(v.mode, v.granularity), *cpu), b(true_tiny(v.mode, v.granularity), *ref);
    randomize_params(a, 49);
    randomize_params(b, 49);
    a.set_forced_attention_fraction(v.force);
    b.set_forced_attention_fraction(v.force);
    Rng rng(50);
    const auto toks = tokens(rng, 37, a.config().vocab_size);
    EXPECT_LT(rel_err(full_logits(a, toks), full_logits(b, toks)), 1e-5) << name(v);
  }
}

TEST(TrueHybrid, KvCacheHoldsOnlyAttentionTokens) {
  auto be = make_cpu_backend();
  HybridModel m(true_tiny("hard"), *be);
  randomize_params(m, 51);
  Rng rng(52);
  const auto toks = tokens(rng, 30, m.config().vocab_size);
  HybridMemory mem(*be, m.config(), 1, 30, KvType::F16);
  RouteTrace tr;
  m.set_route_trace(&tr);
  Batch b;
  b.add(0, toks);
  std::vector<float> logits;
  m.forward(b, mem, logits);
  m.set_route_trace(nullptr);
  for (size_t li = 0; li < tr.layers.size(); ++li) {
    const int n_attn = int(std::count(tr.route[li].begin(), tr.route[li].end(), th::Route::Attention));
    EXPECT_EQ(mem.kv().len(tr.layers[li], 0), n_attn) << "layer " << tr.layers[li];
    EXPECT_LT(n_attn, 30);
  }
  EXPECT_EQ(mem.kv().len(3, 0), 30);  // the plain attention layer holds every position
}

TEST(TrueHybrid, SkippedPathDoesNoWork) {
  auto cpu = make_cpu_backend();
  CountingBackend be(*cpu);
  HybridModel m(true_tiny("hard"), be);
  randomize_params(m, 53);
  const ModelConfig& c = m.config();
  const int L = 40;
  Rng rng(54);
  const auto toks = tokens(rng, L, c.vocab_size);
  for (double f : {0.0, 0.3, 1.0, -1.0}) {
    m.set_forced_attention_fraction(f);
    HybridMemory mem(be, c, 1, L, KvType::F32);
    RouteTrace tr;
    m.set_route_trace(&tr);
    be.reset();
    be.set_logging(true);
    Batch b;
    b.add(0, toks);
    std::vector<float> logits;
    m.forward(b, mem, logits);
    be.set_logging(false);
    m.set_route_trace(nullptr);
    for (size_t li = 0; li < tr.layers.size(); ++li) {
      const int layer = tr.layers[li];
      const LayerWeights& w = m.params().layer(layer);
      const int n_attn = int(std::count(tr.route[li].begin(), tr.route[li].end(), th::Route::Attention));
      if (f >= 0) {
        int want = 0;
        for (int t = 0; t < L; ++t) want += th::forced_to_attention(t, f);
        EXPECT_EQ(n_attn, want) << "f " << f;
      }
      const void* kcache = mem.kv().k(layer, 0);
      // Rows and calls per tag (the weight a linear used, Dskip for a scan, the cache for attention).
      auto rows = [&](OpKind op, const void* tag) {
        int64_t r = 0;
        for (const auto& call : be.calls()) if (call.op == op && call.tag == tag) r += call.rows;
        return r;
      };
      auto calls = [&](OpKind op, const void* tag) {
        int n = 0;
        for (const auto& call : be.calls()) n += call.op == op && call.tag == tag;
        return n;
      };
      for (const float* W : {w.in_proj, w.x_proj, w.dt_w, w.out_proj})
        EXPECT_EQ(rows(OpKind::Linear, W), L - n_attn) << "layer " << layer << " f " << f;
      // q | k | v is one projection, tagged by wq (prepare found the three end to end).
      ASSERT_TRUE(m.fused_qkv());
      for (const float* W : {w.wq, w.wo})
        EXPECT_EQ(rows(OpKind::Linear, W), n_attn) << "layer " << layer << " f " << f;
      for (const float* W : {w.wk, w.wv}) EXPECT_EQ(calls(OpKind::Linear, W), 0) << "layer " << layer;
      EXPECT_EQ(rows(OpKind::Scan, w.Dskip), L - n_attn);
      EXPECT_EQ(rows(OpKind::Conv, w.conv_w), L - n_attn);
      EXPECT_EQ(rows(OpKind::Attention, kcache), n_attn);
      EXPECT_EQ(mem.kv().len(layer, 0), n_attn);
      if (f == 0.0) {
        for (const float* W : {w.wq, w.wk, w.wv, w.wo}) EXPECT_EQ(calls(OpKind::Linear, W), 0);
        EXPECT_EQ(calls(OpKind::Attention, kcache), 0);
        EXPECT_EQ(mem.kv().len(layer, 0), 0);
      }
      if (f == 1.0) {
        for (const float* W : {w.in_proj, w.x_proj, w.dt_w, w.out_proj}) EXPECT_EQ(calls(OpKind::Linear, W), 0);
        EXPECT_EQ(calls(OpKind::Scan, w.Dskip), 0);
        EXPECT_EQ(calls(OpKind::Conv, w.conv_w), 0);
      }
      if (f == 0.3) {  // one GEMM per projection for all of the path's rows
        EXPECT_EQ(calls(OpKind::Linear, w.in_proj), 1);
        EXPECT_EQ(calls(OpKind::Linear, w.wq), 1);
      }
    }
  }
  // One linear, counted exactly: 2 m n k FLOPs, m rows.
  be.reset();
  std::vector<float> y(4 * 2), x(4 * 3), W(2 * 3);
  be.linear(Tensor(y.data(), DType::F32, 4, 2), Tensor(x.data(), DType::F32, 4, 3),
            Tensor(W.data(), DType::F32, 2, 3), false);
  EXPECT_EQ(be.count(OpKind::Linear).flops, 2.0 * 4 * 2 * 3);
  EXPECT_EQ(be.count(OpKind::Linear).calls, 1);
  EXPECT_EQ(be.count(OpKind::Linear).rows, 4);
}

TEST(TrueHybrid, HardRoutesAreCausal) {
  auto be = make_cpu_backend();
  for (const char* gran : {"token", "chunk"}) {
    HybridModel m(true_tiny("hard", gran), *be);
    randomize_params(m, 55);
    Rng rng(56);
    auto toks = tokens(rng, 31, m.config().vocab_size);
    RouteTrace a, b;
    const auto la = full_logits(m, toks, &a);
    const int k = 17, V = m.config().vocab_size;
    toks[size_t(k)] = (toks[size_t(k)] + 1) % V;
    const auto lb = full_logits(m, toks, &b);
    bool later_differ = false;
    for (size_t li = 0; li < a.layers.size(); ++li) {
      for (int t = 0; t < k; ++t) {
        EXPECT_EQ(a.route[li][size_t(t)], b.route[li][size_t(t)]) << gran << " layer " << li << " t " << t;
        EXPECT_EQ(a.p[li][size_t(t)], b.p[li][size_t(t)]);
      }
      for (size_t t = size_t(k); t < a.p[li].size(); ++t) later_differ |= a.p[li][t] != b.p[li][t];
    }
    EXPECT_TRUE(later_differ) << gran;  // the change is seen from token k on
    // Logits before k: equal up to float rounding. Not bitwise: a route that flips from k on
    // changes how many rows a path's GEMMs have, and sgemm's blocking rounds the other rows
    // differently (observed 7e-8 of the logits' scale; a leak from token k would be ~1e-2).
    const std::vector<float> before_a(la.begin(), la.begin() + long(k) * V), before_b(lb.begin(), lb.begin() + long(k) * V);
    EXPECT_LT(rel_err(before_a, before_b), 1e-6) << gran;
    EXPECT_FALSE(std::equal(la.begin() + long(k) * V, la.begin() + long(k + 1) * V, lb.begin() + long(k) * V));
  }
}

TEST(TrueHybrid, RoutingAnalysisAddsUp) {
  auto be = make_cpu_backend();
  Rng rng(58);
  const auto toks = tokens(rng, 23, 300);
  for (const std::string mode : {"both", "soft", "hard"}) {
    HybridModel m(true_tiny(mode), *be);
    randomize_params(m, 57);
    const RoutingAnalysis r = get_routing_analysis(m, toks);
    ASSERT_EQ(r.layers.size(), 2u);
    EXPECT_EQ(r.layers[0].layer, 1);
    EXPECT_EQ(r.layers[1].layer, 4);
    double avg = 0;
    for (const LayerRouting& l : r.layers) {
      ASSERT_EQ(l.attention_share.size(), toks.size());
      ASSERT_EQ(l.route.size(), toks.size());
      ASSERT_EQ(l.p.size(), toks.size());
      double a = 0;
      for (size_t t = 0; t < toks.size(); ++t) {
        const double s = l.attention_share[t];
        EXPECT_GE(s, 0.0);
        EXPECT_LE(s, 1.0);
        if (mode == "both") {
          EXPECT_EQ(s, 0.5);
        } else if (mode == "soft") {
          EXPECT_NEAR(s, l.p[t], 1e-7);
        } else {
          EXPECT_EQ(s, l.route[t] == th::Route::Attention ? 1.0 : 0.0);
        }
        a += s;
      }
      EXPECT_NEAR(l.usage.attention, a / double(toks.size()), 1e-12);
      EXPECT_NEAR(l.usage.mamba + l.usage.attention, 1.0, 1e-12);
      avg += l.usage.attention / 2;
    }
    EXPECT_NEAR(r.average_usage.attention, avg, 1e-12);
    EXPECT_NEAR(r.average_usage.mamba + r.average_usage.attention, 1.0, 1e-12);
    if (mode == "hard") {
      EXPECT_GT(r.average_usage.attention, 0.05);
      EXPECT_LT(r.average_usage.attention, 0.95);
    }
  }
}

TEST(TrueHybrid, BadRequestsAreErrors) {
  auto be = make_cpu_backend();
  auto expect_error = [](auto fn, const char* what) {
    try {
      fn();
      ADD_FAILURE() << "accepted: " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  HybridModel soft(true_tiny("soft"), *be), both(true_tiny("both"), *be), hard(true_tiny("hard"), *be);
  expect_error([&] { soft.set_forced_attention_fraction(0.5); }, "hard");
  expect_error([&] { both.set_forced_attention_fraction(0.0); }, "hard");
  expect_error([&] { hard.set_forced_attention_fraction(1.5); }, "[0, 1]");
  soft.set_forced_attention_fraction(-1);  // letting the router decide is always fine
  hard.set_forced_attention_fraction(0.25);
  EXPECT_EQ(hard.forced_attention_fraction(), 0.25);
  HybridModel simple(preset("tiny"), *be);
  init_params(simple.params(), 1);
  simple.prepare();
  expect_error([&] { simple.set_forced_attention_fraction(0.5); }, "no true-hybrid layers");
  expect_error([&] { get_routing_analysis(simple, {1, 2, 3}); }, "no true-hybrid layers");
  randomize_params(hard, 1);
  expect_error([&] { get_routing_analysis(hard, {}); }, "no tokens");
}
