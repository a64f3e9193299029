#include "cli/device.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "io/hf_model.h"
#include "model/packed_checkpoint.h"
#include "model/params.h"

namespace hm::cli {

void add_device_options(CLI::App& app, DeviceOptions& o, bool kv) {
  app.add_option("--device", o.device, "cpu or cuda (auto: cuda when a GPU is present, else cpu)")
      ->capture_default_str();
  app.add_option("--dtype", o.dtype, "Type of weights and activations: f32, bf16 or f16 (auto: f32 on cpu, bf16 "
                 "on cuda; cpu computes in f32 only)")->capture_default_str();
  if (kv)
    app.add_option("--kv-type", o.kv, "KV cache element type: f32, f16 or bf16 (auto: f16 on cpu, bf16 on cuda; "
                   "cpu: f32 or f16)")->capture_default_str();
}

Device resolve_device(const std::string& name) {
  if (name == "auto") return cuda_available() ? Device::CUDA : Device::CPU;
  Device d;
  try {
    d = device_from_name(name);
  } catch (const Error&) {
    throw Error(detail::cat("--device must be cpu, cuda or auto, got '", name, "'"));
  }
  if (d == Device::CUDA) {
    const auto compiled = compiled_devices();
    HM_CHECK(std::find(compiled.begin(), compiled.end(), Device::CUDA) != compiled.end(),
             "--device cuda: this build has no CUDA backend (configure with -DHM_CUDA=ON); use --device cpu");
    HM_CHECK(cuda_available(), "--device cuda: no usable CUDA device is present (or the driver is too old for "
             "this build); use --device cpu");
  }
  return d;
}

DeviceSetup open_device(const DeviceOptions& o) {
  // Every name is checked before the device is opened.
  const Device d = resolve_device(o.device);
  auto type = [](const std::string& opt, const std::string& v) {
    try {
      return compute_dtype_from_name(v);
    } catch (const Error&) {
      throw Error(detail::cat(opt, " must be f32, bf16, f16 or auto, got '", v, "'"));
    }
  };
  const bool auto_dtype = o.dtype == "auto", auto_kv = o.kv == "auto";
  const DType dtype = auto_dtype ? DType::F32 : type("--dtype", o.dtype);
  const DType kv = auto_kv ? DType::F16 : type("--kv-type", o.kv);
  DeviceSetup s;
  s.be = make_backend(d);
  const char* dev = device_name(d);
  s.dtype = auto_dtype ? s.be->default_dtype() : dtype;
  s.kv = auto_kv ? (d == Device::CUDA ? KvType::BF16 : KvType::F16) : kv;
  HM_CHECK(s.be->supports(s.dtype), "--dtype ", compute_dtype_name(s.dtype), ": the ", dev,
           " backend does not compute in this type", d == Device::CPU ? " (cpu: f32 only)" : "");
  HM_CHECK(s.be->supports_kv(s.kv), "--kv-type ", compute_dtype_name(s.kv), ": the ", dev,
           " backend has no KV cache of this type", d == Device::CPU ? " (cpu: f32 or f16)" : "");
  return s;
}

void add_weights_option(CLI::App& app, std::string& weights) {
  app.add_option("--weights", weights, "Format of the linear layers' weights: f32, bf16, f16, q8_0 or q4_0, packed at "
                 "load (cpu only; auto: as the checkpoint stores them)")->capture_default_str();
}

DType weight_format_option(const std::string& weights, bool* given) {
  *given = weights != "auto";
  if (!*given) return DType::F32;
  try {
    return weight_format_from_name(weights);
  } catch (const Error&) {
    throw Error(detail::cat("--weights must be f32, bf16, f16, q8_0, q4_0 or auto, got '", weights, "'"));
  }
}

std::vector<DType> weight_formats_option(const std::string& list) {
  std::vector<DType> out;
  for (size_t at = 0; at <= list.size();) {
    const size_t end = std::min(list.find(',', at), list.size());
    const std::string name = list.substr(at, end - at);
    DType f = DType::F32;
    try {
      f = weight_format_from_name(name);
    } catch (const Error& e) {
      throw Error(detail::cat("--weights '", list, "': ", e.what()));
    }
    HM_CHECK(std::find(out.begin(), out.end(), f) == out.end(), "--weights '", list, "': ", name, " is given twice");
    out.push_back(f);
    at = end + 1;
  }
  return out;
}

std::unique_ptr<HybridModel> load_model_on(const std::string& dir, Backend& be, DType dtype,
                                           const std::string& weights, bool keep_floats) {
  namespace fs = std::filesystem;
  bool given = false;
  const DType wf = weight_format_option(weights, &given);
  // Packed weights on the CPU: packed as they are read, never holding their float32 copies.
  if (!keep_floats && be.device() == Device::CPU && dtype == DType::F32 && !is_hf_model_dir(dir) &&
      fs::is_directory(dir)) {
    const DType f = given ? wf : stored_weight_format(dir);
    if (f != DType::F32 && be.supports_weight_format(f)) return load_packed_for_inference(dir, be, f);
  }
  if (dtype == be.default_dtype() && !given) return load_any_model(dir, be);
  std::unique_ptr<HybridModel> m;
  DType stored = DType::F32;
  if (is_hf_model_dir(dir)) {
    m = std::make_unique<HybridModel>(load_hf_config(dir), be, dtype);
    load_hf_params(m->params(), dir);
  } else {
    HM_CHECK(fs::is_directory(dir), "model: '", dir, "' is not a directory (expected a checkpoint folder "
             "with config.json and model.safetensors)");
    m = std::make_unique<HybridModel>(load_config((fs::path(dir) / "config.json").string()), be, dtype);
    stored = load_params(m->params(), (fs::path(dir) / "model.safetensors").string());
  }
  m->set_weight_format(given ? wf : stored);
  m->prepare();
  return m;
}

}  // namespace hm::cli
