// --device, --dtype and --kv-type: where a command computes and in which types (docs/CUDA.md,
// "Choosing the device"). Shared by generate, eval, route, bench and info.
#pragma once
#include <memory>
#include <string>

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

// Our checkpoint folder or a Hugging Face one (load_any_model), computing in dtype on be.
std::unique_ptr<HybridModel> load_model_on(const std::string& dir, Backend& be, DType dtype);

}  // namespace hm::cli
