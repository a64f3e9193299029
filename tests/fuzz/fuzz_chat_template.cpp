// Fuzz target: a chat template (runtime/chat_template.h) parsed and rendered. The input is the
// template, then optionally a kSplit line and the variables as a JSON object (messages,
// add_generation_prompt, ...). Any template, however broken or hostile, must end in output within
// the limits or in hm::Error: never a crash, a hang or another exception.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "fuzz_util.h"
#include "runtime/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = hm::fuzz::split_input(data, size);
  nlohmann::ordered_json vars = nlohmann::ordered_json::object();
  if (parts.size() > 1) {
    vars = nlohmann::ordered_json::parse(parts[1], nullptr, false);
    if (vars.is_discarded() || !vars.is_object()) return 0;
  }
  hm::ChatTemplateLimits lim;
  lim.max_output = 1 << 20;
  lim.max_steps = 200000;
  lim.max_depth = 64;
  try {
    hm::ChatTemplate t{std::string(parts[0]), lim};
    t.set_clock([] { return std::tm{}; });
    const std::string out = t.render(vars);
    HM_FUZZ_REQUIRE(out.size() <= lim.max_output);
  } catch (const hm::Error&) {
  }
  return 0;
}
