// hm route (placeholder while it is being built).
#include "cli/commands.h"
#include "core/error.h"

namespace hm::cli {

Run add_route(CLI::App&) {
  return []() -> int { throw Error("hm route: not built yet"); };
}

}  // namespace hm::cli
