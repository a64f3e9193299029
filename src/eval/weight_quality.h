// What packing the linear layers' weights costs in quality (issue 17 item 4, `hm eval --weights`,
// docs/QUANTIZATION.md "Quality"): for each weight format, the perplexity on a corpus's
// validation split and the KL divergence KL(f32 || packed) of the next-token distribution at
// every scored position, against the float32 weights run through the same inference forward
// (HybridModel::forward) over the same windows, in one pass.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace hm {

// log-softmax of n logits in double: out[v] = x[v] - max - log(sum exp(x - max)).
void log_softmax(const float* logits, int n, double* out);
// KL(p || q) = sum_v p_v (log p_v - log q_v) of two distributions given as log-probabilities
// (log_softmax's output); 0 exactly when they are equal.
double kl_divergence(const double* log_p, const double* log_q, int n);

struct WeightQuality {
  DType format = DType::F32;
  double loss = 0, ppl = 0;  // mean cross-entropy (nats/token) and exp(loss)
  double ppl_ratio = 0;      // ppl / the float32 reference's
  // KL(f32 || this format) over the scored positions: mean, 99th percentile (nearest rank), max.
  double kl_mean = 0, kl_p99 = 0, kl_max = 0;
  double top1_agree = 0;     // share of positions whose most likely token is the reference's
  double seconds = 0;        // this format's forwards, wall time
};

struct WeightQualityResult {
  int64_t tokens = 0;   // targets scored, the same ones for every format
  int seq_len = 0;      // window length
  int64_t step = -1;    // the checkpoint's training step when known
  DType stored = DType::F32;  // the format the checkpoint stores (the reference is its f32 arena)
  double ref_loss = 0, ref_ppl = 0, ref_seconds = 0;  // the float32 reference
  std::vector<WeightQuality> formats;  // in the order asked
};

// Scores model_dir (a training out_dir, a checkpoint or a Hugging Face folder) on the validation split of data_path in
// the windows evaluate() uses (train/trainer.h: seq_len 0 and max_tokens < 0 take the run's
// values), `batch` windows per forward. The reference is a model loaded with float32 weights;
// each format, f32 included, is a model of its own loaded from the same checkpoint, so f32's
// KL is 0 only if the forward is deterministic. hm::Error for an empty or repeated format list,
// batch < 1, or what evaluate() rejects.
WeightQualityResult evaluate_weights(const std::string& model_dir, const std::string& data_path,
                                     const std::vector<DType>& formats, int seq_len = 0,
                                     int64_t max_tokens = -1, int batch = 8);

}  // namespace hm
