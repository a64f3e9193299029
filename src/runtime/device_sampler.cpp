#include "runtime/device_sampler.h"

#include "core/error.h"

#ifdef HM_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "kernels/cuda/sampling.h"
#endif

namespace hm {

#ifdef HM_HAVE_CUDA
static_assert(DeviceSampler::kMaxWindow == cuda::kMaxSampleLastN);

struct DeviceSampler::Impl {
  CudaBackend& be;
  int n_slots, V, n_decodable;
  cuda::SamplerPool pool;
  Buffer pool_mem, ws, ids, slots, tokens, cu;
  std::vector<int32_t> host_ids;
  std::vector<char> greedy;  // per slot, as last set: temperature 0 (sample() then skips the draw)

  Impl(CudaBackend& b, int n, int vocab, int n_dec, int max_last_n) : be(b), n_slots(n), V(vocab), n_decodable(n_dec) {
    HM_CHECK(n > 0 && vocab > 0 && n_dec > 0 && n_dec <= vocab, "device sampler: ", n, " slots over a vocabulary of ",
             vocab, " (", n_dec, " decodable)");
    HM_CHECK(max_last_n >= 1, "device sampler: a penalty window of ", max_last_n, " tokens");
    HM_CHECK(max_last_n <= cuda::kMaxSampleLastN, "device sampler: repeat_last_n ", max_last_n,
             " exceeds the CUDA sampler's window of ", cuda::kMaxSampleLastN, " tokens");
    pool_mem = Buffer(be, cuda::sampler_pool_bytes(n, max_last_n));
    pool = {pool_mem.data(), n, max_last_n};
    ws = Buffer(be, cuda::sample_workspace_bytes(n, V));
    ids = Buffer(be, sizeof(int32_t) * size_t(n));
    slots = Buffer(be, sizeof(int32_t) * size_t(n));
    greedy.assign(size_t(n), 0);
  }
};

std::unique_ptr<DeviceSampler> DeviceSampler::make(Backend& be, int n_slots, int vocab, int n_decodable,
                                                   int max_last_n) {
  auto* cuda_be = dynamic_cast<CudaBackend*>(&be);
  if (cuda_be == nullptr) return nullptr;
  return std::unique_ptr<DeviceSampler>(
      new DeviceSampler(std::make_unique<Impl>(*cuda_be, n_slots, vocab, n_decodable, max_last_n)));
}

int DeviceSampler::max_last_n() const { return impl_->pool.max_last_n; }

void DeviceSampler::set(const std::vector<int>& slots, const std::vector<SamplingParams>& params,
                        const std::vector<std::vector<int32_t>>& histories) {
  Impl& m = *impl_;
  const int n = int(slots.size());
  HM_CHECK(params.size() == slots.size() && histories.size() == slots.size() && n <= m.n_slots,
           "device sampler: set of ", n, " slots with ", params.size(), " parameter sets and ", histories.size(),
           " histories (pool of ", m.n_slots, ")");
  if (n == 0) return;
  std::vector<int32_t> toks, cu{0};
  for (int i = 0; i < n; ++i) {
    HM_CHECK(slots[size_t(i)] >= 0 && slots[size_t(i)] < m.n_slots, "device sampler: slot ", slots[size_t(i)],
             " outside the pool of ", m.n_slots);
    validate(params[size_t(i)]);
    cuda::SampleParams p;
    p.temperature = params[size_t(i)].temperature;
    p.top_k = params[size_t(i)].top_k;
    p.top_p = params[size_t(i)].top_p;
    p.min_p = params[size_t(i)].min_p;
    p.repeat_penalty = params[size_t(i)].repeat_penalty;
    p.repeat_last_n = params[size_t(i)].repeat_last_n;
    p.seed = params[size_t(i)].seed;
    cuda::sampler_set_slot(m.pool, slots[size_t(i)], cuda::make_sampler_slot(p, m.pool.max_last_n), m.be.stream());
    m.greedy[size_t(slots[size_t(i)])] = !(p.temperature > 0);
    toks.insert(toks.end(), histories[size_t(i)].begin(), histories[size_t(i)].end());
    cu.push_back(int32_t(toks.size()));
  }
  // Every history in one ragged call (the buffers live until the stream has read them: the
  // copies below are stream-ordered and the old buffers are kept until the next set).
  m.tokens = Buffer(m.be, sizeof(int32_t) * std::max<size_t>(toks.size(), 1));
  m.cu = Buffer(m.be, sizeof(int32_t) * cu.size());
  std::vector<int32_t> s32(slots.begin(), slots.end());
  if (!toks.empty()) m.be.to_device(m.tokens.data(), toks.data(), sizeof(int32_t) * toks.size());
  m.be.to_device(m.cu.data(), cu.data(), sizeof(int32_t) * cu.size());
  m.be.to_device(m.slots.data(), s32.data(), sizeof(int32_t) * s32.size());
  cuda::sampler_accept(m.pool, static_cast<const int32_t*>(m.slots.data()), static_cast<const int32_t*>(m.tokens.data()),
                       static_cast<const int32_t*>(m.cu.data()), n, m.be.stream());
}

std::vector<int32_t> DeviceSampler::sample(const Tensor& logits, const std::vector<int>& slots,
                                           const std::vector<bool>& take) {
  Impl& m = *impl_;
  const int n = int(slots.size());
  HM_CHECK(take.size() == slots.size() && n <= m.n_slots, "device sampler: ", n, " rows, ", take.size(),
           " flags (pool of ", m.n_slots, ")");
  HM_CHECK(logits.dtype == DType::F32 && logits.rows >= n && logits.cols == m.V, "device sampler: logits ",
           logits.rows, " x ", logits.cols, " for ", n, " rows of ", m.V);
  std::vector<int32_t> out(size_t(n), -1);
  if (n == 0) return out;
  std::vector<int32_t> s32(slots.begin(), slots.end());
  m.be.to_device(m.slots.data(), s32.data(), sizeof(int32_t) * size_t(n));
  auto* d_ids = static_cast<int32_t*>(m.ids.data());
  const auto* d_slots = static_cast<const int32_t*>(m.slots.data());
  bool any = false;
  for (int k = 0; k < n;) {  // contiguous runs of taken rows: one launch set each
    if (!take[size_t(k)]) {
      ++k;
      continue;
    }
    int e = k;
    bool all_greedy = true;  // a slot outside the pool gives -1 either way
    for (; e < n && take[size_t(e)]; ++e) {
      const int s = slots[size_t(e)];
      if (s >= 0 && s < m.n_slots && !m.greedy[size_t(s)]) all_greedy = false;
    }
    cuda::sample(d_ids + k, static_cast<const float*>(logits.row(k)), int(logits.ld), e - k, m.V, m.n_decodable,
                 m.pool, d_slots + k, m.ws.data(), m.be.stream(), all_greedy);
    cuda::sampler_accept(m.pool, d_slots + k, d_ids + k, nullptr, e - k, m.be.stream());
    any = true;
    k = e;
  }
  if (!any) return out;
  m.host_ids.resize(size_t(n));
  m.be.to_host(m.host_ids.data(), d_ids, sizeof(int32_t) * size_t(n));  // waits for the stream
  for (int k = 0; k < n; ++k)
    if (take[size_t(k)]) {
      HM_CHECK(m.host_ids[size_t(k)] >= 0, "device sampler: no token for slot ", slots[size_t(k)]);
      out[size_t(k)] = m.host_ids[size_t(k)];
    }
  return out;
}
#else
struct DeviceSampler::Impl {};
std::unique_ptr<DeviceSampler> DeviceSampler::make(Backend&, int, int, int, int) { return nullptr; }
int DeviceSampler::max_last_n() const { return 0; }
void DeviceSampler::set(const std::vector<int>&, const std::vector<SamplingParams>&,
                        const std::vector<std::vector<int32_t>>&) {
  throw Error("device sampler: this build has no CUDA backend");
}
std::vector<int32_t> DeviceSampler::sample(const Tensor&, const std::vector<int>&, const std::vector<bool>&) {
  throw Error("device sampler: this build has no CUDA backend");
}
#endif

DeviceSampler::DeviceSampler(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DeviceSampler::~DeviceSampler() = default;

}  // namespace hm
