// --device, --dtype and --kv-type: where a command computes and in which types (docs/CUDA.md,
// "Choosing the device"). Shared by generate, eval, route, bench and info.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "backend/backend.h"
#include "model/model.h"
#include "runtime/memory.h"

namespace hm::cli {

// As typed; "auto" picks per device: cuda when cuda_available(), else cpu; the backend's
// default_dtype() (f32 on the CPU, bf16 on CUDA); a KV cache of f16 on the CPU, bf16 on CUDA.
struct DeviceOptions {
  std::string device = "auto", dtype = "auto", kv = "auto";
};
// Adds --device and --dtype, and --kv-type when `kv` (commands that keep a KV cache).
void add_device_options(CLI::App& app, DeviceOptions& o, bool kv);

// What the options resolve to, with the backend made.
struct DeviceSetup {
  std::unique_ptr<Backend> be;
  DType dtype = DType::F32;
  KvType kv = KvType::F16;
  Device device() const { return be->device(); }
  std::string kv_name() const { return compute_dtype_name(kv); }
};
// hm::Error naming the option and value: an unknown name; cuda asked for where this build has no
// CUDA backend or no device is present; a type the device does not compute in.
DeviceSetup open_device(const DeviceOptions& o);
// The device --device names (auto resolved), without making a backend; the same errors.
Device resolve_device(const std::string& name);

// --weights f32|bf16|f16|q8_0|q4_0: the format the linear layers' weights are packed in at load
// (HybridModel::set_weight_format); "auto" keeps the checkpoint's own (f32 unless hm quantize
// wrote it). weight_format_option is the format named, or F32 for "auto" with *given false;
// hm::Error naming the option and value.
void add_weights_option(CLI::App& app, std::string& weights);
DType weight_format_option(const std::string& weights, bool* given);
// A comma-separated list of weight formats (hm eval --weights f32,q8_0,q4_0), none twice ("auto"
// is not one); hm::Error naming the list and the entry.
std::vector<DType> weight_formats_option(const std::string& list);

// Our checkpoint folder or a Hugging Face one (load_any_model), computing in dtype on be, its
// linear weights in `weights` ("auto": as stored). Packed weights on the CPU drop their float32
// copies unless keep_floats (for code that copies the model's parameters).
std::unique_ptr<HybridModel> load_model_on(const std::string& dir, Backend& be, DType dtype,
                                           const std::string& weights = "auto", bool keep_floats = false);

}  // namespace hm::cli
