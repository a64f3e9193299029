// CUDA kernels of the training ops besides the Mamba ones (issue 15; Backend's training ops in
// backend/backend.h): the GEMMs of the linear and LM-head backward passes, RMSNorm, SwiGLU and
// RoPE backward, the embedding's gradient scatter, the LM head's softmax / cross-entropy rows,
// and flash-style causal attention forward (with lse) and backward over a ragged batch.
//
// Activations are T = float, __nv_bfloat16 or __half; parameter gradients G are T or float.
// Every sum runs in float and every reduction has one fixed order (no atomics): a rerun gives
// the same bits. Pointers are device memory; launches go on `stream` without waiting.
// Plain C++ (no device code), so host files compiled by g++ can call these.
#pragma once
#include <cuda_runtime.h>
#include <library_types.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "kernels/cuda/cuda_ops.h"

namespace hm::cuda {

// Row-major GEMMs with either operand transposed, on cuBLAS (cublasGemmEx, CUBLAS_COMPUTE_32F:
// float accumulation, never TF32, split-K parts reduced in float): the backward passes need
// dy W and dy^T x, which linear.h's y = x W^T does not express.
class Blas {
 public:
  Blas();  // cuBLASLt and cuBLAS handles and their workspace on the current device (hm::Error on failure)
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;

  // C[m,n] (=|+=) op(A) . op(B): op(A) is A [m,k] (lda), or with ta the transpose of A [k,m];
  // op(B) is B [k,n] (ldb), or with tb the transpose of B [n,k]. A and B of type tin (f32, bf16,
  // f16), C of tin or f32. k = 0 writes zeros (or leaves C when accumulating).
  void gemm(void* C, cudaDataType_t tc, int64_t ldc, const void* A, int64_t lda, bool ta, const void* B,
            int64_t ldb, bool tb, cudaDataType_t tin, int m, int n, int k, bool accumulate, cudaStream_t stream);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// RMSNorm backward, rstd recomputed from x (rows of d, own strides): dx (=|+=) dout w r -
// x r^3 mean(dout w x); dw += sum over rows of dout x r, summed per chunk of rows and then over
// chunks, in order. `workspace` holds rmsnorm_backward_workspace_bytes(n, d) bytes.
template <class T, class G>
void rmsnorm_backward(T* dx, int lddx, G* dw, const T* dout, int ldg, const T* x, int ldx, const T* w, int n, int d,
                      float eps, bool accumulate_dx, void* workspace, cudaStream_t stream);
size_t rmsnorm_backward_workspace_bytes(int n, int d);

// out = silu(g) u: dg = dout u silu'(g), du = dout silu(g) (every tensor its own row stride).
template <class T>
void swiglu_backward(T* dg, int lddg, T* du, int lddu, const T* dout, int ldo, const T* g, int ldgg, const T* u,
                     int ldu, int n, int f, cudaStream_t stream);

// out = relu2(x) = max(x, 0)^2: dx = dout 2 max(x, 0) (each its own row stride; dx may alias dout).
template <class T>
void relu2_backward(T* dx, int lddx, const T* dout, int ldo, const T* x, int ldx, int n, int f, cudaStream_t stream);

// RoPE's transpose in place on dx [n_tokens, heads * hd] (the rotation by -angle), positions
// and angles as rope's (cuda_ops.h).
template <class T>
void rope_backward(T* dx, int ldx, int heads, int hd, const RaggedBatch& rb, float theta, cudaStream_t stream);

// dtable[ids[i]] += dout[i]: the rows of the batch grouped by id (host-built, uploaded):
// segment s holds the batch rows order[seg[s] .. seg[s+1]) (ascending), all of id seg_id[s].
// One thread per (segment, column) sums its rows in that order and adds once: deterministic,
// no atomics, whatever the repeats.
template <class T, class G>
void embedding_backward(G* dtable, int ldt, const T* dout, int ldo, const int32_t* order, const int32_t* seg,
                        const int32_t* seg_id, int nseg, int d, cudaStream_t stream);

// The cross-entropy rows of the fused LM head: z [n, V] logits (dense, of TZ: float, or the compute
// type T); for target t = targets[i] >= 0, loss[i] = logsumexp(z_i) - z_i[t] and dz_i = (softmax(z_i)
// - onehot(t)) * scale (float math); rows with t < 0 get loss 0 and dz 0. dz [n, V] (dense, of TD)
// may be z itself when TZ = TD. A row that fits in shared memory is read from HBM once; longer rows
// take three reading passes. Instantiated for <T, T> and <float, T>.
template <class TZ, class TD>
void cross_entropy_rows(TD* dz, const TZ* z, const int32_t* targets, float* loss, int n, int V, float scale,
                        cudaStream_t stream);

// Causal GQA attention for training (each sequence of rb over its own rows; slots and pos0 are
// not read): q, out [n_tokens, H * hd]; k, v [n_tokens, G * hd]; lse [n_tokens, H] float (ldl)
// = log sum_j exp(q.k_j / sqrt(hd)). Flash-style, no L x L matrix: bf16/f16 at hd 64 and 128 on
// the tensor cores (mma.sync m16n8k16, float accumulate; 64-query tiles stream 64-key tiles
// through shared memory by cp.async, double-buffered, online softmax in float, P rounded to T
// for P V as flash-attention does); f32 and every other hd take float kernels (32 x 32 tiles).
// Sequences of at most 65535 x 32 rows; hd <= kMaxTrainHeadDim.
constexpr int kMaxTrainHeadDim = 256;
template <class T>
void attention_train(T* out, int ldo, float* lse, int ldl, const T* q, int ldq, const T* k, int ldk, const T* v,
                     int ldv, const RaggedBatch& rb, int H, int G, int hd, cudaStream_t stream);

// Its backward, P recomputed from q, k and lse: D = rowsum(dout * out) per (row, head), then one
// kernel per key tile and kv head (dk, dv summed over the group's query heads and the query
// tiles in order) and one per query tile and head (dq): no atomics. dq, dk, dv assigned. On the
// tensor cores as the forward (bf16/f16, hd 64 and 128): 64-key blocks stream 64-query tiles
// (32 at hd 128) and 64-query blocks 64-key tiles (32 at hd 128); P and dS rounded to T as the
// mma operands, every sum float.
// `workspace` holds attention_backward_workspace_bytes(n_tokens, H) bytes.
template <class T>
void attention_backward(T* dq, int lddq, T* dk, int lddk, T* dv, int lddv, const T* dout, int ldg, const T* q,
                        int ldq, const T* k, int ldk, const T* v, int ldv, const T* out, int ldo, const float* lse,
                        int ldl, const RaggedBatch& rb, int H, int G, int hd, void* workspace, cudaStream_t stream);
size_t attention_backward_workspace_bytes(int n_tokens, int H);

// ---- Bridges, mixed precision and the optimizer (optim.cu) ----

// The backward of dst += src * scale (per column): dsrc = ddst * scale (assigned) and dscale +=
// the column sums of ddst * src, summed per chunk of kScaleRows rows and then over the chunks in
// order (no atomics). `workspace` holds scale_cols_backward_workspace_bytes(n, d) bytes.
template <class T, class G>
void scale_cols_backward(T* dsrc, int ldds, G* dscale, const T* ddst, int lddd, const T* src, int lds,
                         const T* scale, int n, int d, void* workspace, cudaStream_t stream);
size_t scale_cols_backward_workspace_bytes(int n, int d);

// out[r] = a[a_idx ? a_idx[r] : r] . b[r] in float (rows of d, own strides): an MoE gate's gradient.
template <class T>
void row_dots(float* out, const T* a, int lda, const int32_t* a_idx, const T* b, int ldb, int rows, int d,
              cudaStream_t stream);

// The True Hybrid router (Backend::router, kernels/ref/router_ref.h): the logits r [n] and,
// unless feats is null, the features [n, kRouterFeatures] (float) from u [n, D] (row stride ldu)
// and the float weights w [D], fw [kRouterFeatures], b [1]; chunk > 0 broadcasts each chunk's
// first logit through s_tmp [n] (r itself when chunk == 0). state null: each sequence from
// position 0 with an empty EMA; else the analyzer pool [slots][D + 1] (EMA, chunk logit) that
// each sequence continues at rb.pos0 and that is brought up to date. D <= kMaxRouterWidth: the
// EMA [D] and the sums fit the 48 KB of shared memory a block has without opting in.
constexpr int kMaxRouterWidth = 12000;
template <class T>
void router(float* r, float* s_tmp, float* feats, const T* u, int ldu, int D, const float* w, const float* fw,
            const float* b, const RaggedBatch& rb, int chunk, float* state, cudaStream_t stream);

// dst = src converted (round to nearest even), rows x cols, each its own row stride.
template <class TD, class TS>
void convert(TD* dst, int64_t ldd, const TS* src, int64_t lds, int rows, int cols, cudaStream_t stream);

// The optimizer's work list: the arena cut into chunks of at most kOptChunk elements, in
// tensor order, each with its tensor's weight decay (built on the host, uploaded).
constexpr int kOptChunk = 16384;
struct OptChunk {
  int64_t offset;
  int32_t n;
  float weight_decay;
};
// partial[c] = sum over chunk c of x^2 in double, one fixed reduction tree per chunk.
void sum_squares(double* partial, const float* x, const OptChunk* chunks, int n_chunks, cudaStream_t stream);
// Backend::adamw_step's update of every chunk.
void adamw_step(float* p, const float* g, float* m, float* v, const OptChunk* chunks, int n_chunks, float lr,
                float beta1, float beta2, float eps, float inv_bc1, float inv_bc2, float grad_scale,
                cudaStream_t stream);

}  // namespace hm::cuda
