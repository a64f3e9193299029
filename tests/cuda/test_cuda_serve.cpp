// hm serve's engine on CUDA (src/server/engine.cpp): requests sampled on the device, where only
// the token ids come back, give the text of the same engine sampling on the host from the same
// logits (one request at a time, so both engines run the same batches); requests that need their
// logits on the host (presence penalty, logprobs) read back their row and still run. Without a
// GPU every case is GTEST_SKIPped.
#include <gtest/gtest.h>

#include <string>

#include "backend/backend.h"
#include "model/config.h"
#include "model/model.h"
#include "runtime/tokenizer.h"
#include "server/engine.h"
#include "../test_util.h"

namespace hm::server {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device"

struct Output {
  std::string text;
  Finish finish = Finish::None;
};

// cached: where to put the prompt tokens the request took from the prefix cache.
Output run(Engine& e, const GenParams& g, int* cached = nullptr) {
  auto r = e.submit(g);
  Output out;
  std::vector<Event> ev;
  while (r->next(ev, std::chrono::milliseconds(50))) {
    for (const auto& x : ev) out.text += x.text;
    ev.clear();
  }
  out.finish = r->finish();
  if (cached) *cached = r->cached_tokens();
  return out;
}

TEST(CudaServe, DeviceSamplingEqualsHostSampling) {
  SKIP_WITHOUT_GPU();
  ModelConfig c = preset("tiny");
  c.d_model = 64;  // head_dim 32: the CUDA attention takes 32, 64 and 128
  c.n_heads = 2;
  c.n_kv_heads = 1;
  auto be = make_backend(Device::CUDA);
  HybridModel m(c, *be, DType::F32);
  test::randomize_params(m, 7);
  m.prepare();
  ByteTokenizer tok;
  Rng rng(3);
  std::vector<GenParams> reqs;
  for (int k = 0; k < 4; ++k) {
    GenParams g;
    g.prompt = test::tokens(rng, 5 + 7 * k, std::min(c.vocab_size, tok.vocab_size()));
    g.max_tokens = 20;
    g.ignore_eos = true;
    g.sampling.seed = 100 + uint64_t(k);
    if (k == 0) g.sampling.temperature = 0;  // greedy
    if (k == 2) {                            // greedy with the repetition penalty over a short window
      g.sampling.temperature = 0;
      g.sampling.repeat_penalty = 1.3f;
      g.sampling.repeat_last_n = 8;
    }
    if (k == 3) g.presence_penalty = 0.5f;  // host-side on CUDA too: its row comes back
    reqs.push_back(g);
  }
  std::vector<Output> on_device, on_host;
  int64_t device_sampled = 0;
  for (bool dev : {true, false}) {
    EngineOptions o;
    o.slots = 2;
    o.ctx = 128;
    o.block = 8;
    o.cache_bytes = 0;
    o.device_sampling = dev;
    Engine e(m, tok, o, KvType::F32);
    for (const GenParams& g : reqs) (dev ? on_device : on_host).push_back(run(e, g));
    if (dev) device_sampled = e.stats().device_sampled;
    else EXPECT_EQ(e.stats().device_sampled, 0);
  }
  // Requests 0-2 sample on the device: 20 tokens each.
  EXPECT_EQ(device_sampled, 3 * 20);
  for (size_t k = 0; k < reqs.size(); ++k) {
    EXPECT_EQ(on_device[k].finish, Finish::Length) << "request " << k;
    EXPECT_EQ(on_device[k].text, on_host[k].text) << "request " << k;
  }
}

// The prefix cache on the device: a hit restores K/V rows and the recurrent state with one
// copy_many and computes only the rest, and greedy decoding then gives the text of the same
// prompt without the cache. Batch-invariant mode makes that an exact comparison (a restored
// prefix cuts the prompt into other chunks than one whole forward). Simple and True Hybrid
// (hard routes: K/V rows for some tokens only).
TEST(CudaServe, PrefixCacheHitEqualsNoCache) {
  SKIP_WITHOUT_GPU();
  for (const char* name : {"tiny", "true-tiny"}) {
    SCOPED_TRACE(name);
    ModelConfig c = preset(name);
    c.d_model = 64;  // head_dim 32
    c.n_heads = 2;
    c.n_kv_heads = 1;
    if (std::string(name) == "true-tiny") c.routing_mode = "hard";
    auto be = make_backend(Device::CUDA);
    be->set_batch_invariant(true);
    HybridModel m(c, *be, DType::F32);
    test::randomize_params(m, 9);
    m.prepare();
    ByteTokenizer tok;
    Rng rng(21);
    const int vocab = std::min(c.vocab_size, tok.vocab_size());
    const std::vector<int32_t> shared = test::tokens(rng, 75, vocab);
    std::vector<GenParams> reqs;
    for (int k = 0; k < 3; ++k) {
      GenParams g;
      g.prompt = shared;
      const std::vector<int32_t> tail = test::tokens(rng, 2 + 9 * k, vocab);
      g.prompt.insert(g.prompt.end(), tail.begin(), tail.end());
      g.max_tokens = 12;
      g.ignore_eos = true;
      g.sampling.temperature = 0;
      reqs.push_back(g);
    }
    std::vector<Output> cached, plain;
    std::vector<int> hit_tokens;
    for (bool cache : {true, false}) {
      EngineOptions o;
      o.slots = 2;
      o.ctx = 256;
      o.block = 8;
      o.step_tokens = 32;
      o.cache_bytes = cache ? (16u << 20) : 0;
      Engine e(m, tok, o, KvType::F32);
      for (const GenParams& g : reqs) {
        int hit = 0;
        (cache ? cached : plain).push_back(run(e, g, &hit));
        if (cache) hit_tokens.push_back(hit);
      }
      if (cache) {
        EXPECT_EQ(e.stats().cache.hits, 2);
      }
    }
    EXPECT_EQ(hit_tokens[0], 0);
    for (size_t k = 1; k < reqs.size(); ++k) {
      EXPECT_GE(hit_tokens[k], 64) << "request " << k;
      EXPECT_EQ(hit_tokens[k] % 8, 0) << "request " << k;
    }
    for (size_t k = 0; k < reqs.size(); ++k) {
      EXPECT_EQ(cached[k].finish, Finish::Length) << "request " << k;
      EXPECT_FALSE(cached[k].text.empty()) << "request " << k;
      EXPECT_EQ(cached[k].text, plain[k].text) << "request " << k;
    }
  }
}

}  // namespace
}  // namespace hm::server
