// 64-byte aligned allocation for float scratch, so that full-vector accesses never straddle
// cache lines. Tag makes each ISA's kernels (simd.h) instantiate their own copy of every
// container member function: a std::vector<float, AlignedAlloc<float>> member compiled for
// AVX-512 must never be the copy the linker keeps for baseline code.
#pragma once
#include <cstddef>
#include <new>
#include <vector>

namespace hm::cpu {

template <class T, class Tag = void>
struct AlignedAlloc {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = AlignedAlloc<U, Tag>;
  };
  AlignedAlloc() = default;
  template <class U>
  AlignedAlloc(const AlignedAlloc<U, Tag>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const AlignedAlloc<U, Tag>&) const { return true; }
};

template <class T, class Tag = void>
using AlignedVec = std::vector<T, AlignedAlloc<T, Tag>>;

}  // namespace hm::cpu
