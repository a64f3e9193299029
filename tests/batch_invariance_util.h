// The schedules of the batch-invariance tests (Model.* on the CPU, CudaModel.* on the GPU):
// one sequence X (slot 0) run alone in one prefill, with its prompt cut at 64 and 128 tokens,
// beside other sequences' prompt chunks and decode steps, and in decode batches of other sizes.
// run() returns X's logits rows (its prompt's last row, then each decode step): equal bits in
// batch-invariant mode.
#pragma once
#include <cstdint>
#include <vector>

#include "core/rng.h"
#include "model/model.h"
#include "runtime/memory.h"
#include "test_util.h"

namespace hm::test {

class InvarianceSchedules {
 public:
  static constexpr int kPrompt = 150, kSteps = 6;
  struct Step {
    int x_end;                 // X's prompt fed up to here, or -1: X decodes, 0: X idle
    std::vector<int> prompts;  // others (slot o + 1) that prefill their whole prompt this step
    std::vector<int> decodes;  // others that decode one token this step
  };

  InvarianceSchedules(uint64_t seed, int vocab) : V_(vocab) {
    Rng rng(seed);
    X_ = tokens(rng, kPrompt, V_);
    dec_ = tokens(rng, kSteps, V_);
    for (int L : {40, 97, 130, 200, 65}) others_.push_back(tokens(rng, L, V_));
    const int P = kPrompt;
    scheds_.push_back({{P, {}, {}}});                                    // 0: alone, one prefill
    scheds_.push_back({{64, {}, {}}, {128, {}, {}}, {P, {}, {}}});       // 1: alone, cut at 64 and 128
    scheds_.push_back({{128, {0, 1, 2}, {}}, {P, {3}, {0, 1, 2}}, {-1, {}, {0, 1, 2, 3}},
                       {-1, {4}, {0, 2}}, {-1, {}, {0, 1, 2, 3, 4}}});   // 2: beside prompts, mixed batches
    scheds_.push_back({{0, {0, 4}, {}}, {64, {}, {0, 4}}, {0, {1}, {0}}, {P, {}, {0, 1, 4}}});  // 3: idle steps
    for (size_t i = 0; i < scheds_.size(); ++i)
      for (int t = i == 2 ? 3 : 0; t < kSteps; ++t)
        scheds_[i].push_back(i == 2 ? Step{-1, {}, {1, 3}} : i == 3 ? Step{-1, {}, {t % 2}} : Step{-1, {}, {}});
  }
  size_t size() const { return scheds_.size(); }

  // Schedule i on fresh memory (6 slots of 512 positions) of the model's backend.
  std::vector<float> run(HybridModel& m, KvType kv, size_t i) const {
    HybridMemory mem(m.backend(), m.config(), 6, 512, kv);
    std::vector<float> xs, l;
    int x_fed = 0, x_dec = 0;
    for (const Step& st : scheds_[i]) {
      Batch b;
      int x_row = -1;
      for (int o : st.decodes) b.add(o + 1, {int32_t((o * 7 + 3) % V_)});
      if (st.x_end > 0) {
        x_row = int(b.seqs.size());
        b.add(0, std::vector<int32_t>(X_.begin() + x_fed, X_.begin() + st.x_end));
        x_fed = st.x_end;
      } else if (st.x_end < 0) {
        x_row = int(b.seqs.size());
        b.add(0, {dec_[size_t(x_dec++)]});
      }
      for (int o : st.prompts) b.add(o + 1, others_[size_t(o)]);
      m.forward(b, mem, l);
      if (x_row >= 0 && (st.x_end < 0 || x_fed == kPrompt))
        xs.insert(xs.end(), l.begin() + ptrdiff_t(x_row) * V_, l.begin() + ptrdiff_t(x_row + 1) * V_);
    }
    return xs;
  }

 private:
  int V_;
  std::vector<int32_t> X_, dec_;
  std::vector<std::vector<int32_t>> others_;
  std::vector<std::vector<Step>> scheds_;
};

}  // namespace hm::test
