// All parameters of a model live in one float32 allocation with named views (as llm.c does), so
// init, checkpoint save/load and, later, gradients and optimizer state are one operation on one
// block. The layout (names, shapes, order) is the table in docs/MODEL.md.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kernels/ref/router_ref.h"
#include "model/config.h"

namespace hm {

struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel() const;
};

// Every tensor of a config, in a fixed order.
std::vector<ParamSpec> param_layout(const ModelConfig& c);

// Pointers into the arena for one layer; unused pointers stay null.
struct LayerWeights {
  float* norm = nullptr;  // [D]
  // Mamba
  float *in_proj = nullptr, *conv_w = nullptr, *conv_b = nullptr, *x_proj = nullptr;
  float *dt_w = nullptr, *dt_b = nullptr, *A_log = nullptr, *Dskip = nullptr, *out_proj = nullptr;
  // mamba_proj_bias: in_proj's [2 * d_inner] and out_proj's [D] biases
  float *in_proj_b = nullptr, *out_proj_b = nullptr;
  // Mamba-2 uses in_proj, conv_w, conv_b, A_log, Dskip, out_proj of the above, one value per head
  // in dt_b (mixer.dt_bias), A_log and Dskip, and the gated RMSNorm's weight [d_inner]:
  float* ssm_norm = nullptr;
  // mamba_bcdt_norm_weight (Jamba): the dt, B and C norms' weights [dt_rank], [d_state], [d_state]
  float *dt_norm = nullptr, *b_norm = nullptr, *c_norm = nullptr;
  // Attention
  float *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
  // MLP
  float *mlp_norm = nullptr, *w_gate = nullptr, *w_up = nullptr, *w_down = nullptr;
  // Mixture of experts (an MoE layer has these instead of w_gate, w_up, w_down): router
  // [experts, D] and expert stacks [experts, F, D], [experts, F, D], [experts, D, F] (F =
  // moe_width(); no gate stack with mlp_act relu2); a sigmoid router's choice bias [experts]
  float *moe_router = nullptr, *e_gate = nullptr, *e_up = nullptr, *e_down = nullptr;
  float* moe_bias = nullptr;
  // its shared expert (moe_shared_ff = S > 0): [S, D], [S, D], [D, S]
  float *s_gate = nullptr, *s_up = nullptr, *s_down = nullptr;
  // True-hybrid layer: per-channel fusion scales, cross-path exchange, router
  float *fuse_mamba = nullptr, *fuse_attn = nullptr, *exchange = nullptr;  // [D] each
  float *router_w = nullptr, *router_feat = nullptr, *router_b = nullptr;  // [D], [kRouterFeatures], [1]
  // Bridge in front of this layer
  float *bridge_norm = nullptr, *bridge_proj = nullptr, *bridge_gate = nullptr;
};

class Params {
 public:
  explicit Params(const ModelConfig& c);  // allocates; values are uninitialised until init/load
  Params(const Params&) = delete;
  Params& operator=(const Params&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  int64_t numel() const { return numel_; }
  float* get(const std::string& name);              // HM_ASSERT if absent
  const float* get(const std::string& name) const;
  float* at(size_t spec_index) { return data_.get() + offsets_[spec_index]; }
  const float* at(size_t spec_index) const { return data_.get() + offsets_[spec_index]; }

  LayerWeights& layer(int i) { return layers_[i]; }
  const LayerWeights& layer(int i) const { return layers_[i]; }
  float* embeddings() const { return embeddings_; }
  float* norm_f() const { return norm_f_; }
  float* lm_head() const { return lm_head_; }  // == embeddings() when tied

 private:
  ModelConfig cfg_;
  std::vector<ParamSpec> specs_;
  std::vector<int64_t> offsets_;
  int64_t numel_ = 0;
  std::unique_ptr<float[]> data_;
  std::vector<LayerWeights> layers_;
  float *embeddings_ = nullptr, *norm_f_ = nullptr, *lm_head_ = nullptr;
};

// Documented initialization (docs/MODEL.md), deterministic for a seed.
void init_params(Params& p, uint64_t seed);

// Checkpoint directory: config.json + model.safetensors (+ tokenizer.json written by the caller).
// Loading checks every tensor is present with the right shape and none is unexpected.
void save_params(const Params& p, const std::string& safetensors_path, const std::string& stored_dtype = "F32");
// Returns the weight format the file stores its linear weights in (model/packed_checkpoint.h:
// F32 for a plain checkpoint), its packed tensors read dequantized into the arena.
DType load_params(Params& p, const std::string& safetensors_path);

}  // namespace hm
