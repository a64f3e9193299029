#include "model/routing.h"

#include "core/error.h"

namespace hm {

RoutingAnalysis get_routing_analysis(HybridModel& m, const std::vector<int32_t>& tokens) {
  const ModelConfig& c = m.config();
  HM_CHECK(!c.true_layers.empty(), "routing analysis: the model has no true-hybrid layers (its "
           "config has \"hybrid\": \"", c.hybrid, "\"); routes exist only in true_layers");
  HM_CHECK(!tokens.empty(), "routing analysis: the prompt has no tokens");
  HybridMemory mem(m.backend(), c, 1, int(tokens.size()), KvType::F32);
  Batch b;
  b.add(0, tokens);
  std::vector<float> logits;
  RouteTrace trace;
  // Restore no tracing on every exit: the trace is a local.
  struct Untrace {
    HybridModel& m;
    ~Untrace() { m.set_route_trace(nullptr); }
  } untrace{m};
  m.set_route_trace(&trace);
  m.forward(b, mem, logits);

  RoutingAnalysis r;
  r.mode = th::mode_from_config(c);
  const size_t T = tokens.size();
  for (size_t i = 0; i < trace.layers.size(); ++i) {
    HM_ASSERT(trace.attention_share[i].size() == T);
    LayerRouting lr;
    lr.layer = trace.layers[i];
    lr.attention_share = trace.attention_share[i];
    lr.route = trace.route[i];
    lr.p.assign(trace.p[i].begin(), trace.p[i].end());
    double a = 0;
    for (double s : lr.attention_share) a += s;
    lr.usage.attention = a / double(T);
    lr.usage.mamba = 1.0 - lr.usage.attention;
    r.average_usage.attention += lr.usage.attention;
    r.layers.push_back(std::move(lr));
  }
  r.average_usage.attention /= double(r.layers.size());
  r.average_usage.mamba = 1.0 - r.average_usage.attention;
  return r;
}

}  // namespace hm
