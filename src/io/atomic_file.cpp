#include "io/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "core/error.h"

namespace hm {

namespace {

std::string errno_text(int err) { return std::strerror(err); }

std::string parent_dir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// umask(2) can only be read by setting it, which races with other threads; /proc has it read-only.
mode_t current_umask() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("Umask:", 0) == 0) return static_cast<mode_t>(std::stoul(line.substr(6), nullptr, 8));
  }
  return 022;
}

}  // namespace

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  HM_CHECK(!path_.empty(), "atomic write: empty path");
  std::string tmpl = path_ + ".tmp.XXXXXX";
  fd_ = ::mkostemp(tmpl.data(), O_CLOEXEC);  // mkstemp plus close-on-exec
  if (fd_ < 0) {
    const int err = errno;
    throw Error(detail::cat("atomic write: ", path_, ": cannot create temp file ", tmpl, ": ", errno_text(err)));
  }
  tmp_path_ = std::move(tmpl);
  // mkstemp makes the file 0600; give the result the mode a plain open(O_CREAT) would have, or
  // keep the mode of the file being replaced.
  struct stat st;
  const mode_t mode = ::stat(path_.c_str(), &st) == 0 ? (st.st_mode & 07777) : (0666 & ~current_umask());
  if (::fchmod(fd_, mode) != 0) {
    const int err = errno;
    discard();
    throw Error(detail::cat("atomic write: ", path_, ": cannot set mode of temp file: ", errno_text(err)));
  }
}

AtomicFile::~AtomicFile() {
  if (!committed_) discard();
}

void AtomicFile::discard() noexcept {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  if (!tmp_path_.empty()) {
    ::unlink(tmp_path_.c_str());
    tmp_path_.clear();
  }
}

void AtomicFile::write(const void* data, size_t n) {
  HM_ASSERT(!committed_ && fd_ >= 0);
  HM_ASSERT(data != nullptr || n == 0);
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd_, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      failed_ = true;
      throw Error(detail::cat("atomic write: ", path_, ": write failed: ", errno_text(err)));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void AtomicFile::commit() {
  HM_ASSERT(!committed_ && fd_ >= 0);
  HM_CHECK(!failed_, "atomic write: ", path_, ": refusing to commit after a failed write");
  auto fail = [&](const char* what) {
    const int err = errno;
    discard();
    throw Error(detail::cat("atomic write: ", path_, ": ", what, ": ", errno_text(err)));
  };
  if (::fsync(fd_) != 0) fail("fsync failed");
  // close() can report deferred write errors (NFS, quota), so it is checked too.
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) fail("close failed");
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) fail("rename failed");
  committed_ = true;
  tmp_path_.clear();

  // Without this the rename itself may not survive a crash. The new content is already in place,
  // so a failure here is reported but nothing is rolled back.
  const std::string dir = parent_dir(path_);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) {
    const int err = errno;
    throw Error(detail::cat("atomic write: ", path_, ": cannot open directory ", dir, ": ", errno_text(err)));
  }
  const int rc = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  // Some filesystems cannot fsync a directory (EINVAL); nothing more can be done there.
  if (rc != 0 && err != EINVAL) {
    throw Error(detail::cat("atomic write: ", path_, ": fsync of directory ", dir, " failed: ", errno_text(err)));
  }
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  AtomicFile f(path);
  f.write(bytes.data(), bytes.size());
  f.commit();
}

}  // namespace hm
