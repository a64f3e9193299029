// Generation on the CUDA backend (runtime/generate.cpp): the logits stay on the device and the
// device sampler picks the tokens. Its tokens must equal the CPU sampling chain's on the same
// logits with the same seeds: the test replays every forward the Generator ran (the same ragged
// batches, so the device computes the same logits) with host logits and the CPU chain.
// Without a GPU every case is GTEST_SKIPped.
#include <gtest/gtest.h>

#include <algorithm>

#include "backend/backend.h"
#include "model/config.h"
#include "model/model.h"
#include "runtime/generate.h"
#include "runtime/memory.h"
#include "runtime/sampling.h"
#include "../test_util.h"

namespace hm {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device"

// The tiny preset at head_dim 32 (the CUDA attention kernels take 32, 64 and 128).
ModelConfig gpu_tiny() {
  ModelConfig c = preset("tiny");
  c.d_model = 64;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  return c;
}

struct Case {
  const char* name;
  SamplingParams sp;
  DType dtype;
};

class CudaGenerate : public ::testing::TestWithParam<int> {};

TEST_P(CudaGenerate, DeviceSamplingEqualsTheCpuChain) {
  SKIP_WITHOUT_GPU();
  SamplingParams defaults;  // temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, penalty 1.1 over 64
  SamplingParams greedy;
  greedy.temperature = 0;
  greedy.repeat_penalty = 1.3f;
  greedy.repeat_last_n = 8;
  SamplingParams wide;  // top-p alone over a flat distribution: TopP's bucket path
  wide.temperature = 1.5f;
  wide.top_k = 0;
  wide.top_p = 0.99f;
  wide.min_p = 0;
  const Case cases[] = {{"defaults f32", defaults, DType::F32},
                        {"greedy with a penalty, bf16", greedy, DType::BF16},
                        {"top-p alone, bf16", wide, DType::BF16}};
  const Case& k = cases[GetParam()];
  SCOPED_TRACE(k.name);
  const ModelConfig c = gpu_tiny();
  auto be = make_backend(Device::CUDA);
  HybridModel m(c, *be, k.dtype);
  test::randomize_params(m, 5);
  m.prepare();
  Rng rng(9);
  const std::vector<std::vector<int32_t>> prompts = {test::tokens(rng, 5, c.vocab_size), test::tokens(rng, 1, c.vocab_size),
                                                     test::tokens(rng, 12, c.vocab_size)};
  const int n = int(prompts.size()), V = c.vocab_size, n_new = 24, stop_seq = 1, stop_after = 6;
  GenerateOptions opt;
  opt.max_new_tokens = n_new;
  opt.sampling = k.sp;
  opt.sampling.seed = 11;
  opt.n_decodable = V - 3;  // the VocabLimit cut
  opt.prefill_chunk = 4;    // the prompts end in different prefill forwards
  HybridMemory mem(*be, c, n, 64, DType::F32);
  std::vector<std::vector<int32_t>> got(static_cast<size_t>(n));
  {
    Generator g(m, mem, prompts, opt);
    ASSERT_TRUE(g.samples_on_device());
    for (;;) {
      const auto& step = g.next();
      if (step.empty()) break;
      for (const auto& [seq, tok] : step) got[size_t(seq)].push_back(tok);
      if (int(got[stop_seq].size()) == stop_after) g.stop(stop_seq);
    }
  }
  ASSERT_EQ(int(got[stop_seq].size()), stop_after);

  // The replay: the Generator's forwards in its order, host logits, one CPU chain per sequence.
  std::vector<std::unique_ptr<SamplerChain>> chains;
  for (int i = 0; i < n; ++i) {
    SamplingParams sp = opt.sampling;
    sp.seed += uint64_t(i);
    chains.push_back(make_sampler_chain(sp, opt.n_decodable));
    for (int32_t t : prompts[size_t(i)]) chains.back()->accept(t);
    mem.seq_rm(i);
  }
  std::vector<std::vector<int32_t>> want(static_cast<size_t>(n));
  std::vector<float> logits;
  std::vector<size_t> done(static_cast<size_t>(n), 0);
  std::vector<int32_t> next(static_cast<size_t>(n));
  for (bool more = true; more;) {
    Batch b;
    std::vector<int> who;
    for (int i = 0; i < n; ++i) {
      const auto& p = prompts[size_t(i)];
      if (done[size_t(i)] == p.size()) continue;
      const size_t take = std::min(p.size() - done[size_t(i)], size_t(opt.prefill_chunk));
      b.add(i, std::vector<int32_t>(p.begin() + long(done[size_t(i)]), p.begin() + long(done[size_t(i)] + take)));
      done[size_t(i)] += take;
      who.push_back(i);
    }
    if (who.empty()) break;
    m.forward(b, mem, logits);
    for (size_t r = 0; r < who.size(); ++r)
      if (done[size_t(who[r])] == prompts[size_t(who[r])].size())
        next[size_t(who[r])] = chains[size_t(who[r])]->sample(logits.data() + r * size_t(V), V);
    more = false;
    for (int i = 0; i < n; ++i) more = more || done[size_t(i)] < prompts[size_t(i)].size();
  }
  std::vector<bool> live(static_cast<size_t>(n), true);
  for (int s = 0; s < n_new; ++s) {
    if (s > 0) {
      Batch b;
      std::vector<int> who;
      for (int i = 0; i < n; ++i)
        if (live[size_t(i)]) {
          b.add(i, {want[size_t(i)].back()});
          who.push_back(i);
        }
      if (who.empty()) break;
      m.forward(b, mem, logits);
      for (size_t r = 0; r < who.size(); ++r)
        next[size_t(who[r])] = chains[size_t(who[r])]->sample(logits.data() + r * size_t(V), V);
    }
    for (int i = 0; i < n; ++i) {
      if (!live[size_t(i)]) continue;
      want[size_t(i)].push_back(next[size_t(i)]);
      chains[size_t(i)]->accept(next[size_t(i)]);
      if (int(want[size_t(i)].size()) >= n_new || (i == stop_seq && int(want[size_t(i)].size()) == stop_after))
        live[size_t(i)] = false;
    }
  }
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(got[size_t(i)], want[size_t(i)]) << "sequence " << i;
    for (int32_t t : got[size_t(i)]) EXPECT_LT(t, opt.n_decodable);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaGenerate, ::testing::Values(0, 1, 2));

// A window longer than the device sampler holds is refused with the field named.
TEST(CudaGenerateErrors, RepeatWindowOverTheDeviceLimit) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = gpu_tiny();
  auto be = make_backend(Device::CUDA);
  HybridModel m(c, *be);
  m.prepare();
  HybridMemory mem(*be, c, 1, 16, DType::BF16);
  GenerateOptions opt;
  opt.max_new_tokens = 2;
  opt.sampling.repeat_last_n = 2000;
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3}};
  try {
    Generator g(m, mem, prompts, opt);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("repeat_last_n 2000 exceeds the CUDA sampler's window"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace hm
