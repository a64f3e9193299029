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

Generator::~Generator() = default;

Generator::Generator(HybridModel& model, HybridMemory& mem, const std::vector<std::vector<int32_t>>& prompts,
                     const GenerateOptions& opt, GenerateStats* stats)
    : model_(model), mem_(mem), opt_(opt), stats_(stats) {
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

  // On the CUDA backend the logits stay on the device: one sampler slot per sequence, seeded as
  // the host chains are (seed + i), its prompt accepted into its history.
  dev_ = DeviceSampler::make(model.backend(), n, V, n_decodable, std::max(opt.sampling.repeat_last_n, 1));
  if (dev_) {
    std::vector<int> slots(static_cast<size_t>(n));
    std::vector<SamplingParams> params(static_cast<size_t>(n), opt.sampling);
    for (int i = 0; i < n; ++i) {
      slots[size_t(i)] = i;
      params[size_t(i)].seed += uint64_t(i);
    }
    dev_->set(slots, params, prompts);
  }
  for (int i = 0; i < n; ++i) {
    if (!dev_) {
      SamplingParams sp = opt.sampling;
      sp.seed += uint64_t(i);
      samplers_.push_back(make_sampler_chain(sp, n_decodable));
      for (int32_t tok : prompts[size_t(i)]) samplers_.back()->accept(tok);
    }
    mem.seq_rm(i);
  }
  out_.resize(size_t(n));
  next_.resize(size_t(n));
  live_.assign(size_t(n), opt.max_new_tokens > 0);

  // Prefill, chunked: each forward takes up to prefill_chunk tokens of every unfinished prompt.
  const auto t0 = std::chrono::steady_clock::now();
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
    if (dev_) {  // sample each prompt's first token as soon as its last chunk has run
      std::vector<bool> take(who.size());
      for (size_t k = 0; k < who.size(); ++k)
        take[k] = live_[size_t(who[k])] && done[size_t(who[k])] == prompts[size_t(who[k])].size();
      const std::vector<int32_t> ids = dev_->sample(model.forward_device(b, mem), who, take);
      for (size_t k = 0; k < who.size(); ++k)
        if (take[k]) next_[size_t(who[k])] = ids[k];
    } else {
      model.forward(b, mem, logits_);
      for (size_t k = 0; k < who.size(); ++k)
        if (done[size_t(who[k])] == prompts[size_t(who[k])].size())
          last_logits[size_t(who[k])].assign(logits_.begin() + long(k * size_t(V)),
                                             logits_.begin() + long((k + 1) * size_t(V)));
    }
    more = false;
    for (int i = 0; i < n; ++i) more = more || done[size_t(i)] < prompts[size_t(i)].size();
  }
  if (stats) {
    stats->prefill_ms = ms_since(t0);
    for (const auto& p : prompts) stats->prompt_tokens += int64_t(p.size());
  }

  t_decode_ = std::chrono::steady_clock::now();
  if (!dev_)
    for (int i = 0; i < n; ++i)
      if (live_[size_t(i)]) next_[size_t(i)] = samplers_[size_t(i)]->sample(last_logits[size_t(i)].data(), V);
}

void Generator::stop(int seq) {
  HM_CHECK(seq >= 0 && seq < int(live_.size()), "generate: no sequence ", seq);
  live_[size_t(seq)] = false;
}

const std::vector<std::pair<int, int32_t>>& Generator::next() {
  const int n = int(live_.size()), V = model_.config().vocab_size;
  // The tokens emitted by the last step go through the model for the sequences still live.
  if (started_) {
    Batch b;
    std::vector<int> who;
    for (int i = 0; i < n; ++i)
      if (live_[size_t(i)]) {
        b.add(i, {out_[size_t(i)].back()});
        who.push_back(i);
      }
    if (!who.empty() && dev_) {
      const std::vector<int32_t> ids = dev_->sample(model_.forward_device(b, mem_), who, std::vector<bool>(who.size(), true));
      for (size_t k = 0; k < who.size(); ++k) next_[size_t(who[k])] = ids[k];
    } else if (!who.empty()) {
      model_.forward(b, mem_, logits_);
      for (size_t k = 0; k < who.size(); ++k)
        next_[size_t(who[k])] = samplers_[size_t(who[k])]->sample(logits_.data() + k * size_t(V), V);
    }
  }
  started_ = true;
  step_.clear();
  for (int i = 0; i < n; ++i) {
    if (!live_[size_t(i)]) continue;
    const int32_t tok = next_[size_t(i)];
    out_[size_t(i)].push_back(tok);
    if (!dev_) samplers_[size_t(i)]->accept(tok);  // the device accepted it when it sampled it
    step_.emplace_back(i, tok);
    const bool eos = tok == opt_.eos || std::find(opt_.more_eos.begin(), opt_.more_eos.end(), tok) != opt_.more_eos.end();
    if (eos || int(out_[size_t(i)].size()) >= opt_.max_new_tokens) live_[size_t(i)] = false;
  }
  if (stats_) {
    stats_->decode_ms = ms_since(t_decode_);
    stats_->decoded_tokens += int64_t(step_.size());
  }
  return step_;
}

std::vector<std::vector<int32_t>> generate(HybridModel& model, HybridMemory& mem,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& opt, const TokenCallback& on_token,
                                           GenerateStats* stats) {
  Generator g(model, mem, prompts, opt, stats);
  for (;;) {
    const auto& step = g.next();
    if (step.empty()) break;
    if (on_token)
      for (const auto& [seq, tok] : step)
        if (!on_token(seq, tok)) g.stop(seq);
  }
  return g.tokens();
}

}  // namespace hm
