// The ops.h kernels of hm::cpu, each a call through the table of the ISA chosen at startup
// (dispatch.h). Compiled for baseline x86-64 like everything outside the per-ISA files.
#include "kernels/cpu/dispatch.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/error.h"

namespace hm::cpu {

Isa default_isa() {
  const char* env = std::getenv("HM_ISA");
  if (!env || !*env) return best_isa();
  const std::string v = env;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512})
    if (v == isa_name(isa)) {
      HM_CHECK(isa_supported(isa), "HM_ISA=", v, ": this CPU does not support it (best: ",
               isa_name(best_isa()), ")");
      return isa;
    }
  throw Error(detail::cat("HM_ISA=", v, ": expected scalar, avx2 or avx512"));
}

namespace {

KernelTable table_of(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return avx512::kernel_table();
    case Isa::Avx2: return avx2::kernel_table();
    case Isa::Scalar: break;
  }
  return scalar::kernel_table();
}

struct Chosen {
  Isa isa;
  KernelTable table;
};

// Chosen on first use; the initializer below makes that startup. A bad HM_ISA ends the process
// there with its reason: running another ISA than the one asked for would mislead a test.
Chosen& chosen() {
  static Chosen c = [] {
    try {
      const Isa isa = default_isa();
      return Chosen{isa, table_of(isa)};
    } catch (const Error& e) {
      std::fprintf(stderr, "hm: %s\n", e.what());
      std::exit(2);
    }
  }();
  return c;
}
[[maybe_unused]] const bool g_chosen_at_startup = (chosen(), true);

}  // namespace

const KernelTable& kernels() { return chosen().table; }
Isa kernel_isa() { return chosen().isa; }

void set_kernel_isa(Isa isa) {
  HM_CHECK(isa_supported(isa), "set_kernel_isa: this CPU does not support ", isa_name(isa));
  chosen() = Chosen{isa, table_of(isa)};
}

void rmsnorm(float* out, const float* x, const float* w, int n, int d, float eps) {
  kernels().rmsnorm(out, x, w, n, d, eps);
}
void conv1d_silu(float* out, int ldo, float* state, const float* x, int ldx, const float* w,
                 const float* b, int L, int E, int K) {
  kernels().conv1d_silu(out, ldo, state, x, ldx, w, b, L, E, K);
}
void selective_scan(float* y, int ldy, float* state, const float* x, int ldx, const float* dt,
                    int lddt, const float* dt_bias, const float* A, const float* B, const float* C,
                    int ldbc, const float* Dskip, const float* z, int ldz, int L, int E, int N) {
  kernels().selective_scan(y, ldy, state, x, ldx, dt, lddt, dt_bias, A, B, C, ldbc, Dskip, z, ldz,
                           L, E, N);
}
void rope(float* x, int ldx, int L, int heads, int hd, int pos0, float theta) {
  kernels().rope(x, ldx, L, heads, hd, pos0, theta);
}
void attention(float* out, int ldo, const float* q, int ldq, const float* k, const float* v, int L,
               int pos0, int H, int G, int hd) {
  kernels().attention(out, ldo, q, ldq, k, v, L, pos0, H, G, hd);
}
void attention_f16kv(float* out, int ldo, const float* q, int ldq, const uint16_t* k,
                     const uint16_t* v, int L, int pos0, int H, int G, int hd) {
  kernels().attention_f16kv(out, ldo, q, ldq, k, v, L, pos0, H, G, hd);
}
void store_f16(uint16_t* dst, int ld_dst, const float* src, int ld_src, int n, int d) {
  kernels().store_f16(dst, ld_dst, src, ld_src, n, d);
}
void swiglu(float* out, int ldo, const float* g, const float* u, int ldgu, int n, int f) {
  kernels().swiglu(out, ldo, g, u, ldgu, n, f);
}
void relu2(float* out, int ldo, const float* x, int ldx, int n, int f) {
  kernels().relu2(out, ldo, x, ldx, n, f);
}
double exp_sum(float* out, const float* x, int n, float shift) { return kernels().exp_sum(out, x, n, shift); }

}  // namespace hm::cpu
