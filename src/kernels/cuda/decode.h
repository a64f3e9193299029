// Kernels of the decode step (docs/CUDA.md, "Decode step"): at a few tokens per step every
// projection reads its whole weight matrix for a handful of rows, so the step is weight
// bandwidth plus a fixed cost per kernel. These cut both: a GEMV that streams the weights at
// full bandwidth (cuBLASLt's small-m kernels reach 0.7-2.8 TB/s of the H200's 4.2) and starts
// loading them before the previous kernel ends (programmatic dependent launch), with the
// Mamba layer's pre-norm and conv step fused into in_proj, and dt_proj fused into the scan
// step: 4 kernels per Mamba layer instead of 7 to 9.
// Plain C++ declarations, callable from g++-compiled files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hm::cuda {

// Rows the GEMV takes: bf16/f16 run on the tensor cores (one or two m16n8k16 tiles of rows,
// so up to 32, 8 with the fused norm); f32 (and shapes the tensor-core kernel does not take)
// run on the CUDA cores, one float sum per row, up to 8; with the row kernel on, 2..16 rows
// (x staged as floats, at most 96 KB of them) take its multi-row form first. More rows go to
// cuBLASLt.
constexpr int kGemvMaxRows = 32;
constexpr int kGemvMaxRowsCudaCores = 8;
constexpr int kGemvMaxRowsRow = 16;  // the row kernel (x staged as floats) at 2..16 rows
constexpr int kGemvMaxNormRows = 8;

// The conv step fused after in_proj: rows s < m of the output are sequences s (one token each),
// columns c0 + j (j < E) are the conv's input channels (c0 = 0 for Mamba-1's x | z, d_inner for
// Mamba-2's z | xBC | dt). Per channel: the window of slot slots[s] in state ([E, K-1] float,
// oldest first) is read and shifted, out[s, j] = silu(conv + b).
template <class T>
struct ConvStep {
  float* state = nullptr;
  const int32_t* slots = nullptr;
  const T* w = nullptr;  // [E, K]
  const T* b = nullptr;  // [E]
  T* out = nullptr;
  int ldo = 0;
  int c0 = 0;
  int E = 0;  // 0: no conv
  int K = 0;
};

// Whether gemv takes this shape: x, W (and norm_w) 16-byte aligned with row strides in whole
// 16-byte vectors, and either the tensor-core kernel's (2-byte types, k % 32 == 0, m <= 32, or
// <= 8 with norm_w) or the CUDA-core kernel's (k whole vectors, m <= 8), or, with the row kernel
// on, its multi-row form's (k whole vectors, m <= 16, m rounded up to 2, 4, 8 or 16 times k
// floats within 96 KB).
bool gemv_fits(int m, int k, const void* x, int64_t ldx, const void* W, int64_t ldw, const void* norm_w,
               size_t elem_bytes);
// Whether m in [2, kGemvMaxRowsRow] rows at k take the row kernel's multi-row form (it is on, k
// is whole 16-byte vectors, the staged float rows fit): what the backend sends there.
bool gemv_rows_fits(int m, int k, size_t elem_bytes);
// Whether bf16/f16 may take the tensor-core kernel: off unless HM_CUDA_GEMV_TC=1 (it measured
// slower); tests switch it to check both kernels.
void set_gemv_tensor_cores(bool on);
bool gemv_tensor_cores();
// Whether GEMVs of 1..16 rows take the row kernel (x staged once per block, 4 columns per warp): on
// unless HM_CUDA_GEMV_ROW=0 (measured faster on the H200, docs/CUDA.md); tests switch it.
void set_gemv_row_kernel(bool on);
bool gemv_row_kernel();

// y[m, n] (=|+=) x'[m, k] . W[n, k]^T, x' = x or, with norm_w, rmsnorm(x) * norm_w (eps);
// float sums, y rounded once. With conv (TY == T, not accumulating), the conv step above runs
// on the rounded y of its columns. With col_scale ([n], no conv), column j's sum is rounded to
// T and multiplied by col_scale[j] before it is added or stored: linear into a scratch row, then
// add_rows with that scale, in one launch. With gate ([m, k] at stride ldgate, norm_w given),
// Mamba-2's gated norm: x' = rmsnorm(x * silu(gate)) * norm_w over the whole row, in float.
// Call only where gemv_fits (with a gate, gemv_gate_fits).
template <class T, class TY>
void gemv(TY* y, int ldy, const T* x, int ldx, const T* W, int ldw, int m, int n, int k, bool accumulate,
          const T* norm_w, float eps, const ConvStep<T>* conv, cudaStream_t stream, const T* col_scale = nullptr,
          const T* gate = nullptr, int ldgate = 0);
// Whether gemv takes a gate at this shape: the row kernel's forms only (one row, or 2..16 rows
// where gemv_rows_fits), norm_w given, gate aligned as x.
bool gemv_gate_fits(int m, int k, const void* x, int64_t ldx, const void* W, int64_t ldw, const void* norm_w,
                    const void* gate, int64_t ldgate, size_t elem_bytes);

// One row, a layer's output projection and the next layer's state bridge over the same x[k]:
// y[j] = round(round(y[j] + x . W[j]) + scale[j] * round(rmsnorm(x) * norm_w . bW[j] / 1)),
// each rounding where the plain ops (linear accumulating, then norm_linear) store. Both
// matrices [n, k]. Call only where gemv_bridge_fits.
bool gemv_bridge_fits(int k, const void* x, const void* W, int64_t ldw, const void* bW, int64_t ldbw,
                      const void* norm_w, size_t elem_bytes);
template <class T>
void gemv_bridge(T* y, const T* x, const T* W, int ldw, const T* bW, int ldbw, const T* norm_w, float eps,
                 const T* scale, int n, int k, cudaStream_t stream);

// The selective-scan decode step with dt_proj fused: dt[s, e] = dt_r[s, :] . dt_w[e, :] (R
// columns, rounded to T as a stored dt would be), then selective_scan_step's contract.
template <class T>
void selective_scan_step_dt(T* y, int ldy, float* ssm_state, const int32_t* slots, const T* x, int ldx,
                            const T* dt_r, int lddtr, const T* dt_w, int R, const T* dt_bias, const float* A,
                            const T* B, const T* C, int ldbc, const T* Dskip, const T* z, int ldz, int nseq,
                            int E, int N, cudaStream_t stream);

}  // namespace hm::cuda
