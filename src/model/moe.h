// Mixture-of-experts routing, decided on the host from the router's logits: the one definition
// inference (HybridModel::moe) and training (BatchGrad) share, with the gradient of the gates
// back to the logits for training.
#pragma once
#include <cstdint>
#include <vector>

#include "model/config.h"

namespace hm {

struct MoeRouting {
  int T = 0, X = 0, k = 0;
  std::vector<float> probs;                // [T, X]: scores s = softmax or sigmoid of the logits
  std::vector<int32_t> chosen;             // [T, k]: each token's experts, best first
  std::vector<float> gate;                 // [T, k]: their gates
  std::vector<double> top;                 // [T]: the chosen experts' summed scores
  std::vector<std::vector<int32_t>> rows;  // per expert: the tokens routed to it, in order
  std::vector<std::vector<float>> gates;   // per expert: those tokens' gates
};

// Scores s = softmax(logits), or sigmoid(logits) (moe_router "sigmoid"), which picks the experts
// by s + correction bias (corr, [X]; sigmoid only), among the moe_topk_groups best groups when
// moe_groups > 1 (a group's score: the sum of its two best choice scores), as transformers'
// NemotronHMoE and DeepSeek-V3 route; the k best, ties to the lower index. Gate g_e = s_e, divided
// by the chosen experts' sum when moe_renormalize, times moe_scaling (residual_multiplier applies
// to the layer's whole output, as to any FFN's).
// logits: [T, X] floats. forced ([T, k], optional): the experts to choose instead, best first (the
// gates follow the new scores; BatchGrad::freeze_routing).
void moe_route(const ModelConfig& c, const float* logits, const float* corr, int T, MoeRouting& r,
               const int32_t* forced = nullptr);

// dlogits [T, X] (assigned) from dgate [T, k], the loss's gradient with respect to each chosen
// expert's gate: through the renormalization and the softmax or sigmoid, with the choice held
// fixed (it is piecewise constant; the correction bias gets no gradient, as in transformers,
// where it is a buffer).
void moe_route_backward(const ModelConfig& c, const MoeRouting& r, const double* dgate, double* dlogits);

}  // namespace hm
