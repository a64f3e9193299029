// HM_ISA_TEST(Suite, Name) { body }: a gtest whose body runs once per ISA this CPU supports,
// each forced in turn (kernels/cpu/dispatch.h), so every dispatched kernel copy is checked
// against the reference, not only the one the CPU would pick. Failures name the ISA.
#pragma once
#include <gtest/gtest.h>

#include <string>

#include "kernels/cpu/dispatch.h"

namespace hm::test {

inline void for_each_isa(void (*body)()) {
  using hm::cpu::Isa;
  const Isa saved = hm::cpu::kernel_isa();
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512}) {
    if (!hm::cpu::isa_supported(isa)) continue;
    hm::cpu::set_kernel_isa(isa);
    SCOPED_TRACE(std::string("kernel ISA ") + hm::cpu::isa_name(isa));
    body();
  }
  hm::cpu::set_kernel_isa(saved);
}

}  // namespace hm::test

#define HM_ISA_TEST(suite, name)                                            \
  void suite##_##name##_on_isa();                                          \
  TEST(suite, name) { ::hm::test::for_each_isa(&suite##_##name##_on_isa); } \
  void suite##_##name##_on_isa()
