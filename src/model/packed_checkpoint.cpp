#include "model/packed_checkpoint.h"

#include <cmath>
#include <filesystem>
#include <set>
#include <vector>

#include "backend/tensor.h"
#include "core/error.h"
#include "kernels/quant.h"
#include "model/model.h"

namespace hm {

DType checkpoint_weight_format(const SafetensorsReader& r) {
  const auto it = r.metadata().find(kWeightFormatKey);
  if (it == r.metadata().end()) return DType::F32;
  const std::string& v = it->second;
  HM_CHECK(v == "bf16" || v == "f16" || v == "q8_0" || v == "q4_0", "checkpoint: ", r.path(), ": metadata ",
           kWeightFormatKey, " is '", v, "' (expected bf16, f16, q8_0 or q4_0)");
  return weight_format_from_name(v);
}

void read_weight_tensor(const SafetensorsReader& r, const TensorInfo& t, const ParamSpec& s, DType format,
                        float* dst) {
  if (t.dtype == DType::U8) {
    read_packed_tensor(r, t, s, format, dst);
    return;
  }
  const bool half = t.dtype == DType::BF16 || t.dtype == DType::F16;
  HM_CHECK(!half || (format != DType::BF16 && format != DType::F16) || t.dtype == format, "checkpoint: ", r.path(),
           ": tensor '", t.name, "' is ", dtype_name(t.dtype), " but the metadata's ", kWeightFormatKey, " is ",
           compute_dtype_name(format), " (its packed weights are stored as ", dtype_name(format), ")");
  r.read_f32(s.name, s.shape, dst);
}

void read_packed_tensor(const SafetensorsReader& r, const TensorInfo& t, const ParamSpec& s, DType format,
                        float* dst) {
  HM_CHECK(is_packed(format), "checkpoint: ", r.path(), ": tensor '", t.name, "' is U8 (packed rows) but ",
           "the metadata's ", kWeightFormatKey, " is ", compute_dtype_name(format), " (expected q8_0 or q4_0)");
  HM_CHECK(s.shape.size() == 2 && s.shape[0] > 0 && s.shape[1] > 0 && s.shape[1] % kQuantBlock == 0,
           "checkpoint: ", r.path(), ": tensor '", t.name, "' is stored packed but is not a weight matrix "
           "whose rows are a multiple of ", kQuantBlock, " long");
  const int rows = int(s.shape[0]), cols = int(s.shape[1]);
  const size_t rb = packed_row_bytes(format, cols);
  HM_CHECK(t.shape == std::vector<int64_t>({rows, int64_t(rb)}), "checkpoint: ", r.path(), ": tensor '",
           t.name, "': ", compute_dtype_name(format), " rows of [", rows, ", ", cols, "] weights are [", rows,
           ", ", rb, "] bytes, the file has ", t.shape.size() == 2 ? "[" + std::to_string(t.shape[0]) + ", " +
           std::to_string(t.shape[1]) + "]" : std::to_string(t.shape.size()) + " dimensions");
  std::vector<unsigned char> raw(rb * size_t(rows));
  r.read_raw(t, raw.data());
  cpu::dequantize(weight_type_of(format), dst, raw.data(), rows, cols);
}

void save_packed_params(const HybridModel& m, const std::string& path) {
  const DType f = m.weight_format();
  HM_CHECK(f != DType::F32, "save_packed_params: the model's weights are not packed");
  const Params& p = m.kept_params();  // packed weights' rows may be released: only the others are read
  // Each packed weight's bytes, read back from the backend; a tied head's copy is not stored
  // (the embedding is, in float32, and the head is packed from it on load).
  std::map<const float*, std::vector<unsigned char>> bytes;
  for (const HybridModel::PackedWeight& w : m.packed_weights()) {
    if (m.config().tie_embeddings && w.host == p.embeddings()) continue;
    const size_t n = size_t(w.t.rows) * (is_packed(f) ? packed_row_bytes(f, w.t.cols) : size_t(w.t.cols) * 2);
    std::vector<unsigned char>& b = bytes[w.host];
    b.resize(n);
    m.backend().to_host(b.data(), w.t.data, n);
  }
  std::vector<TensorToWrite> ts;
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const ParamSpec& s = p.specs()[i];
    const auto it = bytes.find(p.at(i));
    if (it == bytes.end()) {
      ts.push_back({s.name, DType::F32, s.shape, p.at(i)});
    } else if (!is_packed(f)) {  // bf16 / f16: the 16-bit values themselves
      ts.push_back({s.name, f, s.shape, it->second.data()});
    } else {
      ts.push_back({s.name, DType::U8, {s.shape[0], int64_t(it->second.size()) / s.shape[0]}, it->second.data()});
    }
  }
  write_safetensors(path, ts, {{"format", "pt"}, {"producer", "hybrid-mamba"},
                               {kWeightFormatKey, compute_dtype_name(f)}});
}

DType stored_weight_format(const std::string& dir) {
  return checkpoint_weight_format(SafetensorsReader((std::filesystem::path(dir) / "model.safetensors").string()));
}

std::unique_ptr<HybridModel> load_packed_for_inference(const std::string& dir, Backend& be, DType format) {
  namespace fs = std::filesystem;
  HM_CHECK(fs::is_directory(dir), "model: '", dir, "' is not a directory (expected a checkpoint folder "
           "with config.json and model.safetensors)");
  auto m = std::make_unique<HybridModel>(load_config((fs::path(dir) / "config.json").string()), be);
  HM_CHECK(format != DType::F32, "load_packed_for_inference: float32 is not a packed format");
  m->set_weight_format(format);
  Params& p = m->params();
  const std::string path = (fs::path(dir) / "model.safetensors").string();
  SafetensorsReader r(path);
  const DType stored = checkpoint_weight_format(r);
  std::set<std::string> names;
  for (const auto& s : p.specs()) names.insert(s.name);
  for (const auto& t : r.tensors())
    HM_CHECK(names.count(t.name), "checkpoint: ", path, ": unexpected tensor '", t.name,
             "' (not part of this config; does config.json match the weights?)");
  // The weights this format packs; the embedding table is read whole even as a tied head.
  std::map<const float*, HybridModel::LinearRef> packed;
  for (const HybridModel::LinearRef& w : m->linear_weights())
    if (m->packs(w.cols) && w.host != p.embeddings()) packed[w.host] = w;
  const WeightType t = weight_type_of(format);
  std::vector<float> tmp;
  for (size_t i = 0; i < p.specs().size(); ++i) {
    const ParamSpec& s = p.specs()[i];
    const TensorInfo* ti = r.find(s.name);
    HM_CHECK(ti != nullptr, "checkpoint: ", path, ": missing tensor '", s.name, "'");
    const auto it = packed.find(p.at(i));
    float* dst = p.at(i);
    if (it != packed.end()) {
      tmp.resize(size_t(s.numel()));
      dst = tmp.data();
    }
    read_weight_tensor(r, *ti, s, stored, dst);
    for (int64_t k = 0; k < s.numel(); ++k)
      HM_CHECK(std::isfinite(dst[k]), "checkpoint: ", path, ": tensor '", s.name,
               "' holds a non-finite value at element ", k);
    if (it == packed.end()) continue;
    const HybridModel::LinearRef& w = it->second;
    HM_CHECK(int64_t(w.rows) * w.cols == s.numel(), "checkpoint: ", path, ": tensor '", s.name,
             "' is not the [", w.rows, ", ", w.cols, "] weight the config gives");
    // Packing the dequantized rows gives back the stored bytes (docs/QUANTIZATION.md).
    std::vector<unsigned char> bytes(row_bytes(t, w.cols) * size_t(w.rows));
    cpu::quantize(t, bytes.data(), tmp.data(), w.rows, w.cols);
    m->stage_packed(w.host, std::move(bytes));
  }
  m->prepare();
  m->release_float_weights();
  return m;
}

}  // namespace hm
