// Overflow-checked 64-bit arithmetic for sizes derived from user input (configs, --ctx, --batch):
// a product that does not fit is an hm::Error naming the quantity, never a wrapped size that
// is then allocated or indexed.
#pragma once
#include <cstdint>
#include <initializer_list>

#include "core/error.h"

namespace hm {

// a * b; `what` names the quantity ("KV cache bytes").
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r;
  HM_CHECK(a >= 0 && b >= 0, what, ": negative factor (", a, " x ", b, ")");
  HM_CHECK(!__builtin_mul_overflow(a, b, &r), what, ": ", a, " x ", b, " overflows 64 bits");
  return r;
}

// The product of every factor.
inline int64_t checked_mul(std::initializer_list<int64_t> factors, const char* what) {
  int64_t r = 1;
  for (int64_t f : factors) r = checked_mul(r, f, what);
  return r;
}

inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r;
  HM_CHECK(a >= 0 && b >= 0, what, ": negative term (", a, " + ", b, ")");
  HM_CHECK(!__builtin_add_overflow(a, b, &r), what, ": ", a, " + ", b, " overflows 64 bits");
  return r;
}

}  // namespace hm
