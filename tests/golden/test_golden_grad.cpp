// Training gradients against PyTorch autograd: bench/torch_peer.py grads runs the peer's model in
// float64 (forward, mean cross-entropy with ignore_index=-1, backward) on the tiny config's
// write-random checkpoint (every bridge gate, norm weight, A_log and D random), and writes the tokens, targets, loss and every
// parameter's gradient. We compute the same with train/model_grad.h on the same tokens.
//
// Measure, per tensor: max_i |ours_i - torch_i| / max_i |torch_i|. Required: <= 1e-10 in double
// (two float64 computations of one function, differing only in summation order; config.json holds
// norm_eps as the float 1e-5f widened, so both sides use the same eps: observed 3e-15), and
// <= 1e-5 for our float gradients (float storage, double sums: observed 4e-7). The loss:
// relative 1e-12 (double) and 1e-6 (float).
// The fixture that writes the files is in tests/golden.cmake.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/config.h"
#include "model/params.h"
#include "train/model_grad.h"

using namespace hm;

namespace {
const std::string kGradDir = std::string(HM_BINARY_DIR) + "/golden/tiny";

struct TorchGrads {
  int B = 0, L = 0;
  std::vector<int32_t> tokens, targets;
  double loss = 0;
  std::vector<std::vector<double>> grads;  // per spec of the Params layout
};

std::vector<double> read_f64(const SafetensorsReader& r, const std::string& name,
                             const std::vector<int64_t>& shape) {
  const TensorInfo* t = r.find(name);
  if (t == nullptr) {
    ADD_FAILURE() << "missing tensor " << name;
    return {};
  }
  EXPECT_EQ(t->dtype, DType::F64) << name;
  EXPECT_EQ(t->shape, shape) << name;
  std::vector<double> v(size_t(t->numel()));
  if (t->dtype == DType::F64 && t->shape == shape) r.read_raw(*t, v.data());
  return v;
}

TorchGrads load_torch(const Params& p) {
  SafetensorsReader r(kGradDir + "/grads.safetensors");
  TorchGrads g;
  const TensorInfo* tok = r.find("tokens");
  const TensorInfo* tgt = r.find("targets");
  EXPECT_TRUE(tok && tgt && tok->dtype == DType::I32 && tgt->dtype == DType::I32 &&
              tok->shape.size() == 2 && tok->shape == tgt->shape);
  if (!tok || !tgt || tok->shape.size() != 2) return g;
  g.B = int(tok->shape[0]);
  g.L = int(tok->shape[1]);
  g.tokens.resize(size_t(g.B) * g.L);
  g.targets.resize(size_t(g.B) * g.L);
  r.read_raw(*tok, g.tokens.data());
  r.read_raw(*tgt, g.targets.data());
  const std::vector<double> loss = read_f64(r, "loss", {});
  g.loss = loss.empty() ? NAN : loss[0];
  for (const ParamSpec& s : p.specs()) g.grads.push_back(read_f64(r, "grad." + s.name, s.shape));
  return g;
}

// Per tensor max |a - b| / max |b|; prints each and returns the worst.
template <class A>
double compare(const Params& p, const A* ours, const TorchGrads& t, const char* what) {
  double worst = 0;
  for (size_t k = 0; k < p.specs().size(); ++k) {
    const std::vector<double>& ref = t.grads[k];
    const A* a = ours + (p.at(k) - p.data());
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      num = std::max(num, std::fabs(double(a[i]) - ref[i]));
      den = std::max(den, std::fabs(ref[i]));
    }
    EXPECT_GT(den, 0.0) << p.specs()[k].name << ": PyTorch gradient is zero";
    const double e = num / std::max(den, 1e-300);
    if (std::getenv("HM_GRAD_VERBOSE"))
      std::printf("  %-6s %-44s max|g| %.3e  rel err %.2e\n", what, p.specs()[k].name.c_str(), den, e);
    worst = std::max(worst, e);
  }
  return worst;
}

}  // namespace

TEST(GoldenGrad, LossAndGradientsMatchPyTorchAutograd) {
  const ModelConfig c = load_config(kGradDir + "/config.json");
  Params p(c);
  load_params(p, kGradDir + "/model.safetensors");
  const TorchGrads t = load_torch(p);
  ASSERT_GT(t.B, 0);
  ASSERT_EQ(t.grads.size(), p.specs().size());

  // Double: parameters widened exactly (the peer widens the same float32 values).
  std::vector<double> pd(size_t(p.numel()), 0.0), gd(pd.size(), 0.0);
  for (size_t k = 0; k < p.specs().size(); ++k)
    for (int64_t i = 0; i < p.specs()[k].numel(); ++i) pd[size_t(p.at(k) - p.data() + i)] = p.at(k)[i];
  const double loss = loss_and_grad_arena<double>(p, pd.data(), gd.data(), t.tokens.data(),
                                                  t.targets.data(), t.B, t.L);
  std::printf("  loss: ours %.15f, PyTorch %.15f\n", loss, t.loss);
  EXPECT_NEAR(loss, t.loss, 1e-12 * std::fabs(t.loss));
  const double worst = compare(p, gd.data(), t, "f64");
  std::printf("  worst tensor, double: %.2e\n", worst);
  EXPECT_LE(worst, 1e-10);

  // Float, through the training entry point.
  Params gf(c);
  std::fill(gf.data(), gf.data() + gf.numel(), 0.0f);
  const double lossf = loss_and_grad(p, gf, t.tokens.data(), t.targets.data(), t.B, t.L);
  EXPECT_NEAR(lossf, t.loss, 1e-6 * std::fabs(t.loss));
  const double worstf = compare(p, gf.data(), t, "f32");
  std::printf("  worst tensor, float: %.2e\n", worstf);
  EXPECT_LE(worstf, 1e-5);
}
