// CUDA kernels of the Mamba-1 training ops (issue 15; backend.h's conv1d_silu_train / _backward,
// selective_scan_train / _backward): the causal conv (conv_grad.cu) and the chunked selective
// scan that saves one state per chunk and recomputes the rest in its backward (scan_grad.cu).
//
// Activations are T = float, __nv_bfloat16 or __half; parameter gradients G are T or float and
// accumulate (+=), activation gradients are assigned. Every sum runs in float and every
// reduction over tokens or channels has one fixed order (partial sums in the workspace, no
// atomics): a rerun gives the same bits. Every sequence starts from zero state. Pointers are
// device memory; launches go on `stream` without waiting. Plain C++ (no device code).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/cuda_ops.h"

namespace hm::cuda {

// ---- Causal depthwise conv + bias + SiLU from a zero window (ref::grad::conv1d_silu_*) ----
// x, out [n_tokens, E] (own strides), w [E, K] (ldw), b [E]; K in [2, kMaxConv].
template <class T>
void conv1d_silu_train(T* out, int ldo, const T* x, int ldx, const T* w, int ldw, const T* b,
                       const RaggedBatch& rb, int E, int K, cudaStream_t stream);
// dx assigned; dw [E, K] (lddw) and db [E] accumulated: each block of kConvGradRows rows sums
// its part, then the parts are added in order. `workspace` holds
// conv1d_silu_backward_workspace_bytes(n_tokens, E, K) bytes.
template <class T, class G>
void conv1d_silu_backward(T* dx, int lddx, G* dw, int lddw, G* db, const T* dout, int ldg, const T* x, int ldx,
                          const T* w, int ldw, const T* b, const RaggedBatch& rb, int E, int K, void* workspace,
                          cudaStream_t stream);
size_t conv1d_silu_backward_workspace_bytes(int n_tokens, int E, int K);

// ---- Selective scan for training (ref::grad::selective_scan_forward / _backward_chunked) ----
// The saved layout: the float state entering every `chunk` tokens of each sequence, sequence by
// sequence, [sum_s ceil(L_s / chunk), E, N]. The kernels work on groups of at most kScanGroup
// tokens (a chunk is cut into ceil(chunk / kScanGroup) of them): the forward scans every group
// from zero, carries the states across groups and rescans each from its true start (as
// cuda_ops.h's prefill; for N <= 16 the forward's groups are longer, a multiple of kScanGroup
// sized to fill the GPU once, one thread per channel, and its output pass writes the saved
// states); the backward carries dL/dh across groups the same way in reverse, then per group
// starts each sub-chunk of 8 tokens from its entering state and, sub-chunk by sub-chunk in
// reverse, recomputes its 8 states into shared memory and runs the reverse step. For N <= 16
// the adjoint pass is one forward walk of each group from its chunk's saved state: it writes the
// state entering every sub-chunk to the workspace, and the group's adjoint from a zero one after
// it is sum_t dyc_t C_t prod_{s <= t} a_s, a running product of the same decays (one exp2 per
// state and token serves both); the per-channel scalars of the reverse step (sigmoid(dt + bias),
// dy silu(z), dz's factor) are staged once per (token, channel). Otherwise the gradient pass walks
// the group itself and keeps those states in registers. Channels are split over thread blocks (64 per
// block when N <= 16, else 8), each channel's N states over 2 (N <= 16: 8 each, inputs staged
// per tile in shared memory) or 16 threads.
constexpr int kScanGroup = 64;
constexpr int kScanTrainChunk = kScanGroup;  // chunk <= 0: saved states every 64 tokens

// Sizes of one call, from the Ragged's host lengths: scan_train_shape(...) once per batch.
struct ScanTrainShape {
  int E = 0, N = 0, chunk = 0;
  int nseq = 0, n_tokens = 0;
  int64_t chunks = 0;  // saved states per channel: sum over s of ceil(L_s / chunk)
  int64_t groups = 0;  // sum over s of the groups of L_s
  int max_groups = 0;  // the groups of the longest sequence
};
ScanTrainShape scan_train_shape(const int32_t* host_cu, int nseq, int E, int N, int chunk);
size_t scan_train_saved_bytes(const ScanTrainShape& sh);
size_t scan_train_workspace_bytes(const ScanTrainShape& sh, bool backward);

// The scan's inputs: x, dt, z [n_tokens, E]; B, C [n_tokens, N] sharing ldbc; dt_bias, Dskip [E]
// of T; A_log [E, N] (ldA) of T or float (a_log_f32), A = -exp(A_log) formed inside.
template <class T>
struct ScanTrainIn {
  const T *x = nullptr, *dt = nullptr, *dt_bias = nullptr, *B = nullptr, *C = nullptr, *Dskip = nullptr,
          *z = nullptr;
  int ldx = 0, lddt = 0, ldbc = 0, ldz = 0;
  const void* A_log = nullptr;
  int ldA = 0;
  bool a_log_f32 = false;
};

// y [n_tokens, E] (ldy); saved holds scan_train_saved_bytes(sh).
template <class T>
void selective_scan_train(T* y, int ldy, float* saved, const ScanTrainIn<T>& in, const RaggedBatch& rb,
                          const ScanTrainShape& sh, void* workspace, cudaStream_t stream);

// dx, ddt, dz [n_tokens, E] and dB, dC [n_tokens, N] assigned (own strides); ddt_bias, dDskip
// [E] and dA_log [E, N] (lddA) of G accumulated.
template <class T, class G>
struct ScanTrainGrad {
  T *dx = nullptr, *ddt = nullptr, *dB = nullptr, *dC = nullptr, *dz = nullptr;
  int lddx = 0, lddt = 0, lddB = 0, lddC = 0, lddz = 0;
  G *ddt_bias = nullptr, *dA_log = nullptr, *dDskip = nullptr;
  int lddA = 0;
};
template <class T, class G>
void selective_scan_backward(const ScanTrainGrad<T, G>& grad, const T* dy, int lddy, const float* saved,
                             const ScanTrainIn<T>& in, const RaggedBatch& rb, const ScanTrainShape& sh,
                             void* workspace, cudaStream_t stream);

}  // namespace hm::cuda
