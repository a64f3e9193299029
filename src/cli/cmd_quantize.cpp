// hm quantize: a checkpoint whose linear weights are stored packed (model/packed_checkpoint.h,
// docs/QUANTIZATION.md), so later commands load them without packing again.
#include <cstdio>
#include <filesystem>
#include <memory>

#include "backend/backend.h"
#include "cli/commands.h"
#include "cli/memory_guard.h"
#include "core/error.h"
#include "io/hf_model.h"
#include "model/model.h"
#include "runtime/chat_template.h"
#include "runtime/tokenizer.h"

namespace hm::cli {

Run add_quantize(CLI::App& app) {
  struct Opts { std::string model, out, type; bool force = false; };
  auto o = std::make_shared<Opts>();
  app.add_option("model,--model,-m", o->model, "Checkpoint directory (ours or a Hugging Face folder)")->required();
  app.add_option("--out,-o", o->out, "Checkpoint directory to write")->required();
  app.add_option("--type", o->type, "Format of the linear layers' weights: q8_0, q4_0, bf16 or f16")->required();
  app.add_flag("--force", o->force, "Overwrite a model already in --out");
  add_max_memory(app);
  return [o] {
    namespace fs = std::filesystem;
    HM_CHECK(o->type == "q8_0" || o->type == "q4_0" || o->type == "bf16" || o->type == "f16",
             "hm quantize --type must be q8_0, q4_0, bf16 or f16, got '", o->type, "'");
    const DType f = weight_format_from_name(o->type);
    std::error_code ec;
    HM_CHECK(fs::weakly_canonical(o->model, ec) != fs::weakly_canonical(o->out, ec),
             "hm quantize: --out ", o->out, " is the input checkpoint; choose another folder");
    for (const char* name : {"config.json", "model.safetensors"})
      HM_CHECK(o->force || !fs::exists(fs::path(o->out) / name), o->out, " already holds a model (",
               (fs::path(o->out) / name).string(), "); choose another --out, or pass --force to overwrite it");
    RunShape shape;  // the float32 model and its packed copies
    shape.weight_format = f;
    check_memory(estimate_memory(load_any_config(o->model), shape), "hm quantize");
    auto be = make_cpu_backend();
    auto m = load_any_model(o->model, *be);
    const int64_t before = m->weight_bytes();
    m->set_weight_format(f);
    m->prepare();
    save_model(*m, o->out);
    if (fs::exists(fs::path(o->model) / "tokenizer.json")) load_tokenizer(o->model)->save(o->out);
    copy_chat_template_files(o->model, o->out);
    std::printf("wrote %s: %zu linear weights in %s, %.1f MB of weights (from %.1f MB)\n", o->out.c_str(),
                m->packed_weights().size(), o->type.c_str(), double(m->weight_bytes()) / 1e6, double(before) / 1e6);
    return 0;
  };
}

}  // namespace hm::cli
