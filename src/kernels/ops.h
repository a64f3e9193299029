// Kernel signatures shared by every CPU implementation of an op.
// hm::ref (kernels/ref/) holds the plain loops that read like docs/MODEL.md: the oracle.
// hm::cpu (kernels/cpu/) holds the fast versions (BLAS, OpenMP, SIMD); tests/test_kernels.cpp
// compares each against ref on random inputs at odd sizes.
//
// Layout: row-major, token-major. `ld*` are row strides in elements, so a kernel can read a
// column slice of a wider matrix (x and z are the two halves of in_proj's output). All float32,
// except a KV cache that may be stored as IEEE binary16 bits (uint16_t).
#pragma once
#include <cstdint>

#define HM_DECLARE_KERNELS                                                                         \
  /* out[n,d] = x[n,d] * rsqrt(mean_d(x^2) + eps) * w[d] */                                        \
  void rmsnorm(float* out, const float* x, const float* w, int n, int d, float eps);              \
  /* y[m,n] (=|+=) x[m,k] . W[n,k]^T ; W is a PyTorch Linear weight [out, in] */                    \
  void linear(float* y, int ldy, const float* x, int ldx, const float* W, int m, int n, int k,    \
              bool accumulate);                                                                    \
  /* One sequence: causal depthwise conv over L tokens continuing from state, + bias, SiLU.       \
     x [L,E] (ldx), w [E,K], b [E], state [E,K-1] = the previous K-1 inputs, oldest first;         \
     state is updated to the last K-1 inputs. out [L,E] (ldo). */                                  \
  void conv1d_silu(float* out, int ldo, float* state, const float* x, int ldx, const float* w,    \
                   const float* b, int L, int E, int K);                                           \
  /* One sequence: selective scan continuing from state [E,N] (updated in place).                 \
     delta = softplus(dt[t,e] + dt_bias[e]); s = exp(delta*A) * s + delta*B[t]*x[t,e];             \
     y[t,e] = (s . C[t] + Dskip[e]*x[t,e]) * silu(z[t,e]).                                         \
     x,dt,z,y [L,E] with their own ld; B,C [L,N] share ldbc; A [E,N] holds -exp(A_log). */          \
  void selective_scan(float* y, int ldy, float* state, const float* x, int ldx, const float* dt,  \
                      int lddt, const float* dt_bias, const float* A, const float* B,              \
                      const float* C, int ldbc, const float* Dskip, const float* z, int ldz,       \
                      int L, int E, int N);                                                        \
  /* One sequence: the Mamba-2 (SSD) recurrence continuing from state [H, P, N] (updated in     \
     place; head h's P x N block at state + h*P*N). Head h reads group g = h / (H/G) of B and C. \
     delta = clamp(softplus(dt[t,h] + dt_bias[h]), dt_min, dt_max); a = exp(delta * A[h]);       \
     s[h][p,n] = a * s[h][p,n] + delta * x[t,h*P+p] * B[t,g*N+n];                                \
     y[t,h*P+p] = sum_n s[h][p,n] * C[t,g*N+n] + Dskip[h] * x[t,h*P+p].                          \
     x, y [L, H*P] with their own ld; dt [L, H] (lddt); B, C [L, G*N] share ldbc;                \
     A, dt_bias, Dskip [H] (A holds -exp(A_log)). */                                              \
  void ssd_scan(float* y, int ldy, float* state, const float* x, int ldx, const float* dt,        \
                int lddt, const float* dt_bias, const float* A, const float* B, const float* C,     \
                int ldbc, const float* Dskip, int L, int H, int P, int G, int N, float dt_min,      \
                float dt_max);                                                                     \
  /* Gated RMSNorm (Mamba-2, norm_before_gate false): g = y * silu(z), then each group of         \
     `group` columns of a row is scaled by rsqrt(mean(g^2 over the group) + eps), times w[j].     \
     y, z, out [n, E] with their own ld; E % group == 0. */                                      \
  void gated_rmsnorm(float* out, int ldo, const float* y, int ldy, const float* z, int ldz,       \
                     const float* w, int n, int E, int group, float eps);                          \
  /* RoPE ("rotate half") in place on x [L, heads, hd] (ldx) at positions pos0 .. pos0+L-1. */     \
  void rope(float* x, int ldx, int L, int heads, int hd, int pos0, float theta);                  \
  /* One sequence: L queries at positions pos0.. attend causally to cached keys 0..pos0+t.        \
     q [L,H*hd] (ldq); k, v [>= pos0+L, G*hd] contiguous; out [L,H*hd] (ldo).                     \
     Query head j reads kv head j / (H/G); scale 1/sqrt(hd). */                                    \
  void attention(float* out, int ldo, const float* q, int ldq, const float* k, const float* v,    \
                 int L, int pos0, int H, int G, int hd);                                           \
  /* attention with a half-precision cache: k, v hold IEEE binary16 bits [>= pos0+L, G*hd];      \
     otherwise as attention. */                                                                    \
  void attention_f16kv(float* out, int ldo, const float* q, int ldq, const uint16_t* k,           \
                       const uint16_t* v, int L, int pos0, int H, int G, int hd);                  \
  /* dst[i*ld_dst + j] = f16(src[i*ld_src + j]) for i < n, j < d, round-to-nearest-even           \
     (cache writes) */                                                                             \
  void store_f16(uint16_t* dst, int ld_dst, const float* src, int ld_src, int n, int d);          \
  /* out[n,f] = silu(g[n,f]) * u[n,f]; g and u have row stride ldgu, out ldo */                    \
  void swiglu(float* out, int ldo, const float* g, const float* u, int ldgu, int n, int f);       \
  /* out[n,f] = max(x[n,f], 0)^2 (squared ReLU: Nemotron-H's MLP); x row stride ldx, out ldo */    \
  void relu2(float* out, int ldo, const float* x, int ldx, int n, int f);                          \
  /* out[i] = exp(x[i] - shift) for i < n (0 where x[i] - shift < -88, -inf included: below the   \
     smallest normal float), returns their sum (sampling's softmax over the vocabulary). */        \
  double exp_sum(float* out, const float* x, int n, float shift);

namespace hm::ref { HM_DECLARE_KERNELS }
namespace hm::cpu { HM_DECLARE_KERNELS }
