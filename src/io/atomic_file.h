// Crash-safe file replacement: readers of `path` see either the old content or the complete new
// content, never a torn write. Used for checkpoints, configs and anything else the engine saves.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace hm {

// Writes go to a temp file in the same directory (path + ".tmp.XXXXXX"), which commit() fsyncs,
// rename()s over the target and then fsyncs the directory. Until commit() succeeds the target is
// untouched; on any failure, or destruction without commit(), the temp file is removed.
// Errors throw hm::Error naming the path and strerror. Not thread-safe.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();  // removes the temp if commit() was not reached
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  void commit();

  const std::string& path() const { return path_; }

 private:
  void discard() noexcept;

  std::string path_;
  std::string tmp_path_;
  int fd_ = -1;
  bool committed_ = false;
  bool failed_ = false;  // a write failed: the temp is incomplete and must never be committed
};

void write_file_atomic(const std::string& path, std::string_view bytes);

}  // namespace hm
