// Fuzz target: a trainer_state.json through everything that reads one: `hm train --resume`
// (train() with resume), checkpoint_task and evaluate. The checkpoint around it is real: the
// first input trains the tiny preset for 2 steps on a small text, and every input then replaces
// only checkpoint/trainer_state.json. Resume stops at step 2 (stop_after), so a state that
// passes every check costs no training. Bad states must end in hm::Error.
#include <cstdint>
#include <filesystem>
#include <string>

#include "core/error.h"
#include "fuzz_util.h"
#include "train/trainer.h"

namespace {

namespace fs = std::filesystem;

struct Run {
  fs::path out, data;
};

const Run& run() {
  static const Run r = [] {
    Run x;
    x.out = hm::fuzz::scratch_dir() / "run";
    x.data = hm::fuzz::scratch_dir() / "data.txt";
    std::string text;
    for (int i = 0; i < 60; ++i)
      text += "Line " + std::to_string(i) + " of a small corpus: the quick brown fox jumps over the lazy dog.\n";
    hm::fuzz::write_file(x.data, text);
    hm::TrainConfig c;
    c.preset = "tiny";
    c.data_path = x.data.string();
    c.out_dir = x.out.string();
    c.steps = 2;
    c.batch = 2;
    c.seq_len = 16;
    c.threads = 1;
    c.eval_tokens = 64;
    c.progress = false;
    hm::train(c);
    return x;
  }();
  return r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Run& r = run();
  hm::fuzz::write_file(r.out / "checkpoint" / "trainer_state.json",
                       std::string_view(reinterpret_cast<const char*>(data), size));
  hm::TrainConfig c;
  c.data_path = r.data.string();
  c.out_dir = r.out.string();
  c.resume = true;
  c.stop_after = 2;
  c.threads = 1;
  c.progress = false;
  try {
    hm::train(c);
  } catch (const hm::Error&) {
  }
  try {
    int64_t step = 0;
    (void)hm::checkpoint_task(r.out.string(), &step);
  } catch (const hm::Error&) {
  }
  try {
    (void)hm::evaluate(r.out.string(), r.data.string(), 0, -1, 2);
  } catch (const hm::Error&) {
  }
  return 0;
}
