#include "model/packed_checkpoint.h"

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
  HM_CHECK(v == "bf16" || v == "q8_0" || v == "q4_0", "checkpoint: ", r.path(), ": metadata ",
           kWeightFormatKey, " is '", v, "' (expected bf16, q8_0 or q4_0)");
  return weight_format_from_name(v);
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
  const Params& p = m.params();
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
    } else if (f == DType::BF16) {
      ts.push_back({s.name, DType::BF16, s.shape, it->second.data()});
    } else {
      ts.push_back({s.name, DType::U8, {s.shape[0], int64_t(it->second.size()) / s.shape[0]}, it->second.data()});
    }
  }
  write_safetensors(path, ts, {{"format", "pt"}, {"producer", "hybrid-mamba"},
                               {kWeightFormatKey, compute_dtype_name(f)}});
}

}  // namespace hm
