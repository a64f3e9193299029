// CUDA kernels of the Mamba-1 and Mamba-2 paths, attention and the shared elementwise ops (docs/CUDA.md).
//
// Each op is the contract of kernels/ops.h (hm::ref is the oracle), with three changes:
//  - Activations and weights are T = float, __nv_bfloat16 or __half; every sum and every
//    recurrence runs in float, and the recurrent state (conv window, SSM state) is float.
//  - Ops that ran once per sequence (conv, scan, RoPE) take the whole ragged batch at once.
//  - Pointers are device pointers; every launch goes on `stream` and returns without waiting.
// Plain C++ (no device code), so host files compiled by g++ can call these.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hm::cuda {

// A ragged batch, as flash-attention's varlen interface: nseq sequences packed token-major.
// Sequence s owns rows [cu_seqlens[s], cu_seqlens[s+1]) of every activation, its recurrent
// state lives at index slots[s] of the state pools, and its first row is at absolute position
// pos0[s]. The three arrays are device memory; n_tokens and max_len are host copies that size
// the grids (so one batch shape can be captured in a CUDA graph).
struct RaggedBatch {
  const int32_t* cu_seqlens = nullptr;  // [nseq + 1], cu_seqlens[0] = 0, non-decreasing
  const int32_t* slots = nullptr;       // [nseq], distinct
  const int32_t* pos0 = nullptr;        // [nseq]; RoPE, kv_write and attention read it
  int nseq = 0;
  int n_tokens = 0;  // cu_seqlens[nseq]
  int max_len = 0;   // max over s of the chunk length
};

// Largest d_conv and d_state the kernels take (their windows and states live in registers).
constexpr int kMaxConv = 8;
constexpr int kMaxState = 64;

// out[n,d] = x * rsqrt(mean_d(x^2) + eps) * w
template <class T>
void rmsnorm(T* out, const T* x, const T* w, int n, int d, float eps, cudaStream_t stream);

// The residual add fused ahead of the next norm: h += delta (h stored as T), then
// out = rmsnorm(h) * w on the stored h, so the result equals add-then-rmsnorm exactly.
template <class T>
void add_rmsnorm(T* out, T* h, const T* delta, const T* w, int n, int d, float eps,
                 cudaStream_t stream);

// A state bridge folded into the output projection (Backend::linear_bridge's `folded`): t [m,
// 2n] holds x . W^T | x . (diag(scale) bW diag(norm_w))^T; per row, y += t[:, :n] + t[:, n:] *
// rsqrt(mean_k(x^2) + eps) (y stored as T once), then, with next_w, next = rmsnorm(y) * next_w
// on the stored y (the next layer's pre-norm).
template <class T>
void bridge_add(T* y, int ldy, const T* t, int ldt, const T* x, int ldx, int m, int n, int k, float eps,
                const T* next_w, T* next, int ldn, cudaStream_t stream);

// out[i,:] = table[ids[i],:]; ids are device memory and already validated against the vocab.
template <class T>
void embedding(T* out, const T* table, const int32_t* ids, int n, int d, cudaStream_t stream);

// out[n,f] = silu(g) * u; g and u share the row stride ldgu.
template <class T>
void swiglu(T* out, int ldo, const T* g, const T* u, int ldgu, int n, int f, cudaStream_t stream);
// out[n,f] = max(x, 0)^2, float math
template <class T>
void relu2(T* out, int ldo, const T* x, int ldx, int n, int f, cudaStream_t stream);

// Prefill: causal depthwise conv + bias + SiLU over every sequence of the batch, each
// continuing from conv_state[slots[s]] ([E, K-1] float, oldest first) and leaving there its
// last K-1 inputs. x [n_tokens, E] (ldx), w [E, K], b [E], out [n_tokens, E] (ldo).
template <class T>
void conv1d_silu(T* out, int ldo, float* conv_state, const T* x, int ldx, const T* w, const T* b,
                 const RaggedBatch& rb, int E, int K, cudaStream_t stream);

// Decode: one token per sequence (row s of x and out), one launch for the batch.
template <class T>
void conv1d_silu_step(T* out, int ldo, float* conv_state, const int32_t* slots, const T* x, int ldx,
                      const T* w, const T* b, int nseq, int E, int K, cudaStream_t stream);
// The same step with the pre-norm's 1 / rms applied after the projection: xz [nseq, 2E] (ldxz)
// holds h . in_proj^T for rows h [nseq, D] (ldh) and an in_proj whose columns carry the norm's
// weight; each row s becomes xz[s] / rms(h[s]) (rounded to T, in place, x and z alike), then the
// conv step reads its first E columns as conv1d_silu_step reads x.
template <class T>
void conv1d_silu_step_normed(T* out, int ldo, float* conv_state, const int32_t* slots, T* xz, int ldxz,
                             const T* h, int ldh, int D, float eps, const T* w, const T* b, int nseq, int E, int K,
                             cudaStream_t stream);

// Prefill selective scan over the ragged batch, continuing from ssm_state[slots[s]] ([E, N]
// float) and leaving the final state there. A [E, N] float holds -exp(A_log); the other
// arguments are those of ref::selective_scan, token-major over the batch.
//
// Parallel in time: each sequence is cut into chunks of `chunk` tokens; pass 1 scans every
// chunk from a zero state (its end state and sum of delta), pass 2 carries the true state
// across chunks, pass 3 rescans every chunk from its true start state and writes y. When the
// longest sequence fits one chunk, pass 3 alone runs. chunk = 0 picks a length that fills the
// GPU (scan_chunk_auto). `workspace` holds selective_scan_workspace_bytes(...) bytes.
template <class T>
void selective_scan(T* y, int ldy, float* ssm_state, const T* x, int ldx, const T* dt, int lddt,
                    const T* dt_bias, const float* A, const T* B, const T* C, int ldbc,
                    const T* Dskip, const T* z, int ldz, const RaggedBatch& rb, int E, int N,
                    int chunk, void* workspace, cudaStream_t stream);
int scan_chunk_auto(const RaggedBatch& rb, int E);
size_t selective_scan_workspace_bytes(const RaggedBatch& rb, int E, int N, int chunk);

// The same scan for a few short sequences (scan_short_fits: N <= 16, none longer than
// kScanShortLen tokens, at most scan_short_tokens() in all: kScanShortTokensDefault unless
// HM_CUDA_SCAN_SHORT_TOKENS says otherwise, 0 turns it off): one launch that walks each
// sequence's tokens in order, 4 threads per channel, no workspace. H100, 1.3B hybrid (stop 38,
// bench/results/gpu-2026-12-06-stop38/): prefills of 1 x 52 tokens 4.5 -> 3.8 ms and 64 x 4
// 6.5 -> 5.6 ms; uniform batches of 64 x 16 tokens lost to the chunked passes' staged tiles
// (9.0 -> 11.6 ms) before the token bound kept them there.
// Its sum over the states runs in another order than selective_scan's, so the backend's
// batch-invariant mode never takes it (the choice depends on the batch).
constexpr int kScanShortLen = 64;
constexpr int kScanShortTokensDefault = 256;
int scan_short_tokens();
bool scan_short_fits(const RaggedBatch& rb, int N);
template <class T>
void selective_scan_short(T* y, int ldy, float* ssm_state, const T* x, int ldx, const T* dt, int lddt,
                          const T* dt_bias, const float* A, const T* B, const T* C, int ldbc, const T* Dskip,
                          const T* z, int ldz, const RaggedBatch& rb, int E, int N, cudaStream_t stream);

// Decode: one token per sequence (row s of every input), the state of slot slots[s] updated.
template <class T>
void selective_scan_step(T* y, int ldy, float* ssm_state, const int32_t* slots, const T* x, int ldx,
                         const T* dt, int lddt, const T* dt_bias, const float* A, const T* B,
                         const T* C, int ldbc, const T* Dskip, const T* z, int ldz, int nseq, int E,
                         int N, cudaStream_t stream);

// Mamba-2 (SSD) scan over the ragged batch (ssd.cu): ref::ssd_scan for every sequence,
// continuing from ssm_state[slots[s]] ([H, P, N] float, dense slots) and leaving the final state
// there; a decode batch (one row per sequence) is the same call. x, y [n_tokens, H * P]; dt
// [n_tokens, H] (raw); B, C [n_tokens, G * N] share ldbc; A [H] float (-exp(A_log)); dt_bias,
// Dskip [H]. N <= kMaxSsdState.
constexpr int kMaxSsdState = 256;
template <class T>
void ssd_scan(T* y, int ldy, float* ssm_state, const T* x, int ldx, const T* dt, int lddt, const T* dt_bias,
              const float* A, const T* B, const T* C, int ldbc, const T* Dskip, const RaggedBatch& rb, int H, int P,
              int G, int N, float dt_min, float dt_max, cudaStream_t stream);
// The same in the chunked matrix form (ssd_grad.cu: per chunk of 32 tokens, products in shared
// memory, tensor cores for bf16 and f16), which ssd_scan takes for prefills where it fits the
// device (ssd_scan_chunked_fits; not with HM_CUDA_SSD_FORWARD=serial or
// HM_CUDA_SSD_BACKWARD=reference).
bool ssd_scan_chunked_fits(int P, int N);
template <class T>
void ssd_scan_chunked(T* y, int ldy, float* ssm_state, const T* x, int ldx, const T* dt, int lddt, const T* dt_bias,
                      const float* A, const T* B, const T* C, int ldbc, const T* Dskip, const RaggedBatch& rb, int H,
                      int P, int G, int N, float dt_min, float dt_max, cudaStream_t stream);

// Mamba-2 training (ssd_grad.cu), every sequence of rb from a zero state; training batches put
// sequence s in slot s. ssd_scan_train: the inference scan over a zeroed pool, A = -exp(A_log)
// [H] float formed inside (workspace: ssd_train_workspace_bytes). ssd_scan_backward:
// ref::grad::ssd_scan_backward (dx, ddt, dB, dC assigned; ddt_bias, dA_log, dDskip float [H]
// accumulated; workspace: ssd_backward_workspace_bytes). gated_rmsnorm_backward:
// ref::grad::gated_rmsnorm_backward (dy, dz assigned; dw float [E] accumulated; workspace:
// gated_rmsnorm_backward_workspace_bytes). Deterministic: every sum in a fixed order.
size_t ssd_train_workspace_bytes(const RaggedBatch& rb, int H, int P, int N);
size_t ssd_backward_workspace_bytes(const RaggedBatch& rb, int H, int P, int N);
// The most bytes of per-(sequence, head) scratch ssd_scan_backward's workspace holds (default
// 1 GiB): beyond it the blocks run in slices of sequences (tests set it small to slice).
void set_ssd_backward_scratch_cap(size_t bytes);
size_t ssd_backward_scratch_cap();
// Chunks of kQ = 32 tokens a segment of the chunked backward (its blocks split a sequence into
// segments when sequences x heads would not fill the device); 0 (default): its own choice.
void set_ssd_backward_segment_chunks(int chunks);
// ssd_scan_backward's kernel: the chunked matrix form (ref::grad::ssd_scan_backward_chunked)
// wherever its shared memory fits the device (Auto, the default), else the token-serial one
// (Reference, also chosen by HM_CUDA_SSD_BACKWARD=reference; tests run both). Chunked where it
// does not fit is an error. The setting applies to the workspace size and the call alike.
enum class SsdBackward { Auto, Chunked, Reference };
void set_ssd_backward_kernel(SsdBackward k);
// The chunked kernel's threads a block: 0 (default) its own choice, else 256 or 512; and whether
// bf16 and f16 data run its products on the tensor cores (tf32 operands; default on). Tests run
// every form.
void set_ssd_backward_threads(int threads);
void set_ssd_backward_tensor_cores(bool on);
SsdBackward ssd_backward_kernel_for(int P, int N);  // Chunked or Reference
size_t gated_rmsnorm_backward_workspace_bytes(int n, int E, int group);
template <class T>
void ssd_scan_train(T* y, int ldy, const T* x, int ldx, const T* dt, int lddt, const T* dt_bias, const float* A_log,
                    const T* B, const T* C, int ldbc, const T* Dskip, const RaggedBatch& rb, int H, int P, int G,
                    int N, float dt_min, float dt_max, void* workspace, cudaStream_t stream);
template <class T>
void ssd_scan_backward(T* dx, int lddx, T* ddt, int lddt_out, T* dB, T* dC, int lddbc, float* ddt_bias, float* dA_log,
                       float* dDskip, const T* dy, int lddy, const T* x, int ldx, const T* dt, int lddt,
                       const T* dt_bias, const float* A_log, const T* B, const T* C, int ldbc, const T* Dskip,
                       const RaggedBatch& rb, int H, int P, int G, int N, float dt_min, float dt_max,
                       void* workspace, cudaStream_t stream);
template <class T>
void gated_rmsnorm_backward(T* dy, int lddy, T* dz, int lddz, float* dw, const T* dout, int lddo, const T* y, int ldy,
                            const T* z, int ldz, const T* w, int n, int E, int group, float eps, void* workspace,
                            cudaStream_t stream);

// Mamba-2's gated RMSNorm (ref::gated_rmsnorm): g = y * silu(z) in float, each group of `group`
// columns of a row scaled by rsqrt(mean(g^2) + eps), times w. y, z, out [n, E] (own strides).
template <class T>
void gated_rmsnorm(T* out, int ldo, const T* y, int ldy, const T* z, int ldz, const T* w, int n, int E, int group,
                   float eps, cudaStream_t stream);

// RoPE (rotate half) in place on x [n_tokens, heads, hd] (ldx); row t of sequence s is at
// position pos0[s] + t - cu_seqlens[s].
template <class T>
void rope(T* x, int ldx, int heads, int hd, const RaggedBatch& rb, float theta, cudaStream_t stream);

// KV cache of one attention layer: K and V each [n_slots, max_ctx, G * hd] elements of KV
// (bf16 or f16; float for the f32 model, which attention serves with a plain float kernel);
// slot i starts at i * slot_stride elements (16-byte aligned).
template <class KV>
struct KvPool {
  KV* k = nullptr;
  KV* v = nullptr;
  int max_ctx = 0;
  int64_t slot_stride = 0;
};

// Most query heads per kv head (H / G) the decode kernel takes (their queries live in registers).
constexpr int kMaxGroup = 8;
// Largest head_dim attention takes (32, 64 and 128 have fast kernels; others a plain one).
constexpr int kMaxAnyHd = 256;

// Rows t of k and v ([n_tokens, G * hd], row strides ldk, ldv) to slot slots[s] at positions
// pos0[s] + t - cu_seqlens[s], rounded to KV. The caller checks the positions against max_ctx
// on the host; the kernel writes nothing outside the pool.
template <class T, class KV>
void kv_write(const KvPool<KV>& pool, const T* k, int ldk, const T* v, int ldv, const RaggedBatch& rb, int G,
              int hd, cudaStream_t stream);

// Causal attention of every query row over its sequence's cache (written by kv_write first):
// row t of sequence s, at position p = pos0[s] + t - cu_seqlens[s], attends to keys 0..p of
// slot slots[s]. q [n_tokens, H * hd] (ldq), out likewise (ldo); query head j reads kv head
// j / (H / G); scale 1 / sqrt(hd). max_keys bounds pos0[s] + length over the
// batch (max_ctx always does).
//  - hd other than 32, 64 or 128 (up to kMaxAnyHd): one plain float kernel for prefill and
//    decode (CUDA cores, O(keys) per row), no workspace.
//  - max_len > 1 (prefill): flash kernel on the tensor cores; q and the softmax weights are
//    rounded to KV for the mma, every sum is float.
//  - max_len == 1 (decode): split-KV kernel (float math) plus a combine; H / G <= kMaxGroup;
//    `workspace` holds attention_workspace_bytes(...) bytes. split_kv false runs the flash
//    kernel for decode too: a query row's arithmetic is then the same whatever the batch holds
//    and wherever its prompt was cut (key tiles start at key 0), as batch invariance needs.
// k_new / v_new (row t of sequence s at row cu[s], stride ld_new; only where
// attention_writes_kv): the step's K/V rows, read from there and stored in the cache by the
// decode kernel itself, so no kv_write before it.
template <class T, class KV>
void attention(T* out, int ldo, const T* q, int ldq, const KvPool<KV>& pool, const RaggedBatch& rb, int H, int G,
               int hd, int max_keys, void* workspace, cudaStream_t stream, bool split_kv = true,
               const T* k_new = nullptr, const T* v_new = nullptr, int ld_new = 0);
// Whether attention() with k_new / v_new (kv_write fused) takes this step: a decode step
// (every sequence one row) on the split-KV kernels, a bf16/f16 cache of the activations' type.
bool attention_writes_kv(const RaggedBatch& rb, int hd, bool split_kv, bool cache_is_input_type);
size_t attention_workspace_bytes(const RaggedBatch& rb, int H, int G, int hd, int max_keys, bool split_kv = true);

}  // namespace hm::cuda
