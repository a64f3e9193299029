// y[m,n] (=|+=) x[m,k] . W[n,k]^T on the device through cuBLASLt (the contract of ref::linear,
// row-major with leading dimensions, so column views of wider matrices work). bf16/f16 inputs
// accumulate in float and write the same type or float (the LM head's float logits); float
// inputs run in true float (CUBLAS_COMPUTE_32F, never TF32) so an f32 model matches the CPU.
// Plain C++ (no device code); the cuBLAS types stay inside linear.cu.
#pragma once
#include <cuda_runtime.h>
#include <library_types.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace hm::cuda {

class Gemm {
 public:
  // Creates the cuBLASLt and cuBLAS handles and a workspace of `workspace_bytes` on the current
  // device (hm::Error naming the call on failure).
  explicit Gemm(size_t workspace_bytes = size_t(32) << 20);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // x and W of type `tin` (CUDA_R_32F, CUDA_R_16BF or CUDA_R_16F); y of type `ty` (tin or
  // CUDA_R_32F). Leading dimensions in elements: ldx >= k, ldw >= k, ldy >= n. The matmul plan
  // (descriptors and the heuristic's first algorithm) is cached per shape, types, leading
  // dimensions and pointer alignment, so repeated shapes (decode steps) do not re-query. A
  // shape cuBLASLt rejects runs through cublasGemmEx instead.
  void linear(void* y, cudaDataType_t ty, int64_t ldy, const void* x, int64_t ldx, const void* W,
              int64_t ldw, cudaDataType_t tin, int m, int n, int k, bool accumulate,
              cudaStream_t stream);

  // The general product for training: C[m,n] (=|+=) op(A) . op(B), op(A) = A [m,k] (lda) or with
  // ta the transpose of A [k,m], op(B) = B [k,n] (ldb) or with tb the transpose of B [n,k]; A and
  // B of tin, C of tin or f32. Plans cached as linear's. The algorithm (this and linear) comes
  // from the shape with each dimension rounded to its bucket (16,384 and 8,192 stay, 8,213 ->
  // 8,704) when cuBLASLt accepts it for the exact shape, so row counts that change every step
  // cost no new heuristic query (HM_CUDA_GEMM_BUCKETS=0: the exact shape's, every time).
  void gemm(void* C, cudaDataType_t tc, int64_t ldc, const void* A, int64_t lda, bool ta, const void* B, int64_t ldb,
            bool tb, cudaDataType_t tin, int m, int n, int k, bool accumulate, cudaStream_t stream);

  // Tests: route every call through cublasGemmEx (the fallback) instead of cuBLASLt.
  void set_use_lt(bool on) { use_lt_ = on; }
  // Batch invariance (Backend::set_batch_invariant): one cuBLASLt algorithm per (n, k, leading
  // dimensions, types, alignments) whatever m, chosen once at kInvariantRefRows rows with split-K
  // off, so each output element is one K loop in a fixed order and a row's bits do not depend on
  // how many rows are beside it. A shape that algorithm cannot run is an hm::Error, never a
  // silent fallback.
  void set_invariant(bool on) { invariant_ = on; }
  static constexpr int kInvariantRefRows = 64;
  // Calls that ran through the fallback since construction.
  int64_t fallback_calls() const { return fallbacks_; }
  // Cached plans (distinct shapes seen; the cache is dropped when it grows past a bound).
  size_t cached_plans() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  bool use_lt_ = true;
  bool invariant_ = false;
  int64_t fallbacks_ = 0;
};

}  // namespace hm::cuda
