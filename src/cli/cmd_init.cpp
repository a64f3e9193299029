#include <omp.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "cli/bench_common.h"
#include "cli/commands.h"
#include "cli/device.h"
#include "cli/memory_guard.h"
#include "core/error.h"
#include "io/hf_model.h"
#include "kernels/cpu/dispatch.h"
#include "model/model.h"
#include "runtime/tokenizer.h"

namespace hm::cli {

Run add_init(CLI::App& app) {
  struct Opts { std::string preset = "seed", config, out, dtype = "F32"; uint64_t seed = 0; bool force = false; };
  auto o = std::make_shared<Opts>();
  app.add_option("--preset", o->preset, "Preset: seed, mamba, mamba2, transformer, demo, tiny")->capture_default_str();
  app.add_option("--config", o->config, "A config.json to use instead of a preset");
  app.add_option("--out", o->out, "Checkpoint directory to write")->required();
  app.add_option("--seed,-s", o->seed, "Initialization seed")->capture_default_str();
  app.add_flag("--force", o->force, "Overwrite a model already in --out");
  app.add_option("--dtype", o->dtype, "Storage type of the weights: F32, F16 or BF16")->capture_default_str();
  add_max_memory(app);
  return [o] {
    namespace fs = std::filesystem;
    const fs::path out = o->out;
    for (const char* f : {"config.json", "model.safetensors", "checkpoint"})
      HM_CHECK(o->force || !fs::exists(out / f), o->out, " already holds a model (", (out / f).string(),
               "); choose another --out, or pass --force to overwrite it");
    const ModelConfig c = o->config.empty() ? preset(o->preset) : load_config(o->config);
    check_memory(estimate_memory(c, RunShape{}), "hm init");
    auto be = make_cpu_backend();
    HybridModel m(c, *be);
    init_params(m.params(), o->seed);
    save_model(m, o->out, o->dtype);
    ByteTokenizer().save(o->out);
    std::printf("wrote %s: %lld parameters (%s), %d layers, attention at [", o->out.c_str(),
                static_cast<long long>(m.params().numel()), o->dtype.c_str(), c.n_layers);
    for (size_t i = 0; i < c.attention_layers.size(); ++i)
      std::printf("%s%d", i ? ", " : "", c.attention_layers[i]);
    std::printf("]\n");
    return 0;
  };
}

// hm info --system: this machine as the engine sees it (CPU, the kernel paths chosen, OpenBLAS,
// CUDA), what every figure in the docs is quoted beside.
static void print_system() {
  const std::string flags = " " + cpuinfo_value("flags") + " ";
  std::printf("CPU: %s, %d processors, %d OpenMP threads\n", cpuinfo_value("model name").c_str(), omp_get_num_procs(),
              omp_get_max_threads());
  std::printf("CPU features:");
  for (const char* k : {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                        "avx512_fp16", "avx_vnni"})
    if (flags.find(std::string(" ") + k + " ") != std::string::npos) std::printf(" %s", k);
  std::printf("\n");
  std::printf("CPU kernels: %s (best on this CPU: %s; HM_ISA=scalar|avx2|avx512 forces one)\n",
              cpu::isa_name(cpu::kernel_isa()), cpu::isa_name(cpu::best_isa()));
  const char* coretype = std::getenv("OPENBLAS_CORETYPE");
  std::printf("CPU linear, more than %d rows: %s (OpenBLAS core %s%s%s; HM_LINEAR=blas|blocks forces one)\n",
              cpu::kernels().linear_rows_max,
              cpu::linear_large_in_blocks() ? "the per-row kernel in blocks" : "OpenBLAS sgemm", cpu::blas_core(),
              coretype ? ", set by OPENBLAS_CORETYPE=" : "", coretype ? coretype : "");
  std::printf("CUDA: %s\n", cuda_available() ? "a device is present (--device auto picks it)"
                                              : "no device, or this build has no CUDA backend");
}

Run add_info(CLI::App& app) {
  struct Opts { std::string dir; DeviceOptions dev; bool system = false; };
  auto o = std::make_shared<Opts>();
  app.add_option("--model,-m", o->dir, "Checkpoint directory, or a training run's folder");
  app.add_flag("--system", o->system, "Print this machine's CPU, the kernel paths chosen, OpenBLAS and CUDA");
  add_device_options(app, o->dev, true);
  return [o] {
    if (o->system) {
      print_system();
      if (o->dir.empty()) return 0;
      std::printf("\n");
    }
    HM_CHECK(!o->dir.empty(), "hm info: --model is required (or --system)");
    const ModelConfig c = load_any_config(o->dir);
    const DeviceSetup dev = open_device(o->dev);
    const int64_t n = count_params(c);
    std::printf("%s\nparameters: %lld\n", config_to_json(c).dump(2).c_str(), static_cast<long long>(n));
    for (int i = 0; i < c.n_layers; ++i)
      std::printf("layer %2d: %-9s%s\n", i,
                  c.is_true(i) ? "true" : c.is_attention(i) ? "attention" : "mamba",
                  c.has_bridge(i) ? " (bridge in front)" : "");
    // Where the commands would run it (the same --device/--dtype/--kv-type resolution).
    std::printf("device: %s, dtype %s, KV cache %s\n", device_name(dev.device()), compute_dtype_name(dev.dtype),
                dev.kv_name().c_str());
    // The CPU kernels' ISA, chosen at startup (HM_ISA=scalar|avx2|avx512 forces one); more: --system.
    std::printf("CPU kernels: %s (best on this CPU: %s)\n", cpu::isa_name(cpu::kernel_isa()),
                cpu::isa_name(cpu::best_isa()));
    std::printf("weights in %s: %s (%lld bytes)\n", compute_dtype_name(dev.dtype),
                format_bytes(n * int64_t(dtype_size(dev.dtype))).c_str(),
                static_cast<long long>(n * int64_t(dtype_size(dev.dtype))));
    // The memory estimate the commands check (--max-memory): weights, and per sequence the KV
    // cache and recurrent state at a few contexts.
    std::printf("memory: weights %s (float32)\n", format_bytes(estimate_memory(c, RunShape{}).weights).c_str());
    for (int64_t ctx : {512, 2048, 8192, 32768}) {
      const MemoryEstimate e = estimate_memory(c, inference_shape(1, ctx, dev.kv_name()));
      std::printf("  one sequence at context %5lld: KV cache %s (%s) + state %s\n", static_cast<long long>(ctx),
                  format_bytes(e.kv_cache).c_str(), dev.kv_name().c_str(), format_bytes(e.state).c_str());
    }
    return 0;
  };
}

Run add_convert(CLI::App& app) {
  struct Opts { std::string in, out, dtype = "f32"; };
  auto o = std::make_shared<Opts>();
  app.add_option("HF_DIR", o->in, "A Hugging Face model folder (config.json, safetensors, tokenizer.json)")->required();
  app.add_option("--out", o->out, "Checkpoint directory to write (must not hold a model)")->required();
  app.add_option("--dtype", o->dtype, "Storage type of the weights: f32, bf16 or f16")->capture_default_str();
  return [o] {
    check_memory(estimate_memory(load_any_config(o->in), RunShape{}), "hm convert");
    convert_hf_model(o->in, o->out, o->dtype);
    std::printf("wrote %s from %s (%s)\n", o->out.c_str(), o->in.c_str(), o->dtype.c_str());
    return 0;
  };
}

}  // namespace hm::cli
