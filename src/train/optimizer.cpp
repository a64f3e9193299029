#include "train/optimizer.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <numbers>
#include <set>

#if defined(__SSE2__) || defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "core/error.h"
#include "io/safetensors.h"

namespace hm {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Below this many elements a parallel region costs more than the loop (norms, biases, gates and
// whole test-sized models): a fork/join is microseconds when the cores are free and can be
// milliseconds when they are not, while 64K floats of the step take tens of microseconds.
constexpr int64_t kParallelMin = 1 << 16;
// Fixed chunking for the norm, so its summation order is the same for any thread count and a
// resumed run clips exactly as the uninterrupted one would.
constexpr int64_t kNormChunk = 1 << 14;

void check_same_layout(const Params& a, const Params& b) {
  HM_ASSERT(a.numel() == b.numel() && a.specs().size() == b.specs().size());
}

struct StepConsts { float b1, b2, c1, c2, inv_bc1, inv_bc2, eps, lr; };
constexpr int64_t kBlock = 512;  // floats per block: 2 KiB of roots stay in L1

// In-place square root of x[0, n). g++ vectorizes no loop that calls sqrt while -fmath-errno is
// on (the errno branch is control flow; per-function optimize attributes do not lift it), and a
// scalar root made the step 4x slower than memory speed, so the root is taken here explicitly.
// Vector and scalar roots are both correctly rounded: results do not depend on the path.
void sqrt_inplace(float* x, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  // The masked form: g++ 12's _mm512_sqrt_ps trips -Wmaybe-uninitialized inside its own header.
  for (; j + 16 <= n; j += 16) {
    const __m512 a = _mm512_loadu_ps(x + j);
    _mm512_storeu_ps(x + j, _mm512_mask_sqrt_ps(a, __mmask16(0xFFFF), a));
  }
#endif
#if defined(__AVX__)
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_sqrt_ps(_mm256_loadu_ps(x + j)));
#endif
#if defined(__SSE2__)
  for (; j + 4 <= n; j += 4) _mm_storeu_ps(x + j, _mm_sqrt_ps(_mm_loadu_ps(x + j)));
#endif
#if defined(__aarch64__)
  for (; j + 4 <= n; j += 4) vst1q_f32(x + j, vsqrtq_f32(vld1q_f32(x + j)));
#endif
  for (; j < n; ++j) x[j] = std::sqrt(x[j]);
}

// One pass over w, g, m, v in L1-sized blocks (the step is memory-bound, so passes matter more
// than flops): the first loop updates the moments and leaves v_hat in a block buffer, which is
// rooted, and the second loop updates the weights. The clipped variant also writes the scaled
// gradient back; the unclipped one skips that store.
template <bool kClip>
void adam_update(int64_t n, const StepConsts& k, float wd, float scale, float* __restrict w,
                 float* __restrict g, float* __restrict m, float* __restrict v) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  // Work-shared inside the caller's one parallel region (no barrier per tensor: on a shared
  // 2-core machine every fork/join can wait for a descheduled thread, and ~60 tensors made
  // that 100 ms per step); outside a parallel region it runs on the calling thread alone.
#pragma omp for schedule(static) nowait
  for (int64_t b = 0; b < nb; ++b) {
    alignas(64) float root[kBlock];
    const int64_t i0 = b * kBlock, len = std::min(kBlock, n - i0);
    float* __restrict wb = w + i0;
    float* __restrict gb = g + i0;
    float* __restrict mb = m + i0;
    float* __restrict vb = v + i0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      float gi = gb[i];
      if constexpr (kClip) {
        gi *= scale;
        gb[i] = gi;
      }
      const float mi = k.b1 * mb[i] + k.c1 * gi;
      const float vi = k.b2 * vb[i] + k.c2 * (gi * gi);
      mb[i] = mi;
      vb[i] = vi;
      root[i] = vi * k.inv_bc2;  // v_hat
    }
    sqrt_inplace(root, len);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float m_hat = mb[i] * k.inv_bc1;
      wb[i] -= k.lr * (m_hat / (root[i] + k.eps) + wd * wb[i]);
    }
  }
}

}  // namespace

bool decays(const std::string& name) {
  static const std::string kWeight = ".weight";
  if (!ends_with(name, kWeight)) return false;  // biases, A_log, D, bridge gates
  const std::string module = name.substr(0, name.size() - kWeight.size());
  const size_t dot = module.rfind('.');
  const std::string last = dot == std::string::npos ? module : module.substr(dot + 1);
  if (last.find("norm") != std::string::npos) return false;  // norm, mlp_norm, norm_f
  if (last == "embeddings") return false;
  return true;
}

double grad_norm(const Params& g) {
  struct Chunk { const float* p; int64_t n; };
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < g.specs().size(); ++i) {
    const int64_t n = g.specs()[i].numel();
    for (int64_t k = 0; k < n; k += kNormChunk) chunks.push_back({g.at(i) + k, std::min(kNormChunk, n - k)});
  }
  std::vector<double> partial(chunks.size(), 0.0);
  const int64_t nc = int64_t(chunks.size());
#pragma omp parallel for schedule(static) if (g.numel() >= kParallelMin)
  for (int64_t c = 0; c < nc; ++c) {
    const float* p = chunks[size_t(c)].p;
    const int64_t n = chunks[size_t(c)].n;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += double(p[k]) * double(p[k]);
    partial[size_t(c)] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return std::sqrt(total);
}

void zero(Params& p) {
  float* d = p.data();
  const int64_t n = p.numel();
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t k = 0; k < n; ++k) d[k] = 0.0f;
}

AdamW::AdamW(const Params& p, AdamWConfig c)
    : cfg_(c), m_(std::make_unique<Params>(p.config())), v_(std::make_unique<Params>(p.config())) {
  HM_CHECK(c.beta1 >= 0.0f && c.beta1 < 1.0f, "adamw: beta1 must be in [0, 1), got ", c.beta1);
  HM_CHECK(c.beta2 >= 0.0f && c.beta2 < 1.0f, "adamw: beta2 must be in [0, 1), got ", c.beta2);
  HM_CHECK(c.eps > 0.0f, "adamw: eps must be > 0, got ", c.eps);
  HM_CHECK(c.weight_decay >= 0.0f, "adamw: weight_decay must be >= 0, got ", c.weight_decay);
  zero(*m_);
  zero(*v_);
  for (const auto& s : p.specs()) decay_.push_back(decays(s.name) ? 1 : 0);
}

AdamW::~AdamW() = default;

double AdamW::step(Params& p, Params& grads, float lr) {
  check_same_layout(p, *m_);
  check_same_layout(grads, *m_);
  const double norm = grad_norm(grads);
  if (!std::isfinite(norm)) return norm;

  // Scale in double, then round once: the clipped norm lands on clip_norm to float precision.
  const bool clip = cfg_.clip_norm > 0.0f && norm > double(cfg_.clip_norm);
  const float scale = clip ? float(double(cfg_.clip_norm) / norm) : 1.0f;
  ++t_;
  // Bias corrections from double powers: beta2^t in float loses digits over long runs.
  const StepConsts k{cfg_.beta1, cfg_.beta2, 1.0f - cfg_.beta1, 1.0f - cfg_.beta2,
                     float(1.0 / (1.0 - std::pow(double(cfg_.beta1), double(t_)))),
                     float(1.0 / (1.0 - std::pow(double(cfg_.beta2), double(t_)))), cfg_.eps, lr};

#pragma omp parallel if (p.numel() >= kParallelMin)
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const int64_t n = p.specs()[i].numel();
    const float wd = decay_[i] ? cfg_.weight_decay : 0.0f;
    if (scale != 1.0f)
      adam_update<true>(n, k, wd, scale, p.at(i), grads.at(i), m_->at(i), v_->at(i));
    else
      adam_update<false>(n, k, wd, scale, p.at(i), grads.at(i), m_->at(i), v_->at(i));
  }
  return norm;
}

std::pair<float, float> AdamW::count_step() {
  ++t_;
  return {float(1.0 / (1.0 - std::pow(double(cfg_.beta1), double(t_)))),
          float(1.0 / (1.0 - std::pow(double(cfg_.beta2), double(t_))))};
}

void AdamW::save(const std::string& path) const {
  std::vector<F32Tensor> ts;
  ts.reserve(2 * m_->specs().size());
  for (size_t i = 0; i < m_->specs().size(); ++i) {
    const ParamSpec& s = m_->specs()[i];
    ts.push_back({"m." + s.name, s.shape, m_->at(i)});
    ts.push_back({"v." + s.name, s.shape, v_->at(i)});
  }
  write_safetensors_f32(path, ts, DType::F32,
                        {{"format", "hm-adamw"}, {"producer", "hybrid-mamba"}, {"step", std::to_string(t_)}});
}

void AdamW::load(const std::string& path) {
  SafetensorsReader r(path);
  const auto it = r.metadata().find("step");
  HM_CHECK(it != r.metadata().end(), "optimizer state: ", path, ": metadata has no 'step'");
  int64_t step = -1;
  const std::string& sv = it->second;
  const auto [end, ec] = std::from_chars(sv.data(), sv.data() + sv.size(), step);
  HM_CHECK(ec == std::errc() && end == sv.data() + sv.size() && step >= 0, "optimizer state: ", path,
           ": metadata 'step' is not a non-negative integer: '", sv, "'");

  std::set<std::string> expected;
  for (const auto& s : m_->specs()) {
    expected.insert("m." + s.name);
    expected.insert("v." + s.name);
  }
  for (const auto& t : r.tensors())
    HM_CHECK(expected.count(t.name), "optimizer state: ", path, ": unexpected tensor '", t.name,
             "' (the state belongs to a different model layout)");

  // Read into fresh arenas so that a failure halfway leaves this optimizer as it was.
  auto m = std::make_unique<Params>(m_->config());
  auto v = std::make_unique<Params>(v_->config());
  zero(*m);
  zero(*v);
  for (size_t i = 0; i < m_->specs().size(); ++i) {
    const ParamSpec& s = m_->specs()[i];
    for (int which = 0; which < 2; ++which) {
      const std::string name = (which == 0 ? "m." : "v.") + s.name;
      const TensorInfo* t = r.find(name);
      HM_CHECK(t != nullptr, "optimizer state: ", path, ": missing tensor '", name, "'");
      HM_CHECK(t->dtype == DType::F32, "optimizer state: ", path, ": tensor '", name, "' is ",
               dtype_name(t->dtype), ", expected F32");
      float* dst = which == 0 ? m->at(i) : v->at(i);
      r.read_f32(name, s.shape, dst);  // throws naming the tensor on a shape mismatch
      for (int64_t k = 0; k < s.numel(); ++k)
        HM_CHECK(std::isfinite(dst[k]) && (which == 0 || dst[k] >= 0.0f), "optimizer state: ", path,
                 ": tensor '", name, "' holds an invalid value (", dst[k], ") at element ", k);
    }
  }
  m_ = std::move(m);
  v_ = std::move(v);
  t_ = step;
}

float lr_at(int64_t step, int64_t warmup, int64_t total, float max_lr, float min_lr) {
  HM_CHECK(warmup >= 0 && total >= warmup, "lr schedule: need 0 <= warmup <= total, got warmup ", warmup,
           ", total ", total);
  HM_CHECK(step >= 0, "lr schedule: step must be >= 0, got ", step);
  if (step < warmup) return float(double(max_lr) * double(step) / double(warmup));
  if (step >= total) return min_lr;
  const double progress = double(step - warmup) / double(total - warmup);  // [0, 1)
  const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));  // 1 -> 0
  return float(double(min_lr) + (double(max_lr) - double(min_lr)) * cosine);
}

}  // namespace hm
