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

Output run(Engine& e, const GenParams& g) {
  auto r = e.submit(g);
  Output out;
  std::vector<Event> ev;
  while (r->next(ev, std::chrono::milliseconds(50))) {
    for (const auto& x : ev) out.text += x.text;
    ev.clear();
  }
  out.finish = r->finish();
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

}  // namespace
}  // namespace hm::server
