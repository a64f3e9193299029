#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/atomic_file.h"
#include "model/params.h"

namespace hm {

bool ModelConfig::is_attention(int layer) const {
  return std::find(attention_layers.begin(), attention_layers.end(), layer) != attention_layers.end();
}

bool ModelConfig::is_true(int layer) const {
  return std::find(true_layers.begin(), true_layers.end(), layer) != true_layers.end();
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
  auto positive = [](int v, const char* field) {
    HM_CHECK(v > 0, "config: '", field, "' must be > 0, got ", v);
  };
  HM_CHECK(c.hybrid == "simple" || c.hybrid == "true",
           "config: 'hybrid' must be \"simple\" or \"true\", got \"", c.hybrid, "\"");
  positive(c.d_model, "d_model");
  positive(c.n_layers, "n_layers");
  positive(c.vocab_size, "vocab_size");
  positive(c.d_state, "d_state");
  positive(c.d_conv, "d_conv");
  positive(c.expand, "expand");
  HM_CHECK(c.dt_rank >= 0, "config: 'dt_rank' must be \"auto\" or > 0, got ", c.dt_rank);
  positive(c.n_heads, "n_heads");
  positive(c.n_kv_heads, "n_kv_heads");
  HM_CHECK(c.d_ff >= 0, "config: 'd_ff' must be >= 0 (0 = no MLP), got ", c.d_ff);
  HM_CHECK(c.norm_eps > 0, "config: 'norm_eps' must be > 0, got ", c.norm_eps);
  HM_CHECK(c.rope_theta > 0, "config: 'rope_theta' must be > 0, got ", c.rope_theta);
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
  HM_CHECK(c.routing_chunk > 0, "config: 'routing_chunk' must be > 0, got ", c.routing_chunk);
  HM_CHECK(c.attention_budget > 0 && c.attention_budget < 1,
           "config: 'attention_budget' must be in (0, 1), got ", c.attention_budget);
  HM_CHECK(c.budget_loss_weight >= 0 && std::isfinite(c.budget_loss_weight),
           "config: 'budget_loss_weight' must be >= 0, got ", c.budget_loss_weight);
  if (c.any_attention()) {
    HM_CHECK(c.d_model % c.n_heads == 0, "config: 'd_model' (", c.d_model,
             ") must be divisible by 'n_heads' (", c.n_heads, ")");
    HM_CHECK(c.n_heads % c.n_kv_heads == 0, "config: 'n_heads' (", c.n_heads,
             ") must be divisible by 'n_kv_heads' (", c.n_kv_heads, ")");
    HM_CHECK(!c.rope || c.head_dim() % 2 == 0, "config: 'rope' needs an even head_dim, got ",
             c.head_dim());
  }
  // Sizes whose products must stay well inside int32 indexing of the kernels.
  HM_CHECK(int64_t(c.vocab_size) * c.d_model < (int64_t(1) << 31), "config: 'vocab_size' x 'd_model' is too large");
  HM_CHECK(int64_t(c.d_inner()) * c.d_model < (int64_t(1) << 30), "config: 'expand' x 'd_model' is too large");
}

namespace {

const char* type_name(const nlohmann::json& v) { return v.type_name(); }

int get_int(const nlohmann::json& j, const char* field) {
  const auto& v = j.at(field);
  HM_CHECK(v.is_number_integer(), "config: '", field, "' must be an integer, got ", type_name(v),
           " (", v.dump(), ")");
  const int64_t x = v.get<int64_t>();
  HM_CHECK(x >= INT32_MIN && x <= INT32_MAX, "config: '", field, "' is out of range: ", x);
  return int(x);
}
float get_float(const nlohmann::json& j, const char* field) {
  const auto& v = j.at(field);
  HM_CHECK(v.is_number(), "config: '", field, "' must be a number, got ", type_name(v));
  return v.get<float>();
}
bool get_bool(const nlohmann::json& j, const char* field) {
  const auto& v = j.at(field);
  HM_CHECK(v.is_boolean(), "config: '", field, "' must be true or false, got ", type_name(v));
  return v.get<bool>();
}
std::string get_string(const nlohmann::json& j, const char* field) {
  const auto& v = j.at(field);
  HM_CHECK(v.is_string(), "config: '", field, "' must be a string, got ", type_name(v));
  return v.get<std::string>();
}

std::vector<int> get_layer_list(const nlohmann::json& j, const char* field) {
  std::vector<int> out;
  if (!j.contains(field)) return out;
  const auto& a = j.at(field);
  HM_CHECK(a.is_array(), "config: '", field, "' must be a list of layer indices, got ", a.type_name());
  for (size_t k = 0; k < a.size(); ++k) {
    HM_CHECK(a[k].is_number_integer(), "config: '", field, "[", k, "]' must be an integer, got ",
             a[k].type_name());
    const int64_t x = a[k].get<int64_t>();
    HM_CHECK(x >= INT32_MIN && x <= INT32_MAX, "config: '", field, "[", k, "]' is out of range: ", x);
    out.push_back(int(x));
  }
  return out;
}

}  // namespace

ModelConfig config_from_json(const nlohmann::json& j) {
  HM_CHECK(j.is_object(), "config: must be a JSON object, got ", j.type_name());
  static const std::set<std::string> known = {
      "model_type", "hybrid",     "d_model",  "n_layers",  "attention_layers", "vocab_size",
      "d_state",    "d_conv",     "expand",   "dt_rank",   "n_heads",          "n_kv_heads",
      "rope",       "rope_theta", "d_ff",     "norm_eps",  "tie_embeddings",   "state_bridges",
      "true_layers", "routing_mode", "routing_granularity", "routing_chunk", "attention_budget",
      "budget_loss_weight"};
  for (auto it = j.begin(); it != j.end(); ++it)
    HM_CHECK(known.count(it.key()), "config: unknown field '", it.key(), "'");
  ModelConfig c;
  if (j.contains("model_type"))
    HM_CHECK(get_string(j, "model_type") == "hybrid-mamba",
             "config: 'model_type' must be \"hybrid-mamba\", got \"", get_string(j, "model_type"), "\"");
  // Required: the sizes that define a model. Everything else has the seed's default.
  for (const char* f : {"d_model", "n_layers", "vocab_size"})
    HM_CHECK(j.contains(f), "config: missing required field '", f, "'");
  if (j.contains("hybrid")) c.hybrid = get_string(j, "hybrid");
  c.d_model = get_int(j, "d_model");
  c.n_layers = get_int(j, "n_layers");
  c.vocab_size = get_int(j, "vocab_size");
  c.attention_layers = get_layer_list(j, "attention_layers");
  c.true_layers = get_layer_list(j, "true_layers");
  if (j.contains("routing_mode")) c.routing_mode = get_string(j, "routing_mode");
  if (j.contains("routing_granularity")) c.routing_granularity = get_string(j, "routing_granularity");
  if (j.contains("routing_chunk")) c.routing_chunk = get_int(j, "routing_chunk");
  if (j.contains("attention_budget")) c.attention_budget = get_float(j, "attention_budget");
  if (j.contains("budget_loss_weight")) c.budget_loss_weight = get_float(j, "budget_loss_weight");
  if (j.contains("d_state")) c.d_state = get_int(j, "d_state");
  if (j.contains("d_conv")) c.d_conv = get_int(j, "d_conv");
  if (j.contains("expand")) c.expand = get_int(j, "expand");
  if (j.contains("dt_rank")) {
    const auto& v = j.at("dt_rank");
    if (v.is_string()) {
      HM_CHECK(v.get<std::string>() == "auto", "config: 'dt_rank' must be \"auto\" or an integer, got \"",
               v.get<std::string>(), "\"");
      c.dt_rank = 0;
    } else {
      c.dt_rank = get_int(j, "dt_rank");
      HM_CHECK(c.dt_rank > 0, "config: 'dt_rank' must be \"auto\" or > 0, got ", c.dt_rank);
    }
  }
  if (j.contains("n_heads")) c.n_heads = get_int(j, "n_heads");
  c.n_kv_heads = j.contains("n_kv_heads") ? get_int(j, "n_kv_heads") : c.n_heads;
  if (j.contains("rope")) c.rope = get_bool(j, "rope");
  if (j.contains("rope_theta")) c.rope_theta = get_float(j, "rope_theta");
  if (j.contains("d_ff")) c.d_ff = get_int(j, "d_ff");
  if (j.contains("norm_eps")) c.norm_eps = get_float(j, "norm_eps");
  if (j.contains("tie_embeddings")) c.tie_embeddings = get_bool(j, "tie_embeddings");
  if (j.contains("state_bridges")) c.state_bridges = get_bool(j, "state_bridges");
  validate(c);
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
  if (c.dt_rank > 0) j["dt_rank"] = c.dt_rank; else j["dt_rank"] = "auto";
  j["n_heads"] = c.n_heads;
  j["n_kv_heads"] = c.n_kv_heads;
  j["rope"] = c.rope;
  j["rope_theta"] = c.rope_theta;
  j["d_ff"] = c.d_ff;
  j["norm_eps"] = c.norm_eps;
  j["tie_embeddings"] = c.tie_embeddings;
  j["state_bridges"] = c.state_bridges;
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
  std::ifstream f(path);
  HM_CHECK(f.good(), "config: cannot open '", path, "'");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(detail::cat("config: '", path, "' is not valid JSON: ", e.what()));
  }
  try {
    return config_from_json(j);
  } catch (const Error& e) {
    throw Error(detail::cat(e.what(), " (in ", path, ")"));
  }
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
  throw Error(detail::cat("unknown preset '", name, "' (known: seed, mamba, transformer, true-hybrid, demo, true-demo, tiny, true-tiny)"));
}

std::vector<std::string> preset_names() { return {"seed", "mamba", "transformer", "true-hybrid", "demo", "true-demo", "tiny", "true-tiny"}; }

int64_t count_params(const ModelConfig& c) {
  int64_t n = 0;
  for (const auto& p : param_layout(c)) n += p.numel();
  return n;
}

}  // namespace hm
