// The run-time ISA choice of the CPU kernels (kernels/cpu/dispatch.h): HM_ISA parsing, forcing,
// and that forcing really switches code. The kernels themselves are checked against kernels/ref
// on every supported ISA by the HM_ISA_TEST tests (isa_each.h) in test_kernels.cpp and the
// grad tests; tests/check_isa_objects.sh checks the object code.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/dispatch.h"

namespace {

using hm::cpu::Isa;

// Sets HM_ISA (or unsets it, for nullopt) for the test, and puts the old value back.
class ScopedIsaEnv {
 public:
  explicit ScopedIsaEnv(const char* value) {
    if (const char* old = std::getenv("HM_ISA")) old_ = old;
    if (value) setenv("HM_ISA", value, 1); else unsetenv("HM_ISA");
  }
  ~ScopedIsaEnv() {
    if (old_) setenv("HM_ISA", old_->c_str(), 1); else unsetenv("HM_ISA");
  }

 private:
  std::optional<std::string> old_;
};

TEST(KernelIsa, EnvironmentChoosesTheIsa) {
  {
    ScopedIsaEnv env(nullptr);
    EXPECT_EQ(hm::cpu::default_isa(), hm::cpu::best_isa());
  }
  {
    ScopedIsaEnv env("");
    EXPECT_EQ(hm::cpu::default_isa(), hm::cpu::best_isa());
  }
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512}) {
    ScopedIsaEnv env(hm::cpu::isa_name(isa));
    if (hm::cpu::isa_supported(isa)) {
      EXPECT_EQ(hm::cpu::default_isa(), isa);
    } else {
      EXPECT_THROW(hm::cpu::default_isa(), hm::Error);
    }
  }
}

TEST(KernelIsa, UnknownIsaNamesTheVariableAndTheChoices) {
  for (const char* bad : {"avx9", "AVX2", "sse", "avx2 "}) {
    ScopedIsaEnv env(bad);
    try {
      hm::cpu::default_isa();
      ADD_FAILURE() << "HM_ISA=" << bad << " was accepted";
    } catch (const hm::Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(std::string("HM_ISA=") + bad), std::string::npos) << msg;
      EXPECT_NE(msg.find("scalar, avx2 or avx512"), std::string::npos) << msg;
    }
  }
}

TEST(KernelIsa, ForcingSwitchesTheTableAndIsReported) {
  const Isa saved = hm::cpu::kernel_isa();
  EXPECT_EQ(saved, hm::cpu::default_isa());  // nothing forced it before this test
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512}) {
    if (!hm::cpu::isa_supported(isa)) {
      EXPECT_THROW(hm::cpu::set_kernel_isa(isa), hm::Error);
      continue;
    }
    hm::cpu::set_kernel_isa(isa);
    EXPECT_EQ(hm::cpu::kernel_isa(), isa);
  }
  // Each ISA's copies are separate code: a table that aliased another would test one ISA twice.
  // (A table getter is code of its ISA too: only those this CPU runs are called.)
  std::vector<hm::cpu::KernelTable> t;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512}) {
    if (!hm::cpu::isa_supported(isa)) continue;
    hm::cpu::set_kernel_isa(isa);
    t.push_back(hm::cpu::kernels());
  }
  for (size_t i = 0; i < t.size(); ++i)
    for (size_t j = i + 1; j < t.size(); ++j) {
      EXPECT_NE(t[i].attention_f16kv, t[j].attention_f16kv);
      EXPECT_NE(t[i].selective_scan, t[j].selective_scan);
      EXPECT_NE(t[i].grad.scan_backward, t[j].grad.scan_backward);
    }
  EXPECT_EQ(t[0].rmsnorm, hm::cpu::scalar::kernel_table().rmsnorm);
  hm::cpu::set_kernel_isa(saved);
}

}  // namespace
