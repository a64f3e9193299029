// Encoding throughput of a tokenizer folder on one text file: best of 5 runs, one thread.
// bench/tokenizer_vs_hf.sh runs it beside Hugging Face's tokenizers on the same text.
//   hm_bench_tokenizer MODEL_DIR TEXT_FILE
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "runtime/tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s MODEL_DIR TEXT_FILE\n", argv[0]);
    return 2;
  }
  try {
    std::ifstream f(argv[2], std::ios::binary);
    HM_CHECK(f.good(), "cannot read ", argv[2]);
    std::ostringstream ss;
    ss << f.rdbuf();
    const std::string text = ss.str();
    const auto tok = hm::load_tokenizer(argv[1]);
    size_t tokens = 0;
    double best = 1e30;
    for (int r = 0; r < 5; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      tokens = tok->encode(text, false).size();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("{\"impl\": \"hm\", \"bytes\": %zu, \"tokens\": %zu, \"seconds\": %.4f, \"mb_per_s\": %.2f}\n",
                text.size(), tokens, best, double(text.size()) / best / 1e6);
    return 0;
  } catch (const hm::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
