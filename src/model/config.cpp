#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <set>

#include <nlohmann/json.hpp>

#include "core/checked.h"
#include "core/error.h"
#include "io/atomic_file.h"
#include "io/json_read.h"
#include "model/params.h"

namespace hm {

bool ModelConfig::is_attention(int layer) const {
  return std::find(attention_layers.begin(), attention_layers.end(), layer) != attention_layers.end();
}

bool ModelConfig::is_true(int layer) const {
  return std::find(true_layers.begin(), true_layers.end(), layer) != true_layers.end();
}

bool ModelConfig::is_mamba2(int layer) const {
  return std::find(mamba2_layers.begin(), mamba2_layers.end(), layer) != mamba2_layers.end();
}

bool ModelConfig::is_moe(int layer) const {
  return std::find(moe_layers.begin(), moe_layers.end(), layer) != moe_layers.end();
}

bool ModelConfig::has_ffn(int layer) const {
  return d_ff > 0 && (ffn_layers.empty() ||
                      std::find(ffn_layers.begin(), ffn_layers.end(), layer) != ffn_layers.end());
}

bool ModelConfig::any_attention() const {
  for (int i = 0; i < n_layers; ++i)
    if (has_attention_path(i)) return true;
  return false;
}

bool ModelConfig::has_bridge(int layer) const {
  return state_bridges && layer > 0 && !is_true(layer) && !is_true(layer - 1) &&
         is_attention(layer) != is_attention(layer - 1);
}

int ModelConfig::inner_dim(int layer) const {
  return is_attention(layer) ? n_heads * head_dim() : d_inner();
}

void validate(const ModelConfig& c) {
  // Each size in [1, max] first: the derived sizes below are computed from bounded values.
  auto in_range = [](int v, int lo, int hi, const char* field) {
    HM_CHECK(v >= lo && v <= hi, "config: '", field, "' must be in [", lo, ", ", hi, "], got ", v);
  };
  HM_CHECK(c.hybrid == "simple" || c.hybrid == "true",
           "config: 'hybrid' must be \"simple\" or \"true\", got \"", c.hybrid, "\"");
  in_range(c.d_model, 1, kMaxDModel, "d_model");
  in_range(c.n_layers, 1, kMaxLayers, "n_layers");
  in_range(c.vocab_size, 1, kMaxVocab, "vocab_size");
  in_range(c.d_state, 1, kMaxDState, "d_state");
  in_range(c.d_conv, 1, kMaxDConv, "d_conv");
  in_range(c.expand, 1, kMaxExpand, "expand");
  HM_CHECK(c.inner_size >= 0 && c.inner_size <= kMaxExpand * c.d_model, "config: 'd_inner' must be in [1, ",
           kMaxExpand, " * d_model = ", kMaxExpand * c.d_model, "] (or absent: expand * d_model), got ",
           c.inner_size);
  HM_CHECK(c.dt_rank >= 0 && c.dt_rank <= kMaxDtRank, "config: 'dt_rank' must be \"auto\" or in [1, ",
           kMaxDtRank, "], got ", c.dt_rank);
  in_range(c.n_heads, 1, kMaxHeads, "n_heads");
  in_range(c.n_kv_heads, 1, kMaxHeads, "n_kv_heads");
  in_range(c.d_ff, 0, kMaxDff, "d_ff");  // 0 = no MLP
  HM_CHECK(c.norm_eps > 0 && c.norm_eps <= 1, "config: 'norm_eps' must be in (0, 1], got ", c.norm_eps);
  HM_CHECK(c.rope_dim >= 0, "config: 'rope_dim' must be >= 0 (0 = the whole head), got ", c.rope_dim);
  HM_CHECK(c.rope_theta > 0 && c.rope_theta <= kMaxRopeTheta, "config: 'rope_theta' must be in (0, ",
           kMaxRopeTheta, "], got ", c.rope_theta);
  std::set<int> seen;
  for (int i : c.attention_layers) {
    HM_CHECK(i >= 0 && i < c.n_layers, "config: 'attention_layers' index ", i, " is out of range [0, ",
             c.n_layers, ")");
    HM_CHECK(seen.insert(i).second, "config: 'attention_layers' lists layer ", i, " twice");
  }
  std::set<int> seen_true;
  for (int i : c.true_layers) {
    HM_CHECK(i >= 0 && i < c.n_layers, "config: 'true_layers' index ", i, " is out of range [0, ",
             c.n_layers, ")");
    HM_CHECK(seen_true.insert(i).second, "config: 'true_layers' lists layer ", i, " twice");
    HM_CHECK(!seen.count(i), "config: layer ", i,
             " is in both 'attention_layers' and 'true_layers' (a true-hybrid layer already "
             "holds an attention path)");
  }
  if (c.hybrid == "simple")
    HM_CHECK(c.true_layers.empty(), "config: 'true_layers' needs \"hybrid\": \"true\"");
  else
    HM_CHECK(!c.true_layers.empty(), "config: \"hybrid\": \"true\" needs at least one layer in 'true_layers'");
  HM_CHECK(c.routing_mode == "both" || c.routing_mode == "soft" || c.routing_mode == "hard",
           "config: 'routing_mode' must be \"both\", \"soft\" or \"hard\", got \"", c.routing_mode, "\"");
  HM_CHECK(c.routing_granularity == "token" || c.routing_granularity == "chunk",
           "config: 'routing_granularity' must be \"token\" or \"chunk\", got \"",
           c.routing_granularity, "\"");
  in_range(c.routing_chunk, 1, kMaxRoutingChunk, "routing_chunk");
  HM_CHECK(c.attention_budget > 0 && c.attention_budget < 1,
           "config: 'attention_budget' must be in (0, 1), got ", c.attention_budget);
  HM_CHECK(c.budget_loss_weight >= 0 && std::isfinite(c.budget_loss_weight),
           "config: 'budget_loss_weight' must be >= 0, got ", c.budget_loss_weight);
  std::set<int> seen_m2;
  for (int i : c.mamba2_layers) {
    HM_CHECK(i >= 0 && i < c.n_layers, "config: 'mamba2_layers' index ", i, " is out of range [0, ",
             c.n_layers, ")");
    HM_CHECK(seen_m2.insert(i).second, "config: 'mamba2_layers' lists layer ", i, " twice");
    HM_CHECK(!seen.count(i), "config: layer ", i, " is in both 'attention_layers' and 'mamba2_layers'");
  }
  if (!c.mamba2_layers.empty()) {
    const int E = c.d_inner();
    HM_CHECK(c.mamba2_head_dim >= 1 && c.mamba2_head_dim <= E && E % c.mamba2_head_dim == 0,
             "config: 'mamba2_head_dim' (", c.mamba2_head_dim, ") must divide d_inner (", E, ")");
    HM_CHECK(c.mamba2_groups >= 1 && c.mamba2_heads() % c.mamba2_groups == 0, "config: 'mamba2_groups' (",
             c.mamba2_groups, ") must divide the number of heads (d_inner / mamba2_head_dim = ",
             c.mamba2_heads(), ")");
    HM_CHECK(c.mamba2_dt_min >= 0 && std::isfinite(c.mamba2_dt_min) && c.mamba2_dt_max > c.mamba2_dt_min,
             "config: 'mamba2_dt_min' (", c.mamba2_dt_min, ") must be >= 0 and below 'mamba2_dt_max' (",
             c.mamba2_dt_max, ")");
  }
  std::set<int> seen_ffn;
  for (int i : c.ffn_layers) {
    HM_CHECK(i >= 0 && i < c.n_layers, "config: 'ffn_layers' index ", i, " is out of range [0, ", c.n_layers, ")");
    HM_CHECK(seen_ffn.insert(i).second, "config: 'ffn_layers' lists layer ", i, " twice");
  }
  HM_CHECK(c.ffn_layers.empty() || c.d_ff > 0, "config: 'ffn_layers' needs 'd_ff' > 0");
  HM_CHECK(c.mlp_act == "swiglu" || c.mlp_act == "relu2", "config: 'mlp_act' must be \"swiglu\" or \"relu2\", got \"",
           c.mlp_act, "\"");
  std::set<int> seen_moe;
  for (int i : c.moe_layers) {
    HM_CHECK(i >= 0 && i < c.n_layers, "config: 'moe_layers' index ", i, " is out of range [0, ", c.n_layers, ")");
    HM_CHECK(seen_moe.insert(i).second, "config: 'moe_layers' lists layer ", i, " twice");
    HM_CHECK(c.ffn_layers.empty() || seen_ffn.count(i), "config: layer ", i, " is in 'moe_layers' but not in "
             "'ffn_layers'");
  }
  in_range(c.moe_ff, 0, kMaxDff, "moe_ff");  // 0 = d_ff
  HM_CHECK(c.moe_router == "softmax" || c.moe_router == "sigmoid", "config: 'moe_router' must be \"softmax\" or "
           "\"sigmoid\", got \"", c.moe_router, "\"");
  HM_CHECK(std::isfinite(c.moe_scaling) && c.moe_scaling > 0, "config: 'moe_scaling' must be a positive number, got ",
           c.moe_scaling);
  if (!c.moe_layers.empty()) {
    HM_CHECK(c.d_ff > 0, "config: 'moe_layers' needs 'd_ff' > 0 (the width of each expert when 'moe_ff' is 0)");
    in_range(c.moe_experts, 1, kMaxExperts, "moe_experts");
    HM_CHECK(c.moe_top_k >= 1 && c.moe_top_k <= c.moe_experts, "config: 'moe_top_k' (", c.moe_top_k,
             ") must be in [1, moe_experts = ", c.moe_experts, "]");
    HM_CHECK(c.moe_groups >= 1 && c.moe_experts % c.moe_groups == 0, "config: 'moe_groups' (", c.moe_groups,
             ") must divide 'moe_experts' (", c.moe_experts, ")");
    HM_CHECK(c.moe_topk_groups >= 1 && c.moe_topk_groups <= c.moe_groups, "config: 'moe_topk_groups' (",
             c.moe_topk_groups, ") must be in [1, moe_groups = ", c.moe_groups, "]");
    if (c.moe_groups > 1) {
      const int per = c.moe_experts / c.moe_groups;
      HM_CHECK(c.moe_router == "sigmoid", "config: 'moe_groups' > 1 needs 'moe_router' \"sigmoid\"");
      HM_CHECK(per >= 2, "config: 'moe_groups' (", c.moe_groups, ") leaves ", per, " expert per group; a group is "
               "scored by its two best experts, so each needs at least 2");
      HM_CHECK(c.moe_top_k <= c.moe_topk_groups * per, "config: 'moe_top_k' (", c.moe_top_k, ") exceeds the ",
               c.moe_topk_groups * per, " experts of the 'moe_topk_groups' (", c.moe_topk_groups, ") groups kept");
    }
  }
  HM_CHECK(!c.mamba2_norm_before_gate || c.mamba2_gated_norm, "config: 'mamba2_norm_before_gate' needs "
           "'mamba2_gated_norm' (it says where the gated norm gates)");
  HM_CHECK(!c.mamba_proj_bias || c.mamba2_layers.empty(), "config: 'mamba_proj_bias' is implemented for Mamba-1 "
           "layers only, and the model has 'mamba2_layers'");
  in_range(c.moe_shared_ff, 0, kMaxDff, "moe_shared_ff");
  HM_CHECK(c.moe_shared_ff == 0 || !c.moe_layers.empty(), "config: 'moe_shared_ff' (", c.moe_shared_ff,
           ") needs 'moe_layers' (the shared expert sits beside the experts)");
  for (auto [v, field] : {std::pair{c.embedding_multiplier, "embedding_multiplier"},
                          std::pair{c.residual_multiplier, "residual_multiplier"},
                          std::pair{c.logits_scaling, "logits_scaling"}})
    HM_CHECK(std::isfinite(v) && v > 0, "config: '", field, "' must be a positive number, got ", v);
  HM_CHECK(std::isfinite(c.attention_scale) && c.attention_scale >= 0, "config: 'attention_scale' must be >= 0 "
           "(0 = 1/sqrt(head_dim)), got ", c.attention_scale);
  if (c.residual_multiplier != 1.0f) {
    HM_CHECK(c.true_layers.empty(), "config: 'residual_multiplier' is not implemented for true-hybrid layers");
    for (int i = 0; i < c.n_layers; ++i)
      HM_CHECK(!c.has_bridge(i), "config: 'residual_multiplier' is not implemented with state bridges (layer ", i,
               " has one; set 'state_bridges' false)");
  }
  HM_CHECK(std::isfinite(c.mamba_bcdt_norm_eps) && c.mamba_bcdt_norm_eps > 0 && c.mamba_bcdt_norm_eps < 1,
           "config: 'mamba_bcdt_norm_eps' must be in (0, 1), got ", c.mamba_bcdt_norm_eps);
  HM_CHECK(!c.mamba_bcdt_norm_weight || c.mamba_bcdt_norm, "config: 'mamba_bcdt_norm_weight' needs "
           "'mamba_bcdt_norm' (the weights belong to the dt, B and C norms)");
  HM_CHECK(c.attn_head_dim >= 0 && c.attn_head_dim <= kMaxDModel, "config: 'head_dim' must be in [1, ", kMaxDModel,
           "] (or absent: d_model / n_heads), got ", c.attn_head_dim);
  if (c.any_attention()) {
    HM_CHECK(c.attn_head_dim > 0 || c.d_model % c.n_heads == 0, "config: 'd_model' (", c.d_model,
             ") must be divisible by 'n_heads' (", c.n_heads, ") unless 'head_dim' is given");
    HM_CHECK(c.n_heads % c.n_kv_heads == 0, "config: 'n_heads' (", c.n_heads,
             ") must be divisible by 'n_kv_heads' (", c.n_kv_heads, ")");
    HM_CHECK(!c.rope || c.head_dim() % 2 == 0, "config: 'rope' needs an even head_dim, got ",
             c.head_dim());
    HM_CHECK(c.rope_dim == 0 || (c.rope_dim % 2 == 0 && c.rope_dim <= c.head_dim()), "config: 'rope_dim' (",
             c.rope_dim, ") must be even and at most head_dim (", c.head_dim(), "), or 0 for the whole head");
  }
  // Kernels index a weight tensor with int32: the largest (embeddings, in_proj, the MLP's)
  // must stay below kMaxTensorElements. Checked in 64 bits from the bounded fields.
  for (const ParamSpec& p : param_layout(c))
    HM_CHECK(p.numel() < kMaxTensorElements, "config: tensor '", p.name, "' would hold ", p.numel(),
             " elements, more than the ", kMaxTensorElements, " a kernel can index; reduce ",
             p.name.find("embeddings") != std::string::npos || p.name == "lm_head.weight"
                 ? "'vocab_size' or 'd_model'"
             : p.name.find("mlp") != std::string::npos ? "'d_ff' or 'd_model'"
                                                       : "'expand', 'd_state', 'dt_rank' or 'd_model'");
}

namespace {

std::vector<int> get_layer_list(const JsonFields& f, const char* key) {
  std::vector<int> out;
  if (!f.has(key)) return out;
  const auto& a = f.at(key);
  HM_CHECK(a.is_array(), f.origin(), ": field '", key, "' must be a list of layer indices, got ", a.type_name());
  for (size_t k = 0; k < a.size(); ++k)
    out.push_back(int(json_to_int(a[k], INT32_MIN, INT32_MAX, f.origin(), detail::cat(key, "[", k, "]"))));
  return out;
}

}  // namespace

ModelConfig config_from_json(const nlohmann::json& j, const std::string& origin) {
  const JsonFields f(j, origin);
  f.check_known({"model_type", "hybrid", "d_model", "n_layers", "attention_layers", "vocab_size", "d_state",
                 "d_conv", "expand", "d_inner", "dt_rank", "n_heads", "n_kv_heads", "head_dim", "rope", "rope_theta", "rope_dim", "d_ff",
                 "ffn_layers", "mlp_act", "norm_eps", "tie_embeddings", "state_bridges", "true_layers", "routing_mode",
                 "routing_granularity", "routing_chunk", "attention_budget", "budget_loss_weight",
                 "mamba2_layers", "mamba2_head_dim", "mamba2_groups", "mamba2_norm_per_group", "mamba2_gated_norm",
                 "mamba2_dt_min", "mamba2_dt_max", "mamba_bcdt_norm", "mamba_bcdt_norm_eps",
                 "mamba_bcdt_norm_weight", "mamba_proj_bias", "mamba2_norm_before_gate", "moe_layers", "moe_experts",
                 "moe_top_k", "moe_renormalize", "moe_ff", "moe_router", "moe_groups", "moe_topk_groups",
                 "moe_scaling", "moe_shared_ff", "embedding_multiplier",
                 "residual_multiplier", "attention_scale", "logits_scaling", "bos_token_id", "eos_token_id",
                 "pad_token_id"});
  ModelConfig c;
  if (f.has("model_type")) {
    const std::string t = f.get_string("model_type");
    HM_CHECK(t == "hybrid-mamba", origin, ": field 'model_type' must be \"hybrid-mamba\", got \"", t, "\"");
  }
  // Required: the sizes that define a model. Everything else has the seed's default. Sizes are
  // read with their bounds (the same as validate's, so the message shows the range).
  c.d_model = int(f.get_int("d_model", 1, kMaxDModel));
  c.n_layers = int(f.get_int("n_layers", 1, kMaxLayers));
  c.vocab_size = int(f.get_int("vocab_size", 1, kMaxVocab));
  if (f.has("hybrid")) c.hybrid = f.get_string("hybrid");
  c.attention_layers = get_layer_list(f, "attention_layers");
  c.true_layers = get_layer_list(f, "true_layers");
  if (f.has("routing_mode")) c.routing_mode = f.get_string("routing_mode");
  if (f.has("routing_granularity")) c.routing_granularity = f.get_string("routing_granularity");
  if (f.has("routing_chunk")) c.routing_chunk = int(f.get_int("routing_chunk", 1, kMaxRoutingChunk));
  if (f.has("attention_budget")) c.attention_budget = f.get_float("attention_budget");
  if (f.has("budget_loss_weight")) c.budget_loss_weight = f.get_float("budget_loss_weight");
  if (f.has("d_state")) c.d_state = int(f.get_int("d_state", 1, kMaxDState));
  if (f.has("d_conv")) c.d_conv = int(f.get_int("d_conv", 1, kMaxDConv));
  if (f.has("expand")) c.expand = int(f.get_int("expand", 1, kMaxExpand));
  if (f.has("d_inner")) c.inner_size = int(f.get_int("d_inner", 1, int64_t(kMaxExpand) * c.d_model));
  if (f.has("dt_rank")) {
    if (f.at("dt_rank").is_string()) {
      const std::string v = f.get_string("dt_rank");
      HM_CHECK(v == "auto", origin, ": field 'dt_rank' must be \"auto\" or an integer, got \"", v, "\"");
      c.dt_rank = 0;
    } else {
      c.dt_rank = int(f.get_int("dt_rank", 1, kMaxDtRank));  // 0 would silently mean "auto"
    }
  }
  if (f.has("n_heads")) c.n_heads = int(f.get_int("n_heads", 1, kMaxHeads));
  c.n_kv_heads = f.has("n_kv_heads") ? int(f.get_int("n_kv_heads", 1, kMaxHeads)) : c.n_heads;
  if (f.has("head_dim")) c.attn_head_dim = int(f.get_int("head_dim", 1, kMaxDModel));
  if (f.has("rope")) c.rope = f.get_bool("rope");
  if (f.has("rope_theta")) c.rope_theta = f.get_float("rope_theta");
  if (f.has("rope_dim")) c.rope_dim = int(f.get_int("rope_dim", 0, kMaxDModel));
  if (f.has("d_ff")) c.d_ff = int(f.get_int("d_ff", 0, kMaxDff));
  c.ffn_layers = get_layer_list(f, "ffn_layers");
  if (f.has("mlp_act")) c.mlp_act = f.get_string("mlp_act");
  if (f.has("norm_eps")) c.norm_eps = f.get_float("norm_eps");
  if (f.has("tie_embeddings")) c.tie_embeddings = f.get_bool("tie_embeddings");
  if (f.has("state_bridges")) c.state_bridges = f.get_bool("state_bridges");
  c.mamba2_layers = get_layer_list(f, "mamba2_layers");
  if (f.has("mamba2_head_dim")) c.mamba2_head_dim = int(f.get_int("mamba2_head_dim", 1, int64_t(kMaxExpand) * kMaxDModel));
  if (f.has("mamba2_groups")) c.mamba2_groups = int(f.get_int("mamba2_groups", 1, kMaxHeads));
  if (f.has("mamba2_norm_per_group")) c.mamba2_norm_per_group = f.get_bool("mamba2_norm_per_group");
  if (f.has("mamba2_gated_norm")) c.mamba2_gated_norm = f.get_bool("mamba2_gated_norm");
  if (f.has("mamba2_dt_min")) c.mamba2_dt_min = f.get_float("mamba2_dt_min");
  if (f.has("mamba2_dt_max")) c.mamba2_dt_max = f.get_float("mamba2_dt_max");  // absent: no upper limit
  if (f.has("mamba_bcdt_norm")) c.mamba_bcdt_norm = f.get_bool("mamba_bcdt_norm");
  if (f.has("mamba_bcdt_norm_eps")) c.mamba_bcdt_norm_eps = f.get_float("mamba_bcdt_norm_eps");
  if (f.has("mamba_bcdt_norm_weight")) c.mamba_bcdt_norm_weight = f.get_bool("mamba_bcdt_norm_weight");
  c.moe_layers = get_layer_list(f, "moe_layers");
  if (f.has("moe_experts")) c.moe_experts = int(f.get_int("moe_experts", 1, kMaxExperts));
  if (f.has("moe_top_k")) c.moe_top_k = int(f.get_int("moe_top_k", 1, kMaxExperts));
  if (f.has("moe_renormalize")) c.moe_renormalize = f.get_bool("moe_renormalize");
  if (f.has("moe_shared_ff")) c.moe_shared_ff = int(f.get_int("moe_shared_ff", 0, kMaxDff));
  if (f.has("moe_ff")) c.moe_ff = int(f.get_int("moe_ff", 0, kMaxDff));
  if (f.has("moe_router")) c.moe_router = f.get_string("moe_router");
  if (f.has("moe_groups")) c.moe_groups = int(f.get_int("moe_groups", 1, kMaxExperts));
  if (f.has("moe_topk_groups")) c.moe_topk_groups = int(f.get_int("moe_topk_groups", 1, kMaxExperts));
  if (f.has("moe_scaling")) c.moe_scaling = f.get_float("moe_scaling");
  if (f.has("mamba_proj_bias")) c.mamba_proj_bias = f.get_bool("mamba_proj_bias");
  if (f.has("mamba2_norm_before_gate")) c.mamba2_norm_before_gate = f.get_bool("mamba2_norm_before_gate");
  if (f.has("embedding_multiplier")) c.embedding_multiplier = f.get_float("embedding_multiplier");
  if (f.has("bos_token_id")) c.bos_token_id = int(f.get_int("bos_token_id", 0, (1 << 24) - 1));
  if (f.has("eos_token_id")) c.eos_token_id = int(f.get_int("eos_token_id", 0, (1 << 24) - 1));
  if (f.has("pad_token_id")) c.pad_token_id = int(f.get_int("pad_token_id", 0, (1 << 24) - 1));
  if (f.has("residual_multiplier")) c.residual_multiplier = f.get_float("residual_multiplier");
  if (f.has("attention_scale")) c.attention_scale = f.get_float("attention_scale");
  if (f.has("logits_scaling")) c.logits_scaling = f.get_float("logits_scaling");
  try {
    validate(c);
  } catch (const Error& e) {
    if (origin == "config") throw;
    throw Error(detail::cat(e.what(), " (in ", origin, ")"));
  }
  return c;
}

nlohmann::json config_to_json(const ModelConfig& c) {
  nlohmann::json j;
  j["model_type"] = "hybrid-mamba";
  j["hybrid"] = c.hybrid;
  j["d_model"] = c.d_model;
  j["n_layers"] = c.n_layers;
  j["attention_layers"] = c.attention_layers;
  j["vocab_size"] = c.vocab_size;
  j["d_state"] = c.d_state;
  j["d_conv"] = c.d_conv;
  j["expand"] = c.expand;
  if (c.inner_size > 0) j["d_inner"] = c.inner_size;
  if (c.dt_rank > 0) j["dt_rank"] = c.dt_rank; else j["dt_rank"] = "auto";
  j["n_heads"] = c.n_heads;
  j["n_kv_heads"] = c.n_kv_heads;
  if (c.attn_head_dim > 0) j["head_dim"] = c.attn_head_dim;
  j["rope"] = c.rope;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_dim > 0) j["rope_dim"] = c.rope_dim;
  j["d_ff"] = c.d_ff;
  if (!c.ffn_layers.empty()) j["ffn_layers"] = c.ffn_layers;
  if (c.mlp_act != "swiglu") j["mlp_act"] = c.mlp_act;
  j["norm_eps"] = c.norm_eps;
  j["tie_embeddings"] = c.tie_embeddings;
  j["state_bridges"] = c.state_bridges;
  if (!c.mamba2_layers.empty()) {
    j["mamba2_layers"] = c.mamba2_layers;
    j["mamba2_head_dim"] = c.mamba2_head_dim;
    j["mamba2_groups"] = c.mamba2_groups;
    j["mamba2_norm_per_group"] = c.mamba2_norm_per_group;
    if (!c.mamba2_gated_norm) j["mamba2_gated_norm"] = false;
    if (c.mamba2_norm_before_gate) j["mamba2_norm_before_gate"] = true;
    j["mamba2_dt_min"] = c.mamba2_dt_min;
    if (std::isfinite(c.mamba2_dt_max)) j["mamba2_dt_max"] = c.mamba2_dt_max;  // JSON has no infinity
  }
  if (!c.moe_layers.empty()) {
    j["moe_layers"] = c.moe_layers;
    j["moe_experts"] = c.moe_experts;
    j["moe_top_k"] = c.moe_top_k;
    j["moe_renormalize"] = c.moe_renormalize;
    if (c.moe_shared_ff > 0) j["moe_shared_ff"] = c.moe_shared_ff;
    // Nemotron-H's router and expert width, only where they differ from the defaults.
    if (c.moe_ff > 0) j["moe_ff"] = c.moe_ff;
    if (c.moe_router != "softmax") j["moe_router"] = c.moe_router;
    if (c.moe_groups != 1) j["moe_groups"] = c.moe_groups;
    if (c.moe_topk_groups != 1) j["moe_topk_groups"] = c.moe_topk_groups;
    if (c.moe_scaling != 1.0f) j["moe_scaling"] = c.moe_scaling;
  }
  if (c.mamba_proj_bias) j["mamba_proj_bias"] = true;
  // Granite's scalings, only where they are not the identity.
  if (c.embedding_multiplier != 1.0f) j["embedding_multiplier"] = c.embedding_multiplier;
  if (c.residual_multiplier != 1.0f) j["residual_multiplier"] = c.residual_multiplier;
  if (c.attention_scale != 0.0f) j["attention_scale"] = c.attention_scale;
  if (c.logits_scaling != 1.0f) j["logits_scaling"] = c.logits_scaling;
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_id >= 0) j["eos_token_id"] = c.eos_token_id;
  if (c.pad_token_id >= 0) j["pad_token_id"] = c.pad_token_id;
  if (c.mamba_bcdt_norm) {
    j["mamba_bcdt_norm"] = true;
    j["mamba_bcdt_norm_eps"] = c.mamba_bcdt_norm_eps;
    if (c.mamba_bcdt_norm_weight) j["mamba_bcdt_norm_weight"] = true;
  }
  if (c.hybrid == "true") {
    j["true_layers"] = c.true_layers;
    j["routing_mode"] = c.routing_mode;
    j["routing_granularity"] = c.routing_granularity;
    j["routing_chunk"] = c.routing_chunk;
    j["attention_budget"] = c.attention_budget;
    j["budget_loss_weight"] = c.budget_loss_weight;
  }
  return j;
}

ModelConfig load_config(const std::string& path) {
  return config_from_json(parse_json_file(path), path);
}

void save_config(const std::string& path, const ModelConfig& c) {
  write_file_atomic(path, config_to_json(c).dump(2) + "\n");
}

ModelConfig preset(const std::string& name) {
  ModelConfig c;  // defaults are the seed's benchmark model
  if (name == "seed") return c;
  if (name == "mamba") {
    // 12 Mamba layers (1.69M each) match seed's layers plus bridges (20.8M) within 2%.
    c.n_layers = 12;
    c.attention_layers = {};
    return c;
  }
  if (name == "transformer") {
    // Attention + SwiGLU blocks (2.62M each): 8 of them match seed's layers within 1%. The MLP
    // is what a transformer baseline has; without it, attention-only layers would need 20.
    c.n_layers = 8;
    c.attention_layers = {0, 1, 2, 3, 4, 5, 6, 7};
    c.d_ff = 1024;
    return c;
  }
  if (name == "demo") {
    // What the README's main command trains on 2 cores in a few minutes: a Simple Hybrid with
    // both bridge directions (attention at 2 and 5 of 6) and a 4096-word BPE vocabulary.
    c.d_model = 192;
    c.n_layers = 6;
    c.attention_layers = {2, 5};
    c.vocab_size = 4096;
    c.n_heads = 4;
    c.n_kv_heads = 4;
    return c;
  }
  if (name == "true-hybrid") {
    // Seed's width and vocabulary; layer 0 is Mamba (the router has little to go on over raw
    // embeddings), layers 1-7 are true hybrid (2.74M each): seed's layers within 1%.
    c.hybrid = "true";
    c.n_layers = 8;
    c.attention_layers = {};
    c.true_layers = {1, 2, 3, 4, 5, 6, 7};
    c.routing_mode = "hard";
    return c;
  }
  if (name == "true-demo") {
    // The demo's size (within 3%): a Mamba layer and three true-hybrid layers.
    c = preset("demo");
    c.hybrid = "true";
    c.n_layers = 4;
    c.attention_layers = {};
    c.true_layers = {1, 2, 3};
    c.routing_mode = "hard";
    return c;
  }
  if (name == "true-tiny") {
    // Every kind of layer and junction: Mamba, true, Mamba, attention (bridge in front), true.
    c = preset("tiny");
    c.hybrid = "true";
    c.n_layers = 5;
    c.attention_layers = {3};
    c.true_layers = {1, 4};
    c.routing_chunk = 3;
    return c;
  }
  if (name == "mamba2") {
    // Mamba-2 (SSD) layers only: 8 layers of 1.65M (16 heads of 64, d_state 64), 29.6M parameters
    // with the 32000-word embeddings.
    c.d_model = 512;
    c.n_layers = 8;
    c.attention_layers = {};
    c.mamba2_layers = {0, 1, 2, 3, 4, 5, 6, 7};
    c.d_state = 64;
    c.mamba2_head_dim = 64;
    c.mamba2_groups = 1;
    return c;
  }
  if (name == "tiny") {
    c.d_model = 32;
    c.n_layers = 4;
    c.attention_layers = {1, 3};
    c.vocab_size = 300;
    c.d_state = 8;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.d_ff = 48;
    return c;
  }
  throw Error(detail::cat("unknown preset '", name, "' (known: seed, mamba, mamba2, transformer, true-hybrid, demo, true-demo, tiny, true-tiny)"));
}

std::vector<std::string> preset_names() { return {"seed", "mamba", "mamba2", "transformer", "true-hybrid", "demo", "true-demo", "tiny", "true-tiny"}; }

std::string training_unsupported(const ModelConfig& c) {
  (void)c;  // every layer the engine has trains (docs/TRAINING.md); the check stays for new ones
  return "";
}

int64_t count_params(const ModelConfig& c) {
  int64_t n = 0;
  for (const auto& p : param_layout(c)) n = checked_add(n, p.numel(), "parameter count");
  return n;
}

}  // namespace hm
