#include "runtime/generate.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"

namespace hm {

namespace {
double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

std::vector<std::vector<int32_t>> generate(HybridModel& model, HybridMemory& mem,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& opt, const TokenCallback& on_token,
                                           GenerateStats* stats) {
  const int n = int(prompts.size()), V = model.config().vocab_size;
  HM_CHECK(n > 0, "generate: no prompts");
  HM_CHECK(n <= mem.n_slots(), "generate: ", n, " prompts but the memory has ", mem.n_slots(), " slots");
  HM_CHECK(opt.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0, got ", opt.max_new_tokens);
  HM_CHECK(opt.prefill_chunk > 0, "generate: prefill_chunk must be > 0");
  validate(opt.sampling);
  for (int i = 0; i < n; ++i) {
    HM_CHECK(!prompts[size_t(i)].empty(), "generate: prompt ", i, " is empty");
    const int64_t need = int64_t(prompts[size_t(i)].size()) + opt.max_new_tokens;
    HM_CHECK(need <= mem.max_ctx(), "generate: prompt ", i, " (", prompts[size_t(i)].size(),
             " tokens) plus ", opt.max_new_tokens, " new tokens exceeds the context size ", mem.max_ctx());
  }
  const int n_decodable = opt.n_decodable > 0 ? std::min(opt.n_decodable, V) : V;

  std::vector<std::unique_ptr<SamplerChain>> samplers;
  for (int i = 0; i < n; ++i) {
    SamplingParams sp = opt.sampling;
    sp.seed += uint64_t(i);
    samplers.push_back(make_sampler_chain(sp, n_decodable));
    for (int32_t tok : prompts[size_t(i)]) samplers.back()->accept(tok);
    mem.seq_rm(i);
  }

  // Prefill, chunked: each forward takes up to prefill_chunk tokens of every unfinished prompt.
  auto t0 = std::chrono::steady_clock::now();
  std::vector<float> logits;
  std::vector<std::vector<float>> last_logits(static_cast<size_t>(n));
  std::vector<size_t> done(size_t(n), 0);
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
    model.forward(b, mem, logits);
    for (size_t k = 0; k < who.size(); ++k)
      if (done[size_t(who[k])] == prompts[size_t(who[k])].size())
        last_logits[size_t(who[k])].assign(logits.begin() + long(k * size_t(V)), logits.begin() + long((k + 1) * size_t(V)));
    more = false;
    for (int i = 0; i < n; ++i) more = more || done[size_t(i)] < prompts[size_t(i)].size();
  }
  if (stats) {
    stats->prefill_ms = ms_since(t0);
    for (const auto& p : prompts) stats->prompt_tokens += int64_t(p.size());
  }

  // Decode: one token per live sequence per step, all live sequences in one forward.
  t0 = std::chrono::steady_clock::now();
  std::vector<std::vector<int32_t>> out(static_cast<size_t>(n));
  std::vector<int32_t> next(static_cast<size_t>(n));
  std::vector<bool> live(size_t(n), opt.max_new_tokens > 0);
  for (int i = 0; i < n; ++i) {
    if (!live[size_t(i)]) continue;
    next[size_t(i)] = samplers[size_t(i)]->sample(last_logits[size_t(i)].data(), V);
  }
  for (int step = 0; step < opt.max_new_tokens; ++step) {
    Batch b;
    std::vector<int> who;
    for (int i = 0; i < n; ++i) {
      if (!live[size_t(i)]) continue;
      const int32_t tok = next[size_t(i)];
      out[size_t(i)].push_back(tok);
      samplers[size_t(i)]->accept(tok);
      bool keep = !(on_token && !on_token(i, tok));
      if (tok == opt.eos) keep = false;
      if (int(out[size_t(i)].size()) >= opt.max_new_tokens) keep = false;
      live[size_t(i)] = keep;
      if (keep) {
        b.add(i, {tok});
        who.push_back(i);
      }
    }
    if (who.empty()) break;
    model.forward(b, mem, logits);
    for (size_t k = 0; k < who.size(); ++k)
      next[size_t(who[k])] = samplers[size_t(who[k])]->sample(logits.data() + k * size_t(V), V);
  }
  if (stats) {
    stats->decode_ms = ms_since(t0);
    for (const auto& o : out) stats->decoded_tokens += int64_t(o.size());
  }
  return out;
}

}  // namespace hm
