// Fuzz target: tokenizer.json's regexes (runtime/text_regex.h). The input is a pattern and a
// text split by hm::fuzz::kSplit (no split: the whole input is both). A pattern we do not support
// and a text that backtracks too long must end in hm::Error; a pattern that compiles must give
// matches in order, inside the text and not overlapping. Invalid UTF-8 is the tokenizer's to
// refuse before it gets here, so such texts are skipped.
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "fuzz_util.h"
#include "runtime/text_regex.h"
#include "runtime/tokenizer.h"
#include "runtime/unicode.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = hm::fuzz::split_input(data, size);
  const std::string_view pattern = parts[0], text = parts.size() > 1 ? parts[1] : parts[0];
  if (!hm::is_valid_utf8(text) || text.size() > 4096) return 0;
  std::vector<char32_t> cps;
  hm::to_code_points(text, cps, nullptr);
  try {
    const hm::TextRegex re(pattern);
    size_t prev_end = 0;
    bool first = true;
    for (const auto& [b, e] : re.find_all(cps)) {
      HM_FUZZ_REQUIRE(b <= e && e <= cps.size());
      HM_FUZZ_REQUIRE(first || b >= prev_end);
      first = false;
      prev_end = e;
    }
  } catch (const hm::Error&) {
  }
  return 0;
}
