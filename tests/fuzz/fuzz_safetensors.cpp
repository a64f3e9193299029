// Fuzz target: a safetensors file through SafetensorsReader, then every tensor it accepted read
// raw and as float32. Bad files must end in hm::Error; anything else (a crash, a sanitizer
// report, another exception, an accepted tensor outside the file) is a finding.
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = hm::fuzz::scratch_dir() / "model.safetensors";
  hm::fuzz::write_file(path, std::string_view(reinterpret_cast<const char*>(data), size));
  try {
    hm::SafetensorsReader r(path.string());
    for (const hm::TensorInfo& t : r.tensors()) {
      // The reader validated every extent against the file, so these sizes are bounded by it.
      HM_FUZZ_REQUIRE(t.begin <= t.end && t.end <= size);
      HM_FUZZ_REQUIRE(uint64_t(t.numel()) * hm::dtype_size(t.dtype) == t.end - t.begin);
      HM_FUZZ_REQUIRE(r.find(t.name) == &t);
      std::vector<uint8_t> raw(t.end - t.begin);
      r.read_raw(t, raw.data());
      std::vector<float> f(size_t(t.numel()));
      try {
        r.read_f32(t.name, t.shape, f.data());
      } catch (const hm::Error&) {
        // A dtype that does not convert to float32.
      }
    }
  } catch (const hm::Error&) {
  }
  return 0;
}
