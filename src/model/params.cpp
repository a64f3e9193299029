#include "model/params.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "core/checked.h"
#include "core/error.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "model/packed_checkpoint.h"

namespace hm {

int64_t ParamSpec::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n = checked_mul(n, s, "parameter tensor size");
  return n;
}

std::vector<ParamSpec> param_layout(const ModelConfig& c) {
  const int64_t D = c.d_model, E = c.d_inner(), N = c.d_state, K = c.d_conv, R = c.resolved_dt_rank();
  const int64_t H = c.n_heads, G = c.n_kv_heads, hd = c.head_dim(), F = c.d_ff, V = c.vocab_size;
  std::vector<ParamSpec> s;
  s.push_back({"backbone.embeddings.weight", {V, D}});
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string L = "backbone.layers." + std::to_string(i) + ".";
    if (c.has_bridge(i)) {
      const std::string B = "backbone.bridges." + std::to_string(i) + ".";
      const int64_t S = c.inner_dim(i - 1);
      s.push_back({B + "norm.weight", {S}});
      s.push_back({B + "proj.weight", {D, S}});
      s.push_back({B + "gate", {D}});
    }
    s.push_back({L + "norm.weight", {D}});
    if (c.has_attention_path(i)) {
      s.push_back({L + "mixer.q_proj.weight", {H * hd, D}});
      s.push_back({L + "mixer.k_proj.weight", {G * hd, D}});
      s.push_back({L + "mixer.v_proj.weight", {G * hd, D}});
      s.push_back({L + "mixer.o_proj.weight", {D, H * hd}});
    }
    if (c.is_mamba2(i)) {  // transformers' Mamba2Mixer names and shapes
      const int64_t CD = c.mamba2_conv_dim(), Hm = c.mamba2_heads();
      s.push_back({L + "mixer.in_proj.weight", {c.mamba2_in_proj_rows(), D}});
      s.push_back({L + "mixer.conv1d.weight", {CD, 1, K}});
      s.push_back({L + "mixer.conv1d.bias", {CD}});
      s.push_back({L + "mixer.dt_bias", {Hm}});
      s.push_back({L + "mixer.A_log", {Hm}});
      s.push_back({L + "mixer.D", {Hm}});
      if (c.mamba2_gated_norm) s.push_back({L + "mixer.norm.weight", {E}});
      s.push_back({L + "mixer.out_proj.weight", {D, E}});
    } else if (c.has_mamba_path(i)) {
      s.push_back({L + "mixer.in_proj.weight", {2 * E, D}});
      s.push_back({L + "mixer.conv1d.weight", {E, 1, K}});
      s.push_back({L + "mixer.conv1d.bias", {E}});
      s.push_back({L + "mixer.x_proj.weight", {R + 2 * N, E}});
      s.push_back({L + "mixer.dt_proj.weight", {E, R}});
      s.push_back({L + "mixer.dt_proj.bias", {E}});
      s.push_back({L + "mixer.A_log", {E, N}});
      s.push_back({L + "mixer.D", {E}});
      s.push_back({L + "mixer.out_proj.weight", {D, E}});
      if (c.mamba_proj_bias) {  // transformers' use_bias
        s.push_back({L + "mixer.in_proj.bias", {2 * E}});
        s.push_back({L + "mixer.out_proj.bias", {D}});
      }
      if (c.mamba_bcdt_norm_weight) {  // Jamba's names
        s.push_back({L + "mixer.dt_layernorm.weight", {R}});
        s.push_back({L + "mixer.b_layernorm.weight", {N}});
        s.push_back({L + "mixer.c_layernorm.weight", {N}});
      }
    }
    if (c.is_true(i)) {  // fusion, cross-path exchange and router (docs/TRUE_HYBRID.md)
      s.push_back({L + "mixer.fuse_mamba", {D}});
      s.push_back({L + "mixer.fuse_attn", {D}});
      s.push_back({L + "mixer.exchange", {D}});
      s.push_back({L + "mixer.router.weight", {D}});
      s.push_back({L + "mixer.router.feat_weight", {kRouterFeatures}});
      s.push_back({L + "mixer.router.bias", {1}});
    }
    if (c.has_ffn(i) && c.is_moe(i)) {  // expert e's W is slice e of each stack
      const int64_t X = c.moe_experts, Fe = c.moe_width();
      const bool gated = c.mlp_act == "swiglu";  // relu2 experts have no gate projection
      s.push_back({L + "mlp_norm.weight", {D}});
      s.push_back({L + "mlp.router.weight", {X, D}});
      if (c.moe_router == "sigmoid") s.push_back({L + "mlp.router.correction_bias", {X}});
      if (gated) s.push_back({L + "mlp.experts.gate_proj.weight", {X, Fe, D}});
      s.push_back({L + "mlp.experts.up_proj.weight", {X, Fe, D}});
      s.push_back({L + "mlp.experts.down_proj.weight", {X, D, Fe}});
      if (c.moe_shared_ff > 0) {
        const int64_t S = c.moe_shared_ff;
        if (gated) s.push_back({L + "mlp.shared_gate_proj.weight", {S, D}});
        s.push_back({L + "mlp.shared_up_proj.weight", {S, D}});
        s.push_back({L + "mlp.shared_down_proj.weight", {D, S}});
      }
    } else if (c.has_ffn(i)) {
      s.push_back({L + "mlp_norm.weight", {D}});
      if (c.mlp_act == "swiglu") s.push_back({L + "mlp.gate_proj.weight", {F, D}});
      s.push_back({L + "mlp.up_proj.weight", {F, D}});
      s.push_back({L + "mlp.down_proj.weight", {D, F}});
    }
  }
  s.push_back({"backbone.norm_f.weight", {D}});
  if (!c.tie_embeddings) s.push_back({"lm_head.weight", {V, D}});
  return s;
}

Params::Params(const ModelConfig& c) : cfg_(c), specs_(param_layout(c)) {
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < specs_.size(); ++i) {
    offsets_.push_back(numel_);
    // 16-float alignment keeps every tensor on its own cache line (64 B) for SIMD loads.
    numel_ = checked_add(numel_, (specs_[i].numel() + 15) / 16 * 16, "parameter arena size");
    index[specs_[i].name] = i;
  }
  // Default-initialised (not zeroed): pages are committed only when written, by init or load.
  // The padding after each tensor is zeroed, so the whole arena is defined: it is copied, summed
  // and checked as one block (a device's master weights, all_finite), and garbage there once
  // stopped a run as "non-finite".
  data_.reset(new float[size_t(numel_)]);
  for (size_t i = 0; i < specs_.size(); ++i) {
    const int64_t end = offsets_[i] + specs_[i].numel(), next = i + 1 < specs_.size() ? offsets_[i + 1] : numel_;
    std::fill(data_.get() + end, data_.get() + next, 0.0f);
  }
  auto ptr = [&](const std::string& name) -> float* {
    auto it = index.find(name);
    return it == index.end() ? nullptr : at(it->second);
  };
  embeddings_ = ptr("backbone.embeddings.weight");
  norm_f_ = ptr("backbone.norm_f.weight");
  lm_head_ = cfg_.tie_embeddings ? embeddings_ : ptr("lm_head.weight");
  layers_.resize(size_t(cfg_.n_layers));
  for (int i = 0; i < cfg_.n_layers; ++i) {
    const std::string L = "backbone.layers." + std::to_string(i) + ".";
    const std::string B = "backbone.bridges." + std::to_string(i) + ".";
    LayerWeights& w = layers_[size_t(i)];
    w.norm = ptr(L + "norm.weight");
    w.in_proj = ptr(L + "mixer.in_proj.weight");
    w.conv_w = ptr(L + "mixer.conv1d.weight");
    w.conv_b = ptr(L + "mixer.conv1d.bias");
    w.x_proj = ptr(L + "mixer.x_proj.weight");
    w.dt_w = ptr(L + "mixer.dt_proj.weight");
    w.dt_b = c.is_mamba2(i) ? ptr(L + "mixer.dt_bias") : ptr(L + "mixer.dt_proj.bias");
    w.ssm_norm = ptr(L + "mixer.norm.weight");
    w.A_log = ptr(L + "mixer.A_log");
    w.Dskip = ptr(L + "mixer.D");
    w.out_proj = ptr(L + "mixer.out_proj.weight");
    w.in_proj_b = ptr(L + "mixer.in_proj.bias");
    w.out_proj_b = ptr(L + "mixer.out_proj.bias");
    w.dt_norm = ptr(L + "mixer.dt_layernorm.weight");
    w.b_norm = ptr(L + "mixer.b_layernorm.weight");
    w.c_norm = ptr(L + "mixer.c_layernorm.weight");
    w.wq = ptr(L + "mixer.q_proj.weight");
    w.wk = ptr(L + "mixer.k_proj.weight");
    w.wv = ptr(L + "mixer.v_proj.weight");
    w.wo = ptr(L + "mixer.o_proj.weight");
    w.mlp_norm = ptr(L + "mlp_norm.weight");
    w.w_gate = ptr(L + "mlp.gate_proj.weight");
    w.w_up = ptr(L + "mlp.up_proj.weight");
    w.w_down = ptr(L + "mlp.down_proj.weight");
    w.moe_router = ptr(L + "mlp.router.weight");
    w.moe_bias = ptr(L + "mlp.router.correction_bias");
    w.e_gate = ptr(L + "mlp.experts.gate_proj.weight");
    w.e_up = ptr(L + "mlp.experts.up_proj.weight");
    w.e_down = ptr(L + "mlp.experts.down_proj.weight");
    w.s_gate = ptr(L + "mlp.shared_gate_proj.weight");
    w.s_up = ptr(L + "mlp.shared_up_proj.weight");
    w.s_down = ptr(L + "mlp.shared_down_proj.weight");
    w.fuse_mamba = ptr(L + "mixer.fuse_mamba");
    w.fuse_attn = ptr(L + "mixer.fuse_attn");
    w.exchange = ptr(L + "mixer.exchange");
    w.router_w = ptr(L + "mixer.router.weight");
    w.router_feat = ptr(L + "mixer.router.feat_weight");
    w.router_b = ptr(L + "mixer.router.bias");
    w.bridge_norm = ptr(B + "norm.weight");
    w.bridge_proj = ptr(B + "proj.weight");
    w.bridge_gate = ptr(B + "gate");
  }
}

float* Params::get(const std::string& name) {
  for (size_t i = 0; i < specs_.size(); ++i)
    if (specs_[i].name == name) return at(i);
  HM_ASSERT(!"parameter name not in layout");
  return nullptr;
}
const float* Params::get(const std::string& name) const { return const_cast<Params*>(this)->get(name); }

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

void init_params(Params& p, uint64_t seed) {
  const ModelConfig& c = p.config();
  Rng rng(seed);
  const double residual_scale = 1.0 / std::sqrt(double(c.n_layers));
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const ParamSpec& s = p.specs()[i];
    float* w = p.at(i);
    const int64_t n = s.numel();
    auto uniform = [&](double bound) {
      for (int64_t k = 0; k < n; ++k) w[k] = float((2.0 * rng.uniform() - 1.0) * bound);
    };
    auto fill = [&](float v) { std::fill(w, w + n, v); };
    const std::string& nm = s.name;
    if (nm == "backbone.embeddings.weight" || nm == "lm_head.weight") {
      for (int64_t k = 0; k < n; ++k) w[k] = float(0.02 * rng.normal());
    } else if (ends_with(nm, "norm.weight") || ends_with(nm, "norm_f.weight")) {  // every RMSNorm
      fill(1.0f);
    } else if (ends_with(nm, ".gate")) {        // bridges start as the identity
      fill(0.0f);
    } else if (ends_with(nm, "mixer.fuse_mamba") || ends_with(nm, "mixer.fuse_attn")) {
      fill(1.0f);
    } else if (ends_with(nm, "mixer.exchange") || ends_with(nm, "router.feat_weight") ||
               ends_with(nm, "router.bias")) {
      fill(0.0f);  // exchange off, routing by content alone at first: p = sigmoid(w.u)
    } else if (ends_with(nm, "mixer.in_proj.bias") || ends_with(nm, "mixer.out_proj.bias") ||
               ends_with(nm, "router.correction_bias")) {
      fill(0.0f);  // in_proj / out_proj biases, the router's choice correction: none at first
    } else if (ends_with(nm, "mlp.router.weight")) {  // MoE router [experts, D]
      uniform(1.0 / std::sqrt(double(s.shape[1])));
    } else if (s.shape.size() == 3) {  // MoE expert stacks [experts, out, in]
      uniform(1.0 / std::sqrt(double(s.shape[2])));
      if (ends_with(nm, "down_proj.weight"))
        for (int64_t k = 0; k < n; ++k) w[k] = float(w[k] * residual_scale);
    } else if (ends_with(nm, "router.weight")) {
      // u has unit RMS, so logits start ~N(0, 1): routes spread over both paths from step 0.
      for (int64_t k = 0; k < n; ++k) w[k] = float(rng.normal() / std::sqrt(double(n)));
    } else if (ends_with(nm, "mixer.A_log") && s.shape.size() == 1) {
      // Mamba-2: one A per head, uniform in [1, 16] as mamba_ssm draws it.
      for (int64_t k = 0; k < n; ++k) w[k] = float(std::log(1.0 + 15.0 * rng.uniform()));
    } else if (ends_with(nm, "mixer.A_log")) {
      const int64_t N = s.shape[1];
      for (int64_t k = 0; k < n; ++k) w[k] = float(std::log(double(k % N + 1)));
    } else if (ends_with(nm, "mixer.D")) {
      fill(1.0f);
    } else if (ends_with(nm, "conv1d.weight") || ends_with(nm, "conv1d.bias")) {
      uniform(1.0 / std::sqrt(double(c.d_conv)));
    } else if (ends_with(nm, "dt_proj.weight")) {
      uniform(1.0 / std::sqrt(double(c.resolved_dt_rank())));
    } else if (ends_with(nm, "dt_proj.bias") || ends_with(nm, "mixer.dt_bias")) {
      const double lo = std::log(0.001), hi = std::log(0.1);
      for (int64_t k = 0; k < n; ++k) {
        double dt = std::exp(rng.uniform() * (hi - lo) + lo);
        dt = std::max(dt, 1e-4);
        w[k] = float(dt + std::log(-std::expm1(-dt)));  // inverse softplus
      }
    } else {  // every Linear weight [out, in]
      HM_CHECK(s.shape.size() == 2, "init: no rule for tensor ", nm);
      uniform(1.0 / std::sqrt(double(s.shape[1])));
      if (ends_with(nm, "out_proj.weight") || ends_with(nm, "o_proj.weight") ||
          ends_with(nm, "down_proj.weight"))
        for (int64_t k = 0; k < n; ++k) w[k] = float(w[k] * residual_scale);
    }
  }
}

void save_params(const Params& p, const std::string& path, const std::string& stored_dtype) {
  const DType dt = dtype_from_name(stored_dtype);
  HM_CHECK(dt == DType::F32 || dt == DType::F16 || dt == DType::BF16,
           "checkpoint: storage dtype must be F32, F16 or BF16, got ", stored_dtype);
  std::vector<TensorToWrite> ts;
  std::vector<std::vector<uint16_t>> halves;  // converted copies must outlive the write
  halves.reserve(p.specs().size());           // no reallocation: ts holds pointers into it
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const ParamSpec& s = p.specs()[i];
    // A_log stays float32 whatever the storage type (mamba.md: the scan needs its precision).
    if (dt == DType::F32 || ends_with(s.name, "A_log")) {
      ts.push_back({s.name, DType::F32, s.shape, p.at(i)});
      continue;
    }
    std::vector<uint16_t>& h = halves.emplace_back(size_t(s.numel()));
    for (int64_t k = 0; k < s.numel(); ++k)
      h[size_t(k)] = dt == DType::F16 ? f32_to_f16(p.at(i)[k]) : f32_to_bf16(p.at(i)[k]);
    ts.push_back({s.name, dt, s.shape, h.data()});
  }
  write_safetensors(path, ts, {{"format", "pt"}, {"producer", "hybrid-mamba"}});
}

DType load_params(Params& p, const std::string& path) {
  SafetensorsReader r(path);
  const DType format = checkpoint_weight_format(r);
  std::map<std::string, bool> expected;
  for (const auto& s : p.specs()) expected[s.name] = false;
  for (const auto& t : r.tensors()) {
    auto it = expected.find(t.name);
    HM_CHECK(it != expected.end(), "checkpoint: ", path, ": unexpected tensor '", t.name,
             "' (not part of this config; does config.json match the weights?)");
  }
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const ParamSpec& s = p.specs()[i];
    const TensorInfo* t = r.find(s.name);
    HM_CHECK(t != nullptr, "checkpoint: ", path, ": missing tensor '", s.name, "'");
    read_weight_tensor(r, *t, s, format, p.at(i));
    const float* w = p.at(i);
    for (int64_t k = 0; k < s.numel(); ++k)
      HM_CHECK(std::isfinite(w[k]), "checkpoint: ", path, ": tensor '", s.name,
               "' holds a non-finite value at element ", k);
  }
  return format;
}

}  // namespace hm
