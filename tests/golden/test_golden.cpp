// Our logits against the PyTorch peer's (bench/torch_peer.py golden) on the tiny preset:
// one full forward, token-by-token decoding, and a chunked prefill followed by decoding,
// with a float32 KV cache (max relative error <= 1e-4), and the default f16 cache (<= 5e-3).
// The fixture that writes the files is in tests/golden.cmake.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "backend/backend.h"
#include "io/safetensors.h"
#include "model/model.h"

using namespace hm;

namespace {
const std::string kDir = std::string(HM_BINARY_DIR) + "/golden/tiny";

struct Golden {
  int B = 0, L = 0, V = 0;
  std::vector<int32_t> tokens;
  std::vector<float> full, decode, split;
};

Golden load_golden() {
  SafetensorsReader r(kDir + "/golden.safetensors");
  Golden g;
  const TensorInfo* t = r.find("tokens");
  EXPECT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, DType::I32);
  g.B = int(t->shape[0]);
  g.L = int(t->shape[1]);
  g.tokens.resize(size_t(g.B) * g.L);
  r.read_raw(*t, g.tokens.data());
  g.V = int(r.find("logits_full")->shape[2]);
  const std::vector<int64_t> shape = {g.B, g.L, g.V};
  for (auto [name, dst] : {std::pair{"logits_full", &g.full}, {"logits_decode", &g.decode},
                           {"logits_prefill_split", &g.split}}) {
    dst->resize(size_t(g.B) * g.L * g.V);
    r.read_f32(name, shape, dst->data());
  }
  return g;
}

// max |ours - theirs| / max |theirs|
double rel_err(const std::vector<float>& ours, const std::vector<float>& theirs) {
  double num = 0, den = 0;
  for (size_t i = 0; i < theirs.size(); ++i) {
    num = std::max(num, double(std::fabs(ours[i] - theirs[i])));
    den = std::max(den, double(std::fabs(theirs[i])));
  }
  return num / den;
}

// Runs the B sequences: the first `prefill` tokens of each as one chunk, then one token per step
// for all sequences together. Returns logits laid out [B, L, V].
std::vector<float> run(HybridModel& m, const Golden& g, int prefill, KvType kv = KvType::F32) {
  HybridMemory mem(m.backend(), m.config(), g.B, g.L, kv);
  std::vector<float> out(size_t(g.B) * g.L * g.V), logits;
  auto put = [&](int b, int t, const float* src) {
    std::memcpy(out.data() + (size_t(b) * g.L + t) * g.V, src, sizeof(float) * size_t(g.V));
  };
  Batch first;
  first.logits_all = true;
  for (int b = 0; b < g.B; ++b)
    first.add(b, std::vector<int32_t>(g.tokens.begin() + long(b) * g.L, g.tokens.begin() + long(b) * g.L + prefill));
  m.forward(first, mem, logits);
  for (int b = 0; b < g.B; ++b)
    for (int t = 0; t < prefill; ++t) put(b, t, logits.data() + (size_t(b) * prefill + t) * g.V);
  for (int t = prefill; t < g.L; ++t) {
    Batch step;
    for (int b = 0; b < g.B; ++b) step.add(b, {g.tokens[size_t(b) * g.L + t]});
    m.forward(step, mem, logits);
    for (int b = 0; b < g.B; ++b) put(b, t, logits.data() + size_t(b) * g.V);
  }
  return out;
}
}  // namespace

TEST(Golden, FullForwardMatchesPyTorch) {
  auto be = make_cpu_backend();
  auto m = load_model(kDir, *be);
  const Golden g = load_golden();
  ASSERT_EQ(g.V, m->config().vocab_size);
  EXPECT_LT(rel_err(run(*m, g, g.L), g.full), 1e-4);
}

TEST(Golden, TokenByTokenDecodingMatchesPyTorch) {
  auto be = make_cpu_backend();
  auto m = load_model(kDir, *be);
  const Golden g = load_golden();
  EXPECT_LT(rel_err(run(*m, g, 1), g.decode), 1e-4);
}

TEST(Golden, ChunkedPrefillThenDecodeMatchesPyTorch) {
  auto be = make_cpu_backend();
  auto m = load_model(kDir, *be);
  const Golden g = load_golden();
  EXPECT_LT(rel_err(run(*m, g, g.L / 2), g.split), 1e-4);
}

TEST(Golden, HalfPrecisionCacheStaysClose) {
  // The default f16 KV cache rounds K and V to 11 significant bits; the logits move by about
  // that relative amount, not more.
  auto be = make_cpu_backend();
  auto m = load_model(kDir, *be);
  const Golden g = load_golden();
  EXPECT_LT(rel_err(run(*m, g, 1, KvType::F16), g.decode), 5e-3);
  EXPECT_LT(rel_err(run(*m, g, g.L, KvType::F16), g.full), 5e-3);
}

TEST(Golden, PeerAgreesWithItself) {
  // The peer's own decode must match its full forward; otherwise the goldens are not a reference.
  const Golden g = load_golden();
  EXPECT_LT(rel_err(g.decode, g.full), 1e-4);
  EXPECT_LT(rel_err(g.split, g.full), 1e-4);
}
