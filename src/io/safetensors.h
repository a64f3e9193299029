// Reader and writer for the safetensors checkpoint format (the format: docs/REFERENCE.md).
// The reader validates the whole header up front and never maps or slurps the file: tensor bytes
// are pread straight into the caller's buffer, so loading costs no more memory than the weights.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"

namespace hm {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets relative to the data buffer
  int64_t numel() const;        // 1 for shape []
};

class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);  // opens and validates everything up front
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;
  SafetensorsReader(SafetensorsReader&& other) noexcept;
  SafetensorsReader& operator=(SafetensorsReader&& other) noexcept;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // sorted by name
  const TensorInfo* find(std::string_view name) const;                 // nullptr if absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Reads a tensor converted to float32 into dst (numel floats). Source dtype F32, F16, BF16 or F64.
  // Throws hm::Error naming file and tensor if absent, if its shape differs from expected_shape
  // ("expected [4, 8], file has [8, 4]"), or if its dtype cannot convert.
  // Const methods only pread, so concurrent reads from several threads are safe.
  void read_f32(std::string_view name, const std::vector<int64_t>& expected_shape, float* dst) const;
  void read_raw(const TensorInfo& t, void* dst) const;  // exact bytes, t must come from tensors()

 private:
  void pread_exact(void* dst, uint64_t n, uint64_t data_offset, const std::string& tensor) const;

  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0;  // file offset of the data buffer (8 + header length)
  uint64_t data_len_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;  // already in dtype, little-endian, row-major
};

// Atomic (AtomicFile). Header padded with spaces to a multiple of 8; data ordered by dtype
// alignment (largest first) then name; refuses duplicate names and bad shapes with hm::Error.
// metadata may be empty (then no __metadata__ key).
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Convenience: write float32 source data converted to dtype (F32, F16 or BF16).
struct F32Tensor {
  std::string name;
  std::vector<int64_t> shape;
  const float* data;
};
void write_safetensors_f32(const std::string& path, const std::vector<F32Tensor>& tensors, DType stored_as,
                           const std::map<std::string, std::string>& metadata = {});

}  // namespace hm
