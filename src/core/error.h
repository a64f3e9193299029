// Two tiers of errors (docs/ARCHITECTURE.md):
//  - hm::Error: bad user input (config, checkpoint, prompt, request, corpus). The message names
//    the field, tensor or shape at fault. Callers at the edge (CLI, server) catch and report it.
//  - HM_ASSERT: a broken internal invariant. Aborts with file:line; never used for user input.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace hm {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// A failed allocation (a backend's alloc): a property of what else holds the memory at that
// moment, not of the input, so a caller that runs several jobs at once may retry it alone.
class OutOfMemory : public Error {
 public:
  explicit OutOfMemory(const std::string& what) : Error(what) {}
};

[[noreturn]] inline void assert_fail(const char* expr, const char* file, int line) {
  std::fprintf(stderr, "hm: internal error: %s at %s:%d\n", expr, file, line);
  std::abort();
}

}  // namespace hm

#define HM_ASSERT(cond) \
  do { if (!(cond)) ::hm::assert_fail(#cond, __FILE__, __LINE__); } while (0)

// Throw hm::Error with a message built from stream-able parts when cond fails.
#define HM_CHECK(cond, ...)                                   \
  do {                                                        \
    if (!(cond)) throw ::hm::Error(::hm::detail::cat(__VA_ARGS__)); \
  } while (0)

#include <sstream>
namespace hm::detail {
template <class... Ts>
std::string cat(const Ts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}
}  // namespace hm::detail
