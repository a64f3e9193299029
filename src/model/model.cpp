#include "model/model.h"

#include "model/moe.h"

#include <algorithm>
#include <cstdlib>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <set>
#include <tuple>
#include <utility>

#include "core/error.h"
#include "kernels/quant.h"
#include "model/packed_checkpoint.h"

namespace hm {

namespace {
// Prefill shapes recorded or warmed at once (decode batch sizes are few and kept).
constexpr size_t kMaxPrefillGraphs = 256;

bool prefill_graphs_default() {
  const char* v = std::getenv("HM_PREFILL_GRAPHS");
  return v != nullptr && std::string(v) == "1";
}
}  // namespace

HybridModel::HybridModel(const ModelConfig& c, Backend& be) : HybridModel(c, be, be.default_dtype()) {}

HybridModel::HybridModel(const ModelConfig& c, Backend& be, DType dtype)
    : cfg_(c), be_(be), dtype_(dtype), params_(c), prefill_graphs_(prefill_graphs_default()) {
  validate(c);
  HM_CHECK(be.supports(dtype), "model: the ", be.name(), " backend does not compute in ",
           compute_dtype_name(dtype));
}

Tensor HybridModel::weight(const float* host, int rows, int cols) const {
  HM_ASSERT(host != nullptr);
  const int64_t off = host - params_.data();
  HM_ASSERT(off >= 0 && off + int64_t(rows) * cols <= params_.numel());
  if (dev_weights_.data() == nullptr) return {const_cast<float*>(host), dtype_, rows, cols};
  return {static_cast<char*>(dev_weights_.data()) + off * int64_t(dtype_size(dtype_)), dtype_, rows, cols};
}

HybridModel::~HybridModel() {
  for (const auto& [p, n] : released_) mprotect(p, n, PROT_READ | PROT_WRITE);
}

void HybridModel::check_floats_kept() const {
  HM_CHECK(released_.empty(), "model: the float32 copies of its ", compute_dtype_name(wfmt_), " weights were "
           "released after loading (inference keeps only the packed ones); training, another weight format "
           "or a float32 copy of this model needs it loaded again (e.g. --weights f32)");
}

std::vector<HybridModel::LinearRef> HybridModel::linear_weights() const {
  // The calls of linear_weight in prepare(), in its order (prepare checks the two agree).
  const int D = cfg_.d_model, E = cfg_.d_inner(), N = cfg_.d_state;
  const int R = cfg_.resolved_dt_rank(), F = cfg_.d_ff, V = cfg_.vocab_size;
  std::vector<LinearRef> v = {{params_.lm_head(), V, D}};
  for (int i = 0; i < cfg_.n_layers; ++i) {
    const LayerWeights& w = params_.layer(i);
    if (cfg_.is_mamba2(i)) {
      v.push_back({w.in_proj, cfg_.mamba2_in_proj_rows(), D});
      v.push_back({w.out_proj, D, E});
    } else if (cfg_.has_mamba_path(i)) {
      v.insert(v.end(), {{w.in_proj, 2 * E, D}, {w.x_proj, R + 2 * N, E}, {w.dt_w, E, R}, {w.out_proj, D, E}});
    }
    if (cfg_.has_attention_path(i)) {
      const int hd = cfg_.head_dim(), QW = cfg_.n_heads * hd, KW = cfg_.n_kv_heads * hd;
      v.insert(v.end(), {{w.wq, QW, D}, {w.wk, KW, D}, {w.wv, KW, D}, {w.wo, D, QW}});
    }
    if (cfg_.has_ffn(i) && !cfg_.is_moe(i)) {
      if (w.w_gate != nullptr) v.push_back({w.w_gate, F, D});
      v.insert(v.end(), {{w.w_up, F, D}, {w.w_down, D, F}});
    }
    if (cfg_.has_bridge(i)) v.push_back({w.bridge_proj, D, cfg_.inner_dim(i - 1)});
  }
  return v;
}

void HybridModel::stage_packed(const float* host, std::vector<unsigned char> bytes) {
  staged_[host] = std::move(bytes);
}

void HybridModel::release_float_weights() {
  HM_CHECK(!lw_.empty(), "release_float_weights: model not prepared");
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  for (const PackedWeight& w : packed_) {
    if (w.host == params_.embeddings()) continue;  // the lookup table, also a tied head's source
    // Whole pages inside the weight's rows only: the pages at its ends hold other tensors too.
    const auto a = reinterpret_cast<uintptr_t>(w.host);
    const uintptr_t b = a + size_t(w.t.rows) * size_t(w.t.cols) * sizeof(float);
    const uintptr_t p0 = (a + page - 1) / page * page, p1 = b / page * page;
    if (p1 <= p0) continue;
    char* p = reinterpret_cast<char*>(p0);
    HM_CHECK(madvise(p, p1 - p0, MADV_DONTNEED) == 0 && mprotect(p, p1 - p0, PROT_NONE) == 0,
             "release_float_weights: madvise/mprotect failed: ", std::strerror(errno));
    released_.emplace_back(p, p1 - p0);
  }
}

void HybridModel::set_weight_format(DType f) {
  check_floats_kept();
  HM_CHECK(f == DType::F32 || be_.supports_weight_format(f), "model: the ", be_.name(), " backend has no ",
           compute_dtype_name(f), " weights (bf16, f16, q8_0 and q4_0 weights run on the cpu; --weights f32 loads "
           "a packed checkpoint unpacked)");
  HM_CHECK(f == DType::F32 || dtype_ == DType::F32, "model: ", compute_dtype_name(f),
           " weights need float32 activations, this model computes in ", compute_dtype_name(dtype_));
  wfmt_ = f;
}

Tensor HybridModel::linear_weight(const float* host, int rows, int cols) {
  if (!packs(cols)) return weight(host, rows, cols);
  const WeightType t = weight_type_of(wfmt_);
  const size_t bytes = row_bytes(t, cols) * size_t(rows);
  std::vector<unsigned char> staged;
  if (auto it = staged_.find(host); it != staged_.end()) {
    HM_ASSERT(it->second.size() == bytes);
    staged = std::move(it->second);
    staged_.erase(it);
  } else {
    // A streamed load fills only the rows of weights it does not stage (and the embedding).
    HM_ASSERT(!streaming_ || host == params_.embeddings());
    staged.resize(bytes);
    cpu::quantize(t, staged.data(), host, rows, cols);
  }
  Buffer& b = packed_bufs_.emplace_back(be_, bytes);
  be_.to_device(b.data(), staged.data(), bytes);
  const Tensor w(b.data(), wfmt_, rows, cols);
  packed_.push_back({host, w});
  // A tied head's copy is extra: the embedding keeps the arena's floats.
  const bool tied_head = host == params_.embeddings();
  packed_delta_ += int64_t(bytes) - (tied_head ? 0 : int64_t(rows) * cols * int64_t(dtype_size(dtype_)));
  return w;
}

void HybridModel::prepare() {
  check_floats_kept();
  const int D = cfg_.d_model, E = cfg_.d_inner(), N = cfg_.d_state, K = cfg_.d_conv;
  const int R = cfg_.resolved_dt_rank(), F = cfg_.d_ff, V = cfg_.vocab_size;
  // A host backend computing in float32 reads the arena itself; anything else gets one copy.
  if (be_.device() == Device::CPU && dtype_ == DType::F32) {
    dev_weights_ = Buffer();
  } else {
    const size_t n = size_t(params_.numel());
    if (dev_weights_.bytes() != n * dtype_size(dtype_)) dev_weights_ = Buffer(be_, n * dtype_size(dtype_));
    std::vector<char> staged(n * dtype_size(dtype_));
    convert_from_f32(staged.data(), dtype_, params_.data(), n);
    for (int i = 0; i < cfg_.n_layers; ++i) {
      if (!folds_norm(i)) continue;
      // in_proj diag(norm): rmsnorm(h) * g . W^T = (h . (W diag(g))^T) / rms(h). Rounded once.
      const LayerWeights& w = params_.layer(i);
      std::vector<float> f(size_t(2) * E * D);
      for (size_t r = 0; r < size_t(2) * E; ++r)
        for (int j = 0; j < D; ++j) f[r * D + j] = float(double(w.in_proj[r * D + j]) * w.norm[j]);
      convert_from_f32(staged.data() + size_t(w.in_proj - params_.data()) * dtype_size(dtype_), dtype_, f.data(),
                       f.size());
    }
    be_.to_device(dev_weights_.data(), staged.data(), staged.size());
  }
  streaming_ = !staged_.empty();
  packed_.clear();
  packed_bufs_.clear();
  packed_delta_ = 0;
  embeddings_ = weight(params_.embeddings(), V, D);
  norm_f_ = weight(params_.norm_f(), 1, D);
  lm_head_ = linear_weight(params_.lm_head(), V, D);
  lw_.assign(size_t(cfg_.n_layers), {});
  // A unit weight for the weightless norms: Falcon-Mamba's dt/B/C norms (max(R, N) wide), the
  // per-group normalization of a norm-before-gate gated norm of several groups (a group wide).
  size_t n_ones = 0;
  if (cfg_.mamba_bcdt_norm && !cfg_.mamba_bcdt_norm_weight) n_ones = size_t(std::max(R, N));
  if (cfg_.mamba2_norm_before_gate && !cfg_.mamba2_layers.empty() && cfg_.mamba2_norm_group() < E)
    n_ones = std::max(n_ones, size_t(cfg_.mamba2_norm_group()));
  for (int i = 0; i < cfg_.n_layers; ++i)
    if (folds_norm(i)) n_ones = std::max(n_ones, size_t(D));  // the folded pre-norms' weight
  ones_ = Buffer();
  if (n_ones > 0) {
    const std::vector<float> one(n_ones, 1.0f);
    std::vector<char> staged(one.size() * dtype_size(dtype_));
    convert_from_f32(staged.data(), dtype_, one.data(), one.size());
    ones_ = Buffer(be_, staged.size());
    be_.to_device(ones_.data(), staged.data(), staged.size());
  }
  prepare_scales();
  graphs_.clear();  // recorded steps name the old weights
  warmed_.clear();
  A_.clear();
  A_.resize(size_t(cfg_.n_layers));
  router_.clear();
  router_.resize(size_t(cfg_.n_layers));
  for (int i = 0; i < cfg_.n_layers; ++i) {
    const LayerWeights& w = params_.layer(i);
    LayerTensors& t = lw_[size_t(i)];
    t.norm_folded = folds_norm(i);
    t.norm = t.norm_folded ? Tensor(ones_.data(), dtype_, 1, D) : weight(w.norm, 1, D);
    if (cfg_.is_mamba2(i)) {
      const int H2 = cfg_.mamba2_heads(), CD = cfg_.mamba2_conv_dim();
      t.in_proj = linear_weight(w.in_proj, cfg_.mamba2_in_proj_rows(), D);
      t.conv_w = weight(w.conv_w, CD, K);
      t.conv_b = weight(w.conv_b, 1, CD);
      t.dt_b = weight(w.dt_b, 1, H2);
      t.Dskip = weight(w.Dskip, 1, H2);
      if (cfg_.mamba2_gated_norm) t.ssm_norm = weight(w.ssm_norm, 1, E);
      t.out_proj = linear_weight(w.out_proj, D, E);
      std::vector<float> a(static_cast<size_t>(H2));
      for (size_t j = 0; j < a.size(); ++j) a[j] = -std::exp(w.A_log[j]);
      A_[size_t(i)] = Buffer(be_, sizeof(float) * a.size());
      be_.to_device(A_[size_t(i)].data(), a.data(), sizeof(float) * a.size());
    } else if (cfg_.has_mamba_path(i)) {
      t.in_proj = linear_weight(w.in_proj, 2 * E, D);
      t.conv_w = weight(w.conv_w, E, K);
      t.conv_b = weight(w.conv_b, 1, E);
      t.x_proj = linear_weight(w.x_proj, R + 2 * N, E);
      t.dt_w = linear_weight(w.dt_w, E, R);
      t.dt_b = weight(w.dt_b, 1, E);
      t.Dskip = weight(w.Dskip, 1, E);
      t.out_proj = linear_weight(w.out_proj, D, E);
      if (cfg_.mamba_proj_bias) {
        t.in_b = weight(w.in_proj_b, 1, 2 * E);
        t.out_b = weight(w.out_proj_b, 1, D);
      }
      if (cfg_.mamba_bcdt_norm_weight) {
        t.dt_norm = weight(w.dt_norm, 1, R);
        t.b_norm = weight(w.b_norm, 1, N);
        t.c_norm = weight(w.c_norm, 1, N);
      }
      std::vector<float> a(size_t(E) * N);
      for (size_t j = 0; j < a.size(); ++j) a[j] = -std::exp(w.A_log[j]);
      A_[size_t(i)] = Buffer(be_, sizeof(float) * a.size());
      be_.to_device(A_[size_t(i)].data(), a.data(), sizeof(float) * a.size());
    }
    if (cfg_.has_attention_path(i)) {
      const int hd = cfg_.head_dim(), QW = cfg_.n_heads * hd, KW = cfg_.n_kv_heads * hd;
      t.wq = linear_weight(w.wq, QW, D);
      t.wk = linear_weight(w.wk, KW, D);
      t.wv = linear_weight(w.wv, KW, D);
      t.wo = linear_weight(w.wo, D, QW);
      // The arena keeps q, k, v end to end unless a padding falls between them; packed weights
      // have a buffer each.
      const auto at = [&](const Tensor& a, int rows) { return static_cast<const char*>(a.data) +
                                                              size_t(rows) * size_t(D) * dtype_size(a.dtype); };
      if (!is_packed(t.wq.dtype) && t.wk.dtype == t.wq.dtype && t.wv.dtype == t.wq.dtype && t.wq.ld == D &&
          t.wk.ld == D && t.wv.ld == D && at(t.wq, QW) == t.wk.data && at(t.wk, KW) == t.wv.data)
        t.wqkv = Tensor(t.wq.data, t.wq.dtype, QW + 2 * KW, D);
    }
    if (cfg_.has_ffn(i) && cfg_.is_moe(i)) {
      // Experts stay float32 under packed weight formats (not implemented for them yet).
      t.mlp_norm = weight(w.mlp_norm, 1, D);
      t.moe_router = weight(w.moe_router, cfg_.moe_experts, D);
      const int Fe = cfg_.moe_width();
      for (int e = 0; e < cfg_.moe_experts; ++e) {
        const int64_t o = int64_t(e) * Fe * D;
        t.e_gate.push_back(w.e_gate != nullptr ? weight(w.e_gate + o, Fe, D) : Tensor());  // none with relu2
        t.e_up.push_back(weight(w.e_up + o, Fe, D));
        t.e_down.push_back(weight(w.e_down + o, D, Fe));
      }
      if (cfg_.moe_shared_ff > 0) {  // float32 as the experts
        const int S = cfg_.moe_shared_ff;
        if (w.s_gate != nullptr) t.s_gate = weight(w.s_gate, S, D);
        t.s_up = weight(w.s_up, S, D);
        t.s_down = weight(w.s_down, D, S);
      }
    } else if (cfg_.has_ffn(i)) {
      t.mlp_norm = weight(w.mlp_norm, 1, D);
      if (w.w_gate != nullptr) t.w_gate = linear_weight(w.w_gate, F, D);
      t.w_up = linear_weight(w.w_up, F, D);
      t.w_down = linear_weight(w.w_down, D, F);
    }
    if (cfg_.is_true(i)) {
      t.fuse_mamba = weight(w.fuse_mamba, 1, D);
      t.fuse_attn = weight(w.fuse_attn, 1, D);
      t.exchange = weight(w.exchange, 1, D);
      // The router computes in float32 at every dtype: the arena's own floats on a host
      // backend, else one float32 copy.
      const float* rw = w.router_w;
      const float* rf = w.router_feat;
      const float* rb = w.router_b;
      if (be_.device() != Device::CPU) {
        std::vector<float> all(rw, rw + D);
        all.insert(all.end(), rf, rf + kRouterFeatures);
        all.push_back(rb[0]);
        Buffer& buf = router_[size_t(i)] = Buffer(be_, sizeof(float) * all.size());
        be_.to_device(buf.data(), all.data(), sizeof(float) * all.size());
        rw = buf.f32();
        rf = rw + D;
        rb = rf + kRouterFeatures;
      }
      t.router_w = Tensor::vec(const_cast<float*>(rw), DType::F32, D);
      t.router_fw = Tensor::vec(const_cast<float*>(rf), DType::F32, kRouterFeatures);
      t.router_b = Tensor::vec(const_cast<float*>(rb), DType::F32, 1);
    }
    if (cfg_.has_bridge(i)) {
      const int S = cfg_.inner_dim(i - 1);
      t.bridge_norm = weight(w.bridge_norm, 1, S);
      t.bridge_proj = linear_weight(w.bridge_proj, D, S);
      t.bridge_gate = weight(w.bridge_gate, 1, D);
    }
  }
  HM_ASSERT(staged_.empty());  // linear_weights() named a W that prepare() did not pack
  streaming_ = false;
  // One projection for q | k | v (one GEMV with the norm in it at decode) where every attention
  // layer's weights allow it, q needs no scale and RoPE turns whole heads (rope_heads' copy of
  // a partial rotation wants q and k dense).
  fused_qkv_ = q_scale_.empty() && cfg_.resolved_rope_dim() == cfg_.head_dim();
  for (int i = 0; i < cfg_.n_layers; ++i)
    if (cfg_.has_attention_path(i)) fused_qkv_ = fused_qkv_ && !lw_[size_t(i)].wqkv.empty();
  prepare_folds();
}

// Off a host backend, each plain Mamba-1 layer (no projection biases, not a true-hybrid layer,
// whose both paths read the normed input) gets its pre-norm's weight folded into in_proj, so
// the CUDA decode step beyond the GEMV's rows needs no RMSNorm launch (Backend::mamba_in).
bool HybridModel::folds_norm(int layer) const {
  return be_.device() != Device::CPU && cfg_.has_mamba_path(layer) && !cfg_.is_true(layer) &&
         !cfg_.is_mamba2(layer) && !cfg_.mamba_proj_bias && !packs(cfg_.d_model);
}

// Off a host backend, each folded bridge gets [W_out ; diag(gate) . bridge_proj . diag(bridge_norm)]:
// rmsnorm(y) * g . bW^T = (y . (bW diag(g))^T) / rms(y), so a decode step's output projection and
// bridge are one GEMM (Backend::linear_bridge). Rounded once from the float32 arena.
void HybridModel::prepare_folds() {
  folds_.clear();
  folds_.resize(size_t(cfg_.n_layers));
  if (be_.device() == Device::CPU) return;
  const int D = cfg_.d_model;
  for (int i = 0; i + 1 < cfg_.n_layers; ++i) {
    const LayerTensors* b = folded_bridge(i);
    LayerTensors& t = lw_[size_t(i)];
    const bool attn = cfg_.is_attention(i);
    const Tensor& W = attn ? t.wo : t.out_proj;
    if (b == nullptr || W.dtype != dtype_ || b->bridge_proj.dtype != dtype_) continue;
    const LayerWeights& w = params_.layer(i), &nb = params_.layer(i + 1);
    const int S = cfg_.inner_dim(i);
    HM_ASSERT(W.rows == D && W.cols == S && b->bridge_proj.cols == S);
    std::vector<float> f(size_t(2) * D * S);
    const float* wo = attn ? w.wo : w.out_proj;
    std::copy_n(wo, size_t(D) * S, f.begin());
    for (int j = 0; j < D; ++j)
      for (int k = 0; k < S; ++k)
        f[(size_t(D) + j) * S + k] = float(double(nb.bridge_gate[j]) * nb.bridge_proj[size_t(j) * S + k] *
                                           nb.bridge_norm[k]);
    std::vector<char> staged(f.size() * dtype_size(dtype_));
    convert_from_f32(staged.data(), dtype_, f.data(), f.size());
    folds_[size_t(i)] = Buffer(be_, staged.size());
    be_.to_device(folds_[size_t(i)].data(), staged.data(), staged.size());
    t.out_bridge = Tensor(folds_[size_t(i)].data(), dtype_, 2 * D, S);
  }
}

// Granite's scalings as backend vectors (scales_), each segment 16-element aligned.
void HybridModel::prepare_scales() {
  const int D = cfg_.d_model;
  emb_scale_ = resid_scale_ = q_scale_ = Tensor();
  scales_ = Buffer();
  std::vector<float> v;
  const auto put = [&](int n, const std::function<float(int)>& value) {
    const size_t o = v.size();
    for (int j = 0; j < n; ++j) v.push_back(value(j));
    v.resize((v.size() + 15) / 16 * 16, 0.0f);
    return std::pair{o, n};
  };
  std::pair<size_t, int> norm{}, emb{}, res{}, q{};
  // logits / s = head(rmsnorm(h) * (norm_f / s)): folded into the final norm's weight.
  if (cfg_.logits_scaling != 1.0f)
    norm = put(D, [&](int j) { return float(double(params_.norm_f()[j]) / double(cfg_.logits_scaling)); });
  if (cfg_.embedding_multiplier != 1.0f) emb = put(D, [&](int) { return cfg_.embedding_multiplier; });
  if (cfg_.residual_multiplier != 1.0f) res = put(D, [&](int) { return cfg_.residual_multiplier; });
  if (cfg_.attention_scale != 0.0f && cfg_.any_attention()) {
    // The attention op divides by sqrt(head_dim): q times attention_scale * sqrt(head_dim) gives
    // scores q.k * attention_scale.
    const int hd = cfg_.head_dim();
    q = put(cfg_.n_heads * hd, [&](int) { return float(double(cfg_.attention_scale) * std::sqrt(double(hd))); });
  }
  if (v.empty()) return;
  std::vector<char> staged(v.size() * dtype_size(dtype_));
  convert_from_f32(staged.data(), dtype_, v.data(), v.size());
  scales_ = Buffer(be_, staged.size());
  be_.to_device(scales_.data(), staged.data(), staged.size());
  const auto at = [&](std::pair<size_t, int> seg) {
    return Tensor(static_cast<char*>(scales_.data()) + seg.first * dtype_size(dtype_), dtype_, 1, seg.second);
  };
  if (norm.second > 0) norm_f_ = at(norm);
  if (emb.second > 0) emb_scale_ = at(emb);
  if (res.second > 0) resid_scale_ = at(res);
  if (q.second > 0) q_scale_ = at(q);
}

Tensor HybridModel::residual_target(int T) {
  return resid_scale_.empty() ? ws_.h.tensor(dtype_, T, cfg_.d_model) : act(ws_.ym, T, cfg_.d_model);
}

void HybridModel::join_residual(Tensor out) {
  if (!resid_scale_.empty())
    be_.add_rows(ws_.h.tensor(dtype_, out.rows, out.cols), nullptr, out, nullptr, out.rows, nullptr, resid_scale_);
}

Tensor HybridModel::act(Buffer& b, int rows, int cols) {
  b.reserve(be_, size_t(rows) * size_t(cols) * dtype_size(dtype_));
  return b.tensor(dtype_, rows, cols);
}

const int32_t* HybridModel::upload_idx(const std::vector<int32_t>& v) {
  HM_ASSERT((idx_used_ + v.size()) * sizeof(int32_t) <= ws_.idx.bytes());
  int32_t* p = static_cast<int32_t*>(ws_.idx.data()) + idx_used_;
  if (!v.empty()) be_.to_device(p, v.data(), v.size() * sizeof(int32_t));
  idx_used_ += v.size();
  return p;
}

const float* HybridModel::upload_gates(const std::vector<float>& v) {
  HM_ASSERT((gates_used_ + v.size()) * sizeof(float) <= ws_.gates.bytes());
  float* p = ws_.gates.f32() + gates_used_;
  if (!v.empty()) be_.to_device(p, v.data(), v.size() * sizeof(float));
  gates_used_ += v.size();
  return p;
}

// h += gate * (rmsnorm(src) @ proj^T): the previous layer type's inner representation,
// injected into the residual stream in front of a layer of the other type (docs/STATE_BRIDGES.md).
void HybridModel::bridge(int layer, int T) {
  const LayerTensors& w = lw_[size_t(layer)];
  const int S = cfg_.inner_dim(layer - 1), D = cfg_.d_model;
  const Tensor u = act(ws_.u, T, S), rows = act(ws_.rows, T, D);
  be_.norm_linear(ws_.h.tensor(dtype_, T, D), ws_.inner[(layer + 1) % 2].tensor(dtype_, T, S), u, w.bridge_norm,
                  cfg_.norm_eps, w.bridge_proj, true, w.bridge_gate, rows);
}

const LayerTensors* HybridModel::folded_bridge(int layer) const {
  const int next = layer + 1;
  if (next >= cfg_.n_layers || !cfg_.has_bridge(next) || cfg_.has_ffn(layer) || cfg_.is_true(layer) ||
      cfg_.is_mamba2(layer) || !resid_scale_.empty() || (!cfg_.is_attention(layer) && cfg_.mamba_proj_bias))
    return nullptr;
  return &lw_[size_t(next)];
}

int HybridModel::folded_bridges() const {
  int n = 0;
  for (int i = 0; i + 1 < cfg_.n_layers && !lw_.empty(); ++i) n += folded_bridge(i) != nullptr;
  return n;
}

void HybridModel::project_out(int layer, Tensor out, Tensor y, Tensor W, bool accumulate) {
  const LayerTensors* b = folded_bridge(layer);
  if (b == nullptr) {
    be_.linear(out, y, W, accumulate);
    return;
  }
  // bridge(layer + 1)'s operands: h, and the inner buffer this layer wrote (y).
  const int n = y.rows, D = cfg_.d_model;
  HM_ASSERT(accumulate && out.data == ws_.h.data() && y.data == ws_.inner[layer % 2].data() &&
            y.cols == cfg_.inner_dim(layer));
  // The folded form at decode-sized batches only: its GEMM's output is twice the plain one's
  // scratch, which a long prefill would feel in its peak memory.
  const Tensor& fold = lw_[size_t(layer)].out_bridge;
  const bool folded = !fold.empty() && n <= kFoldRows;
  // next shares ws_.u with the bridge's norm scratch: an override writes next only on the
  // folded path, which leaves that scratch unwritten.
  next_normed_ = be_.linear_bridge(out, y, W, act(ws_.u, n, y.cols),
                                   b->bridge_norm, cfg_.norm_eps, b->bridge_proj, b->bridge_gate,
                                   act(ws_.rows, n, folded ? 2 * D : D), folded ? fold : Tensor(),
                                   folded ? lw_[size_t(layer + 1)].norm : Tensor(),
                                   folded ? ws_.u.tensor(dtype_, n, D) : Tensor());
}

void HybridModel::mamba_path(int layer, Tensor x, const Ragged& rg, Tensor out, bool accumulate,
                             HybridMemory& mem, Tensor norm_w) {
  const LayerTensors& w = lw_[size_t(layer)];
  const int n = x.rows, E = cfg_.d_inner(), N = cfg_.d_state;
  const int R = cfg_.resolved_dt_rank(), P = R + 2 * N;
  const Tensor xz = act(ws_.xz, n, 2 * E);    // x | z
  const Tensor xc = act(ws_.xc, n, E);        // silu(conv(x))
  const Tensor dbc = act(ws_.dbc, n, P);      // dt_r | B | C
  const Tensor dt = act(ws_.dt, n, E);        // dt_proj(dt_r); softplus is applied in the scan
  const Tensor y = act(ws_.inner[layer % 2], n, E);  // gated scan output
  if (!cfg_.mamba_proj_bias && !cfg_.mamba_bcdt_norm && folded_bridge(layer) == nullptr) {
    // The whole mixer as one composite (one kernel for a CUDA decode step).
    be_.mamba_mixer(out, accumulate, x, norm_w.data ? act(ws_.u, n, x.cols) : Tensor(), norm_w, cfg_.norm_eps,
                    w.norm_folded, {w.in_proj, w.conv_w, w.conv_b, w.x_proj, w.dt_w, w.dt_b, w.Dskip, w.out_proj,
                                    A_[size_t(layer)].f32()},
                    mem.recurrent().conv_pool(layer), mem.recurrent().ssm_pool(layer), xz, xc, dbc, dt, y, rg);
    return;
  }
  if (!cfg_.mamba_proj_bias) {
    // With norm_w, x is the residual stream and the layer's pre-norm runs inside mamba_in.
    be_.mamba_in(xz, xc, 0, mem.recurrent().conv_pool(layer), x, norm_w.data ? act(ws_.u, n, x.cols) : Tensor(),
                 norm_w, cfg_.norm_eps, w.in_proj, w.conv_w, w.conv_b, rg, w.norm_folded);
  } else {  // mamba_in's steps with in_proj's bias between the projection and the conv
    Tensor src = x;
    if (norm_w.data) {
      src = act(ws_.u, n, x.cols);
      be_.rmsnorm(src, x, norm_w, cfg_.norm_eps);
    }
    be_.linear(xz, src, w.in_proj, false);  // x | z = in_proj(u) + b
    add_bias(xz, w.in_b);
    be_.conv1d_silu(xc, mem.recurrent().conv_pool(layer), xz.cols_view(0, E), w.conv_w, w.conv_b, rg);
  }
  be_.linear(dbc, xc, w.x_proj, false);
  Tensor dtr = dbc.cols_view(0, R), B = dbc.cols_view(R, N), C = dbc.cols_view(R + N, N);
  if (cfg_.mamba_bcdt_norm) {  // each of dt_r, B, C RMS-normalized: no weight (Falcon-Mamba) or learned (Jamba)
    act(ws_.bcdt, n, P);
    char* base = static_cast<char*>(ws_.bcdt.data());
    const size_t es = dtype_size(dtype_);
    const Tensor nd(base, dtype_, n, R), nb(base + size_t(n) * R * es, dtype_, n, N),
        nc(base + size_t(n) * (R + N) * es, dtype_, n, N);
    const bool learned = cfg_.mamba_bcdt_norm_weight;
    const Tensor wd = learned ? w.dt_norm : Tensor(ones_.data(), dtype_, 1, R);
    const Tensor wb = learned ? w.b_norm : Tensor(ones_.data(), dtype_, 1, N);
    const Tensor wc = learned ? w.c_norm : Tensor(ones_.data(), dtype_, 1, N);
    for (auto [dst, src, nw] : {std::tuple{nd, dtr, wd}, std::tuple{nb, B, wb}, std::tuple{nc, C, wc}}) {
      be_.copy_rows(dst, nullptr, src, nullptr, n);
      be_.rmsnorm(dst, dst, nw, cfg_.mamba_bcdt_norm_eps);
    }
    dtr = nd;
    B = nb;
    C = nc;
  }
  be_.dt_scan(y, mem.recurrent().ssm_pool(layer), xc, dtr, w.dt_w, dt, w.dt_b, A_[size_t(layer)].f32(), B, C,
              w.Dskip, xz.cols_view(E, E), rg);
  project_out(layer, out, y, w.out_proj, accumulate);
  if (cfg_.mamba_proj_bias) add_bias(out, w.out_b);  // out (+)= out_proj(y) + b
}

void HybridModel::add_bias(Tensor dst, Tensor b) {
  HM_ASSERT(size_t(dst.rows) * sizeof(int32_t) <= ws_.zeros.bytes() && b.rows == 1 && b.cols == dst.cols);
  be_.add_rows(dst, nullptr, b, static_cast<const int32_t*>(ws_.zeros.data()), dst.rows, nullptr, Tensor());
}

// transformers' Mamba2Mixer (torch_forward): in_proj -> z | xBC | dt; causal conv + SiLU over
// xBC; the SSD scan per head (dt_bias, softplus, time_step_limit clamp, D skip); the gated
// RMSNorm norm(y * silu(z)); out_proj.
void HybridModel::mamba2_path(int layer, Tensor x, const Ragged& rg, Tensor out, bool accumulate,
                              HybridMemory& mem, Tensor norm_w) {
  const LayerTensors& w = lw_[size_t(layer)];
  const int n = x.rows, E = cfg_.d_inner(), N = cfg_.d_state, G = cfg_.mamba2_groups;
  const int H = cfg_.mamba2_heads(), CD = cfg_.mamba2_conv_dim();
  const Tensor zxd = act(ws_.xz, n, cfg_.mamba2_in_proj_rows());  // z | xBC | dt
  const Tensor xbc = act(ws_.xc, n, CD);                          // silu(conv(xBC)): x | B | C
  const Tensor y = act(ws_.ssd, n, E);                            // scan output
  const Tensor yn = act(ws_.inner[layer % 2], n, E);              // gated norm output
  // With norm_w, x is the residual stream and the layer's pre-norm runs inside mamba_in.
  be_.mamba_in(zxd, xbc, E, mem.recurrent().conv_pool(layer), x, norm_w.data ? act(ws_.u, n, x.cols) : Tensor(),
               norm_w, cfg_.norm_eps, w.in_proj, w.conv_w, w.conv_b, rg, false);
  be_.ssd_scan(y, mem.recurrent().ssm_pool(layer), xbc.cols_view(0, E), zxd.cols_view(E + CD, H), w.dt_b,
               A_[size_t(layer)].f32(), xbc.cols_view(E, G * N), xbc.cols_view(E + G * N, G * N), w.Dskip, H, G,
               cfg_.mamba2_dt_min, cfg_.mamba2_dt_max, rg);
  if (cfg_.mamba2_gated_norm && cfg_.mamba2_norm_before_gate) {
    // rmsnorm(y) * w * silu(z) per group of gw columns (FalconH1RMSNormGated, norm_before_gate):
    // y normalized in place, one row per (token, group), with w itself when one group spans the
    // row, else with a unit weight and w applied per column after; then gated by silu(z).
    const int gw = cfg_.mamba2_norm_group(), groups = E / gw;
    const Tensor z = act(ws_.dt, n, E);
    be_.copy_rows(z, nullptr, zxd.cols_view(0, E), nullptr, n);
    const Tensor yg(y.data, y.dtype, n * groups, gw);
    Tensor normed = y;
    if (groups == 1) {
      be_.rmsnorm(yg, yg, w.ssm_norm, cfg_.norm_eps);
    } else {
      be_.rmsnorm(yg, yg, Tensor(ones_.data(), dtype_, 1, gw), cfg_.norm_eps);
      normed = act(ws_.xc, n, E);  // x | B | C is read: free scratch
      be_.memzero(normed.data, size_t(n) * E * dtype_size(dtype_));
      be_.add_rows(normed, nullptr, y, nullptr, n, nullptr, w.ssm_norm);  // = w * rmsnorm(y)
    }
    be_.swiglu(yn, z, normed);
  } else if (cfg_.mamba2_gated_norm) {
    be_.gated_norm_linear(out, y, zxd.cols_view(0, E), w.ssm_norm, cfg_.mamba2_norm_group(), cfg_.norm_eps,
                          w.out_proj, accumulate, yn);
    return;
  } else {  // y * silu(z) (Falcon-H1 without mamba_rms_norm): z copied out of zxd to swiglu's layout
    const Tensor z = act(ws_.dt, n, E);
    be_.copy_rows(z, nullptr, zxd.cols_view(0, E), nullptr, n);
    be_.swiglu(yn, z, y);
  }
  be_.linear(out, yn, w.out_proj, accumulate);
}

namespace {

// RoPE on each of the `heads` heads of x [n, heads * head_dim] (contiguous): the whole head, or
// only its first rope_dim channels (Bamba's partial rotary), which are gathered into scratch
// (at least n * heads * rope_dim elements), rotated there and put back: plain backend ops only.
void rope_heads(Backend& be, const ModelConfig& c, Tensor x, int heads, Tensor scratch, const Ragged& rg) {
  const int hd = c.head_dim(), rd = c.resolved_rope_dim();
  if (rd == hd) {
    be.rope(x, heads, hd, c.rope_theta, rg);
    return;
  }
  HM_ASSERT(x.ld == int64_t(heads) * hd && scratch.rows * int64_t(scratch.ld) >= int64_t(x.rows) * heads * rd);
  const int rows = x.rows * heads;
  const Tensor per_head = Tensor(x.data, x.dtype, rows, hd).cols_view(0, rd);  // one row per (token, head)
  const Tensor part(scratch.data, x.dtype, rows, rd);                         // = [n, heads * rd]
  be.copy_rows(part, nullptr, per_head, nullptr, rows);
  be.rope(Tensor(scratch.data, x.dtype, x.rows, heads * rd), heads, rd, c.rope_theta, rg);
  be.copy_rows(per_head, nullptr, part, nullptr, rows);
}

}  // namespace

void HybridModel::attention_path(int layer, Tensor x, const Ragged& rg, Tensor out, bool accumulate,
                                 HybridMemory& mem, Tensor norm_w) {
  const LayerTensors& w = lw_[size_t(layer)];
  const int n = x.rows, H = cfg_.n_heads, G = cfg_.n_kv_heads, D = cfg_.d_model;
  const int hd = cfg_.head_dim(), QW = H * hd, KW = G * hd;
  const Tensor ctx = act(ws_.inner[layer % 2], n, QW);
  const Tensor u = norm_w.empty() ? Tensor() : act(ws_.u, n, D);
  Tensor q, k, v;
  if (fused_qkv_) {  // q | k | v side by side in one buffer
    const Tensor qkv = act(ws_.q, n, QW + 2 * KW);
    if (norm_w.empty())
      be_.linear(qkv, x, w.wqkv, false);
    else
      be_.norm_linear(qkv, x, u, norm_w, cfg_.norm_eps, w.wqkv, false, Tensor(), Tensor());
    q = qkv.cols_view(0, QW);
    k = qkv.cols_view(QW, KW);
    v = qkv.cols_view(QW + KW, KW);
  } else {
    if (!norm_w.empty()) {
      be_.rmsnorm(u, x, norm_w, cfg_.norm_eps);
      x = u;
    }
    q = act(ws_.q, n, QW);
    k = act(ws_.k, n, KW);
    v = act(ws_.v, n, KW);
    if (q_scale_.empty()) {
      be_.linear(q, x, w.wq, false);
    } else {  // q = attention_scale * sqrt(hd) * (x wq^T), through ctx (free until attention writes it)
      be_.linear(ctx, x, w.wq, false);
      be_.memzero(q.data, size_t(n) * QW * dtype_size(dtype_));
      be_.add_rows(q, nullptr, ctx, nullptr, n, nullptr, q_scale_);
    }
    be_.linear(k, x, w.wk, false);
    be_.linear(v, x, w.wv, false);
  }
  if (cfg_.rope) {  // ctx is free until attention writes it: the scratch of a partial rotation
    rope_heads(be_, cfg_, q, H, ctx, rg);
    rope_heads(be_, cfg_, k, G, ctx, rg);
  }
  // The new K/V rows join the cache first; attention then reads every position from it,
  // so prefill and decode see identical (possibly half-precision) keys and values.
  be_.kv_attention(ctx, q, k, v, mem.kv().pool(layer), H, G, hd, rg);
  project_out(layer, out, ctx, w.wo, accumulate);
}

void HybridModel::mamba_layer(int layer, HybridMemory& mem, bool normed) {
  const int T = rg_.n_tokens(), D = cfg_.d_model;
  const Tensor out = residual_target(T);
  const bool acc = resid_scale_.empty();
  // h += mixer(rmsnorm(h)), or mixer(u) where the bridge before wrote the normed input.
  const Tensor x = (normed ? ws_.u : ws_.h).tensor(dtype_, T, D);
  const Tensor norm_w = normed ? Tensor() : lw_[size_t(layer)].norm;
  if (cfg_.is_mamba2(layer))
    mamba2_path(layer, x, rg_, out, acc, mem, norm_w);
  else
    mamba_path(layer, x, rg_, out, acc, mem, norm_w);
  join_residual(out);
}

void HybridModel::attention_layer(int layer, HybridMemory& mem, bool normed) {
  const int T = rg_.n_tokens(), D = cfg_.d_model;
  const Tensor out = residual_target(T);
  if (normed)
    attention_path(layer, ws_.u.tensor(dtype_, T, D), rg_, out, resid_scale_.empty(), mem);
  else
    attention_path(layer, ws_.h.tensor(dtype_, T, D), rg_, out, resid_scale_.empty(), mem,
                   lw_[size_t(layer)].norm);  // h += attention(rmsnorm(h))
  join_residual(out);
}

// A true-hybrid layer (docs/TRUE_HYBRID.md, "Forward"). Each path runs once over the rows of
// the whole batch routed to it, gathered into a compact buffer: one GEMM per projection for
// all sequences, and a path no token chose does no work at all. The conv and scan (Mamba) and
// RoPE + attention run per sequence on its compacted subsequence (a ragged batch of its own),
// continuing that sequence's own state, so tokens a path skips leave its state untouched.
// The router runs on the backend, continuing each sequence's analyzer state, and only its
// logits (a float a token) come to the host for the route decisions; gathers, the exchange,
// the fusion and the carried state stay in the backend's memory.
void HybridModel::true_layer(int layer, HybridMemory& mem) {
  const LayerTensors& w = lw_[size_t(layer)];
  const int T = rg_.n_tokens(), D = cfg_.d_model, nseq = rg_.nseq();
  const th::Mode mode = th::mode_from_config(cfg_);
  const bool chunked = cfg_.routing_granularity == "chunk";
  const Tensor u = ws_.u.tensor(dtype_, T, D);
  RouteState& rs = mem.route();

  const Tensor r = ws_.route_logits.tensor(DType::F32, 1, T);
  const StatePool analyzer = rs.analyzer(layer);
  be_.router(r, Tensor(), u, w.router_w, w.router_fw, w.router_b, rg_, chunked ? cfg_.routing_chunk : 0, &analyzer);
  logit_.resize(size_t(T));
  be_.to_host(logit_.data(), r.data, sizeof(float) * logit_.size());

  // Routes, chunk by chunk (rg_.pos0 is the sequence's position).
  routing_.resize(size_t(nseq));
  std::vector<int> moff(size_t(nseq) + 1, 0), aoff(size_t(nseq) + 1, 0);  // chunk -> first compact row
  for (int s = 0; s < nseq; ++s) {
    const int t0 = rg_.start(s), L = rg_.len(s);
    th::Routing<float>& rt = routing_[size_t(s)];
    th::decide_routes(rt, logit_.data() + t0, L, int64_t(rg_.pos0(s)), mode, force_f_);
    moff[size_t(s) + 1] = moff[size_t(s)] + int(rt.mamba_idx.size());
    aoff[size_t(s) + 1] = aoff[size_t(s)] + int(rt.attn_idx.size());
    // The K/V row count after each position (the prefix cache cuts chunks into blocks by it).
    int rows = mem.kv().len(layer, rg_.slot(s));
    size_t k = 0;
    for (int t = 0; t < L; ++t) {
      if (k < rt.attn_idx.size() && rt.attn_idx[k] == t) {
        ++rows;
        ++k;
      }
      mem.kv().push_rows(layer, rg_.slot(s), rows);
    }
  }
  const int nm = moff[size_t(nseq)], na = aoff[size_t(nseq)];
  if (trace_) {
    const size_t li = size_t(std::find(trace_->layers.begin(), trace_->layers.end(), layer) - trace_->layers.begin());
    HM_ASSERT(li < trace_->layers.size());
    for (int s = 0; s < nseq; ++s) {
      const th::Routing<float>& rt = routing_[size_t(s)];
      for (int t = 0; t < rg_.len(s); ++t) {
        trace_->p[li].push_back(rt.p[size_t(t)]);
        trace_->route[li].push_back(rt.route[size_t(t)]);
        trace_->attention_share[li].push_back(th::attention_share(rt, t, mode));
      }
    }
  }
  // Compact row -> token of the batch, and each compact row's gate, per path.
  std::vector<int32_t> mtok, atok, ex_dst, ex_src, car_dst, car_slot, last_row, last_slot;
  std::vector<float> gm, ga;
  for (int s = 0; s < nseq; ++s) {
    const th::Routing<float>& rt = routing_[size_t(s)];
    const int t0 = rg_.start(s), slot = rg_.slot(s);
    for (int i : rt.mamba_idx) {
      mtok.push_back(t0 + i);
      gm.push_back(rt.gm[size_t(i)]);
    }
    for (size_t k = 0; k < rt.attn_idx.size(); ++k) {
      const int i = rt.attn_idx[k], a = aoff[size_t(s)] + int(k);
      atok.push_back(t0 + i);
      ga.push_back(rt.ga[size_t(i)]);
      // x_t of the exchange: the latest Mamba output at or before t, this call's or carried.
      if (rt.carry[k] >= 0) {
        ex_dst.push_back(a);
        ex_src.push_back(moff[size_t(s)] + rt.carry[k]);
      } else {
        car_dst.push_back(a);
        car_slot.push_back(slot);
      }
    }
    if (moff[size_t(s) + 1] > moff[size_t(s)]) {
      last_row.push_back(moff[size_t(s) + 1] - 1);
      last_slot.push_back(slot);
    }
  }

  const Tensor hT = ws_.h.tensor(dtype_, T, D);
  const Tensor carried = rs.last_mamba(layer, dtype_);
  Tensor ym, ya;
  if (nm > 0) {
    ym = act(ws_.ym, nm, D);
    rgm_.clear();
    for (int s = 0; s < nseq; ++s) rgm_.add(rg_.slot(s), moff[size_t(s) + 1] - moff[size_t(s)], 0);
    rgm_.upload(be_);
    // Every token runs Mamba (both, soft, or a hard batch that chose it throughout): u as is.
    Tensor um = u;
    if (nm < T) {
      um = act(ws_.gath, nm, D);
      be_.copy_rows(um, nullptr, u, upload_idx(mtok), nm);
    }
    if (cfg_.is_mamba2(layer))
      mamba2_path(layer, um, rgm_, ym, false, mem);
    else
      mamba_path(layer, um, rgm_, ym, false, mem);
  }
  if (na > 0) {
    // v_t = u_t + exchange * x_t.
    const Tensor va = act(ws_.gath, na, D);
    be_.copy_rows(va, nullptr, u, upload_idx(atok), na);
    if (!ex_dst.empty())
      be_.add_rows(va, upload_idx(ex_dst), ym, upload_idx(ex_src), int(ex_dst.size()), nullptr, w.exchange);
    if (!car_dst.empty())
      be_.add_rows(va, upload_idx(car_dst), carried, upload_idx(car_slot), int(car_dst.size()), nullptr, w.exchange);
    ya = act(ws_.ya, na, D);
    rga_.clear();
    for (int s = 0; s < nseq; ++s) {
      const int slot = rg_.slot(s);
      rga_.add(slot, aoff[size_t(s) + 1] - aoff[size_t(s)], mem.kv().len(layer, slot));
    }
    rga_.upload(be_);
    attention_path(layer, va, rga_, ya, false, mem);
    for (int s = 0; s < nseq; ++s) mem.kv().set_len(layer, rga_.slot(s), rga_.pos0(s) + rga_.len(s));
  }
  // The exchange state carries the sequence's last Mamba output into its next call.
  if (!last_row.empty())
    be_.copy_rows(carried, upload_idx(last_slot), ym, upload_idx(last_row), int(last_row.size()));
  // h_t += gm_t fuse_mamba ym_t + ga_t fuse_attn ya_t, each term only where its path ran.
  if (nm > 0) be_.add_rows(hT, upload_idx(mtok), ym, nullptr, nm, upload_gates(gm), w.fuse_mamba);
  if (na > 0) be_.add_rows(hT, upload_idx(atok), ya, nullptr, na, upload_gates(ga), w.fuse_attn);
}

void HybridModel::set_forced_attention_fraction(double f) {
  if (f < 0) {
    force_f_ = -1.0;
    return;
  }
  HM_CHECK(f <= 1.0, "forced attention fraction must be in [0, 1] (or < 0 to let the router decide), got ", f);
  HM_CHECK(!cfg_.true_layers.empty(), "forced attention fraction: the model has no true-hybrid layers");
  HM_CHECK(th::mode_from_config(cfg_) == th::Mode::Hard,
           "forced attention fraction: routes can only be forced with routing_mode \"hard\" (this "
           "model's is \"", cfg_.routing_mode, "\": every token runs both paths)");
  force_f_ = f;
}

void HybridModel::mlp(int layer, int T) {
  const LayerTensors& w = lw_[size_t(layer)];
  const int D = cfg_.d_model, F = cfg_.d_ff;
  const Tensor u = act(ws_.u, T, D), g = act(ws_.g, T, F), up = act(ws_.up, T, F), a = act(ws_.act, T, F);
  be_.rmsnorm(u, ws_.h.tensor(dtype_, T, D), w.mlp_norm, cfg_.norm_eps);
  be_.linear(up, u, w.w_up, false);
  if (cfg_.mlp_act == "relu2") {
    be_.relu2(a, up);
  } else {
    be_.linear(g, u, w.w_gate, false);
    be_.swiglu(a, g, up);
  }
  const Tensor out = residual_target(T);
  be_.linear(out, a, w.w_down, resid_scale_.empty());
  join_residual(out);
}

void HybridModel::ffn(Tensor y, Tensor x, Tensor gate, Tensor up, Tensor down, bool accumulate) {
  const int n = x.rows, F = up.rows;
  const Tensor u = act(ws_.up, n, F), a = act(ws_.act, n, F);
  be_.linear(u, x, up, false);
  if (cfg_.mlp_act == "relu2") {
    be_.relu2(a, u);
  } else {
    const Tensor g = act(ws_.g, n, F);
    be_.linear(g, x, gate, false);
    be_.swiglu(a, g, u);
  }
  be_.linear(y, a, down, accumulate);
}

// h += sum over the token's top-k experts e of g_e * expert_e(u), u = rmsnorm(h), plus the shared
// expert's output; the routing (model/moe.h) is decided on the host from the router's logits,
// read back. Each expert runs once on the rows routed to it, gathered, and adds its output back
// scaled by the rows' g_e, so an expert no token chose is not computed.
void HybridModel::moe(int layer, int T) {
  const LayerTensors& w = lw_[size_t(layer)];
  const float* corr = params_.layer(layer).moe_bias;  // host float32 (never packed); sigmoid only
  const int D = cfg_.d_model, X = cfg_.moe_experts;
  const Tensor u = act(ws_.u, T, D), h = ws_.h.tensor(dtype_, T, D);
  be_.rmsnorm(u, h, w.mlp_norm, cfg_.norm_eps);
  const Tensor lg = ws_.moe_logits.tensor(DType::F32, T, X);
  be_.linear(lg, u, w.moe_router, false);
  moe_p_.resize(size_t(T) * X);
  be_.to_host(moe_p_.data(), lg.data, moe_p_.size() * sizeof(float));
  moe_route(cfg_, moe_p_.data(), corr, T, moe_rt_);
  const auto& rows = moe_rt_.rows;
  const auto& gates = moe_rt_.gates;
  for (int e = 0; e < X; ++e) {
    const int n = int(rows[size_t(e)].size());
    if (n == 0) continue;
    const int32_t* idx = upload_idx(rows[size_t(e)]);
    const Tensor x = act(ws_.gath, n, D), y = act(ws_.ym, n, D);
    be_.copy_rows(x, nullptr, u, idx, n);
    ffn(y, x, w.e_gate[size_t(e)], w.e_up[size_t(e)], w.e_down[size_t(e)], false);
    be_.add_rows(h, idx, y, nullptr, n, upload_gates(gates[size_t(e)]), resid_scale_);  // g_e (x residual_multiplier)
  }
  if (cfg_.moe_shared_ff > 0) {  // the shared expert, on every row
    const Tensor out = residual_target(T);
    ffn(out, u, w.s_gate, w.s_up, w.s_down, resid_scale_.empty());
    join_residual(out);
  }
}

void HybridModel::forward(const Batch& b, HybridMemory& mem, std::vector<float>& logits) {
  const Tensor out = forward_device(b, mem);
  logits.resize(size_t(out.rows) * out.cols);
  be_.to_host(logits.data(), out.data, logits.size() * sizeof(float));
}

Tensor HybridModel::forward_device(const Batch& b, HybridMemory& mem) {
  const int T = int(b.tokens.size()), D = cfg_.d_model, V = cfg_.vocab_size;
  HM_CHECK(!b.seqs.empty() && T > 0, "forward: empty batch");
  HM_CHECK(!lw_.empty(), "forward: model not prepared (call prepare() after init or load)");
  HM_CHECK(&mem.backend() == &be_, "forward: the memory lives on the ", mem.backend().name(),
           " backend, the model on ", be_.name());
  // Validate the whole batch before touching any state.
  std::set<int> slots;
  rg_.clear();
  for (const SeqChunk& s : b.seqs) {
    HM_CHECK(s.slot >= 0 && s.slot < mem.n_slots(), "forward: sequence slot ", s.slot,
             " out of range [0, ", mem.n_slots(), ")");
    HM_CHECK(slots.insert(s.slot).second, "forward: slot ", s.slot, " appears twice in one batch");
    HM_CHECK(s.n_tokens > 0, "forward: a chunk for slot ", s.slot, " has no tokens");
    HM_CHECK(mem.pos(s.slot) + s.n_tokens <= mem.max_ctx(), "forward: sequence in slot ", s.slot,
             " would reach ", mem.pos(s.slot) + s.n_tokens, " tokens, over the context size ",
             mem.max_ctx());
    rg_.add(s.slot, s.n_tokens, mem.pos(s.slot));
  }
  HM_CHECK(rg_.n_tokens() == T, "forward: chunks cover ", rg_.n_tokens(), " tokens but the batch holds ", T);
  for (int i = 0; i < T; ++i)
    HM_CHECK(b.tokens[size_t(i)] >= 0 && b.tokens[size_t(i)] < V, "forward: token id ",
             b.tokens[size_t(i)], " at position ", i, " is outside the vocabulary [0, ", V, ")");
  const int nseq = rg_.nseq();
  rg_.upload(be_);

  // Index and gate arrays of the whole forward, sized up front so their addresses stay put.
  // An MoE layer uploads top_k row indices and gates per token.
  const size_t n_true = cfg_.true_layers.size(), n_moe = cfg_.moe_layers.size(), top_k = size_t(cfg_.moe_top_k);
  idx_used_ = gates_used_ = 0;
  ws_.idx.reserve(be_, sizeof(int32_t) * (size_t(T) + size_t(nseq) + n_true * (6 * size_t(T) + 2 * size_t(nseq)) +
                                          n_moe * top_k * size_t(T)));
  ws_.gates.reserve(be_, sizeof(float) * (n_true * 2 * size_t(T) + n_moe * top_k * size_t(T) + 1));
  upload_idx(b.tokens);  // first in ws_.idx: the embedding reads them there
  if (cfg_.mamba_proj_bias) {  // add_bias's source row index, 0 for every row
    ws_.zeros.reserve(be_, sizeof(int32_t) * size_t(T));
    be_.memzero(ws_.zeros.data(), sizeof(int32_t) * size_t(T));
  }

  if (trace_) {
    *trace_ = RouteTrace{};
    trace_->layers = cfg_.true_layers;
    std::sort(trace_->layers.begin(), trace_->layers.end());
    const size_t n = trace_->layers.size();
    trace_->p.resize(n);
    trace_->route.resize(n);
    trace_->attention_share.resize(n);
  }
  // Every buffer is sized for the whole batch now, so none is reallocated while the backend may
  // still be running ops that read it. Each inner buffer holds the widest inner output, so
  // bridges can read the previous layer's.
  const int E = cfg_.d_inner(), S = std::max(E, cfg_.n_heads * cfg_.head_dim());
  const int P = cfg_.resolved_dt_rank() + 2 * cfg_.d_state, KW = cfg_.n_kv_heads * cfg_.head_dim();
  act(ws_.inner[0], T, S);
  act(ws_.inner[1], T, S);
  const Tensor h = act(ws_.h, T, D);
  act(ws_.u, T, std::max(D, S));
  act(ws_.rows, T, T <= kFoldRows && std::any_of(lw_.begin(), lw_.end(), [](const LayerTensors& t) {
        return !t.out_bridge.empty();
      }) ? 2 * D : D);  // project_out's folded bridge
  // Mamba-2 layers use xz for in_proj's z | xBC | dt, xc for the conv's x | B | C, ssd for the scan.
  const bool m2 = !cfg_.mamba2_layers.empty();
  act(ws_.xz, T, m2 ? std::max(2 * E, cfg_.mamba2_in_proj_rows()) : 2 * E);
  act(ws_.xc, T, m2 ? std::max(E, cfg_.mamba2_conv_dim()) : E);
  if (m2) act(ws_.ssd, T, E);
  act(ws_.dbc, T, P);
  if (cfg_.mamba_bcdt_norm) act(ws_.bcdt, T, P);
  act(ws_.dt, T, E);
  if (fused_qkv_) {
    act(ws_.q, T, cfg_.n_heads * cfg_.head_dim() + 2 * KW);  // q | k | v
  } else {
    act(ws_.q, T, cfg_.n_heads * cfg_.head_dim());
    act(ws_.k, T, KW);
    act(ws_.v, T, KW);
  }
  if (!cfg_.true_layers.empty() || !cfg_.moe_layers.empty()) {
    act(ws_.gath, T, D);
    act(ws_.ya, T, D);
  }
  if (!cfg_.true_layers.empty() || !cfg_.moe_layers.empty() || cfg_.residual_multiplier != 1.0f ||
      cfg_.embedding_multiplier != 1.0f)
    act(ws_.ym, T, D);  // also the scratch of the scaled residual and embeddings
  if (!cfg_.moe_layers.empty()) ws_.moe_logits.reserve(be_, sizeof(float) * size_t(T) * cfg_.moe_experts);
  if (!cfg_.true_layers.empty()) ws_.route_logits.reserve(be_, sizeof(float) * size_t(T));
  if (cfg_.d_ff > 0) {
    const int F = std::max({cfg_.d_ff, cfg_.moe_shared_ff, cfg_.moe_layers.empty() ? 0 : cfg_.moe_width()});
    act(ws_.g, T, F);
    act(ws_.up, T, F);
    act(ws_.act, T, F);
  }
  // The final norm and LM head run only on the rows whose logits are wanted, and the logits
  // buffer holds only those: T x V floats for a 16 x 2048-token prefill chunk would be 6.6 GB
  // at a 50k vocabulary.
  const bool one_token_each = rg_.max_len() == 1;
  int n_rows = T;
  Tensor hrows = h;
  if (!b.logits_all && !one_token_each) {
    n_rows = nseq;
    std::vector<int32_t> last(static_cast<size_t>(nseq));
    for (int s = 0; s < nseq; ++s) last[size_t(s)] = rg_.start(s) + rg_.len(s) - 1;
    hrows = act(ws_.rows, n_rows, D);
    last_idx_ = upload_idx(last);  // run_layers gathers those rows after the last layer
  }
  ws_.logits.reserve(be_, sizeof(float) * size_t(n_rows) * V);

  const bool decode_shape = one_token_each && !b.logits_all;
  const bool graph = use_graphs_ && be_.supports_graphs() && (decode_shape || prefill_graphs_) &&
                     cfg_.true_layers.empty() && cfg_.moe_layers.empty() && trace_ == nullptr;
  if (!graph) {
    run_layers(T, n_rows, hrows, mem);
  } else {
    // First step of a shape on these addresses: eagerly (it also grows the backend's own
    // workspaces); the second is recorded; later ones replay the recording. A prefill's kernels
    // take their launch shapes from the chunks' lengths (grids, chunking, GEMM plans) and read
    // positions and slots from the uploaded batch, so its key is the lengths.
    std::vector<int> key = {T};
    if (!decode_shape) {
      key.push_back(b.logits_all ? 1 : 0);
      for (int s = 0; s < nseq; ++s) key.push_back(rg_.len(s));
    }
    if (!decode_shape && !graphs_.count(key) && !warmed_.count(key)) {  // prefill shapes are many: a bound
      const auto prefill = [](const auto& kv) { return kv.first.size() > 1; };
      if (size_t(std::count_if(graphs_.begin(), graphs_.end(), prefill) +
                 std::count_if(warmed_.begin(), warmed_.end(), prefill)) >= kMaxPrefillGraphs) {
        std::erase_if(graphs_, prefill);
        std::erase_if(warmed_, prefill);
      }
    }
    std::vector<const void*> sig = graph_signature(mem);
    auto it = graphs_.find(key);
    if (it != graphs_.end() && it->second.sig == sig) {
      be_.replay(it->second.exec);
    } else if (auto w = warmed_.find(key); w != warmed_.end() && w->second == sig) {
      be_.begin_capture();
      try {
        run_layers(T, n_rows, hrows, mem);
      } catch (...) {
        try { be_.end_capture(); } catch (...) {}
        throw;
      }
      Graph& g = graphs_[key];
      g = Graph{sig, be_.end_capture()};
      ++graphs_captured_;
      be_.replay(g.exec);
    } else {
      run_layers(T, n_rows, hrows, mem);
      warmed_[key] = std::move(sig);
    }
  }
  // Host bookkeeping, outside what a graph records.
  for (int i = 0; i < cfg_.n_layers; ++i)
    if (cfg_.is_attention(i) && !cfg_.is_true(i))
      for (int s = 0; s < nseq; ++s) mem.kv().set_len(i, rg_.slot(s), rg_.pos0(s) + rg_.len(s));
  for (const SeqChunk& s : b.seqs) mem.advance(s.slot, s.n_tokens);
  return ws_.logits.tensor(DType::F32, n_rows, V);
}

void HybridModel::run_layers(int T, int n_rows, Tensor hrows, HybridMemory& mem) {
  const int D = cfg_.d_model, V = cfg_.vocab_size;
  const Tensor h = ws_.h.tensor(dtype_, T, D);
  if (emb_scale_.empty()) {
    be_.embedding(h, embeddings_, static_cast<const int32_t*>(ws_.idx.data()));  // ids come first there
  } else {  // h = embedding_multiplier * embeddings
    const Tensor e = act(ws_.ym, T, D);
    be_.embedding(e, embeddings_, static_cast<const int32_t*>(ws_.idx.data()));
    be_.memzero(h.data, size_t(T) * D * dtype_size(dtype_));
    be_.add_rows(h, nullptr, e, nullptr, T, nullptr, emb_scale_);
  }
  next_normed_ = false;
  for (int i = 0; i < cfg_.n_layers; ++i) {
    if (cfg_.has_bridge(i) && folded_bridge(i - 1) == nullptr) bridge(i, T);  // else in layer i - 1
    // Normed: the layer before wrote this one's normed input with its bridge (project_out).
    // Otherwise a Mamba layer applies its pre-norm inside mamba_in, an attention layer inside
    // its q | k | v projection (fused on CUDA's decode step).
    const bool normed = std::exchange(next_normed_, false);
    if (cfg_.is_true(i) && !normed)
      be_.rmsnorm(ws_.u.tensor(dtype_, T, D), h, lw_[size_t(i)].norm, cfg_.norm_eps);
    if (cfg_.is_true(i))
      true_layer(i, mem);
    else if (cfg_.is_attention(i))
      attention_layer(i, mem, normed);
    else
      mamba_layer(i, mem, normed);
    if (!cfg_.has_ffn(i)) continue;
    if (cfg_.is_moe(i))
      moe(i, T);
    else
      mlp(i, T);
  }
  if (hrows.data != h.data) {
    be_.copy_rows(hrows, nullptr, h, last_idx_, n_rows);  // the last row of each chunk
  }
  const Tensor un = ws_.u.tensor(dtype_, n_rows, D);
  be_.norm_linear(ws_.logits.tensor(DType::F32, n_rows, V), hrows, un, norm_f_, cfg_.norm_eps, lm_head_, false,
                  Tensor(), Tensor());
}

size_t HybridModel::workspace_bytes() const {
  size_t n = 0;
  for (const Buffer* b : {&ws_.h, &ws_.u, &ws_.xz, &ws_.xc, &ws_.dbc, &ws_.dt, &ws_.q, &ws_.k, &ws_.v, &ws_.g,
                          &ws_.up, &ws_.act, &ws_.rows, &ws_.logits, &ws_.inner[0], &ws_.inner[1], &ws_.gath,
                          &ws_.ym, &ws_.ya, &ws_.ssd, &ws_.moe_logits, &ws_.route_logits, &ws_.bcdt, &ws_.ids,
                          &ws_.idx, &ws_.gates, &ws_.zeros})
    n += b->bytes();
  return n;
}

std::vector<const void*> HybridModel::graph_signature(const HybridMemory& mem) const {
  std::vector<const void*> s = {&mem, rg_.d_cu(), ws_.idx.data(), ws_.logits.data(), ws_.h.data(),
                                ws_.u.data(), ws_.inner[0].data(), ws_.inner[1].data(), ws_.rows.data(),
                                ws_.xz.data(), ws_.xc.data(), ws_.ssd.data(), ws_.dbc.data(), ws_.bcdt.data(), ws_.dt.data(), ws_.q.data(), ws_.zeros.data(),
                                ws_.k.data(), ws_.v.data(), ws_.g.data(), ws_.up.data(), ws_.act.data()};
  // The kernels a step records depend on the backend's mode too: a graph captured before
  // set_batch_invariant(true) holds the decode-only kernels and must not be replayed after it.
  s.push_back(reinterpret_cast<const void*>(uintptr_t(be_.batch_invariant() ? 1 : 2)));
  auto& m = const_cast<HybridMemory&>(mem);
  for (int i = 0; i < cfg_.n_layers; ++i) {
    if (cfg_.has_attention_path(i)) {
      const KvPool p = m.kv().pool(i);
      s.push_back(p.k);
      s.push_back(p.v);
    }
    if (cfg_.has_mamba_path(i)) {
      s.push_back(m.recurrent().conv_pool(i).base);
      s.push_back(m.recurrent().ssm_pool(i).base);
    }
  }
  return s;
}

std::unique_ptr<HybridModel> load_model(const std::string& dir, Backend& be) {
  namespace fs = std::filesystem;
  HM_CHECK(fs::is_directory(dir), "model: '", dir, "' is not a directory (expected a checkpoint folder "
           "with config.json and model.safetensors)");
  const ModelConfig c = load_config((fs::path(dir) / "config.json").string());
  auto m = std::make_unique<HybridModel>(c, be);
  m->set_weight_format(load_params(m->params(), (fs::path(dir) / "model.safetensors").string()));
  m->prepare();
  return m;
}

void save_model(const HybridModel& m, const std::string& dir, const std::string& stored_dtype) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  if (m.weight_format() != DType::F32) {
    HM_CHECK(stored_dtype == "F32", "save_model: a model with ", compute_dtype_name(m.weight_format()),
             " weights is stored in that format, not ", stored_dtype);
    save_packed_params(m, (fs::path(dir) / "model.safetensors").string());
  } else {
    save_params(m.params(), (fs::path(dir) / "model.safetensors").string(), stored_dtype);
  }
  save_config((fs::path(dir) / "config.json").string(), m.config());
}

}  // namespace hm
