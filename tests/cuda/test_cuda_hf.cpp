// Hugging Face models on the CUDA backend against transformers (issue 14: "the same logits as
// transformers, on CPU and ... on CUDA"): every fixture folder of tests/fixtures/hf (written by
// make_fixtures.py from transformers' float32 forward), loaded as `hm --model DIR --device cuda`
// loads it, over the whole sequence and token by token. Float32 compute is held to the CPU
// tests' bound; bf16 compute to a bound of its rounding. Without a GPU the test is skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "io/hf_model.h"
#include "model/model.h"
#include "../hf_test_util.h"
#include "../test_util.h"

namespace hm {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The device machine runs the tests from a copy of the repository (its root the working
// directory); here, the source tree.
fs::path fixtures_dir() {
  const fs::path local = fs::path("tests") / "fixtures" / "hf";
  return fs::exists(local) ? local : fs::path(HM_SOURCE_DIR) / "tests" / "fixtures" / "hf";
}

std::vector<fs::path> fixture_folders() {
  std::vector<fs::path> out;
  if (!fs::exists(fixtures_dir())) return out;
  for (const auto& e : fs::directory_iterator(fixtures_dir()))
    if (fs::exists(e.path() / "expected.json") && fs::exists(e.path() / "logits.f32")) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

std::unique_ptr<HybridModel> load_on(const fs::path& dir, Backend& be, DType dtype) {
  auto m = std::make_unique<HybridModel>(load_hf_config(dir.string()), be, dtype);
  load_hf_params(m->params(), dir.string());
  m->prepare();
  return m;
}

TEST(CudaHf, LogitsMatchTransformers) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const std::vector<fs::path> dirs = fixture_folders();
  ASSERT_FALSE(dirs.empty()) << "no fixture folders under " << fixtures_dir();
  auto be = make_cuda_backend();
  int ran = 0;
  std::vector<std::string> not_run;
  for (const fs::path& dir : dirs) {
    SCOPED_TRACE(dir.filename().string());
    const json exp = test::read_json(dir / "expected.json");
    const std::vector<int32_t> toks = exp["tokens"].get<std::vector<int32_t>>();
    const std::vector<float> want = test::read_f32_file(dir / "logits.f32");
    const ModelConfig c = load_hf_config(dir.string());
    // The CUDA attention kernels take head_dim 32, 64 and 128 (every published hybrid uses 64
    // or 128); a tiny fixture of another width cannot run here, and is listed, not hidden.
    bool attention = false;
    for (int l = 0; l < c.n_layers; ++l) attention = attention || c.has_attention_path(l);
    const int hd = attention ? c.head_dim() : 0;
    if (attention && hd != 32 && hd != 64 && hd != 128) {
      not_run.push_back(dir.filename().string() + " (head_dim " + std::to_string(hd) + ")");
      continue;
    }
    ASSERT_EQ(want.size(), toks.size() * size_t(c.vocab_size));
    for (const DType dt : {DType::F32, DType::BF16}) {
      auto m = load_on(dir, *be, dt);
      const double e_full = test::rel_err(test::forward_all(*m, toks), want);
      const double e_step = test::rel_err(test::forward_stepwise(*m, toks), want);
      std::printf("%s on cuda, %s compute: max|ours - transformers| / max|transformers| = %.3g full forward, "
                  "%.3g token by token\n", dir.filename().c_str(), dt == DType::F32 ? "f32" : "bf16", e_full, e_step);
      // transformers ran in float32; bf16 compute rounds weights and activations (8 bits).
      const double bound = dt == DType::F32 ? 1e-4 : 5e-2;
      EXPECT_LT(e_full, bound) << dtype_name(dt);
      EXPECT_LT(e_step, bound) << dtype_name(dt);
    }
    ++ran;
  }
  for (const auto& s : not_run) std::printf("not run on cuda: %s\n", s.c_str());
  EXPECT_GT(ran, 0) << "no fixture could run on CUDA";
}

}  // namespace
}  // namespace hm
