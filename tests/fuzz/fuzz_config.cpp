// Fuzz target: a config.json through load_config (parse, strict conversion, validate). Bad files
// must end in hm::Error. A config it accepts must give every derived size without error and
// survive save and load unchanged.
#include <cstdint>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "fuzz_util.h"
#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = hm::fuzz::scratch_dir() / "config.json";
  hm::fuzz::write_file(path, std::string_view(reinterpret_cast<const char*>(data), size));
  hm::ModelConfig c;
  try {
    c = hm::load_config(path.string());
  } catch (const hm::Error&) {
    return 0;
  }
  // Accepted: nothing below may throw.
  HM_FUZZ_REQUIRE(hm::count_params(c) > 0);
  for (int i = 0; i < c.n_layers; ++i) {
    HM_FUZZ_REQUIRE(c.inner_dim(i) > 0);
    (void)c.has_bridge(i);
  }
  HM_FUZZ_REQUIRE(c.resolved_dt_rank() > 0 && c.head_dim() > 0 && c.d_inner() > 0);
  const nlohmann::json j = hm::config_to_json(c);
  hm::save_config(path.string(), c);
  HM_FUZZ_REQUIRE(hm::config_to_json(hm::load_config(path.string())) == j);
  return 0;
}
