// Batched token sampling on the device (docs/CUDA.md, "Sampling"): the CPU chain of
// runtime/sampling.h (VocabLimit, RepetitionPenalty, then Greedy, or TopK, TopP, MinP,
// Temperature, Dist) for B rows of logits at once, so only token ids cross PCIe.
//
// Each sequence owns a slot of a SamplerPool: its parameters, its RNG (the CPU's xoshiro256**,
// advanced once per sampled token exactly as hm::Dist does, so a seed gives the CPU's tokens)
// and its penalty history (a ring of the last repeat_last_n accepted tokens). Row b of a batch
// uses slot slots[b]. Steps allocate nothing, never wait for the host and keep their addresses,
// so a decode step that calls sample() and sampler_accept() can be captured in a CUDA graph.
// Plain C++ (no device code), so host files compiled by g++ can call these.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hm::cuda {

// What a sequence asks of its sampler: hm::SamplingParams plus presence and frequency
// penalties (logit -= presence * (count > 0) + frequency * count over the same window, after
// the repetition penalty; the CPU chain has neither, so 0 there matches it).
struct SampleParams {
  float temperature = 0.8f;  // 0 = greedy (arg-max, ties to the lowest id)
  int top_k = 40;            // 0 = off
  float top_p = 0.95f;       // 1 = off
  float min_p = 0.05f;       // 0 = off
  float repeat_penalty = 1.1f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int repeat_last_n = 64;  // window of accepted tokens the penalties look at; 0 = off
  uint64_t seed = 0;
};

// The device record of one slot, made on the host by make_sampler_slot (which validates).
struct SamplerSlot {
  float temperature, top_p, min_p;
  float log_min_p;  // std::log(min_p), computed on the host as MinP does
  float repeat_penalty, presence_penalty, frequency_penalty;
  int32_t top_k, last_n, unused_;
  uint64_t rng[4];      // xoshiro256** state, seeded as hm::Rng(seed)
  uint64_t n_accepted;  // tokens accepted since the slot was set
};

// Longest penalty window a pool can hold (the window is deduplicated in shared memory).
constexpr int kMaxSampleLastN = 1024;

// Device memory of n_slots samplers, sampler_pool_bytes(n_slots, max_last_n) bytes owned by the
// caller (16-byte aligned). Slots hold garbage until sampler_set_slot writes them.
struct SamplerPool {
  void* mem = nullptr;
  int n_slots = 0;
  int max_last_n = 0;  // capacity of each slot's history ring
};
size_t sampler_pool_bytes(int n_slots, int max_last_n);

// hm::Error naming the field: temperature < 0 or not finite, top_k < 0, top_p not in (0, 1],
// min_p not in [0, 1), repeat_penalty <= 0 or not finite, presence/frequency not finite,
// repeat_last_n < 0 or > max_last_n.
SamplerSlot make_sampler_slot(const SampleParams& p, int max_last_n);

// Sets slot `slot` (a new sequence: parameters, reseeded RNG, empty history). An asynchronous
// copy from host memory: call it between steps, not inside a captured graph.
void sampler_set_slot(const SamplerPool& pool, int slot, const SamplerSlot& s, cudaStream_t stream);

// Appends tokens to the histories, as SamplerChain::accept does: sequence s appends
// tokens[cu[s] .. cu[s+1]) to slot slots[s] (cu == nullptr: one token each, tokens[s], e.g.
// the ids sample() just wrote). Slots within one call must be distinct; ids are not checked
// (an id outside [0, n_decodable) is never penalised).
void sampler_accept(const SamplerPool& pool, const int32_t* slots, const int32_t* tokens,
                    const int32_t* cu, int nseq, cudaStream_t stream);

// Workspace of sample() and sample_probs() for B rows of V logits.
size_t sample_workspace_bytes(int B, int V);

// out[b] = the token of row b: logits [B, V] float (row stride ld), ids >= n_decodable dropped
// (VocabLimit), penalties from the slot's history, then the slot's chain. Greedy rows draw
// nothing; sampling rows draw exactly one number from their slot's RNG. logits are not
// modified. slots: device [B], distinct (nullptr: row b uses slot b); a slot outside the pool
// gives out[b] = -1. Six launches for the whole batch; two with all_greedy, which the caller
// sets only when every row's slot has temperature 0 (it then writes each row's arg-max after
// the penalties, as the full chain would, and skips the sampling kernels).
void sample(int32_t* out, const float* logits, int ld, int B, int V, int n_decodable,
            const SamplerPool& pool, const int32_t* slots, void* workspace, cudaStream_t stream,
            bool all_greedy = false);

// Debug and test entry: probs [B, V] (row stride ldp) = the distribution the final pick draws
// from (0 outside the filtered set; one-hot for greedy rows). Advances no RNG.
void sample_probs(float* probs, int ldp, const float* logits, int ld, int B, int V, int n_decodable,
                  const SamplerPool& pool, const int32_t* slots, void* workspace, cudaStream_t stream);

}  // namespace hm::cuda
