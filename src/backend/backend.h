// One backend interface (as ggml): the model calls these ops on typed tensor views (tensor.h)
// that live in the backend's memory, over a whole ragged batch at once. The CPU backend is
// always present and loops today's kernels over the sequences; kernels/ref behind the same
// interface is the oracle. The CUDA backend (HM_CUDA=ON) implements it on the device;
// tests/test_backend_ops.cpp runs every op of every compiled backend against the reference.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/tensor.h"

namespace hm {

enum class Device : uint8_t { CPU, CUDA };
const char* device_name(Device d);
Device device_from_name(const std::string& name);  // "cpu" | "cuda", hm::Error otherwise

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  // Types the ops compute in (weights and activations), and KV cache types.
  virtual bool supports(DType t) const = 0;
  virtual bool supports_kv(DType t) const = 0;
  // The activation type a model gets on this backend when none is asked for.
  virtual DType default_dtype() const = 0;
  // Weight formats a linear's W may have on top of float32 activations (BF16, Q8_0, Q4_0:
  // HybridModel::set_weight_format); none unless the backend says so.
  virtual bool supports_weight_format(DType /*t*/) const { return false; }

  // Memory. Allocations are not zeroed.
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* p) = 0;
  virtual void to_device(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;  // within the backend
  // Many copies within the backend in one call, in any order among themselves (no span may
  // write what another reads or writes): a prefix-cache restore is ~100 small copies, and on a
  // GPU each copy() pays its own launch.
  struct CopySpan {
    void* dst;
    const void* src;
    size_t bytes;
  };
  virtual void copy_many(const std::vector<CopySpan>& spans) {
    for (const CopySpan& s : spans) copy(s.dst, s.src, s.bytes);
  }
  virtual void memzero(void* p, size_t bytes) = 0;
  virtual void synchronize() {}
  // Bytes held through alloc now, and the most held since the last reset_peak (what
  // torch.cuda.max_memory_allocated reports); 0 on a backend that does not count (host memory).
  virtual size_t allocated_bytes() const { return 0; }
  virtual size_t peak_allocated_bytes() const { return 0; }
  virtual void reset_peak() {}

  // Batch invariance (a server's greedy output must not depend on what runs beside it): every
  // row's result then depends only on its own sequence, not on the other rows of the batch, the
  // batch's size or mix of prompt chunks and decode steps, nor on where its prompt was cut into
  // chunks. Off by default: it costs speed (CPU: no sgemm for many rows; CUDA: fixed GEMM
  // algorithms, no decode-only kernels; docs/SERVING.md). A backend without the mode refuses it.
  virtual void set_batch_invariant(bool on) {
    HM_CHECK(!on, name(), ": no batch-invariant mode on this backend");
  }
  virtual bool batch_invariant() const { return false; }

  // Graphs (CUDA graphs): the ops issued between begin_capture() and end_capture() are recorded,
  // not run; replay() runs the recording again, on the same pointers, with whatever those
  // hold then. A backend without graphs says so and its callers run ops one by one.
  virtual bool supports_graphs() const { return false; }
  virtual void begin_capture() { throw Error(name() + ": no graph capture"); }
  virtual std::shared_ptr<void> end_capture() { throw Error(name() + ": no graph capture"); }
  virtual void replay(const std::shared_ptr<void>& /*graph*/) { throw Error(name() + ": no graph capture"); }

  // ---- Ops. Outputs first; shapes are checked by each backend (hm::Error naming the op). ----
  // out[n,d] = x * rsqrt(mean_d(x^2) + eps) * w
  virtual void rmsnorm(Tensor out, Tensor x, Tensor w, float eps) = 0;
  // y[m,n] (=|+=) x[m,k] . W[n,k]^T (W a PyTorch Linear weight); y may be F32 with lower-
  // precision x and W (the LM head writes float logits). With F32 x and y, W may be in a weight
  // format the backend supports (supports_weight_format): kernels/quant.h's linear_packed.
  virtual void linear(Tensor y, Tensor x, Tensor W, bool accumulate) = 0;
  // out[n,f] = silu(g) * u
  virtual void swiglu(Tensor out, Tensor g, Tensor u) = 0;
  // out[n,f] = max(x, 0)^2 (squared ReLU)
  virtual void relu2(Tensor out, Tensor x) = 0;
  // out[i,:] = table[ids[i],:] for i < out.rows; ids in backend memory, already validated.
  virtual void embedding(Tensor out, Tensor table, const int32_t* ids) = 0;
  // Causal depthwise conv + bias + SiLU of every sequence of rg, each continuing from its
  // slot's window in st ([E, K-1] float, oldest first) and leaving its last K-1 inputs there.
  // x, out [n_tokens, E]; w [E, K]; b [E].
  virtual void conv1d_silu(Tensor out, const StatePool& st, Tensor x, Tensor w, Tensor b,
                           const Ragged& rg) = 0;
  // Selective scan of every sequence of rg from its slot's state in st ([E, N] float, updated):
  // the contract of ref::selective_scan. A [E, N] float32 (-exp(A_log)) in backend memory;
  // B and C [n_tokens, N] views sharing one row stride.
  virtual void selective_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt, Tensor dt_bias,
                              const float* A, Tensor B, Tensor C, Tensor Dskip, Tensor z,
                              const Ragged& rg) = 0;
  // Mamba-2 SSD scan of every sequence of rg from its slot's state in st ([H, P, N] float,
  // updated): the contract of ref::ssd_scan. x, y [n_tokens, H * P]; dt [n_tokens, H] (raw:
  // dt_bias, softplus and the [dt_min, dt_max] clamp are applied here); B and C [n_tokens, G * N]
  // views sharing one row stride; A [H] float32 (-exp(A_log)) in backend memory; dt_bias, Dskip [H].
  virtual void ssd_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt, Tensor dt_bias,
                        const float* A, Tensor B, Tensor C, Tensor Dskip, int heads, int groups,
                        float dt_min, float dt_max, const Ragged& rg) = 0;
  // Mamba-2's gated RMSNorm: out = rmsnorm(y * silu(z)) * w over each group of `group` columns.
  virtual void gated_rmsnorm(Tensor out, Tensor y, Tensor z, Tensor w, int group, float eps) = 0;
  // RoPE in place on x [n_tokens, heads * hd]: row t of sequence s at pos0[s] + t - start(s).
  virtual void rope(Tensor x, int heads, int hd, float theta, const Ragged& rg) = 0;
  // K and V rows of each sequence into its slot at positions pos0[s].. (converted to kv.dtype).
  virtual void kv_write(const KvPool& kv, Tensor k, Tensor v, const Ragged& rg) = 0;
  // Causal attention of each query row over its slot's cache rows 0..its position (kv_write
  // first): q, out [n_tokens, H * hd]; query head j reads kv head j / (H / G).
  virtual void attention(Tensor out, Tensor q, const KvPool& kv, int H, int G, int hd,
                         const Ragged& rg) = 0;
  // ---- Composite ops: the default runs the plain ops above in order (backend.cpp); a backend
  // overrides one where fusing pays (CUDA's decode step: fewer launches, no round trips). ----
  // The Mamba mixer's input stage: xz = x' . in_proj^T, x' = rmsnorm(x) * norm_w when norm_w
  // has data (else x itself), then xc = conv1d_silu(xz[:, c0 : c0 + E]) continuing the conv
  // state (c0 = conv_col0: 0 for Mamba-1's x | z, d_inner for Mamba-2's z | xBC | dt).
  // `normed` (x-sized) is scratch for x': an override may leave it unwritten. unit_norm: norm_w
  // is all ones (the model folded the norm's weight into in_proj's columns), so an override may
  // project x itself and scale each row of xz by 1 / rms(x) afterwards (Mamba-1 only: c0 = 0).
  virtual void mamba_in(Tensor xz, Tensor xc, int conv_col0, const StatePool& conv, Tensor x, Tensor normed,
                        Tensor norm_w, float eps, Tensor in_proj, Tensor conv_w, Tensor conv_b, const Ragged& rg,
                        bool unit_norm);
  // Mamba-2's gated norm and output projection: out (=|+=) gated_rmsnorm(y, z, norm_w, group) .
  // W^T. `normed` (y-sized) is scratch for the norm's output: an override may leave it unwritten.
  virtual void gated_norm_linear(Tensor out, Tensor y, Tensor z, Tensor norm_w, int group, float eps, Tensor W,
                                 bool accumulate, Tensor normed);
  // A Mamba-1 layer's weights as mamba_mixer takes them (no projection biases).
  struct MambaWeights {
    Tensor in_proj, conv_w, conv_b, x_proj, dt_w, dt_b, Dskip, out_proj;
    const float* A = nullptr;  // [E, N], -exp(A_log)
  };
  // A Mamba-1 mixer without dt/B/C norms: mamba_in(xz, xc, 0, conv, x, normed, norm_w, eps,
  // in_proj, conv_w, conv_b, rg, unit_norm); dbc = xc . x_proj^T (dt_r | B | C); dt_scan(y,
  // ssm, xc, dt_r, dt_w, dt, dt_b, A, B, C, Dskip, xz's z half, rg); out (=|+=) y . out_proj^T.
  // xz, xc, dbc, dt, y and normed are scratch an override may leave unwritten.
  virtual void mamba_mixer(Tensor out, bool accumulate, Tensor x, Tensor normed, Tensor norm_w, float eps,
                           bool unit_norm, const MambaWeights& w, const StatePool& conv, const StatePool& ssm,
                           Tensor xz, Tensor xc, Tensor dbc, Tensor dt, Tensor y, const Ragged& rg);
  // kv_write(kv, k, v, rg), then attention(out, q, kv, H, G, hd, rg): a decode step may read
  // each new K/V row where it is and store it in the cache in the same kernel.
  virtual void kv_attention(Tensor out, Tensor q, Tensor k, Tensor v, const KvPool& kv, int H, int G, int hd,
                            const Ragged& rg);
  // y (=|+=) x' . W^T, x' = rmsnorm(x) * norm_w; with a `scale` ([y.cols]), y += scale ⊙ (x' .
  // W^T) (accumulate must be set): a state bridge's injection, or the final norm and LM head.
  // `normed` (x-sized) and, with a scale, `tmp` (y-sized, x's type) are scratch that an override
  // may leave unwritten.
  virtual void norm_linear(Tensor y, Tensor x, Tensor normed, Tensor norm_w, float eps, Tensor W, bool accumulate,
                           Tensor scale, Tensor tmp);
  // y += x . W^T (accumulate), then a state bridge on the same x: y += scale ⊙ (rmsnorm(x) *
  // norm_w . bW^T). A layer's output projection and the next layer's bridge, which reads the
  // layer's inner output too. `normed` and `tmp` as norm_linear's, except that tmp has
  // 2 * y.cols columns when `folded` is given.
  // `folded` (may be empty): [W ; diag(scale) . bW . diag(norm_w)] ([2 * y.cols, x.cols], x's
  // type), so that both products are one GEMM and the bridge is its second half's rows times
  // 1 / rms(x) (an override may use it). `next_w` (may be empty): the next layer's pre-norm
  // weight [y.cols]. Returns true where the override has also written next = rmsnorm(y) *
  // next_w ([y.rows, y.cols], y's type), the next layer's normed input; the default returns false.
  virtual bool linear_bridge(Tensor y, Tensor x, Tensor W, Tensor normed, Tensor norm_w, float eps, Tensor bW,
                             Tensor scale, Tensor tmp, Tensor folded, Tensor next_w, Tensor next);
  // dt = dt_r . dt_w^T, then selective_scan with that dt. `dt` is scratch ([n_tokens, E]):
  // an override may compute each dt where the scan needs it and leave it unwritten.
  virtual void dt_scan(Tensor y, const StatePool& st, Tensor x, Tensor dt_r, Tensor dt_w, Tensor dt,
                       Tensor dt_bias, const float* A, Tensor B, Tensor C, Tensor Dskip, Tensor z,
                       const Ragged& rg);
  // dst[di,:] = src[si,:] for i < n, di = dst_idx ? dst_idx[i] : i (si likewise); same dtype.
  virtual void copy_rows(Tensor dst, const int32_t* dst_idx, Tensor src, const int32_t* src_idx,
                         int n) = 0;
  // dst[di,j] += gate_i * scale[j] * src[si,j] for i < n, j < dst.cols; gate_i = row_gate[i]
  // (float, backend memory) or 1 when null, scale[j] = 1 when scale is empty.
  virtual void add_rows(Tensor dst, const int32_t* dst_idx, Tensor src, const int32_t* src_idx,
                        int n, const float* row_gate, Tensor scale) = 0;

  // ---- Training ops (issue 15; docs/TRAINING.md): the forward/backward pairs of
  // kernels/ref/*_grad_ref.h on typed views. llm.c's rule: parameter gradients accumulate (+=),
  // activation gradients are assigned (=) unless the op takes `accumulate`. The sequence ops run
  // every sequence of rg from zero state (conv window, scan state) with its own rows as the only
  // keys (attention); slots are not read. A forward without a training variant here (rmsnorm,
  // linear, swiglu, rope) is the inference op. Shapes are checked by train_checks.h. The
  // defaults throw: a backend that does not override them cannot train.

  // y = x W^T: dx (=|+=) dy W (skipped when dx is empty), dW += dy^T x.
  virtual void linear_backward(Tensor dx, Tensor dW, Tensor dy, Tensor x, Tensor W, bool accumulate_dx);
  // rmsnorm's backward, rstd recomputed from x: dx (=|+=), dw += sum over rows of dout x rstd.
  virtual void rmsnorm_backward(Tensor dx, Tensor dw, Tensor dout, Tensor x, Tensor w, float eps,
                                bool accumulate_dx);
  // out = silu(g) u: dg = dout u silu'(g), du = dout silu(g).
  virtual void swiglu_backward(Tensor dg, Tensor du, Tensor dout, Tensor g, Tensor u);
  // out = relu2(x) = max(x, 0)^2: dx = dout 2 max(x, 0).
  virtual void relu2_backward(Tensor dx, Tensor dout, Tensor x);
  // conv1d_silu of every sequence from a zero window, keeping no state; x, out [n_tokens, E].
  virtual void conv1d_silu_train(Tensor out, Tensor x, Tensor w, Tensor b, const Ragged& rg);
  // Its backward (the pre-activation recomputed): dx assigned, dw and db accumulated.
  virtual void conv1d_silu_backward(Tensor dx, Tensor dw, Tensor db, Tensor dout, Tensor x,
                                    Tensor w, Tensor b, const Ragged& rg);
  // The selective scan for training, A = -exp(A_log) [E, N] formed inside. The forward keeps in
  // `saved` (scan_saved_bytes of backend memory, the backend's own layout) what its backward
  // needs besides the inputs: at most the states entering each `chunk` tokens of a sequence
  // (chunk <= 0: the backend's choice; both calls must pass the same), never [n_tokens, E, N];
  // the backward recomputes the states in between.
  virtual size_t scan_saved_bytes(const Ragged& rg, int E, int N, int chunk) const;
  virtual void selective_scan_train(Tensor y, void* saved, Tensor x, Tensor dt, Tensor dt_bias,
                                    Tensor A_log, Tensor B, Tensor C, Tensor Dskip, Tensor z,
                                    int chunk, const Ragged& rg);
  // dx, ddt, dB, dC, dz assigned; ddt_bias, dA_log, dDskip accumulated. dB and dC (as B and C)
  // may be column views of one matrix.
  virtual void selective_scan_backward(Tensor dx, Tensor ddt, Tensor dB, Tensor dC, Tensor dz,
                                       Tensor ddt_bias, Tensor dA_log, Tensor dDskip, Tensor dy,
                                       const void* saved, Tensor x, Tensor dt, Tensor dt_bias,
                                       Tensor A_log, Tensor B, Tensor C, Tensor Dskip, Tensor z,
                                       int chunk, const Ragged& rg);
  // Mamba-2's SSD scan of every sequence from a zero state, keeping nothing: ssd_scan's contract
  // with A_log [1, heads] float32 (A = -exp(A_log) formed inside) in place of A.
  virtual void ssd_scan_train(Tensor y, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B, Tensor C,
                              Tensor Dskip, int heads, int groups, float dt_min, float dt_max, const Ragged& rg);
  // Its backward, the states recomputed from the inputs: dx, ddt, dB, dC assigned (dB and dC may
  // be column views of one matrix, as B and C); ddt_bias, dA_log, dDskip accumulated.
  virtual void ssd_scan_backward(Tensor dx, Tensor ddt, Tensor dB, Tensor dC, Tensor ddt_bias, Tensor dA_log,
                                 Tensor dDskip, Tensor dy, Tensor x, Tensor dt, Tensor dt_bias, Tensor A_log,
                                 Tensor B, Tensor C, Tensor Dskip, int heads, int groups, float dt_min,
                                 float dt_max, const Ragged& rg);
  // gated_rmsnorm's backward: dy and dz assigned, dw accumulated.
  virtual void gated_rmsnorm_backward(Tensor dy, Tensor dz, Tensor dw, Tensor dout, Tensor y, Tensor z, Tensor w,
                                      int group, float eps);
  // Causal attention of each sequence over its own rows: q, out [n_tokens, H hd]; k, v
  // [n_tokens, G hd]; lse [n_tokens, H] = log sum_j exp(q.k_j / sqrt(hd)), kept for the backward.
  virtual void attention_train(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, int H, int G,
                               int hd, const Ragged& rg);
  // dq, dk, dv assigned (no L x L matrix is kept between the calls).
  virtual void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q,
                                  Tensor k, Tensor v, Tensor out, Tensor lse, int H, int G, int hd,
                                  const Ragged& rg);
  // rope's transpose in place on dx (the rotation by -angle), positions as rope's.
  virtual void rope_backward(Tensor dx, int heads, int hd, float theta, const Ragged& rg);
  // out = table[ids]: dtable[ids[i]] += dout[i] for i < dout.rows (ids in backend memory).
  virtual void embedding_backward(Tensor dtable, Tensor dout, const int32_t* ids);
  // The LM head fused with cross-entropy, never all rows' logits at once: logits = hn W^T;
  // returns the sum over rows with targets[i] >= 0 (ids in backend memory, < W.rows) of
  // -log softmax(logits_i)[targets[i]]; dlogits = (softmax - onehot) * scale, so dhn = dlogits W
  // is assigned (0 on ignored rows) and dW += dlogits^T hn.
  virtual double cross_entropy_head(Tensor dhn, Tensor dW, Tensor hn, Tensor W,
                                    const int32_t* targets, double scale);
  // The backward of add_rows(dst, -, src, -, src.rows, nullptr, scale): dsrc = ddst * scale
  // (per column, assigned), dscale += the sum over rows of ddst * src (a bridge's gate).
  virtual void scale_cols_backward(Tensor dsrc, Tensor dscale, Tensor ddst, Tensor src, Tensor scale);
  // out[r] = a[a_idx ? a_idx[r] : r] . b[r] for each of b's rows (out float32 [1, b.rows]; a_idx
  // in backend memory): an MoE gate's gradient, dout of the token . its expert's output.
  virtual void row_dots(Tensor out, Tensor a, const int32_t* a_idx, Tensor b);
  // The True Hybrid router (kernels/ref/router_ref.h's router_forward) over a ragged batch: from
  // u [n, D] and the router's float32 weights w [1, D], fw [1, kRouterFeatures], b [1, 1], the
  // logits r [1, n] and, unless feats is empty (no data), the features feats [n, kRouterFeatures]
  // (float32); chunk > 0: each chunk of `chunk` positions takes the logit of its first token.
  // st null (training): each sequence from position 0 with an empty EMA. st given (inference):
  // each sequence continues its slot's analyzer state at position rg.pos0(s): st->at(slot) holds
  // the EMA [D] then the current chunk's logit (slot_stride D + 1), read and brought up to date.
  virtual void router(Tensor r, Tensor feats, Tensor u, Tensor w, Tensor fw, Tensor b, const Ragged& rg,
                      int chunk, const StatePool* st);
  // dst = src in dst's type (same shape; round to nearest even): the compute copy of float32
  // master weights in mixed-precision training.
  virtual void convert(Tensor dst, Tensor src);

  // ---- Optimizer ops (issue 15): the tensors of a float32 arena in backend memory (a Params
  // layout), each [offset, offset + n) with its weight decay. ----
  struct ArenaSpan {
    int64_t offset = 0, n = 0;
    float weight_decay = 0;
  };
  // The sum of x^2 over every span, accumulated in double in one fixed order (any launch shape
  // and thread count gives the same bits: a resumed run clips as the uninterrupted one).
  virtual double sum_squares(const float* x, const std::vector<ArenaSpan>& spans);
  // optimizer.h's AdamW update of every span in one pass over p, g, m, v, with the gradient
  // g * grad_scale (the clipped one; g itself is not written):
  //   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
  //   p -= lr (m inv_bc1 / (sqrt(v inv_bc2) + eps) + weight_decay p).
  struct AdamWStep {
    float lr = 0, beta1 = 0, beta2 = 0, eps = 0, inv_bc1 = 1, inv_bc2 = 1, grad_scale = 1;
  };
  virtual void adamw_step(float* p, const float* g, float* m, float* v, const std::vector<ArenaSpan>& spans,
                          const AdamWStep& k);
};

std::unique_ptr<Backend> make_cpu_backend();
// kernels/ref behind the interface: the oracle for tests (slow).
std::unique_ptr<Backend> make_ref_backend();
// CUDA throws hm::Error when the build has no CUDA backend or no device is present.
std::unique_ptr<Backend> make_backend(Device d);
std::vector<Device> compiled_devices();
// True when this build has the CUDA backend and a CUDA device is present.
bool cuda_available();

// A byte allocation owned by a backend.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& be, size_t bytes) : be_(&be), n_(bytes) { p_ = be.alloc(bytes); }
  ~Buffer() { if (p_) be_->free(p_); }
  Buffer(Buffer&& o) noexcept : be_(o.be_), p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      if (p_) be_->free(p_);
      be_ = o.be_; p_ = o.p_; n_ = o.n_;
      o.p_ = nullptr; o.n_ = 0;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* data() const { return p_; }
  float* f32() const { return static_cast<float*>(p_); }
  size_t bytes() const { return n_; }
  Device device() const { return be_->device(); }
  // rows x cols of dtype at the start of the buffer (which must hold them).
  Tensor tensor(DType t, int rows, int cols) const {
    HM_ASSERT(size_t(rows) * size_t(cols) * dtype_size(t) <= n_ || (rows == 0 || cols == 0));
    return {p_, t, rows, cols, cols};
  }
  // Grows (contents not kept) when fewer than `bytes` are held.
  void reserve(Backend& be, size_t bytes) { if (n_ < bytes || !p_) *this = Buffer(be, bytes); }

 private:
  Backend* be_ = nullptr;
  void* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace hm
