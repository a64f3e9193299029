// Model hyper-parameters (config.json), presets and their validation. Field names and meanings:
// docs/MODEL.md. Mirrors the seed's HybridMambaConfig.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace hm {

// Upper bounds of the config's sizes, each several times the largest published model's value
// (docs/RELIABILITY.md, "Limits"). With them every derived size below fits int32, and a
// config cannot ask for an allocation the memory check has not seen.
constexpr int kMaxDModel = 65536;
constexpr int kMaxLayers = 1024;
constexpr int kMaxVocab = 1 << 24;
constexpr int kMaxDState = 1024;
constexpr int kMaxDConv = 64;
constexpr int kMaxExpand = 16;
constexpr int kMaxDtRank = 65536;
constexpr int kMaxHeads = 1024;
constexpr int kMaxDff = 1 << 20;
constexpr int kMaxRoutingChunk = 1 << 20;
constexpr int kMaxExperts = 1024;
constexpr double kMaxRopeTheta = 1e12;
// Kernels index one weight tensor with int32.
constexpr int64_t kMaxTensorElements = int64_t(1) << 31;

struct ModelConfig {
  std::string hybrid = "simple";
  int d_model = 512;
  int n_layers = 12;
  std::vector<int> attention_layers = {3, 6, 9};
  int vocab_size = 32000;
  int d_state = 16;
  int d_conv = 4;
  int expand = 2;
  // Explicit Mamba inner width (Hugging Face's intermediate_size, which need not be a multiple
  // of d_model); 0 = expand * d_model.
  int inner_size = 0;
  int dt_rank = 0;  // 0 = "auto": ceil(d_model / 16)
  int n_heads = 8;
  int n_kv_heads = 8;
  // Attention head size when it is not d_model / n_heads (Falcon-H1's and Nemotron-H's explicit
  // head_dim); 0 = d_model / n_heads.
  int attn_head_dim = 0;
  bool rope = true;
  float rope_theta = 10000.0f;
  // Channels of each head RoPE rotates: the first rope_dim, paired rotate-half style (i with
  // i + rope_dim / 2, frequencies theta^(-2i / rope_dim)); the rest pass unchanged (Bamba's
  // partial_rotary_factor 0.5). 0 = the whole head.
  int rope_dim = 0;
  int d_ff = 0;
  // The layers that have an FFN after their mixer (Nemotron-H, whose MLP blocks follow only some
  // mixers); empty = every layer (when d_ff > 0).
  std::vector<int> ffn_layers;
  // The dense MLP: "swiglu" (down(silu(gate u) * up u)) or "relu2" (down(relu(up u)^2), no gate
  // projection: Nemotron-H).
  std::string mlp_act = "swiglu";
  float norm_eps = 1e-5f;
  bool tie_embeddings = true;
  bool state_bridges = true;
  // True Hybrid (hybrid == "true"; docs/TRUE_HYBRID.md). true_layers hold both a Mamba and an
  // attention path behind a router; the other layers follow attention_layers as in "simple".
  std::vector<int> true_layers;
  std::string routing_mode = "soft";         // "both" | "soft" | "hard"
  std::string routing_granularity = "token"; // "token" | "chunk"
  int routing_chunk = 16;                    // tokens per routing decision when "chunk"
  float attention_budget = 0.5f;             // target fraction of tokens routed to attention
  float budget_loss_weight = 0.1f;           // weight of (mean p - budget)^2 in training
  // Mamba-2 (docs/MODEL.md, "Mamba-2 layers"): the layers listed run the SSD mixer in place of
  // Mamba's; they share d_model, d_inner, d_state and d_conv with Mamba layers. Heads of
  // mamba2_head_dim channels, mamba2_groups groups of B and C, a per-head scalar A, D and dt bias.
  std::vector<int> mamba2_layers;
  int mamba2_head_dim = 64;
  int mamba2_groups = 1;
  // The gated RMSNorm's group: d_inner / mamba2_groups columns (true, as mamba_ssm, Bamba and
  // Nemotron-H) or all d_inner (false, as transformers' Mamba2ForCausalLM computes it).
  bool mamba2_norm_per_group = true;
  // false: no gated RMSNorm, the scan output is gated as y * silu(z) (Falcon-H1's mamba_rms_norm
  // false) and the layer has no mixer.norm.weight.
  bool mamba2_gated_norm = true;
  // true: the gated norm normalizes first, rmsnorm(y) * w * silu(z) per group (Falcon-H1's
  // mamba_norm_before_gate); false: rmsnorm(y * silu(z)) * w. Needs mamba2_gated_norm.
  bool mamba2_norm_before_gate = false;
  // time_step_limit: delta = clamp(softplus(dt + dt_bias), min, max).
  float mamba2_dt_min = 0.0f;
  float mamba2_dt_max = INFINITY;
  // Falcon-Mamba's mixer: a weightless RMSNorm (eps mamba_bcdt_norm_eps) on each of dt_r, B and
  // C after x_proj, in every Mamba-1 path.
  bool mamba_bcdt_norm = false;
  float mamba_bcdt_norm_eps = 1e-6f;
  // Jamba's variant: the three norms have learned weights (mixer.dt_layernorm.weight [dt_rank],
  // mixer.b_layernorm.weight and mixer.c_layernorm.weight [d_state]). Needs mamba_bcdt_norm.
  bool mamba_bcdt_norm_weight = false;
  // Biases on the Mamba-1 mixers' in_proj and out_proj (transformers' use_bias):
  // mixer.in_proj.bias [2 * d_inner], mixer.out_proj.bias [d_model]. Inference only.
  bool mamba_proj_bias = false;
  // Mixture of experts (Jamba, Granite 4.0-H, Nemotron-H): the FFN of each layer listed is
  // moe_experts MLPs (mlp_act: SwiGLU, or squared ReLU without a gate) of width moe_ff (0 = d_ff)
  // behind a router; a token runs only its moe_top_k best-scored experts, each weighted by its
  // score (renormalized over the chosen ones to sum to 1 when moe_renormalize) times moe_scaling.
  // moe_router "softmax": scores = softmax(router u). "sigmoid" (Nemotron-H, DeepSeek-V3):
  // scores = sigmoid(router u); experts are chosen by score + mlp.router.correction_bias [experts]
  // and, with moe_groups > 1, only among the moe_topk_groups groups (of experts / moe_groups
  // consecutive experts) whose two best choice scores sum highest. Needs d_ff > 0.
  std::vector<int> moe_layers;
  int moe_experts = 8;
  int moe_top_k = 2;
  bool moe_renormalize = false;
  int moe_ff = 0;
  std::string moe_router = "softmax";
  int moe_groups = 1;
  int moe_topk_groups = 1;
  float moe_scaling = 1.0f;
  // A shared expert on every MoE layer (Granite 4.0-H, Nemotron-H): an MLP (mlp_act) of this width
  // on the same normed input, its output added to the experts' (mlp.shared_{gate,up,down}_proj.weight).
  // 0 = none.
  int moe_shared_ff = 0;
  // Granite's scalings: the embeddings times embedding_multiplier; each mixer's and FFN's output
  // times residual_multiplier before it joins the residual stream; attention scores q.k times
  // attention_scale (0 = 1/sqrt(head_dim)); the logits divided by logits_scaling. Inference only.
  // The tokenizer's special ids as a Hugging Face config.json gives them (-1: none). They do not
  // change the math; our config.json keeps them so the tokenizer of a converted or fine-tuned
  // checkpoint finds them there (load_tokenizer reads them).
  int bos_token_id = -1, eos_token_id = -1, pad_token_id = -1;
  float embedding_multiplier = 1.0f;
  float residual_multiplier = 1.0f;
  float attention_scale = 0.0f;
  float logits_scaling = 1.0f;

  int d_inner() const { return inner_size > 0 ? inner_size : expand * d_model; }
  int resolved_dt_rank() const { return dt_rank > 0 ? dt_rank : (d_model + 15) / 16; }
  int moe_width() const { return moe_ff > 0 ? moe_ff : d_ff; }  // each expert's
  int head_dim() const { return attn_head_dim > 0 ? attn_head_dim : d_model / n_heads; }
  int resolved_rope_dim() const { return rope_dim > 0 ? rope_dim : head_dim(); }
  // Layer kinds: attention only, true hybrid (both paths), or Mamba only (everything else).
  bool is_attention(int layer) const;
  bool is_true(int layer) const;
  bool has_mamba_path(int layer) const { return !is_attention(layer); }  // Mamba or Mamba-2
  bool is_mamba2(int layer) const;
  bool is_moe(int layer) const;
  bool has_ffn(int layer) const;  // an MLP or MoE after the mixer
  int mamba2_heads() const { return d_inner() / mamba2_head_dim; }
  int mamba2_conv_dim() const { return d_inner() + 2 * mamba2_groups * d_state; }  // x | B | C
  int mamba2_in_proj_rows() const { return d_inner() + mamba2_conv_dim() + mamba2_heads(); }  // z | xBC | dt
  int mamba2_norm_group() const { return mamba2_norm_per_group ? d_inner() / mamba2_groups : d_inner(); }
  // The conv window of layer i's Mamba path: d_inner channels, or x | B | C for Mamba-2.
  int conv_channels(int layer) const { return is_mamba2(layer) ? mamba2_conv_dim() : d_inner(); }
  bool has_attention_path(int layer) const { return is_attention(layer) || is_true(layer); }
  bool any_attention() const;
  // A bridge sits in front of layer i when i > 0, layer i's type differs from layer i-1's and
  // neither is a true-hybrid layer (which holds both types itself).
  bool has_bridge(int layer) const;
  // Width of the inner representation layer i hands to a bridge (d_inner or n_heads*head_dim).
  int inner_dim(int layer) const;
};

// Throws hm::Error naming the field when a value is out of range (including the bounds above)
// or inconsistent, or when a weight tensor would exceed kMaxTensorElements.
void validate(const ModelConfig& c);

// Strict JSON conversion: wrong types, unknown fields and invalid values are errors naming the
// field; `origin` (the file) starts the message of a type error and ends that of a bad value.
ModelConfig config_from_json(const nlohmann::json& j, const std::string& origin = "config");
nlohmann::json config_to_json(const ModelConfig& c);
ModelConfig load_config(const std::string& path);  // reads (parse_json_file) and validates a config.json
void save_config(const std::string& path, const ModelConfig& c);  // atomic

// Why a config cannot be trained (the layers that have no backward pass yet), or "" when it can.
std::string training_unsupported(const ModelConfig& c);

// Presets: seed (the seed's benchmark model), mamba and transformer (about seed's parameter
// count, one layer type only), true-hybrid (about seed's count, every layer true hybrid), demo
// and true-demo (the README's training runs), tiny and true-tiny (tests).
ModelConfig preset(const std::string& name);
std::vector<std::string> preset_names();

// Parameter count of a config (every tensor of docs/MODEL.md's table), overflow-checked.
int64_t count_params(const ModelConfig& c);

}  // namespace hm
