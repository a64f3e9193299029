// Token sampling on the CUDA backend for callers that run sequences in memory slots (Generator,
// hm serve): a device pool of one sampler per slot, each with its own parameters, RNG and penalty
// history, so only token ids cross to the host. Same chain and same results as the host
// SamplerChain on the same logits (kernels/cuda/sampling.h; the CudaSampling tests).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "runtime/sampling.h"

namespace hm {

class DeviceSampler {
 public:
  static constexpr int kMaxWindow = 1024;  // the longest penalty window (cuda::kMaxSampleLastN)

  // nullptr unless `be` is the CUDA backend. max_last_n: the longest repeat_last_n a slot may use.
  static std::unique_ptr<DeviceSampler> make(Backend& be, int n_slots, int vocab, int n_decodable, int max_last_n);
  ~DeviceSampler();
  DeviceSampler(const DeviceSampler&) = delete;
  DeviceSampler& operator=(const DeviceSampler&) = delete;

  int max_last_n() const;
  // Sets slots[i] for a new sequence: params[i] (its seed as given, not offset), its history the
  // tokens histories[i] (a prompt), as SamplerChain::accept would have taken them. hm::Error
  // naming the field for invalid parameters.
  void set(const std::vector<int>& slots, const std::vector<SamplingParams>& params,
           const std::vector<std::vector<int32_t>>& histories);
  // Samples row k of logits ([rows >= slots.size(), vocab] float on the device) with the sampler
  // of slot slots[k] where take[k], accepting the id into that history. Returns the ids, -1 where
  // !take. Waits for the stream (the ids are read back).
  std::vector<int32_t> sample(const Tensor& logits, const std::vector<int>& slots, const std::vector<bool>& take);

 private:
  struct Impl;
  explicit DeviceSampler(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace hm
