// The kernels compiled once per ISA (CMakeLists.txt: scalar = baseline x86-64, avx2 =
// x86-64-v3, avx512 = x86-64-v4; simd.h says what those files must avoid) and the table of
// them that dispatch.cpp chooses once, at startup: HM_ISA=scalar|avx2|avx512 if set, else the
// best this CPU supports (isa_supported, kernels/quant.h). The hm::cpu functions of ops.h and
// grad_cpu.h call through it.
#pragma once
#include <cstdint>
#include <string>

#include "kernels/ops.h"
#include "kernels/quant.h"

namespace hm::cpu {

// Training's selective scan (kernels/ref/mamba_grad_ref.h layout: token-major, contiguous).
struct ScanGradArgs {
  const float *x, *dt, *dt_bias, *A, *B, *C, *Dskip, *z;
  int L, E, N;
};
constexpr int kScanGradLanes = 8;  // the fast scan needs N % kScanGradLanes == 0
// Training's Mamba-2 SSD scan (kernels/ref/ssd_grad_ref.h's layout and arguments).
struct SsdGradArgs {
  const float* x;
  int ldx;
  const float* dt;
  int lddt;
  const float *dt_bias, *A_log, *B, *C;
  int ldbc;
  const float* Dskip;
  int L, H, P, G, N;
  double dt_min, dt_max;
};

// The SIMD pieces of grad_cpu.cpp's blocks (the rest is sgemm and bookkeeping, compiled once).
#define HM_DECLARE_GRAD_KERNELS                                                                    \
  /* ref::grad::selective_scan_forward, states saved every `chunk` tokens (chunk_states may be    \
     null) */                                                                                      \
  void scan_forward(float* y, const ScanGradArgs& s, double* chunk_states, int chunk);            \
  /* ref::grad::selective_scan_backward(_chunked): chunk_states null = one chunk from zero */      \
  void scan_backward(float* dx, float* ddt, float* ddt_bias, float* dA, float* dB, float* dC,     \
                     float* dD, float* dz, const float* dy, const ScanGradArgs& s,                 \
                     const double* chunk_states, int chunk);                                       \
  /* ref::grad::ssd_scan_backward: the same sums in double, states recomputed per chunk */       \
  void ssd_backward(float* dx, int lddx, float* ddt, int lddt_out, float* dB, float* dC, int lddbc, \
                    float* ddt_bias, float* dA_log, float* dDskip, const float* dy, int lddy,       \
                    const SsdGradArgs& a);                                                          \
  /* ref::grad::conv1d_silu_backward (dx assigned, dw and db accumulated) */                       \
  void conv1d_silu_backward(float* dx, float* dw, float* db, const float* dout, const float* x,   \
                            const float* w, const float* b, int L, int E, int K);                  \
  /* s[0..t] = softmax of s[0..t], s[t+1..L) = 0; returns the log-sum-exp */                      \
  float softmax_causal_row(float* s, int t, int L);                                               \
  /* p[j] = exp(p[j] - lse), ds[j] = p[j] (ds[j] - D) for j < n: a row of attention's backward */ \
  void softmax_grad_row(float* p, float* ds, int n, float lse, float D);                          \
  /* Returns -log softmax(z)[target]; z [V] becomes (softmax(z) - onehot(target)) * scale */       \
  double cross_entropy_row(float* z, int V, int target, double scale);

struct KernelTable {
  decltype(&hm::cpu::rmsnorm) rmsnorm;
  decltype(&hm::cpu::conv1d_silu) conv1d_silu;
  decltype(&hm::cpu::selective_scan) selective_scan;
  decltype(&hm::cpu::rope) rope;
  decltype(&hm::cpu::attention) attention;
  decltype(&hm::cpu::attention_f16kv) attention_f16kv;
  decltype(&hm::cpu::store_f16) store_f16;
  decltype(&hm::cpu::swiglu) swiglu;
  decltype(&hm::cpu::relu2) relu2;
  decltype(&hm::cpu::exp_sum) exp_sum;
  // linear for m <= linear_rows_max rows of x (gemv_cpu.cpp): W read once for all of them.
  // linear() runs more rows through sgemm. The most rows where it beat OpenBLAS, per ISA
  // (bench/results/cpu-amd-zen5-2026-12-05/linear_rows.txt, an AMD EPYC Zen 5 where the
  // environment sets OPENBLAS_CORETYPE=Haswell, so OpenBLAS ran its AVX2 kernels): avx512 64
  // (faster at every m to 128), avx2 16 (a tie at 16, sgemm 1.2x faster at 32), scalar 8. With
  // OpenBLAS's own choice there (Cooperlake, AVX-512) sgemm ties linear_rows at m 64 and wins
  // from 128 (linear_prefill_cooperlake.txt in the same folder): 64 holds either way.
  decltype(&hm::cpu::linear) linear_rows;
  int linear_rows_max;
  struct Grad {
    void (*scan_forward)(float*, const ScanGradArgs&, double*, int);
    void (*scan_backward)(float*, float*, float*, float*, float*, float*, float*, float*,
                          const float*, const ScanGradArgs&, const double*, int);
    void (*ssd_backward)(float*, int, float*, int, float*, float*, int, float*, float*, float*, const float*, int,
                         const SsdGradArgs&);
    void (*conv1d_silu_backward)(float*, float*, float*, const float*, const float*, const float*,
                                 const float*, int, int, int);
    float (*softmax_causal_row)(float*, int, int);
    void (*softmax_grad_row)(float*, float*, int, float, float);
    double (*cross_entropy_row)(float*, int, int, double);
  } grad;
};

// Each ISA's table (isa_table.cpp, compiled once per ISA).
namespace scalar { KernelTable kernel_table(); }
namespace avx2 { KernelTable kernel_table(); }
namespace avx512 { KernelTable kernel_table(); }

const KernelTable& kernels();  // the table in use
Isa kernel_isa();              // its ISA
// Tests and benchmarks: hm::Error if this CPU does not support isa. Not thread-safe: call it
// while no kernel runs.
void set_kernel_isa(Isa isa);

// How linear() (linear_cpu.cpp) runs more than linear_rows_max rows: OpenBLAS's sgemm, or the
// per-row kernel in blocks of linear_rows_max rows (which, like every linear_rows call, gives
// each row the bits it gets alone). Auto: blocks where our kernels use wider vectors than the
// sgemm of the core OpenBLAS chose (blas_core_level), else sgemm. Measured: AVX-512 kernels
// against OpenBLAS's AVX2 Haswell core (OPENBLAS_CORETYPE=Haswell in the environment, as on this
// project's Zen 5 build host): blocks 1.2-1.9x at m 256 and 2048
// (bench/results/cpu-amd-zen5-2026-12-05/linear_prefill.txt); against its SSE Prescott core (what
// it picks on a CPU it does not know, as the H200 host's Xeon): avx512 3.1-4.0x, avx2 1.2-1.7x
// (cpu-amd-zen5-2026-12-06/linear_prefill_prescott.txt); its AVX-512 sgemm beat the avx512 blocks 1.1-1.8x
// (linear_prefill_cooperlake.txt) and its Haswell sgemm the avx2 blocks 1.6x (_prescott.txt).
// HM_LINEAR=blas|blocks forces one at startup.
enum class LinearLarge { Auto, Blas, Blocks };
bool linear_large_in_blocks();           // the rule above for the ISA in use
// The rule itself: 2 for OpenBLAS cores with AVX-512 sgemm kernels, 1 with AVX2, else 0; blocks
// where the ISA's level (avx512 2, avx2 1, scalar 0) is higher.
int blas_core_level(const std::string& core);
bool blocks_beat_blas(Isa isa, const std::string& core);
// y = x . W^T by linear_rows on blocks of linear_rows_max rows of x (W contiguous, [n, k]).
void linear_in_blocks(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n, int k,
                      bool accumulate);
const char* blas_core();                 // OpenBLAS's name of the core it chose (openblas_get_corename)
// Tests and benchmarks: not thread-safe, like set_kernel_isa.
void set_linear_large(LinearLarge mode);
LinearLarge linear_large_mode();

}  // namespace hm::cpu
