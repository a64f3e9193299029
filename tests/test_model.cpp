// Whole-model tests: the fast CPU backend against the reference backend, decoding against one
// full forward, ragged batches against single sequences, checkpoints round trip.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>

#include "backend/backend.h"
#include "backend/host_backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/model.h"
#include "io/safetensors.h"
#include "runtime/generate.h"
#include "batch_invariance_util.h"
#include "test_util.h"

using namespace hm;

namespace {

ModelConfig tiny(bool rope = true, int d_ff = 48, bool bridges = true, bool tie = true) {
  ModelConfig c = preset("tiny");
  c.rope = rope;
  c.d_ff = d_ff;
  c.state_bridges = bridges;
  c.tie_embeddings = tie;
  return c;
}

using test::randomize_params;

using test::tokens;
using test::rel_err;
using test::forward_all;
using test::forward_stepwise;

// Two computations of the same logits agree to float rounding (1e-5 of their scale) with a float
// cache. With a half cache, a key that two paths compute one float bit apart (a GEMM row against
// a GEMV) can round to neighbouring halves, 2^-11 apart: observed up to 3e-5 on random weights.
double kv_tol(KvType kv) { return kv == KvType::F32 ? 1e-5 : 1e-4; }

}  // namespace

TEST(Model, CpuBackendMatchesReferenceBackend) {
  for (const ModelConfig& c : {tiny(), tiny(false, 0, true, false), tiny(true, 48, false)}) {
    auto cpu = make_cpu_backend();
    auto ref = make_ref_backend();
    HybridModel a(c, *cpu), b(c, *ref);
    randomize_params(a, 3);
    randomize_params(b, 3);
    Rng rng(9);
    const auto toks = tokens(rng, 37, c.vocab_size);
    for (KvType kv : {KvType::F32, KvType::F16})
      EXPECT_LT(rel_err(forward_all(a, toks, kv), forward_all(b, toks, kv)), kv_tol(kv));
  }
}

TEST(Model, DecodingEqualsFullForward) {
  for (const ModelConfig& c : {tiny(), tiny(false, 0, false, false), tiny(true, 0, true, true)}) {
    auto be = make_cpu_backend();
    HybridModel m(c, *be);
    randomize_params(m, 5);
    Rng rng(11);
    const auto toks = tokens(rng, 45, c.vocab_size);
    for (KvType kv : {KvType::F32, KvType::F16})
      EXPECT_LT(rel_err(forward_stepwise(m, toks, kv), forward_all(m, toks, kv)), kv_tol(kv));
    // A half-precision cache changes the answer by rounding K and V only.
    EXPECT_LT(rel_err(forward_all(m, toks, KvType::F16), forward_all(m, toks, KvType::F32)), 5e-3);
  }
}

TEST(Model, PrefillInChunksThenDecodeEqualsFullForward) {
  auto be = make_cpu_backend();
  HybridModel m(tiny(), *be);
  randomize_params(m, 6);
  Rng rng(12);
  const auto toks = tokens(rng, 40, m.config().vocab_size);
  const auto want = forward_all(m, toks, KvType::F16);
  HybridMemory mem(*be, m.config(), 1, 40);
  std::vector<float> got, logits;
  size_t at = 0;
  for (int n : {17, 1, 9, 1, 1, 11}) {
    Batch b;
    b.add(0, std::vector<int32_t>(toks.begin() + long(at), toks.begin() + long(at) + n));
    b.logits_all = true;
    m.forward(b, mem, logits);
    got.insert(got.end(), logits.begin(), logits.end());
    at += size_t(n);
  }
  ASSERT_EQ(at, toks.size());
  EXPECT_LT(rel_err(got, want), 1e-5);
}

TEST(Model, RaggedBatchEqualsSeparateSequences) {
  auto be = make_cpu_backend();
  HybridModel m(tiny(), *be);
  randomize_params(m, 7);
  const int V = m.config().vocab_size;
  Rng rng(13);
  std::vector<std::vector<int32_t>> seqs = {tokens(rng, 5, V), tokens(rng, 23, V), tokens(rng, 1, V)};
  HybridMemory mem(*be, m.config(), 4, 32);
  Batch b;
  b.add(2, seqs[0]);  // slots need not be in order
  b.add(0, seqs[1]);
  b.add(3, seqs[2]);
  std::vector<float> logits;
  m.forward(b, mem, logits);
  ASSERT_EQ(logits.size(), 3u * V);
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto full = forward_all(m, seqs[s], KvType::F16);
    std::vector<float> last(full.end() - V, full.end());
    std::vector<float> got(logits.begin() + long(s * V), logits.begin() + long((s + 1) * V));
    EXPECT_LT(rel_err(got, last), 1e-5) << "sequence " << s;
  }
  EXPECT_EQ(mem.pos(2), 5);
  EXPECT_EQ(mem.pos(0), 23);
  EXPECT_EQ(mem.pos(1), 0);
}

// A decode step of many one-token sequences runs them on several threads at once (the host
// backend's for_seqs): conv, selective scan, SSD scan and attention (float and half cache, at
// contexts long enough that attention splits its keys) give exactly what each sequence alone
// gives, beside a longer sequence that runs as before.
TEST(Model, OneTokenSequencesOnThreadsEqualEachAlone) {
  auto be = make_cpu_backend();
  Rng rng(31);
  const int E = 40, N = 16, K = 4, H = 4, G = 2, hd = 32, Hs = 5, Gs = 1, ctx = 1200;
  const std::vector<int> lens = {1, 1, 7, 1, 1, 1}, slots = {4, 0, 2, 5, 1, 3}, pos0s = {0, 1, 300, 17, 1000, 555};
  const int S = int(lens.size());
  int n = 0;
  for (int l : lens) n += l;
  auto rnd = [&](size_t k, double scale = 1.0) {
    std::vector<float> v(k);
    for (float& x : v) x = float(scale * rng.normal());
    return v;
  };
  Ragged all;
  for (int s = 0; s < S; ++s) all.add(slots[size_t(s)], lens[size_t(s)], pos0s[size_t(s)]);
  // Runs op over `all` once, then sequence by sequence from the same state; outputs and states
  // must match bit for bit.
  auto check = [&](const char* what, std::vector<float>& out, std::vector<float>& state, int out_cols,
                   const std::function<void(const Ragged&, float*, float*, int)>& op) {
    std::vector<float> out1 = out, st1 = state;
    op(all, out1.data(), st1.data(), 0);
    std::vector<float> out2 = out, st2 = state;
    int t0 = 0;
    for (int s = 0; s < S; ++s) {
      Ragged one;
      one.add(slots[size_t(s)], lens[size_t(s)], pos0s[size_t(s)]);
      op(one, out2.data() + size_t(t0) * out_cols, st2.data(), t0);
      t0 += lens[size_t(s)];
    }
    EXPECT_EQ(out1, out2) << what;
    EXPECT_EQ(st1, st2) << what;
  };
  {  // conv1d_silu
    std::vector<float> x = rnd(size_t(n) * E), w = rnd(size_t(E) * K, 0.5), b = rnd(E), out(size_t(n) * E),
                       st = rnd(size_t(6) * E * (K - 1));
    check("conv1d_silu", out, st, E, [&](const Ragged& rg, float* o, float* sp, int t0) {
      be->conv1d_silu(Tensor(o, DType::F32, rg.n_tokens(), E), StatePool{sp, 6, int64_t(E) * (K - 1)},
                      Tensor(x.data() + size_t(t0) * E, DType::F32, rg.n_tokens(), E), Tensor(w.data(), DType::F32, E, K),
                      Tensor::vec(b.data(), DType::F32, E), rg);
    });
  }
  {  // selective_scan
    std::vector<float> x = rnd(size_t(n) * E), dt = rnd(size_t(n) * E, 0.5), dtb = rnd(E, 0.2), z = rnd(size_t(n) * E),
                       A = rnd(size_t(E) * N), Bm = rnd(size_t(n) * N), Cm = rnd(size_t(n) * N), Dk = rnd(E),
                       out(size_t(n) * E), st = rnd(size_t(6) * E * N);
    for (float& a : A) a = -std::fabs(a);
    check("selective_scan", out, st, E, [&](const Ragged& rg, float* o, float* sp, int t0) {
      const int m = rg.n_tokens();
      be->selective_scan(Tensor(o, DType::F32, m, E), StatePool{sp, 6, int64_t(E) * N},
                         Tensor(x.data() + size_t(t0) * E, DType::F32, m, E),
                         Tensor(dt.data() + size_t(t0) * E, DType::F32, m, E), Tensor::vec(dtb.data(), DType::F32, E),
                         A.data(), Tensor(Bm.data() + size_t(t0) * N, DType::F32, m, N),
                         Tensor(Cm.data() + size_t(t0) * N, DType::F32, m, N), Tensor::vec(Dk.data(), DType::F32, E),
                         Tensor(z.data() + size_t(t0) * E, DType::F32, m, E), rg);
    });
  }
  {  // ssd_scan: Hs heads of E / Hs, Gs group
    std::vector<float> x = rnd(size_t(n) * E), dt = rnd(size_t(n) * Hs, 0.5), dtb = rnd(Hs, 0.2), A = rnd(Hs),
                       Bm = rnd(size_t(n) * Gs * N), Cm = rnd(size_t(n) * Gs * N), Dk = rnd(Hs), out(size_t(n) * E),
                       st = rnd(size_t(6) * E * N);
    for (float& a : A) a = -std::fabs(a);
    check("ssd_scan", out, st, E, [&](const Ragged& rg, float* o, float* sp, int t0) {
      const int m = rg.n_tokens();
      be->ssd_scan(Tensor(o, DType::F32, m, E), StatePool{sp, 6, int64_t(E) * N},
                   Tensor(x.data() + size_t(t0) * E, DType::F32, m, E),
                   Tensor(dt.data() + size_t(t0) * Hs, DType::F32, m, Hs), Tensor::vec(dtb.data(), DType::F32, Hs),
                   A.data(), Tensor(Bm.data() + size_t(t0) * Gs * N, DType::F32, m, Gs * N),
                   Tensor(Cm.data() + size_t(t0) * Gs * N, DType::F32, m, Gs * N),
                   Tensor::vec(Dk.data(), DType::F32, Hs), Hs, Gs, 0.0f, INFINITY, rg);
    });
  }
  for (DType kt : {DType::F32, DType::F16}) {  // attention over each slot's cache
    const int row = G * hd;
    std::vector<float> kf = rnd(size_t(6) * ctx * row), vf = rnd(size_t(6) * ctx * row);
    std::vector<uint16_t> kh(kf.size()), vh(vf.size());
    for (size_t i = 0; i < kf.size(); ++i) {
      kh[i] = f32_to_f16(kf[i]);
      vh[i] = f32_to_f16(vf[i]);
    }
    KvPool kv;
    kv.k = kt == DType::F16 ? static_cast<void*>(kh.data()) : kf.data();
    kv.v = kt == DType::F16 ? static_cast<void*>(vh.data()) : vf.data();
    kv.dtype = kt;
    kv.n_slots = 6;
    kv.max_ctx = ctx;
    kv.row = row;
    kv.slot_stride = int64_t(ctx) * row;
    std::vector<float> q = rnd(size_t(n) * H * hd), out(size_t(n) * H * hd), none;
    check(kt == DType::F16 ? "attention, half cache" : "attention, float cache", out, none, H * hd,
          [&](const Ragged& rg, float* o, float*, int t0) {
            const int m = rg.n_tokens();
            be->attention(Tensor(o, DType::F32, m, H * hd), Tensor(q.data() + size_t(t0) * H * hd, DType::F32, m, H * hd),
                          kv, H, G, hd, rg);
          });
  }
}

TEST(Model, SeqCopyContinuesIdentically) {
  auto be = make_cpu_backend();
  HybridModel m(tiny(), *be);
  randomize_params(m, 8);
  Rng rng(14);
  const auto prefix = tokens(rng, 12, m.config().vocab_size);
  HybridMemory mem(*be, m.config(), 2, 20);
  std::vector<float> la, lb;
  Batch b;
  b.add(0, prefix);
  m.forward(b, mem, la);
  mem.seq_cp(0, 1);
  Batch s0, s1;
  s0.add(0, {7});
  s1.add(1, {7});
  m.forward(s0, mem, la);
  m.forward(s1, mem, lb);
  EXPECT_EQ(la, lb);
}

TEST(Model, BridgesStartAsIdentity) {
  auto be = make_cpu_backend();
  ModelConfig on = tiny(), off = tiny();
  off.state_bridges = false;
  HybridModel a(on, *be), b(off, *be);
  randomize_params(a.params(), 21);
  for (int i = 0; i < on.n_layers; ++i)  // the gates as init sets them
    if (float* g = a.params().layer(i).bridge_gate) std::fill(g, g + on.d_model, 0.0f);
  a.prepare();
  // Copy every shared tensor so the only difference is the (zero-gated) bridges.
  for (size_t i = 0; i < b.params().specs().size(); ++i) {
    const auto& s = b.params().specs()[i];
    std::copy_n(a.params().get(s.name), s.numel(), b.params().at(i));
  }
  b.prepare();
  Rng rng(15);
  const auto toks = tokens(rng, 19, on.vocab_size);
  EXPECT_EQ(forward_all(a, toks, KvType::F16), forward_all(b, toks, KvType::F16));
  // And a nonzero gate changes the output: the bridge is wired in.
  a.params().layer(1).bridge_gate[0] = 1.0f;
  EXPECT_NE(forward_all(a, toks, KvType::F16), forward_all(b, toks, KvType::F16));
}

TEST(Model, BadInputIsRejected) {
  auto be = make_cpu_backend();
  HybridModel m(tiny(), *be);
  init_params(m.params(), 1);
  m.prepare();
  HybridMemory mem(*be, m.config(), 2, 8);
  std::vector<float> logits;
  auto expect_error = [&](Batch b, const char* what) {
    try {
      m.forward(b, mem, logits);
      ADD_FAILURE() << "accepted: " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  Batch b1; b1.add(0, {1, 300});
  expect_error(b1, "outside the vocabulary");
  Batch b2; b2.add(0, {-1});
  expect_error(b2, "outside the vocabulary");
  Batch b3; b3.add(5, {1});
  expect_error(b3, "slot 5");
  Batch b4; b4.add(0, {1}); b4.add(0, {2});
  expect_error(b4, "twice");
  Batch b5; b5.add(1, std::vector<int32_t>(9, 1));
  expect_error(b5, "context size");
  EXPECT_EQ(mem.pos(0), 0);  // nothing was advanced by a rejected batch
  EXPECT_EQ(mem.pos(1), 0);
}

TEST(Model, InitIsDeterministicAndDocumented) {
  auto be = make_cpu_backend();
  const ModelConfig c = tiny();
  HybridModel a(c, *be), b(c, *be);
  init_params(a.params(), 99);
  init_params(b.params(), 99);
  ASSERT_TRUE(std::equal(a.params().data(), a.params().data() + a.params().numel(), b.params().data()));
  const LayerWeights& w = a.params().layer(0);  // Mamba
  const int E = c.d_inner(), N = c.d_state;
  for (int e = 0; e < E; ++e)
    for (int n = 0; n < N; ++n) EXPECT_FLOAT_EQ(w.A_log[e * N + n], std::log(float(n + 1)));
  for (int e = 0; e < E; ++e) {
    EXPECT_FLOAT_EQ(w.Dskip[e], 1.0f);
    const double dt = std::log1p(std::exp(double(w.dt_b[e])));  // softplus(bias) = initial dt
    EXPECT_GE(dt, 0.001 * 0.999);
    EXPECT_LE(dt, 0.1 * 1.001);
  }
  for (int i = 0; i < c.n_layers; ++i) {
    const float* g = a.params().layer(i).bridge_gate;
    if (!g) continue;
    for (int j = 0; j < c.d_model; ++j) EXPECT_EQ(g[j], 0.0f);
  }
}

TEST(Checkpoint, RoundTripF32IsExactAndBf16Close) {
  auto be = make_cpu_backend();
  const auto dir = std::filesystem::temp_directory_path() / "hm_ckpt_test";
  std::filesystem::remove_all(dir);
  HybridModel m(tiny(true, 48, true, false), *be);
  randomize_params(m, 31);
  save_model(m, dir.string());
  auto back = load_model(dir.string(), *be);
  ASSERT_TRUE(std::equal(m.params().data(), m.params().data() + m.params().numel(), back->params().data()));

  save_model(m, (dir / "bf16").string(), "BF16");
  auto half = load_model((dir / "bf16").string(), *be);
  for (size_t i = 0; i < m.params().specs().size(); ++i) {
    const auto& s = m.params().specs()[i];
    for (int64_t k = 0; k < s.numel(); ++k) {
      const float a = m.params().at(i)[k], b = half->params().at(i)[k];
      if (s.name.find("A_log") != std::string::npos) {
        ASSERT_EQ(a, b) << s.name;  // kept in float32
      } else {
        ASSERT_NEAR(a, b, std::fabs(a) * (1.0 / 128) + 1e-30) << s.name;
      }
    }
  }
  std::filesystem::remove_all(dir);
}

TEST(Checkpoint, MismatchedOrDamagedFilesNameTheProblem) {
  auto be = make_cpu_backend();
  const auto dir = std::filesystem::temp_directory_path() / "hm_ckpt_bad";
  std::filesystem::remove_all(dir);
  HybridModel m(tiny(), *be);
  init_params(m.params(), 1);
  save_model(m, dir.string());
  auto expect_error = [&](const char* what) {
    try {
      load_model(dir.string(), *be);
      ADD_FAILURE() << "loaded a bad checkpoint, expected: " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  // A config that disagrees with the weights: the first differing tensor is named.
  ModelConfig wider = tiny();
  wider.d_ff = 64;
  save_config((dir / "config.json").string(), wider);
  expect_error("mlp.gate_proj.weight");
  // Weights missing a tensor the config needs.
  ModelConfig mlp_less = tiny(true, 0);
  save_config((dir / "config.json").string(), mlp_less);
  expect_error("unexpected tensor");
  save_config((dir / "config.json").string(), tiny());
  // Truncation.
  const auto st = dir / "model.safetensors";
  std::filesystem::resize_file(st, std::filesystem::file_size(st) - 10);
  expect_error("model.safetensors");
  expect_error("safetensors");
  std::filesystem::remove_all(dir);
  EXPECT_THROW(load_model(dir.string(), *be), Error);
}

// The step-wise Generator (pulled by Python's stream and, later, a server) samples what generate
// samples: sequence 1 stopped by the consumer after 3 tokens here, by generate's callback there;
// every sequence of the batch equals that prompt generated alone.
TEST(Model, GeneratorStepsEqualGenerate) {
  auto be = make_cpu_backend();
  HybridModel m(tiny(), *be);
  randomize_params(m, 8);
  Rng rng(21);
  const std::vector<std::vector<int32_t>> prompts = {tokens(rng, 5, m.config().vocab_size),
                                                     tokens(rng, 11, m.config().vocab_size),
                                                     tokens(rng, 2, m.config().vocab_size)};
  GenerateOptions opt;
  opt.max_new_tokens = 9;
  opt.sampling.seed = 4;
  HybridMemory mem_a(*be, m.config(), 3, 32);
  const auto want = generate(m, mem_a, prompts, opt, [](int, int32_t) { return true; });

  HybridMemory mem_b(*be, m.config(), 3, 32);
  GenerateStats st;
  Generator g(m, mem_b, prompts, opt, &st);
  std::vector<std::vector<int32_t>> got(3);
  int steps = 0;
  for (;;) {
    const auto& step = g.next();
    if (step.empty()) break;
    ++steps;
    for (const auto& [seq, tok] : step) {
      got[size_t(seq)].push_back(tok);
      if (seq == 1 && got[1].size() == 3) g.stop(1);
    }
  }
  EXPECT_EQ(steps, 9);
  EXPECT_EQ(got[0], want[0]);
  EXPECT_EQ(got[2], want[2]);
  EXPECT_EQ(got[1], std::vector<int32_t>(want[1].begin(), want[1].begin() + 3));
  EXPECT_EQ(got, g.tokens());
  EXPECT_EQ(st.decoded_tokens, 9 + 3 + 9);

  HybridMemory mem_c(*be, m.config(), 3, 32);
  const auto stopped = generate(m, mem_c, prompts, opt, [](int seq, int32_t) { return seq != 1; });
  EXPECT_EQ(stopped[1].size(), 1u);  // the callback sees each token, then stops its sequence
  for (int i = 0; i < 3; ++i) {
    HybridMemory alone(*be, m.config(), 1, 32);
    GenerateOptions o1 = opt;
    o1.sampling.seed = opt.sampling.seed + uint64_t(i);
    EXPECT_EQ(generate(m, alone, {prompts[size_t(i)]}, o1)[0], want[size_t(i)]) << "sequence " << i;
  }
}

// A prefill that wants only each sequence's last logits holds only those rows: the logits
// buffer is nseq x V, not n_tokens x V (at a 50k vocabulary, 16 x 2048 tokens would be 6.6 GB).
TEST(Model, PrefillHoldsOnlyTheLogitsItReturns) {
  ModelConfig c = tiny();
  c.vocab_size = 4096;  // the logits dominate the workspace when all rows are kept
  auto be = make_cpu_backend();
  HybridModel m(c, *be);
  randomize_params(m, 13);
  Rng rng(17);
  const int V = c.vocab_size;
  HybridMemory mem(*be, c, 4, 512);
  Batch b;
  b.add(0, tokens(rng, 300, V));
  b.add(1, tokens(rng, 200, V));
  std::vector<float> logits;
  m.forward(b, mem, logits);
  EXPECT_EQ(logits.size(), size_t(2) * size_t(V));
  const size_t all_rows = size_t(500) * size_t(V) * sizeof(float);
  EXPECT_LT(m.workspace_bytes(), all_rows) << "the prefill kept logits for every token";
  // Whole-sequence logits do need every row, and get them.
  Batch all;
  all.logits_all = true;
  all.add(2, tokens(rng, 300, V));
  all.add(3, tokens(rng, 200, V));
  m.forward(all, mem, logits);
  EXPECT_EQ(logits.size(), size_t(500) * size_t(V));
  EXPECT_GE(m.workspace_bytes(), all_rows);
}

// The reference backend, saying it records graphs: a "capture" runs the ops as they come (so
// the step's results are right) and a "replay" runs nothing. Only the model's choice between
// the two is checked.
class GraphLoggingBackend final : public HostBackend<true> {
 public:
  bool supports_graphs() const override { return true; }
  void begin_capture() override { ++captures; }
  std::shared_ptr<void> end_capture() override { return std::make_shared<int>(0); }
  void replay(const std::shared_ptr<void>&) override { ++replays; }
  void set_batch_invariant(bool on) override { inv_ = on; }
  bool batch_invariant() const override { return inv_; }
  int captures = 0, replays = 0;

 private:
  bool inv_ = false;
};

// A decode graph recorded in one backend mode is not replayed in the other: in stop 33 the CUDA
// backend replayed default-mode graphs (GEMV, split-KV attention) after set_batch_invariant(true).
TEST(Model, DecodeGraphsAreKeyedOnTheBackendMode) {
  const ModelConfig c = tiny();
  GraphLoggingBackend be;
  HybridModel m(c, be);
  randomize_params(m, 5);
  HybridMemory mem(be, c, 2, 64);
  std::vector<float> logits;
  Batch p;
  p.add(0, {1, 2, 3});
  m.forward(p, mem, logits);
  auto step = [&](int32_t t) {
    Batch d;
    d.add(0, {t});
    m.forward(d, mem, logits);
  };
  step(4);  // first one-row step: eager
  step(5);  // second: recorded, then replayed
  step(6);  // replayed
  EXPECT_EQ(be.captures, 1);
  EXPECT_EQ(be.replays, 2);
  be.set_batch_invariant(true);
  step(7);  // the other mode: eager again, not the old recording
  EXPECT_EQ(be.replays, 2);
  step(8);  // recorded in this mode
  EXPECT_EQ(be.captures, 2);
  EXPECT_EQ(be.replays, 3);
  EXPECT_EQ(m.graphs_captured(), 2);
}

// Batch-invariant mode on the CPU (hm serve --batch-invariant): sequence X's logits (its
// prompt's last row, then each decode step) are the same bits run alone in one prefill, with its
// prompt cut at 64 and 128 tokens, beside other sequences' prompt chunks and decode steps, and in
// decode batches of other sizes; with the f16 and the f32 cache. (The CUDA test of the same name
// in test_cuda_model.cpp runs these schedules on the GPU.)
TEST(Model, BatchInvariantModeGivesEveryRowItsBitsAlone) {
  auto be = make_cpu_backend();
  int k = 0;
  for (const ModelConfig& c : {tiny(), preset("true-tiny")}) {
    for (KvType kv : {KvType::F16, KvType::F32}) {
      SCOPED_TRACE(std::to_string(k) + (kv == KvType::F16 ? " f16 cache" : " f32 cache"));
      HybridModel g(c, *be);
      randomize_params(g, 900 + k);
      const test::InvarianceSchedules sched(910 + k, c.vocab_size);
      be->set_batch_invariant(true);
      EXPECT_TRUE(be->batch_invariant());
      const std::vector<float> ref = sched.run(g, kv, 0);
      ASSERT_EQ(ref.size(), size_t(1 + sched.kSteps) * c.vocab_size);
      for (size_t i = 1; i < sched.size(); ++i) {
        const std::vector<float> got = sched.run(g, kv, i);
        ASSERT_EQ(got.size(), ref.size()) << "schedule " << i;
        EXPECT_TRUE(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(float)) == 0)
            << "schedule " << i << ": rel err " << rel_err(got, ref);
      }
      // The default mode: the same model within float rounding of it (sgemm for the prompts).
      be->set_batch_invariant(false);
      EXPECT_LT(rel_err(sched.run(g, kv, 2), ref), 1e-4);
    }
    ++k;
  }
}

// The parameter arena pads each tensor to 16 floats; the padding is 0 from construction, so the
// arena is defined as a whole (a device's master copy, all_finite and sums read it as one block).
// A True Hybrid layer's router has tensors of 2 and 1 floats, padded by 14 and 15. (A fresh large
// allocation is often zero anyway: the ASan run of scripts/test.sh fills every new allocation
// with 0xFF, which is where this test can fail.)
TEST(Model, ParamArenaPaddingIsZero) {
  ModelConfig c = preset("true-tiny");
  validate(c);
  const Params p(c);
  int64_t padded = 0;
  for (size_t k = 0; k < p.specs().size(); ++k) {
    const int64_t end = (p.at(k) - p.data()) + p.specs()[k].numel();
    const int64_t next = k + 1 < p.specs().size() ? p.at(k + 1) - p.data() : p.numel();
    for (int64_t i = end; i < next; ++i) {
      EXPECT_EQ(p.data()[i], 0.0f) << p.specs()[k].name << " + " << i - end;
      ++padded;
    }
  }
  EXPECT_GT(padded, 0);
}
