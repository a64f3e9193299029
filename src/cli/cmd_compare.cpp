// hm compare (placeholder while it is being built).
#include "cli/commands.h"
#include "core/error.h"

namespace hm::cli {

Run add_compare(CLI::App&) {
  return []() -> int { throw Error("hm compare: not built yet"); };
}

}  // namespace hm::cli
