#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/json_read.h"

namespace hm {

// Tensor bytes are copied to and from memory verbatim; the format is little-endian.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace {

constexpr uint64_t kMaxHeader = 100'000'000;
constexpr size_t kChunkBytes = size_t{1} << 20;  // bounds the conversion buffer in read_f32/write

struct DTypeDesc { DType dtype; const char* name; size_t size; };
constexpr DTypeDesc kDTypes[] = {
    {DType::BOOL, "BOOL", 1}, {DType::U8, "U8", 1},   {DType::I8, "I8", 1},     {DType::F8_E5M2, "F8_E5M2", 1},
    {DType::F8_E4M3, "F8_E4M3", 1}, {DType::I16, "I16", 2}, {DType::U16, "U16", 2}, {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2}, {DType::I32, "I32", 4}, {DType::U32, "U32", 4}, {DType::F32, "F32", 4},
    {DType::F64, "F64", 8},   {DType::I64, "I64", 8}, {DType::U64, "U64", 8},
};

const DTypeDesc* lookup(std::string_view name) {
  for (const auto& d : kDTypes)
    if (name == d.name) return &d;
  return nullptr;
}

const DTypeDesc& desc(DType t) {
  const auto i = static_cast<size_t>(t);
  HM_ASSERT(i < std::size(kDTypes) && kDTypes[i].dtype == t);
  return kDTypes[i];
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// Byte size of a tensor, or false on a negative dim or on overflow.
bool tensor_bytes(const std::vector<int64_t>& shape, DType dt, uint64_t* out) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  if (n > static_cast<uint64_t>(INT64_MAX)) return false;  // numel() must fit int64
  return !__builtin_mul_overflow(n, static_cast<uint64_t>(dtype_size(dt)), out);
}

template <class... Ts>
[[noreturn]] void fail(const std::string& path, const Ts&... parts) {
  throw Error(detail::cat("safetensors: ", path, ": ", parts...));
}

}  // namespace

size_t dtype_size(DType t) {
  HM_CHECK(!is_packed(t), dtype_name(t), " is a block format: its size is per row, not per element");
  return desc(t).size;
}
const char* dtype_name(DType t) {
  // The packed formats are outside kDTypes, so no file can name them (core/dtype.h).
  if (t == DType::Q8_0) return "Q8_0";
  if (t == DType::Q4_0) return "Q4_0";
  return desc(t).name;
}

DType dtype_from_name(std::string_view name) {
  const DTypeDesc* d = lookup(name);
  HM_CHECK(d != nullptr, "unknown dtype '", name, "'");
  return d->dtype;
}

// ---- half / bfloat16 ----------------------------------------------------------------------------

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exact in float.
    const float v = static_cast<float>(mant) * 0x1p-24f;
    return std::bit_cast<float>(std::bit_cast<uint32_t>(v) | sign);
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf, NaN with payload
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));         // rebias 15 -> 127
}

// Integer-only so the result does not depend on the FP environment (flush-to-zero, fast-math).
uint16_t f32_to_f16(float f) {
  uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  x &= 0x7fffffff;
  if (x > 0x7f800000) {
    // NaN: keep the top payload bits and force the quiet bit so it cannot become inf.
    return sign | 0x7e00 | static_cast<uint16_t>((x >> 13) & 0x3ff);
  }
  if (x >= 0x477ff000) return sign | 0x7c00;  // >= 65520 (halfway past 65504, odd) rounds to inf
  if (x >= 0x38800000) {                      // normal half: >= 2^-14
    uint32_t r = x - (112u << 23);
    r += 0xfff + ((r >> 13) & 1);  // round to nearest even; a carry bumps the exponent correctly
    return sign | static_cast<uint16_t>(r >> 13);
  }
  if (x <= 0x33000000) return sign;  // <= 2^-25: rounds to zero (2^-25 itself is a tie to even 0)
  // Subnormal half: count units of 2^-24.
  const uint32_t e = x >> 23;                   // 102..112
  const uint32_t m = (x & 0x7fffff) | 0x800000;  // implicit bit
  const uint32_t shift = 126 - e;               // 14..24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1))) ++q;  // q == 0x400 encodes 2^-14, still right
  return sign | static_cast<uint16_t>(q);
}

float bf16_to_f32(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

uint16_t f32_to_bf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((x >> 16) | 0x0040);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---- reader -------------------------------------------------------------------------------------

namespace {

// Reads up to n bytes at off; returns fewer only at end of file.
uint64_t pread_full(int fd, void* dst, uint64_t n, uint64_t off, const std::string& path, const std::string& what) {
  char* p = static_cast<char*>(dst);
  uint64_t got = 0;
  while (got < n) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(n - got, size_t{1} << 30));
    const ssize_t r = ::pread(fd, p + got, want, static_cast<off_t>(off + got));
    if (r < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      fail(path, "read error in ", what, ": ", std::strerror(err));
    }
    if (r == 0) break;
    got += static_cast<uint64_t>(r);
  }
  return got;
}

// Non-negative integer that fits int64 (shape dims and offsets share this rule).
bool as_nonneg_int(const nlohmann::json& v, uint64_t* out) {
  if (!v.is_number_unsigned()) return false;
  const auto u = v.get<uint64_t>();
  if (u > static_cast<uint64_t>(INT64_MAX)) return false;
  *out = u;
  return true;
}

std::string describe_int(const nlohmann::json& v) {
  if (v.is_number_integer() && !v.is_number_unsigned()) return "is negative (" + v.dump() + ")";
  if (v.is_number_unsigned()) return "is too large (" + v.dump() + ")";
  return "is not an integer (" + v.dump() + ")";
}

}  // namespace

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    const int err = errno;
    fail(path_, "cannot open: ", std::strerror(err));
  }
  // The constructor body may throw; the destructor would not run, so close here on the way out.
  try {
    struct stat st;
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      fail(path_, "cannot stat: ", std::strerror(err));
    }
    if (!S_ISREG(st.st_mode)) fail(path_, "not a regular file");
    const auto file_size = static_cast<uint64_t>(st.st_size);
    if (file_size < 8) fail(path_, "file is ", file_size, " bytes, too short for the 8-byte header length");

    unsigned char len_bytes[8];
    if (pread_full(fd_, len_bytes, 8, 0, path_, "header length") != 8) fail(path_, "truncated header length");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
    if (n > kMaxHeader) fail(path_, "header length ", n, " exceeds the limit of ", kMaxHeader, " bytes");
    if (n > file_size - 8) fail(path_, "header length ", n, " runs past the end of the file (", file_size, " bytes)");
    data_start_ = 8 + n;
    data_len_ = file_size - data_start_;

    std::string text(static_cast<size_t>(n), '\0');
    if (pread_full(fd_, text.data(), n, 8, path_, "header") != n) fail(path_, "file truncated inside the header");

    // One reader for all our JSON: bounded nesting, and a repeated key (the DOM would keep only
    // the last) is an error.
    const nlohmann::json header = parse_json(text, detail::cat("safetensors: ", path_, ": header"));
    std::string().swap(text);
    if (!header.is_object()) fail(path_, "header is not a JSON object (it is a ", header.type_name(), ")");

    for (auto& [key, entry] : header.items()) {
      if (key == "__metadata__") {
        if (!entry.is_object()) fail(path_, "__metadata__ is not an object");
        for (auto& [mk, mv] : entry.items()) {
          if (!mv.is_string()) fail(path_, "__metadata__ value of '", mk, "' is not a string");
          metadata_.emplace(mk, mv.get<std::string>());
        }
        continue;
      }
      const std::string& name = key;
      if (!entry.is_object()) fail(path_, "tensor '", name, "': entry is not an object");
      TensorInfo t;
      t.name = name;

      const auto dt = entry.find("dtype");
      if (dt == entry.end()) fail(path_, "tensor '", name, "': missing dtype");
      if (!dt->is_string()) fail(path_, "tensor '", name, "': dtype is not a string");
      const DTypeDesc* d = lookup(dt->get_ref<const std::string&>());
      if (!d) fail(path_, "tensor '", name, "': unknown dtype '", dt->get_ref<const std::string&>(), "'");
      t.dtype = d->dtype;

      const auto sh = entry.find("shape");
      if (sh == entry.end()) fail(path_, "tensor '", name, "': missing shape");
      if (!sh->is_array()) fail(path_, "tensor '", name, "': shape is not an array");
      for (size_t i = 0; i < sh->size(); ++i) {
        uint64_t v;
        if (!as_nonneg_int((*sh)[i], &v)) fail(path_, "tensor '", name, "': shape[", i, "] ", describe_int((*sh)[i]));
        t.shape.push_back(static_cast<int64_t>(v));
      }

      const auto off = entry.find("data_offsets");
      if (off == entry.end()) fail(path_, "tensor '", name, "': missing data_offsets");
      if (!off->is_array() || off->size() != 2) fail(path_, "tensor '", name, "': data_offsets is not [begin, end]");
      if (!as_nonneg_int((*off)[0], &t.begin))
        fail(path_, "tensor '", name, "': data_offsets begin ", describe_int((*off)[0]));
      if (!as_nonneg_int((*off)[1], &t.end))
        fail(path_, "tensor '", name, "': data_offsets end ", describe_int((*off)[1]));
      if (t.begin > t.end) fail(path_, "tensor '", name, "': data_offsets begin ", t.begin, " > end ", t.end);

      uint64_t bytes;
      if (!tensor_bytes(t.shape, t.dtype, &bytes))
        fail(path_, "tensor '", name, "': shape ", shape_str(t.shape), " is too large");
      if (t.end - t.begin != bytes)
        fail(path_, "tensor '", name, "': data_offsets span ", t.end - t.begin, " bytes but shape ", shape_str(t.shape),
             " of ", d->name, " needs ", bytes);
      if (t.end > data_len_)
        fail(path_, "tensor '", name, "': data_offsets end ", t.end, " is past the end of the data buffer (", data_len_,
             " bytes; file truncated?)");
      tensors_.push_back(std::move(t));
    }

    // Every byte of the buffer must belong to exactly one tensor.
    std::vector<const TensorInfo*> by_offset;
    by_offset.reserve(tensors_.size());
    for (const auto& t : tensors_) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
    });
    uint64_t covered = 0;
    const TensorInfo* prev = nullptr;  // last tensor that ends at `covered`
    for (const TensorInfo* t : by_offset) {
      if (t->begin > covered)
        fail(path_, "gap in data buffer: bytes [", covered, ", ", t->begin, ") before tensor '", t->name,
             "' belong to no tensor");
      if (t->begin < covered)
        fail(path_, "tensor '", t->name, "' [", t->begin, ", ", t->end, ") overlaps tensor '", prev->name, "' [",
             prev->begin, ", ", prev->end, ")");
      if (t->end > t->begin || !prev) prev = t;
      covered = t->end;
    }
    if (covered != data_len_) {
      if (prev)
        fail(path_, "data buffer has ", data_len_ - covered, " trailing bytes after the last tensor '", prev->name,
             "'");
      fail(path_, "data buffer has ", data_len_ - covered, " trailing bytes but the header lists no tensors");
    }

    std::sort(tensors_.begin(), tensors_.end(),
              [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() {
  if (fd_ >= 0) ::close(fd_);
}

SafetensorsReader::SafetensorsReader(SafetensorsReader&& other) noexcept
    : path_(std::move(other.path_)),
      fd_(std::exchange(other.fd_, -1)),
      data_start_(other.data_start_),
      data_len_(other.data_len_),
      tensors_(std::move(other.tensors_)),
      metadata_(std::move(other.metadata_)) {}

SafetensorsReader& SafetensorsReader::operator=(SafetensorsReader&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(other.path_);
    fd_ = std::exchange(other.fd_, -1);
    data_start_ = other.data_start_;
    data_len_ = other.data_len_;
    tensors_ = std::move(other.tensors_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

const TensorInfo* SafetensorsReader::find(std::string_view name) const {
  const auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                                   [](const TensorInfo& t, std::string_view n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

void SafetensorsReader::pread_exact(void* dst, uint64_t n, uint64_t data_offset, const std::string& tensor) const {
  HM_ASSERT(fd_ >= 0);
  const std::string what = "tensor '" + tensor + "'";
  if (pread_full(fd_, dst, n, data_start_ + data_offset, path_, what) != n)
    fail(path_, "tensor '", tensor, "': unexpected end of file (was the file changed after it was opened?)");
}

void SafetensorsReader::read_raw(const TensorInfo& t, void* dst) const {
  HM_ASSERT(t.begin <= t.end && t.end <= data_len_);
  pread_exact(dst, t.end - t.begin, t.begin, t.name);
}

void SafetensorsReader::read_f32(std::string_view name, const std::vector<int64_t>& expected_shape, float* dst) const {
  const TensorInfo* t = find(name);
  if (!t) fail(path_, "tensor '", name, "' not found");
  if (t->shape != expected_shape)
    fail(path_, "tensor '", name, "': shape mismatch: expected ", shape_str(expected_shape), ", file has ",
         shape_str(t->shape));
  if (t->dtype == DType::F32) {
    read_raw(*t, dst);
    return;
  }
  if (t->dtype != DType::F16 && t->dtype != DType::BF16 && t->dtype != DType::F64)
    fail(path_, "tensor '", name, "': dtype ", dtype_name(t->dtype), " cannot be read as F32");

  const size_t esize = dtype_size(t->dtype);
  const auto numel = static_cast<uint64_t>(t->numel());
  const size_t chunk_elems = kChunkBytes / esize;
  std::vector<unsigned char> buf(static_cast<size_t>(std::min<uint64_t>(numel, chunk_elems)) * esize);
  for (uint64_t i = 0; i < numel;) {
    const size_t k = static_cast<size_t>(std::min<uint64_t>(numel - i, chunk_elems));
    pread_exact(buf.data(), k * esize, t->begin + i * esize, t->name);
    float* out = dst + i;
    // memcpy per element: buf has no alignment guarantee for the wider types.
    switch (t->dtype) {
      case DType::F16:
        for (size_t j = 0; j < k; ++j) {
          uint16_t h;
          std::memcpy(&h, buf.data() + 2 * j, 2);
          out[j] = f16_to_f32(h);
        }
        break;
      case DType::BF16:
        for (size_t j = 0; j < k; ++j) {
          uint16_t h;
          std::memcpy(&h, buf.data() + 2 * j, 2);
          out[j] = bf16_to_f32(h);
        }
        break;
      case DType::F64:
        for (size_t j = 0; j < k; ++j) {
          double v;
          std::memcpy(&v, buf.data() + 8 * j, 8);
          out[j] = static_cast<float>(v);
        }
        break;
      default:
        HM_ASSERT(false);
    }
    i += k;
  }
}

// ---- writer -------------------------------------------------------------------------------------

namespace {

// A tensor as the writer sees it: emit() appends exactly `bytes` bytes to the file.
struct PendingTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t bytes = 0;
  std::function<void(AtomicFile&)> emit;
};

void check_tensor(const std::string& path, const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                  const void* data, uint64_t* bytes) {
  if (name.empty()) fail(path, "cannot write a tensor with an empty name");
  if (name == "__metadata__") fail(path, "cannot write a tensor named '__metadata__' (reserved)");
  if (is_packed(dtype))
    fail(path, "tensor '", name, "': ", dtype_name(dtype), " is not a safetensors dtype (packed rows are stored as U8)");
  for (int64_t d : shape)
    if (d < 0) fail(path, "tensor '", name, "': cannot write negative shape ", shape_str(shape));
  if (!tensor_bytes(shape, dtype, bytes)) fail(path, "tensor '", name, "': shape ", shape_str(shape), " is too large");
  if (*bytes > 0 && data == nullptr) fail(path, "tensor '", name, "': data is null");
}

void write_pending(const std::string& path, std::vector<PendingTensor>& ts,
                   const std::map<std::string, std::string>& metadata) {
  {
    std::set<std::string_view> names;
    for (const auto& t : ts)
      if (!names.insert(t.name).second) fail(path, "duplicate tensor name '", t.name, "'");
  }

  // Largest alignment first keeps every tensor aligned to its element size within the 8-aligned buffer.
  std::sort(ts.begin(), ts.end(), [](const PendingTensor& a, const PendingTensor& b) {
    const size_t sa = dtype_size(a.dtype), sb = dtype_size(b.dtype);
    return sa != sb ? sa > sb : a.name < b.name;
  });

  // ordered_json keeps __metadata__ first and tensors in file order, as the reference writer does.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    auto& m = header["__metadata__"] = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
  }
  uint64_t offset = 0;
  for (const auto& t : ts) {
    if (__builtin_add_overflow(offset, t.bytes, &offset)) fail(path, "total data size overflows");
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset - t.bytes, offset}}};
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    fail(path, "cannot encode header (tensor names and metadata must be UTF-8): ", e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  unsigned char len_bytes[8];
  uint64_t n = text.size();
  for (auto& b : len_bytes) {
    b = static_cast<unsigned char>(n & 0xff);
    n >>= 8;
  }
  AtomicFile f(path);
  f.write(len_bytes, 8);
  f.write(text.data(), text.size());
  for (const auto& t : ts) t.emit(f);
  f.commit();
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<PendingTensor> ts;
  ts.reserve(tensors.size());
  for (const auto& t : tensors) {
    PendingTensor p{t.name, t.dtype, t.shape, 0, nullptr};
    check_tensor(path, t.name, t.dtype, t.shape, t.data, &p.bytes);
    p.emit = [data = t.data, bytes = p.bytes](AtomicFile& f) { f.write(data, bytes); };
    ts.push_back(std::move(p));
  }
  write_pending(path, ts, metadata);
}

void write_safetensors_f32(const std::string& path, const std::vector<F32Tensor>& tensors, DType stored_as,
                           const std::map<std::string, std::string>& metadata) {
  if (stored_as != DType::F32 && stored_as != DType::F16 && stored_as != DType::BF16)
    fail(path, "cannot store float32 data as ", dtype_name(stored_as), " (F32, F16 or BF16 only)");
  std::vector<PendingTensor> ts;
  ts.reserve(tensors.size());
  for (const auto& t : tensors) {
    PendingTensor p{t.name, stored_as, t.shape, 0, nullptr};
    check_tensor(path, t.name, stored_as, t.shape, t.data, &p.bytes);
    if (stored_as == DType::F32) {
      p.emit = [data = t.data, bytes = p.bytes](AtomicFile& f) { f.write(data, bytes); };
    } else {
      // Convert through a bounded buffer rather than materialising the whole converted tensor.
      p.emit = [data = t.data, numel = p.bytes / 2, bf16 = stored_as == DType::BF16](AtomicFile& f) {
        std::vector<uint16_t> buf(static_cast<size_t>(std::min<uint64_t>(numel, kChunkBytes / 2)));
        for (uint64_t i = 0; i < numel;) {
          const size_t k = static_cast<size_t>(std::min<uint64_t>(numel - i, buf.size()));
          for (size_t j = 0; j < k; ++j) buf[j] = bf16 ? f32_to_bf16(data[i + j]) : f32_to_f16(data[i + j]);
          f.write(buf.data(), k * 2);
          i += k;
        }
      };
    }
    ts.push_back(std::move(p));
  }
  write_pending(path, ts, metadata);
}

}  // namespace hm
