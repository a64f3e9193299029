// Helpers shared by the fuzz targets (tests/fuzz/fuzz_*.cpp): one scratch directory per process
// for loaders that read files, and the split of one input into several files.
#pragma once
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

namespace hm::fuzz {

// A fresh directory under $TMPDIR (or /tmp), made on first use and reused for every input of
// the process, so a run costs no directory creation per input. Removed at normal exit.
inline const std::filesystem::path& scratch_dir() {
  struct Dir {
    std::filesystem::path path;
    Dir() {
      const char* tmp = std::getenv("TMPDIR");
      std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/hm_fuzz.XXXXXX";
      if (!::mkdtemp(templ.data())) {
        std::perror("hm fuzz: mkdtemp");
        std::abort();
      }
      path = templ;
    }
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Dir dir;
  return dir.path;
}

inline void write_file(const std::filesystem::path& p, std::string_view bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
  if (!f) {
    std::fprintf(stderr, "hm fuzz: cannot write %s\n", p.c_str());
    std::abort();
  }
}

// Parts of an input that holds several files: separated by kSplit lines. The seed corpus
// files are made this way from real files (tests/fuzz/README.md).
constexpr std::string_view kSplit = "\n--hm-fuzz-split--\n";

inline std::vector<std::string_view> split_input(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> parts;
  for (size_t at; (at = in.find(kSplit)) != std::string_view::npos;) {
    parts.push_back(in.substr(0, at));
    in.remove_prefix(at + kSplit.size());
  }
  parts.push_back(in);
  return parts;
}

// A broken invariant: abort, so that libFuzzer (or the replay test) reports the input.
#define HM_FUZZ_REQUIRE(cond)                                                        \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "hm fuzz: %s failed at %s:%d\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                  \
    }                                                                                \
  } while (0)

}  // namespace hm::fuzz
