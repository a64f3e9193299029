#include "io/paths.h"

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "core/error.h"

namespace hm {

namespace fs = std::filesystem;

std::string file_inside_dir(const std::string& dir, const std::string& name, const std::string& origin,
                            const std::string& field, bool allow_linked_files) {
  auto fail = [&](const char* why) {
    throw Error(detail::cat(origin, ": field '", field, "' (\"", name, "\") ", why));
  };
  if (name.empty()) fail("is empty");
  if (name.find('\0') != std::string::npos) fail("contains a NUL byte");
  const fs::path rel(name);
  if (rel.is_absolute()) fail("must be a file name inside the model directory, not an absolute path");
  for (const auto& part : rel)
    if (part == "..") fail("must stay inside the model directory (no '..')");
  // Symlinks: compare resolved paths. weakly_canonical resolves the part that exists.
  std::error_code ec;
  const fs::path root = fs::weakly_canonical(fs::path(dir), ec);
  if (ec) fail(detail::cat("cannot be resolved: ", ec.message()).c_str());
  const fs::path target = fs::weakly_canonical(fs::path(dir) / rel, ec);
  if (ec) fail(detail::cat("cannot be resolved: ", ec.message()).c_str());
  const auto [r, t] = std::mismatch(root.begin(), root.end(), target.begin(), target.end());
  if (allow_linked_files && (r != root.end() || t == target.end()) && fs::is_symlink(fs::path(dir) / rel, ec)) {
    if (!fs::is_regular_file(target, ec)) fail("is a symlink to something other than a regular file");
    return (fs::path(dir) / rel).string();
  }
  if (r != root.end() || t == target.end())
    fail(detail::cat("resolves to ", target.string(), ", outside the model directory ", root.string()).c_str());
  return (fs::path(dir) / rel).string();
}

}  // namespace hm
