#include "train/batch_grad.h"

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"
#include "train/layout.h"
#include "train/model_grad.h"

namespace hm {

namespace {

// A backend buffer grown to hold rows x cols of t, viewed as that tensor.
Tensor act(Backend& be, Buffer& b, DType t, int rows, int cols) {
  b.reserve(be, std::max<size_t>(1, size_t(rows) * size_t(cols) * dtype_size(t)));
  return b.tensor(t, rows, cols);
}

// What one layer's forward keeps for its backward besides the stream entering it (docs/MODEL.md's
// names): views into one backend buffer (the layer's own, or with grad_ckpt the one slot every
// layer is computed in), each view aligned to kAlign bytes.
struct LayerActs {
  Tensor u;                               // rmsnorm(stream entering the layer, norm)
  Tensor x, z, xc, dt, yg, dbc;           // Mamba: conv input, gate, scan input, dt, y*silu(z), dt_r|B|C
  void* scan = nullptr;                   // Mamba: the scan's saved states (scan_saved_bytes)
  Tensor q, k, v, lse, inner;             // attention (lse float32 [n, H])
  Tensor h2, m, g, up, a;                 // MLP: stream entering mlp_norm, its norm, gate, up, silu(gate)*up
  Tensor bn;                              // the bridge's rmsnorm(source) (without grad_ckpt)
};

constexpr size_t kAlign = 256;

// Lays out one layer's activations from base (nullptr: only counts); returns the bytes they take.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  Tensor take(DType t, int rows, int cols) {
    void* p = bytes(size_t(rows) * size_t(cols) * dtype_size(t));
    return {p, t, rows, cols};
  }
  void* bytes(size_t b) {
    char* p = base_ ? base_ + off_ : nullptr;
    off_ += (b + kAlign - 1) / kAlign * kAlign;
    return p;
  }
  size_t size() const { return off_; }

 private:
  char* base_;
  size_t off_ = 0;
};

}  // namespace

struct BatchGrad::Impl {
  Backend& be;
  Layout lo;
  DType ct;
  bool ckpt;
  const float* master = nullptr;
  Buffer wc;  // the compute copy of the weights (16-bit types only)
  const char* W = nullptr;
  float* G = nullptr;  // the gradient arena of the current call
  Ragged rg;
  int n = 0;  // tokens of the current batch
  Buffer ids, tgts;
  std::vector<Buffer> hin;     // [n_layers] the stream entering each layer's pre-norm (after its bridge)
  std::vector<Buffer> arenas;  // each layer's LayerActs, or with ckpt one slot that any layer fits
  Buffer bnb;                  // ckpt: the bridge's rmsnorm(source), one bridge at a time
  Buffer h, mix, hn, p;  // stream, a block's output, the final norm, a bridge's projection
  Buffer dh, dtmp, dbridge, dy, dhn, dp;
  Buffer dyg, dxc, ddt, dz, ddbc;  // Mamba backward
  Buffer dinn, dq, dk, dv;         // attention backward
  Buffer da, dg, dup;              // MLP backward
  Buffer dW_scratch;               // loss_sum's head gradient (discarded)

  Impl(Backend& b, const Params& layout, DType t, bool grad_ckpt) : be(b), lo(layout), ct(t), ckpt(grad_ckpt) {}

  const ModelConfig& c() const { return lo.c; }
  // Weights in the compute type; A_log stays float32 (the scan forms A = -exp(A_log) in float).
  Tensor w(int64_t off, int rows, int cols) const {
    HM_ASSERT(off != kNoTensor);
    return {const_cast<char*>(W) + off * int64_t(dtype_size(ct)), ct, rows, cols};
  }
  Tensor w32(int64_t off, int rows, int cols) const {
    HM_ASSERT(off != kNoTensor);
    return {const_cast<float*>(master) + off, DType::F32, rows, cols};
  }
  Tensor g(int64_t off, int rows, int cols) const {
    HM_ASSERT(off != kNoTensor);
    return {G + off, DType::F32, rows, cols};
  }
  Tensor a(Buffer& b, int cols) { return act(be, b, ct, n, cols); }

  // Layer i's activations laid out from base (nullptr: sizes only).
  LayerActs carve(int i, char* base, size_t* bytes) const {
    const ModelConfig& mc = c();
    const int D = mc.d_model;
    Carver cv(base);
    LayerActs s;
    s.u = cv.take(ct, n, D);
    if (mc.is_attention(i)) {
      const int H = mc.n_heads, Q = H * mc.head_dim(), KV = mc.n_kv_heads * mc.head_dim();
      s.q = cv.take(ct, n, Q);
      s.k = cv.take(ct, n, KV);
      s.v = cv.take(ct, n, KV);
      s.inner = cv.take(ct, n, Q);
      s.lse = cv.take(DType::F32, n, H);
    } else {
      const int E = mc.d_inner(), N = mc.d_state, P = mc.resolved_dt_rank() + 2 * N;
      s.x = cv.take(ct, n, E);
      s.z = cv.take(ct, n, E);
      s.xc = cv.take(ct, n, E);
      s.dt = cv.take(ct, n, E);
      s.yg = cv.take(ct, n, E);
      s.dbc = cv.take(ct, n, P);
      s.scan = cv.bytes(be.scan_saved_bytes(rg, E, N, 0));
    }
    if (mc.d_ff > 0) {
      s.h2 = cv.take(ct, n, D);
      s.m = cv.take(ct, n, D);
      s.g = cv.take(ct, n, mc.d_ff);
      s.up = cv.take(ct, n, mc.d_ff);
      s.a = cv.take(ct, n, mc.d_ff);
    }
    if (!ckpt && mc.has_bridge(i)) s.bn = cv.take(ct, n, mc.inner_dim(i - 1));
    if (bytes) *bytes = cv.size();
    return s;
  }
  // Layer i's activations (with ckpt: valid while the slot holds layer i).
  LayerActs acts(int i) { return carve(i, static_cast<char*>(arenas[ckpt ? 0 : size_t(i)].data()), nullptr); }
  // Layer i's bridge input rmsnorm(inner(i - 1)): saved by the forward, or with ckpt recomputed.
  Tensor bridge_norm(int i) {
    return ckpt ? act(be, bnb, ct, n, c().inner_dim(i - 1)) : acts(i).bn;
  }

  void begin(const int32_t* tokens, const int32_t* targets, int B, int L) {
    HM_CHECK(master != nullptr, "BatchGrad: set_weights was not called");
    const ModelConfig& mc = c();
    n = B * L;
    rg.clear();
    for (int b = 0; b < B; ++b) rg.add(b, L, 0);
    rg.upload(be);
    ids.reserve(be, sizeof(int32_t) * size_t(n));
    tgts.reserve(be, sizeof(int32_t) * size_t(n));
    be.to_device(ids.data(), tokens, sizeof(int32_t) * size_t(n));
    be.to_device(tgts.data(), targets, sizeof(int32_t) * size_t(n));
    // Every buffer grown here, before the forward: the slot must not be reallocated while it
    // holds a layer whose inner output the next bridge reads.
    hin.resize(size_t(mc.n_layers));
    arenas.resize(ckpt ? 1 : size_t(mc.n_layers));
    size_t slot = 1, S = 0;
    for (int i = 0; i < mc.n_layers; ++i) {
      hin[size_t(i)].reserve(be, size_t(n) * size_t(mc.d_model) * dtype_size(ct));
      size_t bytes = 0;
      carve(i, nullptr, &bytes);
      if (ckpt)
        slot = std::max(slot, bytes);
      else
        arenas[size_t(i)].reserve(be, std::max<size_t>(1, bytes));
      if (mc.has_bridge(i)) S = std::max(S, size_t(mc.inner_dim(i - 1)));
    }
    if (ckpt) {
      arenas[0].reserve(be, slot);
      if (S > 0) bnb.reserve(be, size_t(n) * S * dtype_size(ct));
    }
  }

  // ---- the layers: forward and backward side by side ----

  // out [n, D] = the Mamba mixer of u (ref::grad::mamba_block_forward's math).
  void mamba_forward(const LayerActs& s, Tensor out, Tensor u, const LayerOffsets& o) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, E = mc.d_inner(), N = mc.d_state, R = mc.resolved_dt_rank(), P = R + 2 * N;
    const Tensor in_proj = w(o.in_proj, 2 * E, D);
    be.linear(s.x, u, in_proj.rows_view(0, E), false);  // x, z = in_proj(u).chunk(2, dim=-1)
    be.linear(s.z, u, in_proj.rows_view(E, E), false);
    be.conv1d_silu_train(s.xc, s.x, w(o.conv_w, E, mc.d_conv), w(o.conv_b, 1, E), rg);
    be.linear(s.dbc, s.xc, w(o.x_proj, P, E), false);  // dt_r, B, C = x_proj(xc).split([R, N, N])
    be.linear(s.dt, s.dbc.cols_view(0, R), w(o.dt_w, E, R), false);
    be.selective_scan_train(s.yg, s.scan, s.xc, s.dt, w(o.dt_b, 1, E), w32(o.A_log, E, N), s.dbc.cols_view(R, N),
                            s.dbc.cols_view(R + N, N), w(o.Dskip, 1, E), s.z, 0, rg);
    be.linear(out, s.yg, w(o.out_proj, D, E), false);
  }
  // du assigned; dinner (may be empty): the gradient reaching yg from the next layer's bridge.
  void mamba_backward(Tensor du, Tensor dout, Tensor dinner, Tensor u, const LayerActs& s, const LayerOffsets& o) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, E = mc.d_inner(), N = mc.d_state, K = mc.d_conv, R = mc.resolved_dt_rank(),
              P = R + 2 * N;
    const Tensor dYg = a(dyg, E), dXc = a(dxc, E), dDt = a(ddt, E), dZ = a(dz, E), gdbc = a(ddbc, P);
    if (!dinner.empty()) be.copy(dYg.data, dinner.data, size_t(n) * size_t(E) * dtype_size(ct));
    be.linear_backward(dYg, g(o.out_proj, D, E), dout, s.yg, w(o.out_proj, D, E), !dinner.empty());
    be.selective_scan_backward(dXc, dDt, gdbc.cols_view(R, N), gdbc.cols_view(R + N, N), dZ, g(o.dt_b, 1, E),
                               g(o.A_log, E, N), g(o.Dskip, 1, E), dYg, s.scan, s.xc, s.dt, w(o.dt_b, 1, E),
                               w32(o.A_log, E, N), s.dbc.cols_view(R, N), s.dbc.cols_view(R + N, N),
                               w(o.Dskip, 1, E), s.z, 0, rg);
    be.linear_backward(gdbc.cols_view(0, R), g(o.dt_w, E, R), dDt, s.dbc.cols_view(0, R), w(o.dt_w, E, R), false);
    // xc feeds both x_proj and the scan: x_proj's gradient adds into dxc
    be.linear_backward(dXc, g(o.x_proj, P, E), gdbc, s.xc, w(o.x_proj, P, E), true);
    const Tensor dx = dYg;  // dyg is dead once the scan's backward is done
    be.conv1d_silu_backward(dx, g(o.conv_w, E, K), g(o.conv_b, 1, E), dXc, s.x, w(o.conv_w, E, K),
                            w(o.conv_b, 1, E), rg);
    const Tensor in_proj = w(o.in_proj, 2 * E, D), gin = g(o.in_proj, 2 * E, D);
    be.linear_backward(du, gin.rows_view(0, E), dx, u, in_proj.rows_view(0, E), false);
    be.linear_backward(du, gin.rows_view(E, E), dZ, u, in_proj.rows_view(E, E), true);
  }
  void attention_forward(const LayerActs& s, Tensor out, Tensor u, const LayerOffsets& o) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, H = mc.n_heads, Gk = mc.n_kv_heads, hd = mc.head_dim(), Q = H * hd, KV = Gk * hd;
    be.linear(s.q, u, w(o.wq, Q, D), false);
    be.linear(s.k, u, w(o.wk, KV, D), false);
    be.linear(s.v, u, w(o.wv, KV, D), false);
    if (mc.rope) {
      be.rope(s.q, H, hd, mc.rope_theta, rg);
      be.rope(s.k, Gk, hd, mc.rope_theta, rg);
    }
    be.attention_train(s.inner, s.lse, s.q, s.k, s.v, H, Gk, hd, rg);
    be.linear(out, s.inner, w(o.wo, D, Q), false);
  }
  void attention_backward(Tensor du, Tensor dout, Tensor dinner, Tensor u, const LayerActs& s,
                          const LayerOffsets& o) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, H = mc.n_heads, Gk = mc.n_kv_heads, hd = mc.head_dim(), Q = H * hd, KV = Gk * hd;
    const Tensor dI = a(dinn, Q), dQ = a(dq, Q), dK = a(dk, KV), dV = a(dv, KV);
    if (!dinner.empty()) be.copy(dI.data, dinner.data, size_t(n) * size_t(Q) * dtype_size(ct));
    be.linear_backward(dI, g(o.wo, D, Q), dout, s.inner, w(o.wo, D, Q), !dinner.empty());
    be.attention_backward(dQ, dK, dV, dI, s.q, s.k, s.v, s.inner, s.lse, H, Gk, hd, rg);
    if (mc.rope) {  // gradients with respect to q, k before the rotation
      be.rope_backward(dQ, H, hd, mc.rope_theta, rg);
      be.rope_backward(dK, Gk, hd, mc.rope_theta, rg);
    }
    be.linear_backward(du, g(o.wq, Q, D), dQ, u, w(o.wq, Q, D), false);
    be.linear_backward(du, g(o.wk, KV, D), dK, u, w(o.wk, KV, D), true);
    be.linear_backward(du, g(o.wv, KV, D), dV, u, w(o.wv, KV, D), true);
  }

  // out = down(silu(gate(m)) * up(m))
  void mlp_forward(const LayerActs& s, Tensor out, const LayerOffsets& o) {
    const int D = c().d_model, F = c().d_ff;
    be.linear(s.g, s.m, w(o.w_gate, F, D), false);
    be.linear(s.up, s.m, w(o.w_up, F, D), false);
    be.swiglu(s.a, s.g, s.up);
    be.linear(out, s.a, w(o.w_down, D, F), false);
  }
  void mlp_backward(Tensor dm, Tensor dout, const LayerActs& s, const LayerOffsets& o) {
    const int D = c().d_model, F = c().d_ff;
    const Tensor dA = a(da, F), dG = a(dg, F), dU = a(dup, F);
    be.linear_backward(dA, g(o.w_down, D, F), dout, s.a, w(o.w_down, D, F), false);
    be.swiglu_backward(dG, dU, dA, s.g, s.up);
    be.linear_backward(dm, g(o.w_gate, F, D), dG, s.m, w(o.w_gate, F, D), false);
    be.linear_backward(dm, g(o.w_up, F, D), dU, s.m, w(o.w_up, F, D), true);
  }

  // Layer i's inner representation (y * silu(z) or the head contexts): the next bridge's source.
  // With ckpt, valid while the slot holds layer i.
  Tensor inner(int i) {
    const LayerActs s = acts(i);
    return c().is_attention(i) ? s.inner : s.yg;
  }

  // Layer i after its bridge: H (the stream entering the pre-norm, already saved in hin[i])
  // becomes the layer's output, saving its activations. The only code that computes a layer,
  // so grad_ckpt's recompute is bit-identical.
  void layer_forward(int i, Tensor H, Tensor O) {
    const ModelConfig& mc = c();
    const int D = mc.d_model;
    const float eps = float(mc.norm_eps);
    const LayerOffsets& o = lo.layers[size_t(i)];
    const LayerActs s = acts(i);
    be.rmsnorm(s.u, H, w(o.norm, 1, D), eps);
    if (mc.is_attention(i))
      attention_forward(s, O, s.u, o);
    else
      mamba_forward(s, O, s.u, o);
    be.add_rows(H, nullptr, O, nullptr, n, nullptr, Tensor());
    if (mc.d_ff > 0) {
      be.copy(s.h2.data, H.data, size_t(n) * D * dtype_size(ct));
      be.rmsnorm(s.m, H, w(o.mlp_norm, 1, D), eps);
      mlp_forward(s, O, o);
      be.add_rows(H, nullptr, O, nullptr, n, nullptr, Tensor());
    }
  }
  // grad_ckpt: re-runs layer i's forward from hin[i] into the slot, in the stream and block
  // buffers (the backward is done with them).
  void recompute(int i) {
    const int D = c().d_model;
    const Tensor H = a(h, D), O = a(mix, D);
    be.copy(H.data, hin[size_t(i)].data(), size_t(n) * D * dtype_size(ct));
    layer_forward(i, H, O);
  }

  // The whole forward, every layer's activations kept (with ckpt: each layer's input, and the
  // last layer's activations in the slot); leaves rmsnorm(h, norm_f) in hn.
  Tensor forward() {
    const ModelConfig& mc = c();
    const int D = mc.d_model, V = mc.vocab_size;
    const float eps = float(mc.norm_eps);
    const Tensor H = a(h, D), O = a(mix, D);
    be.embedding(H, w(lo.emb, V, D), static_cast<const int32_t*>(ids.data()));
    for (int i = 0; i < mc.n_layers; ++i) {
      const LayerOffsets& o = lo.layers[size_t(i)];
      if (mc.has_bridge(i)) {  // h += gate * (rmsnorm(src) proj^T); src is still in the slot with ckpt
        const int S = mc.inner_dim(i - 1);
        const Tensor bn = bridge_norm(i), pp = a(p, D);
        be.rmsnorm(bn, inner(i - 1), w(o.bridge_norm, 1, S), eps);
        be.linear(pp, bn, w(o.bridge_proj, D, S), false);
        be.add_rows(H, nullptr, pp, nullptr, n, nullptr, w(o.bridge_gate, 1, D));
      }
      be.copy(hin[size_t(i)].data(), H.data, size_t(n) * D * dtype_size(ct));
      layer_forward(i, H, O);
    }
    const Tensor HN = a(hn, D);
    be.rmsnorm(HN, H, w(lo.norm_f, 1, D), eps);
    return HN;
  }

  // The reverse of forward() from dhn; adds every parameter gradient but the head's. With ckpt
  // the slot still holds the last layer from the forward; once layer i's mixer backward is done,
  // layer i-1 is re-run into it, which also rebuilds the inner output layer i's bridge needs.
  void backward(Tensor dHN) {
    const ModelConfig& mc = c();
    const int D = mc.d_model, V = mc.vocab_size;
    const float eps = float(mc.norm_eps);
    const Tensor dH = a(dh, D), dT = a(dtmp, D), H = a(h, D);
    be.rmsnorm_backward(dH, g(lo.norm_f, 1, D), dHN, H, w(lo.norm_f, 1, D), eps, false);
    Tensor dI;  // gradient into layer i's inner output from layer i+1's bridge (empty: none)
    for (int i = mc.n_layers - 1; i >= 0; --i) {
      const LayerOffsets& o = lo.layers[size_t(i)];
      const LayerActs s = acts(i);
      const Tensor hi = hin[size_t(i)].tensor(ct, n, D);
      if (mc.d_ff > 0) {  // h_out = h2 + mlp(rmsnorm(h2))
        mlp_backward(dT, dH, s, o);
        be.rmsnorm_backward(dH, g(o.mlp_norm, 1, D), dT, s.h2, w(o.mlp_norm, 1, D), eps, true);
      }
      if (mc.is_attention(i))
        attention_backward(dT, dH, dI, s.u, s, o);
      else
        mamba_backward(dT, dH, dI, s.u, s, o);
      be.rmsnorm_backward(dH, g(o.norm, 1, D), dT, hi, w(o.norm, 1, D), eps, true);
      // Layer i's activations are dead: the slot takes layer i-1, whose inner output the bridge needs.
      if (ckpt && i > 0) recompute(i - 1);
      dI = Tensor();
      if (mc.has_bridge(i)) {  // h = h_in + gate * (bn proj^T): dh passes through as is
        const int S = mc.inner_dim(i - 1);
        const Tensor bn = bridge_norm(i), pp = a(p, D), dP = a(dp, D), dY = a(dy, S);
        if (ckpt) be.rmsnorm(bn, inner(i - 1), w(o.bridge_norm, 1, S), eps);
        be.linear(pp, bn, w(o.bridge_proj, D, S), false);  // recomputed: cheaper than keeping it
        be.scale_cols_backward(dP, g(o.bridge_gate, 1, D), dH, pp, w(o.bridge_gate, 1, D));
        be.linear_backward(dY, g(o.bridge_proj, D, S), dP, bn, w(o.bridge_proj, D, S), false);
        dI = a(dbridge, S);
        be.rmsnorm_backward(dI, g(o.bridge_norm, 1, S), dY, inner(i - 1), w(o.bridge_norm, 1, S), eps, false);
      }
    }
    be.embedding_backward(g(lo.emb, V, D), dH, static_cast<const int32_t*>(ids.data()));
  }
};

BatchGrad::BatchGrad(Backend& be, const Params& layout, DType compute, bool grad_ckpt)
    : impl_(std::make_unique<Impl>(be, layout, compute, grad_ckpt)) {
  const ModelConfig& c = layout.config();
  HM_CHECK(be.supports(compute), be.name(), " backend: training cannot compute in ", compute_dtype_name(compute));
  const std::string no = training_unsupported(c);
  HM_CHECK(no.empty(), "training: the model has no backward pass yet: ", no);
  for (int i = 0; i < c.n_layers; ++i)
    HM_CHECK(!c.is_true(i), "training on the ", be.name(), " backend: layer ", i,
             " is a True Hybrid layer, whose router and fusion train on the CPU only so far (--device cpu)");
}

BatchGrad::~BatchGrad() = default;

DType BatchGrad::compute() const { return impl_->ct; }
bool BatchGrad::grad_ckpt() const { return impl_->ckpt; }

void BatchGrad::set_weights(const float* master) {
  Impl& I = *impl_;
  I.master = master;
  if (I.ct == DType::F32) {
    I.W = reinterpret_cast<const char*>(master);
    return;
  }
  // The arena as rows of at most 2^20 elements (Tensor sizes are int), then its tail.
  const int64_t total = I.lo.numel, cols = int64_t(1) << 20;
  I.wc.reserve(I.be, size_t(total) * dtype_size(I.ct));
  const int64_t rows = total / cols, tail = total - rows * cols;
  if (rows > 0)
    I.be.convert(Tensor(I.wc.data(), I.ct, int(rows), int(cols)),
                 Tensor(const_cast<float*>(master), DType::F32, int(rows), int(cols)));
  if (tail > 0)
    I.be.convert(Tensor(static_cast<char*>(I.wc.data()) + rows * cols * int64_t(dtype_size(I.ct)), I.ct, 1, int(tail)),
                 Tensor(const_cast<float*>(master) + rows * cols, DType::F32, 1, int(tail)));
  I.W = static_cast<const char*>(I.wc.data());
}

double BatchGrad::loss_and_grad(float* grads, const int32_t* tokens, const int32_t* targets, int B, int L,
                                double grad_scale) {
  HM_CHECK(impl_->ct != DType::F16, "training in f16 needs loss scaling (its gradients underflow f16's range: "
           "measured on the H200, dt_proj's gradient 0.35 off), which is not implemented; train in bf16");
  Impl& I = *impl_;
  const int64_t total = check_train_batch(I.c(), tokens, targets, B, L, 0);
  if (total == 0) return 0.0;
  HM_CHECK(int64_t(B) * L <= INT32_MAX, "training: a batch of ", B, " x ", L, " tokens is too large");
  I.G = grads;
  I.begin(tokens, targets, B, L);
  const Tensor HN = I.forward();
  const int D = I.c().d_model, V = I.c().vocab_size;
  const Tensor dHN = I.a(I.dhn, D);
  const double sum = I.be.cross_entropy_head(dHN, I.g(I.lo.head, V, D), HN, I.w(I.lo.head, V, D),
                                             static_cast<const int32_t*>(I.tgts.data()), grad_scale / double(total));
  I.backward(dHN);
  return sum / double(total);
}

double BatchGrad::loss_sum(const int32_t* tokens, const int32_t* targets, int B, int L, int64_t* counted) {
  Impl& I = *impl_;
  const int64_t total = check_train_batch(I.c(), tokens, targets, B, L, 0);
  if (counted) *counted = total;
  if (total == 0) return 0.0;
  I.begin(tokens, targets, B, L);
  const Tensor HN = I.forward();
  const int D = I.c().d_model, V = I.c().vocab_size;
  // The fused head also forms gradients: scale 0 and a scratch dW, discarded.
  const Tensor dW = act(I.be, I.dW_scratch, DType::F32, V, D);
  return I.be.cross_entropy_head(I.a(I.dhn, D), dW, HN, I.w(I.lo.head, V, D),
                                 static_cast<const int32_t*>(I.tgts.data()), 0.0);
}

size_t BatchGrad::activation_bytes() const {
  const Impl& I = *impl_;
  size_t b = I.bnb.bytes();
  for (const Buffer& x : I.hin) b += x.bytes();
  for (const Buffer& x : I.arenas) b += x.bytes();
  for (const Buffer* x : {&I.h, &I.mix, &I.hn, &I.p, &I.dh, &I.dtmp, &I.dbridge, &I.dy, &I.dhn, &I.dp, &I.dyg, &I.dxc,
                          &I.ddt, &I.dz, &I.ddbc, &I.dinn, &I.dq, &I.dk, &I.dv, &I.da, &I.dg, &I.dup, &I.dW_scratch})
    b += x->bytes();
  return b;
}

}  // namespace hm
