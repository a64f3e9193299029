// Training on CUDA (issue 15): BatchGrad's whole-model gradients on the GPU against the same
// computation on the CPU backend (itself checked against the double reference and finite
// differences in tests/test_batch_grad.cpp and test_model_grad.cpp) and, for every config the
// double reference model has, against that model directly; the optimizer ops, and
// `hm train --device cuda` against the CPU run.
//
// Bounds (max|got - ref| / max|ref| per tensor): f32 1e-4 (cuBLAS sums in another order over
// thousands of terms); bf16 and f16 compute: the loss within 1e-2 relative and every tensor's
// gradient within 0.15 of its scale with a cosine similarity >= 0.99 to the f32 one (16-bit
// activations and GEMM inputs, float32 sums). Reruns are bitwise equal (fixed reduction orders).
// f16 is refused for training (no loss scaling: measured here, its gradients underflowed, dt_proj's
// 0.35 off with cosine 0.92).
// Without a GPU every case is GTEST_SKIPped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/rng.h"
#include "model/config.h"
#include "model/params.h"
#include "train/batch_grad.h"
#include "train/model_grad.h"
#include "train/optimizer.h"
#include "train/trainer.h"
#include "cuda_test_util.h"
#include "../grad_test_util.h"
#include "../test_util.h"

using namespace hm;
using test::has_gpu;

namespace {

ModelConfig hybrid_config(bool tied) {
  ModelConfig c;
  c.d_model = 64;
  c.n_layers = 4;
  c.attention_layers = {1, 2};
  c.vocab_size = 97;
  c.d_state = 16;
  c.d_conv = 4;
  c.expand = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.rope = true;
  c.d_ff = 96;
  c.tie_embeddings = tied;
  c.state_bridges = true;
  validate(c);
  return c;
}

// Gradients of one batch on `be` in `ct`, as a host arena.
std::vector<float> grads_on(Backend& be, const Params& p, DType ct, const test::TokenBatch& b, double* loss) {
  const size_t bytes = sizeof(float) * size_t(p.numel());
  Buffer w(be, bytes), g(be, bytes);
  be.to_device(w.data(), p.data(), bytes);
  be.memzero(g.data(), bytes);
  BatchGrad bg(be, p, ct);
  bg.set_weights(w.f32());
  *loss = bg.loss_and_grad(g.f32(), b.tokens.data(), b.targets.data(), b.B, b.L);
  std::vector<float> out(size_t(p.numel()));
  be.to_host(out.data(), g.data(), bytes);
  return out;
}

double cosine(const float* a, const float* b, int64_t n) {
  double ab = 0, aa = 0, bb = 0;
  for (int64_t i = 0; i < n; ++i) {
    ab += double(a[i]) * b[i];
    aa += double(a[i]) * a[i];
    bb += double(b[i]) * b[i];
  }
  return aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : (aa == bb ? 1.0 : 0.0);
}

}  // namespace

TEST(CudaTrain, BatchGradMatchesCpu) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  auto gpu = make_backend(Device::CUDA);
  auto cpu = make_cpu_backend();
  ModelConfig mamba = preset("tiny");
  mamba.attention_layers.clear();
  mamba.d_ff = 0;
  validate(mamba);
  // Mamba-2 layers (ssd_grad.cu) in the hybrid: two groups, a bridge from a Mamba-2 layer.
  ModelConfig mamba2 = hybrid_config(false);
  mamba2.mamba2_layers = {0, 3};
  mamba2.mamba2_head_dim = 16;
  mamba2.mamba2_groups = 2;
  validate(mamba2);
  ModelConfig bcdt = hybrid_config(false);  // Jamba's learned dt/B/C norms (Falcon-Mamba's are weightless)
  bcdt.mamba_bcdt_norm = true;
  bcdt.mamba_bcdt_norm_weight = true;
  validate(bcdt);
  ModelConfig partial = hybrid_config(false);  // Bamba's partial rotary
  partial.n_heads = 2;
  partial.n_kv_heads = 1;
  partial.rope_dim = partial.head_dim() / 2;
  validate(partial);
  ModelConfig moe = hybrid_config(false);  // Granite-style experts with a shared one, FFNs on some layers
  moe.moe_layers = {0, 2};
  moe.ffn_layers = {0, 2, 3};
  moe.moe_experts = 4;
  moe.moe_renormalize = true;
  moe.moe_shared_ff = 32;
  validate(moe);
  ModelConfig bias = hybrid_config(true);  // Mamba's use_bias: in_proj and out_proj biases
  bias.mamba_proj_bias = true;
  validate(bias);
  // Nemotron-H's pieces: Mamba-2 layers, squared-ReLU MLPs on some layers only, an explicit
  // attention head_dim (4 heads of 8 in d 64).
  ModelConfig nemotron = hybrid_config(false);
  nemotron.mamba2_layers = {0, 3};
  nemotron.mamba2_head_dim = 16;
  nemotron.mamba2_groups = 2;
  nemotron.mlp_act = "relu2";
  nemotron.ffn_layers = {0, 2};
  nemotron.attn_head_dim = 8;
  validate(nemotron);
  // Granite's multipliers (embedding, residual, attention scale, logits scaling).
  ModelConfig mult = hybrid_config(false);
  mult.state_bridges = false;  // residual_multiplier is not defined with bridges (validate)
  mult.embedding_multiplier = 3.0f;
  mult.residual_multiplier = 0.5f;
  mult.attention_scale = 0.3f;
  mult.logits_scaling = 2.5f;
  validate(mult);
  const ModelConfig falcon = test::falcon_h1_layer_config();
  for (const ModelConfig& c :
       {hybrid_config(true), hybrid_config(false), mamba, mamba2, bcdt, partial, moe, bias, nemotron, mult, falcon}) {
    Params p(c);
    test::randomize_params(p, 5);
    const test::TokenBatch b = test::make_batch(3, 77, c.vocab_size, 6);
    double l_cpu = 0, l_gpu = 0;
    const std::vector<float> g_cpu = grads_on(*cpu, p, DType::F32, b, &l_cpu);
    const std::vector<float> g_gpu = grads_on(*gpu, p, DType::F32, b, &l_gpu);
    EXPECT_NEAR(l_gpu, l_cpu, 1e-5 * l_cpu);
    const auto [err, name] = test::worst_tensor_err(p, g_gpu.data(), g_cpu.data());
    std::printf("  f32: loss %.7f vs cpu %.7f; worst tensor %s: %.2e\n", l_gpu, l_cpu, name.c_str(), err);
    EXPECT_LE(err, 1e-4) << name;
    // Issue 15's oracle: the float64 reference model, where it has every layer of c (it names
    // what it lacks: dt/B/C norms, experts, projection biases, squared-ReLU MLPs, multipliers).
    try {
      Params g64(c);
      std::fill(g64.data(), g64.data() + g64.numel(), 0.0f);
      const double l64 = loss_and_grad_f64(p, g64, b.tokens.data(), b.targets.data(), b.B, b.L);
      EXPECT_NEAR(l_gpu, l64, 1e-5 * l64);
      const auto [e64, n64] = test::worst_tensor_err(p, g_gpu.data(), g64.data());
      std::printf("  f32 against the float64 reference: worst tensor %s: %.2e\n", n64.c_str(), e64);
      EXPECT_LE(e64, 1e-4) << n64;
    } catch (const Error& e) {
      ASSERT_NE(std::string(e.what()).find("double-precision reference model has no"), std::string::npos) << e.what();
      std::printf("  (no float64 reference: %s)\n", e.what());
    }
    double again_loss = 0;
    const std::vector<float> again = grads_on(*gpu, p, DType::F32, b, &again_loss);
    EXPECT_EQ(again_loss, l_gpu);
    EXPECT_EQ(std::memcmp(again.data(), g_gpu.data(), sizeof(float) * again.size()), 0) << "rerun differs";
    double unused = 0;
    EXPECT_THROW(grads_on(*gpu, p, DType::F16, b, &unused), Error);
    for (DType ct : {DType::BF16}) {
      double l16 = 0;
      const std::vector<float> g16 = grads_on(*gpu, p, ct, b, &l16);
      EXPECT_NEAR(l16, l_cpu, 1e-2 * l_cpu) << compute_dtype_name(ct);
      double worst = 0, worst_cos = 1;
      std::string wname;
      for (size_t k = 0; k < p.specs().size(); ++k) {
        const int64_t off = p.at(k) - p.data(), n = p.specs()[k].numel();
        double num = 0, den = 0;
        for (int64_t i = off; i < off + n; ++i) {
          num = std::max(num, std::fabs(double(g16[size_t(i)]) - g_cpu[size_t(i)]));
          den = std::max(den, std::fabs(double(g_cpu[size_t(i)])));
        }
        const double e = den > 0 ? num / den : num;
        const double cs = cosine(g16.data() + off, g_cpu.data() + off, n);
        if (e > worst) {
          worst = e;
          wname = p.specs()[k].name;
        }
        worst_cos = std::min(worst_cos, cs);
        // bf16 router logits can flip a token's top-k choice near a tie, moving that token's whole
        // gradient to another expert: the MoE tensors get a wider bound (0.19 seen on an H100).
        const std::string& nm = p.specs()[k].name;
        const bool gate_or_expert = nm.find(".mlp.router.") != std::string::npos || nm.find(".mlp.experts.") != std::string::npos;
        EXPECT_LE(e, gate_or_expert ? 0.3 : 0.15) << compute_dtype_name(ct) << " " << nm;
        EXPECT_GE(cs, 0.99) << compute_dtype_name(ct) << " " << p.specs()[k].name;
      }
      std::printf("  %s: loss %.7f; worst tensor %s: %.2e, lowest cosine %.5f\n", compute_dtype_name(ct), l16,
                  wname.c_str(), worst, worst_cos);
    }
  }
}

// True Hybrid layers (router and paths as ops) on the GPU against the CPU backend, f32:
// soft and both run every token on both paths; hard compacts them (a route could flip where a
// logit is within rounding of 0, so hard checks the loss only, and the routing is printed).
TEST(CudaTrain, TrueHybridMatchesCpu) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  auto gpu = make_backend(Device::CUDA);
  auto cpu = make_cpu_backend();
  for (const char* mode : {"soft", "both", "hard"}) {
    ModelConfig c = preset("true-tiny");
    c.routing_mode = mode;
    c.attention_budget = 0.3f;
    c.budget_loss_weight = 0.5f;
    validate(c);
    Params p(c);
    test::randomize_params(p, 15);
    const test::TokenBatch b = test::make_batch(3, 61, c.vocab_size, 16);
    double l_cpu = 0, l_gpu = 0;
    const std::vector<float> g_cpu = grads_on(*cpu, p, DType::F32, b, &l_cpu);
    const std::vector<float> g_gpu = grads_on(*gpu, p, DType::F32, b, &l_gpu);
    const auto [err, name] = test::worst_tensor_err(p, g_gpu.data(), g_cpu.data());
    std::printf("  true-tiny %s, f32: loss %.7f vs cpu %.7f; worst tensor %s: %.2e\n", mode, l_gpu, l_cpu,
                name.c_str(), err);
    EXPECT_NEAR(l_gpu, l_cpu, 1e-5 * l_cpu) << mode;
    if (std::string(mode) != "hard") {
      EXPECT_LE(err, 1e-4) << mode << " " << name;
    }
    double l16 = 0;
    grads_on(*gpu, p, DType::BF16, b, &l16);
    EXPECT_NEAR(l16, l_cpu, 1e-2 * l_cpu) << mode << " bf16";
  }
}

TEST(CudaTrain, OptimizerOpsMatchCpu) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  auto gpu = make_backend(Device::CUDA);
  auto cpu = make_cpu_backend();
  Rng rng(9);
  const int64_t n = 3 * 16384 + 1234;
  std::vector<float> p(static_cast<size_t>(n)), g(p.size()), m(p.size()), v(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    p[i] = float(rng.normal());
    g[i] = float(rng.normal()) * 0.1f;
    m[i] = float(rng.normal()) * 0.01f;
    v[i] = float(rng.uniform()) * 1e-3f;
  }
  const std::vector<Backend::ArenaSpan> spans = {{0, 100, 0.1f}, {128, 40000, 0.0f}, {40200, n - 40200, 0.1f}};
  const size_t bytes = sizeof(float) * size_t(n);
  Buffer dp(*gpu, bytes), dg(*gpu, bytes), dm(*gpu, bytes), dv(*gpu, bytes);
  gpu->to_device(dp.data(), p.data(), bytes);
  gpu->to_device(dg.data(), g.data(), bytes);
  gpu->to_device(dm.data(), m.data(), bytes);
  gpu->to_device(dv.data(), v.data(), bytes);
  const double s_cpu = cpu->sum_squares(g.data(), spans), s_gpu = gpu->sum_squares(dg.f32(), spans);
  EXPECT_NEAR(s_gpu, s_cpu, 1e-12 * s_cpu);
  EXPECT_EQ(gpu->sum_squares(dg.f32(), spans), s_gpu);  // fixed order
  Backend::AdamWStep k;
  k.lr = 1e-3f;
  k.beta1 = 0.9f;
  k.beta2 = 0.95f;
  k.eps = 1e-8f;
  k.inv_bc1 = 10.0f;
  k.inv_bc2 = 20.0f;
  k.grad_scale = 0.7f;
  cpu->adamw_step(p.data(), g.data(), m.data(), v.data(), spans, k);
  gpu->adamw_step(dp.f32(), dg.f32(), dm.f32(), dv.f32(), spans, k);
  std::vector<float> hp(p.size()), hm_(p.size()), hv(p.size());
  gpu->to_host(hp.data(), dp.data(), bytes);
  gpu->to_host(hm_.data(), dm.data(), bytes);
  gpu->to_host(hv.data(), dv.data(), bytes);
  double ep = 0, em = 0, ev = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    ep = std::max(ep, double(std::fabs(hp[i] - p[i])) / std::max(1.0, double(std::fabs(p[i]))));
    em = std::max(em, double(std::fabs(hm_[i] - m[i])));
    ev = std::max(ev, double(std::fabs(hv[i] - v[i])));
  }
  EXPECT_LE(ep, 1e-6);
  EXPECT_LE(em, 1e-9);
  EXPECT_LE(ev, 1e-10);
  // Untouched between spans (100..127, 40128..40199).
  EXPECT_EQ(hp[110], p[110]);
  EXPECT_EQ(hp[40150], p[40150]);
}

// hm train --device cuda in f32 follows the CPU run's loss curve; bf16 trains (loss falls) and
// its rerun is bitwise identical; a run stopped on CUDA resumes there bit-identically.
TEST(CudaTrain, TrainerFollowsCpuRun) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("hm_cuda_train_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  {
    std::ofstream f(dir / "corpus.txt");
    Rng r(3);
    const char* words[] = {"the cat", "a dog", "sees", "likes", "the ball", "a red hat", "the river"};
    for (int i = 0; i < 400; ++i) f << words[r.next_u64() % 7] << " " << words[r.next_u64() % 7] << ".\n";
  }
  auto run = [&](const std::string& out, Device d, DType ct, int64_t stop_after, bool resume) {
    TrainConfig c;
    c.preset = "tiny";
    c.data_path = (dir / "corpus.txt").string();
    c.out_dir = (dir / out).string();
    c.batch = 4;
    c.seq_len = 64;
    c.steps = 12;
    c.grad_accum = 2;
    c.lr = 3e-3f;
    c.warmup = 2;
    c.eval_every = 6;
    c.save_every = 0;
    c.eval_tokens = 1024;
    c.progress = false;
    c.device = d;
    c.compute = ct;
    c.stop_after = stop_after;
    c.resume = resume;
    train(c);
  };
  auto losses = [&](const std::string& out) {
    std::ifstream f(dir / out / "train_log.csv");
    std::string line;
    std::getline(f, line);
    std::vector<double> l;
    while (std::getline(f, line)) {
      const size_t a = line.find(','), b = line.find(',', a + 1), e = line.find(',', b + 1);
      l.push_back(std::stod(line.substr(b + 1, e - b - 1)));
    }
    return l;
  };
  run("cpu", Device::CPU, DType::F32, 0, false);
  run("f32", Device::CUDA, DType::F32, 0, false);
  run("bf16", Device::CUDA, DType::BF16, 0, false);
  run("bf16b", Device::CUDA, DType::BF16, 0, false);
  run("part", Device::CUDA, DType::BF16, 5, false);
  run("part", Device::CUDA, DType::BF16, 0, true);
  const auto lc = losses("cpu"), lf = losses("f32"), lb = losses("bf16"), lb2 = losses("bf16b"), lp = losses("part");
  ASSERT_EQ(lc.size(), 12u);
  ASSERT_EQ(lf.size(), 12u);
  ASSERT_EQ(lb.size(), 12u);
  double worst = 0;
  for (size_t i = 0; i < lc.size(); ++i) worst = std::max(worst, std::fabs(lf[i] - lc[i]) / lc[i]);
  std::printf("  f32 on cuda vs cpu: worst relative loss difference %.2e over 12 steps; loss %.4f -> %.4f\n", worst,
              lf.front(), lf.back());
  std::printf("  bf16 on cuda: loss %.4f -> %.4f (cpu f32 %.4f -> %.4f)\n", lb.front(), lb.back(), lc.front(),
              lc.back());
  EXPECT_LE(worst, 1e-3);
  EXPECT_LT(lb.back(), lb.front() - 0.3);
  EXPECT_EQ(lb, lb2);  // deterministic given the seed
  EXPECT_EQ(lp, lb);   // stopped at 5 and resumed: the same curve
  fs::remove_all(dir);
}
