// Fast float forward/backward blocks for training: the CPU backend's training ops
// (backend/host_backend.h) call the pieces (gemms, conv backward, attention core, LM head);
// train/model_grad.cpp composes its layers from those ops. The whole-block functions below
// (mamba_block_*, attention_block_*, mlp_block_*, bridge_*) are no longer on the training path:
// the tests keep them as a second check of the pieces.
//
// Same signatures and conventions as the reference pairs in kernels/ref/mamba_grad_ref.h and
// kernels/ref/attention_grad_ref.h (param gradients +=, activation gradients =, same saved
// activations), but every matrix product goes through OpenBLAS sgemm (float accumulation), and
// the elementwise pieces that are cheap stay the reference ones. The double / long double
// instantiations of the reference remain the oracle these are tested against
// (tests/test_model_grad.cpp, ModelGrad.FastFloatMatchesDoubleReference).
//
// Called from inside an OpenMP parallel region (one sequence per thread): OpenBLAS's OpenMP
// build then runs each sgemm on the calling thread.
#pragma once
#include <cstdint>

#include "kernels/ref/attention_grad_ref.h"
#include "kernels/ref/mamba_grad_ref.h"

namespace hm::cpu::grad {

namespace G = hm::ref::grad;

// y[m,n] (= or +=) x[m,k] W[n,k]^T, with row strides ldy, ldx, ldw (0 = packed).
void gemm_xwT(float* y, const float* x, const float* W, int m, int n, int k, bool accumulate = false,
              int ldy = 0, int ldx = 0, int ldw = 0);
// dx[m,k] (= or +=) dy[m,n] W[n,k]
void gemm_dyW(float* dx, const float* dy, const float* W, int m, int n, int k, bool accumulate,
              int ldx = 0, int ldy = 0, int ldw = 0);
// dW[n,k] += dy[m,n]^T x[m,k]
void gemm_dyTx(float* dW, const float* dy, const float* x, int m, int n, int k, int ldw = 0,
               int ldy = 0, int ldx = 0);

// ref::grad::conv1d_silu_backward (dx assigned, dw and db accumulated), SIMD across channels.
void conv1d_silu_backward(float* dx, float* dw, float* db, const float* dout, const float* x,
                          const float* w, const float* b, int L, int E, int K);

void mamba_block_forward(float* out, G::MambaActs<float>& a, const float* u,
                         const G::MambaWeights<float>& w, const G::MambaDims& s, int L,
                         int scan_chunk);
void mamba_block_backward(float* du, const G::MambaGrads<float>& g, const float* dout,
                          const float* u, const G::MambaWeights<float>& w,
                          const G::MambaActs<float>& a, const G::MambaDims& s,
                          const float* dyg_extra);

// The causal attention core of ref::grad::attention_forward / attention_backward (same layout
// and lse convention), through sgemm on a materialized L x L score matrix per head.
void attention_core_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                            int L, int H, int G, int hd);
void attention_core_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                             const float* k, const float* v, const float* out, const float* lse,
                             int L, int H, int G, int hd);
// ref::grad::rope_backward at pos0 = 0, on the fast forward kernel.
void rope_backward(float* dx, int L, int heads, int hd, float theta);

void attention_block_forward(float* out, G::AttnSaved<float>& s, const float* u,
                             const G::AttnWeights<float>& w, const G::AttnShape& c);
void attention_block_backward(float* du, const G::AttnWeightGrads<float>& gw, const float* dout,
                              const float* dinner, const float* u, const G::AttnWeights<float>& w,
                              const G::AttnSaved<float>& s, const G::AttnShape& c);

void mlp_block_forward(float* out, G::MlpSaved<float>& s, const float* m,
                       const G::MlpWeights<float>& w, int n, int D, int F);
void mlp_block_backward(float* dm, const G::MlpWeightGrads<float>& gw, const float* dout,
                        const float* m, const G::MlpWeights<float>& w, const G::MlpSaved<float>& s,
                        int n, int D, int F);

void bridge_forward(float* h_out, const float* h, const float* y, const float* W,
                    const float* gate, int n, int D, int S);
void bridge_backward(float* dy, float* dW, float* dgate, const float* dh_out, const float* y,
                     const float* W, const float* gate, int n, int D, int S);

// LM head + cross-entropy over n rows: logits = hn W^T, in row blocks (never n x V at once).
// Returns the SUM over counted rows (target >= 0) of -log softmax(logits)[target]; dhn is
// assigned and dW accumulated with dlogits scaled by `scale` (1 / the batch's counted total).
double cross_entropy_forward_backward(float* dhn, float* dW, const float* hn, const float* W,
                                      const int32_t* targets, int n, int D, int V, double scale);

}  // namespace hm::cpu::grad
