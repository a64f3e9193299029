// Routing analysis of a true-hybrid model (the seed's get_routing_analysis): which path each
// true-hybrid layer gave each token of a prompt, and how the work split between them.
#pragma once
#include <cstdint>
#include <vector>

#include "model/model.h"

namespace hm {

// Shares of the routing weight, fractions that sum to 1 (th::attention_share: hard 1/0 per
// token, soft p / 1 - p, both 1/2 each).
struct PathUsage {
  double mamba = 0, attention = 0;
};

struct LayerRouting {
  int layer = 0;                        // model layer index
  std::vector<double> attention_share;  // [T]
  std::vector<th::Route> route;         // [T]
  std::vector<double> p;                // [T] the router's attention probability
  PathUsage usage;                      // mean over the tokens
};

struct RoutingAnalysis {
  std::vector<LayerRouting> layers;  // the true-hybrid layers, in model order
  PathUsage average_usage;           // mean over true-hybrid layers and tokens
  th::Mode mode = th::Mode::Soft;
};

// Runs one prefill of `tokens` on a fresh one-sequence memory (float32 K/V) and reports the
// routes. hm::Error for a model without true-hybrid layers or an empty token list.
RoutingAnalysis get_routing_analysis(HybridModel& m, const std::vector<int32_t>& tokens);

}  // namespace hm
