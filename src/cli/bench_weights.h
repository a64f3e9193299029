// hm bench --weights f32,bf16,f16,q8_0,q4_0 (issue 17): one model measured with its linear weights in
// each format, in one run on the CPU, so the ratios hold on a noisy machine.
#pragma once
#include <nlohmann/json.hpp>
#include <vector>

#include "model/model.h"

namespace hm::cli {

// For each format (a copy of src's parameters packed in it): weight bytes, the bytes a decoded
// token reads, decode tok/s at batch 1 (50 tokens after a 32-token prompt), its fraction of
// the DRAM floor read_bw_gbs / bytes per token, prefill ms per token (512 tokens, one chunk),
// the resident bytes the model holds after loading (release_float_weights for packed formats),
// and the last-position logits' max |difference| / max |f32 logit| over a 64-token prompt.
// The repetitions of all formats are interleaved; each figure is the median of reps after one
// warm-up.
nlohmann::json bench_weight_formats(const HybridModel& src, const std::vector<DType>& formats, KvType kv,
                                    int reps, double read_bw_gbs, bool quiet);
void print_weight_formats(const nlohmann::json& r);

}  // namespace hm::cli
