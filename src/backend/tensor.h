// The typed views the backend interface works on (docs/CUDA.md, part 1): a strided 2-D tensor
// of one element type, the ragged batch a forward call runs (flash-attention's varlen layout),
// and the per-layer pools that hold every sequence's recurrent state and KV rows.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/quant.h"

namespace hm {

// Weights, activations and KV caches are F32, BF16 or F16 (core/dtype.h). Every sum and every
// recurrent state is float32 whatever the type; BF16 and F16 are storage types.
// The compute types by their command-line names: "f32" | "bf16" | "f16", hm::Error otherwise.
DType compute_dtype_from_name(const std::string& name);
const char* compute_dtype_name(DType t);  // "f32" ... "q8_0", "q4_0"
// The formats a model's linear weights can be stored in (HybridModel::set_weight_format) by
// their command-line names: "f32" | "bf16" | "f16" | "q8_0" | "q4_0", hm::Error otherwise.
// BF16 / F16 here are a float32 model's linear weights stored in 16 bits (kernels/quant.h), not
// the type it computes in (HybridModel::dtype(): f16 compute is CUDA's, with f16 weights there).
DType weight_format_from_name(const std::string& name);

// Host conversions, round to nearest even (weights on upload, tests, logits read back); the
// scalar ones are io/safetensors.h's.
void convert_from_f32(void* dst, DType t, const float* src, size_t n);
void convert_to_f32(float* dst, const void* src, DType t, size_t n);

// The kernels' name for a weight format: BF16, F16, Q8_0 or Q4_0; hm::Error for any other type.
WeightType weight_type_of(DType t);
// Bytes of one row of `cols` weights of a packed type (Q8_0, Q4_0: kernels/quant.h's
// row_bytes); hm::Error naming the type when cols is not a multiple of its block.
size_t packed_row_bytes(DType t, int cols);

// rows x cols elements of `dtype` with row stride `ld` elements, in a backend's memory.
// Column and row slices are views of the same memory, never copies. A packed weight (Q8_0,
// Q4_0) has ld == cols and rows of packed_row_bytes each; it has row views but no column views.
struct Tensor {
  void* data = nullptr;
  DType dtype = DType::F32;
  int rows = 0, cols = 0;
  int64_t ld = 0;

  Tensor() = default;
  Tensor(void* d, DType t, int r, int c, int64_t ld_) : data(d), dtype(t), rows(r), cols(c), ld(ld_) {}
  Tensor(void* d, DType t, int r, int c) : Tensor(d, t, r, c, c) {}
  static Tensor vec(const void* d, DType t, int n) { return {const_cast<void*>(d), t, 1, n, n}; }

  bool empty() const { return data == nullptr; }
  size_t elem_size() const { return dtype_size(dtype); }
  void* row(int r) const {
    const int64_t stride = is_packed(dtype) ? int64_t(packed_row_bytes(dtype, cols)) : ld * int64_t(elem_size());
    return static_cast<char*>(data) + int64_t(r) * stride;
  }
  Tensor cols_view(int c0, int n) const {
    HM_ASSERT(c0 >= 0 && n >= 0 && c0 + n <= cols && !is_packed(dtype));
    return {static_cast<char*>(data) + int64_t(c0) * int64_t(elem_size()), dtype, rows, n, ld};
  }
  Tensor rows_view(int r0, int n) const {
    HM_ASSERT(r0 >= 0 && n >= 0 && r0 + n <= rows);
    return {row(r0), dtype, n, cols, ld};
  }
  // The float32 pointer of an F32 tensor (the CPU backend's only type).
  float* f32() const {
    HM_CHECK(dtype == DType::F32, "expected a float32 tensor, got ", compute_dtype_name(dtype));
    return static_cast<float*>(data);
  }
};

// One layer's recurrent state for every slot, float32: slot s at base + s * slot_stride.
struct StatePool {
  float* base = nullptr;
  int n_slots = 0;
  int64_t slot_stride = 0;
  float* at(int slot) const { return base + int64_t(slot) * slot_stride; }
};

// One attention layer's K and V for every slot: [n_slots, max_ctx, row] elements of dtype each;
// slot s starts at s * slot_stride elements.
struct KvPool {
  void* k = nullptr;
  void* v = nullptr;
  DType dtype = DType::F16;
  int n_slots = 0, max_ctx = 0, row = 0;
  int64_t slot_stride = 0;
  void* k_at(int slot) const { return static_cast<char*>(k) + int64_t(slot) * slot_stride * int64_t(dtype_size(dtype)); }
  void* v_at(int slot) const { return static_cast<char*>(v) + int64_t(slot) * slot_stride * int64_t(dtype_size(dtype)); }
};

class Backend;

// The batch one op runs, as flash-attention's varlen interface: sequence s owns rows
// [cu_seqlens[s], cu_seqlens[s+1]) of every token-major activation, its state and KV rows at
// index slots[s] of the pools, and its first row is at absolute position pos0[s]. The host
// arrays are filled by add(); upload() copies them to the backend once, after which the ops
// read the device copies (on the CPU, the same memory).
class Ragged {
 public:
  void clear() { cu_.assign(1, 0); slots_.clear(); pos0_.clear(); max_len_ = 0; }
  void add(int slot, int n, int pos0) {
    cu_.push_back(cu_.back() + n);
    slots_.push_back(slot);
    pos0_.push_back(pos0);
    if (n > max_len_) max_len_ = n;
  }
  int nseq() const { return int(slots_.size()); }
  int n_tokens() const { return cu_.back(); }
  int max_len() const { return max_len_; }
  int start(int s) const { return cu_[size_t(s)]; }
  int len(int s) const { return cu_[size_t(s) + 1] - cu_[size_t(s)]; }
  int slot(int s) const { return slots_[size_t(s)]; }
  int pos0(int s) const { return pos0_[size_t(s)]; }
  const std::vector<int32_t>& host_cu() const { return cu_; }
  const std::vector<int32_t>& host_slots() const { return slots_; }
  const std::vector<int32_t>& host_pos0() const { return pos0_; }

  // Device copies, valid after upload() until the next add()/clear().
  void upload(Backend& be);
  const int32_t* d_cu() const { return d_ + 0; }
  const int32_t* d_slots() const { return d_ + cap_ + 1; }
  const int32_t* d_pos0() const { return d_ + 2 * cap_ + 1; }

  Ragged() = default;
  Ragged(const Ragged&) = delete;
  Ragged& operator=(const Ragged&) = delete;
  ~Ragged();

 private:
  std::vector<int32_t> cu_{0}, slots_, pos0_;
  int max_len_ = 0;
  // [cu (cap+1) | slots (cap) | pos0 (cap)] in the backend's memory, grown, never shrunk, so a
  // decode step of one batch size keeps its addresses (a captured graph stays valid).
  Backend* be_ = nullptr;
  int32_t* d_ = nullptr;
  int cap_ = 0;
  std::vector<int32_t> staging_;
};

}  // namespace hm
