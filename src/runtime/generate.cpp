#include "runtime/generate.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"

#ifdef HM_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "kernels/cuda/sampling.h"
#endif

namespace hm {

namespace {
double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

#ifdef HM_HAVE_CUDA
// Sampling on the device: one SamplerPool slot per sequence (slot = sequence index), the
// prompt accepted into its history, each sampled id accepted there before it is read back.
struct Generator::DeviceSampling {
  CudaBackend& be;
  int V, n_decodable;
  cuda::SamplerPool pool;
  Buffer pool_mem, ws, ids, slots, prompt_tokens, prompt_cu;
  std::vector<cuda::SamplerSlot> slot_params;
  std::vector<int32_t> host_slots, host_ids, host_tokens, host_cu;

  DeviceSampling(CudaBackend& b, const std::vector<std::vector<int32_t>>& prompts, const SamplingParams& sp,
                 int vocab, int n_dec)
      : be(b), V(vocab), n_decodable(n_dec) {
    const int n = int(prompts.size());
    HM_CHECK(sp.repeat_last_n <= cuda::kMaxSampleLastN, "generate: repeat_last_n ", sp.repeat_last_n,
             " exceeds the CUDA sampler's window of ", cuda::kMaxSampleLastN, " tokens");
    const int window = std::max(sp.repeat_last_n, 1);
    pool_mem = Buffer(be, cuda::sampler_pool_bytes(n, window));
    pool = {pool_mem.data(), n, window};
    ws = Buffer(be, cuda::sample_workspace_bytes(n, V));
    ids = Buffer(be, sizeof(int32_t) * size_t(n));
    slots = Buffer(be, sizeof(int32_t) * size_t(n));
    for (int i = 0; i < n; ++i) {
      cuda::SampleParams p;
      p.temperature = sp.temperature;
      p.top_k = sp.top_k;
      p.top_p = sp.top_p;
      p.min_p = sp.min_p;
      p.repeat_penalty = sp.repeat_penalty;
      p.repeat_last_n = sp.repeat_last_n;
      p.seed = sp.seed + uint64_t(i);  // as the CPU chains
      slot_params.push_back(cuda::make_sampler_slot(p, window));
    }
    for (int i = 0; i < n; ++i) cuda::sampler_set_slot(pool, i, slot_params[size_t(i)], be.stream());
    // Every prompt token into its sequence's history, one ragged call.
    host_cu.assign(1, 0);
    for (int i = 0; i < n; ++i) {
      host_tokens.insert(host_tokens.end(), prompts[size_t(i)].begin(), prompts[size_t(i)].end());
      host_cu.push_back(int32_t(host_tokens.size()));
      host_slots.push_back(i);
    }
    prompt_tokens = Buffer(be, sizeof(int32_t) * host_tokens.size());
    prompt_cu = Buffer(be, sizeof(int32_t) * host_cu.size());
    be.to_device(prompt_tokens.data(), host_tokens.data(), sizeof(int32_t) * host_tokens.size());
    be.to_device(prompt_cu.data(), host_cu.data(), sizeof(int32_t) * host_cu.size());
    be.to_device(slots.data(), host_slots.data(), sizeof(int32_t) * size_t(n));
    cuda::sampler_accept(pool, static_cast<const int32_t*>(slots.data()),
                         static_cast<const int32_t*>(prompt_tokens.data()),
                         static_cast<const int32_t*>(prompt_cu.data()), n, be.stream());
  }

  // Samples row k of logits for sequence seqs[k] where take[k], accepts each sampled id into its
  // history and writes it to next[seqs[k]]. Rows run in contiguous groups (one launch set each).
  void sample(const Tensor& logits, const std::vector<int>& seqs, const std::vector<bool>& take,
              std::vector<int32_t>& next) {
    const int m = int(seqs.size());
    HM_ASSERT(logits.dtype == DType::F32 && logits.rows >= m && logits.cols == V);
    host_slots.assign(seqs.begin(), seqs.end());
    be.to_device(slots.data(), host_slots.data(), sizeof(int32_t) * size_t(m));
    auto* d_ids = static_cast<int32_t*>(ids.data());
    const auto* d_slots = static_cast<const int32_t*>(slots.data());
    bool any = false;
    for (int k = 0; k < m;) {
      if (!take[size_t(k)]) { ++k; continue; }
      int e = k;
      while (e < m && take[size_t(e)]) ++e;
      cuda::sample(d_ids + k, static_cast<const float*>(logits.row(k)), int(logits.ld), e - k, V, n_decodable,
                   pool, d_slots + k, ws.data(), be.stream());
      cuda::sampler_accept(pool, d_slots + k, d_ids + k, nullptr, e - k, be.stream());
      any = true;
      k = e;
    }
    if (!any) return;
    host_ids.resize(size_t(m));
    be.to_host(host_ids.data(), d_ids, sizeof(int32_t) * size_t(m));  // waits for the stream
    for (int k = 0; k < m; ++k)
      if (take[size_t(k)]) {
        HM_CHECK(host_ids[size_t(k)] >= 0, "generate: the device sampler gave no token for sequence ", seqs[size_t(k)]);
        next[size_t(seqs[size_t(k)])] = host_ids[size_t(k)];
      }
  }
};
#else
struct Generator::DeviceSampling {};
#endif

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

#ifdef HM_HAVE_CUDA
  if (auto* cuda_be = dynamic_cast<CudaBackend*>(&model.backend()))
    dev_ = std::make_unique<DeviceSampling>(*cuda_be, prompts, opt.sampling, V, n_decodable);
#endif
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
#ifdef HM_HAVE_CUDA
      std::vector<bool> take(who.size());
      for (size_t k = 0; k < who.size(); ++k)
        take[k] = live_[size_t(who[k])] && done[size_t(who[k])] == prompts[size_t(who[k])].size();
      dev_->sample(model.forward_device(b, mem), who, take, next_);
#endif
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
#ifdef HM_HAVE_CUDA
      dev_->sample(model_.forward_device(b, mem_), who, std::vector<bool>(who.size(), true), next_);
#endif
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
    if (tok == opt_.eos || int(out_[size_t(i)].size()) >= opt_.max_new_tokens) live_[size_t(i)] = false;
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
