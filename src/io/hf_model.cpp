#include "io/hf_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/json_read.h"
#include "io/paths.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "model/params.h"
#include "runtime/chat_template.h"

namespace hm {

namespace fs = std::filesystem;

namespace {

constexpr const char* kIndexFile = "model.safetensors.index.json";

// A file of an HF folder. Hugging Face cache snapshots hold symlinks into ../../blobs, so links
// to regular files are allowed here (file_inside_dir still refuses '..' and absolute names).
std::string hf_file(const std::string& dir, const std::string& name, const std::string& origin,
                    const std::string& field) {
  return file_inside_dir(dir, name, origin, field, /*allow_linked_files=*/true);
}

// What config.json says beyond ModelConfig: the parts of the mapping the weight loader needs.
struct HfInfo {
  ModelConfig cfg;
  bool conv_bias = true;  // use_conv_bias: false means a zero conv bias and no conv1d.bias tensors
  std::string conv_bias_field = "use_conv_bias";
  bool layers_names = false;  // tensors under transformers' model.layers.N.{mamba,self_attn,feed_forward}
                              // names (layers_tensor_name): Jamba, Bamba
  bool granite_names = false;  // GraniteMoeHybrid's names and fused tensors (granite_source)
  // Falcon-H1: its constant multipliers, folded into the weights after loading (fold_falcon_h1).
  struct FalconH1 {
    bool on = false;
    double ssm_in = 1, ssm_out = 1, attn_in = 1, attn_out = 1, key = 1, lm_head = 1;
    double ssm[5] = {1, 1, 1, 1, 1};  // in_proj's z | x | B | C | dt rows
    double mlp_gate = 1, mlp_down = 1;
  } falcon;
  // Nemotron-H: per layer of ours, the block holding its mixer and the "-" block holding its MLP
  // (-1: none); empty for other families.
  std::vector<std::pair<int, int>> nemotron_blocks;
};

HfInfo mamba_info_from_json(const JsonFields& f, const std::string& origin, bool falcon);
HfInfo mamba2_info_from_json(const JsonFields& f, const std::string& origin);
HfInfo jamba_info_from_json(const JsonFields& f, const std::string& origin);
HfInfo bamba_info_from_json(const JsonFields& f, const std::string& origin);
HfInfo granite_info_from_json(const JsonFields& f, const std::string& origin);
HfInfo falcon_h1_info_from_json(const JsonFields& f, const std::string& origin);
HfInfo nemotron_h_info_from_json(const JsonFields& f, const std::string& origin);

HfInfo hf_info_from_json(const nlohmann::json& j, const std::string& origin) {
  const JsonFields f(j, origin);
  HM_CHECK(f.has("architectures"), origin, ": not a Hugging Face config (no field 'architectures')");
  const nlohmann::json& arch = f.at("architectures");
  HM_CHECK(arch.is_array() && arch.size() == 1 && arch[0].is_string(), origin,
           ": field 'architectures' must list exactly one architecture, got ", arch.dump());
  const std::string a = arch[0].get<std::string>();
  HM_CHECK(a == "MambaForCausalLM" || a == "FalconMambaForCausalLM" || a == "Mamba2ForCausalLM" ||
               a == "JambaForCausalLM" || a == "BambaForCausalLM" || a == "GraniteMoeHybridForCausalLM" ||
               a == "FalconH1ForCausalLM" || a == "NemotronHForCausalLM",
           origin, ": field 'architectures': \"", a, "\" is not supported (supported: MambaForCausalLM, "
           "FalconMambaForCausalLM, Mamba2ForCausalLM, JambaForCausalLM, BambaForCausalLM, "
           "GraniteMoeHybridForCausalLM, FalconH1ForCausalLM, NemotronHForCausalLM; docs/MODELS.md lists the families)");
  HfInfo info = a == "Mamba2ForCausalLM"  ? mamba2_info_from_json(f, origin)
                : a == "JambaForCausalLM" ? jamba_info_from_json(f, origin)
                : a == "BambaForCausalLM" ? bamba_info_from_json(f, origin)
                : a == "GraniteMoeHybridForCausalLM" ? granite_info_from_json(f, origin)
                : a == "FalconH1ForCausalLM" ? falcon_h1_info_from_json(f, origin)
                : a == "NemotronHForCausalLM" ? nemotron_h_info_from_json(f, origin)
                                          : mamba_info_from_json(f, origin, a == "FalconMambaForCausalLM");
  try {
    validate(info.cfg);
  } catch (const Error& e) {
    throw Error(detail::cat(e.what(), " (mapped from ", origin, ")"));
  }
  return info;
}

// The fields every Mamba family shares: sizes, eps, head tying, biases, activation.
void common_mamba_fields(const JsonFields& f, const std::string& origin, bool tie_default, HfInfo& info) {
  ModelConfig& c = info.cfg;
  c.hybrid = "simple";
  c.attention_layers = {};
  c.d_ff = 0;
  c.state_bridges = false;
  c.d_model = int(f.get_int("hidden_size", 1, kMaxDModel));
  c.n_layers = int(f.get_int("num_hidden_layers", 1, kMaxLayers));
  c.vocab_size = int(f.get_int("vocab_size", 1, kMaxVocab));
  c.norm_eps = f.has("layer_norm_epsilon") ? f.get_float("layer_norm_epsilon") : 1e-5f;
  c.tie_embeddings = f.has("tie_word_embeddings") ? f.get_bool("tie_word_embeddings") : tie_default;
  // use_bias (absent: false, transformers 5's default): biases on in_proj and out_proj, which the
  // Mamba-1 mixer has (mamba_proj_bias); the Mamba-2 caller refuses them.
  c.mamba_proj_bias = f.has("use_bias") && f.get_bool("use_bias");
  if (f.has("use_conv_bias")) info.conv_bias = f.get_bool("use_conv_bias");
  if (f.has("hidden_act")) {
    const std::string act = f.get_string("hidden_act");
    HM_CHECK(act == "silu" || act == "swish", origin, ": field 'hidden_act' is \"", act,
             "\": not supported (only \"silu\")");
  }
}

// One element of time_step_limit: a number, or Python's Infinity: read as the bare string, or as
// {"__float__": "Infinity"}, the form transformers 5 writes for non-finite floats.
double limit_value(const nlohmann::json& v, const std::string& origin, int k) {
  if (v.is_string() && v.get<std::string>() == "Infinity") return INFINITY;
  if (v.is_object() && v.size() == 1 && v.contains("__float__") && v["__float__"].is_string() &&
      v["__float__"].get<std::string>() == "Infinity")
    return INFINITY;
  HM_CHECK(v.is_number(), origin, ": field 'time_step_limit[", k, "]' must be a number or Infinity, got ", v.dump());
  return json_to_double(v, 0, 1e30, origin, detail::cat("time_step_limit[", k, "]"));
}

// time_step_limit [min, max] (absent: (0, inf)): the Mamba-2 mixer's clamp of softplus(dt + dt_bias).
void read_time_step_limit(const JsonFields& f, const std::string& origin, ModelConfig& c) {
  if (!f.has("time_step_limit")) return;
  const nlohmann::json& lim = f.at("time_step_limit");
  HM_CHECK(lim.is_array() && lim.size() == 2, origin, ": field 'time_step_limit' must be [min, max], got ",
           lim.dump());
  c.mamba2_dt_min = float(limit_value(lim[0], origin, 0));
  c.mamba2_dt_max = float(limit_value(lim[1], origin, 1));
  HM_CHECK(c.mamba2_dt_max > c.mamba2_dt_min, origin, ": field 'time_step_limit' ", lim.dump(),
           " must have min < max");
}

HfInfo mamba2_info_from_json(const JsonFields& f, const std::string& origin) {
  if (f.has("model_type")) {
    const std::string t = f.get_string("model_type");
    HM_CHECK(t == "mamba2", origin, ": field 'model_type' must be \"mamba2\" for Mamba2ForCausalLM, got \"", t, "\"");
  }
  HfInfo info;
  ModelConfig& c = info.cfg;
  common_mamba_fields(f, origin, /*tie_default=*/false, info);  // Mamba2Config ties no head by default
  HM_CHECK(!c.mamba_proj_bias, origin, ": field 'use_bias' is true (biases on in_proj and out_proj): not "
           "supported for Mamba2ForCausalLM yet");
  c.d_state = f.has("state_size") ? int(f.get_int("state_size", 1, kMaxDState)) : 128;
  c.d_conv = f.has("conv_kernel") ? int(f.get_int("conv_kernel", 1, kMaxDConv)) : 4;
  // The mixer's width is int(expand * hidden_size); Mamba2Mixer never reads intermediate_size.
  const double expand = f.has("expand") ? f.get_double("expand", 1e-9, kMaxExpand) : 2.0;
  const int64_t inner = int64_t(expand * c.d_model);
  HM_CHECK(inner >= 1 && inner <= int64_t(kMaxExpand) * c.d_model, origin, ": field 'expand' (", expand,
           ") gives an intermediate size of ", inner, ", outside [1, ", kMaxExpand, " * hidden_size]");
  if (f.has("intermediate_size"))
    HM_CHECK(f.get_int("intermediate_size", 1, int64_t(kMaxExpand) * c.d_model) == inner, origin,
             ": field 'intermediate_size' (", f.at("intermediate_size").dump(), ") disagrees with int(expand * "
             "hidden_size) = ", inner, ", the width transformers' Mamba2Mixer uses");
  if (inner % c.d_model == 0) {
    c.expand = int(inner / c.d_model);
  } else {
    c.expand = 1;
    c.inner_size = int(inner);
  }
  const int64_t heads = f.has("num_heads") ? f.get_int("num_heads", 1, inner) : 128;
  c.mamba2_head_dim = f.has("head_dim") ? int(f.get_int("head_dim", 1, inner)) : 64;
  HM_CHECK(heads * c.mamba2_head_dim == inner, origin, ": fields 'num_heads' (", heads, ") x 'head_dim' (",
           c.mamba2_head_dim, ") must equal the intermediate size int(expand * hidden_size) = ", inner);
  c.mamba2_groups = f.has("n_groups") ? int(f.get_int("n_groups", 1, kMaxHeads)) : 8;
  HM_CHECK(heads % c.mamba2_groups == 0, origin, ": field 'n_groups' (", c.mamba2_groups,
           ") must divide 'num_heads' (", heads, ")");
  // transformers' MambaRMSNormGated (modeling_mamba2.py) normalizes over all intermediate_size
  // columns, whatever n_groups; mamba_ssm normalizes per group. Identical for n_groups 1.
  c.mamba2_norm_per_group = false;
  read_time_step_limit(f, origin, c);
  if (f.has("rms_norm"))  // transformers applies the gated norm whatever it says; mamba_ssm skips it
    HM_CHECK(f.get_bool("rms_norm"), origin, ": field 'rms_norm' is false: not supported (transformers "
             "applies the gated RMSNorm anyway, mamba_ssm does not; which one is meant is ambiguous)");
  if (f.has("norm_before_gate"))
    HM_CHECK(!f.get_bool("norm_before_gate"), origin, ": field 'norm_before_gate' is true: not supported "
             "(transformers' Mamba2 gates before the norm: norm(y * silu(z)))");
  if (f.has("chunk_size")) f.get_int("chunk_size", 1, INT32_MAX);  // how the scan is split: no effect on the result
  c.mamba2_layers.clear();
  for (int i = 0; i < c.n_layers; ++i) c.mamba2_layers.push_back(i);
  // Ignored as transformers ignores them: initialization (initializer_range, time_step_min/max/
  // floor, rescale_prenorm_residual), time_step_rank (unused by the Mamba-2 mixer), use_cache,
  // residual_in_fp32 (ours is float32), token ids and dtype.
  return info;
}

// MambaForCausalLM, or FalconMambaForCausalLM (falcon): the same tensors, plus a weightless
// RMSNorm on dt, B and C inside the mixer (mixer_rms_eps).
HfInfo mamba_info_from_json(const JsonFields& f, const std::string& origin, bool falcon) {
  const char* type = falcon ? "falcon_mamba" : "mamba";
  if (f.has("model_type")) {
    const std::string t = f.get_string("model_type");
    HM_CHECK(t == type, origin, ": field 'model_type' must be \"", type, "\" for ",
             falcon ? "FalconMambaForCausalLM" : "MambaForCausalLM", ", got \"", t, "\"");
  }

  HfInfo info;
  ModelConfig& c = info.cfg;
  common_mamba_fields(f, origin, /*tie_default=*/true, info);
  if (falcon) {
    c.mamba_bcdt_norm = true;
    if (f.has("mixer_rms_eps")) {
      const double eps = f.get_double("mixer_rms_eps", 1e-30, 0.5);
      c.mamba_bcdt_norm_eps = float(eps);
    }
  }
  // mamba_ssm's names, which some converted configs still carry: they must agree.
  if (f.has("d_model"))
    HM_CHECK(f.get_int("d_model", 1, kMaxDModel) == c.d_model, origin, ": field 'd_model' (",
             f.at("d_model").dump(), ") disagrees with 'hidden_size' (", c.d_model, ")");
  if (f.has("n_layer"))
    HM_CHECK(f.get_int("n_layer", 1, kMaxLayers) == c.n_layers, origin, ": field 'n_layer' (",
             f.at("n_layer").dump(), ") disagrees with 'num_hidden_layers' (", c.n_layers, ")");
  if (f.has("rms_norm"))
    HM_CHECK(f.get_bool("rms_norm"), origin, ": field 'rms_norm' is false (LayerNorm blocks): not supported, "
             "only RMSNorm");
  c.d_state = f.has("state_size") ? int(f.get_int("state_size", 1, kMaxDState)) : 16;
  c.d_conv = f.has("conv_kernel") ? int(f.get_int("conv_kernel", 1, kMaxDConv)) : 4;
  // transformers: intermediate_size = int(expand * hidden_size), unless config.json names it.
  const double expand = f.has("expand") ? f.get_double("expand", 1e-9, kMaxExpand) : 2.0;
  int64_t inner = int64_t(expand * c.d_model);
  if (f.has("intermediate_size")) inner = f.get_int("intermediate_size", 1, int64_t(kMaxExpand) * c.d_model);
  HM_CHECK(inner >= 1 && inner <= int64_t(kMaxExpand) * c.d_model, origin, ": field 'expand' (", expand,
           ") gives an intermediate size of ", inner, ", outside [1, ", kMaxExpand, " * hidden_size]");
  if (inner % c.d_model == 0) {
    c.expand = int(inner / c.d_model);
  } else {
    c.expand = 1;  // unused: inner_size says it
    c.inner_size = int(inner);
  }
  c.dt_rank = 0;
  if (f.has("time_step_rank")) {
    if (f.at("time_step_rank").is_string()) {
      const std::string v = f.get_string("time_step_rank");
      HM_CHECK(v == "auto", origin, ": field 'time_step_rank' must be \"auto\" or an integer, got \"", v, "\"");
    } else {
      c.dt_rank = int(f.get_int("time_step_rank", 1, kMaxDtRank));
    }
  }
  // Every other field is ignored, as transformers ignores it: initialization (initializer_range,
  // rescale_prenorm_residual, time_step_scale/min/max/init_scheme/floor), how the scan runs
  // (use_cache, use_mambapy, use_associative_scan), residual_in_fp32 (ours is float32 always),
  // token ids and storage dtype. docs/MODELS.md lists each.
  return info;
}

// A field that is present and not null (transformers writes unset optional fields as null).
bool present(const JsonFields& f, const char* key) { return f.has(key) && !f.at(key).is_null(); }

// JambaForCausalLM (transformers' modeling_jamba.py): every layer is input_layernorm -> Mamba
// mixer or attention -> residual, pre_ff_layernorm -> dense SwiGLU MLP or mixture of experts ->
// residual; final_layernorm and the head. The Mamba mixer is Mamba-1 with weighted RMSNorms on
// dt_r, B and C (eps rms_norm_eps); attention has no positional encoding. Defaults are
// JambaConfig's.
HfInfo jamba_info_from_json(const JsonFields& f, const std::string& origin) {
  if (f.has("model_type")) {
    const std::string t = f.get_string("model_type");
    HM_CHECK(t == "jamba", origin, ": field 'model_type' must be \"jamba\" for JambaForCausalLM, got \"", t, "\"");
  }
  HfInfo info;
  info.layers_names = true;
  info.conv_bias_field = "mamba_conv_bias";
  ModelConfig& c = info.cfg;
  c.hybrid = "simple";
  c.state_bridges = false;
  c.rope = false;  // JambaAttention applies no positional encoding
  c.d_model = int(f.get_int("hidden_size", 1, kMaxDModel));
  c.n_layers = int(f.get_int("num_hidden_layers", 1, kMaxLayers));
  c.vocab_size = int(f.get_int("vocab_size", 1, kMaxVocab));
  c.d_ff = f.has("intermediate_size") ? int(f.get_int("intermediate_size", 1, kMaxDff)) : 14336;
  c.norm_eps = f.has("rms_norm_eps") ? f.get_float("rms_norm_eps") : 1e-6f;
  HM_CHECK(c.norm_eps > 0 && c.norm_eps < 1, origin, ": field 'rms_norm_eps' must be in (0, 1), got ", c.norm_eps);
  c.tie_embeddings = f.has("tie_word_embeddings") ? f.get_bool("tie_word_embeddings") : false;
  if (f.has("hidden_act")) {  // the conv's, the MLP's and the experts' activation
    const std::string act = f.get_string("hidden_act");
    HM_CHECK(act == "silu" || act == "swish", origin, ": field 'hidden_act' is \"", act,
             "\": not supported (only \"silu\")");
  }

  // Attention: no RoPE, GQA, head_dim = hidden_size / num_attention_heads, scale 1/sqrt(head_dim).
  c.n_heads = f.has("num_attention_heads") ? int(f.get_int("num_attention_heads", 1, kMaxHeads)) : 32;
  c.n_kv_heads = present(f, "num_key_value_heads") ? int(f.get_int("num_key_value_heads", 1, kMaxHeads))
                 : f.has("num_key_value_heads")     ? c.n_heads  // null: transformers falls back to MHA
                                                    : 8;
  HM_CHECK(!present(f, "sliding_window"), origin, ": field 'sliding_window' is ", f.at("sliding_window").dump(),
           ": sliding-window attention is not supported (null only)");

  // The layer pattern: attention where i % attn_layer_period == attn_layer_offset, experts where
  // i % expert_layer_period == expert_layer_offset (and num_experts > 1).
  const auto period = [&](const char* p, const char* o, int64_t dp, int64_t dof) {
    const int64_t per = f.has(p) ? f.get_int(p, 1, kMaxLayers) : dp;
    const int64_t off = f.has(o) ? f.get_int(o, 0, kMaxLayers) : dof;
    HM_CHECK(off < per, origin, ": field '", o, "' (", off, ") must be smaller than '", p, "' (", per, ")");
    return std::pair{per, off};
  };
  const auto [attn_per, attn_off] = period("attn_layer_period", "attn_layer_offset", 8, 4);
  const auto [exp_per, exp_off] = period("expert_layer_period", "expert_layer_offset", 2, 1);
  c.moe_experts = f.has("num_experts") ? int(f.get_int("num_experts", 1, kMaxExperts)) : 16;
  c.moe_top_k = f.has("num_experts_per_tok") ? int(f.get_int("num_experts_per_tok", 1, kMaxExperts)) : 2;
  c.moe_renormalize = false;  // JambaSparseMoeBlock weights the top k by their softmax probabilities as they are
  c.attention_layers.clear();
  c.moe_layers.clear();
  for (int i = 0; i < c.n_layers; ++i) {
    if (i % attn_per == attn_off) c.attention_layers.push_back(i);
    if (c.moe_experts > 1 && i % exp_per == exp_off) c.moe_layers.push_back(i);
  }
  if (!c.attention_layers.empty()) {  // checked where transformers builds attention
    HM_CHECK(c.d_model % c.n_heads == 0, origin, ": field 'num_attention_heads' (", c.n_heads,
             ") must divide 'hidden_size' (", c.d_model, ")");
    HM_CHECK(c.n_heads % c.n_kv_heads == 0, origin, ": field 'num_key_value_heads' (", c.n_kv_heads,
             ") must divide 'num_attention_heads' (", c.n_heads, ")");
    if (present(f, "head_dim"))  // transformers' attention would read it; ours is hidden_size / heads
      HM_CHECK(f.get_int("head_dim", 1, kMaxDModel) == c.head_dim(), origin, ": field 'head_dim' (",
               f.at("head_dim").dump(), ") differs from hidden_size / num_attention_heads = ", c.head_dim(),
               ": not supported");
  }
  if (!c.moe_layers.empty())
    HM_CHECK(c.moe_top_k <= c.moe_experts, origin, ": field 'num_experts_per_tok' (", c.moe_top_k,
             ") exceeds 'num_experts' (", c.moe_experts, ")");
  if (c.moe_layers.empty()) {  // no MoE layer: keep our defaults so the config round-trips
    c.moe_experts = ModelConfig{}.moe_experts;
    c.moe_top_k = ModelConfig{}.moe_top_k;
  }

  // The Mamba mixer.
  c.d_state = f.has("mamba_d_state") ? int(f.get_int("mamba_d_state", 1, kMaxDState)) : 16;
  c.d_conv = f.has("mamba_d_conv") ? int(f.get_int("mamba_d_conv", 1, kMaxDConv)) : 4;
  c.expand = f.has("mamba_expand") ? int(f.get_int("mamba_expand", 1, kMaxExpand)) : 2;
  c.dt_rank = 0;
  if (f.has("mamba_dt_rank")) {
    if (f.at("mamba_dt_rank").is_string()) {
      const std::string v = f.get_string("mamba_dt_rank");
      HM_CHECK(v == "auto", origin, ": field 'mamba_dt_rank' must be \"auto\" or an integer, got \"", v, "\"");
    } else {
      c.dt_rank = int(f.get_int("mamba_dt_rank", 1, kMaxDtRank));
    }
  }
  if (f.has("mamba_conv_bias")) info.conv_bias = f.get_bool("mamba_conv_bias");
  // Biases on in_proj and out_proj: Mamba's use_bias under another name.
  if (f.has("mamba_proj_bias")) c.mamba_proj_bias = f.get_bool("mamba_proj_bias");
  c.mamba_bcdt_norm = true;
  c.mamba_bcdt_norm_weight = true;
  c.mamba_bcdt_norm_eps = c.norm_eps;  // dt_layernorm, b_layernorm, c_layernorm use rms_norm_eps
  // Ignored as transformers' forward ignores them: use_mamba_kernels (which scan runs, not what
  // it computes), attention_dropout (training only), max_position_embeddings, num_logits_to_keep,
  // output_router_logits, router_aux_loss_coef, initializer_range, use_cache, token ids, dtype.
  return info;
}

// The Mamba-2 mixer fields BambaConfig and GraniteMoeHybridConfig share (mamba_*, time_step_limit),
// with their defaults: width mamba_expand * hidden_size, mamba_n_heads heads of mamba_d_head.
void mamba2_fields(const JsonFields& f, const std::string& origin, HfInfo& info) {
  ModelConfig& c = info.cfg;
  c.d_state = f.has("mamba_d_state") ? int(f.get_int("mamba_d_state", 1, kMaxDState)) : 256;
  c.d_conv = f.has("mamba_d_conv") ? int(f.get_int("mamba_d_conv", 1, kMaxDConv)) : 4;
  c.expand = f.has("mamba_expand") ? int(f.get_int("mamba_expand", 1, kMaxExpand)) : 2;
  const int inner = c.d_inner();
  const int heads = f.has("mamba_n_heads") ? int(f.get_int("mamba_n_heads", 1, inner)) : 128;
  HM_CHECK(inner % heads == 0, origin, ": field 'mamba_n_heads' (", heads, ") must divide mamba_expand * "
           "hidden_size = ", inner);
  c.mamba2_head_dim = inner / heads;
  if (f.has("mamba_d_head") && !(f.at("mamba_d_head").is_string() && f.get_string("mamba_d_head") == "auto"))
    HM_CHECK(f.get_int("mamba_d_head", 1, inner) == c.mamba2_head_dim, origin, ": field 'mamba_d_head' (",
             f.at("mamba_d_head").dump(), ") x 'mamba_n_heads' (", heads, ") must equal mamba_expand * hidden_size = ",
             inner);
  c.mamba2_groups = f.has("mamba_n_groups") ? int(f.get_int("mamba_n_groups", 1, kMaxHeads)) : 1;
  HM_CHECK(heads % c.mamba2_groups == 0, origin, ": field 'mamba_n_groups' (", c.mamba2_groups,
           ") must divide 'mamba_n_heads' (", heads, ")");
  // BambaRMSNormGated is transformers' MambaRMSNormGated: one norm over all intermediate_size
  // columns, whatever the groups (mamba_ssm's per-group norm differs when mamba_n_groups > 1).
  c.mamba2_norm_per_group = false;
  read_time_step_limit(f, origin, c);
  if (f.has("mamba_chunk_size")) f.get_int("mamba_chunk_size", 1, INT32_MAX);  // how the scan is split only
  if (f.has("mamba_conv_bias")) info.conv_bias = f.get_bool("mamba_conv_bias");
}

// A layer type as BambaConfig and GraniteMoeHybridConfig list them: "attention" or "mamba" (newer
// transformers also spell them "full_attention" and "linear_attention"); "" for anything else.
std::string layer_kind(const nlohmann::json& v) {
  if (v == "attention" || v == "full_attention") return "attention";
  if (v == "mamba" || v == "linear_attention") return "mamba";
  return "";
}

// BambaForCausalLM (transformers' modeling_bamba.py): Jamba's layer (input_layernorm -> mixer ->
// residual, pre_ff_layernorm -> SwiGLU MLP -> residual, on every layer) with transformers'
// Mamba-2 mixer, and Llama attention at attn_layer_indices whose RoPE rotates the first half of
// each head (BambaConfig fixes partial_rotary_factor at 0.5). Defaults are BambaConfig's.
HfInfo bamba_info_from_json(const JsonFields& f, const std::string& origin) {
  if (f.has("model_type")) {
    const std::string t = f.get_string("model_type");
    HM_CHECK(t == "bamba", origin, ": field 'model_type' must be \"bamba\" for BambaForCausalLM, got \"", t, "\"");
  }
  HfInfo info;
  info.layers_names = true;
  info.conv_bias_field = "mamba_conv_bias";
  ModelConfig& c = info.cfg;
  c.hybrid = "simple";
  c.state_bridges = false;
  c.d_model = int(f.get_int("hidden_size", 1, kMaxDModel));
  c.n_layers = int(f.get_int("num_hidden_layers", 1, kMaxLayers));
  c.vocab_size = int(f.get_int("vocab_size", 1, kMaxVocab));
  c.d_ff = f.has("intermediate_size") ? int(f.get_int("intermediate_size", 1, kMaxDff)) : 14336;
  c.norm_eps = f.has("rms_norm_eps") ? f.get_float("rms_norm_eps") : 1e-5f;  // every RMSNorm, the gated one too
  HM_CHECK(c.norm_eps > 0 && c.norm_eps < 1, origin, ": field 'rms_norm_eps' must be in (0, 1), got ", c.norm_eps);
  c.tie_embeddings = f.has("tie_word_embeddings") ? f.get_bool("tie_word_embeddings") : false;
  if (f.has("hidden_act")) {  // the conv's and the MLP's activation
    const std::string act = f.get_string("hidden_act");
    HM_CHECK(act == "silu" || act == "swish", origin, ": field 'hidden_act' is \"", act,
             "\": not supported (only \"silu\")");
  }
  for (const char* k : {"attention_bias", "mlp_bias", "mamba_proj_bias"})
    if (present(f, k))
      HM_CHECK(!f.get_bool(k), origin, ": field '", k, "' is true: biases on those projections are not supported");

  // The layer pattern: attention at attn_layer_indices (null: none), Mamba-2 everywhere else.
  c.attention_layers.clear();
  if (present(f, "attn_layer_indices")) {
    const nlohmann::json& idx = f.at("attn_layer_indices");
    HM_CHECK(idx.is_array(), origin, ": field 'attn_layer_indices' must be a list of layer indices, got ", idx.dump());
    for (size_t k = 0; k < idx.size(); ++k) {
      const int i = int(json_to_int(idx[k], 0, c.n_layers - 1, origin, detail::cat("attn_layer_indices[", k, "]")));
      HM_CHECK(!c.is_attention(i), origin, ": field 'attn_layer_indices' lists layer ", i, " twice");
      c.attention_layers.push_back(i);
    }
    std::sort(c.attention_layers.begin(), c.attention_layers.end());
  } else if (present(f, "layer_types") && f.at("layer_types").is_array()) {
    // No indices, but the per-layer types (checked below): the pattern is theirs.
    const nlohmann::json& t = f.at("layer_types");
    for (size_t i = 0; i < t.size() && i < size_t(c.n_layers); ++i)
      if (layer_kind(t[i]) == "attention") c.attention_layers.push_back(int(i));
  }
  c.mamba2_layers.clear();
  for (int i = 0; i < c.n_layers; ++i)
    if (!c.is_attention(i)) c.mamba2_layers.push_back(i);
  for (const char* k : {"layers_block_type", "layer_types"}) {  // derived by BambaConfig: a saved copy must agree
    if (!present(f, k)) continue;
    const nlohmann::json& t = f.at(k);
    HM_CHECK(t.is_array() && t.size() == size_t(c.n_layers), origin, ": field '", k, "' must list ", c.n_layers,
             " layer types, got ", t.dump());
    for (int i = 0; i < c.n_layers; ++i) {
      const std::string want = c.is_attention(i) ? "attention" : "mamba";
      HM_CHECK(layer_kind(t[size_t(i)]) == want, origin, ": field '", k, "[", i, "]' is ", t[size_t(i)].dump(),
               " but 'attn_layer_indices' makes layer ", i, " \"", want, "\"");
    }
  }

  // Attention: GQA with RoPE on the first head_dim / 2 channels of each head, no biases.
  c.n_heads = f.has("num_attention_heads") ? int(f.get_int("num_attention_heads", 1, kMaxHeads)) : 32;
  c.n_kv_heads = present(f, "num_key_value_heads") ? int(f.get_int("num_key_value_heads", 1, kMaxHeads)) : 8;
  if (f.has("num_key_value_heads") && f.at("num_key_value_heads").is_null()) c.n_kv_heads = c.n_heads;
  c.rope = true;
  c.rope_theta = 10000.0f;
  const auto rope_fields = [&](const JsonFields& r) {
    if (present(r, "rope_type")) {
      const std::string t = r.get_string("rope_type");
      HM_CHECK(t == "default", origin, ": field '", r.field("rope_type"), "' is \"", t,
               "\": only \"default\" RoPE (no scaling) is supported");
    }
    if (&r != &f && present(r, "type"))  // rope_scaling's older spelling of rope_type
      HM_CHECK(r.get_string("type") == "default", origin, ": field '", r.field("type"), "' is ",
               r.at("type").dump(), ": only \"default\" RoPE (no scaling) is supported");
    if (present(r, "rope_theta")) c.rope_theta = float(r.get_double("rope_theta", 1e-30, kMaxRopeTheta));
    if (present(r, "partial_rotary_factor")) {
      const double partial = r.get_double("partial_rotary_factor", 0, 1);
      HM_CHECK(partial == 0.5, origin, ": field '", r.field("partial_rotary_factor"), "' is ", partial,
               ": BambaConfig fixes it at 0.5 whatever config.json says, so another value is ambiguous and refused");
    }
  };
  rope_fields(f);
  if (present(f, "rope_parameters")) rope_fields(f.object("rope_parameters"));
  if (present(f, "rope_scaling")) rope_fields(f.object("rope_scaling"));
  if (!c.attention_layers.empty()) {  // checked where transformers builds attention
    HM_CHECK(c.d_model % c.n_heads == 0, origin, ": field 'num_attention_heads' (", c.n_heads,
             ") must divide 'hidden_size' (", c.d_model, ")");
    HM_CHECK(c.n_heads % c.n_kv_heads == 0, origin, ": field 'num_key_value_heads' (", c.n_kv_heads,
             ") must divide 'num_attention_heads' (", c.n_heads, ")");
    if (present(f, "head_dim"))  // BambaAttention would read it; ours is hidden_size / heads
      HM_CHECK(f.get_int("head_dim", 1, kMaxDModel) == c.head_dim(), origin, ": field 'head_dim' (",
               f.at("head_dim").dump(), ") differs from hidden_size / num_attention_heads = ", c.head_dim(),
               ": not supported");
    // transformers rotates int(head_dim * 0.5) channels, rotate-half style: an odd count would pair
    // them differently from its own frequency table.
    c.rope_dim = c.head_dim() / 2;
    HM_CHECK(c.head_dim() % 4 == 0, origin, ": hidden_size / num_attention_heads = ", c.head_dim(),
             " rotates ", c.rope_dim, " channels per head (partial_rotary_factor 0.5): only an even count is supported");
  } else {  // no attention layer: keep our defaults so the config round-trips
    c.n_heads = ModelConfig{}.n_heads;
    c.n_kv_heads = ModelConfig{}.n_kv_heads;
  }

  mamba2_fields(f, origin, info);
  // Ignored as transformers' forward ignores them: initializer_range, time_step_min/max
  // (initialization), z_loss_coefficient and attention_dropout (training only), use_cache,
  // num_logits_to_keep, max_position_embeddings (no effect with default RoPE), token ids, dtype.
  return info;
}

// GraniteMoeHybridForCausalLM (transformers' modeling_granitemoehybrid.py): embeddings times
// embedding_multiplier; per layer input_layernorm -> Bamba's Mamba-2 mixer or attention (RoPE
// over the whole head with position_embedding_type "rope", else none; scores times attention_multiplier) -> h += residual_multiplier * out, then
// post_attention_layernorm -> experts (softmax over the top-k router logits) + a shared SwiGLU
// MLP, or the shared MLP alone when num_local_experts is 0 -> h += residual_multiplier * out;
// norm, head, logits / logits_scaling. Defaults are GraniteMoeHybridConfig's.
HfInfo granite_info_from_json(const JsonFields& f, const std::string& origin) {
  if (f.has("model_type")) {
    const std::string t = f.get_string("model_type");
    HM_CHECK(t == "granitemoehybrid", origin, ": field 'model_type' must be \"granitemoehybrid\" for "
             "GraniteMoeHybridForCausalLM, got \"", t, "\"");
  }
  HfInfo info;
  info.granite_names = true;
  info.conv_bias_field = "mamba_conv_bias";
  ModelConfig& c = info.cfg;
  c.hybrid = "simple";
  c.state_bridges = false;
  c.rope = false;
  c.d_model = int(f.get_int("hidden_size", 1, kMaxDModel));
  c.n_layers = int(f.get_int("num_hidden_layers", 1, kMaxLayers));
  c.vocab_size = int(f.get_int("vocab_size", 1, kMaxVocab));
  c.norm_eps = f.has("rms_norm_eps") ? f.get_float("rms_norm_eps") : 1e-6f;
  HM_CHECK(c.norm_eps > 0 && c.norm_eps < 1, origin, ": field 'rms_norm_eps' must be in (0, 1), got ", c.norm_eps);
  c.tie_embeddings = f.has("tie_word_embeddings") ? f.get_bool("tie_word_embeddings") : false;
  if (f.has("hidden_act")) {
    const std::string act = f.get_string("hidden_act");
    HM_CHECK(act == "silu" || act == "swish", origin, ": field 'hidden_act' is \"", act,
             "\": not supported (only \"silu\")");
  }
  for (const char* k : {"attention_bias", "mamba_proj_bias"})
    if (present(f, k))
      HM_CHECK(!f.get_bool(k), origin, ": field '", k, "' is true: biases on those projections are not supported");

  // The layer pattern: layer_types (or its older name layers_block_type), "mamba" or "attention"
  // per layer; absent: every layer Mamba.
  std::vector<std::string> types(size_t(c.n_layers), "mamba");
  std::string types_field;
  for (const char* k : {"layer_types", "layers_block_type"}) {
    if (!present(f, k)) continue;
    const nlohmann::json& t = f.at(k);
    HM_CHECK(t.is_array() && t.size() == size_t(c.n_layers), origin, ": field '", k, "' must list ", c.n_layers,
             " layer types, got ", t.dump());
    for (int i = 0; i < c.n_layers; ++i) {
      const nlohmann::json& v = t[size_t(i)];
      const std::string kind = layer_kind(v);
      HM_CHECK(!kind.empty(), origin, ": field '", k, "[", i, "]' is ", v.dump(),
               ": only \"mamba\" and \"attention\" layers are supported");
      HM_CHECK(types_field.empty() || kind == types[size_t(i)], origin, ": fields '", types_field, "' and '", k,
               "' disagree at layer ", i);
      types[size_t(i)] = kind;
    }
    types_field = k;
  }
  c.attention_layers.clear();
  c.mamba2_layers.clear();
  for (int i = 0; i < c.n_layers; ++i) (types[size_t(i)] == "attention" ? c.attention_layers : c.mamba2_layers).push_back(i);

  // Attention: GQA, RoPE only with position_embedding_type "rope", scores q.k * attention_multiplier.
  c.n_heads = f.has("num_attention_heads") ? int(f.get_int("num_attention_heads", 1, kMaxHeads)) : 32;
  c.n_kv_heads = present(f, "num_key_value_heads") ? int(f.get_int("num_key_value_heads", 1, kMaxHeads)) : c.n_heads;
  // position_embedding_type "rope": transformers 5's GraniteMoeHybridModel builds a default rotary
  // embedding over the whole head (rotate-half, rope_theta) and its attention applies it; null or
  // "nope": no positional encoding (the published Granite 4.0-H models).
  if (present(f, "position_embedding_type")) {
    const std::string p = f.get_string("position_embedding_type");
    HM_CHECK(p == "nope" || p == "rope", origin, ": field 'position_embedding_type' is \"", p,
             "\": only null, \"nope\" or \"rope\" is supported");
    c.rope = p == "rope";
  }
  if (c.rope) {
    c.rope_theta = 10000.0f;  // GraniteMoeHybridConfig's default
    c.rope_dim = 0;           // the whole head
    const auto rope_fields = [&](const JsonFields& r) {
      for (const char* k : {"rope_type", "type"})
        if (present(r, k) && (&r != &f || std::string(k) == "rope_type"))
          HM_CHECK(r.get_string(k) == "default", origin, ": field '", r.field(k), "' is ", r.at(k).dump(),
                   ": only \"default\" RoPE (no scaling) is supported");
      if (present(r, "rope_theta")) c.rope_theta = float(r.get_double("rope_theta", 1e-30, kMaxRopeTheta));
      if (present(r, "partial_rotary_factor"))
        HM_CHECK(r.get_double("partial_rotary_factor", 0, 1) == 1.0, origin, ": field '",
                 r.field("partial_rotary_factor"), "' is ", r.at("partial_rotary_factor").dump(),
                 ": only the whole head (1.0) is supported for Granite's RoPE");
    };
    rope_fields(f);
    if (present(f, "rope_parameters")) rope_fields(f.object("rope_parameters"));
    if (present(f, "rope_scaling")) rope_fields(f.object("rope_scaling"));
  }
  const double attn_mult = f.has("attention_multiplier") ? f.get_double("attention_multiplier", 1e-30, 1e30) : 1.0;
  if (!c.attention_layers.empty()) {
    HM_CHECK(c.d_model % c.n_heads == 0, origin, ": field 'num_attention_heads' (", c.n_heads,
             ") must divide 'hidden_size' (", c.d_model, ")");
    HM_CHECK(c.n_heads % c.n_kv_heads == 0, origin, ": field 'num_key_value_heads' (", c.n_kv_heads,
             ") must divide 'num_attention_heads' (", c.n_heads, ")");
    if (present(f, "head_dim"))
      HM_CHECK(f.get_int("head_dim", 1, kMaxDModel) == c.head_dim(), origin, ": field 'head_dim' (",
               f.at("head_dim").dump(), ") differs from hidden_size / num_attention_heads = ", c.head_dim(),
               ": not supported");
    c.attention_scale = float(attn_mult);
  } else {  // no attention layer: keep our defaults so the config round-trips
    c.n_heads = ModelConfig{}.n_heads;
    c.n_kv_heads = ModelConfig{}.n_kv_heads;
  }

  // The FFN: experts of width intermediate_size plus the shared MLP, or the shared MLP alone.
  const int experts = f.has("num_local_experts") ? int(f.get_int("num_local_experts", 0, kMaxExperts)) : 8;
  const int shared = f.has("shared_intermediate_size") ? int(f.get_int("shared_intermediate_size", 0, kMaxDff)) : 1024;
  c.moe_layers.clear();
  if (experts > 0) {
    c.d_ff = f.has("intermediate_size") ? int(f.get_int("intermediate_size", 1, kMaxDff)) : 11008;
    c.moe_experts = experts;
    c.moe_top_k = f.has("num_experts_per_tok") ? int(f.get_int("num_experts_per_tok", 1, kMaxExperts)) : 2;
    HM_CHECK(c.moe_top_k <= experts, origin, ": field 'num_experts_per_tok' (", c.moe_top_k,
             ") exceeds 'num_local_experts' (", experts, ")");
    c.moe_renormalize = true;  // a softmax over the top-k logits: the top-k probabilities renormalized
    c.moe_shared_ff = shared;
    for (int i = 0; i < c.n_layers; ++i) c.moe_layers.push_back(i);
  } else {
    HM_CHECK(shared > 0, origin, ": fields 'num_local_experts' and 'shared_intermediate_size' are both 0: no FFN "
             "at all is not supported");
    c.d_ff = shared;  // the shared MLP is a dense SwiGLU MLP
  }

  // Granite's scalings.
  const auto multiplier = [&](const char* k) {
    return f.has(k) ? float(f.get_double(k, 1e-30, 1e30)) : 1.0f;
  };
  c.embedding_multiplier = multiplier("embedding_multiplier");
  c.residual_multiplier = multiplier("residual_multiplier");
  c.logits_scaling = multiplier("logits_scaling");

  mamba2_fields(f, origin, info);
  // Ignored as transformers' forward ignores them: rope_parameters / rope_theta when there is no
  // RoPE, initializer_range, time_step_min/max (initialization), attention_dropout, output_router_logits,
  // router_aux_loss_coef (training only), use_cache, max_position_embeddings, token ids, dtype.
  return info;
}

// The attention heads of Falcon-H1 and Nemotron-H: GQA with an explicit head_dim (absent: `dflt`,
// 0 = hidden_size / heads), stored in our config only when it is not hidden_size / heads.
void explicit_head_fields(const JsonFields& f, const std::string& origin, int64_t dflt, ModelConfig& c) {
  c.n_heads = f.has("num_attention_heads") ? int(f.get_int("num_attention_heads", 1, kMaxHeads)) : 32;
  c.n_kv_heads = present(f, "num_key_value_heads") ? int(f.get_int("num_key_value_heads", 1, kMaxHeads)) : 8;
  if (f.has("num_key_value_heads") && f.at("num_key_value_heads").is_null()) c.n_kv_heads = c.n_heads;
  HM_CHECK(c.n_heads % c.n_kv_heads == 0, origin, ": field 'num_key_value_heads' (", c.n_kv_heads,
           ") must divide 'num_attention_heads' (", c.n_heads, ")");
  const int64_t hd = present(f, "head_dim") ? f.get_int("head_dim", 1, kMaxDModel) : dflt;
  if (hd == 0 || (c.d_model % c.n_heads == 0 && hd == c.d_model / c.n_heads)) {
    HM_CHECK(c.d_model % c.n_heads == 0, origin, ": field 'num_attention_heads' (", c.n_heads,
             ") must divide 'hidden_size' (", c.d_model, ") when there is no 'head_dim'");
    c.attn_head_dim = 0;
  } else {
    c.attn_head_dim = int(hd);
  }
}

// A multiplier of Falcon-H1's: a finite number (absent: 1).
double falcon_multiplier(const JsonFields& f, const char* key) {
  return present(f, key) ? f.get_double(key, -1e30, 1e30) : 1.0;
}

// FalconH1ForCausalLM (transformers' modeling_falcon_h1.py): h = embedding_multiplier * embeddings;
// every layer u = rmsnorm(h, input_layernorm), h += ssm_out * Mamba2(ssm_in * u) + attn_out *
// Attention(attn_in * u), both on the same u; then h += SwiGLU MLP(rmsnorm(h, pre_ff_layernorm)) with
// its gate and down multipliers; final_layernorm, head, logits * lm_head_multiplier. The layer is our
// True Hybrid layer in "both" mode with a Mamba-2 path (docs/MODELS.md); the constant multipliers are
// folded into the weights after loading (fold_falcon_h1). Defaults are FalconH1Config's.
HfInfo falcon_h1_info_from_json(const JsonFields& f, const std::string& origin) {
  if (f.has("model_type")) {
    const std::string t = f.get_string("model_type");
    HM_CHECK(t == "falcon_h1", origin, ": field 'model_type' must be \"falcon_h1\" for FalconH1ForCausalLM, got \"",
             t, "\"");
  }
  HfInfo info;
  info.layers_names = true;  // Jamba's names: model.layers.N.{input_layernorm, mamba, self_attn, pre_ff_layernorm, feed_forward}
  info.conv_bias_field = "mamba_conv_bias";
  info.falcon.on = true;
  ModelConfig& c = info.cfg;
  c.hybrid = "true";
  c.routing_mode = "both";  // both paths on every token, summed: no router decision
  c.state_bridges = false;
  c.attention_layers.clear();
  c.d_model = int(f.get_int("hidden_size", 1, kMaxDModel));
  c.n_layers = int(f.get_int("num_hidden_layers", 1, kMaxLayers));
  c.vocab_size = int(f.get_int("vocab_size", 1, kMaxVocab));
  c.d_ff = f.has("intermediate_size") ? int(f.get_int("intermediate_size", 1, kMaxDff)) : 14336;
  c.norm_eps = f.has("rms_norm_eps") ? f.get_float("rms_norm_eps") : 1e-5f;
  HM_CHECK(c.norm_eps > 0 && c.norm_eps < 1, origin, ": field 'rms_norm_eps' must be in (0, 1), got ", c.norm_eps);
  c.tie_embeddings = f.has("tie_word_embeddings") ? f.get_bool("tie_word_embeddings") : false;
  if (f.has("hidden_act")) {  // the conv's and the MLP's activation
    const std::string act = f.get_string("hidden_act");
    HM_CHECK(act == "silu" || act == "swish", origin, ": field 'hidden_act' is \"", act,
             "\": not supported (only \"silu\")");
  }
  for (const char* k : {"attention_bias", "mlp_bias", "mamba_proj_bias", "projectors_bias"})
    if (present(f, k))
      HM_CHECK(!f.get_bool(k), origin, ": field '", k, "' is true: biases on those projections are not supported");
  if (present(f, "layers_block_type")) {  // a property of FalconH1Config: every layer "hybrid"
    const nlohmann::json& t = f.at("layers_block_type");
    HM_CHECK(t.is_array() && t.size() == size_t(c.n_layers), origin, ": field 'layers_block_type' must list ",
             c.n_layers, " layers, got ", t.dump());
    for (size_t i = 0; i < t.size(); ++i)
      HM_CHECK(t[i] == "hybrid", origin, ": field 'layers_block_type[", i, "]' is ", t[i].dump(),
               ": Falcon-H1 layers are all \"hybrid\"");
  }
  c.true_layers.clear();
  c.mamba2_layers.clear();
  for (int i = 0; i < c.n_layers; ++i) {
    c.true_layers.push_back(i);
    c.mamba2_layers.push_back(i);
  }

  // Attention: GQA, RoPE on the whole head, explicit head_dim.
  explicit_head_fields(f, origin, 0, c);
  c.rope = true;
  bool theta = false;
  const auto rope_fields = [&](const JsonFields& r) {
    for (const char* k : {"rope_type", "type"})
      if (present(r, k))
        HM_CHECK(r.get_string(k) == "default", origin, ": field '", r.field(k), "' is ", r.at(k).dump(),
                 ": only \"default\" RoPE (no scaling) is supported");
    if (present(r, "rope_theta")) {
      c.rope_theta = float(r.get_double("rope_theta", 1e-30, kMaxRopeTheta));
      theta = true;
    }
    if (present(r, "partial_rotary_factor"))
      HM_CHECK(r.get_double("partial_rotary_factor", 0, 1) == 1.0, origin, ": field '", r.field("partial_rotary_factor"),
               "' is ", r.at("partial_rotary_factor").dump(), ": FalconH1Attention rotates the whole head");
  };
  rope_fields(f);
  if (present(f, "rope_parameters")) rope_fields(f.object("rope_parameters"));
  if (present(f, "rope_scaling")) rope_fields(f.object("rope_scaling"));
  HM_CHECK(theta, origin, ": no 'rope_theta' (top level or in 'rope_parameters'): its default differs between "
           "transformers versions, so it must be given");

  // The Mamba-2 mixer: width mamba_d_ssm (null: mamba_expand * hidden_size).
  c.d_state = f.has("mamba_d_state") ? int(f.get_int("mamba_d_state", 1, kMaxDState)) : 256;
  c.d_conv = f.has("mamba_d_conv") ? int(f.get_int("mamba_d_conv", 1, kMaxDConv)) : 4;
  const int64_t expand = f.has("mamba_expand") ? f.get_int("mamba_expand", 1, kMaxExpand) : 2;
  const int64_t inner = f.has("mamba_d_ssm") && f.at("mamba_d_ssm").is_null() ? expand * c.d_model
                        : f.has("mamba_d_ssm") ? f.get_int("mamba_d_ssm", 1, int64_t(kMaxExpand) * c.d_model)
                                               : 1024;
  if (inner % c.d_model == 0) {
    c.expand = int(inner / c.d_model);
  } else {
    c.expand = 1;
    c.inner_size = int(inner);
  }
  const int64_t heads = f.has("mamba_n_heads") ? f.get_int("mamba_n_heads", 1, inner) : 128;
  HM_CHECK(inner % heads == 0, origin, ": field 'mamba_n_heads' (", heads, ") must divide the mixer width ", inner);
  c.mamba2_head_dim = int(inner / heads);
  if (present(f, "mamba_d_head") && !(f.at("mamba_d_head").is_string() && f.get_string("mamba_d_head") == "auto"))
    HM_CHECK(f.get_int("mamba_d_head", 1, inner) == c.mamba2_head_dim, origin, ": field 'mamba_d_head' (",
             f.at("mamba_d_head").dump(), ") x 'mamba_n_heads' (", heads, ") must equal the mixer width ", inner);
  c.mamba2_groups = f.has("mamba_n_groups") ? int(f.get_int("mamba_n_groups", 1, kMaxHeads)) : 1;
  HM_CHECK(heads % c.mamba2_groups == 0, origin, ": field 'mamba_n_groups' (", c.mamba2_groups,
           ") must divide 'mamba_n_heads' (", heads, ")");
  read_time_step_limit(f, origin, c);
  if (f.has("mamba_chunk_size")) f.get_int("mamba_chunk_size", 1, INT32_MAX);  // how the scan is split only
  if (f.has("mamba_conv_bias")) info.conv_bias = f.get_bool("mamba_conv_bias");
  // The gate: y * silu(z) without a norm (mamba_rms_norm false, FalconH1Config's default), or
  // FalconH1RMSNormGated per group of width / mamba_n_groups: rmsnorm(y * silu(z)) * w when
  // mamba_norm_before_gate is false, rmsnorm(y) * w * silu(z) when it is true (its default).
  const bool rms = f.has("mamba_rms_norm") && f.get_bool("mamba_rms_norm");
  const bool before = !f.has("mamba_norm_before_gate") || f.get_bool("mamba_norm_before_gate");
  c.mamba2_gated_norm = rms;
  c.mamba2_norm_before_gate = rms && before;
  c.mamba2_norm_per_group = true;

  // The multipliers.
  HfInfo::FalconH1& m = info.falcon;
  m.ssm_in = falcon_multiplier(f, "ssm_in_multiplier");
  m.ssm_out = falcon_multiplier(f, "ssm_out_multiplier");
  m.attn_in = falcon_multiplier(f, "attention_in_multiplier");
  m.attn_out = falcon_multiplier(f, "attention_out_multiplier");
  m.key = falcon_multiplier(f, "key_multiplier");
  m.lm_head = falcon_multiplier(f, "lm_head_multiplier");
  const auto list = [&](const char* key, size_t n, double* out) {
    if (!present(f, key)) return;
    const nlohmann::json& v = f.at(key);
    HM_CHECK(v.is_array() && v.size() == n, origin, ": field '", key, "' must list ", n, " numbers, got ", v.dump());
    for (size_t k = 0; k < n; ++k) out[k] = json_to_double(v[k], -1e30, 1e30, origin, detail::cat(key, "[", k, "]"));
  };
  list("ssm_multipliers", 5, m.ssm);
  double mlp[2] = {1, 1};
  list("mlp_multipliers", 2, mlp);
  m.mlp_gate = mlp[0];
  m.mlp_down = mlp[1];
  const double emb = falcon_multiplier(f, "embedding_multiplier");
  HM_CHECK(emb > 0, origin, ": field 'embedding_multiplier' (", emb, ") must be positive");
  c.embedding_multiplier = float(emb);
  // Ignored as transformers' forward ignores them: initializer_range, time_step_min/max
  // (initialization), attention_dropout, use_cache, num_logits_to_keep, max_position_embeddings
  // (no effect with default RoPE), token ids, dtype.
  return info;
}

// Nemotron-H's MoE blocks (transformers' NemotronHMoE): a sigmoid router whose choice adds
// gate.e_score_correction_bias, group-limited top-k (n_group, topk_group), the chosen scores
// renormalized (norm_topk_prob) and times routed_scaling_factor; squared-ReLU experts without a gate
// of width moe_intermediate_size; one shared squared-ReLU MLP of moe_shared_expert_intermediate_size
// (0 or null: intermediate_size, as NemotronHMLP's `intermediate_size or config.intermediate_size`).
// Our experts' width is moe_ff, unless d_ff (the "-" blocks') is 0 or the same: then d_ff itself.
void nemotron_moe_fields(const JsonFields& f, const std::string& origin, int mlp_width, ModelConfig& c) {
  HM_CHECK(!(present(f, "n_routed_experts") && present(f, "num_local_experts")), origin,
           ": fields 'n_routed_experts' and 'num_local_experts' both given");
  const char* kx = present(f, "num_local_experts") ? "num_local_experts" : "n_routed_experts";
  c.moe_experts = present(f, kx) ? int(f.get_int(kx, 1, kMaxExperts)) : 8;
  HM_CHECK(c.moe_experts >= 2, origin, ": field '", kx, "' is ", c.moe_experts, ": NemotronHMoE scores groups by "
           "their two best experts, so it needs at least 2");
  c.moe_top_k = present(f, "num_experts_per_tok") ? int(f.get_int("num_experts_per_tok", 1, kMaxExperts)) : 2;
  HM_CHECK(c.moe_top_k <= c.moe_experts, origin, ": field 'num_experts_per_tok' (", c.moe_top_k, ") exceeds '", kx,
           "' (", c.moe_experts, ")");
  const int experts_ff = present(f, "moe_intermediate_size") ? int(f.get_int("moe_intermediate_size", 1, kMaxDff)) : 7688;
  if (c.d_ff == 0 || c.d_ff == experts_ff) {
    c.d_ff = experts_ff;
    c.moe_ff = 0;
  } else {
    c.moe_ff = experts_ff;
  }
  const int64_t shared = present(f, "moe_shared_expert_intermediate_size")
                             ? f.get_int("moe_shared_expert_intermediate_size", 0, kMaxDff)
                             : 7688;
  c.moe_shared_ff = shared > 0 ? int(shared) : mlp_width;
  if (present(f, "n_shared_experts"))  // NemotronHMoE builds one shared MLP whatever it says
    HM_CHECK(f.get_int("n_shared_experts", 0, kMaxExperts) == 1, origin, ": field 'n_shared_experts' is ",
             f.at("n_shared_experts").dump(), ": transformers' NemotronHMoE builds exactly one shared expert whatever "
             "it says, so another value is ambiguous and refused");
  HM_CHECK(!present(f, "moe_latent_size"), origin, ": field 'moe_latent_size' is ", f.at("moe_latent_size").dump(),
           ": the experts' latent projections (fc1_latent_proj / fc2_latent_proj) are not supported (null only)");
  c.moe_router = "sigmoid";
  c.moe_groups = present(f, "n_group") ? int(f.get_int("n_group", 1, kMaxExperts)) : 1;
  c.moe_topk_groups = present(f, "topk_group") ? int(f.get_int("topk_group", 1, kMaxExperts)) : 1;
  HM_CHECK(c.moe_experts % c.moe_groups == 0, origin, ": field 'n_group' (", c.moe_groups, ") must divide '", kx,
           "' (", c.moe_experts, ")");
  HM_CHECK(c.moe_topk_groups <= c.moe_groups, origin, ": field 'topk_group' (", c.moe_topk_groups,
           ") exceeds 'n_group' (", c.moe_groups, ")");
  const int per = c.moe_experts / c.moe_groups;
  HM_CHECK(per >= 2, origin, ": fields '", kx, "' / 'n_group' leave ", per, " expert per group: NemotronHMoE scores a "
           "group by its two best experts, so each group needs at least 2");
  HM_CHECK(c.moe_top_k <= c.moe_topk_groups * per, origin, ": field 'num_experts_per_tok' (", c.moe_top_k,
           ") exceeds the ", c.moe_topk_groups * per, " experts of the 'topk_group' (", c.moe_topk_groups,
           ") groups kept: transformers would pick masked experts");
  c.moe_renormalize = present(f, "norm_topk_prob") ? f.get_bool("norm_topk_prob") : true;
  c.moe_scaling = present(f, "routed_scaling_factor")
                      ? float(f.get_double("routed_scaling_factor", 1e-30, 1e30))
                      : 1.0f;
  // Ignored: moe_shared_expert_overlap (how the shared expert is scheduled, not what it computes),
  // mtp_layers_block_type (with num_nextn_predict_layers 0, which is checked), router_aux_loss_coef.
}

// NemotronHForCausalLM (transformers' modeling_nemotron_h.py): a stack of pre-norm residual blocks
// h += mixer(rmsnorm(h)), each block one of Mamba-2 ("M"), attention ("*", no positional
// encoding), a squared-ReLU MLP ("-") or MoE ("E"); norm_f and the head. Our layer is a mixer block with
// the "-" or "E" block that follows it as its FFN (ffn_layers; moe_layers for "E"). Defaults are NemotronHConfig's.
HfInfo nemotron_h_info_from_json(const JsonFields& f, const std::string& origin) {
  if (f.has("model_type")) {
    const std::string t = f.get_string("model_type");
    HM_CHECK(t == "nemotron_h", origin, ": field 'model_type' must be \"nemotron_h\" for NemotronHForCausalLM, got \"",
             t, "\"");
  }
  HfInfo info;
  ModelConfig& c = info.cfg;
  c.hybrid = "simple";
  c.state_bridges = false;
  c.rope = false;  // NemotronHAttention applies no positional encoding
  c.d_model = int(f.get_int("hidden_size", 1, kMaxDModel));
  c.vocab_size = int(f.get_int("vocab_size", 1, kMaxVocab));
  c.norm_eps = f.has("layer_norm_epsilon") ? f.get_float("layer_norm_epsilon") : 1e-5f;
  HM_CHECK(c.norm_eps > 0 && c.norm_eps < 1, origin, ": field 'layer_norm_epsilon' must be in (0, 1), got ", c.norm_eps);
  // Never tied: transformers' NemotronHForCausalLM (5.17) keeps lm_head.weight apart even with
  // tie_word_embeddings true, saves it, and computes with it (the nemotron_h_bf16 fixture: a
  // tied config whose stored head differs from the embeddings). The published checkpoints are
  // untied. A folder without lm_head.weight is the missing-tensor error.
  if (present(f, "tie_word_embeddings")) (void)f.get_bool("tie_word_embeddings");  // type-checked, not used
  c.tie_embeddings = false;
  for (const char* k : {"attention_bias", "mlp_bias", "mamba_proj_bias", "use_bias"})
    if (present(f, k))
      HM_CHECK(!f.get_bool(k), origin, ": field '", k, "' is true: biases on those projections are not supported");
  HM_CHECK(!present(f, "sliding_window"), origin, ": field 'sliding_window' is ", f.at("sliding_window").dump(),
           ": sliding-window attention is not supported (null only)");
  if (present(f, "num_nextn_predict_layers"))
    HM_CHECK(f.get_int("num_nextn_predict_layers", 0, kMaxLayers) == 0, origin, ": field 'num_nextn_predict_layers' is ",
             f.at("num_nextn_predict_layers").dump(), ": multi-token prediction layers are not supported (0 only)");
  if (present(f, "mlp_hidden_act")) {
    const std::string act = f.get_string("mlp_hidden_act");
    HM_CHECK(act == "relu2", origin, ": field 'mlp_hidden_act' is \"", act, "\": only \"relu2\" is supported");
  }
  if (present(f, "mamba_hidden_act")) {
    const std::string act = f.get_string("mamba_hidden_act");
    HM_CHECK(act == "silu" || act == "swish", origin, ": field 'mamba_hidden_act' is \"", act,
             "\": only \"silu\" is supported");
  }

  // The block pattern: hybrid_override_pattern ("M*-E" characters) or the per-block list
  // layers_block_type / layer_types (older and newer names of each type); both present must agree.
  std::vector<char> blocks;
  std::string blocks_field;
  if (present(f, "hybrid_override_pattern")) {
    const std::string p = f.get_string("hybrid_override_pattern");
    for (size_t j = 0; j < p.size(); ++j) {
      HM_CHECK(p[j] == 'M' || p[j] == '*' || p[j] == '-' || p[j] == 'E', origin, ": field 'hybrid_override_pattern' has '",
               p[j], "' at block ", j, " (known: M, *, -, E)");
      blocks.push_back(p[j]);
    }
    blocks_field = "hybrid_override_pattern";
  }
  for (const char* k : {"layers_block_type", "layer_types"}) {
    if (!present(f, k)) continue;
    const nlohmann::json& t = f.at(k);
    HM_CHECK(t.is_array(), origin, ": field '", k, "' must be a list of block types, got ", t.dump());
    std::vector<char> b;
    for (size_t j = 0; j < t.size(); ++j) {
      const nlohmann::json& v = t[j];
      const char ch = v == "mamba" || v == "linear_attention"  ? 'M'
                      : v == "attention" || v == "full_attention" ? '*'
                      : v == "mlp"                             ? '-'
                      : v == "moe"                             ? 'E'
                                                               : '?';
      HM_CHECK(ch != '?', origin, ": field '", k, "[", j, "]' is ", v.dump(),
               " (known: mamba / linear_attention, attention / full_attention, mlp, moe)");
      b.push_back(ch);
    }
    HM_CHECK(blocks_field.empty() || b == blocks, origin, ": fields '", blocks_field, "' and '", k, "' disagree");
    blocks = b;
    blocks_field = k;
  }
  HM_CHECK(!blocks.empty(), origin, ": no block pattern (field 'hybrid_override_pattern' or 'layers_block_type')");
  if (present(f, "num_hidden_layers"))
    HM_CHECK(f.get_int("num_hidden_layers", 1, kMaxLayers) == int64_t(blocks.size()), origin, ": field "
             "'num_hidden_layers' (", f.at("num_hidden_layers").dump(), ") differs from the ", blocks.size(),
             " blocks of '", blocks_field, "'");
  bool any_mlp = false, any_moe = false;
  for (size_t j = 0; j < blocks.size(); ++j) {
    if (blocks[j] == '-' || blocks[j] == 'E') {
      const char* what = blocks[j] == '-' ? "an MLP block (-)" : "a mixture-of-experts block (E)";
      HM_CHECK(!info.nemotron_blocks.empty() && info.nemotron_blocks.back().second < 0, origin, ": field '",
               blocks_field, "' has ", what, " at block ", j, " that follows no Mamba or attention block: "
               "only an MLP or MoE block right after a mixer is supported");
      info.nemotron_blocks.back().second = int(j);
      (blocks[j] == '-' ? any_mlp : any_moe) = true;
    } else {
      info.nemotron_blocks.push_back({int(j), -1});
    }
  }
  c.n_layers = int(info.nemotron_blocks.size());
  HM_CHECK(c.n_layers <= kMaxLayers, origin, ": ", c.n_layers, " mixer blocks, more than ", kMaxLayers);
  c.attention_layers.clear();
  c.mamba2_layers.clear();
  c.ffn_layers.clear();
  c.moe_layers.clear();
  bool all_ffn = true;
  for (int i = 0; i < c.n_layers; ++i) {
    const auto [mix, ff] = info.nemotron_blocks[size_t(i)];
    (blocks[size_t(mix)] == '*' ? c.attention_layers : c.mamba2_layers).push_back(i);
    if (ff >= 0) c.ffn_layers.push_back(i);
    if (ff >= 0 && blocks[size_t(ff)] == 'E') c.moe_layers.push_back(i);
    all_ffn = all_ffn && ff >= 0;
  }
  if (all_ffn) c.ffn_layers.clear();  // every layer: the default
  c.d_ff = 0;
  c.mlp_act = "relu2";  // the MLPs', the experts' and the shared expert's activation (mlp_hidden_act)
  const int64_t mlp_width = f.has("intermediate_size") ? f.get_int("intermediate_size", 1, kMaxDff) : 21504;
  if (any_mlp) c.d_ff = int(mlp_width);
  if (any_moe) nemotron_moe_fields(f, origin, int(mlp_width), c);

  // Attention: GQA, explicit head_dim (NemotronHConfig's default 128), no RoPE, scale 1/sqrt(head_dim).
  if (!c.attention_layers.empty()) {
    explicit_head_fields(f, origin, 128, c);
  } else {  // no attention layer: keep our defaults so the config round-trips
    c.n_heads = ModelConfig{}.n_heads;
    c.n_kv_heads = ModelConfig{}.n_kv_heads;
  }

  // The Mamba-2 mixer: mamba_num_heads heads of mamba_head_dim (its width; `expand` is not read),
  // mamba_ssm's per-group gated norm, and the older mamba_* spellings NemotronHConfig still accepts.
  const auto alias = [&](const char* k, const char* old) -> const char* {
    HM_CHECK(!(present(f, k) && present(f, old)), origin, ": fields '", k, "' and '", old, "' both given");
    return present(f, old) ? old : k;
  };
  const char* kgroups = alias("n_groups", "mamba_n_groups");
  const char* kconv = alias("conv_kernel", "mamba_d_conv");
  const char* kbias = alias("use_conv_bias", "mamba_conv_bias");
  const char* kchunk = alias("chunk_size", "mamba_chunk_size");
  const char* kmin = alias("time_step_min", "mamba_dt_min");
  info.conv_bias_field = kbias;
  c.d_state = f.has("ssm_state_size") ? int(f.get_int("ssm_state_size", 1, kMaxDState)) : 128;
  c.d_conv = present(f, kconv) ? int(f.get_int(kconv, 1, kMaxDConv)) : 4;
  const int64_t heads = f.has("mamba_num_heads") ? f.get_int("mamba_num_heads", 1, kMaxHeads * 64) : 128;
  c.mamba2_head_dim = f.has("mamba_head_dim") ? int(f.get_int("mamba_head_dim", 1, kMaxDModel)) : 64;
  const int64_t inner = heads * c.mamba2_head_dim;
  HM_CHECK(inner <= int64_t(kMaxExpand) * c.d_model, origin, ": fields 'mamba_num_heads' x 'mamba_head_dim' = ",
           inner, ", more than ", kMaxExpand, " x hidden_size");
  if (inner % c.d_model == 0) {
    c.expand = int(inner / c.d_model);
  } else {
    c.expand = 1;
    c.inner_size = int(inner);
  }
  c.mamba2_groups = present(f, kgroups) ? int(f.get_int(kgroups, 1, kMaxHeads)) : 8;
  HM_CHECK(heads % c.mamba2_groups == 0, origin, ": field '", kgroups, "' (", c.mamba2_groups,
           ") must divide 'mamba_num_heads' (", heads, ")");
  c.mamba2_norm_per_group = true;  // Zamba2RMSNormGated, group_size = width / n_groups
  if (present(f, kbias)) info.conv_bias = f.get_bool(kbias);
  if (present(f, kchunk)) f.get_int(kchunk, 1, INT32_MAX);  // how the scan is split only
  // transformers' CPU path (torch_forward) clamps softplus(dt + dt_bias) from below at time_step_min
  // and never reads time_step_limit (its CUDA kernels use time_step_limit instead): we follow the
  // CPU path, which is what the fixtures record.
  c.mamba2_dt_min = present(f, kmin) ? float(f.get_double(kmin, 0, 1e30)) : 0.001f;
  c.mamba2_dt_max = INFINITY;
  if (c.mamba2_layers.empty()) {  // no Mamba layer: keep our defaults so the config round-trips
    const ModelConfig d;
    c.d_state = d.d_state;
    c.d_conv = d.d_conv;
    c.expand = d.expand;
    c.inner_size = 0;
    c.mamba2_head_dim = d.mamba2_head_dim;
    c.mamba2_groups = d.mamba2_groups;
    c.mamba2_norm_per_group = d.mamba2_norm_per_group;
    c.mamba2_dt_min = d.mamba2_dt_min;
  }
  // Ignored as transformers' forward ignores them: expand (the mixer's width is heads x head_dim),
  // time_step_max / time_step_floor / time_step_limit (initialization; see above), the moe_* and
  // n_routed_experts fields when there is no E block, residual_in_fp32, rescale_prenorm_residual,
  // initializer_range, hidden_dropout, attention_dropout, use_mamba_kernels, mamba_ssm_cache_dtype,
  // num_logits_to_keep, max_position_embeddings (no positional encoding), use_cache, token ids, dtype.
  return info;
}

// Our tensor name -> transformers' name in Jamba and Bamba (expert stacks aside: load_hf_params
// reads them per expert or fused).
std::string layers_tensor_name(const std::string& ours) {
  if (ours == "backbone.embeddings.weight") return "model.embed_tokens.weight";
  if (ours == "backbone.norm_f.weight") return "model.final_layernorm.weight";
  if (ours == "lm_head.weight") return ours;
  const std::string pre = "backbone.layers.";
  HM_ASSERT(ours.compare(0, pre.size(), pre) == 0);
  const size_t dot = ours.find('.', pre.size());
  HM_ASSERT(dot != std::string::npos);
  const std::string L = "model.layers." + ours.substr(pre.size(), dot - pre.size()) + ".";
  const std::string rest = ours.substr(dot + 1);
  if (rest == "norm.weight") return L + "input_layernorm.weight";
  if (rest == "mlp_norm.weight") return L + "pre_ff_layernorm.weight";
  for (const char* p : {"q_proj", "k_proj", "v_proj", "o_proj"})
    if (rest == std::string("mixer.") + p + ".weight") return L + "self_attn." + p + ".weight";
  if (rest.compare(0, 6, "mixer.") == 0) return L + "mamba." + rest.substr(6);
  if (rest.compare(0, 4, "mlp.") == 0) return L + "feed_forward." + rest.substr(4);
  HM_ASSERT(!"no Jamba name for this tensor");
  return {};
}

// Where one of our tensors lives in a GraniteMoeHybrid checkpoint: under one of `names` (the
// published name first, then transformers 5's in-memory one), whole, or one half of the rows of
// each slab of a fused tensor (half 0: the gate's rows, 1: the up projection's), as
// GraniteMoeSharedMLP and GraniteMoeParallelExperts split input_linear with chunk(2).
struct GraniteSource {
  std::vector<std::string> names;
  int half = -1;
};

GraniteSource granite_source(const std::string& ours) {
  if (ours == "backbone.embeddings.weight") return {{"model.embed_tokens.weight"}};
  if (ours == "backbone.norm_f.weight") return {{"model.norm.weight"}};
  if (ours == "lm_head.weight") return {{ours}};
  const std::string pre = "backbone.layers.";
  HM_ASSERT(ours.compare(0, pre.size(), pre) == 0);
  const size_t dot = ours.find('.', pre.size());
  HM_ASSERT(dot != std::string::npos);
  const std::string L = "model.layers." + ours.substr(pre.size(), dot - pre.size()) + ".";
  const std::string rest = ours.substr(dot + 1), moe = L + "block_sparse_moe.", mlp = L + "shared_mlp.";
  if (rest == "norm.weight") return {{L + "input_layernorm.weight"}};
  if (rest == "mlp_norm.weight") return {{L + "post_attention_layernorm.weight"}};
  for (const char* p : {"q_proj", "k_proj", "v_proj", "o_proj"})
    if (rest == std::string("mixer.") + p + ".weight") return {{L + "self_attn." + p + ".weight"}};
  if (rest.compare(0, 6, "mixer.") == 0) return {{L + "mamba." + rest.substr(6)}};
  if (rest == "mlp.router.weight") return {{moe + "router.layer.weight", moe + "router.weight"}};
  if (rest == "mlp.experts.gate_proj.weight" || rest == "mlp.experts.up_proj.weight")
    return {{moe + "input_linear.weight", moe + "experts.gate_up_proj"}, rest == "mlp.experts.gate_proj.weight" ? 0 : 1};
  if (rest == "mlp.experts.down_proj.weight") return {{moe + "output_linear.weight", moe + "experts.down_proj"}};
  // The shared MLP: beside the experts (shared_*), or the dense FFN when there are none.
  if (rest == "mlp.shared_gate_proj.weight" || rest == "mlp.gate_proj.weight") return {{mlp + "input_linear.weight"}, 0};
  if (rest == "mlp.shared_up_proj.weight" || rest == "mlp.up_proj.weight") return {{mlp + "input_linear.weight"}, 1};
  if (rest == "mlp.shared_down_proj.weight" || rest == "mlp.down_proj.weight") return {{mlp + "output_linear.weight"}};
  HM_ASSERT(!"no GraniteMoeHybrid name for this tensor");
  return {};
}

// Where one of our tensors lives in a Nemotron-H checkpoint: prefix P ("backbone." as published,
// or "model."), our layer i's mixer in block mix, its MLP in block ff (HfInfo::nemotron_blocks).
std::string nemotron_name(const std::string& ours, const std::vector<std::pair<int, int>>& blocks,
                          const std::string& P) {
  if (ours == "backbone.embeddings.weight") return P + "embeddings.weight";
  if (ours == "backbone.norm_f.weight") return P + "norm_f.weight";
  if (ours == "lm_head.weight") return ours;
  const std::string pre = "backbone.layers.";
  HM_ASSERT(ours.compare(0, pre.size(), pre) == 0);
  const size_t dot = ours.find('.', pre.size());
  HM_ASSERT(dot != std::string::npos);
  const auto [mix, ff] = blocks[size_t(std::stoi(ours.substr(pre.size(), dot - pre.size())))];
  const std::string rest = ours.substr(dot + 1);
  const std::string M = P + "layers." + std::to_string(mix) + ".", F = P + "layers." + std::to_string(ff) + ".";
  if (rest == "norm.weight" || rest.compare(0, 6, "mixer.") == 0) return M + rest;
  if (rest == "mlp_norm.weight") return F + "norm.weight";
  // An E block (NemotronHMoE): router, its choice bias, the shared expert. The expert stacks
  // (mlp.experts.*) are read per expert or stacked by load_hf_params.
  if (rest == "mlp.router.weight") return F + "mixer.gate.weight";
  if (rest == "mlp.router.correction_bias") return F + "mixer.gate.e_score_correction_bias";
  if (rest == "mlp.shared_up_proj.weight") return F + "mixer.shared_experts.up_proj.weight";
  if (rest == "mlp.shared_down_proj.weight") return F + "mixer.shared_experts.down_proj.weight";
  if (rest.compare(0, 4, "mlp.") == 0) return F + "mixer." + rest.substr(4);
  HM_ASSERT(!"no Nemotron-H name for this tensor");
  return {};
}

// Falcon-H1's constant multipliers folded into the loaded weights, each product formed in double
// and rounded once: in_proj rows times ssm_in_multiplier and their ssm_multipliers part (z | x | B
// | C | dt), q/k/v times attention_in_multiplier (k also key_multiplier), the MLP's gate and down
// times mlp_multipliers, the final norm's weight times lm_head_multiplier (logits = head(norm(h)) *
// m). ssm_out / attention_out are the true layers' fusion scales, filled in load_hf_params;
// embedding_multiplier is the config's.
void fold_falcon_h1(Params& p, const HfInfo::FalconH1& m) {
  const ModelConfig& c = p.config();
  const int D = c.d_model, E = c.d_inner(), GN = c.mamba2_groups * c.d_state, F = c.d_ff;
  const int hd = c.head_dim(), QW = c.n_heads * hd, KW = c.n_kv_heads * hd;
  const auto scale = [](float* w, int64_t n, double s) {
    if (s == 1.0) return;
    for (int64_t k = 0; k < n; ++k) w[k] = float(double(w[k]) * s);
  };
  for (int i = 0; i < c.n_layers; ++i) {
    const LayerWeights& w = p.layer(i);
    const int parts[5] = {E, E, GN, GN, c.mamba2_heads()};
    float* row = w.in_proj;
    for (int k = 0; k < 5; ++k) {
      scale(row, int64_t(parts[k]) * D, m.ssm_in * m.ssm[k]);
      row += int64_t(parts[k]) * D;
    }
    scale(w.wq, int64_t(QW) * D, m.attn_in);
    scale(w.wk, int64_t(KW) * D, m.attn_in * m.key);
    scale(w.wv, int64_t(KW) * D, m.attn_in);
    scale(w.w_gate, int64_t(F) * D, m.mlp_gate);
    scale(w.w_down, int64_t(D) * F, m.mlp_down);
  }
  scale(p.norm_f(), D, m.lm_head);
}

HfInfo load_hf_info(const std::string& dir) {
  const std::string path = hf_file(dir, "config.json", dir, "config.json");
  const nlohmann::json j = parse_hf_json_file(path);
  HfInfo info = hf_info_from_json(j, path);
  // The tokenizer's special ids, where they are single integers (a list of eos ids is left to
  // the tokenizer files), for our config.json (ModelConfig::bos_token_id).
  int* dst[3] = {&info.cfg.bos_token_id, &info.cfg.eos_token_id, &info.cfg.pad_token_id};
  const char* keys[3] = {"bos_token_id", "eos_token_id", "pad_token_id"};
  for (int k = 0; k < 3; ++k)
    if (j.is_object() && j.contains(keys[k]) && j[keys[k]].is_number_integer())
      *dst[k] = int(json_to_int(j[keys[k]], 0, (1 << 24) - 1, path, keys[k]));
  return info;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

nlohmann::json parse_hf_json_file(const std::string& path) {
  std::error_code ec;
  HM_CHECK(fs::is_regular_file(path, ec), path, ": not a regular file (or missing)");
  const auto size = fs::file_size(path, ec);
  HM_CHECK(!ec && int64_t(size) <= kJsonMaxFileBytes, path, ": ", size, " bytes, more than the ",
           kJsonMaxFileBytes, " a JSON file may have");
  std::ifstream in(path, std::ios::binary);
  HM_CHECK(in.good(), path, ": cannot open");
  std::ostringstream s;
  s << in.rdbuf();
  HM_CHECK(!in.bad(), path, ": read error");
  const std::string text = s.str();
  // Python's non-standard constants, outside strings, become strings; valid JSON has none there,
  // and anything else malformed gets parse_json's message.
  std::string out;
  out.reserve(text.size() + 64);
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (in_string) {
      out += ch;
      if (ch == '\\' && i + 1 < text.size()) out += text[++i];
      else if (ch == '"') in_string = false;
      continue;
    }
    if (ch == '"') in_string = true;
    bool replaced = false;
    for (const char* word : {"-Infinity", "Infinity", "NaN"}) {
      const size_t n = std::strlen(word);
      if (text.compare(i, n, word) == 0) {
        out += '"';
        out += word;
        out += '"';
        i += n - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out += ch;
  }
  return parse_json(out, path);
}

bool is_hf_model_dir(const std::string& dir) {
  std::error_code ec;
  const fs::path cfg = fs::path(dir) / "config.json";
  if (!fs::is_regular_file(cfg, ec)) return false;
  const nlohmann::json j = parse_hf_json_file(cfg.string());
  return j.is_object() && j.contains("architectures");
}

ModelConfig hf_config_from_json(const nlohmann::json& j, const std::string& origin) {
  return hf_info_from_json(j, origin).cfg;
}

ModelConfig load_hf_config(const std::string& dir) { return load_hf_info(dir).cfg; }

std::vector<std::string> hf_weight_files(const std::string& dir) {
  std::error_code ec;
  const bool single = fs::exists(fs::path(dir) / "model.safetensors", ec);
  const bool indexed = fs::exists(fs::path(dir) / kIndexFile, ec);
  HM_CHECK(!(single && indexed), dir, ": holds both model.safetensors and ", kIndexFile,
           "; which one is the model is ambiguous");
  if (single) return {hf_file(dir, "model.safetensors", dir, "model.safetensors")};
  HM_CHECK(indexed, dir, ": no weights (expected model.safetensors, or shards listed in ", kIndexFile,
           "; PyTorch .bin weights are not read)");
  const std::string index = hf_file(dir, kIndexFile, dir, kIndexFile);
  const nlohmann::json doc = parse_json_file(index);
  const JsonFields j(doc, index);
  const nlohmann::json& map = j.at("weight_map");
  HM_CHECK(map.is_object() && !map.empty(), index, ": field 'weight_map' must be a non-empty object of "
           "tensor name -> file, got ", map.type_name());
  std::vector<std::string> files;
  std::set<std::string> seen;
  for (const auto& [name, file] : map.items()) {
    HM_CHECK(file.is_string(), index, ": field 'weight_map.", name, "' must be a file name, got ", file.dump());
    const std::string f = file.get<std::string>();
    if (seen.insert(f).second) files.push_back(hf_file(dir, f, index, "weight_map." + name));
  }
  return files;
}

void load_hf_params(Params& p, const std::string& dir) {
  const HfInfo info = load_hf_info(dir);
  const ModelConfig& c = p.config();
  HM_CHECK(config_to_json(c) == config_to_json(info.cfg), "load_hf_params: the Params' config is not the "
           "one ", dir, "/config.json maps to");
  std::vector<SafetensorsReader> readers;
  for (const std::string& f : hf_weight_files(dir)) readers.emplace_back(f);
  // Where each tensor lives; a name in two files is ambiguous.
  std::map<std::string, const SafetensorsReader*> where;
  for (const SafetensorsReader& r : readers)
    for (const TensorInfo& t : r.tensors()) {
      auto [it, fresh] = where.emplace(t.name, &r);
      HM_CHECK(fresh, dir, ": tensor '", t.name, "' is in both ", it->second->path(), " and ", r.path());
    }
  // The index must say where each tensor is: a stale index means the shards are not the ones it
  // was written for.
  const fs::path index = fs::path(dir) / kIndexFile;
  std::error_code ec;
  if (fs::exists(index, ec)) {
    const nlohmann::json doc = parse_json_file(index.string());  // written by huggingface_hub: strict JSON
    for (const auto& [name, file] : doc.at("weight_map").items()) {
      auto it = where.find(name);
      HM_CHECK(it != where.end(), index.string(), ": field 'weight_map.", name, "' names ", file.get<std::string>(),
               ", which does not hold that tensor");
      HM_CHECK(fs::path(it->second->path()).filename() == fs::path(file.get<std::string>()).filename(),
               index.string(), ": field 'weight_map.", name, "' says ", file.get<std::string>(),
               " but the tensor is in ", it->second->path());
    }
    for (const auto& [name, r] : where)
      HM_CHECK(doc["weight_map"].contains(name), index.string(), ": tensor '", name, "' of ", r->path(),
               " is not listed in 'weight_map'");
  }

  // Nemotron-H: the published checkpoints keep the original code's "backbone." prefix; transformers
  // names its module "model." (and may save under it).
  std::string nemotron_prefix = "backbone.";
  if (!info.nemotron_blocks.empty()) {
    const bool b = where.count("backbone.embeddings.weight") > 0, m = where.count("model.embeddings.weight") > 0;
    HM_CHECK(!(b && m), dir, ": holds both 'backbone.embeddings.weight' and 'model.embeddings.weight'; which "
             "prefix is the model's is ambiguous");
    if (m) nemotron_prefix = "model.";
  }
  std::set<std::string> used;
  // Stored tensor `name` of `shape` into out: present, of that shape, every value finite.
  const auto read = [&](const std::string& name, const std::vector<int64_t>& shape, float* out) {
    auto it = where.find(name);
    HM_CHECK(it != where.end(), dir, ": missing tensor '", name, "' (shape ", nlohmann::json(shape).dump(), ")");
    it->second->read_f32(name, shape, out);
    used.insert(name);
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    for (int64_t k = 0; k < n; ++k)
      HM_CHECK(std::isfinite(out[k]), it->second->path(), ": tensor '", name, "' holds a non-finite value at element ", k);
  };
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const ParamSpec& s = p.specs()[i];
    float* dst = p.at(i);
    const GraniteSource granite = info.granite_names ? granite_source(s.name) : GraniteSource{};
    if (info.falcon.on) {  // the true-hybrid tensors Falcon-H1's checkpoint has no copy of
      const bool fm = ends_with(s.name, "mixer.fuse_mamba"), fa = ends_with(s.name, "mixer.fuse_attn");
      if (fm || fa) {  // h += ssm_out_multiplier * mamba + attention_out_multiplier * attention
        std::fill(dst, dst + s.numel(), float(fm ? info.falcon.ssm_out : info.falcon.attn_out));
        continue;
      }
      if (ends_with(s.name, "mixer.exchange") || s.name.find("mixer.router.") != std::string::npos) {
        std::fill(dst, dst + s.numel(), 0.0f);  // no exchange; the router's output is unused in "both" mode
        continue;
      }
    }
    std::string name = info.layers_names ? layers_tensor_name(s.name) : s.name;
    if (!info.nemotron_blocks.empty()) name = nemotron_name(s.name, info.nemotron_blocks, nemotron_prefix);
    if (info.granite_names) {  // the first of its names the file holds (a second one left over is refused below)
      name = granite.names[0];
      for (const std::string& n : granite.names)
        if (where.count(n)) {
          name = n;
          break;
        }
    }
    if (!info.conv_bias && ends_with(s.name, "mixer.conv1d.bias")) {
      HM_CHECK(!where.count(name), dir, ": tensor '", name, "' is present but config.json says ",
               info.conv_bias_field, ": false");
      std::fill(dst, dst + s.numel(), 0.0f);
      continue;
    }
    if (granite.half >= 0) {  // one half of the rows of each slab of [.., 2R, C]
      std::vector<int64_t> shape = s.shape;
      const int64_t one = shape[shape.size() - 2] * shape.back(), slabs = s.numel() / one;
      shape[shape.size() - 2] *= 2;
      std::vector<float> both(size_t(2 * s.numel()));
      read(name, shape, both.data());
      for (int64_t k = 0; k < slabs; ++k)
        std::copy_n(both.data() + (2 * k + granite.half) * one, one, dst + k * one);
      continue;
    }
    if (const size_t at = name.rfind(".experts."); !info.nemotron_blocks.empty() && at != std::string::npos) {
      // Nemotron-H's expert stacks [experts, out, in]: one tensor per expert, as the published
      // checkpoints and transformers' save_pretrained store them, or transformers 5's in-memory
      // stack (experts.up_proj / experts.down_proj, same layout).
      const std::string stem = name.substr(0, at + 9), proj = name.substr(at + 9);  // e.g. "up_proj.weight"
      const std::string stacked = stem + proj.substr(0, proj.size() - 7);           // e.g. "...experts.up_proj"
      const int64_t X = s.shape[0], rows = s.shape[1], cols = s.shape[2], one = rows * cols;
      if (where.count(stem + "0." + proj) || !where.count(stacked)) {
        for (int64_t e = 0; e < X; ++e) read(stem + std::to_string(e) + "." + proj, {rows, cols}, dst + e * one);
      } else {
        read(stacked, s.shape, dst);
      }
      continue;
    }
    if (const size_t at = name.rfind(".experts."); info.layers_names && at != std::string::npos) {
      // An expert stack [experts, out, in].
      const size_t cut = at + 9;
      const std::string stem = name.substr(0, cut), proj = name.substr(cut);  // e.g. "gate_proj.weight"
      const int64_t X = s.shape[0], rows = s.shape[1], cols = s.shape[2], one = rows * cols;
      const std::string fused = stem + (proj == "down_proj.weight" ? "down_proj" : "gate_up_proj");
      if (where.count(stem + "0." + proj) || !where.count(fused)) {
        // One tensor per expert: the published checkpoints, and what save_pretrained writes.
        for (int64_t e = 0; e < X; ++e) read(stem + std::to_string(e) + "." + proj, {rows, cols}, dst + e * one);
      } else if (fused == stem + "down_proj") {  // transformers 5's in-memory layout [experts, D, F]
        read(fused, s.shape, dst);
      } else {  // gate_up_proj [experts, 2F, D]: expert e's gate rows, then its up rows
        std::vector<float> both(size_t(X * 2 * one));
        read(fused, {X, 2 * rows, cols}, both.data());
        const int64_t half = proj == "gate_proj.weight" ? 0 : one;
        for (int64_t e = 0; e < X; ++e)
          std::copy_n(both.data() + e * 2 * one + half, one, dst + e * one);
      }
      continue;
    }
    read(name, s.shape, dst);
  }
  // A tied head may still be stored (older transformers wrote it): it must be the embeddings.
  if (c.tie_embeddings && where.count("lm_head.weight")) {
    const std::vector<int64_t> shape = {c.vocab_size, c.d_model};
    std::vector<float> head(size_t(c.vocab_size) * size_t(c.d_model));
    where["lm_head.weight"]->read_f32("lm_head.weight", shape, head.data());
    HM_CHECK(std::memcmp(head.data(), p.embeddings(), head.size() * sizeof(float)) == 0, dir,
             ": tie_word_embeddings is true but tensor 'lm_head.weight' differs from '",
             info.layers_names || info.granite_names ? "model.embed_tokens.weight"
             : info.nemotron_blocks.empty()          ? "backbone.embeddings.weight"
                                                     : nemotron_prefix + "embeddings.weight", "'");
    used.insert("lm_head.weight");
  }
  if (info.falcon.on) fold_falcon_h1(p, info.falcon);
  for (const auto& [name, r] : where)
    HM_CHECK(used.count(name), r->path(), ": unexpected tensor '", name, "' (not part of the model config.json "
             "describes; biases with use_bias false, or another architecture's weights?)");
}

ModelConfig load_any_config(const std::string& dir) {
  return is_hf_model_dir(dir) ? load_hf_config(dir) : load_config((fs::path(dir) / "config.json").string());
}

std::unique_ptr<HybridModel> load_any_model(const std::string& dir, Backend& be) {
  if (!is_hf_model_dir(dir)) return load_model(dir, be);
  auto m = std::make_unique<HybridModel>(load_hf_config(dir), be);
  load_hf_params(m->params(), dir);
  m->prepare();
  return m;
}

void convert_hf_model(const std::string& hf_dir, const std::string& out_dir, const std::string& dtype) {
  const std::string stored = dtype == "f32" ? "F32" : dtype == "bf16" ? "BF16" : dtype == "f16" ? "F16" : "";
  HM_CHECK(!stored.empty(), "convert: --dtype must be f32, bf16 or f16, got \"", dtype, "\"");
  HM_CHECK(is_hf_model_dir(hf_dir), "convert: ", hf_dir, " is not a Hugging Face model folder (no config.json "
           "with 'architectures')");
  std::error_code ec;
  HM_CHECK(!fs::exists(fs::path(out_dir) / "config.json", ec), "convert: ", out_dir,
           " already holds a model (config.json); choose an empty or new folder");
  const ModelConfig c = load_hf_config(hf_dir);
  Params p(c);
  load_hf_params(p, hf_dir);
  fs::create_directories(out_dir, ec);
  HM_CHECK(!ec, "convert: cannot create ", out_dir, ": ", ec.message());
  save_params(p, (fs::path(out_dir) / "model.safetensors").string(), stored);
  if (fs::exists(fs::path(hf_dir) / "tokenizer.json", ec)) {
    const std::string src = hf_file(hf_dir, "tokenizer.json", hf_dir, "tokenizer.json");
    std::ifstream in(src, std::ios::binary);
    HM_CHECK(in.good(), "convert: cannot open ", src);
    std::ostringstream s;
    s << in.rdbuf();
    HM_CHECK(!in.bad(), "convert: read error on ", src);
    write_file_atomic((fs::path(out_dir) / "tokenizer.json").string(), s.str());
  }
  copy_chat_template_files(hf_dir, out_dir);  // the chat template and its special tokens
  // Last: a folder with config.json is a complete checkpoint.
  save_config((fs::path(out_dir) / "config.json").string(), c);
}

}  // namespace hm
