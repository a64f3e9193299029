#include "eval/weight_quality.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>

#include "backend/backend.h"
#include "core/error.h"
#include "io/hf_model.h"
#include "model/model.h"
#include "runtime/memory.h"
#include "runtime/tokenizer.h"
#include "train/trainer.h"

namespace hm {

void log_softmax(const float* logits, int n, double* out) {
  const double mx = *std::max_element(logits, logits + n);
  double z = 0;
  for (int v = 0; v < n; ++v) z += std::exp(double(logits[v]) - mx);
  const double lz = mx + std::log(z);
  for (int v = 0; v < n; ++v) out[v] = double(logits[v]) - lz;
}

double kl_divergence(const double* log_p, const double* log_q, int n) {
  double kl = 0;
  for (int v = 0; v < n; ++v) kl += std::exp(log_p[v]) * (log_p[v] - log_q[v]);
  return kl;
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// One model per format, each with its own accumulators.
struct Scored {
  std::unique_ptr<HybridModel> model;
  WeightQuality q;
  std::vector<double> kl;  // per scored position
  double nll = 0;
  int64_t agree = 0;
};

}  // namespace

WeightQualityResult evaluate_weights(const std::string& model_dir, const std::string& data_path,
                                     const std::vector<DType>& formats, int seq_len, int64_t max_tokens, int batch) {
  HM_CHECK(!formats.empty(), "evaluate_weights: no weight format given");
  for (size_t i = 0; i < formats.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      HM_CHECK(formats[i] != formats[j], "weight format ", compute_dtype_name(formats[i]), " is given twice");
  HM_CHECK(batch >= 1, "batch must be >= 1");
  const std::string dir = checkpoint_dir(model_dir);
  WeightQualityResult r;
  eval_window_defaults(model_dir, seq_len, max_tokens, &r.step);
  r.seq_len = seq_len;

  auto be = make_cpu_backend();
  // The reference: the checkpoint's float32 arena (a packed checkpoint's dequantized weights).
  auto ref = load_any_model(dir, *be);
  r.stored = ref->weight_format();
  auto load_as = [&](DType f) {
    auto m = load_any_model(dir, *be);
    if (m->weight_format() != f) {
      m->set_weight_format(f);
      m->prepare();
    }
    return m;
  };
  if (ref->weight_format() != DType::F32) {
    ref->set_weight_format(DType::F32);
    ref->prepare();
  }
  std::vector<Scored> scored(formats.size());
  for (size_t i = 0; i < formats.size(); ++i) {
    scored[i].model = load_as(formats[i]);
    scored[i].q.format = formats[i];
  }

  auto tok = load_tokenizer(dir);
  const int V = ref->config().vocab_size;
  HM_CHECK(tok->vocab_size() <= V, dir, ": the tokenizer's vocabulary (", tok->vocab_size(),
           ") exceeds the model's vocab_size (", V, ")");
  const std::vector<int32_t> stream = validation_tokens(*tok, data_path);

  HybridMemory mem(*be, ref->config(), batch, seq_len, KvType::F32);
  std::vector<float> ref_logits, logits;
  std::vector<double> ref_lp, lq(size_t(V), 0.0);
  std::vector<int32_t> ref_top;
  // The reference's loss accumulates in nll; each format's in its own Scored.
  auto score = [&](int64_t pos, int nb, int len, double& nll) {
    const int64_t rows = int64_t(nb) * len;
    auto t0 = Clock::now();
    forward_windows(*ref, mem, stream, pos, nb, len, ref_logits);
    r.ref_seconds += seconds_since(t0);
    ref_lp.resize(size_t(rows * V));
    ref_top.resize(size_t(rows));
    for (int64_t i = 0; i < rows; ++i) {
      const float* row = ref_logits.data() + i * V;
      log_softmax(row, V, ref_lp.data() + i * V);
      nll -= ref_lp[size_t(i * V + stream[size_t(pos + i + 1)])];
      ref_top[size_t(i)] = int32_t(std::max_element(row, row + V) - row);
    }
    for (Scored& s : scored) {
      t0 = Clock::now();
      forward_windows(*s.model, mem, stream, pos, nb, len, logits);
      s.q.seconds += seconds_since(t0);
      for (int64_t i = 0; i < rows; ++i) {
        const float* row = logits.data() + i * V;
        log_softmax(row, V, lq.data());
        s.kl.push_back(kl_divergence(ref_lp.data() + i * V, lq.data(), V));
        s.nll -= lq[size_t(stream[size_t(pos + i + 1)])];
        s.agree += int32_t(std::max_element(row, row + V) - row) == ref_top[size_t(i)];
      }
    }
  };
  const EvalResult e = eval_windows(stream, seq_len, max_tokens, batch, score);

  const int64_t counted = e.tokens;
  r.tokens = counted;
  r.ref_loss = e.loss;
  r.ref_ppl = e.ppl;
  for (Scored& s : scored) {
    WeightQuality& q = s.q;
    q.loss = s.nll / double(counted);
    q.ppl = std::exp(q.loss);
    q.ppl_ratio = q.ppl / r.ref_ppl;
    double sum = 0;
    for (double k : s.kl) sum += k;
    q.kl_mean = sum / double(counted);
    // Nearest rank: the smallest value with at least 99% of the positions at or below it.
    std::sort(s.kl.begin(), s.kl.end());
    const size_t rank = size_t(std::ceil(0.99 * double(s.kl.size())));
    q.kl_p99 = s.kl[std::max<size_t>(rank, 1) - 1];
    q.kl_max = s.kl.back();
    q.top1_agree = double(s.agree) / double(counted);
    r.formats.push_back(q);
  }
  return r;
}

}  // namespace hm
