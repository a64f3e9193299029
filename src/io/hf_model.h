// Hugging Face model folders (config.json with "architectures", model.safetensors or shards
// listed in model.safetensors.index.json, tokenizer.json): what maps onto our model, how, and
// what is refused. The mapping, field by field: docs/MODELS.md.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "model/config.h"

namespace hm {

class Backend;
class HybridModel;
class Params;

// A config.json as Python's json module writes it: the bare tokens Infinity, -Infinity and NaN
// (transformers saves Mamba2Config's time_step_limit as [0.0, Infinity]) are read as the strings
// "Infinity", "-Infinity" and "NaN"; everything else is strict JSON (parse_json_file).
nlohmann::json parse_hf_json_file(const std::string& path);

// True when dir/config.json exists and holds an "architectures" list (our own config.json has
// none). Malformed JSON is an hm::Error; a missing config.json is just false.
bool is_hf_model_dir(const std::string& dir);

// Maps a Hugging Face config.json onto ModelConfig. hm::Error naming the file, the field and the
// value for an architecture we do not run or a field whose value changes the math in a way we do
// not implement (use_bias true, use_conv_bias false, hidden_act other than silu, ...).
ModelConfig hf_config_from_json(const nlohmann::json& j, const std::string& origin);
ModelConfig load_hf_config(const std::string& dir);

// The weight files of an HF folder: {"model.safetensors"}, or the distinct files of
// model.safetensors.index.json's weight_map, in order. Paths are inside dir (symlinks to
// regular files allowed, as in a Hugging Face cache snapshot).
std::vector<std::string> hf_weight_files(const std::string& dir);

// Reads an HF folder's weights into p (its config must come from load_hf_config(dir)): every
// tensor of p's layout must be present once with its shape, none may be left over (a tied
// lm_head.weight is accepted only when it equals the embeddings), and every value is finite.
// F32, F16, BF16 and F64 are converted to float32. hm::Error naming the tensor and the file.
void load_hf_params(Params& p, const std::string& dir);

// The config of our checkpoint folder or of a Hugging Face one (mapped as above).
ModelConfig load_any_config(const std::string& dir);
// Our checkpoint folder or a Hugging Face one: builds the model, fills params() and prepare()s it.
std::unique_ptr<HybridModel> load_any_model(const std::string& dir, Backend& be);

// `hm convert`: reads an HF folder and writes our checkpoint into out_dir (config.json,
// model.safetensors stored as dtype F32, BF16 or F16, tokenizer.json copied), each file
// atomically. Refuses an out_dir that already holds a config.json.
void convert_hf_model(const std::string& hf_dir, const std::string& out_dir, const std::string& dtype);

}  // namespace hm
