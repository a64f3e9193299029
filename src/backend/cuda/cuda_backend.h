// The CUDA backend (HM_CUDA=ON): the Backend interface on one NVIDIA device, every op enqueued
// on the backend's one stream (docs/CUDA.md).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <memory>

#include "backend/backend.h"

namespace hm {

// True when a CUDA device is present and the driver can run this build (cuda_available()).
bool cuda_available_impl();

// hm::Error naming cudaGetErrorString when no device is present or the driver is too old.
std::unique_ptr<Backend> make_cuda_backend();

// What the CUDA backend offers beyond the Backend interface (graph capture, tests).
class CudaBackend : public Backend {
 public:
  // The stream every op is enqueued on (capture it to build a CUDA graph of a decode step).
  virtual cudaStream_t stream() const = 0;
  // Grows the ops' device workspace (selective scan chunk states, split-KV attention partials)
  // to at least `bytes`. Ops grow it themselves when run outside a capture; during a stream
  // capture growing is an hm::Error, so reserve what the captured step needs first (a decode
  // step under capture sizes attention by max_ctx: see attention_workspace_bytes).
  virtual void reserve_workspace(size_t bytes) = 0;
  virtual size_t workspace_bytes() const = 0;
  // Tests: route linear through cublasGemmEx (cuBLASLt's fallback) instead of cuBLASLt.
  virtual void set_linear_fallback_only(bool on) = 0;
  // The decode kernels (kernels/cuda/decode.h: GEMV for one-row linear, the fused Mamba
  // input stage and dt scan). On unless HM_CUDA_GEMV=0; off, every op runs unfused on cuBLASLt
  // and the plain kernels (tests and benchmarks compare the two).
  virtual void set_decode_kernels(bool on) = 0;
  // The most sequences whose decode step runs dt_proj inside the scan (dt_scan); above, dt_proj is
  // a GEMM. Default -1: one sequence, or while sequences x dt_proj's bytes stay within 1.25 MB
  // (HM_CUDA_DT_SCAN_SEQS overrides); tests set it to run either kernel.
  virtual void set_dt_scan_seqs(int n) = 0;
  // The fewest rows a linear runs on the skinny GEMM with (kernels/cuda/skinny.h; up to 64 rows,
  // 16-bit weights of at most 4 MB); 0: never (the default unless HM_CUDA_SKINNY=1 or 2).
  virtual void set_skinny_min_rows(int rows) = 0;
  // Bytes held through alloc now (weights, caches, activations, op workspaces; not cuBLAS's own
  // workspace), and the most held since the last reset_peak: what torch.cuda.max_memory_allocated
  // reports, so benchmarks compare like with like, unaffected by other processes on the device.
  size_t allocated_bytes() const override = 0;
  size_t peak_allocated_bytes() const override = 0;
  void reset_peak() override = 0;
};

}  // namespace hm
